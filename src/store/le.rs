//! Little-endian fields and the trailing CRC-32 (IEEE) that cwm's file formats share: the
//! record (`store::record`), the index checkpoint (`store::disk::checkpoint`) and the window
//! export (`windows::export`). Layouts are in docs/FORMATS.md; this module only reads and
//! writes their fields, so no format hand-rolls a cursor or a checksum of its own.

use std::io::{self, Write};

/// Appending little-endian integers to a buffer.
pub trait PutLe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutLe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }

    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }

    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}

/// Append the CRC-32 of everything already in `b`.
pub fn seal(b: &mut Vec<u8>) {
    let crc = crc32fast::hash(b);
    b.put_u32(crc);
}

/// The bytes before `b`'s trailing CRC-32 when it matches them; None when `b` is shorter than
/// a CRC or the CRC differs.
pub fn unseal(b: &[u8]) -> Option<&[u8]> {
    let split = b.len().checked_sub(4)?;
    let (body, crc) = b.split_at(split);
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    (crc32fast::hash(body) == crc).then_some(body)
}

/// Reads fields from the front of a byte slice. Every read is bounds-checked: past the end it
/// returns None and consumes nothing, whatever length a corrupt file claims.
#[derive(Debug, Clone)]
pub struct LeReader<'a> {
    rest: &'a [u8],
}

impl<'a> LeReader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        LeReader { rest: b }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(head)
    }

    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        Some(self.bytes(N)?.try_into().expect("N bytes"))
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// A writer that keeps a running CRC-32 of what passes through and appends it at `finish`:
/// for formats streamed to a file rather than built in memory.
pub struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> CrcWriter<W> {
    pub fn new(inner: W) -> Self {
        CrcWriter {
            inner,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Write the CRC-32 of everything written so far (not itself covered) and hand back the
    /// inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let crc = self.crc.clone().finalize();
        self.inner.write_all(&crc.to_le_bytes())?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_in_order_and_stop_at_the_end() {
        let mut b = Vec::new();
        b.push(7);
        b.put_u16(0x0102);
        b.put_u32(0x03040506);
        b.put_u64(u64::MAX - 1);
        assert_eq!(b[1..3], [0x02, 0x01], "little-endian");
        let mut r = LeReader::new(&b);
        assert_eq!(r.u8(), Some(7));
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u32(), Some(0x03040506));
        assert!(!r.is_empty());
        assert_eq!(r.u64(), Some(u64::MAX - 1));
        assert!(r.is_empty());
        assert_eq!(r.u8(), None);
        let mut r = LeReader::new(&b[..2]);
        assert_eq!(r.u32(), None, "a short read fails");
        assert_eq!(r.u16(), Some(0x0207), "and consumes nothing");
        assert_eq!(LeReader::new(&b).bytes(usize::MAX), None);
    }

    #[test]
    fn a_sealed_buffer_unseals_and_any_flipped_bit_is_caught() {
        let mut b = b"cwm".to_vec();
        seal(&mut b);
        assert_eq!(b.len(), 7);
        assert_eq!(unseal(&b), Some(&b"cwm"[..]));
        for bit in 0..b.len() * 8 {
            let mut bad = b.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(unseal(&bad), None, "bit {bit}");
        }
        assert_eq!(unseal(&b[..3]), None);
    }

    #[test]
    fn the_crc_writer_appends_what_seal_does() {
        let mut w = CrcWriter::new(Vec::new());
        w.write_all(b"window").unwrap();
        w.write_all(b" file").unwrap();
        let streamed = w.finish().unwrap();
        let mut sealed = b"window file".to_vec();
        seal(&mut sealed);
        assert_eq!(streamed, sealed);
    }
}
