#!/usr/bin/env bash
# Builds a GPT disk image that boots abup's GRUB backend under both UEFI
# (OVMF) and legacy BIOS (SeaBIOS), with Debian's GRUB and the repo's
# boot-backends/grub/grub.cfg unchanged.
#
#   tests/qemu/grub-disk.sh OUT.img
#
# Partitions (GPT labels): 1 bios (BIOS boot, GRUB's core.img), 2 esp (FAT,
# EFI/BOOT/BOOTX64.EFI), 3 boot (ext4: grub/grub.cfg, grub/grubenv, GRUB's
# modules), 4 rootA, 5 rootB (empty: abup installs them), 6 data (ext4,
# label "data"). The grubenv starts with nothing bootable: the first install
# (--target-slot A from the host) makes A primary.
#
# GRUB images are made with grub-mkimage from grub-efi-amd64-bin and
# grub-pc-bin; an embedded early config finds the boot partition by its
# filesystem UUID, as grub-install's does. grub-bios-setup refuses image
# files, so the BIOS half is set up on a loop device over the image.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: grub-disk.sh OUT.img" >&2; exit 2; }
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cfg="$here/boot-backends/grub/grub.cfg"

work=$(mktemp -d)
loop=""
mnt=""
cleanup() {
    if [ -n "$mnt" ] && mountpoint -q "$mnt"; then umount "$mnt"; fi
    if [ -n "$loop" ]; then partx -d "$loop" 2>/dev/null || true; losetup -d "$loop"; fi
    rm -rf "$work"
}
trap cleanup EXIT

rm -f "$out"
truncate -s 260M "$out"
sgdisk --clear \
    -n 1:0:+1M -t 1:EF02 -c 1:bios \
    -n 2:0:+8M -t 2:EF00 -c 2:esp \
    -n 3:0:+24M -c 3:boot \
    -n 4:0:+100M -c 4:rootA \
    -n 5:0:+100M -c 5:rootB \
    -n 6:0:0 -c 6:data "$out" >/dev/null

# Everything else through a loop device over the image: grub-bios-setup
# refuses image files, and guesses the disk from where its files are.
loop=$(losetup --find --show "$out")
partx -a "$loop"
mkfs.ext4 -q -L boot "${loop}p3"
mkfs.ext4 -q -L data "${loop}p6"
uuid=$(blkid -s UUID -o value "${loop}p3")
mnt="$work/mnt"
mkdir -p "$mnt"
mount "${loop}p3" "$mnt"
mkdir -p "$mnt/grub/x86_64-efi" "$mnt/grub/i386-pc"
cp /usr/lib/grub/x86_64-efi/*.mod /usr/lib/grub/x86_64-efi/*.lst "$mnt/grub/x86_64-efi/"
cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst /usr/lib/grub/i386-pc/boot.img "$mnt/grub/i386-pc/"
cp "$cfg" "$mnt/grub/grub.cfg"
grub-editenv "$mnt/grub/grubenv" create
grub-editenv "$mnt/grub/grubenv" set ORDER="A B" A_OK=0 A_TRY=0 A_GOOD=0 B_OK=0 B_TRY=0 B_GOOD=0 ABUP_MAX_TRIES=3

# The embedded early config finds the boot partition, and exports the one
# setting the tests need (grub.cfg stays the repo's, byte for byte): the
# kernel console on the serial port the tests read, and no_timer_check,
# because under TCG on a loaded host the kernel's IO-APIC timer check fails
# and panics before init runs ("..MP-BIOS bug: 8254 timer not connected to
# IO-APIC", "Kernel panic - not syncing: IO-APIC + timer doesn't work!"):
# a starved vCPU misses the timer ticks the check waits for. Measured with
# QEMU held to 5% of a core by a cgroup CPU quota: 3 panics in 3 boots
# without it, 2 boots to init in 2 with it (77-86 s each).
cat >"$work/early.cfg" <<CFG
search --no-floppy --fs-uuid --set=root $uuid
set prefix=(\$root)/grub
set ABUP_CMDLINE="ro rootwait panic=10 console=ttyS0 no_timer_check"
export ABUP_CMDLINE
CFG
modules="part_gpt ext2 search search_fs_uuid normal configfile"

# BIOS: core.img into the BIOS boot partition, boot.img into the MBR, patched
# the way grub-bios-setup patches them (it cannot map a loop device's
# partitions to a GRUB drive here): boot.img gets core.img's first sector
# (offset 0x5c) and the hard-disk drive check (0x66) turned into NOPs;
# core.img's first blocklist (offset 0x1f4) points at its remaining sectors.
core="$mnt/grub/i386-pc/core.img"
grub-mkimage -O i386-pc -o "$core" -p /grub -c "$work/early.cfg" biosdisk $modules
read -r cstart csectors < <(partx -g -o START,SECTORS -n 1 "$out")
size=$(stat -c %s "$core")
[ "$size" -le $((csectors * 512)) ] || { echo "grub-disk.sh: core.img does not fit the BIOS boot partition" >&2; exit 1; }
le64() { printf "$(printf '%016x' "$1" | sed -E 's/(..)(..)(..)(..)(..)(..)(..)(..)/\\x\8\\x\7\\x\6\\x\5\\x\4\\x\3\\x\2\\x\1/')"; }
le64 $((cstart + 1)) | dd of="$core" bs=1 seek=$((0x1f4)) conv=notrunc status=none
dd if="$core" of="$loop" bs=512 seek="$cstart" conv=notrunc status=none
cp /usr/lib/grub/i386-pc/boot.img "$work/boot.img"
le64 "$cstart" | dd of="$work/boot.img" bs=1 seek=$((0x5c)) conv=notrunc status=none
printf '\x90\x90' | dd of="$work/boot.img" bs=1 seek=$((0x66)) conv=notrunc status=none
dd if="$work/boot.img" of="$loop" bs=440 count=1 conv=notrunc status=none

# UEFI: the removable-media path on a FAT ESP, written with mtools (this
# kernel may not mount vfat).
grub-mkimage -O x86_64-efi -o "$work/BOOTX64.EFI" -p /grub -c "$work/early.cfg" $modules
mkfs.vfat -n ESP "${loop}p2" >/dev/null 2>&1
mmd -i "${loop}p2" ::/EFI ::/EFI/BOOT 2>/dev/null
mcopy -i "${loop}p2" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI 2>/dev/null
umount "$mnt"
mnt=""
# The partitions can stay busy for a moment after the unmount.
for _ in 1 2 3 4 5 6 7 8 9 10; do
    partx -d "$loop" 2>/dev/null && break
    sleep 0.5
done
losetup -d "$loop"
loop=""
