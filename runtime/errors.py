"""Every exception this project raises on purpose, in one tree; the server maps each branch to one HTTP
status in one place (``server/errors.py``), the CLIs print one line for any of them.

::

    M2FPError
    ├── BundleError                a bundle (or the store around it) is refused; the reason names the file
    │   ├── MalformedFile          a JSON file of the bundle/store is unreadable, too large, too deep or
    │   │                          not of the expected shape (``.file`` names it); only that file's owner
    │   │                          is skipped, the rest of the store still serves
    │   ├── IntegrityError         a file is missing, unlisted, or its size/SHA-256 differs from the manifest
    │   ├── SignatureError         unsigned, wrongly signed, or the key file is missing/unreadable
    │   ├── ArchiveError           unsafe, truncated, oversized or foreign archive
    │   ├── VersionExists          the version is already published (versions are immutable; force replaces)
    │   └── DeliveryError          moving bundles between machines
    │       ├── VerificationFailed the bundle failed a check; ``.report`` says which
    │       ├── VersionInUse       rm refused: routes or aliases still name the version
    │       └── TransferError      pull: network or HTTP failure, size or time limit
    │           └── Unauthorized   the server refused the token (401)
    ├── ExportError                building a bundle failed (``m2fpkit.export``: source, spec, parity gate)
    ├── VersionError
    │   ├── InvalidVersionName     not a version/alias name (e.g. path traversal)        -> 400
    │   ├── UnknownVersion         no such version or alias                              -> 404
    │   ├── VersionUnavailable     exists but is not ready (failed, draining, loading)   -> 503
    │   └── IncompatibleAPI        no routable version declares the client's API          -> 409
    ├── InputError                 the request's image is unusable                       -> 400
    │   ├── EmptyImage
    │   ├── UndecodableImage
    │   ├── UnsupportedImageFormat                                                       -> 415
    │   ├── ImageTooLarge          pixel count over the limit (header, decoder, result)  -> 413
    │   ├── BadAspectRatio                                                               -> 422
    │   └── DatasetError           labeled data is unusable: a dataset's file or a label  -> 400
    │                              map (``.file`` names it; ``quality.dataset``)
    └── Overloaded                 no capacity to queue the request                      -> 503
"""

from __future__ import annotations

from typing import Any


class M2FPError(Exception):
    """Base of every error this package raises on purpose."""


class BundleError(M2FPError):
    """A bundle failed verification or could not be loaded."""


class MalformedFile(BundleError):
    """One JSON file is unusable; ``file`` names it (relative to the bundle or the store)."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


class IntegrityError(BundleError):
    """A file differs from what the manifest pins (missing, unlisted, other size or hash)."""


class SignatureError(BundleError):
    """Missing or wrong signature, or an unusable key."""


class ArchiveError(BundleError):
    """The archive is unsafe, truncated, too large or not a bundle archive."""


class VersionExists(BundleError):
    """The version is already published and versions are immutable (use force to replace)."""


class DeliveryError(BundleError):
    """A bundle could not be installed, removed or fetched."""


class VerificationFailed(DeliveryError):
    """A bundle failed verification; ``report`` holds every check and its result."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class VersionInUse(DeliveryError):
    """The version is still named by a routes file or an alias."""


class TransferError(DeliveryError):
    """Downloading a bundle failed."""


class Unauthorized(TransferError):
    """The server answered 401: missing or wrong token."""


class ExportError(M2FPError):
    """A version could not be built into a bundle."""


class VersionError(M2FPError):
    pass


class InvalidVersionName(VersionError):
    pass


class UnknownVersion(VersionError):
    pass


class VersionUnavailable(VersionError):
    pass


class IncompatibleAPI(VersionError):
    pass


class InputError(M2FPError):
    pass


class EmptyImage(InputError):
    pass


class UndecodableImage(InputError):
    pass


class UnsupportedImageFormat(InputError):
    pass


class ImageTooLarge(InputError):
    pass


class BadAspectRatio(InputError):
    pass


class DatasetError(InputError):
    """Labeled data (a dataset directory's file, or a label map given with an image) is unusable; ``file``
    names it (a dataset file by its path under the dataset directory as given, an upload by the caller's name)."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


class Overloaded(M2FPError):
    pass


def engine_reason(exc: BaseException) -> str:
    """What an engine's (onnxruntime, OpenVINO) multi-line C++ message says went wrong: its last non-empty
    line, at most 300 characters — OpenVINO puts its ``Exception from <file>:<line>`` chain first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
