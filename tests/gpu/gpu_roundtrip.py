"""Real-GPU check of cwm's CUDA path (run by tests/gpu/run.sh with CWM_GPU_TESTS=1).

A Llama-3.1-8B-shaped KV cache (32 layers of vLLM 0.33's per-layer [NB, 16, 8, 256] bf16 views of
one allocation) is registered with `cwm serve` through LMCache 0.5.6's own client and descriptor
wrapper (`CudaIPCWrapper`; `cuda_raw` is refused at registration) with torch CUDA tensors. For each descriptor
kind: a 4096-token request is stored with the engine's interprocess event, looked up, retrieved
into other blocks of another allocation and compared bit for bit; then store and retrieve are timed
against a plain device<->pinned-host copy of the same bytes (torch `copy_`, i.e. cuMemcpyAsync).
Prints one table; exits non-zero if a round trip is not byte-exact.

NOT YET RUN ON A GPU: written and reviewed without one (see BENCHMARKS.md).
"""
import os
import subprocess
import sys
import time

import torch

from lmcache.v1.multiprocess.custom_types import IPCCacheServerKey
from lmcache.v1.multiprocess.group_view import EngineGroupInfo
from lmcache.v1.multiprocess.transport.factory import RequestClientFactory
from lmcache.v1.platform.devices.cuda.ipc_wrapper import CudaIPCWrapper
from lmcache.utils import EngineType

LAYERS, BS, NH, C = 32, 16, 8, 256        # C = K and V of 128 each, fused (vLLM 0.33)
TOKENS, CHUNK = 4096, 256
BLOCKS = TOKENS // BS                     # 256 blocks per request
NB = 2 * BLOCKS + 8
REPS = int(os.environ.get("CWM_GPU_REPS", "5"))
MODEL = "llama-3.1-8b-shape"


def wait(fut, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not fut.wait(0.05):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
    return fut.result()


def key(tokens, rid, worker=0):
    return IPCCacheServerKey(model_name=MODEL, world_size=1, worker_id=worker, token_ids=tuple(tokens),
                             start=0, end=len(tokens), request_id=rid, cache_salt="", num_kv_readers=1)


def engine_event():
    ev = torch.cuda.Event(interprocess=True, enable_timing=False)
    ev.record()
    return ev, ev.ipc_handle()


def finish(reply, what):
    handle, ok = reply
    assert ok, f"{what} failed"
    if handle:
        torch.cuda.Event.from_ipc_handle(torch.cuda.current_device(), handle).synchronize()


def lookup(c, tokens, rid):
    wait(c.lookup(key(tokens, rid, None), 1), "lookup")
    while True:
        r = wait(c.query_prefetch_status(rid), "query")
        if r is not None:
            return r
        time.sleep(0.005)


def main():
    port = int(os.environ.get("CWM_GPU_PORT", "5599"))
    server = subprocess.Popen([os.environ["CWM_BIN"], "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--l1-size-gb", "16", "--l2-size-gb", "0", "--http-port", "0",
                               "--no-engine-driven"])
    c = RequestClientFactory.create(f"tcp://127.0.0.1:{port}")
    try:
        wait(c.get_chunk_size(), "get_chunk_size", 60)
        rows, failed = [], False
        nbytes = LAYERS * BLOCKS * BS * NH * C * 2
        # Baseline: the same bytes, one device<->pinned copy each way.
        dev = torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16)
        host = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
        def timed(fn):
            best = float("inf")
            for _ in range(REPS):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            return best
        d2h = timed(lambda: host.copy_(dev, non_blocking=True))
        h2d = timed(lambda: dev.copy_(host, non_blocking=True))
        groups = [EngineGroupInfo(engine_group_id=0, layer_indices=tuple(range(LAYERS)), tokens_per_block=BS)]
        # cuda_raw is refused at registration (its isolated-IPC events cannot be served): cuda only.
        for n, (kind, wrap) in enumerate([("cuda", CudaIPCWrapper)]):
            src = torch.randn(LAYERS, NB, BS, NH, C, device="cuda").to(torch.bfloat16)
            dst = torch.zeros_like(src)
            for iid, kv in ((10 * n + 1, src), (10 * n + 2, dst)):
                wait(c.register_kv_cache(iid, [wrap(kv[l]) for l in range(LAYERS)], MODEL, 1, EngineType.VLLM,
                                         {"kv_layout": "NHD"}, groups), "register")
            sblocks = list(range(1, BLOCKS + 1))
            dblocks = list(range(NB - 1, NB - 1 - BLOCKS, -1))
            store_s, retrieve_s = float("inf"), float("inf")
            for rep in range(REPS):
                tokens = [(n * 1000 + rep) * 7919 + i for i in range(TOKENS)]
                _, h = engine_event()
                t = time.perf_counter()
                finish(wait(c.store(key(tokens, f"s{n}{rep}"), 10 * n + 1, [sblocks], h), "store"), "store")
                store_s = min(store_s, time.perf_counter() - t)
                assert lookup(c, tokens, f"l{n}{rep}") == TOKENS // CHUNK
                _, h = engine_event()
                t = time.perf_counter()
                finish(wait(c.retrieve(key(tokens, f"l{n}{rep}"), 10 * n + 2, [dblocks], h, 0), "retrieve"),
                       "retrieve")
                retrieve_s = min(retrieve_s, time.perf_counter() - t)
                exact = torch.equal(src[:, sblocks], dst[:, dblocks])
                failed |= not exact
            rows.append((kind, exact, nbytes / store_s / 1e9, nbytes / retrieve_s / 1e9))
            for iid in (10 * n + 1, 10 * n + 2):
                wait(c.unregister_kv_cache(iid), "unregister")
        gb = nbytes / 1e9
        print(f"\n{torch.cuda.get_device_name()}, {gb:.2f} GB per 4096-token request, best of {REPS}")
        print(f"{'path':<10} {'exact':<6} {'store GB/s':>11} {'vs D2H':>7} {'retrieve GB/s':>14} {'vs H2D':>7}")
        print(f"{'memcpy':<10} {'-':<6} {gb / d2h:>11.1f} {'':>7} {gb / h2d:>14.1f}")
        for kind, exact, s, r in rows:
            print(f"{kind:<10} {str(exact):<6} {s:>11.1f} {s / (gb / d2h):>6.0%} {r:>14.1f} {r / (gb / h2d):>6.0%}")
        return 1 if failed else 0
    finally:
        c.close()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
