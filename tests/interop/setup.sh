#!/usr/bin/env bash
# Create (or reuse) the Python 3.11 venv of the interop suite at tests/interop/.venv.
#
# Idempotent: the venv is reused as long as requirements.txt, the lmcache pin and the Python
# version are unchanged (tracked in .venv/.cwm-interop-stamp). Installs the pinned requirements
# (pip's download/wheel cache stays enabled) and lmcache==0.5.6 with --no-deps (only its
# pure-Python client modules are used, under the fake torch in fake_torch/).
#
# Env: PYTHON=<interpreter> to choose the Python 3.11 interpreter (default: python3.11, else python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
REQ="$HERE/requirements.txt"
LMCACHE_PIN="lmcache==0.5.6"
STAMP="$VENV/.cwm-interop-stamp"

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
WANT="$( { cat "$REQ"; echo "$LMCACHE_PIN"; echo "python=$PYVER"; echo "layout=1"; } | sha256sum | cut -d' ' -f1)"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0                                   # up to date
fi

# Recreate the venv when its interpreter is missing or not the wanted Python; otherwise reuse it
# and let pip bring the installed set in line with requirements.txt.
if [[ -x "$VENV/bin/python" ]] &&
   [[ "$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)" == "$PYVER" ]]; then
    echo "setup.sh: updating venv $VENV" >&2
else
    echo "setup.sh: creating venv $VENV with $PY ($PYVER)" >&2
    rm -rf "$VENV"
    if ! "$PY" -m venv "$VENV"; then
        echo "setup.sh: '$PY -m venv' failed (on Debian: apt-get install python3.11-venv)" >&2
        exit 1
    fi
fi
rm -f "$STAMP"

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install --quiet -r "$REQ"
"$VENV/bin/python" -m pip install --quiet --no-deps "$LMCACHE_PIN"

# Smoke check: the real lmcache client modules import under the fake torch.
SMOKE='
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "fake_torch"))
import lmshim
from lmcache.v1.multiprocess.transport.factory import RequestClientFactory
from lmcache.v1.platform.devices.cpu.shm import CpuShmTensorWrapper
'
if ! out="$("$VENV/bin/python" -c "$SMOKE" "$HERE" 2>&1)"; then
    echo "$out" >&2
    echo "setup.sh: the lmcache client modules do not import in $VENV" >&2
    exit 1
fi

echo "$WANT" > "$STAMP"
echo "setup.sh: venv ready ($VENV)" >&2
