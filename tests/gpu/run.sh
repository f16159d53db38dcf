#!/usr/bin/env bash
# Real-GPU tests of cwm's CUDA path: builds cwm, installs torch (CUDA) and LMCache 0.5.6 in
# tests/gpu/.venv, runs gpu_roundtrip.py (throughput table) and gpu_stress.py (64k-token HND
# round trips in a loop, an engine killed mid-store, two instances x thousands of transfers),
# then `cwm bench tiers` (its GPU row: D2H/H2D through cwm's copy path next to plain cuMemcpy).
# Sized for under 10 minutes on one H100 (`gpu_stress.py --plan` prints the budget). Needs
# CWM_GPU_TESTS=1 and a GPU; CI only compiles the scripts and checks the plan.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
if [[ "${CWM_GPU_TESTS:-}" != "1" ]]; then
    echo "tests/gpu: not run. Set CWM_GPU_TESTS=1 on a machine with an NVIDIA GPU and driver." >&2
    exit 2
fi
command -v nvidia-smi >/dev/null || { echo "tests/gpu: nvidia-smi not found: install the NVIDIA driver" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || { echo "tests/gpu: nvidia-smi sees no usable GPU" >&2; exit 1; }
(cd "$REPO" && cargo build --profile ci --bin cwm)
"$REPO/target/ci/cwm" doctor --l1-size-gb 16
if [[ ! -x "$HERE/.venv/bin/python" ]]; then
    python3 -m venv "$HERE/.venv"
    "$HERE/.venv/bin/pip" install -q torch lmcache==0.5.6
fi
CWM_BIN="$REPO/target/ci/cwm" "$HERE/.venv/bin/python" "$HERE/gpu_roundtrip.py"
CWM_BIN="$REPO/target/ci/cwm" CWM_GPU_PORT=5610 timeout 540 "$HERE/.venv/bin/python" "$HERE/gpu_stress.py"
"$REPO/target/ci/cwm" bench tiers --json > "$HERE/bench-tiers.json"
echo "tests/gpu: cwm bench tiers (GPU row included) written to $HERE/bench-tiers.json"
