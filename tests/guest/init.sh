#!/bin/sh
# /init of the Thalunix test guest (busybox sh, PID 1). Copied into the initramfs by build.py.
#
# Prints THALUNIX-GUEST-READY on ttyS0 and tty0 once booted, mounts a filesystem labelled
# THALUNIXDATA (vfat: THALUNIXDAT) if any at /mnt/data, powers off on the ACPI power button (acpid ->
# /etc/acpi/PWRF/00000080) and keeps a root shell on ttyS0 forever.

/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=linux
export PS1='thalunix-guest:$PWD# '

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname thalunix-guest

log() { echo "thalunix-init: $*" > /dev/kmsg; }

# Kernel modules, in dependency order (build.py writes the list; "name args" per line).
while read -r mod args; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod.ko" $args 2>/dev/null || log "insmod $mod failed"
done < /lib/modules/load-order

# Power button: the ACPI button driver and evdev are loaded now, so acpid sees the input device.
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid || log "acpid failed"

# Optional data disk (/dev/vda, /dev/sda, ...): ext4 labelled THALUNIXDATA, or vfat labelled
# THALUNIXDAT (FAT labels hold at most 11 characters).
mkdir -p /mnt/data
dev=$(findfs LABEL=THALUNIXDATA 2>/dev/null || findfs LABEL=THALUNIXDAT 2>/dev/null)
if [ -n "$dev" ]; then
    mount "$dev" /mnt/data || log "mount $dev on /mnt/data failed"
fi

echo THALUNIX-GUEST-READY > /dev/tty0
echo THALUNIX-GUEST-READY > /dev/ttyS0

# thalunix.run=CMD or "thalunix.run=CMD WITH SPACES" on the kernel command line: run it once on
# ttyS0 and report its exit status, before the shell starts. Absent: nothing happens.
run=$(sed -n -e 's/.*"thalunix\.run=\([^"]*\)".*/\1/p' -e 't' \
             -e 's/.*thalunix\.run=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$run" ]; then
    (cd / && sh -c "$run") < /dev/ttyS0 > /dev/ttyS0 2>&1
    echo "THALUNIX-RUN-EXIT=$?" > /dev/ttyS0
fi

# An interactive root shell on ttyS0, respawned whenever it exits. setsid -c makes the
# serial line its controlling terminal (job control, ^C).
cd /
while :; do
    setsid -c sh -i < /dev/ttyS0 > /dev/ttyS0 2>&1
    sleep 1
done
