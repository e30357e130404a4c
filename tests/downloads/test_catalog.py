"""The shipped catalog: every entry is well-formed, names keys the app has or can fetch, and resolves and
downloads against a local copy of its publisher's layout (base_url pointed at 127.0.0.1, files named as the
publisher names them, signed the way the publisher signs, by a key made in the test)."""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import urllib.parse

import pytest

from downloads.conftest import PublisherKey, bsd_sums, sha256
from downloads.server import FileServer, random_bytes
from thalunix.downloads.catalog import Catalog, CatalogEntry, refresh_catalog, refresh_keys
from thalunix.downloads.verifier import SHIPPED_KEYS, Keyring, VerificationError
from thalunix.errors import ValidationError

SHIPPED = Catalog.shipped()

# How each publisher lays out a release folder (file names as they publish them).
SAMPLES: dict[str, dict] = {
    "ubuntu-desktop-lts": dict(files=["ubuntu-24.04.2-desktop-amd64.iso", "ubuntu-24.04.3-desktop-amd64.iso",
                                      "ubuntu-24.04.3-live-server-amd64.iso"],
                               pick="ubuntu-24.04.3-desktop-amd64.iso"),
    "ubuntu-server-lts": dict(files=["ubuntu-24.04.3-desktop-amd64.iso", "ubuntu-24.04.3-live-server-amd64.iso"],
                              pick="ubuntu-24.04.3-live-server-amd64.iso"),
    "fedora-workstation": dict(files=["Fedora-Workstation-Live-42-1.1.x86_64.iso"], style="bsd",
                               sums="Fedora-Workstation-42-1.1-x86_64-CHECKSUM",
                               pick="Fedora-Workstation-Live-42-1.1.x86_64.iso"),
    "debian-netinst": dict(files=["debian-13.2.0-amd64-netinst.iso", "debian-edu-13.2.0-amd64-netinst.iso",
                                  "debian-mac-13.2.0-amd64-netinst.iso"], pick="debian-13.2.0-amd64-netinst.iso"),
    "debian-live": dict(files=["debian-live-13.2.0-amd64-gnome.iso", "debian-live-13.2.0-amd64-kde.iso"],
                        pick="debian-live-13.2.0-amd64-gnome.iso"),
    "linuxmint-cinnamon": dict(files=["linuxmint-22.1-cinnamon-64bit.iso", "linuxmint-22.1-mate-64bit.iso"],
                               style="star", pick="linuxmint-22.1-cinnamon-64bit.iso"),
    "alpine-standard": dict(files=["alpine-standard-3.21.2-x86_64.iso", "alpine-standard-3.21.10-x86_64.iso",
                                   "alpine-virt-3.21.10-x86_64.iso"], per_image=True,
                            pick="alpine-standard-3.21.10-x86_64.iso"),
    "alpine-virt": dict(files=["alpine-standard-3.21.3-x86_64.iso", "alpine-virt-3.21.3-x86_64.iso"],
                        per_image=True, pick="alpine-virt-3.21.3-x86_64.iso"),
    "archlinux": dict(files=["archlinux-2025.11.01-x86_64.iso", "archlinux-2025.12.01-x86_64.iso",
                             "archlinux-x86_64.iso"], binary_signature=True, pick="archlinux-2025.12.01-x86_64.iso"),
    "opensuse-leap": dict(files=["openSUSE-Leap-15.6-NET-x86_64-Media.iso", "openSUSE-Leap-15.6-DVD-x86_64-Media.iso"],
                          per_image=True, pick="openSUSE-Leap-15.6-NET-x86_64-Media.iso"),
    "opensuse-tumbleweed": dict(files=["openSUSE-Tumbleweed-NET-x86_64-Current.iso"], per_image=True,
                                pick="openSUSE-Tumbleweed-NET-x86_64-Current.iso"),
    "almalinux-boot": dict(files=["AlmaLinux-9.6-x86_64-boot.iso", "AlmaLinux-9.6-x86_64-minimal.iso"], style="bsd",
                           pick="AlmaLinux-9.6-x86_64-boot.iso"),
    "freebsd": dict(files=["FreeBSD-14.2-RELEASE-amd64-disc1.iso.xz", "FreeBSD-14.2-RELEASE-amd64-bootonly.iso"],
                    style="bsd", pick="FreeBSD-14.2-RELEASE-amd64-disc1.iso"),
}


def test_shipped_catalog_is_complete_and_fails_closed():
    entries = {entry.id: entry for entry in SHIPPED.list()}
    images = [entry for entry in entries.values() if entry.kind == "image"]
    assert set(SAMPLES) == {entry.id for entry in images}          # every image entry is exercised below
    shipped_keys = Keyring.load(SHIPPED_KEYS)
    assert shipped_keys.problems == []
    for entry in images:
        assert entry.trust in ("signed", "checksum only"), entry.id
        for fingerprint in entry.fingerprints:
            assert len(fingerprint) == 40 and fingerprint == fingerprint.upper(), entry.id
            # Each publisher key ships with the app, or a key refresh knows where to fetch it.
            assert fingerprint in shipped_keys or fingerprint in entry.key_urls, (entry.id, fingerprint)
        assert set(entry.defaults) == {"os", "ram", "disk", "firmware", "tpm"}, entry.id
    for family in ("ubuntu", "fedora", "debian", "linuxmint", "alpine", "arch", "opensuse", "freebsd", "windows"):
        assert any(entry.family == family for entry in entries.values()), family
    for manual in ("windows-11", "windows-10"):
        entry = entries[manual]
        assert entry.trust == "manual" and entry.page.startswith("https://www.microsoft.com/")
        assert not entry.base_url and "iso add" in entry.instructions
    # Keys shipped from Debian's keyring packages carry the fingerprints the entries name.
    for fingerprint in entries["debian-netinst"].fingerprints + entries["archlinux"].fingerprints:
        assert fingerprint in shipped_keys


def test_catalog_rejects_malformed_entries():
    base = {"id": "x", "name": "X", "base_url": "https://example.test/", "image": {"file": "x.iso"},
            "checksums": {"file": "SUMS"}}
    CatalogEntry.from_dict(base)
    for broken, message in ((dict(base, signature={"file": "S.gpg", "kind": "detached", "over": "checksums"}),
                             "fingerprints"),
                            (dict(base, image={}), "image needs"),
                            (dict(base, id="Bad Id"), "id must be"),
                            (dict(base, surprise=1), "unknown fields"),
                            (dict(base, signature={"kind": "smoke", "over": "checksums"}, fingerprints=["A" * 40]),
                             "kind must be")):
        with pytest.raises(ValidationError, match=message):
            CatalogEntry.from_dict(broken)


def _sums(files: dict[str, bytes], style: str) -> bytes:
    if style == "bsd":
        return bsd_sums(files)
    star = "*" if style == "star" else " "
    return "".join(f"{sha256(body)} {star}{name}\n" for name, body in files.items()).encode()


def _local_copy(entry: CatalogEntry, server: FileServer, key: PublisherKey, sample: dict) -> tuple[CatalogEntry, dict]:
    """Serve the publisher's folder on 127.0.0.1 the way the entry expects to find it."""
    folder = urllib.parse.urlparse(entry.base()).path
    files: dict[str, bytes] = {}
    for index, name in enumerate(sample["files"]):
        body = random_bytes(200_000 + index, index)
        files[name] = lzma.compress(body) if name.endswith(".xz") else body
        server.add(folder + name, files[name])
    signature = entry.signature or {}
    style = sample.get("style", "gnu")
    if sample.get("per_image"):
        # One checksum file per image ({image}.sha256), as Alpine and openSUSE publish.
        for name, body in files.items():
            sums_name = entry.checksums["file"].replace("{image}", name)
            sums = _sums({name: body}, style)
            server.add(folder + sums_name, sums)
            if signature.get("over") == "checksums":
                server.add(folder + signature["file"].replace("{image}", name), key.sign(sums))
            if signature.get("over") == "image":
                server.add(folder + signature["file"].replace("{image}", name), key.sign(body))
    else:
        sums_name = sample.get("sums") or entry.checksums["file"].replace("{version}", entry.version)
        sums = _sums(files, style)
        if signature.get("kind") == "inline":
            server.add(folder + sums_name, key.sign(sums, "inline"))
        else:
            server.add(folder + sums_name, sums)
        if signature.get("over") == "checksums" and signature.get("kind") == "detached":
            server.add(folder + signature["file"], key.sign(sums))
        if signature.get("over") == "image":
            import pysequoia
            for name, body in files.items():
                sig = (bytes(pysequoia.sign(key.secret.signer(), body, mode=pysequoia.SignatureMode.DETACHED,
                                            armor=False)) if sample.get("binary_signature") else key.sign(body))
                server.add(folder + signature["file"].replace("{image}", name), sig)
    local = dataclasses.replace(entry, base_url=server.url(folder), mirrors=[],
                                fingerprints=[key.fingerprint] if entry.fingerprints else [], key_urls={})
    return local, files


@pytest.mark.parametrize("entry_id", sorted(SAMPLES))
def test_every_entry_resolves_downloads_and_verifies(entry_id: str, harness, server: FileServer,
                                                     publisher_key: PublisherKey):
    entry, sample = SHIPPED.get(entry_id), SAMPLES[entry_id]
    local, files = _local_copy(entry, server, publisher_key, sample)
    manager = harness.manager(local)
    job = manager.wait(manager.submit(entry_id).id, 60)
    assert job.state == "ready", job.message
    assert job.filename == sample["pick"]
    assert job.trust == entry.trust
    if entry.trust == "signed":
        assert job.signer == publisher_key.fingerprint
    final = harness.data.isos_dir / sample["pick"]
    published = files.get(sample["pick"]) or lzma.decompress(files[sample["pick"] + ".xz"])
    assert hashlib.sha256(final.read_bytes()).hexdigest() == sha256(published)
    assert manager.wait(manager.submit(entry_id).id, 60).result["file"] == str(final)   # again: the same file


def test_catalog_refresh_only_with_a_catalog_signature(tmp_path, server: FileServer, publisher_key: PublisherKey,
                                                       stranger_key: PublisherKey):
    import requests
    import json
    newer = SHIPPED.meta | {"updated": "2999-01-01"}
    body = json.dumps(dict(newer, entries=[{k: v for k, v in e.to_dict().items() if k != "trust"}
                                           for e in SHIPPED.list()][:3])).encode()
    server.add("/catalog.json", body)
    server.add("/catalog.json.sig", stranger_key.sign(body))
    ring = Keyring([publisher_key.public, stranger_key.public])
    shipped = Catalog(SHIPPED.list(), dict(SHIPPED.meta, refresh={"url": server.url("/catalog.json"),
                                                                  "fingerprints": [publisher_key.fingerprint]}))
    target = tmp_path / "catalog.json"
    with requests.Session() as session:
        with pytest.raises(VerificationError, match="unknown key"):
            refresh_catalog(session, target, ring, shipped=shipped)
        assert not target.exists()
        server.resources["/catalog.json.sig"].data = publisher_key.sign(body)
        fresh = refresh_catalog(session, target, ring, shipped=shipped)
        assert len(fresh.entries) == 3 and target.exists()
        with pytest.raises(VerificationError, match="no catalog signing key"):
            refresh_catalog(session, target, ring, url=server.url("/catalog.json"))   # the real shipped meta
    # A refreshed catalog is used only while its signature still verifies against the listed keys.
    assert Catalog.load(target, ring).origin == "shipped"      # Catalog.load reads the real shipped meta: no key


def test_key_refresh_keeps_only_the_listed_fingerprint(tmp_path, server: FileServer, publisher_key: PublisherKey,
                                                       stranger_key: PublisherKey):
    import requests
    # The key file also holds another key: only the one with the listed fingerprint is kept.
    server.add("/keys/publisher.asc", (str(stranger_key.public) + str(publisher_key.public)).encode())
    server.add("/keys/wrong.asc", str(stranger_key.public).encode())
    entries = [CatalogEntry.from_dict({"id": "a", "name": "A", "base_url": "https://x.test/", "image": {"file": "a.iso"},
                                       "checksums": {"file": "S"}, "signature": {"file": "S.gpg", "kind": "detached",
                                                                                 "over": "checksums"},
                                       "fingerprints": [publisher_key.fingerprint],
                                       "key_urls": {publisher_key.fingerprint: server.url("/keys/publisher.asc")}}),
               CatalogEntry.from_dict({"id": "b", "name": "B", "base_url": "https://x.test/", "image": {"file": "b.iso"},
                                       "checksums": {"file": "S"}, "signature": {"file": "S.gpg", "kind": "detached",
                                                                                 "over": "checksums"},
                                       "fingerprints": ["0" * 40], "key_urls": {"0" * 40: server.url("/keys/wrong.asc")}})]
    ring = Keyring()
    with requests.Session() as session:
        outcome = refresh_keys(session, Catalog(entries), tmp_path, ring)
    assert outcome[publisher_key.fingerprint] == "fetched" and outcome["0" * 40].startswith("refused")
    assert ring.fingerprints() == [publisher_key.fingerprint]
    assert [p.name for p in tmp_path.iterdir()] == [f"{publisher_key.fingerprint}.asc"]
    assert Keyring.load(tmp_path).fingerprints() == [publisher_key.fingerprint]


def test_url_names_cannot_smuggle_folders():
    from thalunix.downloads.catalog import resolve_url
    assert resolve_url("http://127.0.0.1/a%2F..%2F..%2Fetc%2Fpasswd", "a" * 64).filename == "passwd"
    assert resolve_url("http://127.0.0.1/d/b%20c.iso", "a" * 64).filename == "b c.iso"
    with pytest.raises(ValidationError, match="does not name a file"):
        resolve_url("http://127.0.0.1/..%2F", "a" * 64)
