"""Reference cases for the fidelity tests: ModelScope's own M2FP with random weights, and its bundle.

A :class:`ReferenceCase` ties together

* ``ms_model``  – ModelScope's ``M2FP`` class (built by :mod:`reference.modelscope_m2fp`) holding
  seeded random weights, strong enough that logits and masks are far from constant;
* ``model_dir`` – the same weights written as a ModelScope model directory
  (``configuration.json`` + ``pytorch_model.pt``), i.e. what a hub download looks like;
* ``bundle_dir`` – what ``m2fpkit.export.build.export_version`` made of ``model_dir``;
* ``config``    – that bundle's ``config.json`` parsed by the runtime.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: versions the two session cases are exported as (one shared bundle root)
CASE_VERSIONS = {"multi-human": "v9.0", "single-human": "v9.1"}
CASE_SEEDS = {"multi-human": 901, "single-human": 911}

#: Gain of the re-initialisation of weight matrices/kernels (× 1/sqrt(fan_in)). With 0.7 the tiny
#: model's mask logits have std ≈ 0.4-0.55 and |max| ≈ 2-5, its class logits std ≈ 0.75 with
#: queries that disagree with each other; at gain 1.0 the masks reach |10| and float32 reordering
#: alone costs ~1e-5, the very tolerance the fidelity test checks.
WEIGHT_GAIN = 0.7


@dataclass
class ReferenceCase:
    task: str                # "multi-human" | "single-human"
    model_dir: Path          # ModelScope-format directory (configuration.json + pytorch_model.pt)
    ms_model: Any            # ModelScope's M2FP instance with those weights, eval mode
    bundles_root: Path       # bundle root shared by the session cases
    bundle_dir: Path         # <bundles_root>/m2fp/<version>
    config: Any              # m2fpkit.runtime.bundle.BundleConfig of bundle_dir

    @property
    def version(self) -> str:
        return self.bundle_dir.name


def randomize_weights(model: torch.nn.Module, seed: int, gain: float = WEIGHT_GAIN) -> None:
    """Seeded re-initialisation of every parameter, plus random BatchNorm statistics.

    Matrices/kernels: N(0, gain²/fan_in); query/level embeddings: N(0, 1) so queries differ;
    norm weights: 1 + N(0, 0.2²); biases: N(0, 0.1²).
    """
    from m2fpkit.export.model.m2fp import randomize_batchnorm

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query_feat.weight", "query_embed.weight", "level_embed.weight", "level_embed")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() > 1:
                p.copy_(gain * torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    randomize_batchnorm(model, seed + 1)


def build_reference_model(task: str, seed: int, scratch: Path):
    """ModelScope's own M2FP (``tiny`` preset, ``task``) with seeded random weights; returns (cfg, model)."""
    from m2fpkit.export.model import config as mcfg

    from .modelscope_m2fp import build_modelscope_m2fp

    cfg = mcfg.preset("tiny", task)
    ms_cfg = cfg.to_modelscope()
    ms_cfg["pretrained"] = False
    torch.manual_seed(seed)
    scratch.mkdir(parents=True, exist_ok=True)
    model = build_modelscope_m2fp(scratch, ms_cfg)
    randomize_weights(model, seed)
    return cfg, model.eval()


def make_case(task: str, work: Path, bundles_root: Path) -> ReferenceCase:
    """Build ModelScope's model (in this process, scratch files in ``work``), and once per test run write its
    ModelScope directory beside ``bundles_root`` and export it into ``bundles_root`` with the library call (the
    run's other processes wait for it and use the same files)."""
    from m2fpkit.export.build import export_version
    from m2fpkit.export.sources import save_modelscope_dir
    from m2fpkit.export.specs import VersionSpec
    from m2fpkit.runtime.bundle.config import BundleConfig

    from .shared import locked

    cfg, ms_model = build_reference_model(task, CASE_SEEDS[task], work / "scratch")
    model_dir = bundles_root.parent / f"modelscope-{task}"
    bundle_dir = bundles_root / "m2fp" / CASE_VERSIONS[task]
    with locked(bundles_root.parent / f".case-{task}.lock"):
        if not bundle_dir.exists():
            shutil.rmtree(model_dir, ignore_errors=True)
            save_modelscope_dir(model_dir, cfg, ms_model.state_dict())
            spec = VersionSpec(version=CASE_VERSIONS[task], source=str(model_dir), task=None, channel="stable")
            bundle_dir = export_version(spec, bundles_root).bundle_dir
    return ReferenceCase(task=task, model_dir=model_dir, ms_model=ms_model, bundles_root=bundles_root,
                         bundle_dir=bundle_dir, config=BundleConfig.read(bundle_dir))


# ------------------------------------------------------------------------------------ inputs

def sample_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A deterministic, structured RGB CHW float image in 0-255 (the parity gate's generator)."""
    from m2fpkit.export.parity import synthetic_image

    return torch.from_numpy(np.ascontiguousarray(synthetic_image(h, w, seed)))


def normalise_and_pad(image_chw_0_255: torch.Tensor, divisor: int = 32) -> torch.Tensor:
    """What ModelScope's forward feeds its backbone: (x - mean) / std, zero-padded bottom/right to /32."""
    _, h, w = image_chw_0_255.shape
    # ModelScope's PIXEL_MEAN / PIXEL_STD, written out: the reference does not take them from the code under test
    mean = torch.tensor((123.675, 116.28, 103.53), dtype=torch.float32)[:, None, None]
    std = torch.tensor((58.395, 57.12, 57.375), dtype=torch.float32)[:, None, None]
    x = (image_chw_0_255.float() - mean) / std
    ph, pw = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    out = torch.zeros(1, 3, ph, pw, dtype=torch.float32)
    out[0, :, :h, :w] = x
    return out
