#!/usr/bin/env python3
"""Time to first token through a real vLLM CPU engine, cold vs warm, with cwm and with LMCache's
own server under the same engine and settings, in one run. Not part of CI.

    tests/e2e/.venv/bin/python tests/e2e/bench_ttft.py [--prompts 5] [--len 4097]
                                                       [--configs cwm:lmcache_driven,...]

The model is make_model.py's "bench" preset (bf16 Llama, hidden 512, 4 layers, 4 heads / 4 KV
heads of 128, intermediate 1024, vocab 8192; seeded weights): on these AVX2-only CPUs it prefills
4097 tokens in seconds, so prefill dominates and a warm request measures the load path. Its KV is
8 KiB per token, 32 MiB per 4096-token prompt.

Each configuration is a fresh server and one fresh engine process:
  warm-up request (uncounted), then for each prompt i (random token ids, its own salt):
    cold_i   nothing cached anywhere: full prefill, the connector stores 16 chunks
    reset_prefix_cache()
    warm_i   vLLM's own pool empty: 4096 tokens come from the server ("external" hits)
    local_i  the same again without a reset: vLLM's own prefix cache (the floor)
    reset_prefix_cache()
TTFT is vLLM's own first_token_latency of the request (arrival to first token, the number behind
vllm:time_to_first_token_seconds); generate() wall time is reported next to it.

Configurations (server:mode):
  cwm:lmcache_driven       cwm serve; the connector forced to lmcache_driven (store/retrieve)
  cwm:default              cwm serve; the connector's default (engine_driven on CPU)
  lmcache:lmcache_driven   LMCache 0.5.6's own server, plain flags
  lmcache:default          LMCache's server with --supported-transfer-mode auto --shm-name NAME
Environment as in the tests: VLLM_CPU_KVCACHE_SPACE=1, VLLM_CPU_NUM_OF_RESERVED_CPU=1,
block_size 32, enforce_eager, max_num_batched_tokens >= the prompt (one prefill step).
"""
import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

import e2e_lib as E
import make_model

ALL = ["cwm:lmcache_driven", "lmcache:lmcache_driven", "cwm:default", "lmcache:default"]


def prompts(n: int, length: int):
    r = random.Random(4242)
    vocab = make_model.PRESETS["bench"]["vocab_size"]
    ps = {f"p{i}": [r.randrange(3, vocab) for _ in range(length)] for i in range(n)}
    ps["warmup"] = [r.randrange(3, vocab) for _ in range(length)]
    return ps


def steps(n: int):
    out = [{"op": "generate", "name": "warmup", "prompt": "warmup", "salt": "warmup",
            "max_tokens": 1}, {"op": "reset"}]
    for i in range(n):
        g = {"op": "generate", "prompt": f"p{i}", "salt": f"s{i}", "max_tokens": 1}
        out += [dict(g, name=f"cold{i}"), {"op": "reset"},
                dict(g, name=f"warm{i}"), dict(g, name=f"local{i}"), {"op": "reset"}]
    return out


def server_for(kind: str, mode: str, out: str, l1_gb: float):
    log = os.path.join(out, f"{kind}-{mode}.server.log")
    if kind == "cwm":
        l2 = os.path.join(out, f"l2-{mode}") if E.cwm_has_flag("--l2-path") else None
        extra = ["--l2-size-gb", "0"] if l2 else []    # memory only: compare like with like
        return E.cwm_server(log, l1_gb=l1_gb, l2_path=l2, extra=extra)
    extra = [] if mode == "lmcache_driven" else [
        "--supported-transfer-mode", "auto", "--shm-name", f"cwm_bench_{os.getpid()}"]
    return E.lmcache_server(log, l1_gb=l1_gb, extra=extra)


def ms(xs):
    xs = [x * 1000 for x in xs]
    return f"{statistics.median(xs):.0f} ({min(xs):.0f}–{max(xs):.0f})" if xs else "–"


def summarize(cfg: str, res: dict, n: int) -> dict:
    by = {s["name"]: s for s in res.get("steps", []) if s.get("op") == "generate"}
    row = {"config": cfg, "engine_start_s": res.get("engine_start_s")}
    for kind in ("cold", "warm", "local"):
        ss = [by[f"{kind}{i}"] for i in range(n) if f"{kind}{i}" in by]
        row[kind] = {
            "ttft": [s.get("metrics", {}).get("first_token_latency", s["wall_s"]) for s in ss],
            "wall": [s["wall_s"] for s in ss],
            "ext_hits": [s["delta"]["vllm:external_prefix_cache_hits"] for s in ss],
            "own_hits": [s["delta"]["vllm:prefix_cache_hits"] for s in ss],
            "load": [s["metrics"]["scheduled_ts"] - s["metrics"]["queued_ts"]
                     for s in ss if "scheduled_ts" in s.get("metrics", {})],
            "compute": [s["metrics"]["first_token_ts"] - s["metrics"]["scheduled_ts"]
                        for s in ss if "first_token_ts" in s.get("metrics", {})],
        }
    return row


def machine() -> str:
    cpu = "?"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
        isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    except OSError:
        isa = "?"
    mem = "?"
    try:
        for ln in open("/proc/meminfo"):
            if ln.startswith("MemTotal"):
                mem = f"{int(ln.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return f"nproc {os.cpu_count()}, {cpu} ({isa}), {mem} RAM, {platform.platform()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--len", type=int, default=4097, dest="length",
                    help="prompt tokens (4097: 16 full chunks and the one token vLLM must compute)")
    ap.add_argument("--configs", default=",".join(ALL))
    ap.add_argument("--l1-size-gb", type=float, default=4.0)
    ap.add_argument("--out", default=os.path.join(E.WORK, "bench"))
    ap.add_argument("--report", metavar="RESULTS_JSON",
                    help="only print the table of an earlier run's results.json")
    a = ap.parse_args()
    if a.report:
        with open(a.report) as f:
            print(render(json.load(f)))
        return 0

    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    model = make_model.write_model(os.path.join(E.WORK, "models", "bench"), "bench")
    ps = prompts(a.prompts, a.length)
    max_len = a.length + 64
    rows = []
    t_all = time.time()
    for cfg in a.configs.split(","):
        kind, mode = cfg.split(":")
        print(f"== {cfg}", flush=True)
        srv = server_for(kind, mode, a.out, a.l1_size_gb)
        plan = {"model": model, "mode": mode, "mq_timeout": 120, "max_model_len": max_len,
                "max_num_batched_tokens": max_len, "prompts": ps, "steps": steps(a.prompts)}
        try:
            srv.start()
            plan["port"] = srv.port
            res = E.run_engine(plan, a.out, f"engine-{kind}-{mode}", timeout=1200)
            err = None
        except E.EngineFailed as e:
            res, err = e.result, str(e)
        except RuntimeError as e:
            res, err = {}, str(e)
        finally:
            srv.stop()
        row = summarize(cfg, res, a.prompts)
        row["error"] = err.splitlines()[0] if err else None
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str)[:2000], flush=True)

    doc = {"rows": rows, "machine": machine(), "args": vars(a), "total_s": time.time() - t_all}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    table = render(doc)
    with open(os.path.join(a.out, "ttft.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return 0 if all(not r.get("error") for r in rows) else 1


def render(doc: dict) -> str:
    """The Markdown table of one run (results.json)."""
    rows, length, n = doc["rows"], doc["args"]["length"], doc["args"]["prompts"]
    hdr = ("| server, transfer mode | cold TTFT | warm TTFT (external hit) | warm: lookup+load / "
           "compute | vLLM own prefix-cache hit | warm requests with every chunk external |")
    lines = [f"Machine: {doc['machine']}", f"Prompt {length} tokens, {n} prompts per "
             f"configuration; ms as median (min–max); total run {doc.get('total_s', 0):.0f} s.",
             "", hdr, "|---|---|---|---|---|---|"]
    full = (length - 1) // 256 * 256            # vLLM always computes the last token itself
    for r in rows:
        if r.get("error") and not r["cold"]["ttft"]:
            lines.append(f"| {r['config']} | failed: {r['error'][:80]} | | | | |")
            continue
        w = r["warm"]
        # Warm timings over the requests that did get every chunk from the server; a warm request
        # that missed is really a cold one and is only counted in the last column.
        hit = [i for i, h in enumerate(w["ext_hits"]) if h == full]
        same = len(w["load"]) == len(w["ttft"]) == len(w["compute"])
        pick = (lambda k: [w[k][i] for i in hit]) if same else (lambda k: w[k])
        lines.append(
            f"| {r['config']} | {ms(r['cold']['ttft'])} | {ms(pick('ttft'))} | "
            f"{ms(pick('load'))} / {ms(pick('compute'))} | {ms(r['local']['ttft'])} | "
            f"{len(hit)} of {len(w['ext_hits'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
