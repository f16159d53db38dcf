"""Real-GPU stress of cwm's CUDA path: the GPU versions of the stand-in's rules (issue 23 item 8).
Run by tests/gpu/run.sh with CWM_GPU_TESTS=1; sized for under 10 minutes on one H100.

1. hnd:    64k-token requests of an HND engine (every (token, head) its own run: millions of
           copies per transfer, in bounded cuMemcpyBatchAsync calls) stored and retrieved into
           other blocks in a loop, bit-exact each time, for at most CWM_GPU_HND_SECS.
2. killed: an engine process is SIGKILLed while its store waits on its event (a long kernel
           still running); cwm must fail that transfer by its deadline, stay up, and the reaper
           must close the dead engine's mappings (cwm_gpu_engine_mappings back to 0); a new
           engine then round-trips bit-exact.
3. pair:   two instances (two processes, each its own allocation and client) x thousands of
           small store/retrieve round trips at once, every one checked.

`--plan` prints the sizes and the time budget without a GPU (what CI can check);
`--only hnd,killed,pair` picks scenarios. Exits 1 with the reason on the first failure, and with
a clear message when no GPU is usable.

NOT YET RUN ON A GPU: written and reviewed without one (see BENCHMARKS.md).
"""
import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import urllib.request

MODEL = "cwm-gpu-stress"
CHUNK = 256
BS = 16


def env_int(name, default):
    v = os.environ.get(name, "")
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        sys.exit(f"{name}={v!r} is not an integer")
    if n <= 0:
        sys.exit(f"{name}={v!r} must be positive")
    return n


class Plan:
    """Sizes of every scenario (pure arithmetic: checked without a GPU)."""

    def __init__(self):
        self.hnd_tokens = env_int("CWM_GPU_HND_TOKENS", 65536)
        self.hnd_layers, self.hnd_heads, self.hnd_c = 8, 8, 256   # C: K and V of 128, fused
        self.hnd_secs = env_int("CWM_GPU_HND_SECS", 150)
        self.pair_transfers = env_int("CWM_GPU_PAIR_TRANSFERS", 2000)
        self.pair_layers, self.pair_heads, self.pair_c = 4, 8, 256
        self.wait_secs = env_int("CWM_GPU_WAIT_SECS", 5)
        self.grace_secs = 5
        if self.hnd_tokens % CHUNK:
            sys.exit(f"CWM_GPU_HND_TOKENS={self.hnd_tokens} is not a multiple of {CHUNK}")

    @property
    def hnd_blocks(self):
        return self.hnd_tokens // BS

    @property
    def hnd_nb(self):
        return 2 * self.hnd_blocks + 8

    @property
    def hnd_request_bytes(self):
        return self.hnd_tokens * self.hnd_layers * self.hnd_heads * self.hnd_c * 2

    @property
    def hnd_runs(self):
        """Copies per transfer: one per (token, head, layer) (HND engine, NHD objects)."""
        return self.hnd_tokens * self.hnd_heads * self.hnd_layers

    @property
    def l1_gb(self):
        """L1 for one 64k-token request and the pair's working set, with room to spare."""
        return int(2 * self.hnd_request_bytes / 2**30) + 4

    def gpu_bytes(self):
        hnd = 2 * self.hnd_layers * self.hnd_nb * BS * self.hnd_heads * self.hnd_c * 2
        return hnd

    def describe(self):
        gib = 2**30
        return "\n".join([
            f"hnd:    {self.hnd_tokens} tokens x {self.hnd_layers} layers x {self.hnd_heads} heads: "
            f"{self.hnd_request_bytes / gib:.2f} GiB and {self.hnd_runs:,} runs per transfer "
            f"(<= {-(-self.hnd_runs // 1024):,} batch calls of 1024); loop for {self.hnd_secs} s",
            f"killed: wait deadline {self.wait_secs} s, reaper grace {self.grace_secs} s",
            f"pair:   2 instances x {self.pair_transfers} round trips of {CHUNK} tokens",
            f"cwm:    --l1-size-gb {self.l1_gb}; GPU memory for the HND caches "
            f"{self.gpu_bytes() / gib:.1f} GiB",
            f"budget: about {self.hnd_secs + 60 + 120} s of scenarios (+ build and install)",
        ])


# ---- helpers that need torch / LMCache (imported lazily: --plan runs without them) ----

def wait(fut, what, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not fut.wait(0.05):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
    return fut.result()


def key(tokens, rid, worker=0):
    from lmcache.v1.multiprocess.custom_types import IPCCacheServerKey
    return IPCCacheServerKey(model_name=MODEL, world_size=1, worker_id=worker, token_ids=tuple(tokens),
                             start=0, end=len(tokens), request_id=rid, cache_salt="", num_kv_readers=1)


def client(port):
    from lmcache.v1.multiprocess.transport.factory import RequestClientFactory
    return RequestClientFactory.create(f"tcp://127.0.0.1:{port}")


def register(c, iid, layers, layout):
    from lmcache.utils import EngineType
    from lmcache.v1.multiprocess.group_view import EngineGroupInfo
    from lmcache.v1.platform.devices.cuda.ipc_wrapper import CudaIPCWrapper
    groups = [EngineGroupInfo(engine_group_id=0, layer_indices=tuple(range(len(layers))), tokens_per_block=BS)]
    wait(c.register_kv_cache(iid, [CudaIPCWrapper(t) for t in layers], MODEL, 1, EngineType.VLLM,
                             {"kv_layout": layout}, groups), "register")


def event_handle():
    import torch
    ev = torch.cuda.Event(interprocess=True, enable_timing=False)
    ev.record()
    return ev, ev.ipc_handle()


def finish(reply, what):
    import torch
    handle, ok = reply
    if not ok:
        raise AssertionError(f"{what} failed (see cwm's log)")
    if handle:
        torch.cuda.Event.from_ipc_handle(torch.cuda.current_device(), handle).synchronize()


def lookup(c, tokens, rid):
    wait(c.lookup(key(tokens, rid, None), 1), "lookup")
    while True:
        r = wait(c.query_prefetch_status(rid), "query")
        if r is not None:
            return r
        time.sleep(0.002)


def metric(http_port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"cwm_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"cwm_{name} not in /metrics")


def tokens_for(seed, n):
    return [(seed * 1_000_003 + i * 7919) % 120_000 for i in range(n)]


# ---- scenarios ----

def scenario_hnd(plan, port):
    import torch
    c = client(port)
    try:
        shape = (plan.hnd_layers, plan.hnd_nb, plan.hnd_heads, BS, plan.hnd_c)   # HND per layer
        src = torch.randint(-30000, 30000, shape, dtype=torch.int16, device="cuda").view(torch.bfloat16)
        dst = torch.zeros_like(src)
        register(c, 101, [src[l] for l in range(plan.hnd_layers)], "HND")
        register(c, 102, [dst[l] for l in range(plan.hnd_layers)], "HND")
        sblocks = list(range(1, plan.hnd_blocks + 1))
        dblocks = list(range(plan.hnd_nb - 1, plan.hnd_nb - 1 - plan.hnd_blocks, -1))
        started, n, best_s, best_r = time.monotonic(), 0, float("inf"), float("inf")
        while n == 0 or time.monotonic() - started < plan.hnd_secs:
            toks = tokens_for(1000 + n, plan.hnd_tokens)
            dst.zero_()
            _, h = event_handle()
            t = time.perf_counter()
            finish(wait(c.store(key(toks, f"hs{n}"), 101, [sblocks], h), "store"), f"HND store {n}")
            best_s = min(best_s, time.perf_counter() - t)
            hits = lookup(c, toks, f"hl{n}")
            assert hits == plan.hnd_tokens // CHUNK, f"HND lookup {n}: {hits} chunks"
            _, h = event_handle()
            t = time.perf_counter()
            finish(wait(c.retrieve(key(toks, f"hl{n}"), 102, [dblocks], h, 0), "retrieve"), f"HND retrieve {n}")
            best_r = min(best_r, time.perf_counter() - t)
            torch.cuda.synchronize()
            assert torch.equal(src[:, sblocks].view(torch.int16), dst[:, dblocks].view(torch.int16)), \
                f"HND round trip {n} is not bit-exact"
            n += 1
        gb = plan.hnd_request_bytes / 1e9
        for iid in (101, 102):
            wait(c.unregister_kv_cache(iid), "unregister")
        return f"hnd: {n} round trips of {gb:.2f} GB bit-exact; best store {gb / best_s:.1f} GB/s, " \
               f"retrieve {gb / best_r:.1f} GB/s"
    finally:
        c.close()


def killed_engine(port, ready, go):
    """Child: register, start a long kernel, record its event, send a store, report, wait to die."""
    import torch
    c = client(port)
    kv = torch.ones(2, 64, BS, 8, 256, dtype=torch.bfloat16, device="cuda")
    register(c, 201, [kv[l] for l in range(2)], "NHD")
    go.wait()
    torch.cuda._sleep(50_000_000_000)          # ~30 s of GPU time before the event fires
    _, h = event_handle()
    c.store(key(tokens_for(7, CHUNK), "ks"), 201, [list(range(1, 17))], h)
    ready.set()
    time.sleep(600)


def scenario_killed(plan, port, http_port):
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    engine = ctx.Process(target=killed_engine, args=(port, ready, go))
    engine.start()
    go.set()
    if not ready.wait(120):
        engine.kill()
        raise AssertionError("the engine process never sent its store")
    time.sleep(0.5)
    os.kill(engine.pid, signal.SIGKILL)
    engine.join()
    # The store's wait ends by its deadline (or fails at once); the reaper closes the mappings.
    deadline = time.monotonic() + plan.wait_secs + plan.grace_secs + 60
    while metric(http_port, "gpu_engine_mappings") != 0:
        assert time.monotonic() < deadline, "the dead engine's mappings were never closed"
        time.sleep(0.5)
    # cwm still serves GPU engines.
    import torch
    c = client(port)
    try:
        a = torch.randn(2, 64, BS, 8, 256, device="cuda").to(torch.bfloat16)
        b = torch.zeros_like(a)
        register(c, 202, [a[l] for l in range(2)], "NHD")
        register(c, 203, [b[l] for l in range(2)], "NHD")
        toks = tokens_for(8, CHUNK)
        blocks = list(range(1, 17))
        finish(wait(c.store(key(toks, "k2"), 202, [blocks], event_handle()[1]), "store"), "store after kill")
        assert lookup(c, toks, "k2l") == 1
        finish(wait(c.retrieve(key(toks, "k2l"), 203, [blocks], event_handle()[1], 0), "retrieve"), "retrieve")
        torch.cuda.synchronize()
        assert torch.equal(a[:, blocks], b[:, blocks]), "round trip after the kill is not bit-exact"
        for iid in (202, 203):
            wait(c.unregister_kv_cache(iid), "unregister")
    finally:
        c.close()
    return "killed: the dead engine's transfer ended, its mappings were closed, cwm kept serving"


def pair_worker(port, idx, transfers, out):
    import torch
    try:
        c = client(port)
        shape = (4, 80, BS, 8, 256)
        src = torch.randn(shape, device="cuda").to(torch.bfloat16)
        dst = torch.zeros_like(src)
        base = 300 + 10 * idx
        register(c, base + 1, [src[l] for l in range(4)], "NHD")
        register(c, base + 2, [dst[l] for l in range(4)], "NHD")
        for n in range(transfers):
            toks = tokens_for(10_000 * (idx + 1) + n, CHUNK)
            s = [1 + (n + j) % 40 for j in range(16)]
            d = [41 + (3 * n + j) % 39 for j in range(16)]   # 16 distinct blocks of 41..79
            finish(wait(c.store(key(toks, f"p{idx}s{n}"), base + 1, [s], event_handle()[1]), "store"), "store")
            hits = lookup(c, toks, f"p{idx}r{n}")
            assert hits == 1, f"instance {idx}: lookup {n} found {hits} chunks"
            finish(wait(c.retrieve(key(toks, f"p{idx}r{n}"), base + 2, [d], event_handle()[1], 0), "retrieve"),
                   "retrieve")
            torch.cuda.synchronize()
            if not torch.equal(src[:, s], dst[:, d]):
                raise AssertionError(f"instance {idx}: round trip {n} is not bit-exact")
        for iid in (base + 1, base + 2):
            wait(c.unregister_kv_cache(iid), "unregister")
        c.close()
        out.put((idx, None))
    except BaseException as e:  # reported to the parent, which fails the run
        out.put((idx, f"{type(e).__name__}: {e}"))


def scenario_pair(plan, port):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=pair_worker, args=(port, i, plan.pair_transfers, out)) for i in range(2)]
    t = time.monotonic()
    for p in procs:
        p.start()
    results = [out.get(timeout=480) for _ in procs]
    for p in procs:
        p.join()
    errors = [f"instance {i}: {e}" for i, e in results if e]
    assert not errors, "; ".join(errors)
    return f"pair: 2 x {plan.pair_transfers} round trips bit-exact in {time.monotonic() - t:.0f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", action="store_true", help="print the sizes and exit (no GPU needed)")
    ap.add_argument("--only", default="hnd,killed,pair", help="comma-separated scenarios")
    args = ap.parse_args(argv)
    plan = Plan()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in ("hnd", "killed", "pair")]
    if unknown:
        sys.exit(f"--only: unknown scenario(s) {unknown}: expected hnd, killed, pair")
    print(plan.describe())
    if args.plan:
        return 0
    try:
        import torch
    except ImportError:
        sys.exit("tests/gpu: torch is not installed (run through tests/gpu/run.sh)")
    if not torch.cuda.is_available():
        sys.exit("tests/gpu: no usable CUDA GPU (torch.cuda.is_available() is False): "
                 "these tests need an NVIDIA GPU and driver")
    port = int(os.environ.get("CWM_GPU_PORT", "5599"))
    http_port = port + 1
    server = subprocess.Popen(
        [os.environ["CWM_BIN"], "serve", "--host", "127.0.0.1", "--port", str(port),
         "--l1-size-gb", str(plan.l1_gb), "--l2-size-gb", "0", "--http-port", str(http_port),
         "--no-engine-driven", "--worker-registration-grace-secs", str(plan.grace_secs)],
        env={**os.environ, "CWM_CUDA_WAIT_SECS": str(plan.wait_secs)})
    try:
        c = client(port)
        wait(c.get_chunk_size(), "get_chunk_size", 60)
        c.close()
        runs = {"hnd": lambda: scenario_hnd(plan, port),
                "killed": lambda: scenario_killed(plan, port, http_port),
                "pair": lambda: scenario_pair(plan, port)}
        for name in chosen:
            t = time.monotonic()
            try:
                line = runs[name]()
            except Exception as e:
                print(f"FAILED {name} after {time.monotonic() - t:.0f} s: {type(e).__name__}: {e}")
                return 1
            if server.poll() is not None:
                print(f"FAILED {name}: cwm exited with {server.returncode}")
                return 1
            print(f"ok {line} ({time.monotonic() - t:.0f} s)")
        return 0
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
