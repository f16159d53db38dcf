#!/usr/bin/env bash
# `cwm bench --l3` against a throwaway redis-server (no persistence, free loopback port) on this
# machine: L3 put/get GB/s for 8 and 32 MiB values next to redis-benchmark SET/GET of the same
# sizes, and the round trips of a 4096-token lookup. Extra arguments go to `cwm bench`
# (e.g. --iterations 5 --json). L3_URL=redis://host:port benches an existing Redis instead
# (the bench deletes its own keys; redis-benchmark leaves its `key:__rand_int__`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cwm="${CWM_BIN:-}"  # a cwm binary already built, or build the release one
if [ -z "$cwm" ]; then
    cargo build --release --manifest-path "$root/Cargo.toml" --bin cwm >&2
    cwm="$root/target/release/cwm"
fi
url="${L3_URL:-}"
if [ -z "$url" ]; then
    dir="$(mktemp -d)"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
        --logfile "$dir/redis.log" --daemonize yes --pidfile "$dir/redis.pid"
    trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
    url="redis://127.0.0.1:$port"
fi
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(redis-server --version | cut -d' ' -f1-3), load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$cwm" bench --l3 "$url" "$@"
