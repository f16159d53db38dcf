"""LMCache 0.5.6's own `lmcache bench server` against `lmcache server` and `cwm serve`, both
with default flags (L1 4 GiB, LMCache with LRU eviction; cwm with its disk tier on), in one
sitting, ABBA order (LMCache, cwm, cwm, LMCache per round), each run on a fresh server process.
Prints the p50 of each phase per server and cwm's speed-up (LMCache time / cwm time).

The client's own floor goes in the middle of each round (LMCache, cwm, null, null, cwm,
LMCache): the same client against `cwm bench --null-server`, a server that answers every
request at once (every lookup a miss, every transfer acknowledged without a copy). Its lookup
p50 is what "no slower than the client's floor" is measured against; its store p50 is the
round trip of a store request with nothing copied; it has no warm retrieve (nothing hits).
`--no-floor` leaves it out.

    benches/vs_lmcache.sh [--rounds N] [--requests N] [--num-tokens N] [--l1-size-gb G] [--no-floor]

$CWM_EXTRA_ARGS adds flags to cwm's (e.g. `--l2-size-gb 0`, `--l1-populate lazy`).
Needs LMCache in tests/e2e/.venv (tests/e2e/setup.sh builds it) and a built cwm ($CWM_BIN,
default target/ci/cwm). Numbers go to BENCHMARKS.md by hand, with `uptime` and `lscpu`.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "tests", "e2e", ".venv", "bin")
LMCACHE = os.path.join(VENV, "lmcache")
SHAPE = "(2,1024,16,8,128):float16:32"
PHASES = ("cold_store", "warm_retrieve", "cold_lookup", "warm_lookup")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc, log: str, timeout: float = 120):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"server exited {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    sys.exit(f"server did not listen on {port} within {timeout}s; see {log}")


def server_argv(kind: str, port: int, http: int, l1: float, work: str):
    if kind == "lmcache":
        return [LMCACHE, "server", "--host", "127.0.0.1", "--port", str(port),
                "--http-port", str(http), "--l1-size-gb", str(l1), "--eviction-policy", "LRU"]
    cwm = os.environ.get("CWM_BIN", os.path.join(ROOT, "target", "ci", "cwm"))
    if kind == "null":
        # No HTTP port: the client's checksum queries fail fast and are not compared.
        return [cwm, "bench", "--null-server", str(port)]
    return [cwm, "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http),
            "--l1-size-gb", str(l1), "--l2-path", os.path.join(work, "l2"),
            *os.environ.get("CWM_EXTRA_ARGS", "").split()]


def run(kind: str, args, work: str, start: int) -> dict:
    port, http = free_port(), free_port()
    log = os.path.join(work, f"{kind}-{start}.log")
    env = dict(os.environ, LMCACHE_DISABLE_BANNER="1", PYTHONWARNINGS="ignore")
    with open(log, "w") as logf:
        srv = subprocess.Popen(server_argv(kind, port, http, args.l1_size_gb, work),
                               stdout=logf, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    try:
        wait_port(port, srv, log)
        out = os.path.join(work, f"{kind}-{start}.json")
        bench = [LMCACHE, "bench", "server", "--mode", "cpu", "--transfer-mode", "lmcache_driven",
                 "--num-tokens", str(args.num_tokens), "--interval", "0.1",
                 "--kvcache-shape-spec", SHAPE, "--rpc-url", f"tcp://127.0.0.1:{port}",
                 "--url", f"http://127.0.0.1:{http}", "--start", str(start),
                 "--end", str(start + args.requests), "--format", "json", "--output", out, "-q"]
        r = subprocess.run(bench, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                           text=True, timeout=1800)
        if r.returncode != 0:
            sys.exit(f"lmcache bench server against {kind} exited {r.returncode}:\n"
                     f"{r.stdout[-3000:]}\nserver log: {log}")
        with open(out) as f:
            m = json.load(f)["metrics"]
        res = m["results"]
        if res["checksum_fail"]:
            sys.exit(f"{kind}: {res['checksum_fail']} retrieves returned wrong bytes")
        # The null server hits nothing, so it has no warm retrieve.
        got = {p: m[p][f"{p}_p50"] if p in m else None for p in PHASES}
        if kind != "null" and None in got.values():
            sys.exit(f"{kind}: phases missing from the client's report: {sorted(m)}")
        got["minflt"] = minor_faults(srv.pid)
        return got
    finally:
        srv.terminate()
        try:
            srv.wait(30)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


def minor_faults(pid: int) -> int:
    """The server process's minor page faults so far (/proc/PID/stat field 10)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="ABBA rounds (default 1)")
    ap.add_argument("--requests", type=int, default=12, help="sequences per run (default 12)")
    ap.add_argument("--num-tokens", type=int, default=4096, help="tokens per request")
    ap.add_argument("--l1-size-gb", type=float, default=4.0)
    ap.add_argument("--no-floor", action="store_true",
                    help="leave out the null server (the client's floor)")
    args = ap.parse_args()
    if not os.path.exists(LMCACHE):
        sys.exit(f"{LMCACHE} missing: build it with tests/e2e/setup.sh (LMCache 0.5.6)")
    order = ("lmcache", "cwm", "cwm", "lmcache") if args.no_floor else \
        ("lmcache", "cwm", "null", "null", "cwm", "lmcache")
    p50 = {kind: {p: [] for p in PHASES} for kind in order}
    start = 0
    ms = lambda v: "       —   " if v is None else f"{v:8.2f} ms"
    with tempfile.TemporaryDirectory(prefix="cwm-vs-lmcache-") as work:
        for _ in range(args.rounds):
            for kind in order:
                got = run(kind, args, work, start)
                start += args.requests
                print(f"{kind:8} " + "  ".join(f"{p} {ms(got[p])}" for p in PHASES)
                      + f"  server minor faults {got['minflt']}", flush=True)
                for p in PHASES:
                    if got[p] is not None:
                        p50[kind][p].append(got[p])
    print(f"\np50 over {2 * args.rounds} runs each, {args.requests} requests of "
          f"{args.num_tokens} tokens ({SHAPE}):")
    floor = "null" in p50
    print(f"{'phase':14} {'LMCache ms':>11} {'cwm ms':>9} {'speed-up':>9}"
          + (f" {'null server (floor) ms':>23} {'cwm / floor':>12}" if floor else ""))
    for p in PHASES:
        a, b = statistics.median(p50["lmcache"][p]), statistics.median(p50["cwm"][p])
        line = f"{p:14} {a:11.2f} {b:9.2f} {a / b:8.2f}x"
        if floor:
            if p50["null"][p]:
                f = statistics.median(p50["null"][p])
                line += f" {f:23.2f} {b / f:11.2f}x"
            else:
                line += f" {'— (no hit)':>23} {'':>12}"
        print(line)


if __name__ == "__main__":
    main()
