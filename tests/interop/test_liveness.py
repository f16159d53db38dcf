"""Time-based server behaviour, on a dedicated server with short timeouts: lookup read locks lapse
after --lock-ttl-secs; silent workers are reaped after --worker-reap-timeout-secs (once they have
pinged) or --worker-registration-grace-secs (never pinged); activity keeps them registered and
re-registering recovers (the vLLM worker's heartbeat-recovery path, lmcache-mp.md §1.7)."""
import time

import interop_lib as lib

REAP, GRACE, LOCK_TTL = 3, 10, 5
ARGS = ["--lock-ttl-secs", str(LOCK_TTL), "--worker-reap-timeout-secs", str(REAP),
        "--worker-registration-grace-secs", str(GRACE)]


def _registered(c, model, toks, rid):
    """True while some instance of (model, world_size 1) is registered: lookup of a stored chunk
    hits only then (a lookup does not count as worker activity)."""
    return lib.lookup_hits(c, lib.mkkey(model, toks, 0, 256, rid, worker_id=None)) == 1


def _wait_until(pred, limit, what):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {limit}s")


def test_worker_reaping_and_recovery(new_server, make_cache, uniq):
    srv = new_server(args=ARGS)
    c = lib.Client(srv.url)
    try:
        kv = make_cache()
        kv.fill_random(1)
        iid = lib.new_iid()
        kv.register(c, iid, uniq)
        toks = lib.tokens_for(uniq, 256)
        assert c.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [list(range(1, 17))], lib.EVENT)[1] is True
        assert c.ping(iid) is True                              # now "ping-proven": REAP applies
        t0 = time.monotonic()
        # heartbeats keep it registered well past REAP
        while time.monotonic() - t0 < 2.5 * REAP:
            assert c.ping(iid) is True
            time.sleep(REAP / 6)
        assert _registered(c, uniq, toks, "alive"), "a worker that keeps pinging was unregistered"
        # store/retrieve traffic alone counts as activity too
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 2 * REAP:
            n += 1
            assert c.store(lib.mkkey(uniq, toks, 0, 256, f"s{n}"), iid, [list(range(1, 17))], lib.EVENT)[1] is True
            t_silent = time.monotonic()                          # last activity
            time.sleep(REAP / 6)
        # silence: reaped after REAP (plus the server's sweep period)
        t_gone = _wait_until(lambda: not _registered(c, uniq, toks, "probe"), REAP + 15, "reaping a silent worker")
        assert t_gone - t_silent >= REAP * 0.9, f"reaped after {t_gone - t_silent:.1f}s of silence (< {REAP}s)"
        res = c.store(lib.mkkey(uniq, toks, 0, 256, "late"), iid, [list(range(1, 17))], lib.EVENT)
        assert res == (b"", False), f"store for a reaped instance: {res!r}"
        # recovery: the worker re-registers with the same id; the stored objects are still there
        kv.register(c, iid, uniq)
        assert _registered(c, uniq, toks, "back")
        assert c.store(lib.mkkey(uniq, toks, 0, 256, "again"), iid, [list(range(1, 17))], lib.EVENT)[1] is True
    finally:
        c.close()


def test_registration_grace_without_ping(new_server, make_cache, uniq):
    srv = new_server(args=ARGS)
    c = lib.Client(srv.url)
    try:
        kv = make_cache()
        kv.fill_random(2)
        iid = lib.new_iid()
        kv.register(c, iid, uniq)
        toks = lib.tokens_for(uniq, 256)
        # store counts as activity: measure the grace from here
        assert c.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [list(range(1, 17))], lib.EVENT)[1] is True
        t_last = time.monotonic()
        time.sleep(REAP + 2)                                     # past REAP, well before GRACE
        assert time.monotonic() - t_last < GRACE - 1
        assert _registered(c, uniq, toks, "early"), \
            f"a worker that never pinged was reaped after {time.monotonic() - t_last:.1f}s (< grace {GRACE}s)"
        t_gone = _wait_until(lambda: not _registered(c, uniq, toks, "probe"), GRACE + 15, "reaping after the grace")
        assert t_gone - t_last >= GRACE * 0.9, f"reaped after {t_gone - t_last:.1f}s (< grace {GRACE}s)"
    finally:
        c.close()


def test_lookup_locks_lapse(new_server, make_cache, uniq):
    """A lookup's read lock that is never released lapses after --lock-ttl-secs, so the object
    becomes evictable again (128 MiB L1, 32 MiB chunks)."""
    srv = new_server(l1_size_gb="0.125", args=ARGS)
    c = lib.Client(srv.url, timeout=max(lib.RPC_TIMEOUT, 30))
    try:
        geom = dict(nl=32, nb=17, bs=16, nh=8, hs=128)            # 32 MiB per chunk
        src = make_cache("src", **geom)
        src.fill_random(3)
        iid = lib.new_iid()
        src.register(c, iid, uniq)
        blocks = list(range(1, 17))
        leaked = lib.tokens_for(uniq + "-leaked", 256)
        assert c.store(lib.mkkey(uniq, leaked, 0, 256, "s"), iid, [blocks], lib.EVENT)[1] is True
        assert lib.lookup_hits(c, lib.mkkey(uniq, leaked, 0, 256, "leak", worker_id=None)) == 1   # never released
        t_lock = time.monotonic()
        # while the lock holds, the object survives a flood
        for i in range(8):
            toks = lib.tokens_for(f"{uniq}-a{i}", 256)
            assert c.store(lib.mkkey(uniq, toks, 0, 256, f"a{i}"), iid, [blocks], lib.EVENT)[1] is True
        hit = lib.lookup_hits(c, lib.mkkey(uniq, leaked, 0, 256, "check", worker_id=None))
        if time.monotonic() - t_lock < LOCK_TTL - 1:            # (a slow machine may outlast the TTL)
            assert hit == 1, "a locked object was evicted before its lock's TTL"
        assert c.free_lookup_locks(lib.mkkey(uniq, leaked, 0, 256, "check", worker_id=None), 1) is None
        time.sleep(max(0.0, LOCK_TTL + 1.5 - (time.monotonic() - t_lock)))
        for i in range(8):
            toks = lib.tokens_for(f"{uniq}-b{i}", 256)
            assert c.store(lib.mkkey(uniq, toks, 0, 256, f"b{i}"), iid, [blocks], lib.EVENT)[1] is True
        assert lib.lookup_hits(c, lib.mkkey(uniq, leaked, 0, 256, "after", worker_id=None)) == 0, \
            f"a read lock that was never released still pins the object {LOCK_TTL}s+ after its TTL"
    finally:
        c.close()
