#!/usr/bin/env bash
# Builds the operator image with buildah into an OCI archive.
#   scripts/image.sh rootfs [PROFILE]   stage image/rootfs from static builds (PROFILE: release or dev)
#   scripts/image.sh build [PROFILE]    rootfs, then `buildah bud` -> $CARGO_TARGET_DIR (or target)/image/ep-operator.oci.tar
# The binaries are linked statically against glibc (crt-static, static-pie): only the final link
# changes, so the workspace's already-built dependencies are reused.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
what=${1:-build}
profile=${2:-release}
cargo=${CARGO:-cargo}
dir=$([[ $profile == dev ]] && echo debug || echo "$profile")
target=${CARGO_TARGET_DIR:-$root/target}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

stage() {
  for bin in ep-operator:ep-operator ep-runner:ep-runner; do
    pkg=${bin%%:*}; name=${bin##*:}
    extra=()
    [[ $profile == release ]] && extra=(-C strip=symbols)
    "$cargo" rustc --locked -q --profile "$profile" -p "$pkg" --bin "$name" -- -C target-feature=+crt-static "${extra[@]}"
  done
  rm -rf image/rootfs
  mkdir -p image/rootfs/usr/local/bin image/rootfs/etc/ssl/certs image/rootfs/tmp
  chmod 1777 image/rootfs/tmp
  for b in ep-operator ep-runner; do
    install -m 0755 "$target/$dir/$b" "image/rootfs/usr/local/bin/$b"
    out=$(ldd "image/rootfs/usr/local/bin/$b" 2>&1 || true)
    if [[ $out != *"statically linked"* && $out != *"not a dynamic executable"* ]]; then
      echo "image: $b is dynamically linked: $out" >&2; exit 1
    fi
  done
  cp /etc/ssl/certs/ca-certificates.crt image/rootfs/etc/ssl/certs/ca-certificates.crt
  printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' > image/rootfs/etc/passwd
  printf 'root:x:0:\nnonroot:x:65532:\n' > image/rootfs/etc/group
}

build() {
  command -v buildah >/dev/null || {
    echo "image: installing buildah" >&2
    sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends buildah >/dev/null
  }
  mkdir -p "$target/image"
  rm -f "$target/image/ep-operator.oci.tar"
  revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  # chroot isolation builds FROM scratch images without a container runtime or network.
  buildah --storage-driver vfs bud --isolation chroot --quiet -f Containerfile \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    -t "localhost/ep-operator:$version" . >/dev/null
  buildah --storage-driver vfs push --quiet "localhost/ep-operator:$version" "oci-archive:$target/image/ep-operator.oci.tar:ep-operator:$version"
  buildah --storage-driver vfs rmi "localhost/ep-operator:$version" >/dev/null 2>&1 || true
  echo "$target/image/ep-operator.oci.tar (ep-operator:$version)"
}

case $what in
  rootfs) stage ;;
  build) stage; build ;;
  *) echo "usage: $0 rootfs|build [release|dev]" >&2; exit 2 ;;
esac
