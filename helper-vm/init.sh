#!/bin/sh
# /init of the Thalunix swtpm helper micro-VM (busybox sh, PID 1). Copied into the initramfs by build.py.
#
# Mounts the read-only root disk (label thalunix-root: swtpm, e2fsprogs and their libraries) on /ro (the
# kernel has every driver built in), configures user-mode networking (10.0.2.15/24), prepares the TPM state disk
# (the other disk: formatted ext4 when blank, checked otherwise), and runs swtpm on TCP 2321 (TPM commands)
# and 2322 (control channel). When swtpm exits (CMD_SHUTDOWN from the host) the state is synced and the VM
# powers off, which ends QEMU. Lines starting with THALUNIX-HELPER are read by the host.

export PATH=/bin

mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys

say() { echo "THALUNIX-HELPER: $*" > /dev/ttyS0; }
fail() {
    echo "THALUNIX-HELPER-ERROR: $*" > /dev/ttyS0
    sync
    poweroff -f
}

ip link set lo up
ip link set eth0 up || fail "no network device (virtio-net missing from the kernel or the VM)"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

root=$(findfs LABEL=thalunix-root) || fail "no helper root disk (label thalunix-root)"
mount -t ext4 -o ro,noatime "$root" /ro || fail "cannot mount the helper root disk $root"
export PATH=/ro/sbin:/ro/bin:/bin LD_LIBRARY_PATH=/ro/lib/x86_64-linux-gnu
state=
for disk in /dev/vd?; do
    [ "$disk" = "$root" ] || state=$disk
done
[ -b "$state" ] || fail "no TPM state disk"

# A disk whose first 2 KiB are zero has never been formatted; anything else is checked, never
# reformatted, so a damaged state is reported instead of silently replaced by an empty TPM.
if [ "$(dd if="$state" bs=2048 count=1 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; then
    say "formatting a new TPM state disk"
    /ro/sbin/mke2fs -q -t ext4 -b 1024 -L thalunix-tpm "$state" > /dev/ttyS0 2>&1 \
        || fail "mke2fs failed on the state disk"
else
    /ro/sbin/e2fsck -p "$state" > /dev/ttyS0 2>&1
    [ $? -lt 4 ] || fail "the TPM state disk is damaged (e2fsck found errors it could not repair)"
fi
# sync,dirsync: swtpm renames its state file into place without an fsync of the directory; only
# synchronous metadata makes an NV write survive a kill of the helper right after it.
mount -t ext4 -o noatime,sync,dirsync "$state" /state || fail "cannot mount the TPM state disk"
mkdir -p /state/tpm2

say "starting swtpm"
/ro/bin/swtpm socket --tpm2 \
    --server type=tcp,port=2321,bindaddr=0.0.0.0 \
    --ctrl type=tcp,port=2322,bindaddr=0.0.0.0 \
    --tpmstate dir=/state/tpm2 \
    --flags not-need-init > /dev/ttyS0 2>&1
say "swtpm exited with status $?"
sync
umount /state
umount /ro
say "powering off"
poweroff -f
