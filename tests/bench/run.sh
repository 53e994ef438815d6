#!/usr/bin/env bash
# abup install/create benchmark against shell pipelines and SWUpdate.
#
#   bash tests/bench/run.sh            # as root: the documented run
#
# Not a test and not run by CI: with the defaults it takes 20-40 minutes and
# needs ~25 GB in BENCH_DIR. It builds abup --release, a tree from this
# machine's /usr (share, sbin, libexec: ~780 MB), a 1 GiB ext4 image of it
# and a 4 GiB one holding four copies, then times, interleaved, with the
# target partition scrambled before every run, medians of RUNS:
#
#   raw 1 GiB:  abup zstd / gzip / none bundles  vs  zstd -dc | dd oflag=direct,
#               pigz -dc | dd oflag=direct, dd oflag=direct of the image,
#               SWUpdate (Debian's, raw handler, installed-directly, zstd)
#   raw 4 GiB:  abup zstd (ratio to abup's 1 GiB time), and the same ratio
#               for zstd -dc | dd oflag=direct: how this disk scales
#   tarball:    abup zstd / gzip  vs  mkfs.ext4 + tar --xattrs -xpf + umount + sync
#   create:     abup bundle create zstd / gzip  vs  zstd -T0 / pigz
#
# and prints each median, each ratio, abup's peak RSS (/usr/bin/time -v) and
# the load average before and after. The target is a GPT partition of a
# loop device over a file in BENCH_DIR.
#
# Knobs (environment), for quick iterations; the defaults are the issue's:
#   RUNS=5          rounds (medians of RUNS)
#   IMG_MB=1024     size of the small image; the big one is 4x. Below 1024
#                   the tree is cut to about 3/4 of the image.
#   SECTIONS="raw big tar create"   which parts to time
#   BENCH_DIR=/var/tmp/abup-bench   scratch (inputs are cached per IMG_MB)
#   ABUP=path       a prebuilt abup instead of cargo build --release
#   BUNDLES=reuse   keep the bundles of an earlier run (same bundle format)
#   LOOP_DIO=1      the target loop device does direct I/O (see below)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO=$PWD
RUNS=${RUNS:-5}
IMG_MB=${IMG_MB:-1024}
BIG_MB=$((4 * IMG_MB))
SECTIONS=${SECTIONS:-raw big tar create}
BUNDLES=${BUNDLES:-rebuild}
LOOP_DIO=${LOOP_DIO:-1}
W=${BENCH_DIR:-/var/tmp/abup-bench}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
pkgs=(zstd pigz gdisk e2fsprogs grub-common time tar cpio openssl swupdate bc acl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if [ -z "${ABUP:-}" ]; then
    echo "==> building abup (release)"
    cargo build --release -q
    ABUP=${CARGO_TARGET_DIR:-$REPO/target}/release/abup
fi
echo "==> $(date -u '+%F %T UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
echo "    RUNS=$RUNS IMG_MB=$IMG_MB SECTIONS=\"$SECTIONS\" LOOP_DIO=$LOOP_DIO abup $(git -C "$REPO" describe --always --dirty 2>/dev/null)"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# Inputs are cached in a directory per image size; a directory made by an
# older version of this script is rebuilt (version 2 puts a /boot/vmlinuz
# in every image: install refuses a slot grub.cfg could not boot).
CACHE_VERSION=3
mkdir -p "$W"
W=$(cd "$W" && pwd)
D="$W/in-$IMG_MB"
mkdir -p "$D"
if [ "$(cat "$D/cache.version" 2>/dev/null)" != "$CACHE_VERSION" ]; then
    rm -rf "${D:?}"/*
    echo "$CACHE_VERSION" > "$D/cache.version"
fi
cd "$D"
LOOP=""
MNT="$W/mnt"
mkdir -p "$MNT"
cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    if [ -n "$LOOP" ]; then
        partx -d "$LOOP" 2>/dev/null || true
        losetup -d "$LOOP" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- inputs
if [ ! -f tree.done ]; then
    echo "==> copying a tree from /usr"
    rm -rf tree tree.full && mkdir -p tree.full/usr
    cp -a /usr/share /usr/sbin /usr/libexec tree.full/usr/
    if [ "$IMG_MB" -lt 1024 ]; then
        # Entries in directory order until ~3/4 of the image is file data.
        mkdir tree
        (cd tree.full && find . -mindepth 1 -printf '%s %y %P\n' |
            awk -v max=$((IMG_MB * 3 / 4 * 1048576)) \
                '{ if ($2 == "f") s += $1; if (s > max) exit; sub(/^[^ ]+ [^ ]+ /, ""); print }' |
            tar -cf - --no-recursion --xattrs --acls -T -) | tar -xpf - --xattrs --acls -C tree
        rm -rf tree.full
    else
        mv tree.full tree
    fi
    mkdir -p tree/boot && printf 'not a kernel\n' > tree/boot/vmlinuz
    touch tree.done
fi
if [ ! -f img1.done ]; then
    echo "==> ${IMG_MB} MiB ext4 image"
    rm -f img1.ext4 && truncate -s "${IMG_MB}M" img1.ext4
    mkfs.ext4 -q -F -d tree img1.ext4
    touch img1.done
fi
if on big && [ ! -f img4.done ]; then
    echo "==> ${BIG_MB} MiB ext4 image (four copies of the tree)"
    rm -rf tree4 && mkdir tree4
    for i in 1 2 3 4; do cp -a --reflink=auto tree "tree4/copy$i"; done
    mkdir -p tree4/boot && cp tree/boot/vmlinuz tree4/boot/
    rm -f img4.ext4 && truncate -s "${BIG_MB}M" img4.ext4
    mkfs.ext4 -q -F -d tree4 img4.ext4
    rm -rf tree4
    touch img4.done
fi
[ -f tree.tar ] || tar --create --file=tree.tar --numeric-owner --xattrs --xattrs-include='*' --acls --sort=name -C tree .
[ -f junk ] || head -c "${IMG_MB}M" /dev/urandom > junk
[ -f k.key ] || "$ABUP" keygen --secret k.key --public k.pub >/dev/null
[ -f img1.ext4.zst ] || zstd -q -T0 -3 -c img1.ext4 > img1.ext4.zst
[ -f img1.ext4.gz ] || pigz -6 -c img1.ext4 > img1.ext4.gz
if on big; then
    [ -f img4.ext4.zst ] || zstd -q -T0 -3 -c img4.ext4 > img4.ext4.zst
fi

# Bundles are rebuilt by each run (the bundle format may have changed).
bundle() { # out source-flag source compression
    [ "$BUNDLES" = reuse ] && [ -f "$1" ] && return 0
    rm -f "$1"
    "$ABUP" bundle create "$2" "$3" --version 1.0.0 --compatible bench \
        --compression "$4" --key k.key -o "$1" >/dev/null
}
echo "==> bundles"
if on raw; then
    bundle raw-zstd.abup --image img1.ext4 zstd
    bundle raw-gzip.abup --image img1.ext4 gzip
    bundle raw-none.abup --image img1.ext4 none
fi
if on big; then
    on raw || bundle raw-zstd.abup --image img1.ext4 zstd
    bundle raw4-zstd.abup --image img4.ext4 zstd
fi
if on tar; then
    bundle tar-zstd.abup --tarball tree.tar zstd
    bundle tar-gzip.abup --tarball tree.tar gzip
fi

# ---------------------------------------------------------------- target disk
# Everything below lives in $W (one run at a time); inputs stay in $D.
cd "$W"
echo "==> target disk"
rm -f disk.img && truncate -s $((BIG_MB + 200))M disk.img
sgdisk -o -n 1:0:+16M -c 1:rootA -n 2:0:+$((BIG_MB + 100))M -c 2:rootB disk.img >/dev/null
# With direct I/O the loop device behaves like a disk: a write has reached
# the backing disk when it completes, and a flush flushes that disk. A
# buffered loop device (LOOP_DIO=0) turns every O_DIRECT write into a page
# cache copy and every flush into the real write, which times a method that
# never flushes (dd oflag=direct) without its writes.
if [ "$LOOP_DIO" = 1 ]; then
    LOOP=$(losetup -f --show --direct-io=on disk.img)
else
    LOOP=$(losetup -f --show disk.img)
fi
partx -a "$LOOP"
P=${LOOP}p2
[ -b "$P" ] || { echo "no partition node $P" >&2; exit 1; }
rm -rf state && mkdir -p state
rm -f grubenv && grub-editenv grubenv create
grub-editenv grubenv set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0 ABUP_MAX_TRIES=3
cat > system.toml <<EOF
compatible = "bench"
state_dir = "$W/state"
[disk]
device = "$LOOP"
[slots.A]
partlabel = "rootA"
[slots.B]
partlabel = "rootB"
[boot]
backend = "grub"
tries = 3
[boot.grub]
envfile = "$W/grubenv"
[keys]
trusted = ["$D/k.pub"]
EOF
rm -f errors.log

scramble() { # number of small images' worth
    local i
    for ((i = 0; i < $1; i++)); do
        dd if="$D/junk" of="$P" bs=4M seek=$((i * IMG_MB / 4)) oflag=direct conv=notrunc status=none
    done
    # Nothing of the scrambling is left to flush for the method timed next.
    sync "$W/disk.img"
}

# ---------------------------------------------------------------- SWUpdate
# sw-description names the target device, so the .swu is rebuilt every run.
# Debian's SWUpdate checks a CMS signature (certificate for emailProtection)
# and the hardware revision; -m/-M keep it away from the bootloader.
swu() { swupdate -H bench:1.0 -k "$W/swu/cert.pem" -m -M -i "$1"; }
SWU_OK=0
SWU_WHY=""
if on raw; then
    rm -rf swu && mkdir swu
    ln "$D/img1.ext4.zst" swu/rootfs.ext4.zst 2>/dev/null || cp "$D/img1.ext4.zst" swu/rootfs.ext4.zst
    openssl req -x509 -newkey rsa:2048 -nodes -keyout swu/key.pem -out swu/cert.pem \
        -days 30 -subj "/CN=abup-bench" -addext "extendedKeyUsage=emailProtection" \
        -addext "keyUsage=digitalSignature" 2>/dev/null
    sha=$(sha256sum swu/rootfs.ext4.zst | cut -d' ' -f1)
    cat > swu/sw-description <<EOF
software =
{
    version = "1.0.0";
    hardware-compatibility = [ "1.0" ];
    images: (
        {
            filename = "rootfs.ext4.zst";
            device = "$P";
            type = "raw";
            compressed = "zstd";
            installed-directly = true;
            sha256 = "$sha";
        }
    );
}
EOF
    openssl cms -sign -in swu/sw-description -out swu/sw-description.sig -signer swu/cert.pem \
        -inkey swu/key.pem -outform DER -nosmimecap -binary
    (cd swu && printf '%s\n' sw-description sw-description.sig rootfs.ext4.zst |
        cpio -o -H crc --quiet > ../update.swu)
    # Proof that SWUpdate really wrote the image, not just exited 0.
    scramble 1
    if swu update.swu >swu.log 2>&1 &&
        cmp -n "$(stat -c %s "$D/img1.ext4")" "$D/img1.ext4" "$P" >/dev/null; then
        SWU_OK=1
    else
        SWU_WHY="swupdate failed or wrote something else: $(tail -3 swu.log | tr '\n' ' ')"
    fi
fi

# ---------------------------------------------------------------- runs
declare -A T    # method -> list of seconds
RSS=()          # "method kB"
now() { date +%s.%N; }
record() { T[$1]="${T[$1]:-} $2"; }

timed() { # method cmd...
    local m=$1; shift
    local s e
    s=$(now)
    if ! "$@" >/dev/null 2>>"$W/errors.log"; then
        echo "FAILED: $m ($*); see $W/errors.log" >&2
        exit 1
    fi
    e=$(now)
    record "$m" "$(echo "$e - $s" | bc)"
}

abup_timed() { # method bundle
    local m=$1 b=$2
    local s e
    s=$(now)
    /usr/bin/time -v -o "$W/time.txt" "$ABUP" --config "$W/system.toml" --booted-slot A \
        install --no-activate --force "$D/$b" >/dev/null 2>>"$W/errors.log" ||
        { echo "FAILED: $m; see $W/errors.log" >&2; cat "$W/time.txt" >&2; exit 1; }
    e=$(now)
    record "$m" "$(echo "$e - $s" | bc)"
    RSS+=("$m $(awk -F': ' '/Maximum resident/ {print $2}' "$W/time.txt")")
}

# In a mount namespace of its own: a mount in the shared one is copied by
# every process that unshares meanwhile (each abup run does), and such a
# copy keeps the filesystem alive after umount, its dirty pages unwritten
# and the device busy for the next mkfs.
gnu_tar() {
    unshare -m --propagation private sh -c 'mkfs.ext4 -q -F "$1" && mount "$1" "$2" &&
        tar --xattrs --xattrs-include="*" --acls -xpf "$3" -C "$2" && umount "$2"' \
        sh "$P" "$MNT" "$D/tree.tar" && sync
}

create_timed() { # method args...
    local m=$1; shift
    rm -f "$W/c.abup"
    local s e
    s=$(now)
    /usr/bin/time -v -o "$W/time.txt" "$ABUP" bundle create "$@" --version 1.0.0 \
        --compatible bench --key "$D/k.key" -o "$W/c.abup" >/dev/null 2>>"$W/errors.log" ||
        { echo "FAILED: $m; see $W/errors.log" >&2; exit 1; }
    e=$(now)
    record "$m" "$(echo "$e - $s" | bc)"
    RSS+=("$m $(awk -F': ' '/Maximum resident/ {print $2}' "$W/time.txt")")
}

# Inputs come from the page cache for every method alike.
warm() { cat "$D"/*.abup "$D"/img1.ext4* "$D"/img4.ext4.zst "$D"/tree.tar "$W"/update.swu > /dev/null 2>&1 || true; }

for ((r = 1; r <= RUNS; r++)); do
    echo "==> round $r of $RUNS ($(date -u +%T), load $(cut -d' ' -f1 /proc/loadavg))"
    warm
    if on raw; then
        scramble 1; timed dd_direct dd if="$D/img1.ext4" of="$P" bs=4M oflag=direct status=none
        scramble 1; timed zstd_dd bash -c "zstd -dc $D/img1.ext4.zst | dd of=$P bs=4M iflag=fullblock oflag=direct status=none"
        scramble 1; abup_timed abup_raw_zstd raw-zstd.abup
        scramble 1; timed pigz_dd bash -c "pigz -dc $D/img1.ext4.gz | dd of=$P bs=4M iflag=fullblock oflag=direct status=none"
        scramble 1; abup_timed abup_raw_gzip raw-gzip.abup
        scramble 1; abup_timed abup_raw_none raw-none.abup
        if [ "$SWU_OK" = 1 ]; then
            scramble 1; timed swupdate_zstd swu update.swu
        fi
    fi
    if on big; then
        on raw || { scramble 1; abup_timed abup_raw_zstd raw-zstd.abup; }
        on raw || { scramble 1; timed zstd_dd bash -c "zstd -dc $D/img1.ext4.zst | dd of=$P bs=4M iflag=fullblock oflag=direct status=none"; }
        scramble 4; abup_timed abup_raw4_zstd raw4-zstd.abup
        scramble 4; timed zstd_dd4 bash -c "zstd -dc $D/img4.ext4.zst | dd of=$P bs=4M iflag=fullblock oflag=direct status=none"
    fi
    if on tar; then
        scramble 1; timed gnu_tar gnu_tar
        scramble 1; abup_timed abup_tar_zstd tar-zstd.abup
        scramble 1; abup_timed abup_tar_gzip tar-gzip.abup
    fi
    if on create; then
        timed zstd_T0 bash -c "zstd -q -T0 -3 -c $D/img1.ext4 > $W/c.zst"
        create_timed create_zstd --image "$D/img1.ext4" --compression zstd
        timed pigz bash -c "pigz -6 -c $D/img1.ext4 > $W/c.gz"
        create_timed create_gzip --image "$D/img1.ext4" --compression gzip
    fi
done
rm -f c.abup c.zst c.gz

# ---------------------------------------------------------------- report
median() { tr ' ' '\n' <<<"${T[$1]:-}" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { # name a b target
    local a b
    [ -n "${T[$2]:-}" ] && [ -n "${T[$3]:-}" ] || return 0
    a=$(median "$2"); b=$(median "$3")
    printf '  %-44s %6.2f   (target %s)\n' "$1" "$(echo "$a / $b" | bc -l)" "$4"
}
echo
echo "medians of $RUNS runs, seconds (IMG_MB=$IMG_MB):"
for m in dd_direct zstd_dd pigz_dd swupdate_zstd abup_raw_zstd abup_raw_gzip abup_raw_none \
    abup_raw4_zstd zstd_dd4 gnu_tar abup_tar_zstd abup_tar_gzip zstd_T0 create_zstd pigz create_gzip; do
    [ -n "${T[$m]:-}" ] && printf '  %-16s %7.2f   (%s)\n' "$m" "$(median "$m")" "${T[$m]# }"
done
echo
echo "ratios:"
ratio "abup raw zstd / zstd -dc | dd" abup_raw_zstd zstd_dd "<= 0.8"
if on raw && [ "$SWU_OK" = 1 ]; then
    ratio "abup raw zstd / SWUpdate zstd" abup_raw_zstd swupdate_zstd "<= 0.5"
elif on raw; then
    echo "  abup raw zstd / SWUpdate zstd: not measured: $SWU_WHY"
fi
ratio "abup raw gzip / pigz -dc | dd" abup_raw_gzip pigz_dd "<= 0.7"
ratio "abup raw none / dd oflag=direct" abup_raw_none dd_direct "-"
ratio "abup raw 4x / abup raw 1x (zstd)" abup_raw4_zstd abup_raw_zstd "<= 4.3"
ratio "zstd -dc | dd 4x / 1x (this disk's scaling)" zstd_dd4 zstd_dd "-"
ratio "abup tar zstd / mkfs + tar + sync" abup_tar_zstd gnu_tar "<= 0.8"
ratio "abup tar gzip / mkfs + tar + sync" abup_tar_gzip gnu_tar "-"
ratio "bundle create zstd / zstd -T0" create_zstd zstd_T0 "<= 1.2"
ratio "bundle create gzip / pigz" create_gzip pigz "-"
echo
echo "abup peak RSS (max over runs, MiB; target <= 32):"
printf '%s\n' "${RSS[@]}" | awk '{ if ($2 > m[$1]) m[$1] = $2 } END { for (k in m) printf "  %-16s %6.1f\n", k, m[k] / 1024 }' | sort
echo
echo "load average: $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end ($(date -u '+%T UTC'))"
