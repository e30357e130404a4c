"""Checksum lists in the formats publishers use, and OpenPGP checks on real-world signatures (Debian's own
archive signatures verified with Debian's keyring), so the library choice is proven on more than test keys."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from downloads.conftest import PublisherKey
from thalunix.downloads.verifier import (SHIPPED_KEYS, Keyring, VerificationError, normalise_hex, parse_checksums,
                                         verify_signature)

A, B = "a" * 64, "b" * 128


def test_parse_checksum_formats():
    text = (f"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n# Fedora-X.iso: 123 bytes\n"
            f"SHA256 (Fedora-X.iso) = {A.upper()}\n{A}  plain.iso\n{A} *star.iso\n{B}  ./sub/big.iso\n"
            f"SHA512 (bsd512.iso) = {B}\nnot a checksum line\n{A[:-1]}  short.iso\n")
    assert parse_checksums(text) == {"Fedora-X.iso": ("sha256", A), "plain.iso": ("sha256", A),
                                     "star.iso": ("sha256", A), "big.iso": ("sha512", B),
                                     "bsd512.iso": ("sha512", B)}
    assert normalise_hex(" " + A.upper() + "\n") == A
    with pytest.raises(VerificationError, match="not a SHA-256"):
        normalise_hex("xyz")


def test_malformed_and_missing_key_signatures(publisher_key: PublisherKey):
    ring = Keyring([publisher_key.public])
    check = verify_signature(b"garbage", allowed=[publisher_key.fingerprint], keyring=ring, data=b"x")
    assert not check.ok and check.status == "malformed"
    check = verify_signature(publisher_key.sign(b"x"), allowed=["0" * 40], keyring=ring, data=b"x")
    assert not check.ok and check.status == "missing-key" and "refresh" in check.reason
    check = verify_signature(publisher_key.sign(b"x"), allowed=[publisher_key.fingerprint], keyring=ring, data=b"x")
    assert check.ok and check.signer == publisher_key.fingerprint


def _debian_inrelease() -> tuple[bytes, Keyring]:
    files = sorted(glob.glob("/var/lib/apt/lists/*_InRelease"))
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    if not files or not keyring.exists():
        pytest.skip("no Debian apt lists or archive keyring on this machine")
    ring = Keyring()
    ring.add_file(keyring)
    return Path(files[0]).read_bytes(), ring


def test_real_world_clearsigned_and_detached_debian_signatures():
    raw, ring = _debian_inrelease()
    check = verify_signature(raw, allowed=ring.fingerprints(), keyring=ring, inline=True, what="InRelease")
    assert check.ok, check.reason
    assert check.content and check.content.startswith(b"Origin:")
    # The same signature as a detached one over the signed text (how Release.gpg / SHA256SUMS.sign work).
    _, rest = raw.split(b"\n\n", 1)
    body, signature = rest.split(b"\n-----BEGIN PGP SIGNATURE-----", 1)
    signature = b"-----BEGIN PGP SIGNATURE-----" + signature
    body = b"\n".join(line[2:] if line.startswith(b"- ") else line for line in body.split(b"\n"))
    assert verify_signature(signature, allowed=ring.fingerprints(), keyring=ring, data=body).ok
    tampered = verify_signature(signature, allowed=ring.fingerprints(), keyring=ring, data=body.replace(b"a", b"b", 1))
    assert not tampered.ok and tampered.status == "bad-signature"
    # Debian's archive keys are not CD signing keys: an entry that trusts only the CD keys refuses it.
    shipped = Keyring.load(SHIPPED_KEYS)
    cd_only = verify_signature(signature, allowed=["DF9B9C49EAA9298432589D76DA87E80D6294BE9B"], keyring=shipped,
                               data=body)
    assert not cd_only.ok and cd_only.status == "unknown-key"
