"""Thalunix: a portable, zero-install manager for QEMU virtual machines.

The package is a library first: nothing under ``thalunix/`` imports a UI toolkit.
The CLI (:mod:`thalunix.cli`), the local API (:mod:`thalunix.api`) and the window
(:mod:`thalunix.gui`) are thin fronts over it.
"""

__version__ = "0.1.0"
