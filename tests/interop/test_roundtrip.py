"""store -> lookup -> query_prefetch_status -> retrieve, byte for byte, in every supported layout."""
import pytest

import interop_lib as lib

BS = 16
BPC = lib.CHUNK // BS          # blocks per chunk


def _roundtrip(client, src, dst, model, toks, n_chunks, src_blocks, dst_blocks, skip=0, tag="r"):
    iid_s, iid_d = lib.new_iid(), lib.new_iid()
    src.register(client, iid_s, model)
    dst.register(client, iid_d, model)
    end = n_chunks * lib.CHUNK
    ok = client.store(lib.mkkey(model, toks, 0, end, f"{tag}-store"), iid_s, [src_blocks], lib.EVENT)
    assert ok == (b"", True) or ok[1] is True, f"store returned {ok!r}"
    rid = f"{tag}-load"
    assert lib.lookup_hits(client, lib.mkkey(model, toks, 0, end, rid, worker_id=None)) == n_chunks
    assert client.query_prefetch_status(rid) == 0, "query_prefetch_status must be exactly-once"
    res = client.retrieve(lib.mkkey(model, toks, 0, end, rid), iid_d, [dst_blocks], lib.EVENT, skip)
    assert res[1] is True, f"retrieve returned {res!r}"
    assert client.end_session(rid) is None
    return iid_s, iid_d




def _p(*values, gap=False):
    return pytest.param(*values, marks=[])


GEOMETRIES = {
    "NHD": ("NHD", {}),                                   # vLLM 0.33 CUDA default (LBNHC)
    "HND": ("HND", {}),
    "HND-bs32": ("HND", dict(bs=32)),                     # vLLM CPU backend (block size 32)
    "NHD-bs64": ("NHD", dict(bs=64, nb=20)),
    "NHD-bs256": ("NHD", dict(bs=256, nb=6)),             # one block per chunk
    "BLNHC": ("BLNHC", {}),                               # cross-layer (blocks-first) views
    "BLHNC-bs32": ("BLHNC", dict(bs=32)),
    "KV5": ("KV5", {}),                                   # [2, NB, BS, NH, HS], segment per layer
    "MLA": ("NHD", dict(nh=1, hs=288)),                   # vLLM 0.33 MLA: [NB, BS, 1, 576]
    "MLA3": ("MLA3", dict(hs=576)),                       # older MLA: [NB, BS, 576]
    "fp16": ("NHD", dict(dtype="float16")),
    "fp32": ("NHD", dict(dtype="float32", nh=4)),
    "fp8": ("NHD", dict(dtype="float8_e4m3fn", nh=8, hs=64)),
    "fp8-HND": ("HND", dict(dtype="float8_e4m3fn", bs=32)),
    "uint8-KV5": ("KV5", dict(dtype="uint8")),
    "many-layers": ("NHD", dict(nl=61, nb=40, nh=1, hs=8)),
}


@pytest.mark.parametrize("geom", [_p(g, gap=g.startswith("BL")) for g in GEOMETRIES])
def test_store_lookup_retrieve(client, make_cache, uniq, geom):
    layout, kw = GEOMETRIES[geom]
    src, dst = make_cache("src", layout, **kw), make_cache("dst", layout, **kw)
    src.fill_random(11)
    dst.fill_sentinel()
    before = dst.snapshot()
    toks = lib.tokens_for(uniq, 600)                          # 2 full chunks + 88 tokens
    bpc = lib.CHUNK // src.bs
    sb = list(range(1, 1 + 2 * bpc))
    db = list(range(src.nb - 1, src.nb - 1 - 2 * bpc, -1))   # descending, disjoint from sb
    _roundtrip(client, src, dst, uniq, toks, 2, sb, db)
    assert lib.compare_blocks(src, sb, dst, db) == []
    untouched = [b for b in range(dst.nb) if b not in db]
    assert lib.unchanged_blocks(dst, before, untouched) == [], "blocks outside the block list were written"


@pytest.mark.parametrize("pair", [_p(p, gap="BL" in p[0] + p[1]) for p in
                                  [("NHD", "HND"), ("HND", "NHD"), ("NHD", "BLNHC"), ("BLHNC", "NHD"), ("HND", "BLHNC")]],
                         ids=lambda p: f"{p[0]}-to-{p[1]}")
def test_cross_layout_same_model(client, make_cache, uniq, pair):
    """Same model registered in two physical layouts: cwm stores a canonical layout, so a chunk
    stored from one is retrieved into the other with the same logical (token, head) values."""
    src, dst = make_cache("src", pair[0]), make_cache("dst", pair[1])
    src.fill_random(12)
    dst.fill_sentinel()
    toks = lib.tokens_for(uniq, 512)
    sb, db = list(range(1, 33)), list(range(32, 64))
    _roundtrip(client, src, dst, uniq, toks, 2, sb, db)
    assert lib.compare_blocks(src, sb, dst, db) == []


@pytest.mark.parametrize("layout,skip_blocks", [_p(lay, n, gap=lay.startswith("BL")) for lay, n in
                                                [("NHD", 3), ("HND", 3), ("BLNHC", 5), ("KV5", 3), ("NHD", 19),
                                                 ("NHD", 0), ("NHD", 32)]])
def test_skip_first_n_tokens(client, make_cache, uniq, layout, skip_blocks):
    src, dst = make_cache("src", layout), make_cache("dst", layout)
    src.fill_random(21)
    dst.fill_sentinel(0x5A)
    before = dst.snapshot()
    toks = lib.tokens_for(uniq, 512)
    sb, db = list(range(1, 33)), list(range(32, 64))
    # vLLM sends skip < chunk (APC hit inside the first chunk); 19 blocks crosses into chunk 2
    _roundtrip(client, src, dst, uniq, toks, 2, sb, db, skip=skip_blocks * BS)
    assert lib.unchanged_blocks(dst, before, db[:skip_blocks]) == [], "skipped blocks were written"
    assert lib.compare_blocks(src, sb[skip_blocks:], dst, db[skip_blocks:]) == []


def test_null_block_never_written_on_retrieve(client, make_cache, uniq):
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(31)
    dst.fill_sentinel(0x33)
    before = dst.snapshot()
    toks = lib.tokens_for(uniq, 256)
    sb = list(range(1, 17))
    db = [0, 0, 0] + list(range(20, 33))  # first 3 positions map to the null block
    _roundtrip(client, src, dst, uniq, toks, 1, sb, db)
    assert lib.unchanged_blocks(dst, before, [0]) == [], "block id 0 (null block) was written"
    assert lib.compare_blocks(src, sb[3:], dst, db[3:]) == []


def test_all_null_chunks_not_stored(client, make_cache, uniq):
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(32)
    iid = lib.new_iid()
    src.register(client, iid, uniq)
    toks = lib.tokens_for(uniq, 768)
    blocks = list(range(1, 17)) + [0] * BPC + list(range(17, 33))        # chunk 1 all null
    assert client.store(lib.mkkey(uniq, toks, 0, 768, "s"), iid, [blocks], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 768, "l1", worker_id=None)) == 1
    # a chunk 0 that is entirely null is not stored either -> no prefix hit at all
    toks2 = lib.tokens_for(uniq + "b", 512)
    assert client.store(lib.mkkey(uniq, toks2, 0, 512, "s2"), iid, [[0] * BPC + list(range(1, 17))],
                        lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks2, 0, 512, "l2", worker_id=None)) == 0
    # storing the missing chunk later makes the whole prefix servable
    assert client.store(lib.mkkey(uniq, toks, 256, 512, "s3"), iid, [list(range(33, 49))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 768, "l3", worker_id=None)) == 3
    dst.fill_sentinel()
    iid_d = lib.new_iid()
    dst.register(client, iid_d, uniq)
    res = client.retrieve(lib.mkkey(uniq, toks, 0, 768, "l3"), iid_d, [list(range(1, 49))], lib.EVENT, 0)
    assert res[1] is True
    assert lib.compare_blocks(src, list(range(1, 17)) + list(range(33, 49)) + list(range(17, 33)),
                              dst, list(range(1, 49))) == []


def test_partial_prefix_and_unaligned_end(client, make_cache, uniq):
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(41)
    dst.fill_sentinel()
    iid_s, iid_d = lib.new_iid(), lib.new_iid()
    src.register(client, iid_s, uniq)
    dst.register(client, iid_d, uniq)
    toks = lib.tokens_for(uniq, 800)
    assert client.store(lib.mkkey(uniq, toks, 0, 768, "s"), iid_s, [list(range(1, 49))], lib.EVENT)[1] is True
    # shares only the first chunk (token 300 differs)
    other = list(toks)
    other[300] = (other[300] + 1) % 128_000
    assert lib.lookup_hits(client, lib.mkkey(uniq, other, 0, 768, "p1", worker_id=None)) == 1
    res = client.retrieve(lib.mkkey(uniq, other, 0, 256, "p1"), iid_d, [list(range(1, 17))], lib.EVENT, 0)
    assert res[1] is True
    assert lib.compare_blocks(src, range(1, 17), dst, range(1, 17)) == []
    # second chunk of the other request is not there -> retrieve fails
    res = client.retrieve(lib.mkkey(uniq, other, 256, 512, "p1"), iid_d, [list(range(17, 33))], lib.EVENT, 0)
    assert res[1] is False
    # unaligned lookup ends floor to whole chunks
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 700, "p2", worker_id=None)) == 2
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 255, "p3", worker_id=None)) == 0
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 800, "p4", worker_id=None)) == 3
    # token list shorter than end: only whole chunks of the tokens count
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks[:530], 0, 768, "p5", worker_id=None)) == 2


def test_incremental_store_then_full_retrieve(client, make_cache, uniq):
    """vLLM stores [0,512) and later [512,1024) of the same request; start>0 stores chain hashes."""
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(51)
    dst.fill_sentinel()
    iid_s, iid_d = lib.new_iid(), lib.new_iid()
    src.register(client, iid_s, uniq)
    dst.register(client, iid_d, uniq)
    toks = lib.tokens_for(uniq, 1100)
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "r"), iid_s, [list(range(1, 33))], lib.EVENT)[1] is True
    assert client.store(lib.mkkey(uniq, toks, 512, 1024, "r"), iid_s, [list(range(33, 64)) + [1]], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 1024, "q", worker_id=None)) == 4
    # retrieve the tail only (APC already has the first 2 chunks)
    res = client.retrieve(lib.mkkey(uniq, toks, 512, 1024, "q"), iid_d, [list(range(2, 34))], lib.EVENT, 0)
    assert res[1] is True
    assert lib.compare_blocks(src, list(range(33, 64)) + [1], dst, list(range(2, 34))) == []
    assert client.free_lookup_locks(lib.mkkey(uniq, toks, 0, 512, "q", worker_id=None), 1) is None


def test_resident_chunk_not_overwritten(client, make_cache, uniq):
    """A key already resident is never overwritten (first write wins); extra block ids are ignored."""
    a, b, dst = make_cache("a"), make_cache("b"), make_cache("dst")
    a.fill_random(61)
    b.fill_random(62)
    dst.fill_sentinel()
    iids = [lib.new_iid() for _ in range(3)]
    for kv, iid in zip((a, b, dst), iids):
        kv.register(client, iid, uniq)
    toks = lib.tokens_for(uniq, 256)
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s1"), iids[0], [list(range(1, 17))], lib.EVENT)[1] is True
    res = client.store(lib.mkkey(uniq, toks, 0, 256, "s2"), iids[1], [list(range(1, 17)) + [40, 41, 42]], lib.EVENT)
    assert res[1] is True, f"storing an already-resident chunk must succeed: {res!r}"
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "l", worker_id=None)) == 1
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 256, "l"), iids[2], [list(range(1, 17)) + [50]], lib.EVENT,
                           0)[1] is True
    assert lib.compare_blocks(a, range(1, 17), dst, range(1, 17)) == []


def test_long_prompt_key(client, make_cache, uniq):
    """128k-token requests: the whole token list travels in every key (~0.5 MB per call)."""
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(71)
    dst.fill_sentinel()
    iid_s, iid_d = lib.new_iid(), lib.new_iid()
    src.register(client, iid_s, uniq)
    dst.register(client, iid_d, uniq)
    toks = lib.tokens_for(uniq, 131_072 + 77)
    n = len(toks) // lib.CHUNK
    # store the first two and the last chunk (the last one is not a prefix hit)
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s"), iid_s, [list(range(1, 33))], lib.EVENT)[1] is True
    assert client.store(lib.mkkey(uniq, toks, (n - 1) * 256, n * 256, "s"), iid_s, [list(range(33, 49))],
                        lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, len(toks), "l", worker_id=None)) == 2
    assert client.retrieve(lib.mkkey(uniq, toks, (n - 1) * 256, n * 256, "l"), iid_d, [list(range(1, 17))],
                           lib.EVENT, 0)[1] is True
    assert lib.compare_blocks(src, range(33, 49), dst, range(1, 17)) == []


def test_token_values_full_u32_range(client, make_cache, uniq):
    """Token ids up to 2^32-1 (msgpack uint32) hash and round-trip; they differ from small ids."""
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(72)
    dst.fill_sentinel()
    iid_s, iid_d = lib.new_iid(), lib.new_iid()
    src.register(client, iid_s, uniq)
    dst.register(client, iid_d, uniq)
    big = tuple((2**32 - 1 - i * 7919) for i in range(256)) + tuple(range(2**31, 2**31 + 256))
    assert client.store(lib.mkkey(uniq, big, 0, 512, "s"), iid_s, [list(range(1, 33))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, big, 0, 512, "l", worker_id=None)) == 2
    low = tuple(t & 0xFFFF for t in big)
    assert lib.lookup_hits(client, lib.mkkey(uniq, low, 0, 512, "l2", worker_id=None)) == 0
    assert client.retrieve(lib.mkkey(uniq, big, 0, 512, "l"), iid_d, [list(range(1, 33))], lib.EVENT, 0)[1] is True
    assert lib.compare_blocks(src, range(1, 33), dst, range(1, 33)) == []


def test_request_configs_and_odd_strings(client, make_cache, uniq):
    """request_configs is opaque (not identity); model/salt strings may be any UTF-8."""
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(73)
    dst.fill_sentinel()
    model = uniq + "/Llama-3.1-8B##lmcache-dcp-layout-v1-d1-interleave1 ümlaut-模型"
    salt = "sälz-🧂-" + "x" * 100
    iid_s, iid_d = lib.new_iid(), lib.new_iid()
    src.register(client, iid_s, model)
    dst.register(client, iid_d, model)
    toks = lib.tokens_for(uniq, 256)

    def k(rid, worker=0, cfg=None):
        key = lib.mkkey(model, toks, 0, 256, rid, worker_id=worker, salt=salt)
        return lib.IPCCacheServerKey(**{**key.__dict__, "request_configs": cfg})

    cfg = {"lmcache.tag.user": "alice", "lmcache.some_flag": True, "nested": {"a": [1, 2.5, None]}}
    assert client.store(k("s", cfg=cfg), iid_s, [list(range(1, 17))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, k("l", worker=None, cfg={"other": 1})) == 1
    assert client.retrieve(k("l"), iid_d, [list(range(1, 17))], lib.EVENT, 0)[1] is True
    assert lib.compare_blocks(src, range(1, 17), dst, range(1, 17)) == []


def test_mla_multiple_readers(client, make_cache, uniq):
    """MLA: one object per chunk (kv world size 1) read by several TP ranks; the lookup takes
    num_kv_readers locks and every rank retrieves the same object."""
    src = make_cache("src", "NHD", nh=1, hs=288)
    dsts = [make_cache(f"dst{i}", "NHD", nh=1, hs=288) for i in range(2)]
    src.fill_random(81)
    iid_s = lib.new_iid()
    src.register(client, iid_s, uniq)
    iids = []
    for d in dsts:
        d.fill_sentinel()
        iids.append(lib.new_iid())
        d.register(client, iids[-1], uniq)
    toks = lib.tokens_for(uniq, 512)
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s"), iid_s, [list(range(1, 33))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "l", worker_id=None, readers=2)) == 2
    for d, iid in zip(dsts, iids):
        res = client.retrieve(lib.mkkey(uniq, toks, 0, 512, "l", readers=2), iid, [list(range(5, 37))], lib.EVENT, 0)
        assert res[1] is True, res
        assert lib.compare_blocks(src, range(1, 33), d, range(5, 37)) == []


def test_instance_id_extremes(client, make_cache, uniq):
    src = make_cache("src")
    src.fill_random(91)
    for iid in (0, 1, 2**63 - 1):
        src.register(client, iid, f"{uniq}-{iid}")
        toks = lib.tokens_for(f"{uniq}-{iid}", 256)
        assert client.store(lib.mkkey(f"{uniq}-{iid}", toks, 0, 256, "s"), iid, [list(range(1, 17))],
                            lib.EVENT)[1] is True
        assert client.ping(iid) is True
        assert client.unregister_kv_cache(iid) is None
