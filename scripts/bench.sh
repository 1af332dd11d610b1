#!/usr/bin/env bash
# The benchmarks, release build, as root. (1) The CNI path: ADD/DEL latency through
# trellis-cni + agent against the same delegates exec'd directly, interleaved in one
# run, and the agent's RSS over ADD/DEL cycles; extra arguments go to it (--pods N,
# default 200; --cycles M, default 1000). (2) Devices: discovery of 1,024 VFs, Allocate
# latency, re-registration after a kubelet restart, health-change latency. (3) VF
# placement: the in-process sriov type against the same steps by `ip` commands. (4) The
# eBPF dataplane. (5) Bandwidth limits: accuracy at 10/100/1,000 Mbit/s and CPU per
# Gbit against the reference bandwidth plugin. (6) Hot-plug: annotation edit to
# interface, trellis attach/detach. (7) A cluster-sized API: 60,000 pods and 5,000 NADs
# in the fake API server; start to ready, RSS, API requests per ADD, CPU per update.
# (8) Node scale: 250 pods x 4 networks on one node; ADD/DEL latency of the last pods
# against the first, agent RSS and fds, `trellis stats` and /metrics with every pod up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins --locked
# The shim as it ships (static); the agent from the workspace build.
shim=$(bash scripts/build-shim.sh)
TRELLIS_BIN_DIR="$PWD/target/release" TRELLIS_SHIM="$shim" target/release/trellis-bench "$@"
echo
target/release/trellis-bench-devices
echo
target/release/trellis-bench-vf
echo
target/release/trellis-bench-dataplane
echo
target/release/trellis-bench-bandwidth
echo
TRELLIS_BIN_DIR="$PWD/target/release" target/release/trellis-bench-dynamic
echo
TRELLIS_BIN_DIR="$PWD/target/release" target/release/trellis-bench-api
echo
TRELLIS_BIN_DIR="$PWD/target/release" TRELLIS_SHIM="$shim" target/release/trellis-bench-scale
