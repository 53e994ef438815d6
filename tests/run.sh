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
pkgs=(gdisk e2fsprogs grub-common zstd attr acl util-linux mount tar busybox-static procps)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
cargo test --all-targets
