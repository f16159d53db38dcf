"""Helpers of the cwm interop suite: server process control, the REAL lmcache 0.5.6 client
(under the fake torch in fake_torch/), POSIX-shm KV caches in vLLM layouts, RPC waits with
timeouts.

Importing this module sets up sys.path (fake_torch first, then $LMCACHE_SRC if given) and
imports the lmcache client modules; it must be imported before anything else imports lmcache.
"""
from __future__ import annotations

import itertools
import os
import re
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from multiprocessing import shared_memory

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# Every cwm under test picks a free HTTP port (MCP, metrics), so parallel servers never clash on
# the default 8080; a test that needs a known port passes --http-port, which wins over this.
os.environ.setdefault("CWM_HTTP_PORT", "0")

sys.path.insert(0, os.path.join(HERE, "fake_torch"))
if os.environ.get("LMCACHE_SRC"):
    sys.path.insert(1, os.path.abspath(os.environ["LMCACHE_SRC"]))

import lmshim  # noqa: E402,F401  (must precede lmcache imports)
import numpy as np  # noqa: E402

from lmcache.utils import EngineType  # noqa: E402
from lmcache.v1.multiprocess.custom_types import (  # noqa: E402
    BlockAllocationRecord,
    IPCCacheServerKey,
)
from lmcache.v1.multiprocess.group_view import EngineGroupInfo  # noqa: E402
from lmcache.v1.multiprocess.transport.factory import RequestClientFactory  # noqa: E402
from lmcache.v1.platform.base.ipc_wire import (  # noqa: E402
    CpuShmIPCData,
    CudaIPCData,
    RawCudaIPCData,
    TensorMetadata,
)
from lmcache.v1.platform.base.ipc_wrapper import DeviceIPCWrapper  # noqa: E402
from lmcache.v1.platform.devices.cpu.shm import CpuShmTensorWrapper  # noqa: E402

__all__ = [
    "BlockAllocationRecord", "CpuShmIPCData", "CudaIPCData", "DeviceIPCWrapper", "EngineGroupInfo",
    "EngineType", "IPCCacheServerKey", "RawCudaIPCData", "RequestClientFactory", "TensorMetadata",
]

TARGET = os.environ.get("CWM_INTEROP_TARGET", "cwm")            # "cwm" or "mock"
RPC_TIMEOUT = float(os.environ.get("CWM_RPC_TIMEOUT", "15"))
STARTUP_TIMEOUT = float(os.environ.get("CWM_STARTUP_TIMEOUT", "30"))
CHUNK = 256
EVENT = b"stub_ipc_handle"          # what the CPU/stub device of the real client sends
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int8": 1, "float8_e4m3fn": 1,
            "float8_e5m2": 1}


class RpcTimeout(AssertionError):
    """An RPC got no reply in time (AssertionError so pytest shows it as a plain failure)."""


# ---- server process ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, l1_size_gb: str = "1", args=(), l2_path: str | None = None) -> list[str]:
    base_args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--l1-size-gb", l1_size_gb,
                 "--chunk-size", str(CHUNK), "--eviction-policy", "LRU"]
    extra = [*args, *os.environ.get("CWM_SERVER_ARGS", "").split()]
    if TARGET == "mock":
        return [sys.executable, os.path.join(HERE, "mock_server.py"), *base_args, *extra]
    # The disk tier lives in the server's own directory (kept across its restarts), never in
    # the working directory.
    disk = ["--l2-path", l2_path, "--l2-size-gb", "2"] if l2_path else ["--l2-size-gb", "0"]
    return [cwm_bin(), *base_args, *disk, *extra]


def cwm_bin() -> str:
    b = os.environ.get("CWM_BIN")
    if b:
        return b
    for flavour in ("release", "debug"):
        cand = os.path.join(REPO, "target", flavour, "cwm")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError("no cwm binary: set CWM_BIN or build target/{release,debug}/cwm")


class ServerProcess:
    """`cwm serve` (or the mock) as a subprocess; stdout+stderr go to a log file."""

    _seq = itertools.count()

    def __init__(self, log_dir: str, port: int | None = None, l1_size_gb: str = "1", name: str = "server",
                 args=(), disk: bool = False):
        self.args = list(args)
        self.port = port or free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.l1_size_gb = l1_size_gb
        seq = next(self._seq)
        self.log_path = os.path.join(log_dir, f"{name}-{seq}-{self.port}.log")
        # L1-only unless the test is about the disk tier (L1 eviction tests need misses).
        self.l2_path = os.path.join(log_dir, f"{name}-{seq}-{self.port}-l2") if disk else None
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = STARTUP_TIMEOUT) -> "ServerProcess":
        cmd = server_command(self.port, self.l1_size_gb, self.args, self.l2_path)
        self.starts += 1
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n===== start #{self.starts}: {' '.join(cmd)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env={**os.environ, "RUST_BACKTRACE": os.environ.get("RUST_BACKTRACE", "1")})
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float):
        """Ready = the real client's get_chunk_size() is answered."""
        c = RequestClientFactory.create(self.url)
        try:
            fut = c.get_chunk_size()
            deadline = time.monotonic() + timeout
            while not fut.wait(0.1):
                if not self.alive():
                    raise AssertionError(f"server exited with code {self.proc.returncode} before answering "
                                         f"get_chunk_size\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"server did not answer get_chunk_size within {timeout}s\n{self.log_tail()}")
            got = fut.result(0)
            if got != CHUNK:
                raise AssertionError(f"get_chunk_size returned {got!r}, expected {CHUNK}")
        finally:
            c.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0):
        """Signal and wait (SIGKILL after `timeout`). A cwm stopped with an engine-driven
        worker still registered keeps its L1 pool in /dev/shm for the next cwm to adopt; the
        tests never rely on that, so it is removed here rather than left behind."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        for name in set(re.findall(r'l1_pool=(?:Some\()?"?([A-Za-z0-9_.-]+)', self.log_text())):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass

    def log_tail(self, n: int = 80) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError as e:
            return f"(no server log: {e})"
        return f"--- server log {self.log_path} (last {min(n, len(lines))} lines) ---\n" + "\n".join(lines[-n:])

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def raw_probe(url: str, timeout: float = 5.0) -> bool:
    """get_chunk_size over a plain pyzmq DEALER (independent of the lmcache client's shared loop)."""
    import zmq
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(url)
        s.send_multipart([b"\xcd\xff\xfe", b"\x15"])     # uid 65534, op 21 = get_chunk_size
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if s.poll(100):
                msg = s.recv_multipart()
                if msg[:1] == [b"\xcd\xff\xfe"]:
                    return True
        return False
    finally:
        s.close(0)


def client_loop_healthy(url: str, timeout: float = 5.0) -> bool:
    c = RequestClientFactory.create(url)
    try:
        return c.get_chunk_size().wait(timeout)
    finally:
        c.close()


def reset_client_loop():
    """Drop a wedged lmcache ClientPollingLoop singleton so later clients get a fresh loop."""
    from lmcache.v1.multiprocess.transport.zmq_impl.mq import ClientPollingLoop
    with ClientPollingLoop._instance_lock:   # noqa: SLF001
        ClientPollingLoop._instance = None   # noqa: SLF001


# ---- RPC with timeouts --------------------------------------------------------------------------

def wait(fut, what: str, timeout: float = RPC_TIMEOUT):
    """Wait on a raw MessagingFuture (never .to_device_future()); fail clearly on no reply."""
    if not fut.wait(timeout):
        raise RpcTimeout(f"{what}: no reply from the server within {timeout:g}s")
    return fut.result(0)


class Client:
    """The real lmcache RequestClient; `client.<op>(...)` submits and waits for the reply.
    `client.submit.<op>(...)` returns the raw future instead."""

    def __init__(self, url: str, timeout: float = RPC_TIMEOUT):
        self.url, self.timeout = url, timeout
        self.raw = RequestClientFactory.create(url)
        self.submit = self.raw

    def __getattr__(self, op):
        fn = getattr(self.raw, op)

        def call(*args, **kwargs):
            return wait(fn(*args, **kwargs), f"{op}{_short(args)}", self.timeout)
        return call

    def close(self):
        self.raw.close()


def _short(args) -> str:
    s = repr(tuple(a if not isinstance(a, IPCCacheServerKey) else
                   f"key(rid={a.request_id}, {a.start}:{a.end}, worker={a.worker_id})" for a in args))
    return s if len(s) < 160 else s[:160] + "...)"


def lookup_hits(c: Client, key: IPCCacheServerKey, tp: int = 1, timeout: float = RPC_TIMEOUT) -> int:
    """lookup, then poll query_prefetch_status until it is not None (like the vLLM scheduler)."""
    assert c.lookup(key, tp) is None
    deadline = time.monotonic() + timeout
    while True:
        r = c.query_prefetch_status(key.request_id)
        if r is not None:
            return r
        if time.monotonic() > deadline:
            raise RpcTimeout(f"query_prefetch_status({key.request_id!r}) still None after {timeout:g}s")
        time.sleep(0.01)


# ---- keys, ids, tokens -----------------------------------------------------------------------------

def new_iid() -> int:
    return uuid.uuid4().int & ((1 << 63) - 1)      # as vLLM's worker adapter does


def tokens_for(seed: str, n: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(0, 128_000) for _ in range(n))


def mkkey(model: str, tokens, start: int, end: int, rid: str, worker_id: int | None = 0,
          world_size: int = 1, salt: str = "", readers: int = 1) -> IPCCacheServerKey:
    return IPCCacheServerKey(model_name=model, world_size=world_size, worker_id=worker_id,
                             token_ids=tuple(tokens), start=start, end=end, request_id=rid,
                             cache_salt=salt, num_kv_readers=readers)


# ---- KV caches in POSIX shared memory -------------------------------------------------------------

_shm_seq = itertools.count()


def _new_segment(tag: str, size: int) -> shared_memory.SharedMemory:
    name = f"cwmit_{os.getpid()}_{next(_shm_seq)}_{tag}"[:60]
    try:
        shared_memory.SharedMemory(name=name).unlink()
    except FileNotFoundError:
        pass
    shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    return shm


LAYOUTS = ("NHD", "HND", "BLNHC", "BLHNC", "KV5", "MLA3")


class KVCache:
    """A vLLM-style paged KV cache in POSIX shm, described to the server by `cpu_shm` wrappers.

    layouts (C = 2*HS: K and V packed in the last axis for the fused layouts):
      NHD    per-layer [NB, BS, NH, C]; one segment [NL, NB, BS, NH, C], per-layer storage_offset
             (vLLM 0.33 default LBNHC, hint "NHD")
      HND    per-layer [NB, NH, BS, C]; one segment [NL, NB, NH, BS, C] (vLLM CPU backend, hint "HND")
      BLNHC  per-layer [NB, BS, NH, C] viewed into one blocks-first segment [NB, NL, BS, NH, C]:
             block stride NL*BS*NH*C, storage_offset l*BS*NH*C (vLLM cross-layer layout, hint "BLNHC")
      BLHNC  per-layer [NB, NH, BS, C] into [NB, NL, NH, BS, C] (hint "BLHNC")
      KV5    per-layer [2, NB, BS, NH, HS], one segment per layer (flash-attn / lmcache bench, hint "NHD")
      MLA3   per-layer [NB, BS, HS] (older vLLM MLA), one segment (hint "NHD")
    """

    def __init__(self, tag: str, layout: str = "NHD", nl: int = 4, nb: int = 64, bs: int = 16,
                 nh: int = 2, hs: int = 32, dtype: str = "bfloat16"):
        assert layout in LAYOUTS, layout
        self.layout, self.nl, self.nb, self.bs, self.nh, self.hs, self.dtype = layout, nl, nb, bs, nh, hs, dtype
        self.isz = ITEMSIZE[dtype]
        self.np_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}[self.isz]
        self.segments: list[shared_memory.SharedMemory] = []
        self.loc: list[tuple[int, int, tuple, tuple]] = []   # per layer: (segment, offset, shape, stride) in elements
        c = 2 * hs
        if layout in ("NHD", "HND"):
            shape = (nb, bs, nh, c) if layout == "NHD" else (nb, nh, bs, c)
            per_layer = nb * bs * nh * c
            self.segments.append(_new_segment(tag, nl * per_layer * self.isz))
            stride = (shape[1] * shape[2] * c, shape[2] * c, c, 1)
            self.loc = [(0, layer * per_layer, shape, stride) for layer in range(nl)]
        elif layout in ("BLNHC", "BLHNC"):
            shape = (nb, bs, nh, c) if layout == "BLNHC" else (nb, nh, bs, c)
            per_block = bs * nh * c
            self.segments.append(_new_segment(tag, nb * nl * per_block * self.isz))
            stride = (nl * per_block, shape[2] * c, c, 1)
            self.loc = [(0, layer * per_block, shape, stride) for layer in range(nl)]
        elif layout == "KV5":
            shape = (2, nb, bs, nh, hs)
            stride = (nb * bs * nh * hs, bs * nh * hs, nh * hs, hs, 1)
            for layer in range(nl):
                self.segments.append(_new_segment(f"{tag}_l{layer}", 2 * nb * bs * nh * hs * self.isz))
                self.loc.append((layer, 0, shape, stride))
        else:                                                 # MLA3
            shape, stride = (nb, bs, hs), (bs * hs, hs, 1)
            self.segments.append(_new_segment(tag, nl * nb * bs * hs * self.isz))
            self.loc = [(0, layer * nb * bs * hs, shape, stride) for layer in range(nl)]
        self.views = [self._view(self.segments[si].buf, off, shape, stride) for si, off, shape, stride in self.loc]

    def _view(self, buf, off, shape, stride) -> np.ndarray:
        return np.ndarray(shape, self.np_dtype, buffer=buf, offset=off * self.isz,
                          strides=tuple(x * self.isz for x in stride))

    @property
    def hints(self) -> dict:
        return {"kv_layout": {"HND": "HND", "BLNHC": "BLNHC", "BLHNC": "BLHNC"}.get(self.layout, "NHD")}

    def wrappers(self) -> list:
        out = []
        for si, off, shape, stride in self.loc:
            seg = self.segments[si]
            md = TensorMetadata(dtype=self.dtype, shape=shape, stride=stride, storage_offset=off, device_uuid="cpu")
            out.append(CpuShmTensorWrapper.from_wire(
                CpuShmIPCData(version=1, metadata=md, shm_name="/" + seg.name, nbytes=seg.size)))
        return out

    def engine_groups(self) -> list:
        return [EngineGroupInfo(engine_group_id=0, layer_indices=tuple(range(self.nl)), tokens_per_block=self.bs)]

    def register(self, c: Client, iid: int, model: str, world_size: int = 1):
        r = c.register_kv_cache(iid, self.wrappers(), model, world_size, EngineType.VLLM, self.hints,
                                self.engine_groups())
        assert r is None, f"register_kv_cache returned {r!r}"

    # -- contents --
    def fill_random(self, seed: int):
        rng = np.random.default_rng(seed)
        for seg in self.segments:
            arr = np.frombuffer(seg.buf, dtype=np.uint8)
            arr[:] = rng.integers(0, 256, size=arr.size, dtype=np.uint8)

    def fill_sentinel(self, byte: int = 0xA5):
        for seg in self.segments:
            np.frombuffer(seg.buf, dtype=np.uint8)[:] = byte

    def snapshot(self) -> list[bytes]:
        return [bytes(seg.buf) for seg in self.segments]

    @staticmethod
    def _logical(layout: str, v: np.ndarray, block: int) -> np.ndarray:
        if layout in ("NHD", "BLNHC"):
            return v[block][None]
        if layout in ("HND", "BLHNC"):
            return v[block].transpose(1, 0, 2)[None]
        if layout == "KV5":
            return v[:, block]
        return v[block][None, :, None, :]                        # MLA3 -> [1, BS, 1, HS]

    def logical(self, layer: int, block: int) -> np.ndarray:
        """Block `block` of `layer` as [kv, BS, NH, C-or-HS] (token-major, layout independent)."""
        return self._logical(self.layout, self.views[layer], block).copy()

    def physical(self, layer: int, block: int, views=None) -> bytes:
        v = (views or self.views)[layer]
        return (v[:, block] if self.layout == "KV5" else v[block]).tobytes()

    def close(self):
        self.views = []
        for seg in self.segments:
            try:
                seg.close()
            except BufferError:
                pass
            try:
                seg.unlink()
            except FileNotFoundError:
                pass
        self.segments.clear()


def compare_blocks(src: KVCache, src_blocks, dst: KVCache, dst_blocks) -> list[str]:
    """Logical (token, head) comparison of src blocks vs dst blocks; returns mismatch descriptions."""
    bad = []
    for layer in range(src.nl):
        for j, (sb, db) in enumerate(zip(src_blocks, dst_blocks, strict=True)):
            if not np.array_equal(src.logical(layer, sb), dst.logical(layer, db)):
                bad.append(f"layer {layer} block#{j} (src {sb} -> dst {db})")
    return bad


def unchanged_blocks(cache: KVCache, before: list[bytes], blocks) -> list[str]:
    """Blocks of `cache` whose bytes differ from the snapshot `before` (from cache.snapshot())."""
    old_views = [cache._view(before[si], off, shape, stride) for si, off, shape, stride in cache.loc]
    bad = []
    for layer in range(cache.nl):
        for b in blocks:
            if cache.physical(layer, b) != cache.physical(layer, b, old_views):
                bad.append(f"layer {layer} block {b}")
    return bad


def run_threads(fns, timeout: float):
    """Run callables in threads; re-raise the first exception."""
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        return run

    ts = [threading.Thread(target=wrap(f), daemon=True) for f in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    if any(t.is_alive() for t in ts):
        raise AssertionError(f"threads still running after {timeout}s")
    if errors:
        raise errors[0]


# ---- LMCache's heartbeat ----------------------------------------------------------------------

def real_heartbeat_thread():
    """LMCache 0.5.6's `HeartbeatThread` (and the `send_ping` it calls), the real source from the
    installed `vllm_multi_process_adapter.py`. That module imports vLLM-side code the fake torch
    cannot satisfy, so the two definitions are taken from its source and run over the real
    `PeriodicThread` they are built on."""
    import ast
    import inspect
    import logging
    import threading
    from collections.abc import Callable

    import lmcache.integration.vllm as pkg
    from lmcache.v1.periodic_thread import PeriodicThread, ThreadLevel, ThreadRunSummary

    path = os.path.join(os.path.dirname(inspect.getfile(pkg)), "vllm_multi_process_adapter.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    wanted = {"HeartbeatThread", "send_ping"}
    nodes = [n for n in tree.body if getattr(n, "name", None) in wanted]
    assert {n.name for n in nodes} == wanted, f"{path} no longer defines {wanted}"
    ns = {"PeriodicThread": PeriodicThread, "ThreadLevel": ThreadLevel,
          "ThreadRunSummary": ThreadRunSummary, "Callable": Callable, "threading": threading,
          "RequestClient": object, "DEFAULT_HEARTBEAT_INTERVAL": 10.0,
          "logger": logging.getLogger("lmcache-heartbeat"), "__name__": "lmcache_heartbeat"}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), ns)
    return ns["HeartbeatThread"]


def strip_ansi(text: str) -> str:
    """Log text without terminal colour codes."""
    import re
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
