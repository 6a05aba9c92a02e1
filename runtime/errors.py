"""The runtime's exceptions; the server maps each branch to one HTTP status in one place.

::

    M2FPError
    ├── BundleError              a bundle on disk is refused (reason kept in the version's status)
    ├── VersionError
    │   ├── InvalidVersionName   not a version/alias name (e.g. path traversal)      -> 400
    │   ├── UnknownVersion       no such version or alias                            -> 404
    │   ├── VersionUnavailable   exists but is not ready (failed, draining, loading) -> 503
    │   └── IncompatibleAPI      no routable version declares the client's API        -> 409
    ├── InputError               the request's image is unusable                     -> 400
    │   ├── EmptyImage
    │   ├── UndecodableImage
    │   ├── UnsupportedImageFormat                                                   -> 415
    │   ├── ImageTooLarge        pixel count over the limit, checked before decode   -> 413
    │   └── BadAspectRatio                                                           -> 422
    └── Overloaded               no capacity to queue the request                    -> 503
"""

from __future__ import annotations


class M2FPError(Exception):
    """Base of every error this package raises on purpose."""


class BundleError(M2FPError):
    """A bundle failed verification or could not be loaded."""


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


class Overloaded(M2FPError):
    pass
