"""The parity gate: onnxruntime must compute what the PyTorch model computes, or there is no bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from m2fpkit.runtime.agreement import pixel_agreement, semantic_labels
from m2fpkit.runtime.bundle.config import PARITY_MIN_AGREEMENT, Preprocess
from m2fpkit.runtime.errors import ExportError

from .model.m2fp import M2FP

log = logging.getLogger(__name__)

#: An element agrees when |onnx − torch| ≤ ATOL·s + RTOL·|torch|, with s = max(1, RMS of that output):
#: float reassociation errors grow with the magnitude of the activations, so the absolute part is
#: taken relative to the output's own scale (s = 1 for outputs of unit size or smaller).
ATOL, RTOL = 1e-3, 1e-3
#: share of elements that must agree; the masked-attention threshold can flip a mask bit on a rare
#: element and move its logits by ~1e-2, so a handful may fall outside
MIN_WITHIN = 0.999
MAX_ABS = 0.05  # × s


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


@dataclass
class OutputDiff:
    max_abs: float
    max_rel: float
    within: float
    scale: float

    def ok(self) -> bool:
        return self.within >= MIN_WITHIN and self.max_abs <= MAX_ABS * self.scale


def _diff(ref: np.ndarray, got: np.ndarray) -> OutputDiff:
    err = np.abs(ref - got)
    scale = max(1.0, float(np.sqrt(np.mean(np.square(ref, dtype=np.float64)))))
    return OutputDiff(max_abs=float(err.max()),
                      max_rel=float((err / np.maximum(np.abs(ref), 1e-6)).max()),
                      within=float((err <= ATOL * scale + RTOL * np.abs(ref)).mean()), scale=scale)


def check(model: M2FP, onnx_path: Path, sizes: list[tuple[int, int]], *, enforce: bool = True) -> dict:
    """Run both on ``sizes`` (multiples of 32); return the figures, raise :class:`ParityError` on failure.

    ``enforce=False`` (benchmark bundles only, asked for explicitly) records a failure in the report —
    ``passed: false``, ``gate: "recorded, not enforced"`` and the failures — instead of raising, so the
    bundle itself says that its gate did not hold.
    """
    if len(sizes) < 3:
        raise ValueError("parity needs at least 3 input sizes")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    results, failures = [], []
    for i, (h, w) in enumerate(sizes):
        x = normalise(synthetic_image(h, w, seed=1000 + i))
        with torch.no_grad():
            ref = [t.numpy() for t in model(torch.from_numpy(x))]
        got = sess.run(names, {sess.get_inputs()[0].name: x})
        entry: dict = {"height": h, "width": w}
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                failures.append(f"{name} at {h}x{w}: shape {g.shape} vs PyTorch {r.shape}")
                continue
            d = _diff(r, g)
            entry[name] = {"max_abs": d.max_abs, "max_rel": d.max_rel, "within_tolerance": d.within,
                           "scale": d.scale}
            if not d.ok():
                failures.append(f"{name} at {h}x{w}: max abs diff {d.max_abs:.3g}, "
                                f"{100 * d.within:.3f}% within atol={ATOL}×{d.scale:.2g}+rtol={RTOL} "
                                f"(need {100 * MIN_WITHIN}% and max ≤ {MAX_ABS * d.scale:.3g})")
        if len(ref) == 2 and ref[1].shape == got[1].shape:
            agree = pixel_agreement(semantic_labels(*ref), semantic_labels(*got))
            entry["label_agreement"] = agree
            if agree < PARITY_MIN_AGREEMENT:
                failures.append(f"label map at {h}x{w}: {100 * agree:.3f}% pixels agree "
                                f"(need {100 * PARITY_MIN_AGREEMENT}%)")
        log.info("parity %dx%d: %s", h, w, "; ".join(
            [f"{n} max |Δ| {entry[n]['max_abs']:.2g}, {100 * entry[n]['within_tolerance']:.2f}% within tolerance"
             for n in names if n in entry]
            + ([f"label maps agree {100 * entry['label_agreement']:.2f}%"] if "label_agreement" in entry else [])))
        results.append(entry)
    report = {"passed": not failures, "runtime": f"onnxruntime {ort.__version__}", "inputs": results,
              "tolerance": {"atol": ATOL, "rtol": RTOL, "min_within": MIN_WITHIN, "max_abs": MAX_ABS,
                            "min_label_agreement": PARITY_MIN_AGREEMENT}}
    if failures and enforce:
        raise ParityError("ONNX graph differs from the PyTorch model: " + "; ".join(failures))
    report["gate"] = "enforced" if enforce else "recorded, not enforced"
    if failures:
        report["failures"] = failures
        log.warning("PARITY GATE FAILED, recorded in config.json (not enforced): %s", "; ".join(failures))
    return report
