"""Cache identity: cache_salt, model_name and kv_rank (TP) separate objects."""
import interop_lib as lib


def _setup(client, make_cache, model, seed=1):
    src = make_cache("src")
    src.fill_random(seed)
    iid = lib.new_iid()
    src.register(client, iid, model)
    return src, iid


def test_cache_salt_isolation(client, make_cache, uniq):
    src, iid = _setup(client, make_cache, uniq)
    toks = lib.tokens_for(uniq, 512)
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s", salt="alice"), iid, [list(range(1, 33))],
                        lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "b", worker_id=None, salt="bob")) == 0
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "e", worker_id=None, salt="")) == 0
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "a", worker_id=None, salt="alice")) == 2
    # retrieve with the wrong salt fails and does not write
    dst = make_cache("dst")
    dst.fill_sentinel()
    before = dst.snapshot()
    iid_d = lib.new_iid()
    dst.register(client, iid_d, uniq)
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 512, "b", salt="bob"), iid_d, [list(range(1, 33))],
                           lib.EVENT, 0)[1] is False
    assert lib.unchanged_blocks(dst, before, range(dst.nb)) == []
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 512, "a", salt="alice"), iid_d, [list(range(1, 33))],
                           lib.EVENT, 0)[1] is True
    assert lib.compare_blocks(src, range(1, 33), dst, range(1, 33)) == []


def test_salt_unsalted_store_not_visible_to_salted(client, make_cache, uniq):
    src, iid = _setup(client, make_cache, uniq)
    toks = lib.tokens_for(uniq, 256)
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [list(range(1, 17))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "x", worker_id=None, salt="alice")) == 0
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "y", worker_id=None)) == 1


def test_model_name_isolation(client, make_cache, uniq):
    m1, m2 = uniq + "/model-one", uniq + "/model-two"
    src, iid1 = _setup(client, make_cache, m1)
    other = make_cache("other")
    iid2 = lib.new_iid()
    other.register(client, iid2, m2)                    # m2 is registered too: a real miss, not "no model"
    toks = lib.tokens_for(uniq, 512)
    assert client.store(lib.mkkey(m1, toks, 0, 512, "s"), iid1, [list(range(1, 33))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(m2, toks, 0, 512, "l2", worker_id=None)) == 0
    assert lib.lookup_hits(client, lib.mkkey(uniq + "/never-registered", toks, 0, 512, "l3", worker_id=None)) == 0
    assert lib.lookup_hits(client, lib.mkkey(m1, toks, 0, 512, "l1", worker_id=None)) == 2
    assert client.retrieve(lib.mkkey(m2, toks, 0, 512, "l2"), iid2, [list(range(1, 33))], lib.EVENT, 0)[1] is False


def test_world_size_isolation(client, make_cache, uniq):
    """Objects stored by a TP=1 deployment are not hits for a TP=2 deployment of the same model."""
    src, iid = _setup(client, make_cache, uniq)
    tp2 = make_cache("tp2")
    tp2.register(client, lib.new_iid(), uniq, world_size=2)
    toks = lib.tokens_for(uniq, 256)
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [list(range(1, 17))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "l2", worker_id=None, world_size=2)) == 0
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "l1", worker_id=None)) == 1


def test_tp2_both_ranks_required(client, make_cache, uniq):
    caches = {name: make_cache(name) for name in ("src0", "src1", "dst0", "dst1")}
    caches["src0"].fill_random(100)
    caches["src1"].fill_random(101)
    for name in ("dst0", "dst1"):
        caches[name].fill_sentinel()
    iids = {name: lib.new_iid() for name in caches}
    for name, kv in caches.items():
        kv.register(client, iids[name], uniq, world_size=2)
    toks = lib.tokens_for(uniq, 600)
    blocks = list(range(1, 33))

    def k(rid, worker, start=0, end=512):
        return lib.mkkey(uniq, toks, start, end, rid, worker_id=worker, world_size=2)

    assert client.store(k("s", 0), iids["src0"], [blocks], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, k("l1", None)) == 0, "a chunk stored by rank 0 only must not be a hit"
    # rank 1 stores only the first chunk so far
    assert client.store(k("s", 1, 0, 256), iids["src1"], [blocks[:16]], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, k("l2", None)) == 1
    assert client.store(k("s", 1), iids["src1"], [blocks], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, k("l3", None)) == 2
    for rank in (0, 1):
        res = client.retrieve(k("l3", rank), iids[f"dst{rank}"], [blocks], lib.EVENT, 0)
        assert res[1] is True, f"retrieve rank {rank}: {res!r}"
    assert lib.compare_blocks(caches["src0"], blocks, caches["dst0"], blocks) == []
    assert lib.compare_blocks(caches["src1"], blocks, caches["dst1"], blocks) == []
    assert client.end_session("l3") is None
