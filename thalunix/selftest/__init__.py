"""The built-in accelerator self-test guest: a 512-byte x86 boot sector, shipped as bytes.

``thalunix.accel`` boots it under each candidate accelerator to learn whether that
accelerator really runs guests (a ``/dev/kvm`` that opens is not proof: a paravirtual
KVM backend can accept the VM and then die on the first x87 instruction). The guest's
source is ``selftest.asm`` beside this file; the runtime needs no assembler.

What the guest does, and how it reports (see ``selftest.asm`` for the details):
real mode -> CPUID long-mode check -> paging + long mode -> x87 (fninit, fadd, fsqrt)
-> SSE2 (sqrtsd, mulsd) -> writes :data:`EXIT_OK` to QEMU's ``isa-debug-exit`` device,
so QEMU exits with status :data:`QEMU_STATUS_OK`. It prints :data:`SERIAL_STAGES`, one
letter per stage, on COM1.

Example::

    from thalunix.selftest import SELFTEST_IMAGE, QEMU_STATUS_OK
    Path("selftest.img").write_bytes(SELFTEST_IMAGE)
    # qemu-system-x86_64 -nodefaults -display none -no-reboot -machine pc -accel tcg \\
    #   -drive format=raw,file=selftest.img -device isa-debug-exit,iobase=0xf4,iosize=0x04
    # exits with status QEMU_STATUS_OK (67)

To regenerate :data:`SELFTEST_IMAGE` after editing ``selftest.asm`` (needs ``nasm``)::

    python -m thalunix.selftest          # assembles and rewrites the literal below
"""

from __future__ import annotations

import base64

#: Value the guest writes to isa-debug-exit when every stage passed.
EXIT_OK = 0x21
#: Failure values the guest writes, mapped to what went wrong.
EXIT_FAILURES: dict[int, str] = {
    0x01: "the virtual CPU has no long mode (64-bit) support",
    0x02: "an x87 floating-point instruction gave a wrong result",
    0x03: "an SSE instruction gave a wrong result",
}
#: isa-debug-exit turns a written value v into QEMU's exit status (v << 1) | 1.
QEMU_STATUS_OK = (EXIT_OK << 1) | 1
#: Where the guest expects the debug-exit device (must match selftest.asm).
DEBUG_EXIT_DEVICE = "isa-debug-exit,iobase=0xf4,iosize=0x04"
#: The serial transcript of a full run; a shorter prefix shows where the guest stopped.
SERIAL_STAGES = "TLX:RLFSOK"
#: What each serial letter means once it has appeared (the stage that *completed*).
STAGE_NAMES: dict[str, str] = {
    "": "before the boot sector ran: QEMU or the BIOS never reached it",
    "TLX:R": "in real mode, while switching to paging and long mode",
    "TLX:RL": "in 64-bit mode, at the first x87 instruction (fninit/fld1)",
    "TLX:RLF": "in 64-bit mode, at the SSE instructions",
    "TLX:RLFS": "right before reporting success",
    "TLX:RLFSO": "right before reporting success",
    "TLX:RLFSOK": "at the final write to the debug-exit device",
}

# Assembled from selftest.asm by `python -m thalunix.selftest` (nasm -f bin); do not edit by hand.
# BEGIN SELFTEST_IMAGE
_SELFTEST_B64 = (
    "+jHAjtiOwI7QvAB86hF8AAC+hn3oiABmuAAAAIAPomY9AQAAgHJyZrgBAACAD6Jm98IAAAAgdGHk"
    "kgwCJP7mkr8AELkADGYxwPzzZqvHBgAQAyDHBgAgAzDHBgAwgwAPIOBmDSAGAAAPIuBmuAAQAAAP"
    "IthmuYAAAMAPMg0AAQ8wDyDAJPtmDQMAAIAPIsAPARZ4fequfAgAsAHm9OsMuvgDrITAdAPu6/jD"
    "9Ov9ZrgQAI7YjsCO0LwAfAAAsEzolQAAANvj2ejZ6N7B2xwlgn0AAIM8JYJ9AAACdXHbBCV+fQAA"
    "2frbHCWCfQAAgzwlgn0AAAR1V7BG6FsAAABIuAAAAAAAAPg/ZkgPbsDyDyoMJX59AADyD1HJ8g9Z"
    "wfIPLMCD+AZ1K7BT6CsAAACwT+gkAAAAsEvoHQAAALAN6BYAAACwCugPAAAAsCHrBrAC6wKwA+b0"
    "9Ov9Zrr4A+7DkAAAAAAAAAAA//8AAACarwD//wAAAJLPABcAYH0AABAAAAAAAAAAVExYOlIAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAVao="
)
# END SELFTEST_IMAGE

#: The raw boot-sector image (512 bytes, ends with the 0x55AA signature).
SELFTEST_IMAGE: bytes = base64.b64decode(_SELFTEST_B64)


def stage_reached(serial_output: str) -> str:
    """Say in words how far the guest got, from what it printed on COM1.

    Example::

        stage_reached("TLX:RL")   # "in 64-bit mode, at the first x87 instruction (fninit/fld1)"
    """
    start = serial_output.find("TLX:")
    transcript = serial_output[start:] if start >= 0 else ""
    # Longest known prefix wins: the guest may be cut off mid-transcript.
    best = ""
    for prefix in STAGE_NAMES:
        if transcript.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return STAGE_NAMES[best]
