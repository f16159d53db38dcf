//! The copy plan every backend runs: a chunk's block ids and the layout's strides become byte
//! runs (engine address, object offset, length). The shm backend copies each run with memcpy;
//! the CUDA backend coalesces them and queues them on a stream. Pure address arithmetic: nothing
//! here touches memory.

use super::{BlockShape, KvLayout};

/// Byte offset of the (plane, layer) section in an object of `chunk_tokens` tokens.
pub fn section_offset(l: &KvLayout, plane: u64, layer: u64, chunk_tokens: u64) -> usize {
    ((plane * l.num_layers + layer) * chunk_tokens * l.row_bytes()) as usize
}

/// The (plane, layer, byte offset) of every section of an object of `chunk_tokens` tokens.
pub fn sections(l: &KvLayout, chunk_tokens: u64) -> impl Iterator<Item = (u64, u64, usize)> + '_ {
    (0..l.planes).flat_map(move |p| {
        (0..l.num_layers).map(move |layer| (p, layer, section_offset(l, p, layer, chunk_tokens)))
    })
}

/// Visit every contiguous run of the (plane, layer) rows of the blocks `wanted(index, id)`
/// selects: `f(engine_address, object_offset, len)`, where `layer_base` is the address of the
/// layer's storage (add `l.layer_offsets[layer]`) and object offsets are within the section.
/// Callers bound-check `blocks` first; the addresses are then inside the registered memory.
pub fn for_each_run(
    l: &KvLayout,
    layer_base: usize,
    plane: u64,
    layer: u64,
    blocks: &[u32],
    wanted: impl Fn(usize, u32) -> bool,
    mut f: impl FnMut(usize, usize, usize),
) {
    let base = layer_base + (l.layer_offsets[layer as usize] + plane * l.plane_stride) as usize;
    let row = l.row_bytes() as usize;
    let bs = l.block_size as usize;
    for (j, &b) in blocks.iter().enumerate() {
        if !wanted(j, b) {
            continue;
        }
        let block = base + (b as u64 * l.block_stride) as usize;
        let object = j * bs * row;
        match l.block_shape() {
            BlockShape::Contiguous => f(block, object, bs * row),
            BlockShape::RowMajor => {
                for t in 0..bs {
                    f(block + t * l.token_stride as usize, object + t * row, row)
                }
            }
            BlockShape::Strided => {
                // Token-major, as the object is: its side then moves sequentially and only the
                // engine side jumps (~10-20% faster than head-major on HND; BENCHMARKS.md).
                let hb = l.head_bytes as usize;
                for t in 0..bs {
                    let token = block + t * l.token_stride as usize;
                    for h in 0..l.num_heads as usize {
                        f(
                            token + h * l.head_stride as usize,
                            object + t * row + h * hb,
                            hb,
                        )
                    }
                }
            }
        }
    }
}
