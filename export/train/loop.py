"""The training loop: seeded data → forward (with the auxiliary taps) → set loss → AdamW step, with the loss
logged every few steps and checkpoints taken at the recipe's steps.

Invariants: a recipe gives the same weights on every run with one thread (seeded init, data seeds
``figures.item_seed(recipe.data_seed, i)``, deterministic CPU kernels); the network is the export's own
``M2FP`` and its state dict has ModelScope's keys. BatchNorm trains in train mode (the network is trained from
scratch, so there are no statistics to freeze, and each batch norm sees ``batch × H × W`` values per channel,
plenty even at batch 2); before a checkpoint is saved its running statistics are recomputed as exact averages
over fresh training batches ("precise BN"), so the eval-mode network a bundle runs matches what was trained.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from m2fpkit.runtime import figures

from ..build import preprocess_for
from ..model import config as mcfg
from ..model.m2fp import M2FP
from . import data
from .evaluate import grade, heldout_seeds
from .set_loss import LossWeights, set_loss
from .taps import DecoderTaps

log = logging.getLogger(__name__)

#: batch index of the first batch precise BN averages over: a stream of scenes training never reaches
BN_BATCHES = 1 << 40


@dataclass(frozen=True)
class Recipe:
    """Everything a training run depends on; ``checkpoints`` maps a version to the step it is taken at."""

    name: str
    task: str
    steps: int
    checkpoints: dict[str, int]
    #: torch's seed (initial weights) and the dataset seed of the training scenes
    seed: int
    batch: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    #: gradient norm clip
    clip: float = 1.0
    weights: LossWeights = field(default_factory=LossWeights)
    augment: data.Augment = field(default_factory=data.Augment)
    #: auxiliary losses on the predictions before each decoder layer (Mask2Former's deep supervision)
    aux: bool = True
    #: training batches averaged for the precise BatchNorm statistics of a checkpoint
    bn_batches: int = 12
    #: held-out scenes graded at each checkpoint
    grade_scenes: int = 16
    #: overrides of the task's preprocessing (``short_edge``, ``max_size``), as a version spec's ``preprocess``:
    #: the bundle must be exported with the same, or it infers at another scale than it was trained at
    preprocess: dict[str, int] = field(default_factory=dict)
    #: cycle over this many training batches (kept in memory) instead of drawing new ones (smoke tests)
    cycle: int | None = None

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then Mask2Former's poly decay (power 0.9) to 0 at ``steps``."""
        if step <= self.warmup:
            return self.lr * step / self.warmup
        return self.lr * (1 - (step - self.warmup) / max(1, self.steps - self.warmup + 1)) ** 0.9


@dataclass
class Checkpointed:
    """A checkpoint: the eval-mode model, its step and its held-out scores."""

    version: str
    step: int
    model: M2FP
    heldout: dict[str, float]
    seconds: float


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and embeddings (as Mask2Former)."""
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            no_decay = (isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding))
                        or name.endswith("bias") or p.ndim < 2)
            (plain if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class Trainer:
    """One recipe's run; :meth:`run` returns its checkpoints and leaves the loss history in :attr:`history`."""

    def __init__(self, recipe: Recipe, log_every: int = 25) -> None:
        self.recipe = recipe
        self.log_every = log_every
        self.config = mcfg.preset("tiny", recipe.task)
        self.pre = preprocess_for(self.config, recipe.preprocess)
        #: ``[step, total, class, mask, dice]`` averaged over the last ``log_every`` steps (final prediction's
        #: weighted terms; ``total`` includes the auxiliary predictions)
        self.history: list[list[float]] = []
        self._kept: dict[int, tuple[torch.Tensor, list[data.Sample]]] = {}

    def batch(self, index: int) -> tuple[torch.Tensor, list[data.Sample]]:
        """Training batch ``index``: scenes ``figures.item_seed(seed, index·batch + i)``."""
        r = self.recipe
        if r.cycle is not None:
            index %= r.cycle
            if index in self._kept:
                return self._kept[index]
        items = [data.sample(figures.item_seed(r.seed, index * r.batch + i), self.config, self.pre, r.augment)
                 for i in range(r.batch)]
        made = data.batch(items, self.pre.pad_value)
        if r.cycle is not None:
            self._kept[index] = made
        return made

    def run(self, on_checkpoint: Callable[[Checkpointed], None] | None = None) -> list[Checkpointed]:
        r = self.recipe
        torch.manual_seed(r.seed)
        model = M2FP(self.config).train()
        opt = torch.optim.AdamW(_param_groups(model, r.weight_decay), lr=r.lr)
        taps = DecoderTaps(model) if r.aux else None
        at = {step: version for version, step in r.checkpoints.items()}
        done: list[Checkpointed] = []
        window: list[list[float]] = []
        start = time.monotonic()
        for step in range(1, r.steps + 1):
            for g in opt.param_groups:
                g["lr"] = r.lr_at(step)
            images, targets = self.batch(step - 1)
            logits, masks = model(images)
            predictions = [(logits, masks)] + (taps.auxiliary() if taps else [])
            loss, final = set_loss(predictions, targets, r.weights)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{r.name}: loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), r.clip)
            opt.step()
            window.append([loss.item(), final.cls.item(), final.mask.item(), final.dice.item()])
            if step % self.log_every == 0 or step == r.steps or step in at:
                mean = [sum(col) / len(window) for col in zip(*window)]
                self.history.append([step, *(round(v, 4) for v in mean)])
                log.info("%s step %d/%d: loss %.3f (class %.3f, mask %.3f, dice %.3f), lr %.2e, %.0f s", r.name,
                         step, r.steps, *mean, r.lr_at(step), time.monotonic() - start)
                window = []
            if step in at:
                ck = self.checkpoint(model, at[step], step, time.monotonic() - start)
                done.append(ck)
                if on_checkpoint is not None:
                    on_checkpoint(ck)
        if taps:
            taps.close()
        return done

    def checkpoint(self, model: M2FP, version: str, step: int, seconds: float) -> Checkpointed:
        """An eval-mode copy of ``model`` with precise BN statistics, graded on the held-out scenes."""
        with torch.random.fork_rng():  # building the copy draws initial weights: keep training's RNG as it was
            snapshot = M2FP(self.config)  # a copy without the taps' hooks
        snapshot.load_state_dict(model.state_dict())
        precise_bn(snapshot, (self.batch(BN_BATCHES + i)[0] for i in range(self.recipe.bn_batches)))
        scores = grade(snapshot, heldout_seeds(self.recipe.grade_scenes), self.recipe.preprocess)
        heldout = {"miou": round(scores.miou, 4), "pixel_accuracy": round(scores.pixel_accuracy, 4),
                   "mean_class_accuracy": round(scores.mean_class_accuracy, 4), "scenes": self.recipe.grade_scenes}
        log.info("%s: %s at step %d, held-out mIoU %.3f, pixel accuracy %.3f", self.recipe.name, version, step,
                 scores.miou, scores.pixel_accuracy)
        return Checkpointed(version, step, snapshot.eval(), heldout, round(seconds, 1))


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm's running statistics by their exact average over ``batches`` (train-mode
    forwards, no gradient); leaves ``model`` in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for images in batches:
        model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
