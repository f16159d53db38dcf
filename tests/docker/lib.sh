# Shared by tests/docker/run.sh and tests/docker/vllm_cpu.sh (sourced, not run):
#   ensure_docker         docker, docker-compose and debootstrap (Debian's packages, installed if
#                         missing) and a dockerd started the way that works on these machines (no
#                         iptables, no bridge: containers use the host's network) unless one runs;
#                         exits 0 with SKIPPED where no daemon can start
#   ensure_base_images    cwm-ci/bookworm (a debootstrap minbase, no registry being reachable)
#                         and cwm-ci/redis (Debian's redis-server on it)
#   build_cwm_image       cwm-ci/cwm from docker/Dockerfile with the binary $CWM_BIN
#   compose ARGS...       docker-compose on docker/compose.yaml, project $PROJECT, with a timeout
#   wait_healthy C [S]    until container C reports healthy (at most S s); prints the seconds
#   free_port, log, ok, bad, stop_dockerd
# The caller sets LOG_TAG (the prefix of every line) and PROJECT before using these.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="$HERE/.work"
CACHE="${CWM_DOCKER_CACHE:-$HOME/.cache/cwm-docker}"
CWM_BIN="${CWM_BIN:-$REPO/target/ci/cwm}"
UID_CWM=10001
started_dockerd=""
passed=0
failed=0

log() { echo "${LOG_TAG:-docker}: $*"; }
ok() { passed=$((passed + 1)); log "ok: $*"; }
bad() { failed=$((failed + 1)); log "FAILED: $*" >&2; }

compose() {
    timeout "${COMPOSE_TIMEOUT:-180}" docker-compose -f "$REPO/docker/compose.yaml" -p "$PROJECT" "$@"
}

stop_dockerd() {
    if [[ -n "$started_dockerd" ]]; then
        kill "$started_dockerd" 2>/dev/null
        wait "$started_dockerd" 2>/dev/null
        started_dockerd=""
    fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Wait until a container reports healthy (its HEALTHCHECK); print the seconds it took.
wait_healthy() {
    local c="$1" limit="${2:-90}" t0=$SECONDS st
    while (( SECONDS - t0 < limit )); do
        st="$(docker inspect --format '{{.State.Health.Status}}' "$c" 2>/dev/null)"
        [[ "$st" == healthy ]] && { echo $((SECONDS - t0)); return 0; }
        [[ "$(docker inspect --format '{{.State.Running}}' "$c" 2>/dev/null)" == true ]] || break
        sleep 0.5
    done
    docker logs --tail 20 "$c" >&2
    return 1
}

ensure_docker() {
    local need=() sudo_cmd=""
    command -v docker >/dev/null || need+=(docker.io)
    command -v docker-compose >/dev/null || need+=(docker-compose)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    if (( ${#need[@]} )); then
        log "installing ${need[*]}"
        [[ "$(id -u)" -eq 0 ]] || sudo_cmd="sudo"
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
}

ensure_base_images() {
    local t0=$SECONDS tarball="$CACHE/bookworm-minbase.tar"
    if ! docker image inspect cwm-ci/bookworm >/dev/null 2>&1; then
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
}

# Untagged images that appeared since $1 (a `docker images -q` listing): the previous build of a
# tag, its build stages. Removed so that repeated runs do not fill the disk.
remove_new_dangling() {
    local stale
    stale=$(comm -13 <(echo "$1") <(docker images -q --filter dangling=true | sort -u))
    [[ -z "$stale" ]] || docker rmi -f $stale >/dev/null 2>&1 || true
}

build_cwm_image() {
    local ctx="$WORK/context" t0 size before
    [[ -x "$CWM_BIN" ]] || { log "FAILED: no cwm binary at $CWM_BIN (cargo build --profile ci --bin cwm)"; exit 1; }
    rm -rf "$ctx" && mkdir -p "$ctx/prebuilt"
    cp "$REPO/docker/Dockerfile" "$ctx/Dockerfile"
    cp "$CWM_BIN" "$ctx/prebuilt/cwm"
    # Each build leaves the previous cwm-ci/cwm and the Dockerfile's build stage behind as
    # untagged images (~0.9 GB a run); only images that became untagged during this build go.
    before=$(docker images -q --filter dangling=true | sort -u)
    t0=$SECONDS
    timeout 600 docker build -q -f "$ctx/Dockerfile" --build-arg RUST_IMAGE=cwm-ci/bookworm \
        --build-arg RUNTIME_IMAGE=cwm-ci/bookworm -t cwm-ci/cwm "$ctx" >"$WORK/cwm-build.log" 2>&1 ||
        { tail -15 "$WORK/cwm-build.log"; log "FAILED: docker build"; exit 1; }
    remove_new_dangling "$before"
    size=$(docker image inspect --format '{{.Size}}' cwm-ci/cwm)
    log "image cwm-ci/cwm built in $((SECONDS - t0)) s: $((size / 1000000)) MB (the runtime base is $(( $(docker image inspect --format '{{.Size}}' cwm-ci/bookworm) / 1000000 )) MB)"
}
