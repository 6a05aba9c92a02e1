"""Run recipes and write their checkpoints as demo version directories (see ``weights_dir``).

Each recipe runs in a process of its own with one thread (``--jobs`` of them at once), so a recipe's
weights do not depend on how many run beside it; its log records what it ran with.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import weights_dir
from .loop import Checkpointed, Recipe, Trainer
from .recipes import RECIPES, scaled

log = logging.getLogger(__name__)

#: where the demo versions' weights live in the repository (``export/versions.toml`` points here)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "demo_weights"
LOSS_COLUMNS = ("step", "total", "class", "mask", "dice")


def training_log(recipe: Recipe, ck: Checkpointed, history: list[list[float]]) -> dict[str, Any]:
    """What ``training.json`` holds for checkpoint ``ck`` of ``recipe``."""
    return {
        "version": ck.version,
        "note": "Demo weights: the tiny M2FP trained from scratch on synthetic figures (m2fp-figures), "
                "not M2FP's checkpoint.",
        "recipe": dataclasses.asdict(recipe),
        "seed": recipe.seed,
        "step": ck.step,
        "wall_seconds": ck.seconds,
        "loss_columns": list(LOSS_COLUMNS),
        "loss": [row for row in history if row[0] <= ck.step],
        "heldout": ck.heldout,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
        "command": "python -m m2fpkit.export.train " + recipe.name,
    }


def run_recipe(name: str, out: Path, steps_scale: float = 1.0, log_every: int = 25,
               log_level: int = logging.INFO) -> list[str]:
    """Train recipe ``name`` (one thread) and write its checkpoints under ``out``; one line per version."""
    torch.set_num_threads(1)
    if not logging.getLogger().handlers:  # a worker process
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
        logging.getLogger("m2fpkit").setLevel(log_level)
    recipe = scaled(RECIPES[name], steps_scale)
    trainer = Trainer(recipe, log_every)
    lines: list[str] = []

    def save(ck: Checkpointed) -> None:
        path = weights_dir.write(out, ck.version, trainer.config, ck.model.state_dict(),
                                 training_log(recipe, ck, trainer.history))
        lines.append(f"{ck.version}: {path} (step {ck.step}, {ck.seconds:.0f} s, held-out mIoU "
                     f"{ck.heldout['miou']:.3f}, pixel accuracy {ck.heldout['pixel_accuracy']:.3f})")

    trainer.run(save)
    return lines


def train_all(names: list[str], out: Path, *, jobs: int = 1, steps_scale: float = 1.0, log_every: int = 25,
              log_level: int = logging.INFO) -> list[str]:
    """Run ``names`` (``jobs`` at a time, in that order) and return their summary lines."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    if jobs == 1:
        lines = [line for n in names for line in run_recipe(n, out, steps_scale, log_every, log_level)]
    else:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_recipe, n, out, steps_scale, log_every, log_level) for n in names]
            lines = [line for f in futures for line in f.result()]
    lines.append(f"trained {', '.join(names)} in {time.monotonic() - start:.0f} s")
    return lines
