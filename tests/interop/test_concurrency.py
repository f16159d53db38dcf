"""Several real clients (as several vLLM workers/schedulers would be) in parallel threads."""
import interop_lib as lib

N_CLIENTS = 4
ROUNDS = 6


def test_four_concurrent_clients(server, make_cache, uniq):
    caches = [(make_cache(f"s{i}"), make_cache(f"d{i}")) for i in range(N_CLIENTS)]

    def worker(i):
        def run():
            c = lib.Client(server.url)
            try:
                src, dst = caches[i]
                model = f"{uniq}-shared-model"             # same model for all: isolation by salt/tokens
                salt = f"tenant-{i}"
                iid_s, iid_d = lib.new_iid(), lib.new_iid()
                src.register(c, iid_s, model)
                dst.register(c, iid_d, model)
                for r in range(ROUNDS):
                    src.fill_random(1000 * i + r)
                    dst.fill_sentinel(r)
                    toks = lib.tokens_for(f"{uniq}-{i}-{r}", 256 + 150 * r)
                    n = len(toks) // lib.CHUNK
                    blocks = list(range(1 + r, 1 + r + 16 * n))
                    key = lib.mkkey(model, toks, 0, n * lib.CHUNK, f"c{i}r{r}", salt=salt)
                    res = c.store(key, iid_s, [blocks], lib.EVENT)
                    assert res[1] is True, f"client {i} round {r}: store {res!r}"
                    # pipelined: several lookups in flight, then the status queries
                    lk = lib.mkkey(model, toks, 0, n * lib.CHUNK, f"c{i}r{r}", worker_id=None, salt=salt)
                    other = lib.mkkey(model, toks, 0, n * lib.CHUNK, f"c{i}r{r}x", worker_id=None,
                                      salt=f"tenant-{(i + 1) % N_CLIENTS}")
                    futs = [c.submit.lookup(lk, 1), c.submit.lookup(other, 1), c.submit.ping(iid_s)]
                    for f in futs:
                        lib.wait(f, f"client {i} round {r}: lookup/ping")
                    assert lib.lookup_hits(c, lk) == n, f"client {i} round {r}"
                    assert lib.lookup_hits(c, other) == 0, f"client {i} round {r}: salt leak"
                    dblocks = list(range(63 - 16 * n, 63))
                    res = c.retrieve(key, iid_d, [dblocks], lib.EVENT, 0)
                    assert res[1] is True, f"client {i} round {r}: retrieve {res!r}"
                    bad = lib.compare_blocks(src, blocks, dst, dblocks)
                    assert bad == [], f"client {i} round {r}: mismatches {bad[:5]}"
                    assert c.end_session(key.request_id) is None
                assert c.unregister_kv_cache(iid_s) is None
                assert c.unregister_kv_cache(iid_d) is None
            finally:
                c.close()
        return run

    lib.run_threads([worker(i) for i in range(N_CLIENTS)], timeout=180)


def test_racing_stores_of_same_chunks(server, make_cache, uniq):
    """Four workers store the SAME chunks at once from caches holding different bytes: every chunk
    read back must equal exactly one writer's bytes (no torn / mixed objects)."""
    srcs = [make_cache(f"s{i}") for i in range(N_CLIENTS)]
    dst = make_cache("dst")
    for i, s in enumerate(srcs):
        s.fill_random(500 + i)
    toks = lib.tokens_for(uniq, 1024)
    blocks = list(range(1, 64))                       # 63 blocks: 3 full chunks + 15 extra ids
    results = []

    def writer(i):
        def run():
            c = lib.Client(server.url)
            try:
                iid = lib.new_iid()
                srcs[i].register(c, iid, uniq)
                for r in range(5):
                    res = c.store(lib.mkkey(uniq, toks, 0, 768, f"w{i}-{r}"), iid, [blocks], lib.EVENT)
                    results.append(res)
            finally:
                c.close()
        return run

    lib.run_threads([writer(i) for i in range(N_CLIENTS)], timeout=120)
    assert all(r[1] is True for r in results), results
    c = lib.Client(server.url)
    try:
        iid = lib.new_iid()
        dst.register(c, iid, uniq)
        dst.fill_sentinel()
        assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 768, "read", worker_id=None)) == 3
        assert c.retrieve(lib.mkkey(uniq, toks, 0, 768, "read"), iid, [blocks[:48]], lib.EVENT, 0)[1] is True
        for k in range(3):
            chunk = blocks[16 * k:16 * (k + 1)]
            owners = [i for i, s in enumerate(srcs) if lib.compare_blocks(s, chunk, dst, chunk) == []]
            assert len(owners) == 1, f"chunk {k} equals no single writer's bytes (torn/mixed object)"
    finally:
        c.close()


def test_lookup_retrieve_while_storing(server, make_cache, uniq):
    """A reader polling lookups while a writer stores chunk after chunk must never retrieve a
    half-written object: every hit it retrieves is byte-identical to the source."""
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(600)
    toks = lib.tokens_for(uniq, 16 * 256)
    n = 16
    done = []

    def writer():
        c = lib.Client(server.url)
        try:
            iid = lib.new_iid()
            src.register(c, iid, uniq)
            for k in range(n):
                # chunk k of the request comes from src blocks 1..16 rotated by k: distinct content
                blocks = [1 + (j + k) % 48 for j in range(16)]
                assert c.store(lib.mkkey(uniq, toks, 256 * k, 256 * (k + 1), "w"), iid, [blocks], lib.EVENT)[1]
        finally:
            done.append(True)
            c.close()

    def reader():
        c = lib.Client(server.url)
        try:
            iid = lib.new_iid()
            dst.register(c, iid, uniq)
            seen = stalls = r = 0
            while seen < n:
                r += 1
                hits = lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 256 * n, f"r{r}", worker_id=None))
                assert hits >= seen, f"hits went backwards: {seen} -> {hits}"
                if hits > seen:
                    k = hits - 1                                 # newest visible chunk
                    dst.fill_sentinel(r % 256)
                    res = c.retrieve(lib.mkkey(uniq, toks, 256 * k, 256 * (k + 1), f"r{r}"), iid,
                                     [list(range(1, 17))], lib.EVENT, 0)
                    assert res[1] is True, res
                    want = [1 + (j + k) % 48 for j in range(16)]
                    assert lib.compare_blocks(src, want, dst, list(range(1, 17))) == [], f"chunk {k} torn"
                    seen = hits
                c.end_session(f"r{r}")
                if done and hits < n:
                    stalls += 1
                    assert stalls < 20, f"writer finished but only {hits} of {n} chunks are visible"
        finally:
            c.close()

    lib.run_threads([writer, reader], timeout=120)


def test_per_client_transfer_order(client, make_cache, uniq):
    """store/retrieve of one client are processed in submission order (lmcache-mp.md §1.5): a store
    pipelined right after a retrieve into the same blocks stores the retrieved bytes."""
    src, mid, dst = make_cache("src"), make_cache("mid"), make_cache("dst")
    src.fill_random(700)
    mid.fill_random(701)                                         # different garbage to start with
    dst.fill_sentinel()
    iids = [lib.new_iid() for _ in range(3)]
    for kv, iid in zip((src, mid, dst), iids):
        kv.register(client, iid, uniq)
    n = 6
    toks = [lib.tokens_for(f"{uniq}-{i}", 256) for i in range(n)]
    toks2 = [lib.tokens_for(f"{uniq}-copy-{i}", 256) for i in range(n)]
    for i in range(n):
        assert client.store(lib.mkkey(uniq, toks[i], 0, 256, f"s{i}"), iids[0], [list(range(1, 17))],
                            lib.EVENT)[1] is True
        assert lib.lookup_hits(client, lib.mkkey(uniq, toks[i], 0, 256, f"l{i}", worker_id=None)) == 1
    futs = []
    for i in range(n):            # no waiting in between: retrieve into mid, then store the same mid blocks
        blocks = list(range(1 + 2 * i, 17 + 2 * i))              # overlaps the previous round's blocks
        futs.append(client.submit.retrieve(lib.mkkey(uniq, toks[i], 0, 256, f"l{i}"), iids[1], [blocks], lib.EVENT, 0))
        futs.append(client.submit.store(lib.mkkey(uniq, toks2[i], 0, 256, f"c{i}"), iids[1], [blocks], lib.EVENT))
    results = [lib.wait(f, "pipelined retrieve/store") for f in futs]
    assert all(r[1] is True for r in results), results
    # in submission order, every copy holds exactly the bytes its retrieve wrote (= src blocks 1..16)
    for i in range(n):
        dst.fill_sentinel()
        assert lib.lookup_hits(client, lib.mkkey(uniq, toks2[i], 0, 256, f"chk{i}", worker_id=None)) == 1
        assert client.retrieve(lib.mkkey(uniq, toks2[i], 0, 256, f"chk{i}"), iids[2], [list(range(1, 17))],
                               lib.EVENT, 0)[1] is True
        assert lib.compare_blocks(src, range(1, 17), dst, range(1, 17)) == [], \
            f"round {i}: a store submitted after a retrieve into the same blocks did not see exactly its bytes"
