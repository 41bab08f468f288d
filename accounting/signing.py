"""Ed25519 signatures over ledger records (``cryptography``), so a forged append is detected
without a head published out of band.

A signed ledger's header names the public key (``"signing": {"algorithm": "ed25519",
"public_key": <64 hex digits>}``); every record of it, the header included, carries ``"sig"``: the
signature over the record's canonical bytes without ``sig`` and ``hash``. Those bytes contain
``prev``, the hash of the previous line, so each signature commits to the whole chain up to its
record: a writer without the private key can append correctly re-hashed records, and
:func:`accounting.verify` rejects them at the first one. Deleting records at the end still needs
``--expect-head``; replacing the whole ledger with one signed by another key needs the expected
public key (``verify(..., public_key=...)``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ALGORITHM",
    "fingerprint",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "public_hex",
    "signature_ok",
]

ALGORITHM = "ed25519"


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 hex digits (what a ledger header stores)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def fingerprint(public_key_hex: str) -> str:
    """``sha256:<16 hex>`` of the raw public key: a short name for reports and messages."""
    return "sha256:" + hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


def signature_ok(public_key_hex: str, body: bytes, sig_hex: object) -> bool:
    """True when ``sig_hex`` is a valid Ed25519 signature of ``body`` under the key."""
    if not isinstance(sig_hex, str) or len(sig_hex) != 128:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(sig_hex), body)
    except (ValueError, InvalidSignature):
        return False
    return True


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Writes a new PKCS#8 PEM private key (mode 0600, refusing to overwrite) and its PEM public
    key; returns the public key's hex."""
    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists():
            raise FileExistsError(f"key file already exists: {p}")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public_hex(key)


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (ValueError naming the file otherwise)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; an Ed25519 key is required.")
    return key


def load_public_key(path: str | os.PathLike) -> str:
    """The hex of an Ed25519 public key read from a PEM file (or a file of 64 hex digits)."""
    data = Path(path).read_bytes()
    text = data.decode("ascii", "replace").strip()
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower()):
        return text.lower()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise ValueError(f"{path} is not a PEM public key: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; an Ed25519 key is required.")
    return public_hex(key)
