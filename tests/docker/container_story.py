"""The container story, from the host, with LMCache 0.5.6's real client (tests/interop's harness).

    container_story.py STEP ARGS...      (run by tests/docker/run.sh, as the container's uid)

Steps (each prints one line, exits non-zero with the reason on failure):
  store URL MODEL SEED    register a KV cache in /dev/shm filled from SEED, store 4 chunks
                          (salt alice), look them up and retrieve them into a second cache byte
                          for byte
  hit URL MODEL SEED      a lookup on this server hits all 4 chunks (waiting up to 20 s for L3
                          write-behind), a retrieve gives the bytes `store` stored (the same
                          SEED), and salt bob sees nothing

Runs as the uid cwm runs as in its container: cwm opens the engine's shm segments, which
Python creates with mode 0600, so engine and cwm share a uid (docker/README.md).
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "interop"))

import interop_lib as lib  # noqa: E402
from multiprocessing import resource_tracker  # noqa: E402

# Python's shared-memory resource tracker is a child process that exits at once when run under
# another uid from a root-owned interpreter install; every segment here is unlinked explicitly
# (KVCache.close), so do without it.
resource_tracker.register = resource_tracker.unregister = lambda *args, **kwargs: None

CHUNKS = 4
BLOCKS = list(range(1, 1 + CHUNKS * lib.CHUNK // 16))     # block 0 is vLLM's null block


def cache(tag: str) -> "lib.KVCache":
    return lib.KVCache(tag, layout="NHD", nl=4, nb=len(BLOCKS) + 1, bs=16, nh=2, hs=32)


def key(model, toks, rid, salt="alice", worker_id=0):
    return lib.mkkey(model, toks, 0, CHUNKS * lib.CHUNK, rid, worker_id=worker_id, salt=salt)


def store(url, model, seed):
    c = lib.Client(url)
    try:
        assert c.ping(None) is True, "ping did not answer True"
        src, dst = cache("src"), cache("dst")
        src.fill_random(sum(seed.encode()))
        dst.fill_sentinel()
        iid_s, iid_d = lib.new_iid(), lib.new_iid()
        src.register(c, iid_s, model)
        dst.register(c, iid_d, model)
        toks = lib.tokens_for(seed, CHUNKS * lib.CHUNK)
        ok = c.store(key(model, toks, "store"), iid_s, [BLOCKS], lib.EVENT)
        assert ok[1] is True, f"store returned {ok!r}"
        hits = lib.lookup_hits(c, key(model, toks, "load", worker_id=None))
        assert hits == CHUNKS, f"lookup hit {hits} of {CHUNKS} chunks"
        ok = c.retrieve(key(model, toks, "load"), iid_d, [BLOCKS], lib.EVENT, 0)
        assert ok[1] is True, f"retrieve returned {ok!r}"
        bad = lib.compare_blocks(src, BLOCKS, dst, BLOCKS)
        assert not bad, f"retrieved bytes differ: {bad[:3]}"
        c.unregister_kv_cache(iid_s)
        c.unregister_kv_cache(iid_d)
        src.close()
        dst.close()
        print(f"stored {CHUNKS} chunks, looked up and retrieved byte for byte")
    finally:
        c.close()


def hit(url, model, seed):
    c = lib.Client(url)
    try:
        src = cache("src2")                      # the bytes `store` stored: the same seed
        src.fill_random(sum(seed.encode()))
        dst = cache("dst2")
        dst.fill_sentinel()
        iid = lib.new_iid()
        dst.register(c, iid, model)
        toks = lib.tokens_for(seed, CHUNKS * lib.CHUNK)
        deadline, n = time.time() + 20, 0
        while (hits := lib.lookup_hits(c, key(model, toks, f"q{n}", worker_id=None))) < CHUNKS:
            assert time.time() < deadline, f"lookup hit {hits} of {CHUNKS} chunks"
            n += 1
            time.sleep(0.2)
        ok = c.retrieve(key(model, toks, f"q{n}"), iid, [BLOCKS], lib.EVENT, 0)
        assert ok[1] is True, f"retrieve returned {ok!r}"
        bad = lib.compare_blocks(src, BLOCKS, dst, BLOCKS)
        assert not bad, f"retrieved bytes differ: {bad[:3]}"
        other = lib.lookup_hits(c, key(model, toks, "bob", salt="bob", worker_id=None))
        assert other == 0, f"salt bob hit {other} chunks"
        c.unregister_kv_cache(iid)
        src.close()
        dst.close()
        print(f"hit {CHUNKS} of {CHUNKS} chunks, retrieved byte for byte; salt bob: 0")
    finally:
        c.close()


def main() -> int:
    step, args = sys.argv[1], sys.argv[2:]
    try:
        if step == "store":
            store(*args)
        elif step == "hit":
            hit(*args)
        else:
            raise SystemExit(f"unknown step {step!r}")
    except AssertionError as e:
        print(f"FAILED {step}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
