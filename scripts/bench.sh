#!/usr/bin/env bash
# The CNI path benchmark: ADD/DEL latency through trellis-cni + agent against the same
# delegates exec'd directly, interleaved in one run, and the agent's RSS over ADD/DEL
# cycles. Release build. Run as root. Extra arguments go to trellis-bench
# (--pods N, default 200; --cycles M, default 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins --locked
TRELLIS_BIN_DIR="$PWD/target/release" exec target/release/trellis-bench "$@"
