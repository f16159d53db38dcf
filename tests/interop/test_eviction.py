"""L1 budget (--l1-size-gb 1) with LRU eviction: storing ~1.5 GiB keeps the server within budget,
evicts the oldest objects, keeps serving, and never evicts an object a lookup has counted as a hit
before its retrieve arrives (lmcache-mp.md §3.4)."""
import os

import psutil

import interop_lib as lib

# 32 layers x 8 KV heads x C=256 (head size 128, K+V packed), bf16, block 16:
# one 256-token chunk object = 32 * 256 * 8 * 256 * 2 bytes = 32 MiB.
GEOM = dict(nl=32, nb=17, bs=16, nh=8, hs=128)
CHUNK_BYTES = 32 << 20
L1_BYTES = 1 << 30
N_FLOOD = int(os.environ.get("CWM_EVICTION_FLOOD_CHUNKS", "48"))     # 1.5 GiB


def test_lru_eviction_respects_pins(new_server, make_cache, uniq):
    srv = new_server(l1_size_gb="1")
    c = lib.Client(srv.url, timeout=max(lib.RPC_TIMEOUT, 30))
    try:
        src, dst = make_cache("src", **GEOM), make_cache("dst", **GEOM)
        src.fill_random(5)
        dst.fill_sentinel()
        iid_s, iid_d = lib.new_iid(), lib.new_iid()
        src.register(c, iid_s, uniq)
        dst.register(c, iid_d, uniq)
        blocks = list(range(1, 17))

        pinned = lib.tokens_for(uniq + "-pinned", 256)
        assert c.store(lib.mkkey(uniq, pinned, 0, 256, "p-s"), iid_s, [blocks], lib.EVENT)[1] is True
        assert lib.lookup_hits(c, lib.mkkey(uniq, pinned, 0, 256, "p", worker_id=None)) == 1   # now read-locked

        # two chunks whose read locks are released again: by a retrieve, and by free_lookup_locks
        released = {}
        for how in ("retrieved", "freed"):
            toks = lib.tokens_for(f"{uniq}-{how}", 256)
            released[how] = toks
            assert c.store(lib.mkkey(uniq, toks, 0, 256, f"{how}-s"), iid_s, [blocks], lib.EVENT)[1] is True
            key = lib.mkkey(uniq, toks, 0, 256, how, worker_id=None)
            assert lib.lookup_hits(c, key) == 1
            if how == "retrieved":
                assert c.retrieve(lib.mkkey(uniq, toks, 0, 256, how), iid_d, [blocks], lib.EVENT, 0)[1] is True
            else:
                assert c.free_lookup_locks(key, 1) is None
            assert c.end_session(how) is None

        flood = [lib.tokens_for(f"{uniq}-flood-{i}", 256) for i in range(N_FLOOD)]
        for i, toks in enumerate(flood):
            res = c.store(lib.mkkey(uniq, toks, 0, 256, f"f{i}"), iid_s, [blocks], lib.EVENT)
            assert res[1] is True, f"flood store {i}: {res!r} (a full L1 must not fail the store)"
        assert srv.alive()
        rss = psutil.Process(srv.proc.pid).memory_info().rss
        assert rss < L1_BYTES + (384 << 20), f"server RSS {rss >> 20} MiB after storing 1.5 GiB into a 1 GiB L1"

        # the chunk counted by the lookup must still be retrievable
        res = c.retrieve(lib.mkkey(uniq, pinned, 0, 256, "p"), iid_d, [blocks], lib.EVENT, 0)
        assert res[1] is True, "an object counted as a hit by lookup was evicted before its retrieve"
        assert lib.compare_blocks(src, blocks, dst, blocks) == []
        assert c.end_session("p") is None

        hits = []
        for i, toks in enumerate(flood):
            key = lib.mkkey(uniq, toks, 0, 256, f"q{i}", worker_id=None)
            hits.append(lib.lookup_hits(c, key))
            assert c.free_lookup_locks(key, 1) is None
            assert c.end_session(f"q{i}") is None
        n_hits = sum(hits)
        assert hits[-1] == 1, f"the most recently stored chunk is missing; hits per store: {hits}"
        assert hits[0] == 0, f"the oldest chunk was not evicted; hits per store: {hits}"
        assert n_hits <= L1_BYTES // CHUNK_BYTES, f"{n_hits} x 32 MiB resident in a 1 GiB L1: {hits}"

        for how, toks in released.items():
            got = lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 256, f"{how}-again", worker_id=None))
            assert got == 0, (f"the chunk whose lock was released by {'retrieve' if how == 'retrieved' else how} "
                              f"survived {N_FLOOD} newer 32 MiB stores into 1 GiB: its read lock leaked?")

        # still serving normally after eviction
        fresh = lib.tokens_for(uniq + "-fresh", 256)
        assert c.store(lib.mkkey(uniq, fresh, 0, 256, "x"), iid_s, [blocks], lib.EVENT)[1] is True
        assert lib.lookup_hits(c, lib.mkkey(uniq, fresh, 0, 256, "y", worker_id=None)) == 1
    finally:
        c.close()


def test_end_session_refreshes_lru(new_server, make_cache, uniq):
    """end_session touches the session's chunks (LRU refresh): with room for ~4 chunks, a chunk
    touched after being stored first outlives chunks stored after it."""
    srv = new_server(l1_size_gb="0.125")
    c = lib.Client(srv.url, timeout=max(lib.RPC_TIMEOUT, 30))
    try:
        src = make_cache("src", **GEOM)
        src.fill_random(6)
        iid = lib.new_iid()
        src.register(c, iid, uniq)
        blocks = list(range(1, 17))
        toks = {name: lib.tokens_for(f"{uniq}-{name}", 256) for name in "ABCDE"}

        def store(name):
            assert c.store(lib.mkkey(uniq, toks[name], 0, 256, f"s{name}"), iid, [blocks], lib.EVENT)[1] is True

        for name in "ABC":
            store(name)
        key = lib.mkkey(uniq, toks["A"], 0, 256, "touch", worker_id=None)
        assert lib.lookup_hits(c, key) == 1
        assert c.free_lookup_locks(key, 1) is None
        assert c.end_session("touch") is None                       # A is now the most recently used
        store("D")
        store("E")
        hits = {}
        for name in "ABCDE":
            k = lib.mkkey(uniq, toks[name], 0, 256, f"q{name}", worker_id=None)
            hits[name] = lib.lookup_hits(c, k)
            assert c.free_lookup_locks(k, 1) is None
        assert hits["E"] == 1, hits
        assert hits["B"] == 0, f"B (least recently used) should have been evicted first: {hits}"
        assert hits["A"] == 1, f"A was touched by end_session after B and C were stored: {hits}"
    finally:
        c.close()
