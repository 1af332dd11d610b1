#!/usr/bin/env bash
# Setup, then the whole test suite: format, lints, unit tests, privileged integration
# tests (network namespaces, reference CNI plugins, real containerd). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# The build output fills ~7 GB (target/ and the fuzzers' sanitizer build in fuzz/target);
# a full disk shows up much later as a linker killed by SIGBUS, so say what is free now.
free_gb=$(df --output=avail -B1G . 2>/dev/null | tail -n 1 | tr -d ' ') || free_gb=
if [[ $free_gb =~ ^[0-9]+$ ]]; then
  echo "test: ${free_gb} GB free here; the build output fills about 7 GB"
  if ((free_gb < 9)); then
    echo "test: warning: less than 9 GB free; a linker may die of SIGBUS (disk full)." \
      "'cargo clean' and 'rm -r fuzz/target' free older builds" >&2
  fi
fi
bash scripts/setup.sh
if [ "$(id -u)" != 0 ]; then
  echo "test: the integration tests need root (network namespaces, containerd)" >&2
  exit 1
fi
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The rigs run the built binaries (agent and shim) as a runtime would.
cargo build --workspace --bins --locked
# The manifests in deploy/: the combined file is current, and every object, the agent's
# config and the device pools check out (strict schemas, and the trellis just built).
bash scripts/gen-deploy.sh --check
bash scripts/check-deploy.sh
cargo test --workspace --locked -- --test-threads=2
# The benchmark and the demo still run end to end (tiny sizes; figures not judged here).
# The bench's CNI path through the shim as it ships (static, scripts/build-shim.sh).
shim=$(bash scripts/build-shim.sh)
TRELLIS_SHIM="$shim" target/debug/trellis-bench --pods 4 --cycles 4 >/dev/null
target/debug/trellis-bench-devices --quick >/dev/null
target/debug/trellis-bench-vf --rounds 3 >/dev/null
target/debug/trellis-bench-dataplane --quick >/dev/null
target/debug/trellis-bench-dynamic --quick >/dev/null
target/debug/trellis-bench-api --quick >/dev/null
target/debug/trellis-bench-scale --quick >/dev/null
target/debug/trellis-demo >/dev/null
# The endurance suite, short form (scripts/churn.sh runs the long one): 100 pods
# through containerd under faults; fails on any leak or a pod missing a network.
target/debug/trellis-churn --lifecycles 100
# Every parser of untrusted input, fuzzed briefly (scripts/fuzz.sh SECONDS for longer).
bash scripts/fuzz.sh 10
