"""The e2e story as data: its prompts, each engine's steps, and the KV history of every request.

No vLLM here (plain Python): e2e_vllm.py runs the story, test_story.py checks the table.

Why histories. vLLM's CPU kernels are not invariant to how a prompt's prefill is split: the KV
of tokens 512..1023 computed after a 512-token hit rounds differently from the same tokens
computed in one whole prefill, and whether the two agree bit for bit depends on the CPU (equal on
a Xeon with AMX, 0.045 apart in a logprob on an AMD EPYC Zen 5; issue 19). So two outputs may be
compared bit for bit only when every byte of KV behind them came from identical computations. This
module simulates the story — vLLM's own prefix cache per engine, cwm's store, which blocks each
request takes from where and which it computes — and gives every request a history: the
computation that produced its output, and recursively the computations that produced the KV it
was served. Two requests with equal histories ran the very same arithmetic; anything else is a
tolerance comparison.

The model of a request (prompt X of L tokens, salt s), as vLLM 0.32 + LMCache's connector behave:
  own   = the longest run of X's full 32-token blocks in vLLM's own pool under s, at most
          (L - 1) // 32 blocks (vLLM always computes the last token)
  cwm   = the longest run of X's full 256-token chunks cwm holds under s
  hit h = max(own, cwm) tokens; vLLM counts max(0, cwm - own) as external hits
  then tokens h..L are computed in one prefill; afterwards vLLM caches X's full blocks in its
  own pool and the connector stores X's full chunks in cwm (a key already present keeps its
  first bytes, in both).
e2e_vllm.py checks these predicted hit counts against vLLM's own counters for every request, so
the model cannot drift from what the engine really did.
"""
import hashlib
import random

import make_model

CHUNK = 256
BLOCK = 32                                    # vLLM block size (vllm_engine.py)
PROMPT_LEN = 1040                             # 4 full chunks + 16 tokens, 16 < BLOCK
SHARED = 600                                  # tokens Q shares with P
FULL = PROMPT_LEN // CHUNK * CHUNK            # 1024: every full chunk of P
SHARED_FULL = SHARED // CHUNK * CHUNK         # 512
MAX_TOKENS = 8


def prompts():
    r = random.Random(20261124)
    vocab = make_model.PRESETS["tiny"]["vocab_size"]
    p = [r.randrange(3, vocab) for _ in range(PROMPT_LEN)]
    q = p[:SHARED] + [r.randrange(3, vocab) for _ in range(PROMPT_LEN - SHARED)]
    assert q[SHARED] != p[SHARED] or q[SHARED + 1] != p[SHARED + 1]
    # R shares exactly Q's first 2 chunks (512 tokens), for a reference computed with vLLM's own
    # prefix cache supplying those 512 tokens: the same prefill split as the partial hit.
    r_ = q[:SHARED_FULL] + [r.randrange(3, vocab) for _ in range(PROMPT_LEN - SHARED_FULL)]
    assert r_[SHARED_FULL] != q[SHARED_FULL]
    p2 = [(p[0] + 1) % vocab or 3] + p[1:]
    return {"P": p, "Q": q, "R": r_, "P2": p2}


def gen(name, prompt, salt):
    return {"op": "generate", "name": name, "prompt": prompt, "salt": salt,
            "max_tokens": MAX_TOKENS}


RESET = {"op": "reset"}
# kv_poison fills every block of vLLM's KV cache with a pattern (after a reset, when no request
# holds one), kv_digest records a digest of every block that holds anything else: the byte check
# of an external hit (the blocks cwm wrote equal the blocks vLLM computed), which no rounding
# can move.
POISON = {"op": "kv_poison"}


def digest(name):
    return {"op": "kv_digest", "name": name}


STEPS_A = [gen("cold", "P", "alice"), digest("kv_cold"), RESET, POISON,
           gen("warm", "P", "alice"), digest("kv_warm"), RESET,
           gen("bob", "P", "bob"), RESET,
           gen("ownfill", "P", "own"),           # no reset: leaves P's blocks in vLLM's pool
           gen("own", "P", "own"), RESET,        # 1024 tokens from vLLM's own pool
           gen("qref", "Q", "qref"), RESET,
           gen("rsplit", "R", "split"),          # no reset: leaves R's blocks in vLLM's pool
           gen("qsplit", "Q", "split"),          # 512 from vLLM's own pool; no reset after
           gen("qsplitown", "Q", "split"), RESET,  # 1024 from vLLM's own pool, 512.. by qsplit
           gen("partial", "Q", "alice"), RESET,  # 512 tokens from cwm (P's chunks)
           gen("qwarm", "Q", "alice"), RESET,    # 1024 from cwm (the last 2 stored by partial)
           gen("first", "P2", "alice")]
STEPS_B = [POISON, gen("P", "P", "alice"), digest("kv_P"), RESET,
           gen("Q", "Q", "alice"), RESET,
           gen("carol", "P", "carol")]
STEPS_C = [gen("P", "P", "alice")]


def tamper_steps(shm_name):
    """The sensitivity check, appended to the last engine: flip a bit of every bf16 value cwm
    holds in L1, then ask for P again (its KV digest must then match none of cold's blocks)."""
    return [{"op": "tamper", "shm": shm_name}, RESET, POISON,
            gen("tampered", "P", "alice"), digest("kv_tampered")]


# Every bit-for-bit comparison the suite makes: (engine, step) pairs whose histories must be
# equal. test_story.py fails if one is added whose histories differ; e2e_vllm.py's
# assert_same_output refuses a pair that is not listed here.
BIT_EXACT = {
    ("A", "warm", "A", "own"): "1024 from cwm (stored by cold) vs from vLLM's pool (ownfill)",
    ("A", "bob", "A", "cold"): "two whole prefills of P",
    ("A", "partial", "A", "qsplit"): "Q after a 512-token hit of P's/R's whole-prefill KV",
    ("A", "qwarm", "A", "qsplitown"): "Q after 1024: 0..511 whole prefill, 512.. after 512 hit",
    ("B", "P", "A", "own"): "another engine process, P from cwm vs A's own pool",
    ("B", "Q", "A", "qwarm"): "another engine process, Q from cwm, same chunks",
    ("B", "carol", "A", "cold"): "another engine process, whole prefills of P",
    ("C", "P", "A", "own"): "after cwm's restart, P from disk vs A's own pool",
}


def _h(*parts) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


class Simulation:
    """vLLM's own pools (per engine) and cwm's store, step by step. Each stored block's value is
    (history id, the request that computed it)."""

    def __init__(self, prompts_: dict):
        self.prompts = prompts_
        self.cwm = {}            # (salt, prefix digest of a chunk) -> [block values]
        self.own = {}            # (salt, prefix digest of a block) -> block value
        self.requests = {}       # (engine, name) -> request record

    def _prefix(self, x, end):
        return _h(tuple(x[:end]))

    def new_engine(self):
        self.own = {}

    def step(self, engine: str, st: dict):
        op = st["op"]
        if op == "reset":
            self.own = {}
        elif op == "tamper":     # every byte cwm holds changes: nothing served after is as stored
            self.cwm = {k: [(_h("tampered", h), f"tampered {who}") for h, who in v]
                        for k, v in self.cwm.items()}
        elif op == "generate":
            self._generate(engine, st)

    def _generate(self, engine, st):
        x, salt = self.prompts[st["prompt"]], st["salt"]
        n = len(x)
        blocks = []                                  # (history id, computed by) per block
        while (len(blocks) < (n - 1) // BLOCK and
               (salt, self._prefix(x, (len(blocks) + 1) * BLOCK)) in self.own):
            blocks.append(self.own[(salt, self._prefix(x, (len(blocks) + 1) * BLOCK))])
        own = len(blocks) * BLOCK
        chunks = []
        while (len(chunks) + 1) * CHUNK <= n - 1 and \
                (salt, self._prefix(x, (len(chunks) + 1) * CHUNK)) in self.cwm:
            chunks.append(self.cwm[(salt, self._prefix(x, (len(chunks) + 1) * CHUNK))])
        from_cwm = len(chunks) * CHUNK
        hit = max(own, from_cwm)
        if from_cwm > own:
            blocks += [b for c in chunks for b in c][own // BLOCK:]
        me = f"{engine}:{st['name']}"
        served = tuple(h for h, _ in blocks)
        # The output, and every block this request computes, depend on the tokens, the split
        # (hit, n) and the history of the served blocks.
        history = _h("out", tuple(x), hit, n, served)
        for k in range(hit // BLOCK, n // BLOCK):
            blocks.append((_h("kv", self._prefix(x, (k + 1) * BLOCK), hit, n, served), me))
        for k in range(n // BLOCK):
            self.own.setdefault((salt, self._prefix(x, (k + 1) * BLOCK)), blocks[k])
        for c in range(n // CHUNK):
            per = CHUNK // BLOCK
            self.cwm.setdefault((salt, self._prefix(x, (c + 1) * CHUNK)),
                                blocks[c * per:(c + 1) * per])
        self.requests[(engine, st["name"])] = {
            "own_hits": own, "external_hits": max(0, from_cwm - own), "hit": hit,
            "history": history, "kv_from": _runs(blocks[:hit // BLOCK]),
            "computed": [hit, n]}


def _runs(blocks):
    """[[start token, end token, who computed them], ...] for a list of served blocks."""
    out = []
    for i, (_, who) in enumerate(blocks):
        if out and out[-1][2] == who and out[-1][1] == i * BLOCK:
            out[-1][1] = (i + 1) * BLOCK
        else:
            out.append([i * BLOCK, (i + 1) * BLOCK, who])
    return out


def simulate(engines, prompts_=None) -> dict:
    """engines: [(name, steps)] in the order they run against one cwm (whose store survives a
    restart on its disk tier). Returns {(engine, step name): request record}."""
    sim = Simulation(prompts_ or prompts())
    for name, steps in engines:
        sim.new_engine()
        for st in steps:
            sim.step(name, st)
    return sim.requests


def check_bit_exact(requests: dict, pairs) -> list:
    """The pairs (e1, n1, e2, n2) whose histories differ, each with both histories, as text."""
    bad = []
    for e1, n1, e2, n2 in pairs:
        a, b = requests.get((e1, n1)), requests.get((e2, n2))
        if a is None or b is None:
            bad.append(f"{e1}:{n1} vs {e2}:{n2}: a step is not in the story")
        elif a["history"] != b["history"]:
            bad.append(f"{e1}:{n1} vs {e2}:{n2}: KV histories differ: "
                       f"{e1}:{n1} computed {a['computed']} after {a['kv_from']}; "
                       f"{e2}:{n2} computed {b['computed']} after {b['kv_from']}")
    return bad
