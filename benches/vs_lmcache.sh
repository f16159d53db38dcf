#!/usr/bin/env bash
# LMCache's own `lmcache bench server` against `lmcache server` and `cwm serve`, default flags,
# ABBA order; prints the ratios. See benches/vs_lmcache.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/tests/e2e/.venv/bin/python" "$root/benches/vs_lmcache.py" "$@"
