"""Write seed inputs for the fuzz targets from the golden fixtures of connector-protocol.

frame_decoder seeds: every captured message, as the target's input format (each frame a
little-endian u16 length + bytes). descriptor_list seeds: every descriptor list payload of the
capture and of the wire-mirror vectors.  Run from fuzz/: python3 make_seeds.py
"""
import json
import os
import struct

FIX = "../connector-protocol/tests/fixtures"
captured = json.load(open(f"{FIX}/captured_frames.json"))
mirror = json.load(open(f"{FIX}/mirror_vectors.json"))

os.makedirs("seeds/frame_decoder", exist_ok=True)
os.makedirs("seeds/descriptor_list", exist_ok=True)
for i, m in enumerate(captured):
    data = b"".join(struct.pack("<H", len(f)) + f for f in map(bytes.fromhex, m["frames"]))
    with open(f"seeds/frame_decoder/{i:02d}_{m['op']}", "wb") as out:
        out.write(data)
    if m["op"] == "register_kv_cache":
        with open("seeds/descriptor_list/captured_cpu_shm", "wb") as out:
            out.write(bytes.fromhex(m["frames"][3]))
for name in ["cuda_v3", "cuda_v2_with_refcounter", "cuda_bare", "cuda_expandable", "cuda_raw",
             "cuda_vmm", "npu", "cpu_shm_empty"]:
    with open(f"seeds/descriptor_list/{name}", "wb") as out:
        out.write(bytes.fromhex(mirror[name]))
# A store request whose key is the mirror's full key (every int width, request_configs).
key = bytes.fromhex(mirror["key_full"])
frames = [b"\x0a", b"\x06", key, b"\x07", bytes.fromhex("9191cd0100"), b"\xc4\x00"]
with open("seeds/frame_decoder/store_full_key", "wb") as out:
    out.write(b"".join(struct.pack("<H", len(f)) + f for f in frames))
