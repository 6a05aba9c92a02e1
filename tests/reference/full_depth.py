"""The full-depth ONNX graph the tiny preset is compared with (``tests/test_model.py``): ``r101``'s layer
counts at ``tiny``'s widths, exported by this export code — the same code paths as ``r101``, ~40 s of one
core to trace.

``python -m reference.full_depth OUT`` (from ``tests/``) writes it to ``OUT``: the test session starts that
in the background at its first test, at low priority, so the trace runs on the core the suite leaves idle.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path


def benchmark_graph() -> Path | None:
    """The benchmarks' cached ``r101`` multi-human graph if it was built from this export code by the
    installed exporter versions (its stamp is current), else None."""
    import onnxscript
    import torch

    from benchmarks import bundles as bench

    config = bench.bundle_dir("full", "multi") / "config.json"
    if not config.is_file() or bench.stale("full", "multi"):
        return None
    tools = json.loads(config.read_text()).get("tools", {})
    if tools.get("torch") != torch.__version__ or tools.get("onnxscript") != onnxscript.__version__:
        return None
    return config.with_name("model.onnx")


def export(path: Path) -> Path:
    """Export the full-depth graph (at tiny widths, seed 0) to ``path``; returns ``path``."""
    from m2fpkit.export import onnx_export
    from m2fpkit.export.model import config as mcfg
    from m2fpkit.export.model.m2fp import build

    tiny, r101 = mcfg.preset("tiny"), mcfg.preset("r101")
    deep = dataclasses.replace(
        tiny, backbone=dataclasses.replace(tiny.backbone, depth=r101.backbone.depth),
        encoder=dataclasses.replace(tiny.encoder, transformer_enc_layers=r101.encoder.transformer_enc_layers),
        decoder=dataclasses.replace(tiny.decoder, dec_layers=r101.decoder.dec_layers))
    onnx_export.export_onnx(build(deep, seed=0), path, opset=18)
    return path


if __name__ == "__main__":
    export(Path(sys.argv[1]))
