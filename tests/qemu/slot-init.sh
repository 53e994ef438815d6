#!/bin/busybox sh
# /sbin/init of the test slots the QEMU boot tests install with abup: the
# kernel mounts the slot itself (root=PARTUUID=… from grub.cfg), so the
# booted slot abup detects is the real one. Prints what booted, panics when
# the slot says so (a broken update), else runs the scenario's commands from
# the data partition (/data/run.sh) and powers off.
/bin/busybox mkdir -p /run/bin
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox mkdir -p /run/bin
/bin/busybox --install -s /run/bin
export PATH=/run/bin:/usr/bin:/bin
mount -t devtmpfs dev /dev
# grub.cfg sets no console=, so the kernel console is the screen: talk to
# the serial port the tests read.
exec </dev/ttyS0 >/dev/ttyS0 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmpfs /tmp
slot=$(sed -n 's/.*abup\.slot=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "ABUP-BOOTED slot=$slot version=$(cat /etc/abup-version) cmdline=$(cat /proc/cmdline)"
if [ -e /etc/abup-panic ]; then
    echo "ABUP-PANIC: this version is broken on purpose"
    echo c >/proc/sysrq-trigger
fi
mkdir -p /data
if mount -t ext4 "$(findfs LABEL=data)" /data; then
    if [ -f /data/run.sh ]; then
        echo "ABUP-RUN begin"
        sh /data/run.sh
        echo "ABUP-RUN end rc=$?"
    fi
    umount /data
fi
echo "ABUP-POWEROFF"
sync
poweroff -f
