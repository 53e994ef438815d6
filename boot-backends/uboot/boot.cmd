# abup A/B boot script for U-Boot (RAUC's variables: BOOT_ORDER, BOOT_A_LEFT,
# BOOT_B_LEFT). Build: mkimage -A arm64 -T script -C none -d boot.cmd boot.scr
# The contract is in README.md beside this file.
#
# The variables live in a redundant environment of two files on the FAT boot
# partition (uboot.env, uboot-redund.env; each 0x4000 bytes: CRC32, flags
# byte, name=value list), written by abup and by this script in place, the
# stale copy each time, so a power cut at any moment leaves one valid copy.

# Settings: each is used only when not set already (e.g. in U-Boot's own
# environment).
test -n "${abup_iface}" || setenv abup_iface virtio
test -n "${abup_dev}" || setenv abup_dev 0
test -n "${abup_envpart}" || setenv abup_envpart 1
test -n "${abup_part_A}" || setenv abup_part_A 2
test -n "${abup_part_B}" || setenv abup_part_B 3
test -n "${abup_envsize}" || setenv abup_envsize 0x4000
test -n "${abup_env1}" || setenv abup_env1 uboot.env
test -n "${abup_env2}" || setenv abup_env2 uboot-redund.env
test -n "${abup_kernel}" || setenv abup_kernel /boot/vmlinuz
test -n "${abup_initrd}" || setenv abup_initrd /boot/initrd.img
test -n "${abup_args}" || setenv abup_args "console=ttyAMA0 panic=1"

# Scratch buffers (below where the initrd goes later).
setexpr abup_b1 ${ramdisk_addr_r} + 0
setexpr abup_b2 ${ramdisk_addr_r} + 0x100000
setexpr abup_tmp ${ramdisk_addr_r} + 0x200000
setexpr abup_f1 ${abup_b1} + 4
setexpr abup_f2 ${abup_b2} + 4
setexpr abup_d1 ${abup_b1} + 1
setexpr abup_d2 ${abup_b2} + 1
setexpr abup_dsize ${abup_envsize} - 1

# Read both copies. A copy is [crc][flags][data]; `env import -c` wants
# [crc][data], so the CRC is moved one byte up (over the flags byte, read
# first) and the copy is imported from there. Only abup's variables are
# imported and exported.
setenv BOOT_ORDER
setenv BOOT_A_LEFT
setenv BOOT_B_LEFT
setenv abup_have1 0
setenv abup_have2 0
if fatload ${abup_iface} ${abup_dev}:${abup_envpart} ${abup_b1} ${abup_env1} ${abup_envsize}; then
    setexpr.b abup_flag1 *${abup_f1}
    cp.b ${abup_b1} ${abup_tmp} 4
    cp.b ${abup_tmp} ${abup_d1} 4
    setenv abup_have1 1
fi
if fatload ${abup_iface} ${abup_dev}:${abup_envpart} ${abup_b2} ${abup_env2} ${abup_envsize}; then
    setexpr.b abup_flag2 *${abup_f2}
    cp.b ${abup_b2} ${abup_tmp} 4
    cp.b ${abup_tmp} ${abup_d2} 4
    setenv abup_have2 1
fi
# The newer copy by U-Boot's rule: higher flags, except that 0 follows 255.
setenv abup_newer 1
if test ${abup_have1} = 1 && test ${abup_have2} = 1; then
    if itest.b ${abup_flag1} -eq 0xff && itest.b ${abup_flag2} -eq 0; then
        setenv abup_newer 2
    elif itest.b ${abup_flag2} -eq 0xff && itest.b ${abup_flag1} -eq 0; then
        setenv abup_newer 1
    elif itest.b ${abup_flag2} -gt ${abup_flag1}; then
        setenv abup_newer 2
    fi
elif test ${abup_have2} = 1; then
    setenv abup_newer 2
fi
# Import the older copy, then the newer over it: a newer copy with a bad CRC
# (a torn write) is refused by `env import -c` and the older one stays.
setenv abup_current none
if test ${abup_newer} = 2; then
    if test ${abup_have1} = 1 && env import -c ${abup_d1} ${abup_dsize} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
        setenv abup_current 1
    fi
    if test ${abup_have2} = 1 && env import -c ${abup_d2} ${abup_dsize} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
        setenv abup_current 2
    fi
else
    if test ${abup_have2} = 1 && env import -c ${abup_d2} ${abup_dsize} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
        setenv abup_current 2
    fi
    if test ${abup_have1} = 1 && env import -c ${abup_d1} ${abup_dsize} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
        setenv abup_current 1
    fi
fi
echo "abup: environment copy ${abup_current}: BOOT_ORDER=${BOOT_ORDER} BOOT_A_LEFT=${BOOT_A_LEFT} BOOT_B_LEFT=${BOOT_B_LEFT}"

# Pick the first slot in BOOT_ORDER with tries left and count the try.
# Slots before it in BOOT_ORDER used up their tries: they are dropped from
# BOOT_ORDER, so they are never booted again until abup activates them
# (install, mark-active, mark-good) - no boot-loop after a fallback.
setenv abup_slot
setenv abup_order
for s in ${BOOT_ORDER}; do
    if test -n "${abup_slot}"; then
        setenv abup_order "${abup_order} ${s}"
    else
        if test "${s}" = A && test -n "${BOOT_A_LEFT}" && test ${BOOT_A_LEFT} -gt 0; then
            setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
            setenv abup_slot A
        elif test "${s}" = B && test -n "${BOOT_B_LEFT}" && test ${BOOT_B_LEFT} -gt 0; then
            setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
            setenv abup_slot B
        fi
        if test -n "${abup_slot}"; then
            setenv abup_order ${s}
        fi
    fi
done

if test -n "${abup_slot}"; then
    setenv BOOT_ORDER "${abup_order}"
    # Write the stale copy (the one not imported last) with the next flags.
    if test ${abup_current} = 1; then
        setexpr abup_next ${abup_flag1} + 1
        setenv abup_target ${abup_env2}
    elif test ${abup_current} = 2; then
        setexpr abup_next ${abup_flag2} + 1
        setenv abup_target ${abup_env1}
    else
        setenv abup_next 1
        setenv abup_target ${abup_env1}
    fi
    if itest ${abup_next} -eq 0x100; then
        setenv abup_next 0
    fi
    mw.b ${abup_tmp} 0 ${abup_envsize}
    setexpr abup_w ${abup_tmp} + 1
    env export -c -s ${abup_dsize} ${abup_w} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
    setexpr abup_wf ${abup_tmp} + 4
    cp.b ${abup_w} ${abup_b1} 4
    cp.b ${abup_b1} ${abup_tmp} 4
    mw.b ${abup_wf} ${abup_next}
    if fatwrite ${abup_iface} ${abup_dev}:${abup_envpart} ${abup_tmp} ${abup_target} ${abup_envsize}; then
        echo "abup: booting slot ${abup_slot} (BOOT_ORDER=${BOOT_ORDER} BOOT_A_LEFT=${BOOT_A_LEFT} BOOT_B_LEFT=${BOOT_B_LEFT}, saved to ${abup_target})"
    else
        echo "abup: saving the environment failed; booting slot ${abup_slot} without counting the try"
    fi
else
    # No slot has tries left: boot the first in BOOT_ORDER without counting
    # (a slot that worked and was never marked good again), then A, then B.
    for s in ${BOOT_ORDER} A B; do
        test -n "${abup_slot}" || setenv abup_slot ${s}
    done
    echo "abup: no slot has tries left (BOOT_ORDER=${BOOT_ORDER}); booting ${abup_slot} without counting"
fi

if test "${abup_slot}" = A; then
    setenv abup_part ${abup_part_A}
else
    setenv abup_part ${abup_part_B}
fi
setenv bootargs "root=PARTLABEL=root${abup_slot} abup.slot=${abup_slot} ${abup_args}"
if load ${abup_iface} ${abup_dev}:${abup_part} ${kernel_addr_r} ${abup_kernel}; then
    if load ${abup_iface} ${abup_dev}:${abup_part} ${ramdisk_addr_r} ${abup_initrd}; then
        booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
    else
        booti ${kernel_addr_r} - ${fdtcontroladdr}
    fi
fi
echo "abup: slot ${abup_slot} has no kernel ${abup_kernel} on ${abup_iface} ${abup_dev}:${abup_part}"
