#!/usr/bin/env bash
# Every test of the project: Rust unit, golden, property and integration tests, then the
# interop suite that drives `cwm serve` with the real LMCache 0.5.6 client code.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin cwm
cargo test --workspace
CWM_BIN="$PWD/target/release/cwm" tests/interop/run.sh
