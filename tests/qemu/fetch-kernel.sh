#!/usr/bin/env bash
# Fetches a Debian kernel for the QEMU boot tests and prints the directory it
# was unpacked into (it holds boot/vmlinuz-* and lib/modules/*).
#
#   tests/qemu/fetch-kernel.sh [ARCH]     ARCH: amd64 (default) or arm64
#
# amd64 takes linux-image-cloud-amd64's kernel, arm64 linux-image-arm64's
# (`apt-get download` of the versioned package the meta-package depends on,
# unpacked with `dpkg -x`). Downloads are cached in $ABUP_TEST_CACHE
# (default /var/cache/abup-tests), so reruns fetch nothing.
set -euo pipefail
arch=${1:-amd64}
cache=${ABUP_TEST_CACHE:-/var/cache/abup-tests}
case "$arch" in
    amd64) meta=linux-image-cloud-amd64 ;;
    arm64) meta=linux-image-arm64 ;;
    *) echo "fetch-kernel.sh: unknown arch $arch (amd64 or arm64)" >&2; exit 2 ;;
esac
mkdir -p "$cache"
cd "$cache"
# Reuse an unpacked kernel for this arch if there is one.
for d in kernel-"$arch"-*/; do
    if [ -d "$d" ] && ls "$d"boot/vmlinuz-* >/dev/null 2>&1; then
        echo "$cache/${d%/}"
        exit 0
    fi
done
foreign=()
[ "$arch" = "$(dpkg --print-architecture)" ] || foreign=(-o "APT::Architectures::=$arch")
pkg=$(apt-cache "${foreign[@]}" depends "$meta:$arch" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$pkg" ]; then
    apt-get update -qq >&2
    pkg=$(apt-cache "${foreign[@]}" depends "$meta:$arch" | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$pkg" ] || { echo "fetch-kernel.sh: no kernel package behind $meta:$arch" >&2; exit 1; }
pkg=${pkg%%:*}
ls "$pkg"_*_"$arch".deb >/dev/null 2>&1 || apt-get download "$pkg:$arch" >&2
deb=$(ls "$pkg"_*_"$arch".deb | head -n1)
out="kernel-$arch-$pkg"
rm -rf "$out.tmp"
dpkg -x "$deb" "$out.tmp"
mv "$out.tmp" "$out"
echo "$cache/$out"
