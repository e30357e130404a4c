"""Fixtures for download tests: a real HTTP server on 127.0.0.1, an OpenPGP test key made here, a fake publisher."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from downloads.server import FileServer
from thalunix.downloads.catalog import Catalog, CatalogEntry
from thalunix.downloads.fetcher import RetryPolicy
from thalunix.downloads.queue import DownloadManager
from thalunix.downloads.verifier import Keyring
from thalunix.events import EventBus
from thalunix.store import DataFolder

FAST_RETRY = RetryPolicy(attempts=3, backoff=0.05, max_backoff=0.2, connect_timeout=5, read_timeout=10)


@dataclass
class PublisherKey:
    """A publisher key generated for the test: sign with it, trust its public half."""

    secret: Any
    public: Any
    fingerprint: str

    def sign(self, data: bytes, mode: str = "detached") -> bytes:
        import pysequoia
        kinds = {"detached": pysequoia.SignatureMode.DETACHED, "inline": pysequoia.SignatureMode.CLEAR}
        return bytes(pysequoia.sign(self.secret.signer(), data, mode=kinds[mode]))


def make_key(name: str) -> PublisherKey:
    import pysequoia
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        secret = pysequoia.Tsk.generate(f"{name} <{name.lower().replace(' ', '.')}@example.test>")
        public = pysequoia.Cert.from_bytes(str(secret.extract_certificate()).encode())
        assert not public.has_secret_keys
    return PublisherKey(secret, public, str(public.fingerprint).upper())


@pytest.fixture(scope="session")
def publisher_key() -> PublisherKey:
    return make_key("Test Publisher")


@pytest.fixture(scope="session")
def stranger_key() -> PublisherKey:
    return make_key("Somebody Else")


@pytest.fixture
def keyring(publisher_key: PublisherKey, stranger_key: PublisherKey) -> Keyring:
    # The stranger's key is in the keyring too: being known is not enough, it must be the entry's publisher.
    return Keyring([publisher_key.public, stranger_key.public])


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        yield running


@pytest.fixture
def data(tmp_path: Path) -> DataFolder:
    return DataFolder.open(tmp_path / "data")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gnu_sums(files: dict[str, bytes]) -> bytes:
    return "".join(f"{sha256(body)}  {name}\n" for name, body in files.items()).encode()


def bsd_sums(files: dict[str, bytes]) -> bytes:
    lines = [f"# {name}: {len(body)} bytes\nSHA256 ({name}) = {sha256(body)}\n" for name, body in files.items()]
    return "".join(lines).encode()


def entry(server: FileServer, folder: str = "/pub/", **fields: Any) -> CatalogEntry:
    """A catalog entry pointing at the test server (every URL derives from base_url)."""
    data: dict[str, Any] = {"id": "testos", "name": "Test OS", "family": "test", "version": "1",
                            "base_url": server.url(folder), "image": {"pattern": r"testos-\d+\.\d+-amd64\.iso"},
                            "checksums": {"file": "SHA256SUMS"},
                            "defaults": {"os": "linux", "ram": "1G", "disk": "8G", "firmware": "bios", "tpm": "off"}}
    data.update(fields)
    return CatalogEntry.from_dict(data)


def signed_entry(server: FileServer, key: PublisherKey, **fields: Any) -> CatalogEntry:
    fields.setdefault("signature", {"file": "SHA256SUMS.gpg", "kind": "detached", "over": "checksums"})
    fields.setdefault("fingerprints", [key.fingerprint])
    return entry(server, **fields)


@dataclass
class Harness:
    data: DataFolder
    bus: EventBus
    keyring: Keyring
    managers: list[DownloadManager] = field(default_factory=list)

    def manager(self, *entries: CatalogEntry, **options: Any) -> DownloadManager:
        options.setdefault("retry", FAST_RETRY)
        manager = DownloadManager(self.data, self.bus, catalog=Catalog(list(entries)), keyring=self.keyring,
                                  **options)
        self.managers.append(manager)
        return manager


@pytest.fixture
def harness(data: DataFolder, keyring: Keyring) -> Iterator[Harness]:
    made = Harness(data, EventBus(), keyring)
    yield made
    for manager in made.managers:
        for job in list(manager.jobs.values()):
            if job.state in ("queued", "resolving", "downloading"):
                job.control.cancel()
        manager.close(timeout=10)


def publish(server: FileServer, key: PublisherKey | None, files: dict[str, bytes], folder: str = "/pub/",
            sums_name: str = "SHA256SUMS", sig_name: str = "SHA256SUMS.gpg", style: str = "gnu",
            signature: str = "detached", **options: Any) -> None:
    """Put images, their checksum list and its signature on the server, as a publisher would."""
    for name, body in files.items():
        server.add(folder + name, body, **options)
    sums = (gnu_sums if style == "gnu" else bsd_sums)(files)
    if key is not None and signature == "inline":
        server.add(folder + sums_name, key.sign(sums, "inline"))
        return
    server.add(folder + sums_name, sums)
    if key is not None:
        server.add(folder + sig_name, key.sign(sums))
