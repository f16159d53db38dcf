"""The compose `cpu` profile's story, from the host, as a user would see it (standard library only).

    vllm_cpu_story.py VLLM_URL CWM_HTTP_URL MODEL [SEED]   (run by tests/docker/vllm_cpu.sh)

SEED picks the prompt (default 25): the script runs it again with another seed after cwm's
container was restarted under the running vLLM.

1. a 1100-token prompt (token ids: the test model has no tokenizer) through vLLM's OpenAI
   completions API, greedy, 16 tokens, with their logprobs: cold, computed by vLLM; its KV goes
   to cwm (cwm's stored-objects counter grows by the prompt's 4 whole 256-token chunks);
2. POST /reset_prefix_cache (vLLM started with VLLM_SERVER_DEV_MODE=1): vLLM's own block pool
   is emptied, so only cwm can supply the KV now;
3. the same request again: vLLM counts 1024 external prefix-cache hit tokens, cwm counts the
   lookup hits and the retrieves, and the generated tokens are the cold ones, their logprobs
   within CLOSE (different prefill splits: never compared bit for bit).
Prints one line per step; exits non-zero with the reason on the first failure.
"""
import json
import random
import sys
import time
import urllib.error
import urllib.request

# Cold and warm outputs come from different computations (one whole prefill against 1024 tokens
# from cwm plus 76 computed), which vLLM-CPU's kernels round differently on other CPUs: tokens
# must match, logprobs within CLOSE (tests/e2e/e2e_vllm.py says where the value comes from).
CLOSE = 0.1
PROMPT_TOKENS = 1100
CHUNK = 256
CHUNKS = PROMPT_TOKENS // CHUNK           # whole chunks only: 4 (1024 tokens)
MAX_TOKENS = 16


def http(url, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{req.method} {url}: HTTP {e.code}: {e.read().decode()[:500]}")


def metrics(url):
    """Prometheus text -> {name: value summed over labels, name{labels}: value}."""
    out = {}
    for line in http(url + "/metrics", timeout=10).splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
            if name_labels != name:
                out[name_labels] = float(value)
        except ValueError:
            pass
    return out


def delta(after, before, name):
    return after.get(name, 0.0) - before.get(name, 0.0)


def complete(vllm, model, ids):
    t0 = time.perf_counter()
    r = json.loads(http(vllm + "/v1/completions", {
        "model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0,
        "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True,
        "return_token_ids": True,
    }))
    wall = time.perf_counter() - t0
    c = r["choices"][0]
    return c["token_ids"], c["logprobs"]["token_logprobs"], wall


def main(vllm, cwm, model, seed="25"):
    rng = random.Random(int(seed))
    ids = [rng.randrange(3, 8192) for _ in range(PROMPT_TOKENS)]

    v0, c0 = metrics(vllm), metrics(cwm)
    toks1, lps1, wall1 = complete(vllm, model, ids)
    if len(toks1) != MAX_TOKENS:
        return f"cold request gave {len(toks1)} tokens, want {MAX_TOKENS}"
    # The engine stores the prompt's whole chunks when the request ends; wait for cwm to count them.
    deadline = time.time() + 30
    while True:
        c1 = metrics(cwm)
        stored = delta(c1, c0, "cwm_stored_objects_total")
        if stored >= CHUNKS or time.time() > deadline:
            break
        time.sleep(0.2)
    if stored < CHUNKS:
        return f"cwm stored {stored:.0f} objects after the cold request, want >= {CHUNKS}"
    v1 = metrics(vllm)
    ext1 = delta(v1, v0, "vllm:external_prefix_cache_hits_total")
    print(f"cold: {wall1:.2f} s, {MAX_TOKENS} tokens, external hits {ext1:.0f}; "
          f"cwm stored {stored:.0f} objects "
          f"({delta(c1, c0, 'cwm_stored_bytes_total') / 1e6:.1f} MB)", flush=True)
    if ext1 != 0:
        return f"the cold request already had {ext1:.0f} external hit tokens (a stale cwm?)"

    http(vllm + "/reset_prefix_cache", {}, timeout=30)
    print("POST /reset_prefix_cache: vLLM's own prefix cache emptied", flush=True)

    toks2, lps2, wall2 = complete(vllm, model, ids)
    v2, c2 = metrics(vllm), metrics(cwm)
    ext = delta(v2, v1, "vllm:external_prefix_cache_hits_total")
    own = delta(v2, v1, "vllm:prefix_cache_hits_total")
    hit_chunks = delta(c2, c1, "cwm_lookup_hit_chunks_total")
    retrieved = delta(c2, c1, "cwm_retrieved_objects_total")
    print(f"warm: {wall2:.2f} s, external hits {ext:.0f} tokens, vLLM's own hits {own:.0f}; "
          f"cwm lookup hit chunks +{hit_chunks:.0f}, retrieved objects +{retrieved:.0f}",
          flush=True)
    ops = {op: delta(c2, c0, f'cwm_ops_total{{op="{op}"}}') for op in
           ("store", "retrieve", "prepare_store", "commit_store", "prepare_retrieve",
            "commit_retrieve")}
    mode = ("engine-driven" if ops["commit_retrieve"] > 0 else
            "lmcache-driven" if ops["retrieve"] > 0 else "no retrieve at all")
    print(f"transfer mode {mode}: cwm's ops " +
          ", ".join(f"{k} {v:.0f}" for k, v in ops.items() if v), flush=True)
    if ext != CHUNKS * CHUNK:
        return f"vllm:external_prefix_cache_hits_total grew by {ext:.0f}, want {CHUNKS * CHUNK}"
    if own != 0:
        return f"vLLM's own prefix cache hit {own:.0f} tokens after the reset, want 0"
    if hit_chunks < CHUNKS or retrieved < CHUNKS:
        return (f"cwm counted {hit_chunks:.0f} lookup hit chunks and {retrieved:.0f} retrieved "
                f"objects, want >= {CHUNKS} each")
    if toks2 != toks1:
        return f"the warm tokens differ from the cold ones:\n  cold {toks1}\n  warm {toks2}"
    diff = max(abs(a - b) for a, b in zip(lps1, lps2))
    if diff > CLOSE:
        return (f"the warm logprobs differ from the cold ones by {diff} > {CLOSE}:\n"
                f"  cold {lps1}\n  warm {lps2}")
    print(f"same {MAX_TOKENS} tokens, logprobs within {diff:.4f}, cold and from cwm: "
          f"{toks1[:8]}...", flush=True)
    return None


if __name__ == "__main__":
    err = main(*sys.argv[1:5])
    if err:
        print(err, file=sys.stderr)
        sys.exit(1)
