"""Ed25519 signatures over a bundle's manifest, verifiable offline with a pinned public key.

``manifest.sig`` sits next to ``manifest.json`` (the manifest does not list it) and holds JSON::

    {"algorithm": "ed25519", "key_id": "<first 16 hex digits of SHA-256 of the raw public key>",
     "signature": "<base64 of the 64-byte Ed25519 signature over the exact bytes of manifest.json>"}

The manifest pins the size and SHA-256 of every other file, so one signature covers the whole
bundle; verification is signature check + manifest check. Keys are PEM files: the private key
PKCS#8 (unencrypted, written with mode 0600), the public key SubjectPublicKeyInfo. ``key_id`` only
makes errors readable ("signed by key X, not by the configured key Y"); trust comes from the
signature check against the configured key(s), never from the id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..manifest import MANIFEST, verify_manifest
from . import SignatureError
from ..atomic import write_atomic
from .pack import SIGNATURE

ALGORITHM = "ed25519"
PublicKeys = Ed25519PublicKey | str | os.PathLike | Sequence[Ed25519PublicKey | str | os.PathLike]


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -------------------------------------------------------------------------------------------- keys
def keygen(private_path: str | os.PathLike, public_path: str | os.PathLike, *, force: bool = False) -> str:
    """Write a new key pair (PEM); refuses to overwrite unless ``force``. Returns the key id."""
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise SignatureError("the private and the public key need two different files")
    if not force:
        for p in (private_path, public_path):
            if p.exists():
                raise SignatureError(f"{p} exists; not overwritten (use --force)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(private_path, private_pem, 0o600)
    write_atomic(public_path, public_pem, 0o644)
    return key_id(key.public_key())


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"private key file {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"private key file {path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    data = _read_key_file(path, "public")
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


def _read_key_file(path: str | os.PathLike, kind: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{kind} key file {path}: not found") from None
    except OSError as exc:
        raise SignatureError(f"{kind} key file {path}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------------ sign, verify
def sign(bundle_dir: str | os.PathLike, private_key: Ed25519PrivateKey | str | os.PathLike) -> str:
    """Check the bundle's manifest, then write ``manifest.sig`` over ``manifest.json``; return the key id.

    Only an intact bundle is signed: a signature vouches for the hashes the manifest lists.
    """
    bundle_dir = Path(bundle_dir)
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    verify_manifest(bundle_dir)
    manifest = (bundle_dir / MANIFEST).read_bytes()
    kid = key_id(key.public_key())
    body = {"algorithm": ALGORITHM, "key_id": kid, "signature": base64.b64encode(key.sign(manifest)).decode()}
    write_atomic(bundle_dir / SIGNATURE, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode(), 0o644,
                  tmp_dir=bundle_dir.resolve().parent)
    return kid


def read_signature(bundle_dir: str | os.PathLike) -> tuple[str, bytes]:
    """(key id, raw signature) from ``manifest.sig``; raises SignatureError if absent or malformed."""
    path = Path(bundle_dir) / SIGNATURE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SignatureError(f"unsigned: {SIGNATURE} is missing") from None
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{SIGNATURE}: unreadable ({exc})") from None
    if not isinstance(raw, dict) or raw.get("algorithm") != ALGORITHM or not isinstance(raw.get("signature"), str):
        raise SignatureError(f"{SIGNATURE}: expected {{\"algorithm\": \"ed25519\", \"signature\": base64}}")
    try:
        sig = base64.b64decode(raw["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{SIGNATURE} → signature: not base64") from None
    if len(sig) != 64:
        raise SignatureError(f"{SIGNATURE} → signature: {len(sig)} bytes, an Ed25519 signature has 64")
    return str(raw.get("key_id", "?")), sig


def verify_signature(bundle_dir: str | os.PathLike, public_key: PublicKeys) -> str:
    """Check ``manifest.sig`` against one or several trusted keys; return the id of the key that matched.

    Raises SignatureError when the bundle is unsigned or no trusted key verifies the signature. This
    checks the signature only; the manifest's hashes are checked by ``verify_manifest``.
    """
    keys = public_keys(public_key)
    if not keys:
        raise SignatureError("no public key given")
    bundle_dir = Path(bundle_dir)
    signed_by, sig = read_signature(bundle_dir)
    try:
        manifest = (bundle_dir / MANIFEST).read_bytes()
    except OSError as exc:
        raise SignatureError(f"{MANIFEST}: unreadable ({exc.strerror or exc})") from None
    for key in keys:
        try:
            key.verify(sig, manifest)
            return key_id(key)
        except InvalidSignature:
            continue
    trusted = ", ".join(key_id(k) for k in keys)
    if signed_by in {key_id(k) for k in keys}:
        raise SignatureError(f"wrong signature: {MANIFEST} was changed after signing, or the signature is corrupt "
                             f"(key {signed_by})")
    raise SignatureError(f"wrong signature: signed by key {signed_by}, trusted key(s) {trusted}")


