#!/usr/bin/env bash
# The docker image and compose file, built and run for real (issue 25):
#   1. docker, docker-compose and debootstrap (Debian's packages, installed if missing); a
#      dockerd started here the way that works on these machines (no iptables, no bridge: the
#      containers use the host's network) unless one is running;
#   2. base images made locally, as no registry is reachable: a Debian bookworm minbase
#      (debootstrap) for the runtime, and Debian's redis-server on it for Redis;
#   3. the image from docker/Dockerfile, taking the cwm binary the rest of CI tested
#      (a context with prebuilt/cwm; compiling again inside docker would add ~10 min on 2
#      cores);
#   4. cwm + Redis from docker/compose.yaml, and from the host, with LMCache's real client
#      (tests/docker/container_story.py, as the container's uid): ping, /healthcheck, store and
#      retrieve byte for byte, a second cwm container hitting the first one's chunks through
#      Redis, `docker stop` (SIGTERM, drain) losing no acknowledged chunk, cwm running as
#      non-root. Image size and start time are printed.
# Skipped, loudly, only where no docker daemon can start. Every step that could hang has a
# timeout, so a stuck daemon fails the run instead of stalling CI.
#
# Env: CWM_BIN (default target/ci/cwm), CWM_DOCKER_CACHE (the base image tarball, default
# ~/.cache/cwm-docker).
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY="$REPO/tests/interop/.venv/bin/python"
LOG_TAG=docker
PROJECT="cwmci$$"
second=""

cleanup() {
    [[ -n "$second" ]] && docker rm -f -v "$second" >/dev/null 2>&1
    compose down -v --remove-orphans >/dev/null 2>&1
    stop_dockerd
}
trap cleanup EXIT

# The container story as the container's uid (cwm opens the segments the "engine" creates).
story() {
    HOME=/tmp LMCACHE_LOG_LEVEL=WARNING timeout 120 setpriv --reuid "$UID_CWM" --regid "$UID_CWM" --clear-groups \
        "$PY" "$HERE/container_story.py" "$@" 2>"$WORK/story.err" || { tail -5 "$WORK/story.err"; return 1; }
}

mkdir -p "$WORK" "$CACHE"
[[ -x "$CWM_BIN" ]] || { log "FAILED: no cwm binary at $CWM_BIN (cargo build --profile ci --bin cwm)"; exit 1; }
[[ -x "$PY" ]] || { log "FAILED: no interop venv at $PY (tests/interop/setup.sh)"; exit 1; }

# 1. Tools and the daemon.
ensure_docker

# 2. Base images.
ensure_base_images

# 3. The image.
build_cwm_image

# 4. cwm + Redis from the compose file.
export CWM_IMAGE=cwm-ci/cwm REDIS_IMAGE=cwm-ci/redis CWM_L1_SIZE_GB=1
CWM_PORT=$(free_port); CWM_HTTP_PORT=$(free_port); REDIS_PORT=$(free_port)
export CWM_PORT CWM_HTTP_PORT REDIS_PORT
t0=$SECONDS
compose up -d --no-build redis cwm >"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log"; log "FAILED: compose up"; exit 1; }
t_up=$(date +%s.%N)
cwm_c="$(compose ps -q cwm)"
for _ in $(seq 600); do curl -fsS "http://127.0.0.1:$CWM_HTTP_PORT/healthcheck" >/dev/null 2>&1 && break; sleep 0.1; done
answer_s=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t_up}")
if secs=$(wait_healthy "$cwm_c"); then
    ok "compose up: cwm answered /healthcheck ${answer_s} s after \`up\` returned; docker reported it healthy after $((SECONDS - t0)) s (HEALTHCHECK every 5 s)"
else
    bad "cwm did not become healthy"; exit 1
fi
url="tcp://127.0.0.1:$CWM_PORT"

body="$(curl -fsS "http://127.0.0.1:$CWM_HTTP_PORT/healthcheck" 2>&1)"
[[ "$body" == *healthy* ]] && ok "/healthcheck from the host: $body" || bad "/healthcheck: $body"

uid="$(docker exec "$cwm_c" id -u)"; pid1="$(docker exec "$cwm_c" sh -c 'awk "/^Uid:/{print \$2}" /proc/1/status')"
[[ "$uid" == "$UID_CWM" && "$pid1" == "$UID_CWM" ]] && ok "cwm runs as uid $pid1 (non-root)" ||
    bad "cwm runs as uid ${pid1:-?} (exec uid ${uid:-?}), want $UID_CWM"

out="$(story store "$url" cwm-docker-model seed-a 2>&1)" && ok "LMCache's client: ping, $out" ||
    bad "store through LMCache's client: $out"

# A second cwm container on the same Redis, its own (empty) volume.
B_PORT=$(free_port); B_HTTP=$(free_port)
second="$(timeout 60 docker run -d --network host --ipc host --user "$UID_CWM" \
    -e CWM_PORT="$B_PORT" -e CWM_HTTP_PORT="$B_HTTP" -e CWM_L1_SIZE_GB=1 \
    -e CWM_L3_URL="redis://127.0.0.1:$REDIS_PORT" cwm-ci/cwm)"
if wait_healthy "$second" >/dev/null; then
    out="$(story hit "tcp://127.0.0.1:$B_PORT" cwm-docker-model seed-a 2>&1)" &&
        ok "second container, through Redis: $out" || bad "second container: $out"
else
    bad "the second cwm container did not become healthy"
fi

# docker stop (SIGTERM) right after a store: the chunks are found after a restart.
out="$(story store "$url" cwm-docker-model seed-b 2>&1)" || bad "store before stop: $out"
t0=$SECONDS
compose stop cwm >>"$WORK/compose.log" 2>&1
stop_s=$((SECONDS - t0))
exit_code="$(docker inspect --format '{{.State.ExitCode}}' "$cwm_c")"
compose stop redis >>"$WORK/compose.log" 2>&1          # so a hit can only come from cwm's disk
compose start cwm >>"$WORK/compose.log" 2>&1
if wait_healthy "$cwm_c" >/dev/null; then
    out="$(story hit "$url" cwm-docker-model seed-b 2>&1)" &&
        ok "docker stop (${stop_s} s, exit $exit_code) + start, Redis stopped: $out" ||
        bad "after docker stop + start: $out; log: $(docker logs --tail 15 "$cwm_c" 2>&1)"
else
    bad "cwm did not come back after docker stop + start"
fi

docker logs "$cwm_c" >"$WORK/cwm.log" 2>&1
log "$passed passed, $failed failed"
(( failed == 0 ))
