#!/usr/bin/env bash
# Builds a small busybox initramfs (gzip'd newc cpio) for the QEMU boot tests.
#
#   tests/qemu/mkinitramfs.sh KERNEL_DIR INIT OUT [FILE...]
#
# KERNEL_DIR: a kernel unpacked by fetch-kernel.sh; the modules named in
#   $MODULES (default: virtio_pci virtio_blk, the virtio disk) and those
#   they depend on are copied from it (uncompressed .ko, as Debian ships
#   them) and listed, in load order, in /etc/modules for INIT to insmod.
# INIT: the script that becomes /init (run by busybox sh).
# FILE...: extra host files copied to the same path, with the shared
#   libraries they need (from ldd), e.g. the abup binary.
# $BUSYBOX: the static busybox to use (default: busybox-static's
#   /bin/busybox), so another architecture can pass its own.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: mkinitramfs.sh KERNEL_DIR INIT OUT [FILE...]" >&2; exit 2; }
kdir=$1 init=$2 out=$3
shift 3
busybox=${BUSYBOX:-/bin/busybox}
modules=${MODULES:-virtio_pci virtio_blk}
file "$busybox" | grep -q "statically linked" || { echo "mkinitramfs.sh: $busybox is not static (install busybox-static)" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,tmp,run,etc,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
# The kernel opens /dev/console before devtmpfs is mounted.
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
install -m 755 "$init" "$root/init"

: >"$root/etc/modules"
# Each module after the modules it depends on (its modinfo `depends=`).
add_module() {
    local ko dep
    grep -qx "/lib/modules/$1.ko" "$root/etc/modules" && return 0
    ko=$(find "$kdir"/lib/modules -name "$1.ko" | head -n1)
    [ -n "$ko" ] || return 0      # built into this kernel
    for dep in $(strings "$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_module "$dep"
    done
    cp "$ko" "$root/lib/modules/"
    echo "/lib/modules/$1.ko" >>"$root/etc/modules"
}
for m in $modules; do
    add_module "$m"
done

for f in "$@"; do
    mkdir -p "$root$(dirname "$f")"
    rm -f "$root$f"     # never write through a busybox applet link
    cp -L "$f" "$root$f"
    # Shared libraries, if it is a dynamic executable.
    if ldd "$f" >/dev/null 2>&1; then
        for lib in $(ldd "$f" | grep -o '/[^ ]*'); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    fi
done
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 >"$out"
