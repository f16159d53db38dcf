"""LMCache 0.5.6's own `lmcache bench server` against `cwm serve`: its mock CPU worker stores
requests, looks them up and retrieves them, and verifies each retrieve through cwm's
`POST /cache/checksums` (MD5 of the engine's KV blocks after the cold store and after the warm
retrieve must match). Run once per transfer mode: `lmcache_driven` (cwm copies through
register_kv_cache + store/retrieve) and `auto` (engine-driven on CPU: the worker copies through
cwm's shared-memory pool). Then the other mode retrieves what the first stored: the objects do
not depend on the mode that wrote them.

    .venv/bin/python -m pytest -c pytest.ini lmcache_bench.py   (run.sh does this)
"""
import os
import re
import subprocess

import pytest

import e2e_lib as E

REQUESTS = 8
LMCACHE = os.path.join(os.path.dirname(E.PY), "lmcache")


@pytest.fixture(scope="module")
def cwm(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    http = E.free_port()
    srv = E.cwm_server(str(d / "cwm.log"), l1_gb=2.0, l2_path=str(d / "l2"),
                       extra=["--http-port", str(http)]).start()
    srv.http = http
    yield srv
    srv.stop()


def bench(srv, mode: str, start: int) -> str:
    argv = [LMCACHE, "bench", "server", "--mode", "cpu", "--transfer-mode", mode,
            "--rpc-url", f"tcp://127.0.0.1:{srv.port}", "--url", f"http://127.0.0.1:{srv.http}",
            "--start", str(start), "--end", str(start + REQUESTS), "--interval", "0"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, LMCACHE_DISABLE_BANNER="1"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"lmcache bench server exited {r.returncode}:\n{out[-4000:]}\n{E.tail(srv.log)}"
    return out


@pytest.mark.parametrize("mode", ["lmcache_driven", "auto"])
def test_lmcache_bench_server_verifies_every_retrieve(cwm, mode):
    start = 1000 if mode == "auto" else 0
    out = bench(cwm, mode, start)
    ok = out.count("CHECKSUM MATCH OK")
    assert ok == REQUESTS and "CHECKSUM MISMATCH" not in out, \
        f"{ok} of {REQUESTS} checksums matched:\n{out[-4000:]}"


def test_the_other_mode_reads_what_one_stored(cwm):
    """The auto run retrieves requests 0.. stored by the lmcache_driven run (cold lookups hit,
    nothing is stored again) and must see the same block checksums."""
    first = bench(cwm, "lmcache_driven", 2000)
    second = bench(cwm, "auto", 2000)
    sums = lambda out, phase: re.findall(rf"\[seq (\d+)/{phase}\] CHECKSUM: ([0-9a-f]+)", out)
    stored = dict(sums(first, "cold"))
    read_back = dict(sums(second, "warm"))
    assert len(stored) == REQUESTS and stored == read_back, (stored, read_back)
    assert "[seq 2000/cold] LOOKUP: 2/2 chunks hit" in second, second[-3000:]
