#!/usr/bin/env bash
# Every test of the project: Rust unit, golden, property and integration tests, the interop
# suite that drives `cwm serve` with the real LMCache 0.5.6 client code, then the end-to-end
# suite with a real vLLM CPU engine in both transfer modes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin cwm
cargo test --workspace
CWM_BIN="$PWD/target/release/cwm" tests/interop/run.sh
CWM_BIN="$PWD/target/release/cwm" tests/e2e/run.sh
