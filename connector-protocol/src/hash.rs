//! LMCache's blake3 `TokenHasher` (spec §4.2): a rolling chain over full chunks.
//!
//! `h_i = BLAKE3(h_{i-1} || tokens[i..i+cs] as big-endian u32)`, `h_{-1} = NONE_HASH`. The
//! partial last chunk is dropped. cache_salt is *not* hashed; it separates `ObjectKey`s.

use std::fmt;

/// A chunk's 32-byte blake3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// 64 hex digits (either case); `None` otherwise.
    pub fn from_hex(s: &str) -> Option<ChunkHash> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkHash(out))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// `BLAKE3(0i64 BE || 0u32 BE)` = `7e3eff9e…473b`.
pub const NONE_HASH: ChunkHash = ChunkHash([
    0x7e, 0x3e, 0xff, 0x9e, 0xf7, 0x61, 0x3a, 0x50, 0x34, 0x0e, 0xb1, 0x26, 0x77, 0xee, 0x03, 0xb8,
    0x3a, 0xc7, 0x59, 0xfc, 0xba, 0x9b, 0xb3, 0x27, 0x05, 0xf0, 0x72, 0x48, 0xd5, 0x6d, 0x47, 0x3b,
]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenHasher {
    pub chunk_size: usize,
}

impl TokenHasher {
    pub fn new(chunk_size: usize) -> TokenHasher {
        assert!(chunk_size > 0, "chunk_size must be positive");
        TokenHasher { chunk_size }
    }

    /// `H(prefix, tokens)`.
    pub fn hash_chunk(prefix: &ChunkHash, tokens: &[u32]) -> ChunkHash {
        let mut h = blake3::Hasher::new();
        h.update(&prefix.0);
        // Big-endian u32 per token, fed in stack-sized batches (no per-call allocation).
        let mut buf = [0u8; 4 * 256];
        for batch in tokens.chunks(256) {
            for (dst, t) in buf.chunks_exact_mut(4).zip(batch) {
                dst.copy_from_slice(&t.to_be_bytes());
            }
            h.update(&buf[..4 * batch.len()]);
        }
        ChunkHash(*h.finalize().as_bytes())
    }

    /// Hashes of the full chunks of `tokens[..min(len, end)]` whose start index is `>= start`.
    /// The chain always starts at token 0.
    pub fn chunk_hashes(&self, tokens: &[u32], start: usize, end: usize) -> Vec<ChunkHash> {
        let cs = self.chunk_size;
        let eff = tokens.len().min(end);
        let n = eff - eff % cs;
        let mut prefix = NONE_HASH;
        let mut out = Vec::with_capacity((n / cs).saturating_sub(start / cs));
        for (i, chunk) in tokens[..n].chunks_exact(cs).enumerate() {
            prefix = TokenHasher::hash_chunk(&prefix, chunk);
            if i * cs >= start {
                out.push(prefix);
            }
        }
        out
    }

    /// `NONE_HASH` computed from its definition (for tests): `BLAKE3(0i64 BE || 0u32 BE)`.
    pub fn none_hash() -> ChunkHash {
        let mut h = blake3::Hasher::new();
        h.update(&0i64.to_be_bytes());
        h.update(&0u32.to_be_bytes());
        ChunkHash(*h.finalize().as_bytes())
    }
}
