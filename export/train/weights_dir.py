"""A trained checkpoint written as a demo version's weights: a ModelScope model directory
(``configuration.json`` + ``pytorch_model.pt``, the export's own ``save_modelscope_dir``) with its training
log ``training.json`` beside it. The directory is written under a temporary name and renamed into place,
so a reader sees the old version's files or the new ones, never a mix.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..model.config import M2FPConfig
from ..modelscope_source import save_modelscope_dir

#: the training log beside the weights (JSON: recipe, seed, steps, wall time, losses, held-out grades)
LOG_FILE = "training.json"
#: what the demo weights say they were trained on (the bundle records it; every surface shows it)
TRAINED_ON = "synthetic figures (m2fp-figures)"


def _json(value: Any) -> str:
    """Indented JSON with every list of scalars on one line (a loss row per line)."""
    text = json.dumps(value, indent=1, sort_keys=True)
    return re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def write(out: Path, version: str, config: M2FPConfig, state_dict: dict[str, torch.Tensor],
          log: dict[str, Any]) -> Path:
    """Write ``config``, ``state_dict`` and ``log`` as the directory ``out/version``; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / version
    staged = out / f".{version}.tmp"
    old = out / f".{version}.old"
    for leftover in (staged, old):
        shutil.rmtree(leftover, ignore_errors=True)
    save_modelscope_dir(staged, config, state_dict, trained_on=TRAINED_ON)
    (staged / LOG_FILE).write_text(_json(log), encoding="utf-8")
    if final.exists():
        final.rename(old)
    staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
