"""The full-depth ONNX graph the tiny preset is compared with (``tests/test_model.py``): ``r101``'s layer
counts at ``tiny``'s widths, exported by this export code — the same code paths as ``r101``, ~40 s of one
core to trace.

``python -m reference.full_depth OUT`` (from ``tests/``) writes it to ``OUT``: the test session starts that
in the background at its first test, at low priority, so the trace runs on the core the suite leaves idle.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

#: the seed of the full-depth graph's weights
SEED = 0


def config(task: str = "multi-human"):
    """``r101``'s layer counts at ``tiny``'s widths (an ``M2FPConfig``)."""
    from m2fpkit.export.model import config as mcfg

    tiny, r101 = mcfg.preset("tiny", task), mcfg.preset("r101", task)
    return dataclasses.replace(
        tiny, backbone=dataclasses.replace(tiny.backbone, depth=r101.backbone.depth),
        encoder=dataclasses.replace(tiny.encoder, transformer_enc_layers=r101.encoder.transformer_enc_layers),
        decoder=dataclasses.replace(tiny.decoder, dec_layers=r101.decoder.dec_layers))


def export(path: Path) -> Path:
    """Export the full-depth graph (seed :data:`SEED`) to ``path`` through the graph cache of ``$M2FP_EXPORT_CACHE``
    (the test session's: a later export of this architecture with other weights reuses the trace); returns ``path``."""
    from m2fpkit.export import onnx_export
    from m2fpkit.export.model.m2fp import build

    onnx_export.export_onnx(build(config(), seed=SEED), path, opset=18)
    return path


if __name__ == "__main__":
    export(Path(sys.argv[1]))
