"""One loaded version: image bytes → decode → preprocess → onnxruntime → postprocess."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import BundleConfig
from .errors import BundleError
from .imageio import decode_image
from .postprocess import postprocess
from .preprocess import prepare
from .result import ParseResult
from .session import SessionFactory
from .verify import check_graph, verify_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    """Guards applied before a full decode."""

    max_pixels: int = 40_000_000
    max_aspect: float = 20.0


@dataclass
class Prediction:
    version: str
    result: ParseResult
    timings: dict[str, float] = field(default_factory=dict)


class Predictor:
    """A verified bundle with its onnxruntime session; ``predict`` is thread-safe."""

    def __init__(self, bundle_dir: Path, config: BundleConfig, session) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.config = config
        self.session = session
        self._input = config.inputs[0].name
        self._outputs = [o.name for o in config.outputs]

    @classmethod
    def load(cls, bundle_dir: Path, factory: SessionFactory | None = None) -> "Predictor":
        """Verify the bundle's files, create the session and check the graph against config.json."""
        config = verify_files(bundle_dir)
        factory = factory or SessionFactory()
        session = factory.create(Path(bundle_dir) / config.model_file, config.weights_index)
        check_graph(config, session)
        return cls(bundle_dir, config, session)

    @property
    def version(self) -> str:
        return self.config.version

    def run(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, masks = self.session.run(self._outputs, {self._input: tensor})
        return logits, masks

    def predict_rgb(self, rgb: np.ndarray, timings: dict[str, float] | None = None) -> Prediction:
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        prepared = prepare(rgb, self.config.preprocess)
        t1 = time.perf_counter()
        logits, masks = self.run(prepared.tensor)
        t2 = time.perf_counter()
        result = postprocess(logits, masks, prepared, self.config)
        t3 = time.perf_counter()
        timings.update(preprocess=t1 - t0, inference=t2 - t1, postprocess=t3 - t2)
        return Prediction(self.version, result, timings)

    def predict(self, data: bytes, limits: ImageLimits = ImageLimits()) -> Prediction:
        t0 = time.perf_counter()
        rgb = decode_image(data, max_pixels=limits.max_pixels, max_aspect=limits.max_aspect)
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

    def self_test(self) -> float | None:
        """Run the bundle's golden sample, if it has one; refuse the version if labels disagree."""
        golden = self.config.golden
        if not golden:
            return None
        import cv2

        image = (self.bundle_dir / golden["image"]).read_bytes()
        expected = cv2.imread(str(self.bundle_dir / golden["label_map"]), cv2.IMREAD_UNCHANGED)
        if expected is None:
            raise BundleError(f"golden label map {golden['label_map']} is unreadable")
        got = self.predict(image).result.label_map
        if got.shape != expected.shape:
            raise BundleError(f"golden self-test: label map {got.shape} vs expected {expected.shape}")
        agreement = float((got == expected).mean())
        need = float(golden.get("min_agreement", 0.995))
        if agreement < need:
            raise BundleError(f"golden self-test: {100 * agreement:.2f}% of pixels agree, need {100 * need:.1f}%")
        return agreement

    def close(self) -> None:
        self.session = None
