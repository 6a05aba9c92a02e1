"""Test utilities for bundles on disk: cheap clones under new version names, corruptions, golden samples.

An export costs ~30 s on 2 idle cores, so tests that need several versions copy an exported bundle and
rewrite its identity instead: ``config.json → version`` (and optionally channel / compatible_api), the ONNX
``metadata_props`` ``m2fp.version`` / ``m2fp.semver``, then the manifest. A clone is written into a
hidden staging directory next to its destination and renamed into place, so a file watcher never
sees half a bundle.

:func:`corrupt` damages a bundle in one of :data:`CORRUPTIONS` ways; each one is caught by a
different check (manifest, config schema, graph ⇄ config agreement, onnxruntime itself).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.bundle.versions import SemVer
from m2fpkit.runtime.bundle.writer import seal as write_manifest

CONFIG = "config.json"


# ------------------------------------------------------------------------------------ cloning

def _read_config(bundle_dir: Path) -> dict[str, Any]:
    return json.loads((bundle_dir / CONFIG).read_text(encoding="utf-8"))


def _write_config(bundle_dir: Path, raw: dict[str, Any]) -> None:
    (bundle_dir / CONFIG).write_text(json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                     encoding="utf-8")


def edit_config(bundle_dir: Path, change: Callable[[dict[str, Any]], None], *, manifest: bool = True) -> None:
    """Apply ``change`` to the raw config.json of ``bundle_dir`` (and regenerate the manifest)."""
    bundle_dir = Path(bundle_dir)
    raw = _read_config(bundle_dir)
    change(raw)
    _write_config(bundle_dir, raw)
    if manifest:
        write_manifest(bundle_dir)


def set_graph_metadata(model_path: Path, props: dict[str, str]) -> None:
    """Overwrite some ``metadata_props`` of an ONNX file without loading its external weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
    onnx.save(model, str(model_path))


def graph_metadata(model_path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def write_clone(src_dir: Path, dest_dir: Path, version: str, *, channel: str | None = None,
                compatible_api: list[str] | None = None, notes: str | None = None,
                preprocess: dict[str, Any] | None = None, graph_metadata_too: bool = True) -> Path:
    """Copy the bundle ``src_dir`` into ``dest_dir`` (absent or empty) as ``version``; no export.

    ``preprocess`` updates keys of ``config.json → preprocess`` (e.g. a small ``short_edge`` keeps tests
    fast; the graph's spatial axes are dynamic); the bundle's golden label map, if any, is then
    recomputed by the runtime, since the export's no longer applies. ``graph_metadata_too=False``
    leaves the ONNX metadata at the source's version, which makes a bundle whose manifest and config
    are fine but whose graph disagrees with config.json.
    """
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    SemVer.parse(version)  # a version name, not an alias
    shutil.copytree(src_dir, dest_dir, dirs_exist_ok=True)

    def change(raw: dict[str, Any]) -> None:
        raw["version"] = version
        if "semver" in raw:
            raw["semver"] = str(SemVer.parse(version))
        if channel is not None:
            raw["channel"] = channel
        if compatible_api is not None:
            raw["compatible_api"] = list(compatible_api)
        if notes is not None:
            raw["notes"] = notes
        if preprocess:
            raw["preprocess"].update(preprocess)

    edit_config(dest_dir, change, manifest=False)
    if graph_metadata_too:
        raw = _read_config(dest_dir)
        variants = (raw.get("plans") or {}).get("variants", {}).values()
        for model_file in (raw.get("model_file", "model.onnx"), *(v["model_file"] for v in variants)):
            set_graph_metadata(dest_dir / model_file, {"m2fp.version": version,
                                                       "m2fp.semver": str(SemVer.parse(version))})
    if preprocess and _read_config(dest_dir).get("golden"):
        refresh_golden(dest_dir)
    write_manifest(dest_dir)
    return dest_dir


def refresh_golden(bundle_dir: Path) -> None:
    """Recompute the golden label map with the runtime (after a preprocess change invalidated it).

    ``bundle_dir`` must be named after the version (a staging directory ``<tmp>/<version>`` is fine).
    The manifest is regenerated.
    """
    from m2fpkit.runtime.agreement import semantic_labels
    from m2fpkit.runtime.bundle.config import BundleConfig
    from m2fpkit.runtime.predictor import Predictor

    bundle_dir = Path(bundle_dir)
    config = BundleConfig.read(bundle_dir)
    golden = config.golden
    if not golden:
        return
    write_manifest(bundle_dir)
    predictor = Predictor.load(bundle_dir)
    try:
        prepared = predictor.prepare(predictor.decode((bundle_dir / golden.image).read_bytes()))
        outputs = predictor.run(prepared.tensor)
        labels = predictor.postprocess(outputs, prepared).label_map
    finally:
        predictor.close()
    (bundle_dir / golden.label_map).write_bytes(png_bytes(labels))
    if golden.semantic:
        (bundle_dir / golden.semantic).write_bytes(png_bytes(semantic_labels(*outputs)[0].astype(np.uint8)))
    write_manifest(bundle_dir)


def clone_bundle(src_dir: Path, dst_root: Path, version: str, *, model: str = "m2fp", channel: str | None = None,
                 compatible_api: list[str] | None = None, notes: str | None = None,
                 preprocess: dict[str, Any] | None = None, then: Callable[[Path], Any] | None = None) -> Path:
    """Publish a copy of ``src_dir`` as ``dst_root/<model>/<version>/`` (which must not exist yet).

    The copy is written into a hidden staging directory next to the destination (``then(stage)``
    runs on it last, e.g. a :func:`corrupt`), then renamed into place in one step.
    """
    final = Path(dst_root) / model / version
    if final.exists():
        raise FileExistsError(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".clone-{version}-{uuid.uuid4().hex[:8]}"
    stage = tmp / version
    try:
        write_clone(src_dir, stage, version, channel=channel, compatible_api=compatible_api, notes=notes,
                    preprocess=preprocess)
        if then is not None:
            then(stage)
        os.rename(stage, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def replace_bundle(src_dir: Path, dst_root: Path, version: str, *, model: str = "m2fp", notes: str | None = None,
                   preprocess: dict[str, Any] | None = None, then: Callable[[Path], Any] | None = None) -> Path:
    """Replace (or publish) ``version`` with a copy of ``src_dir`` through the store's staging + exchange."""
    store = BundleStore(dst_root, model)
    with store.scratch(version) as tmp:
        stage = tmp / version
        write_clone(src_dir, stage, version, notes=notes, preprocess=preprocess)
        if then is not None:
            then(stage)
        store.publish(stage, version, force=True)
    return store.path(version)


# ---------------------------------------------------------------------------------- corruption

def _data_file(bundle_dir: Path) -> Path:
    return bundle_dir / "model.onnx.data"


def _flip_byte(bundle_dir: Path) -> None:
    path = _data_file(bundle_dir)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(bundle_dir: Path) -> None:
    path = _data_file(bundle_dir)
    os.truncate(path, path.stat().st_size // 2)


def _missing_file(bundle_dir: Path) -> None:
    _data_file(bundle_dir).unlink()


def _extra_file(bundle_dir: Path) -> None:
    (bundle_dir / "stray.txt").write_text("not part of the bundle\n")


def _no_manifest(bundle_dir: Path) -> None:
    (bundle_dir / "manifest.json").unlink()


def _config_not_json(bundle_dir: Path) -> None:
    (bundle_dir / CONFIG).write_text('{"schema_version": 1, "version": ')
    write_manifest(bundle_dir)


def _config_schema(bundle_dir: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["preprocess"]["mean"] = [123.675, 116.28]
    edit_config(bundle_dir, change)


def _config_bad_task(bundle_dir: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["task"] = "many-humans"
    edit_config(bundle_dir, change)


def _config_version_dir(bundle_dir: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["version"] = "v0.0"
    edit_config(bundle_dir, change)


def _extra_class(bundle_dir: Path) -> None:
    """One more class (with its colour) than the graph predicts; manifest regenerated."""
    def change(raw: dict[str, Any]) -> None:
        raw["classes"] = [*raw["classes"], "Tail"]
        raw["palette"] = [*raw["palette"], [12, 34, 56]]
        if "num_classes" in raw:
            raw["num_classes"] = len(raw["classes"])
    edit_config(bundle_dir, change)


def _input_name(bundle_dir: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["inputs"][0]["name"] = "pixels"
    edit_config(bundle_dir, change)


def _graph_version(bundle_dir: Path) -> None:
    """The graph's metadata names another version than config.json; manifest regenerated."""
    set_graph_metadata(bundle_dir / "model.onnx", {"m2fp.version": "v0.0"})
    write_manifest(bundle_dir)


def _onnx_garbage(bundle_dir: Path) -> None:
    (bundle_dir / "model.onnx").write_bytes(b"\x08\x07this is not a protobuf graph" * 64)
    write_manifest(bundle_dir)


def _weights_index_bounds(bundle_dir: Path) -> None:
    """weights.json places its first tensor past the end of the data file; manifest regenerated."""
    path = bundle_dir / "weights.json"
    index = json.loads(path.read_text())
    index["tensors"][0]["offset"] = _data_file(bundle_dir).stat().st_size
    path.write_text(json.dumps(index))
    write_manifest(bundle_dir)


#: kind → what it does to a bundle
CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "flip-byte": _flip_byte,             # manifest: SHA-256 of model.onnx.data
    "truncate": _truncate,               # manifest: size of model.onnx.data
    "missing-file": _missing_file,       # manifest: listed but missing
    "extra-file": _extra_file,           # manifest: file not listed
    "no-manifest": _no_manifest,         # manifest.json missing
    "config-not-json": _config_not_json,  # config.json unparsable (manifest regenerated)
    "config-schema": _config_schema,     # config.json → preprocess → mean (manifest regenerated)
    "config-task": _config_bad_task,     # config.json → task (manifest regenerated)
    "config-version": _config_version_dir,  # config.json → version ≠ directory name
    "extra-class": _extra_class,         # graph: pred_logits classes ≠ config classes (graph check only)
    "input-name": _input_name,           # graph: input names ≠ config (graph check only)
    "graph-version": _graph_version,     # graph: metadata m2fp.version ≠ config (graph check only)
    "onnx-garbage": _onnx_garbage,       # onnxruntime cannot parse model.onnx
    "weights-index": _weights_index_bounds,  # weights.json → tensors[0] beyond the data file (load only)
}


def corrupt(bundle_dir: Path, kind: str) -> Path:
    """Damage ``bundle_dir`` in place in the way named ``kind`` (see :data:`CORRUPTIONS`)."""
    try:
        fn = CORRUPTIONS[kind]
    except KeyError:
        raise ValueError(f"unknown corruption {kind!r}; one of {', '.join(CORRUPTIONS)}") from None
    fn(Path(bundle_dir))
    return Path(bundle_dir)


# ------------------------------------------------------------------------------------ images

def synthetic_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic HxWx3 uint8 image with smooth regions, edges and noise (not a real photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        fy, fx, ph = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        img[:, :, c] = 127 + 80 * np.sin(2 * np.pi * (fy * yy / h + fx * xx / w) + ph)
    for _ in range(4):  # a few flat blobs
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * min(h, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 RGB or HxW single-channel uint8 array."""
    arr = np.ascontiguousarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def synthetic_png(h: int, w: int, seed: int = 0) -> bytes:
    return png_bytes(synthetic_rgb(h, w, seed))


# ------------------------------------------------------------------------------------ golden

def add_golden(bundle_dir: Path, image_png: bytes, label_map: np.ndarray, *, min_agreement: float = 0.995) -> None:
    """Put a golden sample (image + expected uint8 label map, both PNG) into a bundle; manifest regenerated."""
    bundle_dir = Path(bundle_dir)
    shutil.rmtree(bundle_dir / "golden", ignore_errors=True)  # the export's own sample, if any
    (bundle_dir / "golden").mkdir()
    (bundle_dir / "golden" / "image.png").write_bytes(image_png)
    (bundle_dir / "golden" / "labels.png").write_bytes(png_bytes(np.asarray(label_map, dtype=np.uint8)))

    def change(raw: dict[str, Any]) -> None:
        raw["golden"] = {"image": "golden/image.png", "label_map": "golden/labels.png",
                         "min_agreement": min_agreement}
    edit_config(bundle_dir, change)
