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

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="$HERE/.work"
CACHE="${CWM_DOCKER_CACHE:-$HOME/.cache/cwm-docker}"
CWM_BIN="${CWM_BIN:-$REPO/target/ci/cwm}"
PY="$REPO/tests/interop/.venv/bin/python"
UID_CWM=10001
PROJECT="cwmci$$"
started_dockerd=""
second=""
passed=0
failed=0

log() { echo "docker: $*"; }
ok() { passed=$((passed + 1)); log "ok: $*"; }
bad() { failed=$((failed + 1)); log "FAILED: $*" >&2; }

compose() {
    timeout 180 docker-compose -f "$REPO/docker/compose.yaml" -p "$PROJECT" "$@"
}

cleanup() {
    [[ -n "$second" ]] && docker rm -f -v "$second" >/dev/null 2>&1
    compose down -v --remove-orphans >/dev/null 2>&1
    if [[ -n "$started_dockerd" ]]; then
        kill "$started_dockerd" 2>/dev/null
        wait "$started_dockerd" 2>/dev/null
    fi
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Wait until a container reports healthy (its HEALTHCHECK); print the seconds it took.
wait_healthy() {
    local c="$1" t0=$SECONDS st
    while (( SECONDS - t0 < 90 )); do
        st="$(docker inspect --format '{{.State.Health.Status}}' "$c" 2>/dev/null)"
        [[ "$st" == healthy ]] && { echo $((SECONDS - t0)); return 0; }
        [[ "$(docker inspect --format '{{.State.Running}}' "$c" 2>/dev/null)" == true ]] || break
        sleep 0.5
    done
    docker logs --tail 20 "$c" >&2
    return 1
}

# The container story as the container's uid (cwm opens the segments the "engine" creates).
story() {
    HOME=/tmp LMCACHE_LOG_LEVEL=WARNING timeout 120 setpriv --reuid "$UID_CWM" --regid "$UID_CWM" --clear-groups \
        "$PY" "$HERE/container_story.py" "$@" 2>"$WORK/story.err" || { tail -5 "$WORK/story.err"; return 1; }
}

mkdir -p "$WORK" "$CACHE"
[[ -x "$CWM_BIN" ]] || { log "FAILED: no cwm binary at $CWM_BIN (cargo build --profile ci --bin cwm)"; exit 1; }
[[ -x "$PY" ]] || { log "FAILED: no interop venv at $PY (tests/interop/setup.sh)"; exit 1; }

# 1. Tools and the daemon.
need=()
command -v docker >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if (( ${#need[@]} )); then
    log "installing ${need[*]}"
    sudo_cmd=""; [[ "$(id -u)" -eq 0 ]] || sudo_cmd="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null ||
        { log "FAILED: apt-get install ${need[*]}"; exit 1; }
fi
if ! docker info >/dev/null 2>&1; then
    dockerd --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    if ! docker info >/dev/null 2>&1; then
        log "SKIPPED: no docker daemon could start here; dockerd said:"
        tail -5 "$WORK/dockerd.log"
        exit 0
    fi
fi
log "$(docker version --format 'docker {{.Server.Version}}, storage driver') $(docker info --format '{{.Driver}}')"

# 2. Base images.
t0=$SECONDS
if ! docker image inspect cwm-ci/bookworm >/dev/null 2>&1; then
    tarball="$CACHE/bookworm-minbase.tar"
    if [[ ! -s "$tarball" ]]; then
        rm -rf "$WORK/rootfs"
        timeout 900 debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian \
            >"$WORK/debootstrap.log" 2>&1 || { tail -5 "$WORK/debootstrap.log"; log "FAILED: debootstrap"; exit 1; }
        tar -C "$WORK/rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$WORK/rootfs"
    fi
    timeout 300 docker import "$tarball" cwm-ci/bookworm >/dev/null || { log "FAILED: docker import"; exit 1; }
fi
if ! docker image inspect cwm-ci/redis >/dev/null 2>&1; then
    printf 'FROM cwm-ci/bookworm\nRUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null && rm -rf /var/lib/apt/lists/*\n' |
        timeout 600 docker build --network host -q -t cwm-ci/redis - >/dev/null || { log "FAILED: build cwm-ci/redis"; exit 1; }
fi
log "base images ready in $((SECONDS - t0)) s"

# 3. The image.
ctx="$WORK/context"
rm -rf "$ctx" && mkdir -p "$ctx"
mkdir -p "$ctx/prebuilt"
cp "$REPO/docker/Dockerfile" "$ctx/Dockerfile"
cp "$CWM_BIN" "$ctx/prebuilt/cwm"
# Each build leaves the previous cwm-ci/cwm and the Dockerfile's build stage behind as untagged
# images (~0.9 GB a run); they are removed after the build, so repeated CI runs do not fill the
# disk. Only images that became untagged during this build are touched.
dangling_before=$(docker images -q --filter dangling=true | sort -u)
t0=$SECONDS
timeout 600 docker build -q -f "$ctx/Dockerfile" --build-arg RUST_IMAGE=cwm-ci/bookworm \
    --build-arg RUNTIME_IMAGE=cwm-ci/bookworm -t cwm-ci/cwm "$ctx" >/dev/null || { log "FAILED: docker build"; exit 1; }
stale=$(comm -13 <(echo "$dangling_before") <(docker images -q --filter dangling=true | sort -u))
[[ -z "$stale" ]] || docker rmi -f $stale >/dev/null 2>&1 || true
size=$(docker image inspect --format '{{.Size}}' cwm-ci/cwm)
log "image cwm-ci/cwm built in $((SECONDS - t0)) s: $((size / 1000000)) MB (the runtime base is $(( $(docker image inspect --format '{{.Size}}' cwm-ci/bookworm) / 1000000 )) MB)"

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
