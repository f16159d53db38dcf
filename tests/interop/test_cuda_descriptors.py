"""The GPU descriptors cwm's CUDA stand-in suite (`cargo test --test cuda_sim`) registers are
byte for byte what LMCache 0.5.6's client sends: built here with LMCache's own wire types
(`CudaIPCData`, `RawCudaIPCData`, `TensorMetadata`) and encoded with its own MP encoder, they
must equal `tests/cuda-sim/descriptors.json`, which the Rust suite checks its encoder against
(`descriptors_are_lmcache_bytes` in tests/cuda_sim.rs). Needs no server.

Regenerate the fixture (only if the geometry in tests/cuda_sim.rs changes):
`python tests/interop/test_cuda_descriptors.py > tests/cuda-sim/descriptors.json`.
"""
import json
import os
import sys

import interop_lib as lib  # noqa: F401  (imports LMCache under the fake torch first)
import msgspec
from lmcache.v1.multiprocess.custom_types import get_customized_decoder, get_customized_encoder

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "cuda-sim", "descriptors.json")

# The geometry of tests/cuda_sim.rs: LAYERS [NB, BS, NH, C] bf16 views of one allocation.
LAYERS, NB, BS, NH, C = 4, 40, 16, 2, 64
LAYER_BYTES = NB * BS * NH * C * 2
UUID = "3f2a9c1e-0b7d-4e5f-8a6b-1c2d3e4f5a6b"
# The stand-in's IPC memory handle: "CWMSIMMH" + shm name, zero padded to 64 bytes.
HANDLE = (b"CWMSIMMH" + b"/cwmsim_kv_fixture").ljust(64, b"\0")


def descriptors(kind):
    out = []
    for layer in range(LAYERS):
        def md(offset):
            return lib.TensorMetadata(dtype="bfloat16", shape=(NB, BS, NH, C),
                                      stride=(BS * NH * C, NH * C, C, 1), storage_offset=offset,
                                      device_uuid=UUID)
        if kind == "cuda":
            # torch >= 2.13's _share_cuda_ tuple: version 3, type 'c', then the handle.
            d = lib.CudaIPCData(version=1, metadata=md(layer * LAYER_BYTES // 2),
                                handle=(0, b"\x03c" + HANDLE, LAYERS * LAYER_BYTES, 0, None, 0, None, False))
        else:
            d = lib.RawCudaIPCData(version=1, metadata=md(0), ipc_handle=HANDLE,
                                   alloc_offset=layer * LAYER_BYTES, nbytes=LAYER_BYTES)
        out.append(lib.DeviceIPCWrapper.Deserialize(msgspec.msgpack.encode(d)))
    return out


def lmcache_frame(kind):
    """register_kv_cache's kv_cache frame, as the client's encoder writes it."""
    return get_customized_encoder(None).encode(descriptors(kind))


def test_fixture_is_what_lmcache_sends():
    with open(FIXTURE) as f:
        fixture = json.load(f)
    for kind in ("cuda", "cuda_raw"):
        assert lmcache_frame(kind).hex() == fixture[kind], kind


def test_lmcache_decodes_the_fixture():
    with open(FIXTURE) as f:
        fixture = json.load(f)
    dec = get_customized_decoder(list[lib.DeviceIPCWrapper])
    for kind in ("cuda", "cuda_raw"):
        wrappers = dec.decode(bytes.fromhex(fixture[kind]))
        assert len(wrappers) == LAYERS
        again = get_customized_encoder(None).encode(wrappers)
        assert again.hex() == fixture[kind], kind


if __name__ == "__main__":
    json.dump({k: lmcache_frame(k).hex() for k in ("cuda", "cuda_raw")}, sys.stdout, indent=1)
    print()
