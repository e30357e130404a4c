"""Errors of the TPM backends: each names the VM or file, what failed and what to do.

They are :class:`thalunix.errors.StartError` subclasses: a VM whose TPM cannot be set
up does not start, and fronts show the message as is.

Example::

    raise TpmUnavailableError("VM 'win11': TPM is 'on' but ...; install swtpm or ...")
"""

from __future__ import annotations

from thalunix.errors import StartError


class TpmError(StartError):
    """A TPM backend was chosen but could not be started; nothing was left running."""

    code = "tpm-failed"
    http_status = 500


class TpmUnavailableError(TpmError):
    """The VM demands a TPM (``on``, ``native``, ``helper``) that this host cannot provide."""

    code = "tpm-unavailable"
    http_status = 503


class HelperImageError(TpmError):
    """The helper VM's image is missing or damaged."""

    code = "tpm-helper-image"
    http_status = 503


class PortInUseError(TpmError):
    """A TCP port the helper was told to use is taken."""

    code = "tpm-port-in-use"
    http_status = 409
