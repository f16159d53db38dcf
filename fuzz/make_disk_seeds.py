"""Write seed inputs for the disk_record fuzz target (the input format is described at the top
of fuzz_targets/disk_record.rs). Records use the raw codec (0); zstd payloads come from the
target's generated mode (flags bit 3), which writes real records through DiskStore.
Run from fuzz/: python3 make_disk_seeds.py
"""
import os
import struct
import zlib

crc = lambda b: zlib.crc32(b) & 0xFFFFFFFF  # CRC-32 (IEEE), as crc32fast


def key(n, model=b"meta/Llama", salt=b""):
    return (struct.pack("<II", 0x00010001, 0) + bytes([n]) * 32
            + struct.pack("<H", len(model)) + model + struct.pack("<H", len(salt)) + salt)


def record(k, payload, codec=0, itemsize=2, raw_len=None):
    raw_len = len(payload) if raw_len is None else raw_len
    h = (b"CWMR" + struct.pack("<HBBHH", 1, codec, itemsize, len(k), 0)
         + struct.pack("<QQI", raw_len, len(payload), crc(payload)) + k)
    return h + struct.pack("<I", crc(h)) + payload


def checkpoint(scanned, entries):
    b = b"CWMI" + struct.pack("<HI", 1, len(scanned))
    b += b"".join(struct.pack("<IQ", i, n) for i, n in scanned)
    b += struct.pack("<Q", len(entries))
    for seg, off, rec_len, raw_len, k in entries:
        b += struct.pack("<IQQQH", seg, off, rec_len, raw_len, len(k)) + k
    return b + struct.pack("<I", crc(b))


def sections(*parts):
    return b"".join(struct.pack("<H", len(p)) + p for p in parts)


os.makedirs("seeds/disk_record", exist_ok=True)
seeds = {}
r0 = record(key(1), bytes(range(40)))
r1 = record(key(2, salt=b"alice"), b"\x3f\x80" * 24)
r2 = record(key(3), b"")
seg0 = r0 + r1 + r2
seeds["raw_one_segment"] = b"\x00" + sections(seg0)
seeds["raw_torn_tail"] = b"\x00" + sections(seg0 + r0[:50])
seeds["raw_bad_payload_crc"] = b"\x00" + sections(r0[:-1] + b"\xff" + r1)
# Two segments (flags bits 4-5 = 1) and a checkpoint covering the first (bit 1), CRCs repaired
# after mutation (bits 0 and 2).
ck = checkpoint([(0, len(seg0))], [(0, 0, len(r0), 40, key(1)),
                                    (0, len(r0), len(r1), 48, key(2, salt=b"alice")),
                                    (0, len(r0) + len(r1), len(r2), 0, key(3))])
seeds["raw_two_segments_checkpoint"] = bytes([0x17]) + sections(seg0, r1 + r0, ck)
# Generated mode (bit 3) with record CRC repair (bit 0): config (capacity u16, segment u16,
# compression), 4 records (key, salt, kind, len u16, payload byte(s), checkpoint?), crash, edits.
script = struct.pack("<HHB", 64, 512, 0) + bytes([3])
for n, kind, ln in [(1, 0, 600), (2, 1, 300), (3, 4, 900), (4, 3, 100)]:
    script += bytes([n, n & 1, kind]) + struct.pack("<H", ln) + bytes([7]) + bytes([n & 1])
# no crash; 2 edits: flip a bit in segment 0 at 40, truncate segment 1 at 700
edits = bytes([0, 2]) + bytes([0]) + struct.pack("<H", 40) + bytes([0x10])
edits += bytes([1]) + struct.pack("<H", 700) + bytes([0])
seeds["gen_zstd_planes"] = bytes([0x09]) + script + edits
# a crash keeping 32 unsynced bytes of each segment, no edits
seeds["gen_crash"] = bytes([0x08]) + script + bytes([0x05, 0])
for name, data in seeds.items():
    with open(f"seeds/disk_record/{name}", "wb") as out:
        out.write(data)
