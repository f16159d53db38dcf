"""LMCache's `POST /cache/checksums`, as `lmcache bench server` uses it: the REAL client stores
blocks of one registered cache and retrieves them into another, then the REAL bench helper
(`server_bench.helpers._query_checksum`) asks cwm for the digests of both block ranges. They must
equal each other and the digests computed here with numpy + hashlib the way LMCache 0.5.6's
server does (`http_apis/cache_api.py::_compute_block_checksums`: the tensor view indexed by the
block ids along its block axis, `chunk_size` blocks per chunk, contiguous row-major bytes,
bfloat16 widened to float32, every layer into one MD5 per chunk, or one per layer with
`layerwise`). `block_id_ranges` is checked against the real `compress_slot_mapping`."""
import hashlib
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

import interop_lib as lib
from lmcache.cli.commands.bench.server_bench.helpers import _query_checksum
from lmcache.utils import compress_slot_mapping

pytestmark = pytest.mark.skipif(lib.TARGET == "mock", reason="the mock server has no HTTP port")

# layout -> (KVCache kwargs, block axis). LMCache 0.5.6 checksums the rank-5 and rank-3 formats;
# it answers 501 for the rank-4 fused ones, which cwm hashes the same way on axis 0.
GEOMETRIES = {
    "KV5": ("KV5", {}, 1),                              # lmcache bench: [2, NB, BS, NH, HS]
    "KV5-fp16": ("KV5", dict(dtype="float16"), 1),
    "MLA3": ("MLA3", dict(hs=576), 0),                  # [NB, BS, HS]
    "NHD": ("NHD", {}, 0),                              # [NB, BS, NH, 2*HS] (cwm only)
    "HND-fp32": ("HND", dict(dtype="float32", bs=32), 0),
    "BLHNC": ("BLHNC", dict(bs=32), 0),                 # blocks-first head-major views
}


def lmcache_digests(cache: lib.KVCache, axis: int, block_ids, chunk: int, layerwise: bool):
    """LMCache's algorithm over the engine's memory (the numpy views share the shm buffers)."""
    layers = []
    for v in cache.views:
        g = np.take(v, block_ids, axis=axis)          # index_select: a contiguous copy
        if cache.dtype == "bfloat16":
            g = g.astype(np.uint32) << 16             # .to(torch.float32), bit for bit
        layers.append(g)
    n = len(block_ids)
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]

    def part(g, s, e):
        return np.ascontiguousarray(np.take(g, range(s, e), axis=axis)).tobytes()

    if layerwise:
        return {f"layer_{i}": [hashlib.md5(part(g, s, e)).hexdigest() for s, e in spans]
                for i, g in enumerate(layers)}
    out = []
    for s, e in spans:
        h = hashlib.md5()
        for g in layers:
            h.update(part(g, s, e))
        out.append(h.hexdigest())
    return out


def post(http: str, body) -> tuple[int, dict]:
    req = urllib.request.Request(f"{http}/cache/checksums", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def http_server(new_server):
    port = lib.free_port()
    srv = new_server(args=["--http-port", str(port)])
    c = lib.Client(srv.url)
    yield c, f"http://127.0.0.1:{port}"
    c.close()


@pytest.mark.parametrize("geom", list(GEOMETRIES))
def test_checksums_match_lmcache_after_roundtrip(http_server, make_cache, uniq, geom):
    c, http = http_server
    layout, kw, axis = GEOMETRIES[geom]
    src, dst = make_cache("src", layout, **kw), make_cache("dst", layout, **kw)
    src.fill_random(21)
    dst.fill_sentinel()
    iid_s, iid_d = lib.new_iid(), lib.new_iid()
    src.register(c, iid_s, uniq)
    dst.register(c, iid_d, uniq)
    bpc = lib.CHUNK // src.bs
    n = 2 * bpc
    toks = lib.tokens_for(uniq, 2 * lib.CHUNK)
    sb, db = list(range(1, 1 + n)), list(range(src.nb - n, src.nb))
    assert c.store(lib.mkkey(uniq, toks, 0, 2 * lib.CHUNK, "ck-store"), iid_s, [sb], lib.EVENT)[1] is True
    assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 2 * lib.CHUNK, "ck-load", worker_id=None)) == 2
    assert c.retrieve(lib.mkkey(uniq, toks, 0, 2 * lib.CHUNK, "ck-load"), iid_d, [db], lib.EVENT, 0)[1] is True

    # The bench's own query: block_offset/num_blocks/block_size/token chunk size.
    got_src = _query_checksum(http, sb[0], n, src.bs, lib.CHUNK, instance_id=iid_s)
    got_dst = _query_checksum(http, db[0], n, src.bs, lib.CHUNK, instance_id=iid_d)
    want = lmcache_digests(src, axis, sb, bpc, False)
    assert got_src == want
    assert got_dst == want, "the retrieve wrote back what was stored"
    assert lmcache_digests(dst, axis, db, bpc, False) == want

    ids = [5, 3, 4, 9, 1, 2]
    status, r = post(http, {"block_ids": ids, "chunk_size": 4, "instance_id": iid_s, "layerwise": True})
    assert status == 200, r
    assert r["status"] == "success" and r["layerwise"] is True and r["num_chunks"] == 2 and r["chunk_size"] == 4
    assert r["block_id_ranges"] == compress_slot_mapping(ids)
    assert r["chunk_checksums"] == lmcache_digests(src, axis, ids, 4, True)


def test_checksum_errors(http_server, make_cache, uniq):
    c, http = http_server
    kv = make_cache("kv", "KV5")
    iid = lib.new_iid()
    kv.register(c, iid, uniq)
    for body, code, detail in [
        ({"block_ids": [1], "chunk_size": 1, "instance_id": iid + 1}, 404, f"instance_id {iid + 1} not registered"),
        ({"block_ids": [], "chunk_size": 1, "instance_id": iid}, 400, "block_ids is required"),
        ({"block_ids": [1], "chunk_size": 0, "instance_id": iid}, 400, "chunk_size must be positive"),
        ({"block_ids": [1, kv.nb], "chunk_size": 1, "instance_id": iid}, 400, "out of range"),
    ]:
        status, r = post(http, body)
        assert (status, detail in r.get("detail", "")) == (code, True), (body, status, r)
    # The bench helper treats a refusal as "no checksum", not as a crash.
    assert _query_checksum(http, 0, 16, 16, 256, instance_id=iid + 1) is None
