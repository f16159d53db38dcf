"""Two `cwm serve` processes sharing one real Redis (L3), driven by LMCache's real client:
what one sidecar stores, the other (empty L1, no L2) hits and retrieves byte-exact, and a
tenant's salt still isolates it. Needs Debian's `redis-server` (`.ci/run` installs it); without
it the test fails with that message, it is not skipped."""
import shutil
import subprocess
import time

import pytest

import interop_lib as lib


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server): the L3 fleet "
                    "test needs a real Redis", pytrace=False)
    port = lib.free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
        assert proc.poll() is None and time.time() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.mock_xfail("the mock server has no L3")
def test_chunks_stored_on_a_hit_and_retrieve_byte_exact_on_b(new_server, make_cache, uniq, redis_url):
    a = new_server(args=["--l3-url", redis_url])
    b = new_server(args=["--l3-url", redis_url])
    ca, cb = lib.Client(a.url), lib.Client(b.url)
    try:
        src = make_cache("src", nb=80)
        src.fill_random(7)
        iid = lib.new_iid()
        src.register(ca, iid, uniq)
        toks = lib.tokens_for(uniq, 1024)
        assert ca.store(lib.mkkey(uniq, toks, 0, 1024, "s", salt="alice"), iid,
                        [list(range(1, 65))], lib.EVENT)[1] is True

        # B's engine (registered first, as vLLM's is) never saw the chunks: B's lookup asks Redis
        # (write-behind on A may still be pushing them).
        dst = make_cache("dst", nb=80)
        dst.fill_sentinel()
        iid_d = lib.new_iid()
        dst.register(cb, iid_d, uniq)
        lookup = lib.mkkey(uniq, toks, 0, 1024, "q", worker_id=None, salt="alice")
        deadline = time.time() + 20
        while (hits := lib.lookup_hits(cb, lookup)) < 4:
            assert time.time() < deadline, f"B hit {hits} of 4 chunks through Redis"
            time.sleep(0.2)
            lookup = lib.mkkey(uniq, toks, 0, 1024, f"q{time.time()}", worker_id=None, salt="alice")
        assert lib.lookup_hits(cb, lib.mkkey(uniq, toks, 0, 1024, "bob", worker_id=None, salt="bob")) == 0, \
            "another salt sees nothing, on every tier"

        assert cb.retrieve(lib.mkkey(uniq, toks, 0, 1024, lookup.request_id, salt="alice"), iid_d,
                           [list(range(1, 65))], lib.EVENT, 0)[1] is True
        assert lib.compare_blocks(src, range(1, 65), dst, range(1, 65)) == []
    finally:
        ca.close()
        cb.close()
