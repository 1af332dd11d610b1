#!/usr/bin/env bash
# The endurance suite, long form, as root: 1,000 pod lifecycles through containerd,
# 4 at a time, each pod on 4 networks, with faults injected at random (a delegate that
# fails or hangs past its timeout, the agent SIGKILLed mid-ADD/DEL, containerd and the
# kubelet restarted, NADs edited and deleted, a reboot every 250 lifecycles). Prints the
# figures; exits 1 on any leak or any pod Ready without every network. The test suite
# runs the short form (100 lifecycles). Extra arguments go to trellis-churn
# (--lifecycles N, --seed S).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins --locked
TRELLIS_BIN_DIR="$PWD/target/release" target/release/trellis-churn --lifecycles 1000 "$@"
