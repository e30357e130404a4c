"""The exceptions Thalunix raises, each carrying a message a person can act on.

Every error says *what* failed, *for which VM or file*, and *what to do about it*.
Fronts (CLI, API, UI) show ``str(error)`` as is; they never need to parse it.

Example::

    try:
        vm = store.load_vm("web")
    except ThalunixError as error:
        print(error)          # "VM 'web': config file ... is not valid JSON ..."
"""

from __future__ import annotations


class ThalunixError(Exception):
    """Base class of every error Thalunix raises on purpose."""

    #: A short machine-readable code for the API (``{"error": code, "message": str}``).
    code = "error"
    #: The HTTP status the API maps this error to.
    http_status = 500


class ValidationError(ThalunixError):
    """A VM config (or another input) is not acceptable; nothing was changed.

    ``field`` names the offending field (``"ram"``, ``"disks[0].path"``) so a form
    can point at it.
    """

    code = "invalid"
    http_status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFoundError(ThalunixError):
    """A VM, disk, ISO or other named thing does not exist."""

    code = "not-found"
    http_status = 404


class ConflictError(ThalunixError):
    """The request clashes with the current state (name taken, VM running, lock held)."""

    code = "conflict"
    http_status = 409


class LockedError(ConflictError):
    """Another Thalunix process drives this VM."""

    code = "locked"


class CorruptConfigError(ThalunixError):
    """A file in the data folder could not be read as a VM config."""

    code = "corrupt"
    http_status = 500


class RuntimeMissingError(ThalunixError):
    """QEMU, qemu-img, firmware or another binary Thalunix needs was not found."""

    code = "runtime-missing"
    http_status = 503


class StartError(ThalunixError):
    """QEMU did not come up; the message carries QEMU's own words."""

    code = "start-failed"
    http_status = 500

    def __init__(self, message: str, qemu_output: str = "", accel_failure: bool = False) -> None:
        super().__init__(message)
        self.qemu_output = qemu_output
        #: True when QEMU died because of the accelerator (KVM internal error, WHPX failure...)
        #: so the caller can retry on the next rung of the ladder.
        self.accel_failure = accel_failure


class DataFolderError(ThalunixError):
    """The data folder cannot be used (read-only medium, no space, not a folder)."""

    code = "data-folder"
    http_status = 500
