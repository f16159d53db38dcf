"""Server robustness: vanished peers, client churn, unsupported registrations, registration lifetime."""
import time

import msgspec
import zmq

import interop_lib as lib

enc = msgspec.msgpack.encode


def test_peer_gone_before_reply(client, server, make_cache, uniq):
    """Replies to a DEALER that has already disconnected (ROUTER_MANDATORY -> EHOSTUNREACH) must
    not crash or wedge the server."""
    kv = make_cache()
    kv.fill_random(1)
    iid = lib.new_iid()
    kv.register(client, iid, uniq)
    key = enc(lib.mkkey(uniq, lib.tokens_for(uniq, 512), 0, 512, "gone"))
    for round_ in range(5):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(server.url)
        for uid in range(20):
            s.send_multipart([enc(uid), enc(21)])                                   # get_chunk_size
            s.send_multipart([enc(100 + uid), enc(6), key, enc(iid), enc([list(range(1, 33))]), enc(lib.EVENT)])
            s.send_multipart([enc(200 + uid), enc(8), enc(lib.mkkey(uniq, lib.tokens_for(uniq, 512), 0, 512,
                                                                   f"gone{uid}", worker_id=None)), enc(1)])
        s.close()                                   # linger flushes the requests, then the peer is gone
        time.sleep(0.05)
    time.sleep(0.5)
    assert server.alive()
    assert client.get_chunk_size() == 256
    assert lib.lookup_hits(client, lib.mkkey(uniq, lib.tokens_for(uniq, 512), 0, 512, "after", worker_id=None)) == 2


def test_client_churn(server):
    """Many short-lived real clients (scheduler/worker restarts)."""
    for i in range(40):
        c = lib.Client(server.url)
        try:
            assert c.get_chunk_size() == 256
            assert c.ping(None) is True
        finally:
            c.close()


def test_hybrid_registration_refused_cleanly(client, make_cache, uniq):
    """Several KV groups (hybrid / sliding-window models) are out of scope: answer, then store/retrieve
    fail and lookups report 0 rather than corrupting data."""
    kv = make_cache(nl=4)
    kv.fill_random(2)
    iid = lib.new_iid()
    egi = [lib.EngineGroupInfo(engine_group_id=0, layer_indices=(0, 1), tokens_per_block=16),
           lib.EngineGroupInfo(engine_group_id=1, layer_indices=(2, 3), tokens_per_block=16, sw_size_tokens=1024)]
    assert client.register_kv_cache(iid, kv.wrappers(), uniq, 1, lib.EngineType.VLLM, kv.hints, egi) is None
    toks = lib.tokens_for(uniq, 256)
    b = list(range(1, 17))
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [b, b], lib.EVENT)[1] is False
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "l", worker_id=None)) == 0
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 256, "l"), iid, [b, b], lib.EVENT, 0)[1] is False
    assert client.unregister_kv_cache(iid) is None


def test_empty_registration(client, uniq):
    iid = lib.new_iid()
    egi = [lib.EngineGroupInfo(engine_group_id=0, layer_indices=(), tokens_per_block=16)]
    assert client.register_kv_cache(iid, [], uniq, 1, lib.EngineType.VLLM, {"kv_layout": "NHD"}, egi) is None
    toks = lib.tokens_for(uniq, 256)
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [list(range(1, 17))], lib.EVENT)[1] is False
    assert client.unregister_kv_cache(iid) is None


def test_inconsistent_layer_shapes(client, make_cache, uniq):
    """Layers of one registration with different geometry: answered; no crash; no corrupt transfer."""
    a, b = make_cache("a", nh=2), make_cache("b", nh=4)
    a.fill_random(3)
    iid = lib.new_iid()
    wr = a.wrappers()[:2] + b.wrappers()[2:]
    egi = [lib.EngineGroupInfo(engine_group_id=0, layer_indices=(0, 1, 2, 3), tokens_per_block=16)]
    assert client.register_kv_cache(iid, wr, uniq, 1, lib.EngineType.VLLM, {"kv_layout": "NHD"}, egi) is None
    toks = lib.tokens_for(uniq, 256)
    res = client.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [list(range(1, 17))], lib.EVENT)
    assert isinstance(res, tuple) and len(res) == 2
    assert client.get_chunk_size() == 256
    assert client.unregister_kv_cache(iid) is None


def test_objects_outlive_registration(client, make_cache, uniq):
    """Stored chunks belong to the cache, not to the worker that stored them: after the storing
    worker unregisters, a new worker of the same model finds and retrieves them."""
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(4)
    dst.fill_sentinel()
    iid_s = lib.new_iid()
    src.register(client, iid_s, uniq)
    toks = lib.tokens_for(uniq, 512)
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s"), iid_s, [list(range(1, 33))], lib.EVENT)[1] is True
    assert client.unregister_kv_cache(iid_s) is None
    iid_d = lib.new_iid()
    dst.register(client, iid_d, uniq)
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "l", worker_id=None)) == 2
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 512, "l"), iid_d, [list(range(1, 33))], lib.EVENT, 0)[1] is True
    assert lib.compare_blocks(src, range(1, 33), dst, range(1, 33)) == []
