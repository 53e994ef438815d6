#!/usr/bin/env bash
# Runs abup's whole test suite: unit tests and the integration tests on real
# loop devices, GPT tables, ext4 mounts and grub-editenv. Needs root.
# Installs the Debian packages the tests use first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: run as root (the tests use loop devices, mkfs.ext4 and mount)" >&2
    exit 1
fi
# The real-boot tests (tests/qemu/, tests/it/qemu.rs) also need QEMU,
# OVMF, Debian's GRUB images, busybox and the FAT/ELF tools.
pkgs=(gdisk e2fsprogs grub-common zstd attr acl util-linux mount tar busybox-static procps
    u-boot-tools libubootenv-tool mtools dosfstools cpio qemu-system-arm u-boot-qemu systemd
    qemu-system-x86 ovmf grub-efi-amd64-bin grub-pc-bin file binutils
    fusefat systemd-boot systemd-boot-efi)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# nmcli (NetworkManager's own keyfile parser) cross-checks the keyfiles of
# the WiFi migration example. Taken from the network-manager package without
# installing it, so that no NetworkManager daemon starts on the test machine.
if ! command -v nmcli >/dev/null; then
    nm_dir="${CARGO_TARGET_DIR:-$PWD/target}/nmcli"
    if [ ! -x "$nm_dir/usr/bin/nmcli" ]; then
        echo "==> extracting nmcli from the network-manager package"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnm0 libreadline8 libglib2.0-0
        tmp=$(mktemp -d)
        (cd "$tmp" && { apt-get download -qq network-manager || { apt-get update -qq && apt-get download -qq network-manager; }; })
        mkdir -p "$nm_dir"
        dpkg-deb -x "$tmp"/network-manager_*.deb "$nm_dir"
        rm -rf "$tmp"
    fi
    export ABUP_TEST_NMCLI="$nm_dir/usr/bin/nmcli"
fi
# The U-Boot real-boot test (tests/it/uboot_boot.rs) boots an arm64 Debian
# cloud kernel and busybox: fetched once into the cache with apt-get download.
cache=${ABUP_TEST_CACHE:-/var/cache/abup-tests}
mkdir -p "$cache"
if ! ls "$cache"/linux-image-*-cloud-arm64-unsigned_*_arm64.deb >/dev/null 2>&1 ||
    ! ls "$cache"/busybox-static_*_arm64.deb >/dev/null 2>&1; then
    echo "==> fetching arm64 kernel and busybox into $cache"
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64
    fi
    apt-get update -qq
    kpkg=$(apt-cache depends linux-image-cloud-arm64:arm64 | awk '/Depends: linux-image-/{print $2; exit}')
    (cd "$cache" && apt-get download -qq "${kpkg%%:*}-unsigned:arm64" busybox-static:arm64)
fi
. fixtures/rust-toolchain.sh
ensure_rust
# The Debian kernel the real boots start (cached in /var/cache/abup-tests).
echo "==> kernel for the QEMU boots: $(bash tests/qemu/fetch-kernel.sh amd64)"
cargo test --all-targets
