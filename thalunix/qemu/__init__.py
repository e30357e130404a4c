"""Everything that speaks QEMU: the command builder, the runner and the qemu-img wrapper."""
