//! An engine-like paged KV cache for the benchmarks: every layer of a model in one POSIX shm
//! segment, registered the way vLLM registers it (per-layer views with a `storage_offset`).
//!
//! Only the two single-plane layouts vLLM registers on CPU-visible memory are built here:
//! `[NB, BS, NH, C]` with hint NHD (vLLM 0.33) and `[NB, NH, BS, C]` with hint HND (vLLM on
//! CPU), `C = 2 * head_dim` (K and V fused), bf16. In both, a block of one layer is one
//! contiguous run of bytes, which is what `first_difference` relies on.

use std::sync::atomic::{AtomicU64, Ordering};

use connector_protocol::{EngineGroupInfo, IpcDescriptor, TensorMetadata};
use rayon::prelude::*;

use crate::engine_mem::shm::ShmSegment;
use crate::engine_mem::EngineMemError;

/// Bytes per element (bf16).
pub const ITEMSIZE: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvShape {
    /// `[NB, BS, NH, C]`, hint NHD: a block's tokens are one contiguous run.
    Nhd,
    /// `[NB, NH, BS, C]`, hint HND: every (head, token) is its own run.
    Hnd,
}

impl KvShape {
    pub fn hint(self) -> &'static str {
        match self {
            KvShape::Nhd => "NHD",
            KvShape::Hnd => "HND",
        }
    }
}

/// Model geometry of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KvGeometry {
    pub shape: KvShape,
    pub layers: u64,
    pub blocks: u64,
    pub block_size: u64,
    pub heads: u64,
    /// Elements of one head of one token (`2 * head_dim`: K and V fused).
    pub content: u64,
}

impl KvGeometry {
    pub fn block_bytes(&self) -> u64 {
        self.block_size * self.heads * self.content * ITEMSIZE
    }

    pub fn layer_bytes(&self) -> u64 {
        self.blocks * self.block_bytes()
    }

    pub fn bytes(&self) -> u64 {
        self.layers * self.layer_bytes()
    }

    /// Bytes of one stored object of `chunk_tokens` tokens (all layers).
    pub fn object_bytes(&self, chunk_tokens: u64) -> u64 {
        self.layers * chunk_tokens * self.heads * self.content * ITEMSIZE
    }

    /// Each layer's tensor view, as vLLM registers it: layers one after another in one storage
    /// (`storage_offset` in elements from its start).
    pub fn tensors(&self) -> Vec<TensorMetadata> {
        let (nb, bs, nh, c) = (self.blocks, self.block_size, self.heads, self.content);
        let (shape, stride) = match self.shape {
            KvShape::Nhd => (vec![nb, bs, nh, c], vec![bs * nh * c, nh * c, c, 1]),
            KvShape::Hnd => (vec![nb, nh, bs, c], vec![nh * bs * c, bs * c, c, 1]),
        };
        (0..self.layers)
            .map(|l| TensorMetadata {
                dtype: "bfloat16".into(),
                shape: shape.clone(),
                stride: stride.clone(),
                storage_offset: l * self.layer_bytes() / ITEMSIZE,
                device_uuid: "cpu".into(),
            })
            .collect()
    }

    /// Byte offset in the segment of (layer, block, token, head).
    pub fn offset(&self, layer: u64, block: u64, token: u64, head: u64) -> u64 {
        let (bs, nh) = (self.block_size, self.heads);
        let in_block = match self.shape {
            KvShape::Nhd => token * nh + head,
            KvShape::Hnd => head * bs + token,
        };
        layer * self.layer_bytes() + block * self.block_bytes() + in_block * self.content * ITEMSIZE
    }
}

/// A KV cache in a shm segment that this process created (unlinked on drop).
pub struct BenchKv {
    pub seg: ShmSegment,
    pub geometry: KvGeometry,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl BenchKv {
    /// Create a zero-filled cache in a fresh segment named after `tag` and this process.
    pub fn create(tag: &str, geometry: KvGeometry) -> Result<BenchKv, EngineMemError> {
        let name = format!(
            "/cwm_bench_{}_{}_{}",
            std::process::id(),
            tag,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let seg = ShmSegment::create(&name, geometry.bytes())?;
        Ok(BenchKv { seg, geometry })
    }

    /// One `cpu_shm` descriptor per layer, all views on the one segment.
    pub fn descriptors(&self) -> Vec<IpcDescriptor> {
        self.geometry
            .tensors()
            .into_iter()
            .map(|metadata| IpcDescriptor::CpuShm {
                shm_name: self.seg.name().to_string(),
                nbytes: self.geometry.bytes(),
                metadata,
            })
            .collect()
    }

    pub fn groups(&self) -> Vec<EngineGroupInfo> {
        vec![EngineGroupInfo {
            engine_group_id: 0,
            layer_indices: (0..self.geometry.layers as u32).collect(),
            tokens_per_block: self.geometry.block_size as u32,
            sw_size_tokens: -1,
            extra_object_group_tag: 0,
            recurrent_state: false,
        }]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is ours, `bytes()` long, and lives as long as `self`. The bench
        // only touches it between requests, never while the server copies.
        unsafe {
            std::slice::from_raw_parts_mut(self.seg.as_mut_ptr(), self.geometry.bytes() as usize)
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: as for `bytes_mut`.
        unsafe { std::slice::from_raw_parts(self.seg.as_mut_ptr(), self.geometry.bytes() as usize) }
    }

    /// Fill every 8-byte word with a mix of its index and `seed` (faults every page in), so a
    /// copy from the wrong place cannot go unnoticed.
    pub fn fill_pattern(&mut self, seed: u64) {
        self.bytes_mut()
            .par_chunks_mut(1 << 20)
            .enumerate()
            .for_each(|(i, piece)| {
                let base = (i as u64) << 17;
                for (j, word) in piece.chunks_exact_mut(8).enumerate() {
                    word.copy_from_slice(&mix(seed ^ (base + j as u64)).to_le_bytes());
                }
            });
    }

    /// Fill with bf16 values of a roughly normal distribution (a sum of four uniforms), as
    /// real K and V are: what compresses like a real cache, unlike `fill_pattern`.
    pub fn fill_bf16_normal(&mut self, seed: u64) {
        self.bytes_mut()
            .par_chunks_mut(1 << 20)
            .enumerate()
            .for_each(|(i, piece)| {
                let base = (i as u64) << 19;
                for (j, v) in piece.chunks_exact_mut(2).enumerate() {
                    let r = mix(seed ^ (base + j as u64));
                    let sum: f32 = (0..4).map(|k| ((r >> (16 * k)) & 0xffff) as f32).sum();
                    let x = (sum / 65536.0 - 2.0) * 1.7;
                    v.copy_from_slice(&crate::sample::bf16(x).to_le_bytes());
                }
            });
    }

    /// Set every byte to `v` (faults every page in).
    pub fn fill_byte(&mut self, v: u8) {
        self.bytes_mut()
            .par_chunks_mut(1 << 20)
            .for_each(|piece| piece.fill(v));
    }

    /// The bytes of one block of one layer.
    pub fn block(&self, layer: u64, block: u64) -> &[u8] {
        let g = &self.geometry;
        let start = (layer * g.layer_bytes() + block * g.block_bytes()) as usize;
        &self.bytes()[start..start + g.block_bytes() as usize]
    }

    /// The `C * itemsize` bytes of one (layer, block, token, head).
    pub fn head(&self, layer: u64, block: u64, token: u64, head: u64) -> &[u8] {
        let g = &self.geometry;
        let start = g.offset(layer, block, token, head) as usize;
        &self.bytes()[start..start + (g.content * ITEMSIZE) as usize]
    }

    /// The first (layer, block, byte in block) where `blocks` of `self` and `other` differ.
    pub fn first_difference(&self, other: &BenchKv, blocks: &[u32]) -> Option<(u64, u32, usize)> {
        assert_eq!(self.geometry, other.geometry, "compare like with like");
        for layer in 0..self.geometry.layers {
            for &b in blocks {
                let (x, y) = (self.block(layer, b as u64), other.block(layer, b as u64));
                if let Some(i) = x.iter().zip(y).position(|(a, b)| a != b) {
                    return Some((layer, b, i));
                }
            }
        }
        None
    }

    /// The first (layer, block, token, head) of `blocks` whose content differs between `self`
    /// and `other`, compared by logical position (the layouts may differ).
    pub fn first_logical_difference(
        &self,
        other: &BenchKv,
        blocks: &[u32],
    ) -> Option<(u64, u32, u64, u64)> {
        let (g, o) = (&self.geometry, &other.geometry);
        assert_eq!(
            (g.layers, g.block_size, g.heads, g.content),
            (o.layers, o.block_size, o.heads, o.content),
            "same model geometry"
        );
        for layer in 0..g.layers {
            for &b in blocks {
                for t in 0..g.block_size {
                    for h in 0..g.heads {
                        if self.head(layer, b as u64, t, h) != other.head(layer, b as u64, t, h) {
                            return Some((layer, b, t, h));
                        }
                    }
                }
            }
        }
        None
    }
}

/// splitmix64's finaliser: a cheap, well-spread pattern.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_mem::shm::ShmKv;
    use crate::engine_mem::EngineMemory;

    fn geometry(shape: KvShape) -> KvGeometry {
        KvGeometry {
            shape,
            layers: 3,
            blocks: 5,
            block_size: 4,
            heads: 2,
            content: 8,
        }
    }

    #[test]
    fn descriptors_open_as_the_layout_they_describe() {
        for shape in [KvShape::Nhd, KvShape::Hnd] {
            let kv = BenchKv::create("unit", geometry(shape)).unwrap();
            let engine = ShmKv::open(&kv.descriptors(), Some(shape.hint())).unwrap();
            let l = engine.layout();
            assert_eq!(
                (l.num_layers, l.num_blocks, l.block_size, l.num_heads),
                (3, 5, 4, 2)
            );
            assert_eq!(l.layer_offsets[2], 2 * kv.geometry.layer_bytes());
            let g = kv.geometry;
            let expect =
                l.layer_offsets[1] + 3 * l.block_stride + 2 * l.token_stride + l.head_stride;
            assert_eq!(g.offset(1, 3, 2, 1), expect);
        }
    }

    #[test]
    fn pattern_differs_between_blocks_and_compare_finds_it() {
        let g = geometry(KvShape::Nhd);
        let (mut a, mut b) = (
            BenchKv::create("a", g).unwrap(),
            BenchKv::create("b", g).unwrap(),
        );
        a.fill_pattern(1);
        b.fill_pattern(1);
        assert_ne!(a.block(0, 1), a.block(0, 2));
        assert_eq!(a.first_difference(&b, &[1, 2, 3]), None);
        b.fill_byte(0);
        assert_eq!(
            a.first_difference(&b, &[4]).map(|d| (d.0, d.1)),
            Some((0, 4))
        );
    }
}
