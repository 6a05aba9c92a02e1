"""Moving verified bundles between machines: install, pull, promote, remove, list (``m2fp-bundle``).

What a bundle is — its files, its verification, its archive and its signature — lives in the bundle
layer (:mod:`m2fpkit.runtime.bundle`); this package only applies it to a store on this machine:
:mod:`.install` (verify in a staging dot-directory, publish with one rename; promote, remove, list),
:mod:`.pull` (the HTTP client of a server's distribution endpoints) and :mod:`.cli` (``m2fp-bundle``).
Errors are the ``BundleError`` branch of :mod:`m2fpkit.runtime.errors` (the CLI prints one line).
"""

from __future__ import annotations

from ..bundle.store import MODEL
from ..errors import (
                      ArchiveError,
                      DeliveryError,
                      SignatureError,
                      TransferError,
                      Unauthorized,
                      VerificationFailed,
                      VersionInUse,
)

__all__ = ["MODEL", "ArchiveError", "DeliveryError", "SignatureError", "TransferError", "Unauthorized",
           "VerificationFailed", "VersionInUse"]
