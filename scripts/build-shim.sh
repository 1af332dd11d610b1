#!/usr/bin/env bash
# Builds the shim `trellis-cni` as it ships: release, statically linked, not
# position-independent. `trellis install` copies it onto the host, whose C library
# may be older than the one it was built against (a dynamic shim built on Debian 12
# would not start on a host with glibc < 2.34); and the runtime execs it on every
# ADD and DEL, where a static binary skips the dynamic loader (~0.3-0.4 ms here).
# Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
triple=$(rustc -vV | sed -n 's/^host: //p')
# An explicit --target keeps these flags off build scripts and the workspace's own
# target dir: only the shim's crates are built this way, under target/$triple.
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked -p trellis-shim --bin trellis-cni --target "$triple" >&2
bin="${CARGO_TARGET_DIR:-$PWD/target}/$triple/release/trellis-cni"
# Static: no program interpreter (the dynamic loader) in its program headers.
if readelf -lW "$bin" | grep -q 'INTERP'; then
  echo "build-shim: $bin is dynamically linked (is libc6-dev installed?)" >&2
  exit 1
fi
echo "$bin"
