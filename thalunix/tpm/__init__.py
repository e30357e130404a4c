"""TPM 2.0 for VMs: a native swtpm per VM, or the swtpm helper micro-VM behind a control-socket bridge.

The runner asks :class:`TpmManager` for a VM's TPM before it starts QEMU and gets the
control socket to give QEMU (``LaunchPlan.tpm_socket``); the rest lives here:
``manager`` (choice and lifecycle), ``helper`` (the micro-VM), ``host`` (the detached
process running a helper and its bridge), ``bridge`` (QEMU's UNIX control socket ⇄
swtpm on TCP), ``protocol`` (swtpm control and TPM2 wire formats), ``errors``.

Example::

    manager = TpmManager(data, bus)
    manager.choose(vm, runtime)        # TpmChoice(backend="native", reason="native swtpm /usr/bin/swtpm")
    lease = manager.prepare(vm, runtime)
    manager.release(vm)
"""

from thalunix.tpm.errors import HelperImageError, PortInUseError, TpmError, TpmUnavailableError
from thalunix.tpm.manager import TpmChoice, TpmLease, TpmManager

__all__ = ["HelperImageError", "PortInUseError", "TpmChoice", "TpmError", "TpmLease", "TpmManager",
           "TpmUnavailableError"]
