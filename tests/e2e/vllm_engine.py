#!/usr/bin/env python3
"""One real vLLM CPU engine with LMCacheMPConnector, running a fixed list of steps.

Run as its own process (one engine per process, as vLLM's offline API wants):

    python vllm_engine.py PLAN.json RESULT.json

PLAN.json:
    {"model": DIR, "port": 5555, "host": "tcp://127.0.0.1",
     "mode": "lmcache_driven" | "default",   # default: no mp_transfer_mode key (auto)
     "max_model_len": 2048, "mq_timeout": 60,
     "prompts": {"P": [token ids], ...},
     "steps": [{"op": "generate", "name": "cold", "prompt": "P", "salt": "alice",
                "max_tokens": 8},
               {"op": "reset"}, {"op": "tamper", "shm": "cwm_l1_..."},
               {"op": "kv_poison"}, {"op": "kv_digest", "name": "kv_cold"},
               {"op": "barrier", "name": "kill9"},   # needs "barrier_dir" in the plan
               {"op": "probe_stored", "name": "resume", "prompts": [...], "salt": "s",
                "chunk": 256, "interval_s": 1, "deadline_s": 60}, ...]}

RESULT.json gets, per generate step: the output token ids, the logprob of each sampled token,
RequestOutput.num_cached_tokens, the change of vLLM's own prefix-cache counters over the step
(vllm:external_prefix_cache_hits/queries: tokens the connector supplied; vllm:prefix_cache_*:
vLLM's own block pool) and its wall time; per reset step whether reset_prefix_cache() worked;
per tamper step (the e2e suite's sensitivity check) how many bf16 values of cwm's L1 pool it
altered; per kv_poison step that it filled every block of vLLM's KV cache with a pattern; per
kv_digest step a digest of every block (all layers) holding neither zeros nor that pattern, so
the bytes an external hit wrote can be compared with the bytes vLLM computed, free of rounding;
per barrier step when the test driving the engine let it go on (it restarts the server meanwhile);
per probe_stored step when the first of a series of fresh prompts was stored (e2e_restart.py).
It also records the CPU and the ISA torch dispatches to.
The file is rewritten after every step, so a crash still leaves what was done.
"""
import json
import os
import sys
import time

COUNTERS = (
    "vllm:external_prefix_cache_hits",
    "vllm:external_prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:prefix_cache_queries",
)


def engine_env() -> None:
    """Settings that make vLLM work on a small CPU-only machine without a model hub."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")          # GiB, the minimum
    # On 2 cores vLLM would reserve one core for its scheduler without a connector but none with
    # one; pin it so every engine computes at the same speed.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # kv_poison / kv_digest send a function to the worker (collective_rpc with a callable).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def counters(llm) -> dict:
    out = {name: 0 for name in COUNTERS}
    for m in llm.get_metrics():
        if m.name in out and hasattr(m, "value"):
            out[m.name] += int(m.value)
    return out


def make_llm(plan: dict):
    from vllm import LLM

    extra = {
        "lmcache.mp.host": plan.get("host", "tcp://127.0.0.1"),
        "lmcache.mp.port": int(plan["port"]),
        # A server that never answers must fail the run in a minute, not after 300 s.
        "lmcache.mp.mq_timeout": float(plan.get("mq_timeout", 60)),
    }
    if plan.get("mode", "default") != "default":
        extra["lmcache.mp.mp_transfer_mode"] = plan["mode"]
    return LLM(
        model=plan["model"],
        skip_tokenizer_init=True,
        dtype="bfloat16",
        block_size=32,                      # the CPU attention backend rejects 16
        enforce_eager=True,
        max_model_len=int(plan.get("max_model_len", 2048)),
        max_num_batched_tokens=int(plan.get("max_num_batched_tokens",
                                            plan.get("max_model_len", 2048))),
        max_num_seqs=4,
        enable_prefix_caching=True,
        disable_log_stats=False,            # LLM.get_metrics() needs the stat loggers
        seed=0,
        kv_transfer_config={
            "kv_connector": "LMCacheMPConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        },
    )


def generate(llm, prompt_ids, salt, max_tokens):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                        detokenize=False)
    prompt = {"prompt_token_ids": list(prompt_ids)}
    if salt is not None:
        prompt["cache_salt"] = salt
    before = counters(llm)
    started_at = time.time()
    t0 = time.perf_counter()
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = counters(llm)
    comp = out.outputs[0]
    lps = []
    for tok, d in zip(comp.token_ids, comp.logprobs or []):
        lp = d.get(tok) if d is not None else None
        lps.append(None if lp is None else float(lp.logprob))
    res = {
        "prompt_len": len(prompt_ids),
        "tokens": list(comp.token_ids),
        "logprobs": lps,
        "num_cached_tokens": out.num_cached_tokens,
        "delta": {k: after[k] - before[k] for k in COUNTERS},
        "wall_s": wall,
        "started_at": started_at,
    }
    m = getattr(out, "metrics", None)
    for f in ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts", "arrival_time",
              "first_token_latency"):
        v = getattr(m, f, None) if m is not None else None
        if isinstance(v, (int, float)):
            res.setdefault("metrics", {})[f] = v
    return res


def reset(llm, timeout: float) -> dict:
    """reset_prefix_cache(), retried: right after a request that finished at its prefill
    (max_tokens=1), the connector may still hold its blocks for the store in flight, and vLLM
    refuses the reset until they are freed."""
    t0 = time.perf_counter()
    tries = 0
    while True:
        tries += 1
        ok = bool(llm.reset_prefix_cache())
        if ok or time.perf_counter() - t0 > timeout:
            return {"ok": ok, "tries": tries, "wait_s": time.perf_counter() - t0}
        time.sleep(0.02)


POISON_WORD = 0x1234          # an int16 pattern: a tiny finite bf16 (5.6e-29), never NaN


def _kv_blocks(worker):
    """vLLM's KV cache as one [num_blocks, bytes] int16 view per layer (worker side)."""
    import torch

    mr = getattr(worker, "worker", worker).model_runner
    nb = mr.kv_cache_config.num_blocks
    views = []
    for t in mr.kv_caches:
        if t is None:
            continue
        axes = [i for i, d in enumerate(t.shape) if d == nb]
        if not axes:
            raise RuntimeError(f"no block axis of size {nb} in a KV tensor of shape {tuple(t.shape)}")
        t = t.view(torch.int16) if t.element_size() == 2 else t.view(torch.uint8)
        views.append(t.movedim(axes[0], 0).reshape(nb, -1))
    return nb, views


def _kv_poison(worker):
    nb, views = _kv_blocks(worker)
    for v in views:
        v.fill_(POISON_WORD) if v.dtype.itemsize == 2 else v.fill_(0x34)
    return {"num_blocks": nb, "layers": len(views)}


def _kv_digest(worker):
    """A digest of every block (all layers, K and V) that holds neither zeros nor the poison."""
    import hashlib

    import torch

    nb, views = _kv_blocks(worker)
    blank = torch.ones(nb, dtype=torch.bool)
    for v in views:
        fill = POISON_WORD if v.dtype.itemsize == 2 else 0x34
        blank &= ((v == 0).all(dim=1) | (v == fill).all(dim=1))
    out = []
    for b in (~blank).nonzero().flatten().tolist():
        h = hashlib.blake2b(digest_size=12)
        for v in views:
            h.update(v[b].contiguous().numpy().tobytes())
        out.append(h.hexdigest())
    return {"num_blocks": nb, "layers": len(views), "blocks": out}


def kv_op(llm, fn) -> dict:
    """Run a KV-cache function on the (single) worker through vLLM's collective_rpc."""
    t0 = time.perf_counter()
    (r,) = llm.collective_rpc(fn)
    r["wall_s"] = time.perf_counter() - t0
    return r


def vllm_kernel_libraries() -> list:
    """Which of vLLM-CPU's kernel libraries (_C: AVX-512 BF16/AMX, _C_AVX512, _C_AVX2) the
    processes of this engine (this one, its engine core and workers: one session) mapped."""
    sid, found = os.getsid(0), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != sid:
                continue
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.rsplit(None, 1)[-1]
                    if "/vllm/_C" in path and path.endswith(".so"):
                        found.add(os.path.basename(path))
        except (OSError, ProcessLookupError):
            continue
    return sorted(found)


def tamper(shm_name: str) -> dict:
    """The e2e suite's sensitivity check: flip one mantissa bit (0x0040) of every bf16 value in
    the populated pages of cwm's L1 pool (/dev/shm/<shm_name>), so every chunk cwm serves from
    then on differs from what was stored. tmpfs reports its populated ranges through
    SEEK_DATA/SEEK_HOLE, so untouched pages of the pool are left uncommitted."""
    import mmap

    import numpy as np

    flipped = 0
    fd = os.open(os.path.join("/dev/shm", shm_name), os.O_RDWR | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size) as m:
            words = np.frombuffer(m, dtype=np.uint16)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:          # ENXIO: no data after pos
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                words[start // 2:end // 2] ^= 0x0040
                flipped += (end - start) // 2
                pos = end
            del words
    finally:
        os.close(fd)
    return {"values_flipped": flipped}


def barrier(plan: dict, name: str, timeout: float) -> dict:
    """Wait for the test driving this engine: write <barrier_dir>/<name>.reached, then wait for
    <name>.go (the driver kills or restarts the server in between). The go file's JSON is
    returned with the step."""
    d = plan["barrier_dir"]
    reached = time.time()
    with open(os.path.join(d, f"{name}.reached.tmp"), "w") as f:
        json.dump({"at": reached}, f)
    os.replace(os.path.join(d, f"{name}.reached.tmp"), os.path.join(d, f"{name}.reached"))
    go = os.path.join(d, f"{name}.go")
    while not os.path.exists(go):
        if time.time() - reached > timeout:
            raise TimeoutError(f"barrier {name!r}: no {go} within {timeout:.0f} s")
        time.sleep(0.05)
    with open(go) as f:
        return {"reached_at": reached, "go_at": time.time(), "driver": json.load(f)}


def probe_stored(llm, plan: dict, step: dict) -> dict:
    """Until a prompt is stored: a fresh prompt, reset_prefix_cache(), the same prompt again; it
    was stored when the second one gets every full chunk externally. Each try uses the next of
    `prompts` and starts `interval_s` after the one before; gives up after `deadline_s`.
    stored_at: when the stored try's first request started (wall clock)."""
    t0, tries = time.time(), []
    for i, name in enumerate(step["prompts"]):
        time.sleep(max(0.0, t0 + i * float(step["interval_s"]) - time.time()))
        ids = plan["prompts"][name]
        first = generate(llm, ids, step["salt"], 1)
        reset(llm, 30)
        again = generate(llm, ids, step["salt"], 1)
        reset(llm, 30)
        full = len(ids) // step["chunk"] * step["chunk"]
        tries.append({"prompt": name, "started_at": first["started_at"],
                      "external_hits": again["delta"]["vllm:external_prefix_cache_hits"]})
        if tries[-1]["external_hits"] == full:
            return {"stored_at": first["started_at"], "tries": tries}
        if time.time() - t0 > float(step["deadline_s"]):
            break
    return {"stored_at": None, "tries": tries}


def main() -> int:
    plan_path, result_path = sys.argv[1], sys.argv[2]
    with open(plan_path) as f:
        plan = json.load(f)
    engine_env()
    result = {"pid": os.getpid(), "steps": [], "done": False}
    import e2e_lib
    result["cpu"] = e2e_lib.cpu_info()
    print(f"[vllm_engine] {e2e_lib.cpu_line(result['cpu'])}", flush=True)

    def save():
        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, result_path)

    t0 = time.perf_counter()
    llm = make_llm(plan)
    result["engine_start_s"] = time.perf_counter() - t0
    import torch
    result["cpu"]["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    result["cpu"]["vllm_kernels"] = vllm_kernel_libraries()
    print(f"[vllm_engine] torch CPU capability: {result['cpu']['torch_capability']}; "
          f"vLLM kernels: {' '.join(result['cpu']['vllm_kernels']) or 'none found'}", flush=True)
    result["counters_at_start"] = counters(llm)
    save()
    for step in plan["steps"]:
        op = step["op"]
        if op == "generate":
            r = generate(llm, plan["prompts"][step["prompt"]], step.get("salt"),
                         int(step.get("max_tokens", 8)))
        elif op == "reset":
            r = reset(llm, float(step.get("timeout", 30)))
        elif op == "tamper":
            r = tamper(step["shm"])
        elif op == "kv_poison":
            r = kv_op(llm, _kv_poison)
        elif op == "kv_digest":
            r = kv_op(llm, _kv_digest)
        elif op == "barrier":
            r = barrier(plan, step["name"], float(step.get("timeout", 300)))
        elif op == "probe_stored":
            r = probe_stored(llm, plan, step)
        elif op == "sleep":
            time.sleep(float(step["seconds"]))
            r = {}
        else:
            raise ValueError(f"unknown op {op!r}")
        r.update({"op": op, "name": step.get("name", op)})
        result["steps"].append(r)
        print(f"[vllm_engine] {json.dumps({k: v for k, v in r.items() if k not in ('tokens', 'logprobs', 'blocks')})}",
              flush=True)
        save()
    result["counters_at_end"] = counters(llm)
    result["done"] = True
    result["total_s"] = time.perf_counter() - t0
    save()
    # Let vLLM shut its engine core and the connector down in order before the process exits.
    del llm
    import gc
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
