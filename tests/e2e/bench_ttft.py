#!/usr/bin/env python3
"""Time to first token through a real vLLM CPU engine, cold vs warm, with cwm (disk tier on and
off) and with LMCache's own server under the same engine and settings, in one sitting. Not
part of CI.

    tests/e2e/.venv/bin/python tests/e2e/bench_ttft.py [--prompts 40] [--rounds 4] [--len 4097]
                                                       [--configs cwm-disk:lmcache_driven,...]

The model is make_model.py's "bench" preset (bf16 Llama, hidden 512, 4 layers, 4 heads / 4 KV
heads of 128, intermediate 1024, vocab 8192; seeded weights): on these CPUs it prefills 4097
tokens in a few hundred ms, so a warm request measures the load path. Its KV is 8 KiB per token,
32 MiB per 4096-token prompt.

Each run is a fresh server and one fresh engine process:
  warm-up request (uncounted), then for each prompt i (random token ids, its own salt):
    cold_i   nothing cached anywhere: full prefill, the connector stores 16 chunks
    reset_prefix_cache()
    warm_i   vLLM's own pool empty: 4096 tokens come from the server ("external" hits)
    local_i  the same again without a reset: vLLM's own prefix cache (the floor of a cached
             request)
    one_i    a 1-token prompt: the engine's floor for any request
    reset_prefix_cache()
`--rounds R` splits each configuration's prompts over R runs and interleaves the
configurations (round 1 of every configuration, then round 2, ...), so a disk-on/disk-off
comparison is made in one sitting on the same machine state. Each round has its own prompts.
TTFT is vLLM's own first_token_latency of the request (arrival to first token, the number behind
vllm:time_to_first_token_seconds).

Configurations (server[=cwm binary]:mode):
  cwm-disk:MODE          cwm serve with its defaults (the disk tier on, in a fresh directory)
  cwm-nodisk:MODE        cwm serve --l2-size-gb 0 (memory only); `cwm:MODE` is the same (the
                         name this bench used for it before 2026-12-07)
  lmcache:lmcache_driven LMCache 0.5.6's own server, plain flags
  lmcache:default        LMCache's server with --supported-transfer-mode auto --shm-name NAME
  MODE: lmcache_driven (the connector forced to store/retrieve) or default (the connector's
  default: engine_driven on CPU). `cwm-disk=/path/to/cwm:MODE` runs another cwm binary (a
  before/after in one sitting).
The table gives, per configuration over all rounds: warm TTFT p50 / p90 / worst and the count of
warm requests slower than twice the median of the same mode with the disk tier off ("slow"),
next to vLLM's own prefix-cache hit of the same prompts and the 1-token floor.
Environment as in the tests: VLLM_CPU_KVCACHE_SPACE=1, VLLM_CPU_NUM_OF_RESERVED_CPU=1,
block_size 32, enforce_eager, max_num_batched_tokens >= the prompt (one prefill step).
`CWM_LOG=info,cwm::trace=debug` in the environment makes cwm log every op and every
write-behind batch with timings (the server logs are in --out).
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

ALL = ["cwm-disk:lmcache_driven", "cwm-nodisk:lmcache_driven", "lmcache:lmcache_driven",
       "cwm-disk:default", "cwm-nodisk:default", "lmcache:default"]
ONE_TOKEN = [5]


def prompts(n: int, length: int, seed: int):
    r = random.Random(4242 + 7919 * seed)
    vocab = make_model.PRESETS["bench"]["vocab_size"]
    ps = {f"p{i}": [r.randrange(3, vocab) for _ in range(length)] for i in range(n)}
    ps["warmup"] = [r.randrange(3, vocab) for _ in range(length)]
    ps["one"] = ONE_TOKEN
    return ps


def steps(n: int):
    out = [{"op": "generate", "name": "warmup", "prompt": "warmup", "salt": "warmup",
            "max_tokens": 1}, {"op": "reset"}]
    for i in range(n):
        g = {"op": "generate", "prompt": f"p{i}", "salt": f"s{i}", "max_tokens": 1}
        out += [dict(g, name=f"cold{i}"), {"op": "reset"},
                dict(g, name=f"warm{i}"), dict(g, name=f"local{i}"),
                {"op": "generate", "name": f"one{i}", "prompt": "one", "salt": f"s{i}",
                 "max_tokens": 1},
                {"op": "reset"}]
    return out


def parse_config(cfg: str):
    """`server[=binary]:mode` -> (server, binary or None, mode)."""
    server, mode = cfg.rsplit(":", 1)
    server, _, binary = server.partition("=")
    if server == "cwm":
        server = "cwm-nodisk"
    if server not in ("cwm-disk", "cwm-nodisk", "lmcache") or mode not in (
            "lmcache_driven", "default"):
        raise SystemExit(f"unknown configuration {cfg!r} (see --help)")
    return server, binary or None, mode


def server_for(kind: str, binary, mode: str, out: str, tag: str, l1_gb: float):
    log = os.path.join(out, f"{tag}.server.log")
    if kind.startswith("cwm"):
        l2 = os.path.join(out, f"{tag}.l2")
        extra = ["--l2-size-gb", "0"] if kind == "cwm-nodisk" else []
        return E.cwm_server(log, l1_gb=l1_gb, l2_path=l2, extra=extra, binary=binary)
    extra = [] if mode == "lmcache_driven" else [
        "--supported-transfer-mode", "auto", "--shm-name", f"cwm_bench_{os.getpid()}"]
    return E.lmcache_server(log, l1_gb=l1_gb, extra=extra)


def pct(xs, q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs) + 0.5)) - 1))]


def summarize(cfg: str, res: dict, n: int) -> dict:
    by = {s["name"]: s for s in res.get("steps", []) if s.get("op") == "generate"}
    row = {"config": cfg, "engine_start_s": res.get("engine_start_s")}
    for kind in ("cold", "warm", "local", "one"):
        ss = [by[f"{kind}{i}"] for i in range(n) if f"{kind}{i}" in by]
        row[kind] = {
            "ttft": [s.get("metrics", {}).get("first_token_latency", s["wall_s"]) for s in ss],
            "wall": [s["wall_s"] for s in ss],
            "started_at": [s.get("started_at") for s in ss],
            "ext_hits": [s["delta"]["vllm:external_prefix_cache_hits"] for s in ss],
            "own_hits": [s["delta"]["vllm:prefix_cache_hits"] for s in ss],
            "load": [s["metrics"]["scheduled_ts"] - s["metrics"]["queued_ts"]
                     for s in ss if "scheduled_ts" in s.get("metrics", {})],
            "compute": [s["metrics"]["first_token_ts"] - s["metrics"]["scheduled_ts"]
                        for s in ss if "first_token_ts" in s.get("metrics", {})],
        }
    return row


def merge(rows: list) -> dict:
    """One configuration's rounds as one row (lists concatenated)."""
    out = {"config": rows[0]["config"], "rounds": len(rows),
           "errors": [r["error"] for r in rows if r.get("error")]}
    for kind in ("cold", "warm", "local", "one"):
        out[kind] = {k: [x for r in rows for x in r[kind][k]] for k in rows[0][kind]}
    return out


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
    ap = argparse.ArgumentParser(description="Time to first token through a real vLLM CPU engine")
    ap.add_argument("--prompts", type=int, default=5, help="per configuration, over all rounds")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--len", type=int, default=4097, dest="length",
                    help="prompt tokens (4097: 16 full chunks and the one token vLLM must compute)")
    ap.add_argument("--configs", default=",".join(ALL))
    ap.add_argument("--l1-size-gb", type=float, default=4.0)
    ap.add_argument("--out", default=os.path.join(E.WORK, "bench"))
    ap.add_argument("--report", metavar="RESULTS_JSON",
                    help="only print the table of an earlier run's results.json")
    ap.add_argument("--explain", metavar="OUT_DIR",
                    help="for an earlier run made with CWM_LOG=info,cwm::trace=debug: each warm "
                         "request slower than twice its run's median, with what cwm logged "
                         "while it ran (its ops, write-behind batches, fsyncs); and, for "
                         "engine-driven runs, how long the engine's own copy out of cwm's pool "
                         "took (the floor of a warm request in that mode, whatever the server)")
    a = ap.parse_args()
    if a.report:
        with open(a.report) as f:
            print(render(json.load(f)))
        return 0
    if a.explain:
        print(explain(a.explain))
        return 0

    configs = a.configs.split(",")
    parsed = [parse_config(c) for c in configs]
    per_round = -(-a.prompts // a.rounds)
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    model = make_model.write_model(os.path.join(E.WORK, "models", "bench"), "bench")
    max_len = a.length + 64
    runs = {c: [] for c in configs}
    t_all = time.time()
    for rnd in range(a.rounds):
        n = min(per_round, a.prompts - rnd * per_round)
        if n <= 0:
            break
        ps = prompts(n, a.length, rnd)
        for ci, (cfg, (kind, binary, mode)) in enumerate(zip(configs, parsed)):
            tag = f"r{rnd}-c{ci}-{kind}-{mode}"
            print(f"== round {rnd + 1}/{a.rounds}: {cfg} ({n} prompts)", flush=True)
            srv = server_for(kind, binary, mode, a.out, tag, a.l1_size_gb)
            plan = {"model": model, "mode": mode, "mq_timeout": 120, "max_model_len": max_len,
                    "max_num_batched_tokens": max_len, "prompts": ps, "steps": steps(n)}
            try:
                srv.start()
                plan["port"] = srv.port
                res = E.run_engine(plan, a.out, f"engine-{tag}", timeout=1200)
                err = None
            except E.EngineFailed as e:
                res, err = e.result, str(e)
            except RuntimeError as e:
                res, err = {}, str(e)
            finally:
                srv.stop()
                shutil.rmtree(os.path.join(a.out, f"{tag}.l2"), ignore_errors=True)
            row = summarize(cfg, res, n)
            row["round"], row["error"] = rnd, (err.splitlines()[0] if err else None)
            runs[cfg].append(row)
            w = [round(x * 1000, 1) for x in row["warm"]["ttft"]]
            print(f"   warm TTFT ms: {w}" + (f"  ERROR {row['error']}" if err else ""),
                  flush=True)

    doc = {"rows": [merge(runs[c]) for c in configs if runs[c]], "runs": runs,
           "machine": machine(), "args": vars(a), "total_s": time.time() - t_all,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_all))}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    table = render(doc)
    with open(os.path.join(a.out, "ttft.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return 0 if all(not r.get("errors") for r in doc["rows"]) else 1


def explain(out: str) -> str:
    """Line each slow warm request of a run up against cwm's trace (see --explain)."""
    import datetime
    import glob
    import re
    with open(os.path.join(out, "results.json")) as f:
        doc = json.load(f)
    line = re.compile(r"^(\S+Z)\s+\w+\s+(\S+):\s+(.*)$")
    lines, floors = [], []
    for ci, (cfg, runs) in enumerate(doc["runs"].items()):
        copies = []
        for run in runs:
            events = []
            for log in glob.glob(os.path.join(out, f"r{run['round']}-c{ci}-*.server.log")):
                for ln in open(log, errors="replace"):
                    m = line.match(re.sub(r"\x1b\[[0-9;]*m", "", ln).strip())
                    if m and "cwm::trace" in m.group(2) and 'op="ping"' not in m.group(3):
                        t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
                        events.append((t.timestamp(), m.group(3)))
            copies += engine_copies(events)
            w = run["warm"]
            if not w["ttft"]:
                continue
            med = statistics.median(w["ttft"])
            for i, (t0, ttft) in enumerate(zip(w["started_at"], w["ttft"])):
                if ttft <= 2 * med or t0 is None:
                    continue
                lines.append(f"{cfg} round {run['round'] + 1} warm{i}: {ttft * 1000:.1f} ms "
                             f"(run median {med * 1000:.1f}); ms from the request's start:")
                lines += [f"  {1000 * (t - t0):+8.1f}  {msg[:160]}" for t, msg in events
                          if t0 - 0.1 <= t <= t0 + ttft + 0.01]
        own = [x for run in runs for x in run["local"]["ttft"]]
        if copies and own:
            copies.sort()
            own_p50 = statistics.median(own) * 1000
            floors.append(
                f"{cfg}: the engine's own copy out of cwm's pool (prepare_retrieve answered to "
                f"commit_retrieve arriving, {len(copies)} retrieves) p10 {pct(copies, 0.1):.1f} / "
                f"p50 {statistics.median(copies):.1f} / p90 {pct(copies, 0.9):.1f} ms; vLLM's own "
                f"prefix hit p50 {own_p50:.1f} ms: a warm request does that and the copy, so with "
                f"any server its median is about "
                f"{(own_p50 + statistics.median(copies)) / own_p50:.2f}x the own hit's or more")
    slow = "\n".join(lines) or "no warm request slower than twice its run's median"
    return "\n".join([slow] + floors)


def engine_copies(events: list) -> list:
    """ms each engine-driven retrieve spent in the engine, between cwm answering its
    `prepare_retrieve` and its `commit_retrieve` arriving: LMCache's client copying the chunks
    out of cwm's pool into vLLM's blocks, work no server takes part in."""
    import re
    out, prepared = [], None
    # "answered" is logged after the reply is handed over: a lane thread descheduled in between
    # logs it late, so a copy can read shorter than it was (never longer); hence p10, not min.
    for t, msg in events:
        m = re.search(r'op="(prepare_retrieve|commit_retrieve)".*queued_us=(\d+) run_us=(\d+)',
                      msg)
        if not m:
            continue
        if m.group(1) == "prepare_retrieve":
            prepared = t
        elif prepared is not None:
            # Its arrival: logged when answered, after its lane wait and its run.
            out.append(1000 * (t - prepared) - (int(m.group(2)) + int(m.group(3))) / 1000)
            prepared = None
    return out


def warm_hits(r: dict, full: int) -> dict:
    """The warm timings of the requests that got every chunk from the server (a warm request
    that missed is really a cold one; it is only counted in the last column)."""
    w = r["warm"]
    hit = [i for i, h in enumerate(w["ext_hits"]) if h == full]
    if len(w["load"]) == len(w["ttft"]) == len(w["compute"]):
        return {k: [w[k][i] for i in hit] for k in ("ttft", "load", "compute")} | {"hit": hit}
    return {k: w[k] for k in ("ttft", "load", "compute")} | {"hit": hit}


def render(doc: dict) -> str:
    """The Markdown table of one run (results.json)."""
    rows, length, n = doc["rows"], doc["args"]["length"], doc["args"]["prompts"]
    full = (length - 1) // 256 * 256            # vLLM always computes the last token itself
    # The disk-off median of each mode: what "slow" is measured against.
    base = {}
    for r in rows:
        server, _, mode = parse_config(r["config"])
        if server == "cwm-nodisk" and mode not in base:
            t = warm_hits(r, full)["ttft"]
            base[mode] = statistics.median(t) if t else None
    hdr = ("| server, transfer mode | cold TTFT p50 | warm TTFT p50 / p90 / worst | warm: "
           "lookup+load / compute p50 | slow (> 2x disk-off p50) | vLLM own prefix hit p50 | "
           "warm p50 / own | 1-token p50 | warm requests with every chunk external |")
    lines = [f"Machine: {doc['machine']}",
             f"{doc.get('date', '')}: prompt {length} tokens, {n} prompts per configuration in "
             f"{doc['args'].get('rounds', 1)} interleaved round(s); ms; total run "
             f"{doc.get('total_s', 0):.0f} s.",
             "", hdr, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["cold"]["ttft"]:
            err = (r.get("errors") or [r.get("error") or "no results"])[0]
            lines.append(f"| {r['config']} | failed: {err[:80]} | | | | | | | |")
            continue
        w = warm_hits(r, full)
        t = [x * 1000 for x in w["ttft"]]
        own = [x * 1000 for x in r["local"]["ttft"]]
        one = [x * 1000 for x in r.get("one", {}).get("ttft", [])]
        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        b = base.get(parse_config(r["config"])[2])
        slow = f"{sum(x > 2 * b * 1000 for x in t)} of {len(t)}" if b and t else "–"
        warm = f"{med(t):.1f} / {pct(t, 0.9):.1f} / {max(t):.1f}" if t else "–"
        lines.append(
            f"| {r['config']} | {med([x * 1000 for x in r['cold']['ttft']]):.0f} | {warm} | "
            f"{med([x * 1000 for x in w['load']]):.1f} / "
            f"{med([x * 1000 for x in w['compute']]):.1f} | {slow} | {med(own):.1f} | "
            f"{med(t) / med(own):.2f}x | {med(one):.1f} | {len(w['hit'])} of "
            f"{len(r['warm']['ext_hits'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
