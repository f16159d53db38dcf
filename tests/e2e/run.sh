#!/usr/bin/env bash
# The vLLM end-to-end tests: set up the venv, then run e2e_vllm.py once per transfer mode, each
# with a real vLLM CPU engine (two or three engine processes) against `cwm serve`, and
# e2e_restart.py (one engine kept up while cwm is killed, kept down and stopped); then
# lmcache_bench.py: LMCache's own `lmcache bench server` against `cwm serve`, both modes; then
# lm_remote.py: LMCache's `lm://` remote connector and in-process engine against
# `cwm serve --lm-port`.
#
#   tests/e2e/run.sh [pytest args...]
#
# Env:
#   CWM_E2E_MODES   transfer modes to run, in order, each MODE or MODE@ISA (default
#                   "lmcache_driven default@avx2"); "default" is the connector's auto mode,
#                   engine_driven on CPU; ISA as CWM_E2E_ISA below
#   CWM_BIN         cwm binary (default: <repo>/target/release/cwm, built here if missing)
#   CWM_E2E_SERVER  cwm (default) | lmcache: run the story against LMCache's own server instead
#   CWM_E2E_DISK    auto | 0 | 1: the restart-from-disk check (a third engine; auto: when cwm has
#                   --l2-path). Unset: auto in the first mode, 0 in the others
#   CWM_E2E_ISA     native (default) | avx2: the ISA of entries without @ISA; avx2 runs the
#                   engines on an AVX2-only CPU's code paths
#                   (torch, oneDNN and vLLM's kernels capped; see e2e_lib.engine_env_for)
# Logs and results: tests/e2e/.work/runs/<mode>/. Exit status non-zero if any mode failed.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
t_all=$SECONDS

t0=$SECONDS
"$HERE/setup.sh" || { echo "e2e: setup.sh failed" >&2; exit 1; }
t_setup=$((SECONDS - t0))

if [[ -z "${CWM_BIN:-}" ]]; then
    CWM_BIN="$REPO/target/release/cwm"
    if [[ ! -x "$CWM_BIN" && "${CWM_E2E_SERVER:-cwm}" == "cwm" ]]; then
        (cd "$REPO" && cargo build --release --bin cwm) || { echo "e2e: cargo build failed" >&2; exit 1; }
    fi
fi
export CWM_BIN

"$HERE/.venv/bin/python" "$HERE/make_model.py" "$HERE/.work/models/tiny" >/dev/null ||
    { echo "e2e: make_model.py failed" >&2; exit 1; }
# The CPU and its SIMD flags: vLLM's CPU kernels round differently on different ISAs.
(cd "$HERE" && "$HERE/.venv/bin/python" -c 'import e2e_lib; print("e2e:", e2e_lib.cpu_line())')

summary=()
failed=0
first=1

# One pytest file of this directory, as a line of the summary: pytest_step LABEL FILE.
pytest_step() {
    echo "==== e2e: $1 ===="
    local t0=$SECONDS rc word
    (cd "$HERE" && "$HERE/.venv/bin/python" -m pytest -c "$HERE/pytest.ini" --rootdir "$HERE" "$HERE/$2")
    rc=$?
    if [[ $rc -eq 0 ]]; then word=passed; else word="FAILED (pytest exit $rc)"; failed=1; fi
    summary+=("$1: $word in $((SECONDS - t0)) s")
}

# The story table (story.py), without vLLM: every bit-for-bit pair has equal KV histories.
pytest_step "the story table (bit-exact pairs vs KV histories)" test_story.py
# Each entry is MODE or MODE@ISA. By default the second mode runs on the code paths of an
# AVX2-only CPU (a no-op on one), so every run checks both ISA families vLLM-CPU has kernels for.
for entry in ${CWM_E2E_MODES:-lmcache_driven default@avx2}; do
    mode="${entry%@*}"
    isa="${CWM_E2E_ISA:-native}"
    [[ "$entry" == *@* ]] && isa="${entry#*@}"
    echo "==== e2e: vLLM + ${CWM_E2E_SERVER:-cwm}, transfer mode $mode, ISA $isa ===="
    t0=$SECONDS
    # The restart-from-disk check (a third engine) does not depend on the transfer mode: unless
    # CWM_E2E_DISK is set, run it in the first mode only, to keep the run short.
    disk="${CWM_E2E_DISK:-auto}"
    [[ -z "${CWM_E2E_DISK:-}" && $first -eq 0 ]] && disk=0
    first=0
    (cd "$HERE" && CWM_E2E_MODE="$mode" CWM_E2E_DISK="$disk" CWM_E2E_ISA="$isa" "$HERE/.venv/bin/python" -m pytest \
        -c "$HERE/pytest.ini" --rootdir "$HERE" "$HERE/e2e_vllm.py" "$@")
    rc=$?
    if [[ $rc -eq 0 ]]; then word=passed; else word="FAILED (pytest exit $rc)"; failed=1; fi
    summary+=("mode $mode (ISA $isa): $word in $((SECONDS - t0)) s")
    # The restart story (issue 20): one engine kept up while its server is killed, kept down
    # and stopped with SIGTERM.
    echo "==== e2e: restart story, vLLM + ${CWM_E2E_SERVER:-cwm}, transfer mode $mode, ISA $isa ===="
    t0=$SECONDS
    (cd "$HERE" && CWM_E2E_MODE="$mode" CWM_E2E_ISA="$isa" "$HERE/.venv/bin/python" -m pytest \
        -c "$HERE/pytest.ini" --rootdir "$HERE" -s "$HERE/e2e_restart.py" "$@")
    rc=$?
    if [[ $rc -eq 0 ]]; then word=passed; else word="FAILED (pytest exit $rc)"; failed=1; fi
    summary+=("restart story, mode $mode (ISA $isa): $word in $((SECONDS - t0)) s")
done

if [[ "${CWM_E2E_SERVER:-cwm}" == "cwm" ]]; then
    # LMCache's own `lmcache bench server` (mock CPU worker, checksums over HTTP) against cwm.
    pytest_step "lmcache bench server" lmcache_bench.py
    # LMCache's own lm:// remote connector (LMCacheConnectorV1's remote_url, with a real
    # LocalCPUBackend) against `cwm serve --lm-port`, and its in-process engine in two processes
    # (the second hits the first one's prompt).
    pytest_step "lm:// remote connector and in-process engine" lm_remote.py
fi

# Smoke run of benches/vs_lmcache.sh: one short ABBA round, ratios printed, never asserted
# (it fails only if a server or the bench fails, e.g. a checksum mismatch).
if [[ "${CWM_E2E_SERVER:-cwm}" == "cwm" ]]; then
    echo "==== e2e: benches/vs_lmcache.sh smoke (ratios informational) ===="
    t0=$SECONDS
    "$HERE/../../benches/vs_lmcache.sh" --rounds 1 --requests 2 --num-tokens 512 --l1-size-gb 1
    rc=$?
    if [[ $rc -eq 0 ]]; then word=passed; else word="FAILED (exit $rc)"; failed=1; fi
    summary+=("vs_lmcache smoke: $word in $((SECONDS - t0)) s")
fi

echo "==== e2e summary (setup ${t_setup} s, total $((SECONDS - t_all)) s) ===="
for line in "${summary[@]}"; do echo "  $line"; done
exit $failed
