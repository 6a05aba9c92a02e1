"""Graph ⇄ ``config.json``: a session's inputs, outputs, types and identity must be what the config says.

Run on every session built from a verified bundle (``Predictor.with_session``), whatever the engine: it
reads only onnxruntime's session interface (``get_inputs``, ``get_outputs``, ``get_modelmeta``).
"""

from __future__ import annotations

from typing import Any

from .bundle.config import BundleConfig
from .errors import BundleError

#: config.json's dtype → onnxruntime's type name
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
             "uint8": "tensor(uint8)"}


def check_graph(config: BundleConfig, session: Any) -> None:
    """Raise BundleError naming every way the session's graph differs from ``config`` (none: return)."""
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
            if ORT_TYPES.get(spec.dtype) != arg.type:
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
        raise BundleError(f"{config.model_file} does not match config.json: " + "; ".join(problems))
