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

# Hostile counts (issue 12): headers claiming as many elements as the bytes left could hold.
# A decoder that reserves memory per claimed element asks for many times the input's size;
# run the targets with -malloc_limit_mb=2 so such a reservation is reported as a crash.
def arr32(n):
    return b"\xdd" + struct.pack(">I", n)

def map32(n):
    return b"\xdf" + struct.pack(">I", n)

def ext32(ty, data):
    return b"\xc9" + struct.pack(">Ib", len(data), ty) + data

hostile = {
    # 65,536 claimed descriptors (264 bytes each in memory: 17 MB) in a 64 KiB payload.
    "claims_one_descriptor_per_byte": arr32(65536) + b"\xc0" * 65536,
    # One descriptor whose map claims 100,000 entries (32 bytes each: 3.2 MB) in 200 KB.
    "map_claims_one_entry_per_two_bytes": b"\x91" + ext32(1, map32(100000) + b"\xc0" * 200000),
}
for name, payload in hostile.items():
    with open(f"seeds/descriptor_list/{name}", "wb") as out:
        out.write(payload)
register = next(m for m in captured if m["op"] == "register_kv_cache")
frames = list(map(bytes.fromhex, register["frames"]))
frames[3] = arr32(65000) + b"\xc0" * 65000
with open("seeds/frame_decoder/register_claims_one_descriptor_per_byte", "wb") as out:
    out.write(b"".join(struct.pack("<H", len(f)) + f for f in frames))
# A store whose block_ids claim 65,000 KV groups (24 bytes each in memory).
frames = [b"\x0a", b"\x06", key, b"\x07", arr32(65000) + b"\x90" * 65000, b"\xc4\x00"]
with open("seeds/frame_decoder/store_claims_one_group_per_byte", "wb") as out:
    out.write(b"".join(struct.pack("<H", len(f)) + f for f in frames))
