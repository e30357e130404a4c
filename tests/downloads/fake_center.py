"""A download center for API and UI tests: publishers on a real 127.0.0.1 server, their entries in the engine's catalog.

The catalog the engine serves is the shipped one (so the catalog page looks as users see it, Windows
included) plus entries whose every URL points at the local :class:`~downloads.server.FileServer`;
only those are ever downloaded. The signing key is made in the test (see ``downloads.conftest``).

Example::

    with FileServer() as server:
        center = FakeCenter.install(engine, server, make_key("Test Publisher"))
        engine.download_iso("testos")            # fetched from 127.0.0.1, signature checked
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from downloads.conftest import FAST_RETRY, PublisherKey, entry, publish, sha256, signed_entry
from downloads.server import FileServer, random_bytes
from thalunix.downloads.catalog import Catalog, CatalogEntry
from thalunix.engine import DirectEngine

#: Defaults of the signed test entry: each differs from what `vm create` uses without them.
TESTOS_DEFAULTS = {"os": "other", "ram": "768M", "disk": "3G", "firmware": "bios", "tpm": "off"}


@dataclass
class FakeCenter:
    server: FileServer
    key: PublisherKey
    testos: bytes          #: the signed entry's image
    badsum: bytes          #: an image whose published checksum is wrong
    nosum: bytes           #: an image published without any checksum

    @classmethod
    def install(cls, engine: DirectEngine, server: FileServer, key: PublisherKey, size: int = 6 << 20,
                rate: float | None = 3_000_000) -> "FakeCenter":
        testos, badsum, nosum = random_bytes(size, seed=1), random_bytes(1 << 20, seed=2), random_bytes(1 << 19, seed=3)
        options: dict[str, Any] = {"rate": rate} if rate else {}
        publish(server, key, {"testos-1.0-amd64.iso": testos}, folder="/testos/", **options)
        server.add("/badsum/badsum-2.0-amd64.iso", badsum)
        server.add("/badsum/SHA256SUMS", f"{'ab' * 32}  badsum-2.0-amd64.iso\n".encode())
        server.add("/nosum/nosum-3.0.iso", nosum)
        entries: list[CatalogEntry] = [
            signed_entry(server, key, id="testos", name="Test OS", family="test", version="1.0",
                         base_url=server.url("/testos/"), defaults=dict(TESTOS_DEFAULTS), size=size),
            entry(server, id="badsum", name="Broken Mirror OS", family="test", version="2.0",
                  base_url=server.url("/badsum/"), image={"pattern": r"badsum-\d+\.\d+-amd64\.iso"}, size=1 << 20),
            entry(server, id="nosum", name="Unchecked OS", family="test", version="3.0",
                  base_url=server.url("/nosum/"), image={"file": "nosum-3.0.iso"}, checksums=None, size=1 << 19),
        ]
        manager = engine.downloads
        manager.catalog = Catalog([*Catalog.shipped().list(), *entries])
        manager.keyring.add(key.public)
        manager.retry = FAST_RETRY
        return cls(server, key, testos, badsum, nosum)

    @property
    def nosum_sha256(self) -> str:
        return sha256(self.nosum)
