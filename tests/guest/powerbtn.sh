#!/bin/sh
# Run by busybox acpid on the ACPI power button (event PWRF/00000080), e.g. QMP system_powerdown.
# Installed as /etc/acpi/PWRF/00000080 in the initramfs by build.py.
echo THALUNIX-GUEST-POWEROFF > /dev/ttyS0
echo THALUNIX-GUEST-POWEROFF > /dev/tty0
sync
umount /mnt/data 2>/dev/null
poweroff -f
