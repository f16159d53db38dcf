//! Where a token's KV lives in the engine's paged cache, and how a 256-token chunk object is laid
//! out in the store.
//!
//! The engine describes each layer as a strided tensor (`TensorMetadata`) plus a layout hint.
//! `KvLayout` turns that into byte strides for four roles — plane (K/V when split), block, token
//! in block, head — plus the contiguous per-head content. Everything below works from those
//! strides, so NHD, HND and the rank-5 `[2, NB, BS, NH, HS]` layouts share one code path.
//!
//! The stored chunk object is canonical, independent of the engine layout:
//! `[planes, layers, chunk_tokens, heads * head_bytes]`, token-major (LMCache's reference object
//! layout), so a chunk stored from an NHD engine can be retrieved into an HND one.

use connector_protocol::TensorMetadata;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    #[error("no KV cache tensors registered")]
    Empty,
    #[error("unknown dtype {0:?}")]
    Dtype(String),
    #[error("layer {layer}: shape {shape:?} with stride {stride:?} is not a supported KV layout ({why})")]
    Unsupported {
        layer: usize,
        shape: Vec<u64>,
        stride: Vec<u64>,
        why: &'static str,
    },
    #[error("layer {layer} differs from layer 0 (dtype, shape and strides must match)")]
    Mismatch { layer: usize },
    #[error("kv_layout hint {0:?} is not one of NHD, HND, BLNHC, BLHNC")]
    Hint(String),
    #[error("block size {block_size} does not divide the chunk size {chunk_size}")]
    BlockSize { block_size: u64, chunk_size: u64 },
    #[error("engine group says {group} tokens per block but the tensor has {tensor}")]
    TokensPerBlock { group: u64, tensor: u64 },
}

/// Byte geometry of one engine's paged KV cache (all layers share it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    pub dtype: String,
    pub itemsize: u64,
    pub num_layers: u64,
    pub num_blocks: u64,
    pub block_size: u64,
    pub num_heads: u64,
    /// 1 (K and V fused in the content, or MLA) or 2 (separate K and V planes).
    pub planes: u64,
    /// Contiguous bytes of one head of one token (`C * itemsize`).
    pub head_bytes: u64,
    /// Byte strides.
    pub plane_stride: u64,
    pub block_stride: u64,
    pub token_stride: u64,
    pub head_stride: u64,
    /// Byte offset of each layer's tensor start within its storage.
    pub layer_offsets: Vec<u64>,
    /// Bytes each layer's view spans from its storage start (bound check against the mapping).
    pub layer_spans: Vec<u64>,
    /// The registered per-layer tensor view as the engine described it (elements; every layer
    /// shares it), and which of its axes is the block axis: LMCache's logical order, which
    /// `/cache/checksums` hashes in.
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
    pub block_axis: usize,
}

/// Dimension roles of a recognised shape: indices into shape/stride.
struct Roles {
    plane: Option<usize>,
    block: usize,
    token: usize,
    head: Option<usize>,
    content: usize,
}

fn roles(shape: &[u64], hint: Option<&str>) -> Result<Roles, &'static str> {
    let hnd = match hint {
        // BL* hints are blocks-first cross-layer buffers: per-layer views with a block stride
        // spanning every layer, which the generic strides already cover.
        None | Some("NHD") | Some("BLNHC") => false,
        Some("HND") | Some("BLHNC") => true,
        Some(_) => return Err("hint"),
    };
    Ok(match (shape.len(), hnd) {
        // [NB, BS, NH, C] / [NB, NH, BS, C]
        (4, false) => Roles {
            plane: None,
            block: 0,
            token: 1,
            head: Some(2),
            content: 3,
        },
        (4, true) => Roles {
            plane: None,
            block: 0,
            head: Some(1),
            token: 2,
            content: 3,
        },
        // MLA [NB, BS, HS]
        (3, _) => Roles {
            plane: None,
            block: 0,
            token: 1,
            head: None,
            content: 2,
        },
        // [2, NB, BS, NH, HS] / [2, NB, NH, BS, HS]
        (5, false) if shape[0] == 2 => Roles {
            plane: Some(0),
            block: 1,
            token: 2,
            head: Some(3),
            content: 4,
        },
        (5, true) if shape[0] == 2 => Roles {
            plane: Some(0),
            block: 1,
            head: Some(2),
            token: 3,
            content: 4,
        },
        // FlashInfer [NB, 2, BS, NH, HS] / [NB, 2, NH, BS, HS] (LMCache's NL_X_NB_TWO_*): K/V
        // second. A leading 2 is read as K/V first above, as LMCache's detector does.
        (5, false) if shape[1] == 2 => Roles {
            plane: Some(1),
            block: 0,
            token: 2,
            head: Some(3),
            content: 4,
        },
        (5, true) if shape[1] == 2 => Roles {
            plane: Some(1),
            block: 0,
            head: Some(2),
            token: 3,
            content: 4,
        },
        _ => {
            return Err(
                "expected [NB,BS,NH,C], [NB,NH,BS,C], [NB,BS,HS], [2,NB,BS,NH,HS] or FlashInfer's \
                 [NB,2,BS,NH,HS]",
            )
        }
    })
}

impl KvLayout {
    /// Build the layout from the per-layer tensor descriptions and the engine's hint.
    pub fn from_tensors(
        tensors: &[&TensorMetadata],
        kv_layout_hint: Option<&str>,
    ) -> Result<KvLayout, LayoutError> {
        let first = *tensors.first().ok_or(LayoutError::Empty)?;
        if let Some(h) = kv_layout_hint.filter(|h| !matches!(*h, "NHD" | "HND" | "BLNHC" | "BLHNC"))
        {
            return Err(LayoutError::Hint(h.to_string()));
        }
        let itemsize = first
            .itemsize()
            .ok_or_else(|| LayoutError::Dtype(first.dtype.clone()))? as u64;
        let unsupported = |layer: usize, m: &TensorMetadata, why| LayoutError::Unsupported {
            layer,
            shape: m.shape.clone(),
            stride: m.stride.clone(),
            why,
        };
        let r = roles(&first.shape, kv_layout_hint).map_err(|why| unsupported(0, first, why))?;
        if first.shape.len() != first.stride.len() {
            return Err(unsupported(0, first, "shape and stride ranks differ"));
        }
        if first.stride[r.content] != 1 {
            return Err(unsupported(
                0,
                first,
                "the last (content) dimension must be contiguous",
            ));
        }
        if first.shape.contains(&0) {
            return Err(unsupported(0, first, "empty dimension"));
        }
        let dim = |i: usize| first.shape[i];
        let stride_bytes = |i: usize| first.stride[i].checked_mul(itemsize);
        let overflow = || unsupported(0, first, "strides overflow");
        let mut layer_offsets = Vec::with_capacity(tensors.len());
        let mut layer_spans = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if t.dtype != first.dtype || t.shape != first.shape || t.stride != first.stride {
                return Err(LayoutError::Mismatch { layer: i });
            }
            layer_offsets.push(
                t.storage_offset
                    .checked_mul(itemsize)
                    .ok_or_else(overflow)?,
            );
            layer_spans.push(t.byte_span().ok_or_else(overflow)?);
        }
        Ok(KvLayout {
            dtype: first.dtype.clone(),
            itemsize,
            num_layers: tensors.len() as u64,
            num_blocks: dim(r.block),
            block_size: dim(r.token),
            num_heads: r.head.map_or(1, dim),
            planes: r.plane.map_or(1, dim),
            head_bytes: dim(r.content).checked_mul(itemsize).ok_or_else(overflow)?,
            plane_stride: r.plane.map_or(Some(0), stride_bytes).ok_or_else(overflow)?,
            block_stride: stride_bytes(r.block).ok_or_else(overflow)?,
            token_stride: stride_bytes(r.token).ok_or_else(overflow)?,
            head_stride: r.head.map_or(Some(0), stride_bytes).ok_or_else(overflow)?,
            layer_offsets,
            layer_spans,
            shape: first.shape.clone(),
            stride: first.stride.clone(),
            block_axis: r.block,
        })
    }

    /// Check the layout against the chunk size and the engine group's block size.
    pub fn check_chunking(
        &self,
        chunk_size: u64,
        group_tokens_per_block: u64,
    ) -> Result<(), LayoutError> {
        if group_tokens_per_block != 0 && group_tokens_per_block != self.block_size {
            return Err(LayoutError::TokensPerBlock {
                group: group_tokens_per_block,
                tensor: self.block_size,
            });
        }
        if chunk_size % self.block_size != 0 {
            return Err(LayoutError::BlockSize {
                block_size: self.block_size,
                chunk_size,
            });
        }
        Ok(())
    }

    /// Bytes of one token row of the stored object (all heads).
    pub fn row_bytes(&self) -> u64 {
        self.num_heads * self.head_bytes
    }

    /// Bytes of one stored chunk object of `chunk_tokens` tokens.
    pub fn object_bytes(&self, chunk_tokens: u64) -> u64 {
        self.planes * self.num_layers * chunk_tokens * self.row_bytes()
    }

    /// How a block's rows are laid out, to pick the widest contiguous copy.
    pub fn block_shape(&self) -> BlockShape {
        let row = self.row_bytes();
        if self.head_stride == self.head_bytes || self.num_heads == 1 {
            if self.token_stride == row {
                BlockShape::Contiguous
            } else {
                BlockShape::RowMajor
            }
        } else {
            BlockShape::Strided
        }
    }
}

/// The copy granularity a layout allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockShape {
    /// A block's tokens are one contiguous run of `block_size * row_bytes` (NHD).
    Contiguous,
    /// Each token's heads are contiguous, tokens strided.
    RowMajor,
    /// Every (token, head) is its own run (HND).
    Strided,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(shape: &[u64], stride: &[u64], offset: u64) -> TensorMetadata {
        TensorMetadata {
            dtype: "bfloat16".into(),
            shape: shape.to_vec(),
            stride: stride.to_vec(),
            storage_offset: offset,
            device_uuid: "cpu".into(),
        }
    }

    #[test]
    fn nhd_per_layer_views() {
        let (nb, bs, nh, c) = (64, 16, 2, 32);
        let l0 = md(&[nb, bs, nh, c], &[bs * nh * c, nh * c, c, 1], 0);
        let l1 = md(
            &[nb, bs, nh, c],
            &[bs * nh * c, nh * c, c, 1],
            nb * bs * nh * c,
        );
        let l = KvLayout::from_tensors(&[&l0, &l1], Some("NHD")).unwrap();
        assert_eq!(
            (
                l.num_blocks,
                l.block_size,
                l.num_heads,
                l.planes,
                l.head_bytes
            ),
            (64, 16, 2, 1, 64)
        );
        assert_eq!(
            (l.block_stride, l.token_stride, l.head_stride),
            (2048, 128, 64)
        );
        assert_eq!(l.layer_offsets, vec![0, 64 * 2048]);
        assert_eq!(l.block_shape(), BlockShape::Contiguous);
        assert_eq!(l.object_bytes(256), 2 * 256 * 128);
        l.check_chunking(256, 16).unwrap();
        assert!(l.check_chunking(256, 32).is_err());
    }

    #[test]
    fn hnd_and_rank5() {
        let h = md(&[32768, 2, 32, 128], &[8192, 4096, 128, 1], 0);
        let l = KvLayout::from_tensors(&[&h], Some("HND")).unwrap();
        assert_eq!(
            (l.block_size, l.num_heads, l.token_stride, l.head_stride),
            (32, 2, 256, 8192)
        );
        assert_eq!(l.block_shape(), BlockShape::Strided);
        let (nb, bs, nh, hs) = (8, 16, 4, 8);
        let r5 = md(
            &[2, nb, bs, nh, hs],
            &[nb * bs * nh * hs, bs * nh * hs, nh * hs, hs, 1],
            0,
        );
        let l = KvLayout::from_tensors(&[&r5], None).unwrap();
        assert_eq!(
            (l.planes, l.plane_stride, l.num_blocks, l.row_bytes()),
            (2, nb * bs * nh * hs * 2, 8, 64)
        );
        assert_eq!(l.block_shape(), BlockShape::Contiguous);
    }

    /// FlashInfer's `[NB, 2, BS, NH, HS]` (and `[NB, 2, NH, BS, HS]` with the HND hint): K and V
    /// planes inside each block.
    #[test]
    fn flashinfer_kv_second() {
        let (nb, bs, nh, hs) = (8, 16, 4, 8);
        let fi = md(
            &[nb, 2, bs, nh, hs],
            &[2 * bs * nh * hs, bs * nh * hs, nh * hs, hs, 1],
            0,
        );
        let l = KvLayout::from_tensors(&[&fi], None).unwrap();
        assert_eq!(
            (l.planes, l.num_blocks, l.block_size, l.num_heads),
            (2, nb, bs, nh)
        );
        // bf16: a plane is one block's K (or V), a block both.
        let plane = bs * nh * hs * 2;
        assert_eq!((l.plane_stride, l.block_stride), (plane, 2 * plane));
        assert_eq!((l.token_stride, l.head_stride), (nh * hs * 2, hs * 2));
        let fi_hnd = md(
            &[nb, 2, nh, bs, hs],
            &[2 * nh * bs * hs, nh * bs * hs, bs * hs, hs, 1],
            0,
        );
        let l = KvLayout::from_tensors(&[&fi_hnd], Some("HND")).unwrap();
        assert_eq!((l.block_size, l.num_heads), (bs, nh));
        assert_eq!((l.token_stride, l.head_stride), (hs * 2, bs * hs * 2));
        assert_eq!((l.plane_stride, l.block_stride), (plane, 2 * plane));
    }

    #[test]
    fn rejects_what_it_cannot_copy() {
        let good = md(&[4, 16, 2, 32], &[1024, 64, 32, 1], 0);
        assert!(matches!(
            KvLayout::from_tensors(&[], None),
            Err(LayoutError::Empty)
        ));
        assert!(matches!(
            KvLayout::from_tensors(&[&good], Some("XYZ")),
            Err(LayoutError::Hint(_))
        ));
        let non_contig = md(&[4, 16, 2, 32], &[1024, 64, 1, 2], 0);
        assert!(KvLayout::from_tensors(&[&non_contig], None).is_err());
        let other = md(&[4, 16, 2, 16], &[512, 32, 16, 1], 0);
        assert_eq!(
            KvLayout::from_tensors(&[&good, &other], None),
            Err(LayoutError::Mismatch { layer: 1 })
        );
        let mut bad_dtype = good.clone();
        bad_dtype.dtype = "not_a_dtype".into();
        assert!(matches!(
            KvLayout::from_tensors(&[&bad_dtype], None),
            Err(LayoutError::Dtype(_))
        ));
        let r6 = md(&[1, 2, 3, 4, 5, 6], &[720, 360, 120, 30, 6, 1], 0);
        assert!(KvLayout::from_tensors(&[&r6], None).is_err());
    }
}
