"""The ISO catalog: which operating systems can be downloaded, and how to find and trust their current image.

The catalog is a data file shipped in the app (``catalog.json`` beside this module); a newer one can be
fetched from the catalog URL it names, and is used only when its OpenPGP signature verifies against the
catalog keys the shipped file lists. Each entry says where the images are (``base_url``, mirrors), how to
pick the current image (a fixed name or a pattern matched against the checksum list or the folder
listing), the checksum file, the signature over it (or over the image), the publisher's key fingerprints,
and defaults for a new VM. Every URL derives from ``base_url``, so tests point an entry at 127.0.0.1.

Trust levels (``entry.trust``): ``signed`` (checksum file or image signed by the publisher),
``checksum only`` (the publisher signs nothing: labelled so), ``no checksum`` (refused unless the user
types the hash), ``manual`` (e.g. Windows: a link to the publisher's page and instructions).

Example::

    catalog = Catalog.load(data)                       # shipped file, or a verified refreshed one
    entry = catalog.get("debian-netinst")
    source = resolve(entry, requests.Session(), keyring)  # fetch + verify SHA256SUMS(.sign), pick the image
    source.image_urls[0], source.expected              # ("https://…/debian-12.8.0-amd64-netinst.iso", "…")
"""

from __future__ import annotations

import copy
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from thalunix.downloads.verifier import (Keyring, SignatureCheck, VerificationError, parse_checksums,
                                         verify_signature)
from thalunix.errors import NotFoundError, ThalunixError, ValidationError

SHIPPED_CATALOG = Path(__file__).resolve().parent / "catalog.json"
SCHEMA = 1
TRUST_LEVELS = ("signed", "checksum only", "no checksum", "manual")
#: Checksum lists, signatures and folder listings are small; anything bigger is not what we asked for.
SMALL_FILE_LIMIT = 4 << 20
COMPRESSED_SUFFIXES = (".xz", ".7z")
_HREF = re.compile(r"""href\s*=\s*["']([^"'#?]+)""", re.I)
_NATURAL = re.compile(r"(\d+)")


class ResolveError(ThalunixError):
    """The current image of a catalog entry could not be found (network, 404, nothing matched)."""

    code = "resolve-failed"
    http_status = 502


@dataclass
class CatalogEntry:
    """One downloadable OS (or a manual one such as Windows), as written in catalog.json."""

    id: str
    name: str
    family: str = ""
    version: str = ""
    arch: str = "x86_64"
    kind: str = "image"                      #: "image" or "manual"
    base_url: str = ""
    mirrors: list[str] = field(default_factory=list)
    image: dict[str, str] = field(default_factory=dict)       #: {"file": …} or {"pattern": …, "from": …}
    checksums: dict[str, str] | None = None                   #: {"file": …} or {"pattern": …}
    signature: dict[str, str] | None = None                   #: {"file", "kind": detached|inline, "over"}
    fingerprints: list[str] = field(default_factory=list)
    key_urls: dict[str, str] = field(default_factory=dict)    #: fingerprint → where a key refresh finds it
    defaults: dict[str, Any] = field(default_factory=dict)
    page: str = ""
    instructions: str = ""
    notes: str = ""
    #: the image's approximate download size in bytes, for the catalog page (0: unknown); never checked
    size: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CatalogEntry":
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValidationError(f"catalog entry {data.get('id')!r} has unknown fields {sorted(unknown)}", "catalog")
        if not data.get("id") or not data.get("name"):
            raise ValidationError("a catalog entry needs an id and a name", "catalog")
        entry = cls(**copy.deepcopy(data))
        entry.check()
        return entry

    def check(self) -> None:
        where = f"catalog entry {self.id!r}"
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", self.id):
            raise ValidationError(f"{where}: the id must be lower-case letters, digits, '.' and '-'", "catalog")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ValidationError(f"{where}: size must be a whole number of bytes", "catalog")
        if self.kind == "manual":
            if not self.page:
                raise ValidationError(f"{where}: a manual entry needs the publisher's page", "catalog")
            return
        if self.kind != "image":
            raise ValidationError(f"{where}: kind must be image or manual", "catalog")
        if not self.base_url:
            raise ValidationError(f"{where}: base_url is missing", "catalog")
        if not (self.image.get("file") or self.image.get("pattern")):
            raise ValidationError(f"{where}: image needs a file or a pattern", "catalog")
        if self.image.get("pattern") and not self.checksums and self.image.get("from") != "listing":
            raise ValidationError(f"{where}: an image pattern needs a checksum list or from: listing", "catalog")
        if self.signature:
            if self.signature.get("kind") not in ("detached", "inline"):
                raise ValidationError(f"{where}: signature kind must be detached or inline", "catalog")
            if self.signature.get("over") not in ("checksums", "image"):
                raise ValidationError(f"{where}: signature over must be checksums or image", "catalog")
            if self.signature.get("over") == "checksums" and not self.checksums:
                raise ValidationError(f"{where}: a signature over checksums needs a checksum file", "catalog")
            if self.signature.get("kind") == "detached" and not self.signature.get("file"):
                raise ValidationError(f"{where}: a detached signature needs its file name", "catalog")
            if not self.fingerprints:
                raise ValidationError(f"{where}: a signed entry needs the publisher's key fingerprints", "catalog")

    @property
    def trust(self) -> str:
        if self.kind == "manual":
            return "manual"
        if self.signature:
            return "signed"
        return "checksum only" if self.checksums else "no checksum"

    def to_dict(self) -> dict[str, Any]:
        data = {name: copy.deepcopy(getattr(self, name)) for name in self.__dataclass_fields__}
        data["trust"] = self.trust
        return data

    def summary(self) -> dict[str, Any]:
        """What a catalog page shows: no resolution details."""
        return {"id": self.id, "name": self.name, "family": self.family, "version": self.version, "arch": self.arch,
                "kind": self.kind, "trust": self.trust, "fingerprints": list(self.fingerprints),
                "defaults": dict(self.defaults), "page": self.page, "instructions": self.instructions,
                "notes": self.notes, "size": self.size}

    def base(self, mirror: str | None = None) -> str:
        url = (mirror or self.base_url).replace("{version}", self.version)
        return url if url.endswith("/") else url + "/"


class Catalog:
    """The entries of one catalog file, by id."""

    def __init__(self, entries: list[CatalogEntry], meta: dict[str, Any] | None = None,
                 origin: str = "shipped") -> None:
        self.entries = {entry.id: entry for entry in entries}
        self.meta = meta or {}
        self.origin = origin

    @classmethod
    def parse(cls, raw: bytes | str, origin: str = "shipped") -> "Catalog":
        try:
            data = json.loads(raw)
        except ValueError as error:
            raise ValidationError(f"the {origin} ISO catalog is not valid JSON: {error}", "catalog") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), list):
            raise ValidationError(f"the {origin} ISO catalog is not a schema-{SCHEMA} catalog", "catalog")
        entries = [CatalogEntry.from_dict(item) for item in data["entries"]]
        ids = [entry.id for entry in entries]
        if len(set(ids)) != len(ids):
            raise ValidationError(f"the {origin} ISO catalog lists an id twice", "catalog")
        meta = {key: value for key, value in data.items() if key != "entries"}
        return cls(entries, meta, origin)

    @classmethod
    def shipped(cls) -> "Catalog":
        return cls.parse(SHIPPED_CATALOG.read_bytes(), "shipped")

    @classmethod
    def load(cls, catalog_file: Path | None = None, keyring: Keyring | None = None) -> "Catalog":
        """The refreshed catalog when it exists, is newer and its signature still verifies; else the shipped one."""
        shipped = cls.shipped()
        if catalog_file is None or not catalog_file.is_file():
            return shipped
        try:
            raw = catalog_file.read_bytes()
            signature = catalog_file.with_name(catalog_file.name + ".sig").read_bytes()
            fingerprints = shipped.meta.get("refresh", {}).get("fingerprints", [])
            check = verify_signature(signature, allowed=fingerprints, keyring=keyring or Keyring(), data=raw,
                                     what=str(catalog_file))
            if not check.ok:
                return shipped
            refreshed = cls.parse(raw, "refreshed")
        except (OSError, ThalunixError):
            return shipped
        if str(refreshed.meta.get("updated", "")) < str(shipped.meta.get("updated", "")):
            return shipped   # an app update ships a newer catalog than the last refresh
        return refreshed

    def get(self, entry_id: str) -> CatalogEntry:
        entry = self.entries.get(entry_id.lower())
        if entry is None:
            raise NotFoundError(f"no catalog entry {entry_id!r}; `thalunix iso catalog` lists them")
        return entry

    def list(self) -> list[CatalogEntry]:
        return sorted(self.entries.values(), key=lambda entry: (entry.family, entry.id))


# -- resolving an entry to one image ---------------------------------------------------------------------
@dataclass
class ResolvedSource:
    """A concrete image to fetch and what it must hash and be signed as."""

    catalog_id: str | None
    filename: str
    image_urls: list[str]                   #: the primary, then mirrors
    algorithm: str | None = None            #: "sha256"/"sha512" when a checksum is known
    expected: str | None = None             #: hex digest the image must have
    trust: str = "no checksum"              #: "signed", "checksum only", "user hash"
    signer: str | None = None               #: publisher fingerprint, once a signature verified
    signature_over: str | None = None       #: "checksums" or "image"
    signature_kind: str | None = None
    fingerprints: list[str] = field(default_factory=list)
    checksums_url: str | None = None
    checksums: bytes | None = None          #: the checksum file as fetched (signed form for inline)
    signature: bytes | None = None          #: the detached signature (checksums or image)
    defaults: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"catalog_id": self.catalog_id, "filename": self.filename, "image_urls": self.image_urls,
                "algorithm": self.algorithm, "expected": self.expected, "trust": self.trust, "signer": self.signer,
                "signature_over": self.signature_over, "signature_kind": self.signature_kind,
                "fingerprints": self.fingerprints, "checksums_url": self.checksums_url, "defaults": self.defaults}


def fetch_small(session: requests.Session, urls: list[str], what: str, timeout: float = 30) -> tuple[bytes, str]:
    """GET a small file from the first URL that serves it; (body, url). Raises :class:`ResolveError`."""
    problems = []
    for url in urls:
        try:
            with session.get(url, timeout=timeout, stream=True, headers={"Accept-Encoding": "identity"}) as response:
                if response.status_code != 200:
                    problems.append(f"{url}: HTTP {response.status_code}")
                    continue
                body = b""
                for block in response.iter_content(65536):
                    body += block
                    if len(body) > SMALL_FILE_LIMIT:
                        raise ResolveError(f"{what} at {url} is larger than {SMALL_FILE_LIMIT >> 20} MiB; "
                                           "that is not a checksum list; the catalog entry needs fixing")
                return body, url
        except requests.RequestException as error:
            problems.append(f"{url}: {type(error).__name__}")
    raise ResolveError(f"could not fetch {what} ({'; '.join(problems)}); check the network or try later")


def natural_key(name: str) -> list[Any]:
    """``debian-12.10.0`` sorts after ``debian-12.9.0``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in _NATURAL.split(name)]


def listing_names(html: bytes) -> list[str]:
    """File names linked from a web server's folder listing."""
    names = []
    for href in _HREF.findall(html.decode("utf-8", errors="replace")):
        name = urllib.parse.unquote(href.rstrip("/").rsplit("/", 1)[-1])
        if name and name not in names:
            names.append(name)
    return names


def pick(names: list[str], pattern: str, what: str) -> str:
    regex = re.compile(pattern)
    matches = [name for name in names if regex.fullmatch(name)]
    if not matches:
        raise ResolveError(f"no {what} matches {pattern!r} (the publisher may have changed its layout); "
                           "refresh the catalog or download by URL with --sha256")
    return max(matches, key=natural_key)


def resolve(entry: CatalogEntry, session: requests.Session, keyring: Keyring, user_hash: str | None = None,
            timeout: float = 30) -> ResolvedSource:
    """Find the entry's current image; fetch its checksum list and verify the list's signature now.

    Verifying before the image is fetched means a forged checksum list costs no download. A
    signature over the image itself is fetched here and checked after the download.
    """
    if entry.kind == "manual":
        raise ValidationError(f"{entry.name} cannot be downloaded by Thalunix: {entry.instructions} "
                              f"({entry.page}). Then add the file: thalunix iso add PATH", "source")
    bases = [entry.base()] + [entry.base(mirror) for mirror in entry.mirrors]
    listing: list[str] | None = None

    def names_in_listing() -> list[str]:
        nonlocal listing
        if listing is None:
            body, _ = fetch_small(session, bases, f"the folder listing of {entry.name}", timeout)
            listing = listing_names(body)
        return listing

    def fill(template: str, image: str | None) -> str:
        text = template.replace("{version}", entry.version)
        if "{image}" in text:
            if image is None:
                raise ValidationError(f"catalog entry {entry.id!r}: {{image}} used before the image is known",
                                      "catalog")
            text = text.replace("{image}", image)
        return text

    def pattern(template: str) -> str:
        return template.replace("{version}", re.escape(entry.version))

    image_name: str | None = None
    if entry.image.get("file"):
        image_name = fill(entry.image["file"], None)
    elif entry.image.get("from") == "listing":
        image_name = pick(names_in_listing(), pattern(entry.image["pattern"]),
                          f"image of {entry.name} in the folder listing")

    source = ResolvedSource(entry.id, image_name or "", [], fingerprints=list(entry.fingerprints),
                            defaults=dict(entry.defaults))
    table: dict[str, tuple[str, str]] = {}
    if entry.checksums:
        if entry.checksums.get("pattern"):
            sums_name = pick(names_in_listing(), pattern(entry.checksums["pattern"]),
                             f"checksum list of {entry.name}")
        else:
            sums_name = fill(entry.checksums["file"], image_name)
        sums, sums_url = fetch_small(session, [base + sums_name for base in bases],
                                     f"the checksum list {sums_name} of {entry.name}", timeout)
        source.checksums, source.checksums_url = sums, sums_url
        text = sums
        if entry.signature and entry.signature.get("over") == "checksums":
            check = _check_checksum_signature(entry, session, bases, sums, sums_name, image_name, keyring, timeout,
                                              source)
            text = check.content if check.content is not None else sums
        table = parse_checksums(text.decode("utf-8", errors="replace"))
        if image_name is None:
            image_name = pick(list(table), pattern(entry.image["pattern"]), f"image of {entry.name} in {sums_name}")
        if image_name not in table:
            raise ResolveError(f"{sums_name} of {entry.name} lists no checksum for {image_name}; the publisher's "
                               "files disagree: try later or refresh the catalog")
        source.algorithm, source.expected = table[image_name]
        if source.trust != "signed":
            source.trust = "checksum only"
    assert image_name is not None
    source.filename = image_name
    source.image_urls = [base + urllib.parse.quote(image_name) for base in bases]
    if entry.signature and entry.signature.get("over") == "image":
        sig_name = fill(entry.signature["file"], image_name)
        source.signature, _ = fetch_small(session, [base + sig_name for base in bases],
                                          f"the signature {sig_name} of {entry.name}", timeout)
        source.signature_over, source.signature_kind = "image", "detached"
        source.trust = "signed"   # provisional: the download is verified against it before it is ready
    if user_hash:
        return apply_user_hash(source, user_hash)
    if source.expected is None and source.trust != "signed":
        raise VerificationError(f"{entry.name} has no published checksum; Thalunix will not download an image it "
                                "cannot check. Give the SHA-256 from a source you trust: --sha256 HEX")
    return source


def _check_checksum_signature(entry: CatalogEntry, session: requests.Session, bases: list[str], sums: bytes,
                              sums_name: str, image_name: str | None, keyring: Keyring, timeout: float,
                              source: ResolvedSource) -> SignatureCheck:
    assert entry.signature is not None
    inline = entry.signature.get("kind") == "inline"
    if inline:
        check = verify_signature(sums, allowed=entry.fingerprints, keyring=keyring, inline=True,
                                 what=f"{sums_name} of {entry.name}")
    else:
        sig_name = entry.signature["file"].replace("{version}", entry.version).replace("{image}", image_name or "")
        sig_name = sig_name.replace("{checksums}", sums_name)
        signature, _ = fetch_small(session, [base + sig_name for base in bases],
                                   f"the signature {sig_name} of {entry.name}", timeout)
        source.signature = signature
        check = verify_signature(signature, allowed=entry.fingerprints, keyring=keyring, data=sums,
                                 what=f"{sums_name} of {entry.name}")
    source.signature_over, source.signature_kind = "checksums", ("inline" if inline else "detached")
    if not check.ok:
        raise SignatureRefused(check, sums_name, source)
    source.trust, source.signer = "signed", check.signer
    return check


class SignatureRefused(VerificationError):
    """The publisher's signature did not verify; carries the check and what was fetched for the quarantine."""

    def __init__(self, check: SignatureCheck, what: str, source: ResolvedSource) -> None:
        super().__init__(f"{what}: {check.reason}; nothing from it is trusted")
        self.check = check
        self.source = source


def apply_user_hash(source: ResolvedSource, user_hash: str) -> ResolvedSource:
    """The user's typed hash decides; if the publisher's list disagrees, refuse (one of them is wrong)."""
    from thalunix.downloads.verifier import algorithm_of, normalise_hex
    wanted = normalise_hex(user_hash, "--sha256")
    if source.expected and source.expected != wanted:
        raise VerificationError(f"the SHA-256 you gave for {source.filename} ({wanted}) differs from the "
                                f"publisher's ({source.expected}); check which one is right before downloading",
                                "sha256")
    if source.expected is None:
        source.algorithm, source.expected = algorithm_of(wanted), wanted
        if source.trust != "signed":
            source.trust = "user hash"
    return source


def resolve_url(url: str, user_hash: str | None, mirrors: list[str] | None = None) -> ResolvedSource:
    """A plain URL: accepted only with a hash the user typed (fail closed)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValidationError(f"{url!r} is neither a catalog id nor an http(s) URL; `thalunix iso catalog` lists "
                              "the ids", "source")
    # The last path segment, decoded, and cut to a bare name again: "%2F" must not smuggle in a folder.
    name = Path(urllib.parse.unquote(parsed.path.rstrip("/").rsplit("/", 1)[-1]).replace("\\", "/")).name
    if not name or name in (".", ".."):
        raise ValidationError(f"{url!r} does not name a file", "source")
    if not user_hash:
        raise VerificationError(f"{url} comes with no checksum Thalunix can trust; give the SHA-256 published "
                                f"for {name}: thalunix iso download URL --sha256 HEX", "sha256")
    source = ResolvedSource(None, name, [url] + list(mirrors or []))
    return apply_user_hash(source, user_hash)


# -- refreshing ------------------------------------------------------------------------------------------
def refresh_catalog(session: requests.Session, catalog_file: Path, keyring: Keyring, url: str | None = None,
                    shipped: Catalog | None = None) -> Catalog:
    """Fetch a newer catalog and its signature; keep it only if signed by a catalog key the app lists."""
    shipped = shipped or Catalog.shipped()
    refresh = shipped.meta.get("refresh") or {}
    url = url or refresh.get("url")
    fingerprints = list(refresh.get("fingerprints") or [])
    if not url:
        raise ValidationError("this build names no catalog URL; the shipped catalog is in use", "url")
    if not fingerprints:
        raise VerificationError("this build ships no catalog signing key, so a downloaded catalog could not be "
                                "trusted; the shipped catalog stays in use (update Thalunix for a newer one)")
    raw, _ = fetch_small(session, [url], "the ISO catalog")
    signature, _ = fetch_small(session, [url + ".sig"], "the ISO catalog's signature")
    check = verify_signature(signature, allowed=fingerprints, keyring=keyring, data=raw, what=f"the catalog {url}")
    if not check.ok:
        raise VerificationError(f"the catalog at {url} was refused: {check.reason}")
    fresh = Catalog.parse(raw, "refreshed")
    from thalunix.store import atomic_write_bytes
    atomic_write_bytes(catalog_file.with_name(catalog_file.name + ".sig"), signature)
    atomic_write_bytes(catalog_file, raw)
    return fresh


def refresh_keys(session: requests.Session, catalog: Catalog, keys_dir: Path, keyring: Keyring,
                 only_missing: bool = True) -> dict[str, str]:
    """Fetch the publisher keys the catalog names; a key is kept only if its fingerprint is the listed one.

    The fingerprints come from the shipped (or a signed refreshed) catalog, so a key file served by a
    compromised site cannot slip in another key. Returns fingerprint → what happened.
    """
    import warnings

    from thalunix.downloads.verifier import _sequoia
    from thalunix.store import atomic_write_bytes
    outcome: dict[str, str] = {}
    wanted: dict[str, str] = {}
    for entry in catalog.list():
        for fingerprint, key_url in entry.key_urls.items():
            wanted.setdefault(fingerprint.replace(" ", "").upper(), key_url)
    for fingerprint, key_url in sorted(wanted.items()):
        if only_missing and fingerprint in keyring:
            outcome[fingerprint] = "present"
            continue
        try:
            body, _ = fetch_small(session, [key_url], f"the key {fingerprint}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                certs = _sequoia().Cert.split_bytes(body)
        except (ThalunixError, RuntimeError, ValueError) as error:
            outcome[fingerprint] = f"failed: {str(error).splitlines()[0]}"
            continue
        match = [cert for cert in certs if str(cert.fingerprint).upper() == fingerprint]
        if not match:
            outcome[fingerprint] = f"refused: {key_url} holds no key with this fingerprint"
            continue
        atomic_write_bytes(keys_dir / f"{fingerprint}.asc", str(match[0]).encode())
        keyring.add(match[0])
        outcome[fingerprint] = "fetched"
    return outcome
