#!/usr/bin/env bash
# Counts the system calls abup's tarball extractor makes per file, against
# GNU tar extracting the same tarball onto the same kind of fresh ext4.
#
#   bash tests/bench/tar_syscalls.sh [ABUP_BINARY] [FILES]
#
# Builds a GPT disk image (boot, rootA, rootB), a tree of FILES small files
# (default 3000) in 100 directories with xattrs on some, a bundle of it, then
# runs `strace -c -f abup install` and `strace -c -f tar --xattrs -xpf` onto
# a freshly formatted slot, and prints statx and total calls per file. Needs
# root, strace, sgdisk, mkfs.ext4, grub-editenv, GNU tar.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
abup=${1:-${CARGO_TARGET_DIR:-$here/target}/release/abup}
files=${2:-3000}
[ -x "$abup" ] || { echo "tar_syscalls.sh: no abup binary at $abup (cargo build --release)" >&2; exit 1; }
work=$(mktemp -d /tmp/abup-tar-syscalls.XXXXXX)
loops=()
cleanup() {
    mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
    for l in "${loops[@]}"; do [ -n "$l" ] && losetup -d "$l" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

part_loop() {
    local start sectors
    read -r start sectors < <(partx -g -o START,SECTORS -n "$1" disk.img)
    dev=$(losetup --find --show --offset $((start * 512)) --sizelimit $((sectors * 512)) disk.img)
    loops+=("$dev")
}

truncate -s 500M disk.img
sgdisk --clear -n 1:0:+16M -c 1:boot -n 2:0:+200M -c 2:rootA -n 3:0:+200M -c 3:rootB disk.img >/dev/null
mkdir mnt
part_loop 1
mkfs.ext4 -q -L boot "$dev"
mount "$dev" mnt
mkdir mnt/grub
grub-editenv mnt/grub/grubenv create
grub-editenv mnt/grub/grubenv set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0 ABUP_MAX_TRIES=3
umount mnt

mkdir -p tree/etc state keys
echo "VERSION=2" >tree/etc/os-release
for d in $(seq 1 100); do
    mkdir -p "tree/usr/share/d$d"
    for f in $(seq 1 $((files / 100))); do
        echo "file $d/$f" >"tree/usr/share/d$d/f$f"
    done
    setfattr -n user.tag -v "dir $d" "tree/usr/share/d$d/f1"
done
"$abup" keygen --secret keys/k --public keys/k.pub >/dev/null
cat >system.toml <<CONF
compatible = "bench"
state_dir = "$work/state"
[disk]
device = "$work/disk.img"
[slots.A]
partlabel = "rootA"
[slots.B]
partlabel = "rootB"
[boot]
backend = "grub"
[boot.grub]
partlabel = "boot"
path = "grub/grubenv"
[keys]
trusted = ["$work/keys/k.pub"]
CONF
"$abup" bundle create --rootfs tree --version 2.0.0 --compatible bench \
    --compression none --key keys/k -o b.abup >/dev/null
tar --create --xattrs --xattrs-include='*' --numeric-owner -C tree -f tree.tar .
entries=$(tar -tf tree.tar | wc -l)

count() { # strace -c output file → "statx-family total"
    awk '$NF ~ /^(statx|newfstatat|fstat|lstat|stat)$/ { s += $4 }
         $NF == "total" { t = $4 }
         END { print s + 0, t + 0 }' "$1"
}
strace -c -f -o abup.strace "$abup" --config system.toml --booted-slot A install b.abup --no-activate >/dev/null
read -r a_stat a_total < <(count abup.strace)

part_loop 3
mkfs.ext4 -q -F "$dev"
mount "$dev" mnt
strace -c -f -o tar.strace tar --xattrs --xattrs-include='*' -xpf tree.tar -C mnt
sync -f mnt
umount mnt
read -r t_stat t_total < <(count tar.strace)

printf '%s entries in the tarball\n' "$entries"
printf 'abup install (whole run): %s stat-family calls (%.2f per entry), %s syscalls (%.2f per entry)\n' \
    "$a_stat" "$(echo "$a_stat / $entries" | bc -l)" "$a_total" "$(echo "$a_total / $entries" | bc -l)"
printf 'GNU tar -xpf:             %s stat-family calls (%.2f per entry), %s syscalls (%.2f per entry)\n' \
    "$t_stat" "$(echo "$t_stat / $entries" | bc -l)" "$t_total" "$(echo "$t_total / $entries" | bc -l)"
if [ -n "${VERBOSE:-}" ]; then cat abup.strace; fi
