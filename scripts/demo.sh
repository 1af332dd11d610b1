#!/usr/bin/env bash
# The demo node on an embedded default: containerd + trellis agent + pods with several
# networks, traffic across each, what every pod got. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins --locked
exec target/debug/trellis-demo
