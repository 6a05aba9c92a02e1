"""Moving verified bundles between machines: pack, sign, verify, install, pull (``m2fp-bundle``).

A version travels as one uncompressed tar, ``m2fp-<version>.tar``, whose members all live under
``<version>/``: ``manifest.json`` first, ``manifest.sig`` if the bundle is signed, then every file the
manifest lists. Packing is deterministic (fixed owner, mode and mtime), so the same bundle always
packs to the same bytes and a partial download can be resumed against a re-packed file.

Nothing here trusts an archive: :func:`~.pack.unpack` refuses absolute paths, ``..``, links,
devices, members the manifest does not list and members larger than the manifest says, *before*
writing a byte; :func:`~.install.install` unpacks into a dot-directory of the store, verifies there
(hashes, schema, graph ⇄ config, optional Ed25519 signature) and publishes with one rename, so a
reader sees no version or a complete, verified one.

Errors (all are :class:`~m2fpkit.runtime.errors.BundleError`, so the CLI prints one line)::

    BundleError
    ├── VersionExists          (store) the version is already installed; use force to replace
    └── DeliveryError
        ├── ArchiveError       unsafe, truncated or foreign archive
        ├── SignatureError     unsigned, wrongly signed, or the key file is missing/unreadable
        ├── VerificationFailed the bundle failed a check; ``.report`` says which
        ├── VersionInUse       rm refused: routes or aliases still name the version
        └── TransferError      pull: network or HTTP failure (a partial download is kept to resume)
            └── Unauthorized   the server refused the token (401)

Modules: :mod:`.pack` (tar in and out), :mod:`.signing` (keys, ``manifest.sig``), :mod:`.install`
(verify, install, promote, remove, list), :mod:`.pull` (HTTP client), :mod:`.cli` (``m2fp-bundle``).
They import only the standard library, onnxruntime (through the runtime's verification),
cryptography and click (the CLI) — never torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BundleError

if TYPE_CHECKING:
    from .install import Report

#: the model directory every command works on inside a bundle root
MODEL = "m2fp"


class DeliveryError(BundleError):
    """A bundle could not be packed, verified, installed, removed or fetched."""


class ArchiveError(DeliveryError):
    """The archive is unsafe, truncated or not a bundle archive."""


class SignatureError(DeliveryError):
    """Missing or wrong signature, or an unusable key."""


class VerificationFailed(DeliveryError):
    """A bundle failed verification; ``report`` holds every check and its result."""

    def __init__(self, message: str, report: "Report | None" = None) -> None:
        super().__init__(message)
        self.report = report


class VersionInUse(DeliveryError):
    """The version is still named by a routes file or an alias."""


class TransferError(DeliveryError):
    """Downloading a bundle failed."""


class Unauthorized(TransferError):
    """The server answered 401: missing or wrong token."""


def archive_name(version: str) -> str:
    return f"{MODEL}-{version}.tar"


__all__ = ["MODEL", "ArchiveError", "DeliveryError", "SignatureError", "TransferError", "Unauthorized",
           "VerificationFailed", "VersionInUse", "archive_name"]
