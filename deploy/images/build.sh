#!/usr/bin/env bash
# Builds vmdisk's three container images and pushes them, with no Docker engine and no
# base-image pull: buildah (vfs storage, chroot isolation) builds FROM scratch and ADDs root
# filesystems as tarballs, which keep file ownership (`buildah copy` of a directory does not).
#
#   <registry>/vmdisk/webhook:<tag>      the binary, its shared libraries, CA certificates,
#   <registry>/vmdisk/controller:<tag>   user 65532; a few MiB each
#   <registry>/vmdisk/cache-agent:<tag>  Debian minbase (debootstrap) with qemu-utils, and the
#                                        binary; also what populator pods run
#
# Usage: bash deploy/images/build.sh --registry HOST:PORT [--tag TAG] [options]
#   --registry HOST:PORT  where the images go (required)
#   --tag TAG             image tag (default: the workspace version)
#   --binaries DIR        take vmdisk-webhook, vmdisk-controller and vmdisk-cache-agent from
#                         DIR (default: build them with `cargo build --release --locked`)
#   --insecure            push over plain HTTP (a registry on a trusted network)
#   --no-push             build into buildah's local storage only
#   --archive DIR         also write each image as a docker-archive, DIR/<name>.tar
#   --mirror URL          Debian mirror for debootstrap (default http://deb.debian.org/debian)
# Needs: buildah, debootstrap (root), ldd, tar; cargo unless --binaries is given.
# The Debian root filesystem is cached in ${VMDISK_IMAGE_CACHE:-~/.cache/vmdisk-images}.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

registry="" tag="" binaries="" insecure="" push=1 archive="" mirror="http://deb.debian.org/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) registry=${2:?--registry needs HOST:PORT}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --binaries) binaries=${2:?--binaries needs a directory}; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --no-push) push=""; shift ;;
    --archive) archive=${2:?--archive needs a directory}; shift 2 ;;
    --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$registry" ] || { echo "build.sh: --registry HOST:PORT is required" >&2; usage; }
[ -n "$tag" ] || tag=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)
for tool in buildah debootstrap ldd tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build.sh: $tool is missing (apt-get install buildah debootstrap)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "build.sh: debootstrap and buildah's chroot isolation need root" >&2; exit 1; }

if [ -z "$binaries" ]; then
  (cd "$root" && cargo build --release --locked -p vmdisk-webhook -p vmdisk-controller -p vmdisk-cache-agent)
  binaries="$root/target/release"
fi
for b in vmdisk-webhook vmdisk-controller vmdisk-cache-agent; do
  [ -x "$binaries/$b" ] || { echo "build.sh: $binaries/$b is missing" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ba=(buildah --storage-driver vfs)

# A tree holding one binary (stripped of debug info) under /usr/local/bin.
binary_tree() { # NAME DIR
  install -d "$2/usr/local/bin"
  install -m 0755 "$binaries/$1" "$2/usr/local/bin/$1"
  strip --strip-debug "$2/usr/local/bin/$1" 2>/dev/null || true
}
pack() { # DIR TARBALL: root-owned, numeric ids
  tar --numeric-owner --owner=0 --group=0 -C "$1" -cf "$2" .
}

# webhook and controller: the binary and exactly the libraries it links, CA certificates, a
# non-root user.
slim_rootfs() { # NAME: $work/NAME-rootfs.tar from vmdisk-NAME
  local tree="$work/$1-tree" lib
  binary_tree "vmdisk-$1" "$tree"
  for lib in $(ldd "$binaries/vmdisk-$1" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    install -d "$tree$(dirname "$lib")"
    cp -L "$lib" "$tree$lib"
  done
  install -d "$tree/etc/ssl/certs" "$tree/tmp"
  chmod 1777 "$tree/tmp"
  [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$tree/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' > "$tree/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$tree/etc/group"
  pack "$tree" "$work/$1-rootfs.tar"
}
slim_rootfs webhook
slim_rootfs controller

# cache-agent: Debian minbase + qemu-utils (cached), then the binary.
cache="${VMDISK_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmdisk-images}"
rootfs="$cache/debian-bookworm-qemu-utils.tar"
if [ ! -s "$rootfs" ]; then
  mkdir -p "$cache"
  debian="$work/debian"
  echo "build.sh: debootstrap (Debian bookworm minbase + qemu-utils) from $mirror" >&2
  debootstrap --variant=minbase --include=qemu-utils,ca-certificates bookworm "$debian" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$debian"/usr/share/{doc,man,info,locale}/* "$debian"/var/cache/apt/* "$debian"/var/lib/apt/lists/* "$debian"/var/log/*
  pack "$debian" "$rootfs.partial"
  mv "$rootfs.partial" "$rootfs"
fi
cp "$rootfs" "$work/debian-rootfs.tar"
binary_tree vmdisk-cache-agent "$work/agent-tree"
pack "$work/agent-tree" "$work/cache-agent.tar"

for name in webhook controller cache-agent; do
  image="$registry/vmdisk/$name:$tag"
  "${ba[@]}" bud --quiet --isolation chroot --layers=false -f "$here/$name.Containerfile" -t "$image" "$work" >/dev/null
  size=$("${ba[@]}" images --format '{{.Size}}' "$image" | head -n 1)
  echo "built $image ($size)"
  if [ -n "$push" ]; then
    "${ba[@]}" push --quiet ${insecure:+--tls-verify=false} "$image" "docker://$image"
    echo "pushed $image"
  fi
  if [ -n "$archive" ]; then
    mkdir -p "$archive"
    rm -f "$archive/$name.tar"
    "${ba[@]}" push --quiet "$image" "docker-archive:$archive/$name.tar:$image"
  fi
done
