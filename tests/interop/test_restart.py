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
