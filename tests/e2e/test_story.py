"""The story table of the e2e suite (story.py), checked without vLLM: every bit-for-bit pair the
suite compares has equal KV histories, and the check catches a pair that does not.

    tests/e2e/.venv/bin/python -m pytest -c tests/e2e/pytest.ini tests/e2e/test_story.py
"""
import pytest

import story as S

TAMPER = S.tamper_steps("pool")
WITH_DISK = [("A", S.STEPS_A), ("B", S.STEPS_B), ("C", S.STEPS_C + TAMPER)]
WITHOUT_DISK = [("A", S.STEPS_A), ("B", S.STEPS_B + TAMPER)]


@pytest.mark.parametrize("engines", [WITH_DISK, WITHOUT_DISK], ids=["disk", "no-disk"])
def test_every_bit_exact_pair_has_equal_histories(engines):
    requests = S.simulate(engines)
    names = {e for e, _ in engines}
    pairs = [p for p in S.BIT_EXACT if p[0] in names and p[2] in names]
    assert pairs, "no bit-exact pair checked"
    bad = S.check_bit_exact(requests, pairs)
    assert not bad, "\n".join(bad)


def test_the_model_predicts_the_hits_the_suite_asserts():
    """The hit counts e2e_vllm.py asserts from vLLM's counters, as the model derives them."""
    r = S.simulate(WITH_DISK)
    want = {("A", "cold"): (0, 0), ("A", "warm"): (S.FULL, 0), ("A", "bob"): (0, 0),
            ("A", "own"): (0, S.FULL), ("A", "qsplit"): (0, S.SHARED_FULL),
            ("A", "qsplitown"): (0, S.FULL), ("A", "partial"): (S.SHARED_FULL, 0),
            ("A", "qwarm"): (S.FULL, 0), ("A", "first"): (0, 0), ("B", "P"): (S.FULL, 0),
            ("B", "Q"): (S.FULL, 0), ("B", "carol"): (0, 0), ("C", "P"): (S.FULL, 0),
            ("C", "tampered"): (S.FULL, 0)}
    got = {k: (r[k]["external_hits"], r[k]["own_hits"]) for k in want}
    assert got == want


def test_qwarm_against_a_whole_prefill_reference_is_refused():
    """Issue 19: the suite once compared qwarm with Q from vLLM's pool filled by a whole prefill
    of Q; qwarm's tokens 512..1023 were computed after a 512-token hit. Those histories differ,
    and the check says so (and names where each side's KV came from)."""
    old_tail = [S.gen("qownfill", "Q", "qown"), S.gen("qown", "Q", "qown")]
    requests = S.simulate([("A", S.STEPS_A + [S.RESET] + old_tail)])
    bad = S.check_bit_exact(requests, [("A", "qwarm", "A", "qown")])
    assert len(bad) == 1 and "histories differ" in bad[0], bad
    assert "A:partial" in bad[0] and "A:qownfill" in bad[0], bad[0]


def test_tampered_kv_has_another_history():
    requests = S.simulate(WITH_DISK)
    assert S.check_bit_exact(requests, [("C", "tampered", "A", "own")])
    assert not S.check_bit_exact(requests, [("C", "P", "A", "own")])


def test_a_pair_not_in_the_story_is_reported():
    requests = S.simulate(WITHOUT_DISK)
    bad = S.check_bit_exact(requests, [("C", "P", "A", "own")])
    assert bad and "not in the story" in bad[0]
