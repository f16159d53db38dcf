"""Scheduler-side fire-and-forget ops are answered; clear() empties the cache."""
import interop_lib as lib


def _stored(client, make_cache, model, n_tokens=512, seed=1):
    src = make_cache("src")
    src.fill_random(seed)
    iid = lib.new_iid()
    src.register(client, iid, model)
    toks = lib.tokens_for(model, n_tokens)
    end = n_tokens - n_tokens % lib.CHUNK
    assert client.store(lib.mkkey(model, toks, 0, end, "s"), iid, [list(range(1, end // 16 + 1))], lib.EVENT)[1] is True
    return src, iid, toks


def test_free_lookup_locks_end_session_report(client, make_cache, uniq):
    src, iid, toks = _stored(client, make_cache, uniq)
    key = lib.mkkey(uniq, toks, 0, 512, "req", worker_id=None)
    assert lib.lookup_hits(client, key) == 2
    # vLLM frees the locks of chunks it will not retrieve (here: all), possibly with an unaligned end
    assert client.free_lookup_locks(lib.mkkey(uniq, toks, 0, 500, "req", worker_id=None), 1) is None
    assert client.free_lookup_locks(key, 1) is None                  # double free: still answered
    assert client.free_lookup_locks(lib.mkkey(uniq, toks, 0, 0, "req", worker_id=None), 1) is None   # empty
    assert client.free_lookup_locks(lib.mkkey(uniq, toks, 0, 512, "never-looked-up", worker_id=None), 1) is None
    assert client.end_session("req") is None
    assert client.end_session("req") is None                         # unknown session: answered
    assert client.end_session("") is None
    recs = [lib.BlockAllocationRecord("req", [1, 2, 3], [7, 8, 9]), lib.BlockAllocationRecord("r2", [], [])]
    assert client.report_block_allocation(4242, uniq, recs) is None
    assert client.report_block_allocation(4242, uniq, []) is None
    # the objects are still there after all of this
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "again", worker_id=None)) == 2
    assert client.end_session("again") is None


def test_query_unknown_request_is_zero(client):
    assert client.query_prefetch_status("no-such-request") == 0
    assert client.query_prefetch_status("") == 0


def test_lookup_without_registration_is_zero(client, uniq):
    toks = lib.tokens_for(uniq, 512)
    assert lib.lookup_hits(client, lib.mkkey(uniq + "-unregistered", toks, 0, 512, "x", worker_id=None)) == 0


def test_lookup_replaces_previous_job(client, make_cache, uniq):
    """A second lookup for the same request id replaces the first job; one result per lookup."""
    src, iid, toks = _stored(client, make_cache, uniq)
    assert client.lookup(lib.mkkey(uniq, toks, 0, 256, "same", worker_id=None), 1) is None
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "same", worker_id=None)) == 2
    assert client.query_prefetch_status("same") == 0
    assert client.end_session("same") is None


def test_clear(client, make_cache, uniq):
    src, iid, toks = _stored(client, make_cache, uniq, seed=9)
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "before", worker_id=None)) == 2
    # release the locks of that lookup so that clear(False) may drop the objects
    assert client.free_lookup_locks(lib.mkkey(uniq, toks, 0, 512, "before", worker_id=None), 1) is None
    assert client.end_session("before") is None
    assert client.clear(False) is None
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "after", worker_id=None)) == 0
    # the registration survives clear: storing again works
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s2"), iid, [list(range(1, 33))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "after2", worker_id=None)) == 2
    assert client.free_lookup_locks(lib.mkkey(uniq, toks, 0, 512, "after2", worker_id=None), 1) is None
    assert client.clear(True) is None
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "after3", worker_id=None)) == 0


def test_clear_keeps_locked_objects(client, make_cache, uniq):
    """clear(False) drops only unlocked objects: a chunk counted by a lookup is still retrievable."""
    src, iid, toks = _stored(client, make_cache, uniq, seed=10)
    dst = make_cache("dst")
    dst.fill_sentinel()
    iid_d = lib.new_iid()
    dst.register(client, iid_d, uniq)
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "locked", worker_id=None)) == 2
    assert client.clear(False) is None
    res = client.retrieve(lib.mkkey(uniq, toks, 0, 512, "locked"), iid_d, [list(range(1, 33))], lib.EVENT, 0)
    assert res[1] is True, "clear(False) dropped objects that a lookup had locked"
    assert lib.compare_blocks(src, range(1, 33), dst, range(1, 33)) == []
