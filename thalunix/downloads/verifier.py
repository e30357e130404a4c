"""Checksums and OpenPGP signatures: what decides whether a downloaded image may be used.

Signatures are checked with Sequoia-PGP (the ``pysequoia`` wheel: Linux, Windows and macOS
wheels on PyPI, no GnuPG binary or home directory to bundle). Sequoia's standard policy
applies: signatures and key bindings made with SHA-1 are refused, which fails closed.

A signature counts only when it is valid *and* made by one of the entry's publisher
fingerprints (primary key or one of its subkeys); any other key, even one in the keyring,
is an "unknown key".

Example::

    keyring = Keyring.load(SHIPPED_KEYS, data.keys_dir)
    check = verify_signature(sig_bytes, data=sums, allowed=["DF9B9C49EAA9298432589D76DA87E80D6294BE9B"],
                             keyring=keyring)
    if check.ok:
        sums = check.content or sums          # a clearsigned file yields the signed text
    table = parse_checksums(sums.decode())  # {"debian-12.8.0-amd64-netinst.iso": ("sha256", "…")}
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from thalunix.errors import ThalunixError

#: Where the publisher keys shipped with the app live.
SHIPPED_KEYS = Path(__file__).resolve().parent / "keys"
KEY_SUFFIXES = (".asc", ".gpg", ".pgp", ".key")
#: Hex length → algorithm, for checksum lines that do not name theirs.
ALGORITHM_BY_LENGTH = {64: "sha256", 128: "sha512"}
SUPPORTED_ALGORITHMS = ("sha256", "sha512")

_BSD_LINE = re.compile(r"^(?P<algo>SHA256|SHA512|SHA-256|SHA-512)\s*\((?P<name>.+)\)\s*=\s*(?P<hex>[0-9a-fA-F]+)\s*$")
_GNU_LINE = re.compile(r"^(?P<hex>[0-9a-fA-F]{64}|[0-9a-fA-F]{128})(?:\s+\*?(?P<name>\S.*?))?\s*$")
_SIG_BLOCK = re.compile(rb"-----BEGIN PGP SIGNATURE-----.*?-----END PGP SIGNATURE-----", re.S)


class VerificationError(ThalunixError):
    """A checksum or signature did not check out; the message says which file and why."""

    code = "verification-failed"
    http_status = 422

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        #: "sha256" when the hash the user typed is at fault (missing, malformed, different), for forms
        self.field = field


def normalise_hex(value: str, what: str = "checksum") -> str:
    """A user-typed hash, lower-case, checked to be SHA-256 (64 hex digits) or SHA-512 (128)."""
    text = value.strip().lower()
    if len(text) not in ALGORITHM_BY_LENGTH or not all(c in "0123456789abcdef" for c in text):
        raise VerificationError(f"{what} {value!r} is not a SHA-256 (64 hex digits) or SHA-512 (128) hash; "
                                "copy it again from the publisher's page", "sha256")
    return text


def algorithm_of(hexdigest: str) -> str:
    return ALGORITHM_BY_LENGTH[len(hexdigest)]


def parse_checksums(text: str) -> dict[str, tuple[str, str]]:
    """File name → (algorithm, lower-case hex) from GNU (``hash  name``), BSD (``SHA256 (name) = hash``) lines.

    Comments, blank lines and PGP armour lines are skipped; names are reduced to their last path part
    (lists such as ``./debian.iso`` or ``iso/debian.iso`` name the same file).
    """
    table: dict[str, tuple[str, str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "-----", "Hash:")):
            continue
        match = _BSD_LINE.match(line)
        if match:
            algorithm = match["algo"].replace("-", "").lower()
            hexdigest = match["hex"].lower()
            if len(hexdigest) != (64 if algorithm == "sha256" else 128):
                continue
            table[_base_name(match["name"])] = (algorithm, hexdigest)
            continue
        match = _GNU_LINE.match(line)
        if match:
            hexdigest = match["hex"].lower()
            table[_base_name(match["name"] or "")] = (algorithm_of(hexdigest), hexdigest)
    return table


def _base_name(name: str) -> str:
    return name.strip().replace("\\", "/").rsplit("/", 1)[-1]


def hash_file(path: Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


# -- OpenPGP ---------------------------------------------------------------------------------------------
def _sequoia():  # type: ignore[no-untyped-def]
    try:
        import pysequoia
    except ImportError:  # pragma: no cover - a broken install
        raise VerificationError("the OpenPGP library pysequoia is not installed, so no signature can be checked; "
                                "reinstall Thalunix (pip install pysequoia)") from None
    return pysequoia


class Keyring:
    """Publisher certificates, indexed by every primary and subkey fingerprint and key id."""

    def __init__(self, certs: Iterable[object] = ()) -> None:
        self._certs: dict[str, object] = {}       # primary fingerprint (upper hex) → Cert
        self._owner: dict[str, str] = {}          # key id / fingerprint of any (sub)key → primary fingerprint
        self.problems: list[str] = []
        for cert in certs:
            self.add(cert)

    @classmethod
    def load(cls, *folders: Path | None) -> "Keyring":
        """Every key file (``*.asc``, ``*.gpg``…) in the folders; unreadable files are noted in ``problems``."""
        ring = cls()
        for folder in folders:
            if folder is None or not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in KEY_SUFFIXES and path.is_file():
                    ring.add_file(path)
        return ring

    def add_file(self, path: Path) -> list[str]:
        try:
            certs = _sequoia().Cert.split_bytes(path.read_bytes())
        except (OSError, RuntimeError, ValueError) as error:
            self.problems.append(f"{path}: {str(error).splitlines()[0]}")
            return []
        return [self.add(cert) for cert in certs]

    def add(self, cert: object) -> str:
        primary = str(cert.fingerprint).upper()  # type: ignore[attr-defined]
        existing = self._certs.get(primary)
        if existing is not None:
            cert = existing.merge(cert)  # type: ignore[attr-defined]
        self._certs[primary] = cert
        pile = _sequoia().packet.PacketPile.from_bytes(str(cert).encode())
        for packet in pile:
            for value in (packet.fingerprint, packet.key_id):
                if value:
                    self._owner[str(value).upper()] = primary
        return primary

    def __contains__(self, fingerprint: str) -> bool:
        return fingerprint.replace(" ", "").upper() in self._certs

    def __len__(self) -> int:
        return len(self._certs)

    def fingerprints(self) -> list[str]:
        return sorted(self._certs)

    def cert(self, fingerprint: str) -> object | None:
        return self._certs.get(fingerprint.replace(" ", "").upper())

    def owner(self, key_id_or_fingerprint: str) -> str | None:
        """The primary fingerprint that owns a key id or (sub)key fingerprint, if known."""
        return self._owner.get(key_id_or_fingerprint.replace(" ", "").upper())


@dataclass
class SignatureCheck:
    """The outcome of one signature check; ``reason`` is a sentence for the user either way."""

    ok: bool
    status: str                  #: "valid", "bad-signature", "unknown-key", "missing-key", "malformed"
    reason: str
    signer: str | None = None    #: primary fingerprint of the publisher key that made the signature
    content: bytes | None = None  #: for a clearsigned file: the text the signature covers
    issuers: list[str] = field(default_factory=list)


def signature_issuers(signature: bytes) -> list[str]:
    """Key ids / fingerprints named in the signature packets (unauthenticated hints, used only to explain)."""
    ps = _sequoia()
    blocks = _SIG_BLOCK.findall(signature) or [signature]
    issuers: list[str] = []
    for block in blocks:
        try:
            pile = ps.packet.PacketPile.from_bytes(block)
        except (RuntimeError, ValueError):
            continue
        for packet in pile:
            for value in (packet.issuer_fingerprint, packet.issuer_key_id):
                if value and str(value).upper() not in issuers:
                    issuers.append(str(value).upper())
    # A key id is the tail of its fingerprint: name each key once, by the longer form.
    return [i for i in issuers if not any(o != i and o.endswith(i) for o in issuers)]


def verify_signature(signature: bytes, *, allowed: Iterable[str], keyring: Keyring, data: bytes | None = None,
                     file: Path | None = None, inline: bool = False, what: str = "the file") -> SignatureCheck:
    """Check a detached signature over ``data``/``file``, or an inline (clearsigned) ``signature`` message.

    Only the ``allowed`` publisher fingerprints count. Never raises for a bad signature: the
    result says what is wrong.
    """
    ps = _sequoia()
    allowed_set = {f.replace(" ", "").upper() for f in allowed}
    issuers = signature_issuers(signature)
    if not issuers:
        return SignatureCheck(False, "malformed", f"the signature for {what} is not an OpenPGP signature")
    certs = [keyring.cert(f) for f in sorted(allowed_set) if f in keyring]
    if not certs:
        return SignatureCheck(False, "missing-key",
                              f"no publisher key for {what} is in the keyring (expected "
                              f"{', '.join(sorted(allowed_set)) or 'none listed'}); refresh the keys "
                              "(thalunix iso catalog --refresh-keys) or give the SHA-256 yourself", issuers=issuers)
    owners = {keyring.owner(issuer) for issuer in issuers} - {None}
    if not owners & allowed_set:
        named = [f"{i} (a subkey of {keyring.owner(i)})" if keyring.owner(i) not in (None, i) else i for i in issuers]
        return SignatureCheck(False, "unknown-key",
                              f"the signature for {what} was made by an unknown key ({', '.join(named)}), not by "
                              f"the publisher ({', '.join(sorted(allowed_set))})", issuers=issuers)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if inline:
                result = ps.verify(bytes=signature, store=lambda _ids: certs)
            else:
                sig = ps.Sig.from_bytes(signature)
                if file is not None:
                    result = ps.verify(file=str(file), signature=sig, store=lambda _ids: certs)
                else:
                    result = ps.verify(bytes=data or b"", signature=sig, store=lambda _ids: certs)
    except (RuntimeError, ValueError, OSError) as error:
        detail = str(error).split("\n")[0]
        return SignatureCheck(False, "bad-signature",
                              f"the signature for {what} does not match it ({detail}): the file was altered or the "
                              "signature belongs to another file", issuers=issuers)
    signers = [str(valid.certificate).upper() for valid in result.valid_sigs]
    good = [s for s in signers if s in allowed_set]
    if not good:
        return SignatureCheck(False, "unknown-key", f"the signature for {what} is valid but made by "
                              f"{', '.join(signers)}, not by the publisher", issuers=issuers)
    content = bytes(result.bytes) if inline and result.bytes is not None else None
    return SignatureCheck(True, "valid", f"signed by the publisher key {good[0]}", signer=good[0], content=content,
                          issuers=issuers)


def fingerprint_label(fingerprint: str) -> str:
    """``DF9B 9C49 …`` grouping, as publishers print them."""
    clean = fingerprint.replace(" ", "").upper()
    return " ".join(clean[i:i + 4] for i in range(0, len(clean), 4))
