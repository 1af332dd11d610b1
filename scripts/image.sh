#!/usr/bin/env bash
# Builds the trellis image (the agent `trellis` and the shim `trellis-cni`, the shared
# libraries they load, the CA bundle, nothing else) as an OCI image-layout archive,
# offline: no docker, buildah or registry; only coreutils, tar, gzip, sha256sum, strip
# and ldd.
# The archive is what `ctr -n k8s.io images import FILE` takes on a node (containerd),
# and `podman load -i FILE` / `skopeo copy oci-archive:FILE docker://REG/...` too.
#
#   scripts/image.sh [--bin-dir DIR] [--tag REF] [--out FILE]
#   scripts/image.sh [--bin-dir DIR] --rootfs DIR   only lay out the root filesystem
#                                                   (for deploy/Containerfile)
#   scripts/image.sh --print-version                 the version the default tag has
#
# --bin-dir DIR  where trellis and trellis-cni are; without it:
#                cargo build --release --locked -p trellis-agent and target/release,
#                and the shim built static by scripts/build-shim.sh (it runs on
#                the host, whatever its C library)
# --tag REF      default localhost/trellis:VERSION (VERSION from agent/Cargo.toml),
#                the image deploy/trellis.yaml names
# --out FILE     default target/trellis-image.tar
#
# The layer is reproducible: same binaries and libraries, same digest (sorted names,
# owner 0:0, mtime 0, gzip without a name or time).
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "image: $*" >&2
  exit 1
}

# The package version: agent/Cargo.toml's own, or the workspace's.
cargo_version() {
  local v
  v=$(awk -F'"' '/^\[/ {s=$0} s=="[package]" && /^version *=/ {print $2; exit}' agent/Cargo.toml)
  if [ -z "$v" ] && grep -Eq '^version\.workspace *= *true' agent/Cargo.toml; then
    v=$(awk -F'"' '/^\[/ {s=$0} s=="[workspace.package]" && /^version *=/ {print $2; exit}' Cargo.toml)
  fi
  [ -n "$v" ] || die "no version in agent/Cargo.toml or Cargo.toml [workspace.package]"
  echo "$v"
}

CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

bin_dir=
tag=
out=target/trellis-image.tar
rootfs_only=
while (($#)); do
  case "$1" in
    --bin-dir | --tag | --out | --rootfs)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --bin-dir) bin_dir=$2 ;;
        --tag) tag=$2 ;;
        --out) out=$2 ;;
        --rootfs) rootfs_only=$2 ;;
      esac
      shift 2
      ;;
    --print-version)
      cargo_version
      exit 0
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument $1 (--help)" ;;
  esac
done

version=$(cargo_version)
tag=${tag:-localhost/trellis:$version}
# name[:port]/path:tag, lower-case name as the reference grammar wants; a digest makes
# no sense for an image built here. (Also keeps the JSON below free of quoting.)
[[ "$tag" =~ ^[a-z0-9]([a-z0-9._:-]*[a-z0-9])?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*:([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$ ]] \
  || die "--tag ${tag@Q} is not REGISTRY/NAME:TAG (lower-case name, a tag after the last ':')"
short_tag=${tag##*:}

shim=
if [ -z "$bin_dir" ]; then
  echo "image: cargo build --release --locked -p trellis-agent; scripts/build-shim.sh"
  cargo build --release --locked -p trellis-agent
  bin_dir=target/release
  # The shim goes onto hosts whatever their C library: static (scripts/build-shim.sh).
  shim=$(bash scripts/build-shim.sh)
fi
shim=${shim:-$bin_dir/trellis-cni}
[ -x "$bin_dir/trellis" ] || die "$bin_dir/trellis is missing (build it, or give --bin-dir)"
[ -x "$shim" ] || die "$shim is missing (build it, or give --bin-dir)"
for tool in strip ldd readelf tar gzip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing (binutils, libc-bin, tar, gzip, coreutils)"
done
if readelf -lW "$shim" | grep -q INTERP; then
  echo "image: warning: $shim is dynamically linked: it will not start on hosts with an older C library (scripts/build-shim.sh builds it static)" >&2
fi

# Lays out the root filesystem in $1 (which must not exist, or be empty).
make_rootfs() {
  local root=$1 b lib libs=()
  if [ -e "$root" ] && [ -n "$(ls -A "$root")" ]; then
    die "$root is not empty"
  fi
  mkdir -p "$root"
  chmod 755 "$root"
  install -d -m 755 "$root/usr/local/bin" "$root/etc/trellis" "$root/run" "$root/var" \
    "$root/proc" "$root/sys" "$root/dev"
  install -d -m 1777 "$root/tmp"
  # Runtimes expect /var/run; the agent uses nothing there.
  ln -s /run "$root/var/run"
  # The CA bundle, for an API server reached through a kubeconfig whose CA is a public
  # one (in-cluster, the service account's own CA is used).
  [ -s "$CA_BUNDLE" ] || die "$CA_BUNDLE is missing (apt-get install ca-certificates)"
  install -d -m 755 "$root/etc/ssl/certs"
  install -m 644 "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\n' > "$root/etc/group"
  chmod 644 "$root/etc/passwd" "$root/etc/group"
  # The Kubernetes client loads the system's CA roots beside the service account's CA
  # and will not start with none: Debian's bundle (package ca-certificates).
  [ -f /etc/ssl/certs/ca-certificates.crt ] \
    || die "/etc/ssl/certs/ca-certificates.crt is missing (apt-get install ca-certificates)"
  install -d -m 755 "$root/etc/ssl/certs"
  install -m 644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  local src
  for b in trellis trellis-cni; do
    src=$bin_dir/$b
    [ "$b" = trellis-cni ] && src=$shim
    # Debug info off (a debug build's is tens of MB); the symbol table stays, so a
    # panic's backtrace still names functions.
    strip --strip-debug -o "$root/usr/local/bin/$b" "$src"
    chmod 755 "$root/usr/local/bin/$b"
    # Every shared library the binary loads, and the dynamic loader, at the path ldd
    # resolves it to here (copied, not linked: the image has no /usr/lib merge).
    local out
    if ! out=$(ldd "$src" 2>&1); then
      grep -q 'not a dynamic executable' <<<"$out" || die "ldd $src: $out"
      continue
    fi
    if grep -q 'not found' <<<"$out"; then
      die "ldd $src: a library is missing: $(grep 'not found' <<<"$out")"
    fi
    while read -r lib; do libs+=("$lib"); done < <(
      awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out"
    )
  done
  for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
    [ -e "$root$lib" ] && continue
    install -d -m 755 "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
    chmod 755 "$root$lib"
  done
  # The binaries must start in this root alone (no host library leaking in).
  if [ "$(id -u)" = 0 ] && command -v chroot >/dev/null; then
    chroot "$root" /usr/local/bin/trellis --version >/dev/null \
      || die "the rootfs is incomplete: /usr/local/bin/trellis does not start in it"
  fi
}

if [ -n "$rootfs_only" ]; then
  make_rootfs "$rootfs_only"
  echo "image: root filesystem in $rootfs_only ($(du -sh "$rootfs_only" | cut -f1))"
  exit 0
fi

mkdir -p "$(dirname "$out")" target
work=$(mktemp -d target/image.XXXXXX)
trap 'rm -rf "$work"' EXIT
make_rootfs "$work/rootfs"

# The layer: deterministic tar, then gzip without name and time.
tar_det() {
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu "$@"
}
(cd "$work/rootfs" && LC_ALL=C ls -A) > "$work/top"
mapfile -t top < "$work/top"
tar_det -C "$work/rootfs" -cf "$work/layer.tar" -- "${top[@]}"
gzip -n -9 -c "$work/layer.tar" > "$work/layer.tar.gz"

blobs=$work/layout/blobs/sha256
mkdir -p "$blobs"
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
# Puts a file into blobs/ and prints "sha256:HEX SIZE".
put_blob() {
  local h
  h=$(sha "$1")
  cp "$1" "$blobs/$h"
  echo "sha256:$h $(size "$1")"
}

diff_id="sha256:$(sha "$work/layer.tar")"
read -r layer_digest layer_size < <(put_blob "$work/layer.tar.gz")

# OCI image config: amd64/linux, the uncompressed layer's digest as its diff_id.
printf '%s' '{"architecture":"amd64","os":"linux",'\
'"config":{"Entrypoint":["/usr/local/bin/trellis"],'\
'"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/",'\
'"Labels":{"org.opencontainers.image.title":"trellis","org.opencontainers.image.version":"'"$version"'"}},'\
'"rootfs":{"type":"layers","diff_ids":["'"$diff_id"'"]},'\
'"history":[{"created":"1970-01-01T00:00:00Z","created_by":"scripts/image.sh"}]}' > "$work/config.json"
read -r config_digest config_size < <(put_blob "$work/config.json")

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'\
'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'"$config_digest"'","size":'"$config_size"'},'\
'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"'"$layer_digest"'","size":'"$layer_size"'}]}' \
  > "$work/manifest.json"
read -r manifest_digest manifest_size < <(put_blob "$work/manifest.json")

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{'\
'"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'"$manifest_digest"'","size":'"$manifest_size"','\
'"platform":{"architecture":"amd64","os":"linux"},'\
'"annotations":{"io.containerd.image.name":"'"$tag"'","org.opencontainers.image.ref.name":"'"$short_tag"'"}}]}' \
  > "$work/layout/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$work/layout/oci-layout"

tar_det -C "$work/layout" -cf "$work/image.tar" oci-layout index.json blobs
mv "$work/image.tar" "$out"

mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "image: $tag -> $out"
echo "image: manifest $manifest_digest"
echo "image: layer $(mib "$layer_size") compressed, $(mib "$(size "$work/layer.tar")") uncompressed; archive $(mib "$(size "$out")")"
echo "image: on a node: ctr -n k8s.io images import $out"
