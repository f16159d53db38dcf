#!/usr/bin/env bash
# The compose file's `cpu` profile run for real: cwm + Redis + vLLM-CPU (docker/vllm-cpu.Dockerfile)
# from docker/compose.yaml, as `docker compose --profile cpu up` starts them, with vLLM's
# LMCacheMPConnector pointed at the cwm service (engine-driven mode, vLLM-CPU's default: the
# engine maps cwm's L1 pool from the shared /dev/shm).
#   1. docker and the base images as tests/docker/run.sh makes them (lib.sh), cwm-ci/cwm from
#      $CWM_BIN;
#   2. the Python base, made locally as no registry is reachable: Debian bookworm's python3.11 in
#      a venv on PATH, with its headers (what python:3.11-slim-bookworm provides: `python`, pip,
#      Python.h, which torch's inductor compiles against), trusting the
#      CA bundle the host trusts (this site intercepts TLS); then docker/vllm-cpu.Dockerfile
#      unchanged, its pip installing tests/e2e/requirements.lock from the package index (cached
#      by docker while the Dockerfile and the lock are unchanged);
#   3. the tiny test model (tests/e2e/make_model.py, written by the image's own Python) in a host
#      directory mounted as MODELS, since no model hub is reachable;
#   4. `compose --profile cpu up`, then from the host (tests/docker/vllm_cpu_story.py): a
#      1100-token prompt through vLLM's OpenAI API, POST /reset_prefix_cache, the same prompt
#      again: served from cwm (vLLM's external prefix-cache hits, cwm's lookup hits and
#      retrieves) with the same tokens and logprobs within 0.1;
#   5. cwm's container restarted under the running vLLM (`docker restart`, as an upgrade): it
#      adopts the L1 pool the engine maps and restores the engine's context (its start line), and
#      after one heartbeat interval a fresh prompt is stored and served from cwm again;
#   6. `compose down`: every container stops cleanly and /dev/shm is left as it was.
# Every step has a timeout and fails with the reason. Part of tests/run-all.sh (CI), after
# run.sh: the image's first build on a machine costs ~4.5 minutes and 7.7 GB, later runs reuse
# docker's cache (docker/README.md).
#
# Env: CWM_BIN (default target/ci/cwm), CWM_DOCKER_CACHE (see run.sh), CWM_TEST_VLLM_ARGS
# (flags appended to vLLM's, @CWM_PORT@ standing for cwm's MP port: used to check that a broken
# connector config fails this script, e.g. one more --kv-transfer-config with "kv_producer").
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LOG_TAG=vllm-cpu
PROJECT="cwmvllm$$"
COMPOSE_TIMEOUT=240
T_START=$SECONDS

# What the containers' uid leaves in /dev/shm (others' tests may share this machine's /dev/shm).
shm_mine() { find /dev/shm -maxdepth 1 -user "$UID_CWM" -printf '%f\n' 2>/dev/null | sort; }
shm_before="$(shm_mine)"

cleanup() {
    local left
    if [[ -n "${vllm_c:-}" ]]; then
        docker logs "$vllm_c" >"$WORK/vllm.log" 2>&1
        docker logs "$(compose ps -q cwm 2>/dev/null)" >"$WORK/cwm-vllm.log" 2>&1
    fi
    compose --profile cpu down -v --remove-orphans >/dev/null 2>&1
    # A vLLM that died (a failed run) leaves its queues in /dev/shm: remove what this run's
    # containers' uid created.
    left="$(comm -13 <(echo "$shm_before") <(shm_mine))"
    if [[ -n "$left" ]]; then
        log "removing what the containers left in /dev/shm: $(echo $left)"
        (cd /dev/shm && rm -f -- $left)
    fi
    stop_dockerd
}
# The vLLM log's first error (its root cause, usually), for a failure message.
vllm_error() {
    docker logs "$vllm_c" 2>&1 | grep -v WARNING | grep -m1 -oE '[A-Za-z_.]*(Error|Exception): .*'
}
trap cleanup EXIT

mkdir -p "$WORK" "$CACHE"

# 1. Docker, base images, cwm's image.
ensure_docker
ensure_base_images
build_cwm_image

# 2. The Python base and the vLLM-CPU image.
t0=$SECONDS
pyctx="$WORK/python-base"
rm -rf "$pyctx" && mkdir -p "$pyctx"
ca=""
if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt "$pyctx/site-ca.crt"
    ca=$'COPY site-ca.crt /usr/local/share/site-ca.crt\nENV PIP_CERT=/usr/local/share/site-ca.crt'
fi
cat >"$pyctx/Dockerfile" <<EOF
FROM cwm-ci/bookworm
RUN apt-get update -qq \\
 && apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv python3.11-dev ca-certificates >/dev/null \\
 && rm -rf /var/lib/apt/lists/* \\
 && python3.11 -m venv /usr/local/python3.11
ENV PATH=/usr/local/python3.11/bin:\$PATH
$ca
EOF
timeout 600 docker build --network host -q -t cwm-ci/python3.11 "$pyctx" >"$WORK/python-base.log" 2>&1 ||
    { tail -15 "$WORK/python-base.log"; log "FAILED: build the Python base cwm-ci/python3.11"; exit 1; }
before=$(docker images -q --filter dangling=true | sort -u)
if ! timeout 1500 docker build --network host --build-arg PYTHON_IMAGE=cwm-ci/python3.11 -t cwm-ci/vllm-cpu \
        -f "$REPO/docker/vllm-cpu.Dockerfile" "$REPO" >"$WORK/vllm-build.log" 2>&1; then
    tail -15 "$WORK/vllm-build.log"
    log "FAILED: docker build -f docker/vllm-cpu.Dockerfile (log: $WORK/vllm-build.log)"; exit 1
fi
remove_new_dangling "$before"
size=$(docker image inspect --format '{{.Size}}' cwm-ci/vllm-cpu)
log "image cwm-ci/vllm-cpu ready in $((SECONDS - t0)) s: $((size / 1000000)) MB"

# 3. The test model.
models="$WORK/models"
mkdir -p "$models"
timeout 300 docker run --rm --network none --user "$(id -u):$(id -g)" -e HOME=/tmp \
    -v "$models:/models" -v "$REPO/tests/e2e/make_model.py:/make_model.py:ro" \
    --entrypoint python cwm-ci/vllm-cpu /make_model.py /models/tiny >"$WORK/make_model.log" 2>&1 ||
    { tail -5 "$WORK/make_model.log"; log "FAILED: make the test model"; exit 1; }
chmod -R a+rX "$models"

# 4. The cpu profile.
export CWM_IMAGE=cwm-ci/cwm REDIS_IMAGE=cwm-ci/redis VLLM_CPU_IMAGE=cwm-ci/vllm-cpu
export CWM_L1_SIZE_GB=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_SERVER_DEV_MODE=1
export MODELS="$models" MODEL=/models/tiny
# The test model has no tokenizer (prompts are token ids). Not --enforce-eager: vLLM-CPU compiles
# the model with inductor (g++) at start as it does for users (+40 s here, and the first request
# is 14 s faster).
CWM_PORT=$(free_port); CWM_HTTP_PORT=$(free_port); REDIS_PORT=$(free_port); VLLM_PORT=$(free_port)
export CWM_PORT CWM_HTTP_PORT REDIS_PORT VLLM_PORT
test_args="${CWM_TEST_VLLM_ARGS:-}"
export VLLM_ARGS="--skip-tokenizer-init --max-model-len 2048 --max-num-seqs 4 --served-model-name tiny ${test_args//@CWM_PORT@/$CWM_PORT}"
t0=$SECONDS
compose --profile cpu up -d --no-build >"$WORK/compose-vllm.log" 2>&1 ||
    { cat "$WORK/compose-vllm.log"; log "FAILED: compose --profile cpu up"; exit 1; }
up_s=$((SECONDS - t0))
vllm_c="$(compose ps -q vllm-cpu)"
cwm_c="$(compose ps -q cwm)"
[[ -n "$vllm_c" && -n "$cwm_c" ]] || { log "FAILED: compose ps lists no vllm-cpu or cwm container"; exit 1; }
ok "compose --profile cpu up returned in ${up_s} s (it waits for cwm to be healthy first)"

# vLLM's /health from the host, then docker's health status (every 10 s).
t1=$SECONDS
until curl -fsS "http://127.0.0.1:$VLLM_PORT/health" >/dev/null 2>&1; do
    if [[ "$(docker inspect --format '{{.State.Running}}' "$vllm_c" 2>/dev/null)" != true ]]; then
        docker logs --tail 10 "$vllm_c" 2>&1
        bad "vLLM exited before answering /health (exit code $(docker inspect --format '{{.State.ExitCode}}' "$vllm_c")): $(vllm_error)"; exit 1
    fi
    if (( SECONDS - t1 > 420 )); then
        docker logs --tail 10 "$vllm_c" 2>&1
        bad "vLLM did not answer /health within 420 s: $(vllm_error)"; exit 1
    fi
    sleep 0.5
done
vllm_s=$((SECONDS - t0))
if wait_healthy "$vllm_c" 60 >/dev/null; then
    ok "vLLM answered /health ${vllm_s} s after \`up\` began; docker reports it healthy after $((SECONDS - t0)) s"
else
    bad "docker does not report vLLM healthy (its HEALTHCHECK) though /health answers"
fi

uid="$(docker exec "$vllm_c" sh -c 'awk "/^Uid:/{print \$2}" /proc/1/status')"
[[ "$uid" == "$UID_CWM" ]] && ok "vLLM runs as uid $uid, cwm's" || bad "vLLM runs as uid ${uid:-?}, want $UID_CWM"

if out="$(timeout 180 python3 "$HERE/vllm_cpu_story.py" "http://127.0.0.1:$VLLM_PORT" \
        "http://127.0.0.1:$CWM_HTTP_PORT" tiny 2>&1)"; then
    while IFS= read -r line; do ok "$line"; done <<<"$out"
else
    echo "$out" | sed 's/^/    /'
    bad "the prompt was not served from cwm the second time (story above)"
fi

# cwm's container restarted under the running vLLM (an upgrade): the stop keeps the L1 pool the
# engine maps (engine-driven), the new container adopts it and restores the engine's context,
# and a fresh prompt is stored and served from cwm again, with no vLLM restart. One heartbeat
# interval is let pass first: a ping that fell in the gap puts the connector in its degraded
# mode until its next one (README, "Restarting and upgrading cwm").
t0=$SECONDS
if timeout 120 docker restart -t 60 "$cwm_c" >/dev/null && wait_healthy "$cwm_c" 60 >/dev/null; then
    start="$(docker logs "$cwm_c" 2>&1 | grep 'cwm serving the LMCache MP protocol' | tail -1)"
    if [[ "$start" == *"l1_pool_adopted=true"* && "$start" == *"engine_contexts_restored=1"* ]]; then
        ok "cwm's container restarted in $((SECONDS - t0)) s; it adopted the pool vLLM maps and restored its context"
    else
        bad "cwm's restarted container did not adopt the pool and restore vLLM's context: ${start:-no start line}"
    fi
    sleep 11
    if out="$(timeout 180 python3 "$HERE/vllm_cpu_story.py" "http://127.0.0.1:$VLLM_PORT" \
            "http://127.0.0.1:$CWM_HTTP_PORT" tiny 26 2>&1)"; then
        while IFS= read -r line; do ok "after cwm's restart: $line"; done <<<"$out"
    else
        echo "$out" | sed 's/^/    /'
        bad "after cwm's restart, a fresh prompt was not stored and served from cwm (story above)"
    fi
else
    bad "cwm's container did not come back healthy after \`docker restart\`"
fi

# What vLLM says about the connector, and cwm's L1 as /status reports it.
mode="$(docker logs "$vllm_c" 2>&1 | grep -o -m1 'engine_driven\|lmcache_driven' || true)"
l1="$(curl -fsS "http://127.0.0.1:$CWM_HTTP_PORT/status" 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)["cache"]
print("{} objects, {:.1f} MiB of {:.0f} MiB, hit rate {}".format(s["l1"]["objects"],
      s["l1"]["committed_bytes"] / 2**20, s["l1"]["capacity_bytes"] / 2**20, s["hit_rate"]))' 2>&1)"
log "vLLM's log names the transfer context ${mode:-(none found)}; cwm /status, L1: $l1"

# 5. Down: containers stop (cwm drains), /dev/shm as before.
docker logs "$vllm_c" >"$WORK/vllm.log" 2>&1
docker logs "$cwm_c" >"$WORK/cwm-vllm.log" 2>&1
vllm_c_saved="$vllm_c"; vllm_c=""
t0=$SECONDS
if compose --profile cpu down -v --remove-orphans >>"$WORK/compose-vllm.log" 2>&1; then
    ok "compose --profile cpu down in $((SECONDS - t0)) s"
else
    bad "compose --profile cpu down failed (log: $WORK/compose-vllm.log)"
fi
left="$(comm -13 <(echo "$shm_before") <(shm_mine) | tr '\n' ' ')"
[[ -z "$left" ]] && ok "/dev/shm is left as it was" || bad "left in /dev/shm: $left"

log "$passed passed, $failed failed, $((SECONDS - T_START)) s in all (logs: $WORK/vllm.log, $WORK/cwm-vllm.log)"
(( failed == 0 ))
