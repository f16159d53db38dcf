"""Reference-style mock of `cwm serve`, used to validate the interop suite itself.

Run: python mock_server.py serve --host 127.0.0.1 --port 5555 --l1-size-gb 1 --chunk-size 256
     [--eviction-policy LRU]          (same flags as cwm; unknown flags are ignored)

A single-threaded pyzmq ROUTER implementing the LMCache 0.5.6 MP protocol subset the suite
exercises (see /work/shared/protocol/lmcache-mp.md), written from the spec, without lmcache code:

* cpu_shm KV descriptors (any strides) with the layouts [NB,BS,NH,C] (NHD), [NB,NH,BS,C] (HND),
  [2,NB,BS,NH,HS] and [NB,BS,HS]; objects are kept in a canonical token-major layout
  [kv_size, NL, chunk, hidden], so an NHD store can be retrieved into an HND cache;
* `cuda`/`cuda_raw`/other descriptors are accepted ("CUDA unavailable") and every later
  store/retrieve for that instance fails with (b"", False);
* blake3 chunk hashing, ObjectKey = (hash, model, kv_rank, group 0, salt), all-ranks prefix lookup,
  exactly-once query_prefetch_status, read locks taken by lookup and released by retrieve /
  free_lookup_locks or after --lock-ttl-secs, LRU eviction of unlocked objects above --l1-size-gb;
* worker reaping: an instance silent (no ping/store/retrieve/re-register) for
  --worker-reap-timeout-secs after its first ping, or --worker-registration-grace-secs if it
  never pinged, is unregistered;
* retrieve never writes skipped blocks nor block id 0; chunks whose block ids are all 0 are not
  stored; out-of-range block ids fail the whole call before anything is copied;
* every request that must be answered is answered: malformed store/retrieve -> (b"", False).
"""
import argparse
import faulthandler
import mmap
import os
import signal
import struct
import time
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import blake3
import msgspec
import numpy as np
import zmq

# ---- wire types (torch-free mirror of the lmcache 0.5.6 types; see lmcache-mp.md §2) -----------


@dataclass(frozen=True)
class IPCCacheServerKey:
    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: tuple[int, ...]
    start: int
    end: int
    request_id: str = field(compare=False)
    cache_salt: str = ""
    request_configs: dict[str, Any] | None = field(default=None, compare=False)
    num_kv_readers: int = field(default=0, compare=False)


class TensorMetadata(msgspec.Struct):
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    device_uuid: str


class IPCData(msgspec.Struct, kw_only=True):
    version: Literal[1]
    metadata: TensorMetadata


class CudaIPCData(IPCData, tag="cuda"):
    handle: tuple[Any, ...]


class RawCudaIPCData(IPCData, tag="cuda_raw"):
    ipc_handle: bytes
    alloc_offset: int
    nbytes: int


class CpuShmIPCData(IPCData, tag="cpu_shm"):
    shm_name: str
    nbytes: int


WireIPCData = CudaIPCData | RawCudaIPCData | CpuShmIPCData

OPS = {  # legacy operation ids (wire.py) -> name
    1: "register_kv_cache", 2: "unregister_kv_cache", 6: "store", 7: "retrieve", 8: "lookup",
    9: "query_prefetch_status", 10: "wait_prefetch_status", 12: "free_lookup_locks",
    13: "end_session", 20: "clear", 21: "get_chunk_size", 22: "ping",
    23: "report_block_allocation", 24: "noop", 32: "get_experimental",
}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "uint8": 1, "int8": 1,
            "float8_e4m3fn": 1, "float8_e5m2": 1}
NPTYPE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
enc = msgspec.msgpack.encode
dec_key = msgspec.msgpack.Decoder(IPCCacheServerKey)
dec_blocks = msgspec.msgpack.Decoder(list[list[int]])
dec_int = msgspec.msgpack.Decoder(int)
dec_opt_int = msgspec.msgpack.Decoder(int | None)
dec_str = msgspec.msgpack.Decoder(str)
dec_bool = msgspec.msgpack.Decoder(bool)
dec_bytes = msgspec.msgpack.Decoder(bytes)


def log(*a):
    print("mock_server:", *a, file=sys.stderr, flush=True)


# ---- hashing (lmcache-mp.md §4.2) -------------------------------------------------------------

def _h(prefix: bytes, tokens) -> bytes:
    h = blake3.blake3()
    h.update(prefix)
    h.update(struct.pack(f">{len(tokens)}I", *tokens))
    return h.digest()


NONE_HASH = blake3.blake3((0).to_bytes(8, "big", signed=True) + struct.pack(">I", 0)).digest()


def chunk_hashes(tokens, start, end, cs):
    eff = min(len(tokens), end)
    n = eff - eff % cs
    prefix, out = NONE_HASH, []
    for i in range(0, n, cs):
        prefix = _h(prefix, tokens[i:i + cs])
        if i >= start:
            out.append(prefix)
    return out


def kv_rank(ws, rank):
    return (ws << 24) | (rank << 16) | (ws << 8) | rank


# ---- registered KV caches -----------------------------------------------------------------------

class Layer:
    """One layer view; gathers/scatters blocks as canonical [kv, n*BS, hidden] arrays."""

    def __init__(self, mm, md: TensorMetadata, hints: dict):
        isz = ITEMSIZE[md.dtype]
        self.arr = np.ndarray(tuple(md.shape), dtype=NPTYPE[isz], buffer=mm,
                              offset=md.storage_offset * isz,
                              strides=tuple(s * isz for s in md.stride))
        hnd = hints.get("kv_layout") in ("HND", "BLHNC")
        shape = md.shape
        if len(shape) == 4:                    # [NB,BS,NH,C] or [NB,NH,BS,C]
            self.kind = "HND" if hnd else "NHD"
            self.nb = shape[0]
            self.bs = shape[2] if hnd else shape[1]
            self.kv = 1
            self.hidden = shape[1] * shape[3] if hnd else shape[2] * shape[3]
        elif len(shape) == 5 and shape[0] == 2:  # [2,NB,BS,NH,HS] or [2,NB,NH,BS,HS]
            self.kind = "KV5_HND" if hnd else "KV5"
            self.nb = shape[1]
            self.bs = shape[3] if hnd else shape[2]
            self.kv = 2
            self.hidden = shape[2] * shape[4] if hnd else shape[3] * shape[4]
        elif len(shape) == 3:                  # MLA [NB,BS,HS]
            self.kind, self.nb, self.bs, self.kv, self.hidden = "MLA", shape[0], shape[1], 1, shape[2]
        else:
            raise ValueError(f"unsupported KV layout {shape}")

    def _planes(self):
        return [self.arr] if self.kv == 1 else [self.arr[0], self.arr[1]]

    def gather(self, ids) -> np.ndarray:
        out = []
        for p in self._planes():
            x = p[ids]                                     # [n, ...] copy
            if self.kind in ("HND", "KV5_HND"):
                x = x.transpose(0, 2, 1, 3)
            out.append(x.reshape(len(ids) * self.bs, self.hidden))
        return np.stack(out)

    def scatter(self, ids, data: np.ndarray):
        """data: [kv, len(ids)*BS, hidden]."""
        for p, plane in enumerate(self._planes()):
            x = data[p].reshape((len(ids),) + plane.shape[1:] if self.kind in ("NHD", "KV5", "MLA")
                                else (len(ids), self.bs, plane.shape[1], plane.shape[3]))
            if self.kind in ("HND", "KV5_HND"):
                x = x.transpose(0, 2, 1, 3)
            plane[ids] = x


class Instance:
    def __init__(self, model, ws, layers, usable, why=""):
        self.model, self.ws, self.layers, self.usable, self.why = model, ws, layers, usable, why
        self.last_seen, self.pinged = time.monotonic(), False
        if layers:
            self.bs, self.nb, self.kv = layers[0].bs, layers[0].nb, layers[0].kv


class Mock:
    def __init__(self, cs, capacity, lock_ttl=300.0, reap=120.0, grace=3600.0):
        self.cs, self.capacity = cs, capacity
        self.lock_ttl, self.reap_after, self.grace = lock_ttl, reap, grace
        self.instances: dict[int, Instance] = {}
        self.prompted: set[int] = set()
        self.registered: dict[tuple, int] = {}
        self.objects: OrderedDict[tuple, np.ndarray] = OrderedDict()   # LRU order
        self.used = 0
        self.pins: dict[tuple, list[float]] = {}   # object -> deadlines of its read locks
        self.jobs: dict[str, int] = {}
        self.sessions: dict[str, tuple] = {}   # rid -> (key, hit)

    # -- helpers --
    def okey(self, h, key, rank):
        return (h, key.model_name, kv_rank(key.world_size, rank), 0, key.cache_salt)

    def pinned(self, ok) -> bool:
        locks = self.pins.get(ok)
        if locks is None:
            return False
        now = time.monotonic()
        locks[:] = [d for d in locks if d > now]
        if not locks:
            del self.pins[ok]
        return bool(locks)

    def pin(self, ok, n):
        self.pins.setdefault(ok, []).extend([time.monotonic() + self.lock_ttl] * n)

    def unpin(self, ok, n=1):
        locks = self.pins.get(ok)
        if locks:
            locks.sort()
            del locks[:n]
            if not locks:
                del self.pins[ok]

    def reap(self):
        now = time.monotonic()
        for iid, inst in list(self.instances.items()):
            if now - inst.last_seen > (self.reap_after if inst.pinged else self.grace):
                log(f"reaping silent instance {iid}")
                self.unregister_kv_cache(enc(iid))

    def insert(self, ok, arr):
        while self.used + arr.nbytes > self.capacity:
            victim = next((k for k in self.objects if not self.pinned(k)), None)
            if victim is None:
                log("L1 full, object not stored")
                return
            self.used -= self.objects.pop(victim).nbytes
        self.objects[ok] = arr
        self.used += arr.nbytes

    # -- ops (payload frames in, encoded result or None out) --
    def get_chunk_size(self):
        return enc(self.cs)

    def get_experimental(self):
        return enc([])

    def noop(self):
        return enc("OK")

    def ping(self, iid):
        iid = dec_opt_int.decode(iid)
        inst = self.instances.get(iid)
        if inst is not None:
            inst.last_seen, inst.pinged = time.monotonic(), True
        elif iid is not None and iid not in self.prompted:
            # cwm's answer to an unknown instance: False once, so its connector re-registers.
            self.prompted.add(iid)
            return enc(False)
        return enc(True)

    def register_kv_cache(self, iid, kv, model, ws, engine_type, hints, egi):
        iid = dec_int.decode(iid)
        if iid in self.instances:
            self.instances[iid].last_seen = time.monotonic()
            return None
        model, ws = dec_str.decode(model), dec_int.decode(ws)
        hints = msgspec.msgpack.decode(hints)
        groups = msgspec.msgpack.decode(egi)

        def ext_hook(code, data):
            if code != 1:
                raise ValueError(f"ext type {code}")
            return msgspec.msgpack.decode(data, type=WireIPCData)

        descs = msgspec.msgpack.Decoder(ext_hook=ext_hook).decode(kv)
        if any(not isinstance(d, CpuShmIPCData) for d in descs):
            log(f"register_kv_cache({iid}): CUDA unavailable; instance registered but unusable")
            self.instances[iid] = Instance(model, ws, [], False, "CUDA unavailable")
            return None
        if len(groups) != 1:
            self.instances[iid] = Instance(model, ws, [], False, "hybrid models unsupported")
            return None
        maps, layers = {}, []
        for d in descs:
            if d.shm_name not in maps:
                fd = os.open("/dev/shm/" + d.shm_name.lstrip("/"), os.O_RDWR)
                try:
                    maps[d.shm_name] = mmap.mmap(fd, d.nbytes, mmap.MAP_SHARED)
                finally:
                    os.close(fd)
            layers.append(Layer(maps[d.shm_name], d.metadata, hints))
        self.instances[iid] = Instance(model, ws, layers, True)
        self.registered[(model, ws)] = self.registered.get((model, ws), 0) + 1
        return None

    def unregister_kv_cache(self, iid):
        inst = self.instances.pop(dec_int.decode(iid), None)
        if inst is not None and inst.usable:
            self.registered[(inst.model, inst.ws)] -= 1
        return None

    def lookup(self, key, tp):
        key = dec_key.decode(key)
        dec_int.decode(tp)
        hit = 0
        if self.registered.get((key.model_name, key.world_size)):
            for h in chunk_hashes(key.token_ids, 0, key.end, self.cs):
                oks = [self.okey(h, key, r) for r in range(key.world_size)]
                if not all(ok in self.objects for ok in oks):
                    break
                for ok in oks:
                    self.pin(ok, max(1, key.num_kv_readers))
                hit += 1
        self.jobs[key.request_id] = hit
        self.sessions[key.request_id] = (key, hit)
        return None

    def query_prefetch_status(self, rid):
        return enc(self.jobs.pop(dec_str.decode(rid), 0))

    def wait_prefetch_status(self, rid, timeout):
        return self.query_prefetch_status(rid)

    def free_lookup_locks(self, key, tp):
        key = dec_key.decode(key)
        sess = self.sessions.get(key.request_id)
        if sess is None or key.start >= key.end:
            return None
        lkey, hit = sess
        hashes = chunk_hashes(key.token_ids, 0, key.end, self.cs)
        for i in range(key.start // self.cs, min(hit, len(hashes))):
            for r in range(key.world_size):
                self.unpin(self.okey(hashes[i], key, r), max(1, lkey.num_kv_readers))
        self.sessions[key.request_id] = (lkey, 0)
        return None

    def end_session(self, rid):
        sess = self.sessions.pop(dec_str.decode(rid), None)
        if sess is not None:
            key = sess[0]
            for h in chunk_hashes(key.token_ids, 0, key.end, self.cs):
                for r in range(key.world_size):
                    ok = self.okey(h, key, r)
                    if ok in self.objects:
                        self.objects.move_to_end(ok)
        return None

    def clear(self, force):
        force = dec_bool.decode(force)
        for ok in list(self.objects):
            if force or not self.pinned(ok):
                self.used -= self.objects.pop(ok).nbytes
        return None

    def report_block_allocation(self, iid, model, records):
        msgspec.msgpack.decode(records)
        return None

    def _transfer(self, key, iid, block_ids, skip, is_store) -> bool:
        key = dec_key.decode(key)
        iid = dec_int.decode(iid)
        groups = dec_blocks.decode(block_ids)
        inst = self.instances.get(iid)
        if inst is None:
            return False
        inst.last_seen = time.monotonic()
        if not inst.usable:
            log(f"{'store' if is_store else 'retrieve'}({iid}): {inst.why}")
            return False
        if key.worker_id is None or not 0 <= key.worker_id < key.world_size:
            return False
        if key.start % self.cs or key.end % self.cs or key.end > len(key.token_ids) or key.start > key.end:
            return False
        if len(groups) != 1:
            return False
        blocks = groups[0]
        bpc = self.cs // inst.bs
        hashes = chunk_hashes(key.token_ids, key.start, key.end, self.cs)
        if len(blocks) < len(hashes) * bpc:
            return False
        blocks = blocks[:len(hashes) * bpc]
        if any(not 0 <= b < inst.nb for b in blocks):
            log(f"block id out of range [0, {inst.nb})")
            return False
        oks = [self.okey(h, key, key.worker_id) for h in hashes]
        if is_store:
            for k, ok in enumerate(oks):
                ids = blocks[k * bpc:(k + 1) * bpc]
                if ok in self.objects:
                    self.objects.move_to_end(ok)
                    continue
                if all(b == 0 for b in ids):
                    continue
                obj = np.stack([layer.gather(ids) for layer in inst.layers], axis=1)  # [kv,NL,cs,hid]
                self.insert(ok, obj)
            return True
        # retrieve
        try:
            if not all(ok in self.objects for ok in oks):
                return False
            skip_blocks = skip // inst.bs
            for k, ok in enumerate(oks):
                obj = self.objects[ok]
                self.objects.move_to_end(ok)
                if obj.shape[:2] != (inst.kv, len(inst.layers)) or obj.shape[3] != inst.layers[0].hidden:
                    log("stored object does not match the destination's geometry")
                    return False
                pos = [j for j in range(bpc) if k * bpc + j >= skip_blocks and blocks[k * bpc + j] != 0]
                if not pos:
                    continue
                ids = [blocks[k * bpc + j] for j in pos]
                rows = np.concatenate([np.arange(j * inst.bs, (j + 1) * inst.bs) for j in pos])
                for li, layer in enumerate(inst.layers):
                    layer.scatter(ids, obj[:, li, rows])
            return True
        finally:
            for ok in oks:
                self.unpin(ok)

    def store(self, *frames):
        if len(frames) != 4:
            raise ValueError(f"store: {len(frames)} payload frames, expected 4")
        dec_bytes.decode(frames[3])
        return self._transfer(*frames[:3], 0, True)

    def retrieve(self, *frames):
        if len(frames) != 5:
            raise ValueError(f"retrieve: {len(frames)} payload frames, expected 5")
        dec_bytes.decode(frames[3])
        return self._transfer(*frames[:3], dec_int.decode(frames[4]), False)


NO_PAYLOAD_ON_ERROR = {"register_kv_cache", "unregister_kv_cache", "lookup", "free_lookup_locks",
                       "end_session", "clear", "report_block_allocation"}


def serve(args):
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mock = Mock(args.chunk_size, int(args.l1_size_gb * (1 << 30)), args.lock_ttl_secs,
                args.worker_reap_timeout_secs, args.worker_registration_grace_secs)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(f"tcp://{args.host}:{args.port}")
    log(f"listening on tcp://{args.host}:{args.port} chunk_size={args.chunk_size}")
    while True:
        mock.reap()
        if not sock.poll(200):
            continue
        frames = sock.recv_multipart()
        if len(frames) < 3:
            log(f"dropping message with {len(frames)} frames")
            continue
        ident, uid, opb, *payloads = frames
        if opb == b"":
            continue                                  # stream control; no streams here
        try:
            op = msgspec.msgpack.decode(opb)
        except msgspec.DecodeError:
            log("undecodable op frame", opb[:16])
            continue
        op = OPS.get(op) if isinstance(op, int) and not isinstance(op, bool) else op
        if not isinstance(op, str) or op not in OPS.values():
            log("unsupported op", repr(op)[:40])
            continue
        try:
            if op in ("store", "retrieve"):
                result = enc((b"", getattr(mock, op)(*payloads)))
            else:
                result = getattr(mock, op)(*payloads)
        except Exception as e:  # noqa: BLE001 -- never crash, never leave store/retrieve unanswered
            log(f"{op} failed: {type(e).__name__}: {e}")
            if op in ("store", "retrieve"):
                result = enc((b"", False))
            elif op in NO_PAYLOAD_ON_ERROR:
                result = None
            else:
                continue
        try:
            sock.send_multipart([ident, uid, opb] + ([result] if result is not None else []))
        except zmq.ZMQError as e:
            log("send failed:", e)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["serve"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5555)
    ap.add_argument("--l1-size-gb", type=float, default=1.0)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--eviction-policy", default="LRU")
    ap.add_argument("--lock-ttl-secs", type=float, default=300.0)
    ap.add_argument("--worker-reap-timeout-secs", type=float, default=120.0)
    ap.add_argument("--worker-registration-grace-secs", type=float, default=3600.0)
    args, unknown = ap.parse_known_args()
    if unknown:
        log("ignoring flags", unknown)
    serve(args)


if __name__ == "__main__":
    main()
