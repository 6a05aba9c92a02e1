"""The bundle layer: what a bundle is, read, verified, identified, written, signed, packed and published —
each in exactly one module. Everything else (export, registry, install/pull, distribution, benchmarks,
tests) calls these; nothing here imports the rest of the project but its exception tree
(:mod:`m2fpkit.runtime.errors`), nor any inference engine (``tests/test_import_graph.py``).

============================  ==========================================================================
module                        one job
============================  ==========================================================================
:mod:`.reader`                **read and verify** a bundle directory into one :class:`Verification`
                              (manifest, signature, config, weights index); its identity; load its
                              verified bytes into memory
:mod:`.writer`                **write** one: stage → weights index → config → manifest → signature →
                              verify → atomic publish
:mod:`.config`                ``config.json`` ⇄ :class:`BundleConfig`; the agreement floors
:mod:`.golden_check`          the one rule of a *degenerate* golden label map (one class, or no person)
:mod:`.versions`              the version and alias name grammar, semantic-version order
:mod:`.manifest`              ``manifest.json``: size and SHA-256 of every file
:mod:`.weights_index`         ``weights.json``: where each tensor lies in the data file
:mod:`.signature`             ``manifest.sig`` (Ed25519): its format and the :class:`TrustPolicy` readers apply
:mod:`.signing`               make a key pair, sign a bundle (beside the writer)
:mod:`.archive`               one version ⇄ one tar; unpacking trusts nothing
:mod:`.store`                 ``<root>/m2fp/<version>/`` + ``aliases.json``; crash-safe publish/remove
:mod:`.jsonfile`              the one bounded JSON reader/writer
:mod:`.atomic`                durable all-or-nothing file writes and renames
============================  ==========================================================================

A bundle ``<root>/m2fp/<version>/``: ``model.onnx`` + ``model.onnx.data``, ``weights.json``,
``config.json``, ``golden/``, ``manifest.json``, optional ``manifest.sig``. Errors are the
``BundleError`` branch of :mod:`m2fpkit.runtime.errors`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BundleConfig": "config", "Preprocess": "config", "Postprocess": "config", "TensorSpec": "config",
    "Verification": "reader", "BundleInfo": "reader", "BundleContent": "reader", "verify": "reader",
    "inspect": "reader", "load": "reader", "identity": "reader", "identity_of": "reader", "stage": "writer",
    "TrustPolicy": "signature", "BundleStore": "store", "MODEL": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
