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
