"""The parity gate: onnxruntime must compute what the PyTorch model computes, or there is no bundle.

The tolerance is measured, not guessed. On the export's first input PyTorch runs in float64 (the reference)
and in float32: float32's error against float64 is the rounding noise a correct float32 implementation makes
on this network. The ONNX graph's error against float64 must stay within NOISE_FACTOR times it; on the other
inputs (no float64 run), its difference from PyTorch float32 within (1 + NOISE_FACTOR) times it (the triangle
inequality). Error is the RMS and the QUANTILE-th quantile of |output − reference| per output; both must hold.

Masked attention hides a pixel from a query where that query's mask logit is below 0: a discontinuity, so
two correct float32 implementations disagree wherever a logit lies within rounding of 0 — on these networks
on about every other input — and the disagreement spreads to every query. The gate therefore reads the
graph's own decisions (its ``Less`` outputs after a ``Sigmoid``), makes PyTorch take the same ones, and
checks that every decision that differs from PyTorch's own lies on a logit within THRESHOLD_FACTOR times the
logits' rounding noise of 0. What remains between the outputs is rounding, and a wrong constant or operator
shows at once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from m2fpkit.runtime.agreement import (
    DECISIVE_MARGIN,
    agreement_on,
    decisive,
    pixel_agreement,
    semantic_labels,
    semantic_scores,
)
from m2fpkit.runtime.bundle.config import Preprocess
from m2fpkit.runtime.errors import ExportError

from .model.m2fp import M2FP

log = logging.getLogger(__name__)

NOISE_FACTOR = 4.0
QUANTILE = 0.999
#: × the output's scale (max(1, RMS of the reference)): where float32 itself is exact, this much is still rounding
ABS_FLOOR = 1e-6
#: A masked-attention decision of the graph that differs from PyTorch's must lie on a logit at most this many
#: times the logits' measured rounding noise (float32 vs float64, QUANTILE-th quantile, first input) from 0.
THRESHOLD_FACTOR = 10.0
#: On pixels where the reference label map is decisive (``runtime.agreement.DECISIVE_MARGIN``), the ONNX label
#: map may miss it on at most this share of pixels more than PyTorch float32 does.
LABEL_SLACK = 1e-4


class ParityError(ExportError):
    """The ONNX graph does not reproduce the PyTorch model; the message names each output's error."""


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth, structured RGB 0-255 float image (blobs and gradients), deterministic per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(3, max(2, h // 48), max(2, w // 48))).astype(np.float32)
    img = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=(h, w), mode="bicubic",
                                          align_corners=False)[0].numpy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img[0] += 40 * np.sin(xx / 17.0)
    img[1] += 40 * np.cos(yy / 23.0)
    return np.clip(img, 0, 255)


def normalise(img_chw: np.ndarray) -> np.ndarray:
    mean = np.asarray(Preprocess.mean, np.float32)[:, None, None]
    std = np.asarray(Preprocess.std, np.float32)[:, None, None]
    return ((img_chw - mean) / std)[None].astype(np.float32)


@dataclass(frozen=True)
class OutputError:
    """|got − reference| of one output: RMS, the QUANTILE-th quantile and the maximum."""

    rms: float
    quantile: float
    max_abs: float

    @classmethod
    def of(cls, ref: np.ndarray, got: np.ndarray) -> OutputError:
        err = np.abs(got.astype(np.float64) - ref).ravel()
        return cls(rms=float(np.sqrt(np.mean(np.square(err)))), quantile=float(np.quantile(err, QUANTILE)),
                   max_abs=float(err.max()))


def within_noise(got: OutputError, noise: OutputError, scale: float, factor: float) -> bool:
    """The gate's rule for one output: RMS and quantile error within ``factor`` × the noise, plus a floor."""
    floor = ABS_FLOOR * scale
    return got.rms <= factor * noise.rms + floor and got.quantile <= factor * noise.quantile + floor


def _reference(model: M2FP) -> M2FP:
    """A float64 copy of ``model`` (the original is left as it is)."""
    return copy.deepcopy(model).double().eval()


def threshold_outputs(proto: onnx.ModelProto) -> list[str]:
    """The graph's masked-attention decisions: outputs of ``Less`` nodes fed by a ``Sigmoid``, in graph order."""
    made_by = {out: node.op_type for node in proto.graph.node for out in node.output}
    return [node.output[0] for node in proto.graph.node
            if node.op_type == "Less" and made_by.get(node.input[0]) == "Sigmoid"]


@contextlib.contextmanager
def _probe(onnx_path: Path) -> Iterator[tuple[ort.InferenceSession, list[str], list[str]]]:
    """A session of the graph that also outputs its masked-attention decisions: (session, outputs, decisions)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    names = [o.name for o in proto.graph.output]
    decisions = threshold_outputs(proto)
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.BOOL, None) for n in decisions)
    probe = onnx_path.with_name(f".parity-{uuid.uuid4().hex}.onnx")  # beside the graph: its weights file resolves
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        probe.write_bytes(proto.SerializeToString())
        sess = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
    finally:
        probe.unlink(missing_ok=True)
    yield sess, names, decisions


def _run_with(model: M2FP, x: torch.Tensor, hidden: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``model(x)`` with each decoder layer hiding the pixels ``hidden`` says; (outputs, each layer's mask logits)."""
    decoder = model.sem_seg_head.predictor
    queue, logits_seen = list(hidden), []

    def take(logits: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        logits_seen.append(logits.numpy())
        if not queue:
            raise ParityError(f"the graph made {len(hidden)} masked-attention decisions, PyTorch needs more")
        forced = torch.from_numpy(queue.pop(0))
        if forced.shape != own.shape:
            raise ParityError(f"masked-attention decision {len(logits_seen)}: shape {tuple(forced.shape)} in the "
                              f"graph, {tuple(own.shape)} in PyTorch")
        return forced

    decoder.attention_hook = take
    try:
        with torch.no_grad():
            outputs = [t.numpy() for t in model(x)]
    finally:
        decoder.attention_hook = None
    if queue:
        raise ParityError(f"the graph made {len(hidden)} masked-attention decisions, PyTorch {len(logits_seen)}")
    return outputs, logits_seen


def _flips(logits: list[np.ndarray], hidden: list[np.ndarray]) -> tuple[int, float]:
    """(how many of the graph's decisions differ from ``logits < 0``, the largest |logit| among them)."""
    count, worst = 0, 0.0
    for lg, hd in zip(logits, hidden):
        differ = hd != (lg < 0)
        if differ.any():
            count += int(differ.sum())
            worst = max(worst, float(np.abs(lg[differ]).max()))
    return count, worst


def _labels_on_decisive(ref: list[np.ndarray], fp32: list[np.ndarray] | None, onnx_out: list[np.ndarray]) -> dict:
    """How often the float32 PyTorch and ONNX label maps miss ``ref``'s on pixels where ``ref`` is decisive.

    ``evidence`` is False when those pixels show fewer than two classes: the check then compared constant maps,
    proved nothing, and the outputs' error alone decides."""
    scores = semantic_scores(*ref)
    sure = decisive(scores)
    labels = scores.argmax(1)
    n = int(sure.sum())

    def miss(out: list[np.ndarray] | None) -> float:
        return 1.0 - agreement_on(semantic_labels(*out), labels, sure) if out is not None else 0.0

    classes = int(np.unique(labels[sure]).size)
    return {"decisive_pixels": n, "decisive_share": n / sure.size, "decisive_classes": classes,
            "evidence": classes >= 2, "fp32_miss": miss(fp32), "onnx_miss": miss(onnx_out)}


def check(model: M2FP, onnx_path: Path, sizes: list[tuple[int, int]], *, enforce: bool = True) -> dict:
    """Run the graph and PyTorch on ``sizes`` (multiples of 32; float64 on the first); return the figures, raise
    :class:`ParityError` on failure (the rule: the module docstring).

    ``enforce=False`` (benchmark bundles only, asked for explicitly) records a failure in the report —
    ``passed: false``, ``gate: "recorded, not enforced"`` and the failures — instead of raising.
    """
    if len(sizes) < 3:
        raise ValueError("parity needs at least 3 input sizes")
    noise: dict[str, OutputError] = {}  # float32 PyTorch's error against float64, measured on the first input
    logit_noise = 0.0
    results: list[dict] = []
    failures: list[str] = []
    reference = _reference(model)
    with _probe(onnx_path) as (sess, names, decision_names):
        for i, (h, w) in enumerate(sizes):
            x = normalise(synthetic_image(h, w, seed=1000 + i))
            produced = sess.run(names + decision_names, {sess.get_inputs()[0].name: x})
            got, hidden = produced[:len(names)], produced[len(names):]
            fp32, logits32 = _run_with(model, torch.from_numpy(x), hidden)
            if i == 0:
                ref, logits_ref = _run_with(reference, torch.from_numpy(x).double(), hidden)
                logit_noise = max((float(np.quantile(np.abs(a - b), QUANTILE)) for a, b in zip(logits32, logits_ref)),
                                  default=0.0)
            else:
                ref, logits_ref = fp32, logits32
            against = "float64 PyTorch" if i == 0 else "float32 PyTorch"
            factor = NOISE_FACTOR if i == 0 else 1 + NOISE_FACTOR
            flips, worst = _flips(logits_ref, hidden)
            allowed = THRESHOLD_FACTOR * max(logit_noise, ABS_FLOOR)
            entry: dict = {"height": h, "width": w, "reference": against,
                           "attention": {"decisions": len(hidden), "flips": flips, "worst_flip_logit": worst,
                                         "allowed_flip_logit": allowed}}
            if flips and worst > allowed:
                failures.append(f"masked attention at {h}x{w}: the graph decides {flips} pixel(s) otherwise than "
                                f"{against}, one on a logit {worst:.3g} from 0 (rounding reaches {allowed:.3g})")
            for name, r, t, g in zip(names, ref, fp32, got):
                if r.shape != g.shape:
                    failures.append(f"{name} at {h}x{w}: shape {g.shape} vs PyTorch {r.shape}")
                    continue
                scale = max(1.0, float(np.sqrt(np.mean(np.square(r, dtype=np.float64)))))
                if i == 0:
                    noise[name] = OutputError.of(r, t)
                floor = noise.get(name)
                if floor is None:
                    failures.append(f"{name} at {h}x{w}: no float32 noise measured (its first shape differed)")
                    continue
                err = OutputError.of(r, g)
                least = max(ABS_FLOOR * scale, 1e-30)  # no division by 0 when the floor is set to 0
                ratio = max(err.rms / max(floor.rms, least), err.quantile / max(floor.quantile, least))
                entry[name] = {"rms_error": err.rms, "quantile_error": err.quantile, "max_abs": err.max_abs,
                               "noise_rms": floor.rms, "noise_quantile": floor.quantile, "noise_ratio": ratio,
                               "allowed_ratio": factor, "scale": scale}
                if not within_noise(err, floor, scale, factor):
                    failures.append(f"{name} at {h}x{w}: error vs {against} is {ratio:.3g}× float32's rounding "
                                    f"noise (allowed {factor:g}×; RMS {err.rms:.3g}, {100 * QUANTILE:g}th "
                                    f"percentile {err.quantile:.3g}; noise {floor.rms:.3g} / {floor.quantile:.3g})")
            if len(ref) == 2 and all(a.shape == b.shape for a, b in zip(ref, got)):
                labels = _labels_on_decisive(ref, fp32 if i == 0 else None, got)
                entry["labels"] = labels
                entry["label_agreement"] = pixel_agreement(semantic_labels(*fp32), semantic_labels(*got))
                if labels["onnx_miss"] > labels["fp32_miss"] + LABEL_SLACK:
                    failures.append(f"label map at {h}x{w}: {100 * labels['onnx_miss']:.3f}% of the "
                                    f"{labels['decisive_pixels']} decisive pixels differ from {against} "
                                    f"(float32 PyTorch: {100 * labels['fp32_miss']:.3f}%)")
            log.info("parity %dx%d: %s", h, w, "; ".join(
                [f"{n} error {entry[n]['noise_ratio']:.2f}× float32's noise" for n in names if n in entry]
                + [f"{flips} masked-attention flip(s) within rounding of 0"]
                + ([f"label maps agree {100 * entry['label_agreement']:.2f}%"] if "label_agreement" in entry else [])))
            results.append(entry)
    report = {"passed": not failures, "runtime": f"onnxruntime {ort.__version__}", "inputs": results,
              "tolerance": {"noise_factor": NOISE_FACTOR, "quantile": QUANTILE, "abs_floor": ABS_FLOOR,
                            "threshold_factor": THRESHOLD_FACTOR, "decisive_margin": DECISIVE_MARGIN,
                            "label_slack": LABEL_SLACK}}
    if failures and enforce:
        raise ParityError("ONNX graph differs from the PyTorch model: " + "; ".join(failures))
    report["gate"] = "enforced" if enforce else "recorded, not enforced"
    if failures:
        report["failures"] = failures
        log.warning("PARITY GATE FAILED, recorded in config.json (not enforced): %s", "; ".join(failures))
    return report
