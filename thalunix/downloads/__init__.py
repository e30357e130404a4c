"""The download center: the ISO catalog, the download queue, verification, and the ISO library.

- :mod:`~thalunix.downloads.catalog`  the shipped catalog (catalog.json) and resolving an entry to one image
- :mod:`~thalunix.downloads.fetcher`  one HTTP transfer: Range resume, retries, mirrors, hash while downloading
- :mod:`~thalunix.downloads.verifier` checksum lists and OpenPGP signatures (Sequoia via pysequoia)
- :mod:`~thalunix.downloads.queue`    jobs: parallel, pause/resume/cancel, quarantine, survive restarts
- :mod:`~thalunix.downloads.library`  isos/ with sidecars, local ISOs, the listing with statuses
- ``keys/``                           publisher public keys shipped with the app

Example::

    from thalunix.downloads import DownloadManager, IsoLibrary
    manager = DownloadManager(data, bus)
    job = manager.submit("alpine-standard")
    manager.wait(job.id)
    IsoLibrary(data).list(manager)
"""

from thalunix.downloads.catalog import Catalog, CatalogEntry, ResolvedSource
from thalunix.downloads.library import IsoLibrary
from thalunix.downloads.queue import JOB_STATES, DownloadJob, DownloadManager, job_id_for
from thalunix.downloads.verifier import Keyring, VerificationError

__all__ = ["Catalog", "CatalogEntry", "DownloadJob", "DownloadManager", "IsoLibrary", "JOB_STATES", "Keyring",
           "ResolvedSource", "VerificationError", "job_id_for"]
