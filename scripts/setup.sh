#!/usr/bin/env bash
# Installs everything trellis needs to build and test on Debian 12, idempotently: apt
# packages only when one is missing, so a second run takes a second or two.
set -euo pipefail

APT_PACKAGES=(
  containerd runc containernetworking-plugins  # the CRI runtime and reference CNI plugins
  protobuf-compiler                            # tonic/prost builds (CRI, kubelet APIs)
  iproute2 iputils-ping util-linux procps      # ip, ping, nsenter
  iptables                                     # the dataplane bench's iptables comparison
  iperf3                                       # bandwidth limits measured between pods
  gcc libc6-dev binutils                       # the static pause binary; strip for guest images
  tar coreutils xz-utils zstd grep             # unpacking the guest kernel and its modules
  dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23  # testpmd vhost-user switch
  ca-certificates gzip                         # the image's CA bundle, its compressed layer
  python3 python3-venv                         # kubernetes-validate for deploy/ (scripts/check-deploy.sh)
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

# QEMU 10 (its igb NIC has SR-IOV VFs; bookworm's 7.2 lacks igb) and busybox-static
# come from bookworm-backports, through a sources list of our own: /etc is not touched.
BPO_DIR=/var/cache/trellis/apt-backports
bpo_apt() {
  apt-get -o Dir::Etc::SourceList="$BPO_DIR/sources.list" -o Dir::State::Lists="$BPO_DIR/lists" "$@"
}
bpo_ready=
bpo_update() {
  if [ -z "$bpo_ready" ]; then
    mkdir -p "$BPO_DIR/lists/partial"
    echo "deb http://deb.debian.org/debian bookworm-backports main" > "$BPO_DIR/sources.list"
    bpo_apt update -qq
    bpo_ready=1
  fi
}
# (no qemu yet on a fresh machine: the pipeline fails, which is not an error here)
qemu_major=$( (qemu-system-x86_64 --version 2>/dev/null || true) | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
if [ "${qemu_major:-0}" -lt 10 ] || ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  echo "setup: installing qemu-system-x86 and busybox-static from bookworm-backports"
  bpo_update
  DEBIAN_FRONTEND=noninteractive bpo_apt -t bookworm-backports install -y -qq --no-install-recommends \
    qemu-system-x86 busybox-static >/dev/null
fi

# The guest kernel for the SR-IOV tests: backports' current 6.12 image (clsact, cls_bpf, igb,
# igbvf, vfio-pci), its ELF vmlinux unpacked once (booting the bzImage costs ~8 s of
# decompression under TCG), and the modules the guest loads, uncompressed.
GUEST_DIR=/var/cache/trellis/guest
GUEST_MODULES=(dca i2c-algo-bit igb igbvf irqbypass vfio vfio_iommu_type1 vfio-pci-core vfio-pci sch_ingress cls_bpf veth ifb sch_htb sch_fq)
guest_ok=1
[ -s "$GUEST_DIR/vmlinux" ] || guest_ok=
for m in "${GUEST_MODULES[@]}"; do [ -s "$GUEST_DIR/modules/$m.ko" ] || guest_ok=; done
if [ -z "$guest_ok" ]; then
  bpo_update
  kpkg=$(apt-cache -o Dir::Etc::SourceList="$BPO_DIR/sources.list" -o Dir::State::Lists="$BPO_DIR/lists" \
    depends -t bookworm-backports linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  echo "setup: unpacking guest kernel $kpkg into $GUEST_DIR"
  work=$(mktemp -d)
  (cd "$work" && bpo_apt download -qq "$kpkg" 2>/dev/null && dpkg-deb -x ./*.deb x)
  rm -rf "$GUEST_DIR.new" && mkdir -p "$GUEST_DIR.new/modules"
  vmlinuz=$(ls "$work"/x/boot/vmlinuz-*)
  # The zstd stream inside the bzImage whose output is an ELF file is the kernel.
  for off in $(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$vmlinuz" | cut -d: -f1); do
    tail -c +$((off + 1)) "$vmlinuz" | zstd -dcq 2>/dev/null > "$GUEST_DIR.new/vmlinux" || true
    if [ "$(head -c 4 "$GUEST_DIR.new/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then break; fi
  done
  [ "$(head -c 4 "$GUEST_DIR.new/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] \
    || { echo "setup: no ELF kernel found in $vmlinuz" >&2; exit 1; }
  for m in "${GUEST_MODULES[@]}"; do
    ko=$(find "$work/x/lib/modules" -name "$m.ko.xz" | head -1)
    [ -n "$ko" ] || { echo "setup: module $m not in $kpkg" >&2; exit 1; }
    xz -dc "$ko" > "$GUEST_DIR.new/modules/$m.ko"
  done
  echo "$kpkg" > "$GUEST_DIR.new/kernel"
  rm -rf "$GUEST_DIR" && mv "$GUEST_DIR.new" "$GUEST_DIR"
  rm -rf "$work"
fi

# The Rust toolchain pinned in rust-toolchain.toml (1.95.0) must already be there: no
# toolchain can be downloaded on these machines.
if ! rustup run 1.95.0 rustc --version >/dev/null 2>&1; then
  echo "setup: the Rust 1.95.0 toolchain is missing (rustup toolchain list)" >&2
  exit 1
fi
rustup component add --toolchain 1.95.0 rustfmt clippy >/dev/null 2>&1 || true

# The eBPF programs (ebpf/programs) build with nightly (on these machines) plus its
# rust-src, and bpf-linker 0.10.0 (it uses rustc's own LLVM; ~2 min to build once).
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "setup: the nightly toolchain is missing (rustup toolchain list)" >&2
  exit 1
fi
rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src' \
  || rustup component add rust-src --toolchain nightly >/dev/null
if [ "$(bpf-linker --version 2>/dev/null | awk '{print $2}')" != "0.10.0" ]; then
  echo "setup: installing bpf-linker 0.10.0 (takes a couple of minutes)"
  cargo install bpf-linker@0.10.0 --locked --quiet
fi
# cargo-fuzz (libFuzzer) for the fuzz targets in fuzz/ (~40 s to build once).
if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "0.13.2" ]; then
  echo "setup: installing cargo-fuzz 0.13.2"
  cargo install cargo-fuzz@0.13.2 --locked --quiet
fi
# bpffs, where the dataplane pins its maps and links.
if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" != "bpf_fs" ]; then
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi
echo "setup: ok"
