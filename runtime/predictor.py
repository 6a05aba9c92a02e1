"""One loaded version and its stages: decode → prepare → run → postprocess → render.

Each stage is a method callable on its own (the server and the benchmarks use them; nothing else
rebuilds the pipeline); :meth:`Predictor.predict` chains them with timings. A predictor is built only
from a verified in-memory :class:`~m2fpkit.runtime.bundle.reader.BundleContent`: the graph, the weights
and the golden sample it checks itself against are the bytes that were hashed at load.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .agreement import pixel_agreement, semantic_labels
from .bundle import reader
from .bundle.config import BundleConfig
from .bundle.signature import NO_KEYS, TrustPolicy
from .errors import BundleError
from .graph_check import check_graph
from .imageio import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, decode_image
from .plans import REFERENCE, PlanChoice
from .postprocess import postprocess
from .preprocess import Prepared, prepare
from .result import ParseResult
from .session import SessionFactory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    """Image guards: the header is checked before decoding, the decoded size after (see ``imageio``).

    OpenCV's decoders also enforce a process-wide pixel cap of their own (``imageio.decoder_pixel_cap``).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT


@dataclass(frozen=True)
class GoldenAgreement:
    #: final label map vs the export's PyTorch label map
    label: float
    #: semantic argmax at mask resolution vs PyTorch's (None: the bundle predates it)
    semantic: float | None = None

    @property
    def worst(self) -> float:
        return min(self.label, self.semantic if self.semantic is not None else 1.0)


def _golden_png(content: reader.BundleContent, name: str) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(content.files[name], np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise BundleError(f"golden file {name} is unreadable")
    return image


@dataclass
class Prediction:
    version: str
    result: ParseResult
    timings: dict[str, float] = field(default_factory=dict)


class Predictor:
    """A verified bundle with its onnxruntime session; every stage is thread-safe."""

    def __init__(self, content: reader.BundleContent, session: Any,
                 forward_gate: contextlib.AbstractContextManager[Any] | None = None) -> None:
        self.content = content
        self.config: BundleConfig = content.config
        self.session = session
        #: the execution plan serving this predictor (set by ``planner.Planner``; None: built directly, ort-fp32)
        self.plan: PlanChoice | None = None
        #: held around every forward pass (the registry's ``forward_slots``, shared by all its predictors)
        self.forward_gate = forward_gate if forward_gate is not None else contextlib.nullcontext()
        self._input = self.config.inputs[0].name
        self._outputs = [o.name for o in self.config.outputs]

    @classmethod
    def load(cls, bundle_dir: str | Path, factory: SessionFactory | None = None,
             trust: TrustPolicy = NO_KEYS) -> Predictor:
        """Verify the bundle into memory, build the session from those bytes, check graph ⇄ config."""
        return cls.from_content(reader.load(bundle_dir, trust), factory)

    @classmethod
    def from_content(cls, content: reader.BundleContent, factory: SessionFactory | None = None) -> Predictor:
        """The reference predictor (onnxruntime, main graph); ``planner.Planner`` chooses among engines."""
        return cls.with_session(content, (factory or SessionFactory()).create(content))

    @classmethod
    def with_session(cls, content: reader.BundleContent, session: Any,
                     forward_gate: contextlib.AbstractContextManager[Any] | None = None) -> Predictor:
        """A predictor on ``session`` (any engine with onnxruntime's session interface), graph ⇄ config checked."""
        check_graph(content.config, session)
        return cls(content, session, forward_gate)

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def plan_name(self) -> str:
        """Name of the execution plan serving this predictor (``ort-fp32`` when built directly)."""
        return (self.plan.plan if self.plan is not None else REFERENCE).name

    @property
    def identity(self) -> str:
        """The content key of the bundle this predictor runs (see ``bundle.reader.identity``)."""
        return self.content.info.identity

    # ------------------------------------------------------------------------------------ stages
    @staticmethod
    def decode(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
        """Encoded image → RGB uint8 (H, W, 3) of at most ``limits.max_pixels``; refusals are InputErrors."""
        return decode_image(data, max_pixels=limits.max_pixels, max_aspect=limits.max_aspect)

    def prepare(self, rgb: np.ndarray) -> Prepared:
        """RGB → the graph's input tensor (resize, normalise, pad) and the geometry to undo it."""
        return prepare(rgb, self.config.preprocess)

    def run(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The forward pass: input tensor → (class logits, mask logits), inside ``forward_gate``."""
        with self.forward_gate:
            logits, masks = self.session.run(self._outputs, {self._input: tensor})
        return logits, masks

    def postprocess(self, outputs: tuple[np.ndarray, np.ndarray], prepared: Prepared) -> ParseResult:
        """Graph outputs → label map, instances and persons at the original image size."""
        return postprocess(outputs[0], outputs[1], prepared, self.config)

    def render(self, result: ParseResult, rgb: np.ndarray, max_side: int | None = None) -> np.ndarray:
        """The overlay of ``result`` on ``rgb`` in the bundle's palette (RGB uint8), its longest side at most
        ``max_side`` (None: the image's size)."""
        return result.overlay(rgb, self.config.palette, max_side=max_side)

    # ------------------------------------------------------------------------------------ chains
    def predict_rgb(self, rgb: np.ndarray, timings: dict[str, float] | None = None) -> Prediction:
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        prepared = self.prepare(rgb)
        t1 = time.perf_counter()
        outputs = self.run(prepared.tensor)
        t2 = time.perf_counter()
        result = self.postprocess(outputs, prepared)
        t3 = time.perf_counter()
        timings.update(preprocess=t1 - t0, inference=t2 - t1, postprocess=t3 - t2)
        return Prediction(self.version, result, timings)

    def predict(self, data: bytes, limits: ImageLimits = ImageLimits()) -> Prediction:
        t0 = time.perf_counter()
        rgb = self.decode(data, limits)
        timings = {"decode": time.perf_counter() - t0}
        pred = self.predict_rgb(rgb, timings)
        timings["total"] = time.perf_counter() - t0
        return pred

    def warmup(self) -> float:
        """One full run on a synthetic image of a typical size; returns its duration."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        h, w = (480, 640) if self.config.preprocess.resize == "shortest-edge" else self.config.input_size or (512, 384)
        self.predict_rgb(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        return time.perf_counter() - t0

    def golden_input(self) -> np.ndarray:
        """The graph input of the golden image (a typical input for timing a plan); BundleError without one."""
        if not self.config.golden:
            raise BundleError("the bundle has no golden sample")
        return self.prepare(self.decode(self.content.files[self.config.golden.image])).tensor

    def golden_agreement(self) -> GoldenAgreement | None:
        """Agreement with the bundle's golden sample (None: the bundle has none): the final label map and,
        when the bundle ships it, the semantic argmax at mask resolution (``agreement.semantic_labels``)."""
        golden = self.config.golden
        if not golden:
            return None
        expected = _golden_png(self.content, golden.label_map)
        prepared = self.prepare(self.decode(self.content.files[golden.image]))
        outputs = self.run(prepared.tensor)
        got = self.postprocess(outputs, prepared).label_map
        if got.shape != expected.shape:
            raise BundleError(f"golden self-test: label map {got.shape} vs expected {expected.shape}")
        semantic = None
        if golden.semantic:
            semantic = pixel_agreement(semantic_labels(*outputs)[0], _golden_png(self.content, golden.semantic))
        return GoldenAgreement(pixel_agreement(got, expected), semantic)

    def self_test(self) -> float | None:
        """Run the bundle's golden sample, if it has one; refuse the version if the label maps disagree."""
        agreement = self.golden_agreement()
        if agreement is None or self.config.golden is None:
            return None
        need = self.config.golden.min_agreement
        if agreement.label < need:
            raise BundleError(f"golden self-test: {100 * agreement.label:.2f}% of pixels agree, "
                              f"need {100 * need:.1f}%")
        return agreement.label

    def close(self) -> None:
        self.session = None
