#!/usr/bin/env bash
# Installs everything trellis needs to build and test on Debian 12, idempotently: apt
# packages only when one is missing, so a second run takes a second or two.
set -euo pipefail

APT_PACKAGES=(
  containerd runc containernetworking-plugins  # the CRI runtime and reference CNI plugins
  protobuf-compiler                            # tonic/prost builds (CRI, kubelet APIs)
  iproute2 iputils-ping util-linux procps      # ip, ping, nsenter
  gcc libc6-dev                                # the static pause binary for the local image
  tar coreutils
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Rust toolchain pinned in rust-toolchain.toml (1.95.0) must already be there: no
# toolchain can be downloaded on these machines.
if ! rustup run 1.95.0 rustc --version >/dev/null 2>&1; then
  echo "setup: the Rust 1.95.0 toolchain is missing (rustup toolchain list)" >&2
  exit 1
fi
rustup component add --toolchain 1.95.0 rustfmt clippy >/dev/null 2>&1 || true
echo "setup: ok"
