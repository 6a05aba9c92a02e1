"""Writing a bundle: the one way a version comes into being (export, benchmarks, tests).

``stage → graph and data (the caller's) → weights index → config.json → manifest.json → optional
manifest.sig → verify → atomic publish``::

    with stage(store, "v1.2") as staged:
        write_graph(staged.dir)                       # model.onnx (+ model.onnx.data): the caller's part
        config = staged.finish(config, tensors=rows)  # index, config, manifest, signature
    # published here (renamed into place), or nothing at all if anything above raised

What is published has passed :func:`.reader.inspect` first: a bundle this module writes is one the
reader accepts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import BundleError, VersionExists
from . import jsonfile, manifest, reader, signing, weights_index
from .config import CONFIG, BundleConfig
from .store import BundleStore


@dataclass
class Staged:
    """A hidden directory that becomes the version on normal exit of :func:`stage`, if finished."""

    dir: Path
    config: BundleConfig | None = None

    def finish(self, config: BundleConfig, *, tensors: list[dict[str, Any]] | None = None,
               data_file: str | None = None, signing_key: Ed25519PrivateKey | None = None) -> BundleConfig:
        """Write the weights index (for ``tensors`` rows of ``data_file``), config.json, the manifest and
        (with ``signing_key``) manifest.sig; return the config as written."""
        if tensors:
            if data_file is None:
                raise BundleError("weights index: name the data file the tensors lie in")
            (self.dir / weights_index.INDEX_FILE).write_bytes(weights_index.build(self.dir, data_file, tensors))
            config = dataclasses.replace(config, weights_index=weights_index.INDEX_FILE)
        (self.dir / CONFIG).write_text(config.to_json(), encoding="utf-8")
        seal(self.dir, signing_key)
        self.config = config
        return config


def seal(bundle_dir: Path, signing_key: Ed25519PrivateKey | None = None) -> None:
    """(Re)write ``manifest.json`` over the directory's files and, with a key, ``manifest.sig``.

    Without a key an existing signature is left as it is (and no longer matches a changed manifest).
    """
    raw = jsonfile.dumps(manifest.build(bundle_dir))
    (bundle_dir / manifest.MANIFEST).write_bytes(raw)
    if signing_key is not None:
        (bundle_dir / manifest.SIGNATURE).write_bytes(signing.signature_bytes(raw, signing_key))


def check_new(store: BundleStore, version: str, *, force: bool = False) -> None:
    """VersionExists unless ``version`` may be written (absent, or ``force``): for a caller to fail before any
    work; :func:`stage` checks it again, and publishing never replaces a version without ``force``."""
    if store.path(version).exists() and not force:
        raise VersionExists(f"{store.model}/{version} already exists; versions are immutable (use --force to replace)")


@contextlib.contextmanager
def stage(store: BundleStore, version: str, *, force: bool = False) -> Iterator[Staged]:
    """Yield a :class:`Staged` directory; publish it as ``version`` when the block ends finished and verified.

    On any exception nothing is published and the staging directory is removed."""
    check_new(store, version, force=force)
    with store.scratch(version) as tmp:
        staged = Staged(tmp / version)
        staged.dir.mkdir()
        yield staged
        if staged.config is None:
            raise BundleError(f"{version}: staged bundle was not finished; nothing published")
        reader.inspect(staged.dir)
        store.publish(staged.dir, version, force=force)
