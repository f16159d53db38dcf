"""Core management ops, as the vLLM scheduler / worker adapters send them at start-up."""
import interop_lib as lib


def test_chunk_size_and_experimental(client):
    assert client.get_chunk_size() == 256
    assert client.get_experimental() == []


def test_ping_and_noop(client, make_cache, uniq):
    assert client.ping(None) is True
    assert client.noop() == "OK"
    iid = lib.new_iid()
    # An instance the server does not know: False once (LMCache's server: always True), so the
    # connector's heartbeat sees unhealthy -> healthy and re-registers; True from then on.
    assert client.ping(iid) is False
    assert client.ping(iid) is True
    make_cache().register(client, iid, uniq)
    assert client.ping(iid) is True
    assert client.unregister_kv_cache(iid) is None


def test_register_idempotent_and_unregister(client, make_cache, uniq):
    kv = make_cache()
    iid = lib.new_iid()
    kv.register(client, iid, uniq)
    kv.register(client, iid, uniq)                      # heartbeat-recovery re-register -> None
    kv.register(client, iid, uniq)
    assert client.unregister_kv_cache(iid) is None
    assert client.unregister_kv_cache(iid) is None      # already gone: still answered
    assert client.unregister_kv_cache(lib.new_iid()) is None   # never registered


def test_reregister_keeps_serving(client, make_cache, uniq):
    """A re-register of a live instance must not break its stores/retrieves."""
    src = make_cache("src")
    src.fill_random(1)
    iid = lib.new_iid()
    src.register(client, iid, uniq)
    toks = lib.tokens_for(uniq, 256)
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "r1"), iid, [list(range(1, 17))], lib.EVENT)[1] is True
    src.register(client, iid, uniq)
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "r2", worker_id=None)) == 1
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 256, "r2"), iid, [list(range(17, 33))], lib.EVENT, 0)[1] is True
    assert lib.compare_blocks(src, range(1, 17), src, range(17, 33)) == []


def test_many_sequential_rpcs(client):
    """Request uids grow past the fixint/uint8/uint16 msgpack boundaries; replies must echo them."""
    futs = [client.submit.noop() for _ in range(300)]
    assert [lib.wait(f, "noop") for f in futs] == ["OK"] * 300
    assert client.get_chunk_size() == 256
