"""Bundle verification before load: manifest hashes, config schema, and config ⇄ graph agreement."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .bundle import BundleConfig
from .errors import BundleError
from .manifest import verify_manifest

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "uint8": "tensor(uint8)"}


def verify_files(bundle_dir: Path) -> BundleConfig:
    """Check the manifest (every file's size and SHA-256) and parse config.json; return the config."""
    bundle_dir = Path(bundle_dir)
    listed = verify_manifest(bundle_dir)["files"]
    config = BundleConfig.read(bundle_dir)
    for key in ("image", "label_map") if config.golden else ():
        if config.golden[key] not in listed:  # type: ignore[index]
            raise BundleError(f"config.json → golden → {key}: {config.golden[key]} is not in manifest.json")
    if config.weights_index and config.weights_index not in listed:
        raise BundleError(f"config.json → weights_index: {config.weights_index} is not in manifest.json")
    if config.version != bundle_dir.name:
        raise BundleError(f"config.json → version: {config.version!r} but the directory is {bundle_dir.name!r}")
    if not (bundle_dir / config.model_file).is_file():
        raise BundleError(f"config.json → model_file: {config.model_file} is missing")
    return config


def check_graph(config: BundleConfig, session: ort.InferenceSession) -> None:
    """Refuse a graph whose inputs, outputs or identity do not match config.json."""
    problems: list[str] = []
    for kind, specs, actual in (("input", config.inputs, session.get_inputs()),
                                ("output", config.outputs, session.get_outputs())):
        if [s.name for s in specs] != [a.name for a in actual]:
            problems.append(f"{kind} names {[a.name for a in actual]} vs config {[s.name for s in specs]}")
            continue
        for spec, arg in zip(specs, actual):
            if len(spec.shape) != len(arg.shape):
                problems.append(f"{kind} {spec.name}: rank {len(arg.shape)} vs config {len(spec.shape)}")
            for i, (want, got) in enumerate(zip(spec.shape, arg.shape)):
                if isinstance(want, int) and isinstance(got, int) and want != got:
                    problems.append(f"{kind} {spec.name}: dim {i} is {got}, config says {want}")
            if _ORT_TYPES.get(spec.dtype) != arg.type:
                problems.append(f"{kind} {spec.name}: type {arg.type} vs config {spec.dtype}")
    logits = next((o for o in session.get_outputs() if o.name == "pred_logits"), None)
    if logits is not None and isinstance(logits.shape[-1], int) and logits.shape[-1] != config.num_classes + 1:
        problems.append(f"pred_logits has {logits.shape[-1] - 1} classes (+1 no-object) but config.json lists "
                        f"{config.num_classes} classes")
    meta = session.get_modelmeta().custom_metadata_map
    for key, want in (("m2fp.version", config.version), ("m2fp.num_classes", str(config.num_classes)),
                      ("m2fp.task", config.task)):
        if meta.get(key) != want:
            problems.append(f"graph metadata {key}={meta.get(key)!r} but config.json says {want!r}")
    if problems:
        raise BundleError("model.onnx does not match config.json: " + "; ".join(problems))
