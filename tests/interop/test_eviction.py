"""L1 budget (--l1-size-gb 1) with LRU eviction: storing ~1.5 GiB keeps the server within budget,
evicts the oldest objects, keeps serving, and never evicts an object a lookup has counted as a hit
before its retrieve arrives (lmcache-mp.md §3.4)."""
import os

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

        flood = [lib.tokens_for(f"{uniq}-flood-{i}", 256) for i in range(N_FLOOD)]
        for i, toks in enumerate(flood):
            res = c.store(lib.mkkey(uniq, toks, 0, 256, f"f{i}"), iid_s, [blocks], lib.EVENT)
            assert res[1] is True, f"flood store {i}: {res!r} (a full L1 must not fail the store)"
        assert srv.alive()

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

        # still serving normally after eviction
        fresh = lib.tokens_for(uniq + "-fresh", 256)
        assert c.store(lib.mkkey(uniq, fresh, 0, 256, "x"), iid_s, [blocks], lib.EVENT)[1] is True
        assert lib.lookup_hits(c, lib.mkkey(uniq, fresh, 0, 256, "y", worker_id=None)) == 1
    finally:
        c.close()
