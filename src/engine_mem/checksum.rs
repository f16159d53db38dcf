//! LMCache's `/cache/checksums`: MD5 digests of an engine's KV blocks, so a client can check
//! that a retrieve wrote back what a store read.
//!
//! The digests are LMCache 0.5.6's (`http_apis/cache_api.py`): each layer's registered tensor
//! view (shape, stride, storage offset, as LMCache rebuilds it from the `cpu_shm` descriptor) is
//! indexed by the block ids along its block axis (1 for `[2, NB, ...]`, else 0), every chunk is
//! `chunk_blocks` of those blocks along that axis, and its bytes are the contiguous row-major
//! copy of that slice, native (little-endian) byte order, `bfloat16` widened to `float32`
//! first. One digest per chunk over every layer's bytes in layer order, or with `layerwise`
//! one digest per (layer, chunk).
//!
//! LMCache 0.5.6 itself answers 501 for the rank-4 fused layouts (`[NB, BS, NH, 2*HS]` and
//! `[NB, NH, BS, 2*HS]`) and fails on dtypes numpy has no type for (fp8); cwm hashes those the
//! same way (block axis 0; raw bytes).

use md5::{Digest, Md5};

use super::KvLayout;

/// Appends `len` bytes of `layer`'s registered memory, starting `offset` bytes after the
/// layer's start, to the buffer: how a backend lets the digests read its memory.
pub type ReadRun<'a> = dyn Fn(usize, usize, usize, &mut Vec<u8>) + 'a;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksums {
    Chunks(Vec<String>),
    /// One list per layer, in layer order.
    Layers(Vec<Vec<String>>),
}

/// Digests of `block_ids` (bound-checked by the caller) in chunks of `chunk_blocks` blocks (the
/// last chunk may be shorter), reading the engine's memory through `read`.
pub fn block_checksums(
    layout: &KvLayout,
    block_ids: &[u32],
    chunk_blocks: usize,
    layerwise: bool,
    read: &ReadRun<'_>,
) -> Checksums {
    let chunks: Vec<&[u32]> = block_ids.chunks(chunk_blocks.max(1)).collect();
    let layers = layout.num_layers as usize;
    let mut buf = Vec::new();
    let mut digest = |layer: usize, c: &[u32], h: &mut Md5| {
        h.update(logical_bytes(layout, layer, c, read, &mut buf))
    };
    if layerwise {
        Checksums::Layers(
            (0..layers)
                .map(|layer| {
                    chunks
                        .iter()
                        .map(|c| {
                            let mut h = Md5::new();
                            digest(layer, c, &mut h);
                            hex::encode(h.finalize())
                        })
                        .collect()
                })
                .collect(),
        )
    } else {
        Checksums::Chunks(
            chunks
                .iter()
                .map(|c| {
                    let mut h = Md5::new();
                    for layer in 0..layers {
                        digest(layer, c, &mut h);
                    }
                    hex::encode(h.finalize())
                })
                .collect(),
        )
    }
}

/// The bytes LMCache hashes for `blocks` of `layer`: the view indexed by `blocks` along the
/// block axis, row-major, bf16 widened. `blocks` must have passed `check_blocks`.
fn logical_bytes<'a>(
    l: &KvLayout,
    layer: usize,
    blocks: &[u32],
    read: &ReadRun<'_>,
    buf: &'a mut Vec<u8>,
) -> &'a [u8] {
    let (shape, stride, axis) = (&l.shape, &l.stride, l.block_axis);
    let isz = l.itemsize as usize;
    // The innermost dimensions that form one contiguous run (never the block axis).
    let mut inner = shape.len();
    let mut run = 1u64;
    while inner > 0 {
        let d = inner - 1;
        if d == axis || (shape[d] != 1 && stride[d] != run) {
            break;
        }
        run *= shape[d];
        inner = d;
    }
    let run_bytes = run as usize * isz;
    let outer: Vec<u64> = (0..inner)
        .map(|d| {
            if d == axis {
                blocks.len() as u64
            } else {
                shape[d]
            }
        })
        .collect();
    let runs: u64 = outer.iter().product();
    buf.clear();
    buf.reserve(runs as usize * run_bytes);
    let mut idx = vec![0u64; inner];
    for _ in 0..runs {
        let elem: u64 = (0..inner)
            .map(|d| {
                let i = if d == axis {
                    u64::from(blocks[idx[d] as usize])
                } else {
                    idx[d]
                };
                i * stride[d]
            })
            .sum();
        // `elem * isz + run_bytes` stays within the view's byte span for checked blocks.
        read(layer, elem as usize * isz, run_bytes, buf);
        for d in (0..inner).rev() {
            idx[d] += 1;
            if idx[d] < outer[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    if l.dtype == "bfloat16" {
        // bf16 -> f32 is exact: the 16 bits become the high half.
        let widened: Vec<u8> = buf
            .chunks_exact(2)
            .flat_map(|b| (u32::from(u16::from_le_bytes([b[0], b[1]])) << 16).to_le_bytes())
            .collect();
        *buf = widened;
    }
    buf
}

/// LMCache's `compress_slot_mapping`: runs of 3 or more consecutive ids become `[first, last]`,
/// shorter runs stay single ids, order preserved.
pub fn compress_ids(ids: &[u32]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j].checked_add(1) == Some(ids[j + 1]) {
            j += 1;
        }
        if j - i >= 2 {
            out.push(serde_json::json!([ids[i], ids[j]]));
        } else {
            out.extend(ids[i..=j].iter().map(|&v| serde_json::json!(v)));
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_mem::shm::ShmSegment;
    use crate::engine_mem::{EngineMemError, EngineMemory};
    use connector_protocol::{IpcDescriptor, TensorMetadata};

    fn segment(tag: &str, n: u64) -> ShmSegment {
        let name = format!("/cwm_ck_{}_{tag}", std::process::id());
        let seg = ShmSegment::create(&name, n).unwrap();
        // Byte i = (7i + 3) mod 251: the fill the expected digests below were computed from.
        // SAFETY: the segment was just created, `n` bytes, mapped while `seg` lives, and no
        // one else has opened it yet.
        let bytes = unsafe { std::slice::from_raw_parts_mut(seg.as_mut_ptr(), n as usize) };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = ((i * 7 + 3) % 251) as u8;
        }
        seg
    }

    fn open(
        seg: &ShmSegment,
        dtype: &str,
        shape: &[u64],
        stride: &[u64],
        offsets: &[u64],
        hint: Option<&str>,
    ) -> Box<dyn EngineMemory> {
        let d: Vec<IpcDescriptor> = offsets
            .iter()
            .map(|&o| IpcDescriptor::CpuShm {
                shm_name: seg.name().to_string(),
                nbytes: seg.len(),
                metadata: TensorMetadata {
                    dtype: dtype.into(),
                    shape: shape.to_vec(),
                    stride: stride.to_vec(),
                    storage_offset: o,
                    device_uuid: "cpu".into(),
                },
            })
            .collect();
        crate::engine_mem::open(&d, hint).unwrap()
    }

    /// `kv`'s digests of `ids`, 2 blocks per chunk: aggregated, then per layer (2 layers).
    fn check(kv: &dyn EngineMemory, ids: &[u32], chunks: [&str; 2], layers: [[&str; 2]; 2]) {
        let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            kv.checksums(ids, 2, false).unwrap(),
            Checksums::Chunks(strs(&chunks))
        );
        assert_eq!(
            kv.checksums(ids, 2, true).unwrap(),
            Checksums::Layers(layers.iter().map(|l| strs(l)).collect())
        );
    }

    // Expected digests were computed independently in Python (numpy + hashlib) the way
    // LMCache's `_compute_block_checksums` does: `np.take(view, blocks, axis)`, bf16 as
    // `uint16 -> uint32 << 16`, chunk slices made contiguous, `md5(...tobytes())`.

    /// `[2, NB, BS, NH, HS]` bf16 (lmcache bench's layout): block axis 1, K plane then V
    /// plane within a chunk, widened to f32.
    #[test]
    fn rank5_bf16_matches_lmcache() {
        let seg = segment("kv5", 2 * 96 * 2);
        let shape = [2, 4, 2, 2, 3];
        let kv = open(&seg, "bfloat16", &shape, &[48, 12, 6, 3, 1], &[0, 96], None);
        check(
            &*kv,
            &[3, 1, 2],
            [
                "ee7f5ed26e4bb3d3818ee3ac4aeb8ac0",
                "f1c67e77845a1fe576dedef04443a7e2",
            ],
            [
                [
                    "498f1a9e3dcdefa0db82ec2afe8026ab",
                    "039a9c32471e7698896ad02ab856a76f",
                ],
                [
                    "85eace2b262968162c948db94a0492dc",
                    "be8f71d26c0280445a721f3fb6ea3bc2",
                ],
            ],
        );
    }

    /// Blocks-first head-major views (`BLHNC`: per layer `[NB, NH, BS, C]` with a block stride
    /// spanning every layer), fp16: hashed in the view's own (head-major) logical order.
    #[test]
    fn blocks_first_hnd_fp16_matches_lmcache() {
        let seg = segment("blhnc", 3 * 32 * 2);
        let kv = open(
            &seg,
            "float16",
            &[3, 2, 2, 4],
            &[32, 8, 4, 1],
            &[0, 16],
            Some("BLHNC"),
        );
        check(
            &*kv,
            &[2, 0, 1],
            [
                "6a8ba5bc4d00a19b90599eaabbdf0e7c",
                "183150a8d70eed53347bfbc460b55fbb",
            ],
            [
                [
                    "56d39d8c65ea45d882abcb650188db6f",
                    "97ea8c99ab2254ac8f7176d715c9d41d",
                ],
                [
                    "3f6acdc4938ceb17e50698d2417be48b",
                    "0f347cd1e151104e32912b79a6785bf3",
                ],
            ],
        );
    }

    #[test]
    fn out_of_range_blocks_are_refused() {
        let seg = segment("oob", 3 * 32 * 2);
        let kv = open(
            &seg,
            "float16",
            &[3, 2, 2, 4],
            &[32, 8, 4, 1],
            &[0, 16],
            Some("BLHNC"),
        );
        assert!(matches!(
            kv.checksums(&[0, 3], 1, false),
            Err(EngineMemError::BlockId {
                block: 3,
                num_blocks: 3
            })
        ));
    }

    #[test]
    fn compresses_like_lmcache() {
        let j = |ids: &[u32]| serde_json::to_string(&compress_ids(ids)).unwrap();
        assert_eq!(j(&[1, 2, 3, 4, 5, 9, 10, 11, 12]), "[[1,5],[9,12]]");
        assert_eq!(j(&[5, 3, 1, 2, 4]), "[5,3,1,2,4]");
        assert_eq!(j(&[1, 2, 3, 4, 5, 7, 8]), "[[1,5],7,8]");
        assert_eq!(j(&[7, 8, 8, 9, 10]), "[7,8,[8,10]]");
        assert_eq!(j(&[u32::MAX, 0, 1]), format!("[{},0,1]", u32::MAX));
        assert_eq!(j(&[]), "[]");
    }
}
