"""Making Ed25519 keys and signing bundles (the build machine's side; checking is :mod:`.signature`'s).

A private key is written with mode 0600 and never into the working directory by default: ``keygen``
without paths writes ``$XDG_CONFIG_HOME/m2fpkit/m2fp-signing.key`` (``~/.config`` when unset; the
directory created 0700) and its ``.pub`` beside it, the key ``sign`` uses when given none. Only an
intact bundle is signed: a signature vouches for the hashes its manifest lists.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import SignatureError
from . import jsonfile
from .atomic import write_atomic
from .manifest import SIGNATURE
from .reader import inspect
from .signature import ALGORITHM, key_id, read_key_file

#: file names of a key pair in :func:`key_dir`
PRIVATE_KEY, PUBLIC_KEY = "m2fp-signing.key", "m2fp-signing.pub"


def key_dir() -> Path:
    """Where ``keygen`` puts a key pair by default: ``$XDG_CONFIG_HOME/m2fpkit``, else ``~/.config/m2fpkit``."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "m2fpkit"


def default_private_key() -> Path:
    return key_dir() / PRIVATE_KEY


def default_public_key() -> Path:
    return key_dir() / PUBLIC_KEY


def keygen(private_path: str | os.PathLike | None = None, public_path: str | os.PathLike | None = None, *,
           force: bool = False) -> str:
    """Write a new key pair (PEM; default in :func:`key_dir`, created 0700; the public key defaults to the
    private key's path with ``.pub``); refuses to overwrite unless ``force``. Returns the key id."""
    if private_path is None:
        key_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = Path(private_path) if private_path is not None else default_private_key()
    public_path = Path(public_path) if public_path is not None else private_path.with_suffix(".pub")
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
    data = read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"private key file {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"private key file {path}: not an Ed25519 key ({type(key).__name__})")
    return key


def sign(bundle_dir: str | os.PathLike, private_key: Ed25519PrivateKey | str | os.PathLike) -> str:
    """Check the bundle's manifest, then write ``manifest.sig`` over ``manifest.json``; return the key id."""
    bundle_dir = Path(bundle_dir)
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    manifest = inspect(bundle_dir).manifest.raw
    write_atomic(bundle_dir / SIGNATURE, signature_bytes(manifest, key), 0o644, tmp_dir=bundle_dir.resolve().parent)
    return key_id(key.public_key())


def signature_bytes(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    """The content of ``manifest.sig`` for these exact manifest bytes."""
    return jsonfile.dumps({"algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
                           "signature": base64.b64encode(key.sign(manifest)).decode()})
