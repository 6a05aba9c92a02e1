"""The parity gate on a trained-like full-size model: ``python -m benchmarks.parity_r101 [--task T] [--gain G]``.

Builds ``r101`` with seeded random weights, scales its heads the way a trained model's are peaked (query
embeddings, class head and last mask layer × ``gain``: mask logits far beyond ±20, class logits spread), writes
it as a ModelScope model directory and exports it with ``m2fp-export`` — the gate enforced, as a user would.
Prints the gate's figures per input size (error against the reference as a multiple of float32's rounding
noise, masked-attention flips) and the exit status. Not a timing: the figures do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("benchmarks.parity_r101")


def peak_heads(model, gain: float):
    """Scale the query embeddings, class head and last mask layer by ``gain`` (in place); returns ``model``."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query_feat.weight", "query_embed.weight")) or ".class_embed." in name \
                    or ".mask_embed.layers.2." in name:
                p.mul_(gain)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="multi-human", choices=["multi-human", "single-human"])
    parser.add_argument("--gain", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from m2fpkit.export.model import config as mcfg
    from m2fpkit.export.model.m2fp import build
    from m2fpkit.export.sources import save_modelscope_dir

    work = Path(tempfile.mkdtemp(prefix="parity_r101-"))
    cfg = mcfg.preset("r101", args.task)
    model = peak_heads(build(cfg, seed=args.seed), args.gain)
    model_dir = save_modelscope_dir(work / "modelscope_dir", cfg, model.state_dict())
    exe = Path(sys.executable).with_name("m2fp-export")
    proc = subprocess.run([str(exe), "v9.7", "--source", str(model_dir), "--bundles", str(work / "bundles")],
                          capture_output=True, text=True)
    log.info("m2fp-export exit %d", proc.returncode)
    if proc.returncode:
        log.info("%s", proc.stderr[-3000:])
        return proc.returncode
    report = json.loads((work / "bundles" / "m2fp" / "v9.7" / "config.json").read_text())["parity"]
    for entry in report["inputs"]:
        ratios = ", ".join(f"{n} {entry[n]['noise_ratio']:.2f}x (allowed {entry[n]['allowed_ratio']:g}x; "
                           f"noise RMS {entry[n]['noise_rms']:.2g}, max |diff| {entry[n]['max_abs']:.2g})"
                           for n in ("pred_logits", "pred_masks"))
        att = entry["attention"]
        log.info("%dx%d vs %s: %s; %d masked-attention flips (worst logit %.2g, allowed %.2g); decisive labels "
                 "miss %.4f%% (float32 %.4f%%)", entry["height"], entry["width"], entry["reference"], ratios,
                 att["flips"], att["worst_flip_logit"], att["allowed_flip_logit"],
                 100 * entry["labels"]["onnx_miss"], 100 * entry["labels"]["fp32_miss"])
    log.info("gate: %s, passed: %s", report["gate"], report["passed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
