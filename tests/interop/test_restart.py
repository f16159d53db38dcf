"""Server restart on the same port: the SAME client object reconnects (ZMQ) and, after
re-registering (as the vLLM worker does on heartbeat recovery), works again."""
import signal
import time

import pytest

import interop_lib as lib


def _round(c, src, dst, iid_s, iid_d, model, tag):
    toks = lib.tokens_for(f"{model}-{tag}", 512)
    assert c.store(lib.mkkey(model, toks, 0, 512, f"{tag}-s"), iid_s, [list(range(1, 33))], lib.EVENT)[1] is True
    assert lib.lookup_hits(c, lib.mkkey(model, toks, 0, 512, f"{tag}-l", worker_id=None)) == 2
    assert c.retrieve(lib.mkkey(model, toks, 0, 512, f"{tag}-l"), iid_d, [list(range(32, 64))], lib.EVENT, 0)[1] is True
    assert lib.compare_blocks(src, range(1, 33), dst, range(32, 64)) == []
    assert c.end_session(f"{tag}-l") is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_server_restart_same_client(new_server, make_cache, uniq, sig):
    srv = new_server()
    c = lib.Client(srv.url)
    try:
        src, dst = make_cache("src"), make_cache("dst")
        src.fill_random(77)
        dst.fill_sentinel()
        iid_s, iid_d = lib.new_iid(), lib.new_iid()
        src.register(c, iid_s, uniq)
        dst.register(c, iid_d, uniq)
        assert c.get_chunk_size() == 256
        _round(c, src, dst, iid_s, iid_d, uniq, "before")

        t0 = time.monotonic()
        srv.stop(sig)
        assert time.monotonic() - t0 < 5, f"server took {time.monotonic() - t0:.1f}s to exit on {sig.name}"
        queued = c.submit.get_chunk_size()          # sent while the server is down: queued by libzmq
        assert not queued.wait(0.5), "a reply arrived while the server was down?"
        time.sleep(0.5)
        srv.start()                                 # same port; waits for a fresh client's get_chunk_size

        assert lib.wait(queued, "get_chunk_size queued while the server was down", 15) == 256
        assert c.get_chunk_size() == 256
        assert c.ping(None) is True
        assert c.ping(iid_s) is True
        # the worker re-registers on recovery (same instance ids)
        src.register(c, iid_s, uniq)
        dst.register(c, iid_d, uniq)
        dst.fill_sentinel()
        _round(c, src, dst, iid_s, iid_d, uniq, "after")
        assert c.noop() == "OK"
    finally:
        c.close()


@pytest.mark.mock_xfail("the mock has no disk tier")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restart_then_hit_from_disk(new_server, make_cache, uniq, sig):
    """Chunks stored before a restart are found on disk after it (L1 starts empty), retrieved
    byte-exact, and still isolated by salt."""
    srv = new_server(disk=True)
    c = lib.Client(srv.url)
    try:
        src, dst = make_cache("src", nb=160), make_cache("dst", nb=160)
        src.fill_random(91)
        iid_s, iid_d = lib.new_iid(), lib.new_iid()
        src.register(c, iid_s, uniq)
        toks = lib.tokens_for(f"{uniq}-disk", 1100)
        assert c.store(lib.mkkey(uniq, toks, 0, 1024, "w", salt="alice"), iid_s, [list(range(1, 65))],
                       lib.EVENT)[1] is True
        time.sleep(1.5)                             # write-behind: asynchronous by design
        srv.stop(sig)
        srv.start()
        dst.register(c, iid_d, uniq)
        dst.fill_sentinel()
        assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 1024, "r", worker_id=None, salt="bob")) == 0
        assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 1024, "r", worker_id=None, salt="alice")) == 4
        assert c.retrieve(lib.mkkey(uniq, toks, 0, 1024, "r", salt="alice"), iid_d, [list(range(70, 134))],
                          lib.EVENT, 0)[1] is True
        assert lib.compare_blocks(src, range(1, 65), dst, range(70, 134)) == []
    finally:
        c.close()
