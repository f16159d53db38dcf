#!/usr/bin/env bash
# Run the cwm <-> LMCache 0.5.6 interop suite (see README.md).
#
#   tests/interop/run.sh [pytest args...]
#
# Env:
#   CWM_INTEROP_TARGET  cwm (default) | mock   -- mock runs the suite against tests/interop/mock_server.py
#   CWM_BIN             server binary (default: <repo>/target/release/cwm, else <repo>/target/debug/cwm)
#   CWM_SERVER_ARGS     extra arguments appended to `cwm serve ...`
#   CWM_RPC_TIMEOUT     seconds each RPC may take before the test fails (default 15)
#   CWM_STARTUP_TIMEOUT seconds the server may take to answer get_chunk_size (default 30)
#   CWM_INTEROP_LOG_DIR directory for the server logs (default: a pytest temp dir)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

"$HERE/setup.sh"

export CWM_INTEROP_TARGET="${CWM_INTEROP_TARGET:-cwm}"
case "$CWM_INTEROP_TARGET" in
    mock) ;;
    cwm)
        if [[ -z "${CWM_BIN:-}" ]]; then
            if [[ -x "$REPO/target/release/cwm" ]]; then
                CWM_BIN="$REPO/target/release/cwm"
            else
                CWM_BIN="$REPO/target/debug/cwm"
            fi
        fi
        if [[ ! -x "$CWM_BIN" ]]; then
            echo "run.sh: cwm binary not found at $CWM_BIN (build it with 'cargo build --release'," \
                 "or set CWM_BIN, or CWM_INTEROP_TARGET=mock to check the suite itself)" >&2
            exit 2
        fi
        export CWM_BIN="$(cd "$(dirname "$CWM_BIN")" && pwd)/$(basename "$CWM_BIN")"
        ;;
    *)
        echo "run.sh: CWM_INTEROP_TARGET must be 'cwm' or 'mock', not '$CWM_INTEROP_TARGET'" >&2
        exit 2
        ;;
esac

cd "$HERE"
exec "$HERE/.venv/bin/python" -m pytest -c "$HERE/pytest.ini" --rootdir "$HERE" "$@"
