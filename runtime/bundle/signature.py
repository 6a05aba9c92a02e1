"""Ed25519 signatures over a bundle's manifest, checked offline against pinned public keys: the format of
``manifest.sig`` and the :class:`TrustPolicy` readers apply. Making keys and signatures is :mod:`.signing`'s.

``manifest.sig`` sits next to ``manifest.json`` (the manifest does not list it) and holds JSON::

    {"algorithm": "ed25519", "key_id": "<first 16 hex digits of SHA-256 of the raw public key>",
     "signature": "<base64 of the 64-byte Ed25519 signature over the exact bytes of manifest.json>"}

The manifest pins the size and SHA-256 of every other file, so one signature covers the whole
bundle; verification is signature check + manifest check. Keys are PEM files: the private key
PKCS#8 (unencrypted, mode 0600), the public key SubjectPublicKeyInfo. ``key_id`` only
makes errors readable ("signed by key X, not by the configured key Y"); trust comes from the
signature check against the configured key(s), never from the id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import MalformedFile, SignatureError
from . import jsonfile
from .manifest import MANIFEST, SIGNATURE
from .regular import read_regular

ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 64 << 10
PublicKeys = Ed25519PublicKey | str | os.PathLike | Sequence[Ed25519PublicKey | str | os.PathLike]


@dataclass(frozen=True)
class TrustPolicy:
    """Which signatures a reader accepts. No keys: signatures are reported, not required."""

    keys: tuple[Ed25519PublicKey, ...] = ()

    @classmethod
    def from_keys(cls, keys: PublicKeys | None) -> TrustPolicy:
        """From key objects or PEM paths (SignatureError for a missing or unusable key file)."""
        return cls(tuple(public_keys(keys)))

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def describe(self) -> str:
        return ", ".join(key_id(k) for k in self.keys) or "none"


#: the policy of a reader configured without keys
NO_KEYS = TrustPolicy()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -------------------------------------------------------------------------------------------- keys
def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    data = read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"public key file {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"public key file {path}: not an Ed25519 key ({type(key).__name__})")
    return key


def public_keys(keys: PublicKeys | None) -> list[Ed25519PublicKey]:
    """Normalise one key, one path or a list of either to a list of keys (empty: no signature policy)."""
    if keys is None:
        return []
    items: Iterable = [keys] if isinstance(keys, (Ed25519PublicKey, str, os.PathLike)) else keys
    return [k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in items]


def read_key_file(path: str | os.PathLike, kind: str) -> bytes:
    """The bytes of a ``kind`` (private/public) key file; SignatureError naming it if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{kind} key file {path}: not found") from None
    except OSError as exc:
        raise SignatureError(f"{kind} key file {path}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------------------ verify
def parse_signature(raw: bytes) -> tuple[str, bytes]:
    """(key id, raw signature) from ``manifest.sig`` bytes; SignatureError (and nothing else) if malformed.

    The key id is only ever quoted in messages: anything but 1-64 ASCII letters and digits becomes ``?``.
    """
    try:
        data = jsonfile.loads(raw, SIGNATURE, max_bytes=MAX_SIGNATURE_BYTES)
    except MalformedFile as exc:
        raise SignatureError(str(exc)) from None
    if not isinstance(data, dict) or data.get("algorithm") != ALGORITHM or not isinstance(data.get("signature"), str):
        raise SignatureError(f"{SIGNATURE}: expected {{\"algorithm\": \"ed25519\", \"signature\": base64}}")
    try:
        sig = base64.b64decode(data["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{SIGNATURE} → signature: not base64") from None
    if len(sig) != 64:
        raise SignatureError(f"{SIGNATURE} → signature: {len(sig)} bytes, an Ed25519 signature has 64")
    kid = data.get("key_id", "?")
    return (kid if isinstance(kid, str) and kid.isascii() and kid.isalnum() and len(kid) <= 64 else "?"), sig


def read_signature_bytes(bundle_dir: str | os.PathLike) -> bytes | None:
    """The raw ``manifest.sig`` of a directory, None when the bundle is unsigned."""
    try:
        return read_regular(Path(bundle_dir) / SIGNATURE, SIGNATURE, max_bytes=MAX_SIGNATURE_BYTES, follow_links=False)
    except FileNotFoundError:
        return None
    except MalformedFile as exc:  # not a regular file, or too large
        raise SignatureError(str(exc)) from None
    except OSError as exc:
        raise SignatureError(f"{SIGNATURE}: unreadable ({exc.strerror or exc})") from None


def check(manifest: bytes, signature: bytes | None, policy: TrustPolicy) -> str | None:
    """Check ``signature`` over the exact ``manifest`` bytes; return the matching key id.

    Without keys in ``policy`` nothing is required: returns None (a present signature is only parsed).
    With keys, SignatureError unless one of them verifies the signature.
    """
    if not policy.required:
        return None
    if signature is None:
        raise SignatureError(f"unsigned: {SIGNATURE} is missing (trusted key(s) {policy.describe()})")
    signed_by, sig = parse_signature(signature)
    for key in policy.keys:
        try:
            key.verify(sig, manifest)
            return key_id(key)
        except InvalidSignature:
            continue
    if signed_by in {key_id(k) for k in policy.keys}:
        raise SignatureError(f"wrong signature: {MANIFEST} was changed after signing, or the signature is corrupt "
                             f"(key {signed_by})")
    raise SignatureError(f"wrong signature: signed by key {signed_by}, trusted key(s) {policy.describe()}")
