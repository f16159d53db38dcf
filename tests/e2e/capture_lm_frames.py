"""Capture golden `lm://` traffic: LMCache 0.5.6's own remote connector (`CreateConnector("lm://…")`
with a real LocalCPUBackend) talking to LMCache's own reference server (`python -m lmcache.v1.server`),
through a recording TCP proxy. Every step's client→server and server→client bytes go to a JSON file
that the Rust golden tests replay against cwm (connector-protocol/tests/lm_golden.rs and
tests/lm_server.rs): cwm must decode every request and answer with the reference server's bytes.

A developer tool, not part of CI (the fixture is committed). Run it with the e2e venv:

    tests/e2e/.venv/bin/python tests/e2e/capture_lm_frames.py \
        connector-protocol/tests/fixtures/lm_remote_frames.json
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import torch
from lmcache.utils import CacheEngineKey, LayerCacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.protocol import ClientCommand, ClientMetaMessage
from lmcache.v1.storage_backend.connector import CreateConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """Forwards one listening port to the reference server, recording both directions."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.lock = threading.Lock()
        self.up = bytearray()     # client -> server, all connections in arrival order
        self.down = bytearray()   # server -> client
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            c, _ = self.listener.accept()
            s = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(c, s, self.up), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, self.down), daemon=True).start()

    def _pump(self, src, dst, log):
        while True:
            data = src.recv(1 << 16)
            if not data:
                dst.close()
                return
            with self.lock:
                log.extend(data)
            dst.sendall(data)

    def take(self, want_up: int | None = None) -> tuple[bytes, bytes]:
        """The bytes of the step that just ran (waiting until traffic is quiet)."""
        deadline = time.monotonic() + 5
        last = None
        while time.monotonic() < deadline:
            with self.lock:
                now = (len(self.up), len(self.down))
            if now == last and (want_up is None or now[0] >= want_up):
                break
            last = now
            time.sleep(0.2)
        with self.lock:
            up, down = bytes(self.up), bytes(self.down)
            self.up.clear()
            self.down.clear()
        return up, down


def main(out_path: str):
    ref_port = free_port()
    ref = subprocess.Popen([sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(ref_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", ref_port)).close()
                break
            except OSError:
                time.sleep(0.1)
        proxy = Proxy(ref_port)
        url = f"lm://127.0.0.1:{proxy.port}"
        cfg = LMCacheEngineConfig.from_defaults(chunk_size=16, local_cpu=True, max_local_cpu_size=0.1,
                                                remote_url=url, remote_serde="naive")
        md = LMCacheMetadata(model_name="meta-llama/Llama-3.1-8B-Instruct", world_size=1,
                             local_world_size=1, worker_id=0, local_worker_id=0,
                             kv_dtype=torch.bfloat16, kv_shape=(2, 2, 16, 2, 8))
        backend = LocalCPUBackend(cfg, md)
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        conn = CreateConnector(url, loop, backend, cfg, md)

        def run(coro):
            return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

        def obj(shape, dtype, fmt):
            o = backend.allocate(torch.Size(shape), dtype, fmt)
            n = 1
            for d in shape:
                n *= d
            o.tensor.copy_(torch.arange(n, dtype=torch.float32).reshape(shape).to(dtype))
            return o

        steps = []

        def step(name, fn, want_up=None, **extra):
            result = fn()
            up, down = proxy.take(want_up)
            steps.append({"name": name, "request": up.hex(), "reply": down.hex(), **extra})
            return result

        plain = CacheEngineKey("meta-llama/Llama-3.1-8B-Instruct", 1, 0, 0x1A2B3C4D5E6F7788,
                               torch.bfloat16, {})
        tagged = CacheEngineKey("Qwen/Qwen3-8B", 2, 1, -0x5F3A9C, torch.float16,
                                {"lmcache.tag.user": "alice", "lmcache.skip_save": "x"})
        layer = LayerCacheEngineKey("m", 1, 0, 0xFF, torch.float32, {}, layer_id=7)
        hdr = ClientMetaMessage.packlength()

        assert step("exist_miss", lambda: run(conn.exists(plain)), key=plain.to_string()) is False
        assert step("get_miss", lambda: run(conn.get(plain)), key=plain.to_string()) is None
        for name, key, shape, dtype, fmt in [
            ("plain", plain, [2, 2, 16, 16], torch.bfloat16, MemoryFormat.KV_2LTD),
            ("tagged", tagged, [2, 2, 16, 16], torch.float16, MemoryFormat.KV_2LTD),
            ("layer", layer, [16, 2, 16], torch.float32, MemoryFormat.KV_T2D),
        ]:
            o = obj(shape, dtype, fmt)
            n = len(o.byte_array)
            step(f"put_{name}", lambda: run(conn.put(key, o)), want_up=hdr + n, key=key.to_string())
            assert step(f"exist_{name}", lambda: run(conn.exists(key)), key=key.to_string()) is True
            got = step(f"get_{name}", lambda: run(conn.get(key)), key=key.to_string())
            assert bytes(got.byte_array) == bytes(o.byte_array), name
            got.ref_count_down()

        # HEALTH and LIST: the stock connector never sends them; the frames come from the client's
        # own ClientMetaMessage. The reference server ignores LIST (no reply), so the HEALTH sent
        # after it is the only answer.
        raw = socket.create_connection(("127.0.0.1", proxy.port))

        def frame(cmd, key):
            return ClientMetaMessage(cmd, key, 0, MemoryFormat(1), torch.float16,
                                     torch.Size([0, 0, 0, 0])).serialize()

        def send_then_read(data):
            raw.sendall(data)
            return raw.recv(36)

        step("health", lambda: send_then_read(frame(ClientCommand.HEALTH, tagged)), key=tagged.to_string())
        step("list_then_health", lambda: send_then_read(frame(ClientCommand.LIST, plain)
                                                        + frame(ClientCommand.HEALTH, plain)),
             key=plain.to_string())
        raw.close()
        run(conn.close())
    finally:
        ref.terminate()
        ref.wait(10)
    doc = {
        "source": "LMCache 0.5.6: CreateConnector('lm://...') with a LocalCPUBackend (client) and "
                  "`python -m lmcache.v1.server` (server), recorded by tests/e2e/capture_lm_frames.py",
        "steps": steps,
    }
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(steps)} steps to {out_path}")
    os._exit(0)   # the client's loop thread and allocator are not worth an orderly teardown


if __name__ == "__main__":
    main(sys.argv[1])
