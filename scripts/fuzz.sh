#!/usr/bin/env bash
# Fuzzes every parser of untrusted input with cargo-fuzz (libFuzzer, AddressSanitizer),
# each target for SECONDS (default 15; CI runs this short form from scripts/test.sh).
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   e.g. scripts/fuzz.sh 3600 acl nad
# Seeds are in fuzz/seeds/<target> (committed, small); what a run learns goes to
# fuzz/corpus/<target> (not committed) and is used again by the next run. A crash stops
# the run with the input in fuzz/artifacts/<target>/: make it a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
shift || true
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz missing (scripts/setup.sh installs it)" >&2; exit 1; }
# The sanitizer flags cannot build the eBPF object: the fuzz build embeds none.
export AYA_BUILD_SKIP=1
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(networks_annotation nad acl cni_conf_env agent_wire device_config records)
fi
(cd fuzz && cargo +nightly fuzz build -O >/dev/null)
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  out=$(cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1) || {
    # The panic message first (the tail is mostly the sanitizer's stack).
    echo "$out" | grep -A3 "panicked at" | head -12 || true
    echo "$out" | tail -40
    echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  }
  runs=$(echo "$out" | sed -n 's/^stat::number_of_executed_units: *//p' | tail -1)
  echo "fuzz: $t: ${runs:-?} executions in ${secs} s, corpus $(ls "fuzz/corpus/$t" | wc -l)"
done
