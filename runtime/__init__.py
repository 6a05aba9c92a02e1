"""Run M2FP bundles on onnxruntime CPU sessions (no torch).

Async API: :class:`Registry` (versions, lazy load, hot swaps, ``await registry.predict(name, data)``);
blocking API: :class:`Runtime`. One version on its own: :class:`Predictor`. Errors: :mod:`.errors`.
Options: :class:`RegistryOptions` (one object for the library, the server and ``m2fp-serve``); the bundle
root when none is given: :func:`default_root` (``$M2FP_BUNDLES``, else ``./bundles``).
Names are imported on first use, so ``m2fpkit.runtime.bundle`` alone stays light.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Runtime": "api", "BundleConfig": "bundle", "ImageLimits": "predictor", "Prediction": "predictor",
    "Predictor": "predictor", "Registry": "registry", "RegistryOptions": "registry", "State": "registry",
    "RegistrySnapshot": "registry", "VersionStatus": "registry", "RouteOverlay": "registry",
    "RuntimeSettings": "session", "default_root": "roots",
    **{name: "errors" for name in (
        "BadAspectRatio", "BundleError", "EmptyImage", "ImageTooLarge", "IncompatibleAPI", "InputError",
        "InvalidVersionName", "M2FPError", "Overloaded", "UndecodableImage", "UnknownVersion",
        "UnsupportedImageFormat", "VersionError", "VersionUnavailable")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
