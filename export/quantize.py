"""The int8 variant of a bundle: static QDQ quantization of the exported graph, calibrated on images that
ship in the bundle (``calibration/``), its golden agreement measured before it is written into config.json.

QDQ on Conv and MatMul, weights int8 per channel, activations uint8, no ``reduce_range`` (the runtime
only offers the int8 plan on CPUs with VNNI or AMX-INT8, where the full range does not saturate). The
variant graph carries its weights inside (a quarter of the fp32 bytes); the runtime never serves it
before it agreed with the golden sample on the box (``runtime/plans.py``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from m2fpkit.runtime.agreement import pixel_agreement, semantic_labels
from m2fpkit.runtime.bundle.config import BundleConfig, Variant
from m2fpkit.runtime.errors import ExportError
from m2fpkit.runtime.imageio import decode_image
from m2fpkit.runtime.postprocess import postprocess
from m2fpkit.runtime.preprocess import prepare

from .parity import synthetic_image

log = logging.getLogger(__name__)

VARIANT_FILE = "model.int8.onnx"
CALIBRATION_DIR = "calibration"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: synthetic calibration images (h, w) when no calibration directory is given
SYNTHETIC_SIZES = ((480, 640), (640, 480), (512, 512), (360, 640))
MAX_IMAGES = 64
#: operator kinds quantized (QDQ); the rest stays fp32
QUANTIZED_OPS = ("Conv", "MatMul")


def calibration_images(directory: Path | None) -> list[tuple[str, bytes]]:
    """(bundle file name, encoded image) pairs: the images of ``directory`` (sorted, at most
    :data:`MAX_IMAGES`), or synthetic scenes when None. Each must decode as the runtime decodes."""
    out: list[tuple[str, bytes]] = []
    if directory is None:
        for i, (h, w) in enumerate(SYNTHETIC_SIZES):
            rgb = synthetic_image(h, w, seed=200 + i).transpose(1, 2, 0).round().astype(np.uint8)
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise ExportError("cannot encode a synthetic calibration image")
            out.append((f"{CALIBRATION_DIR}/synthetic-{i:02d}.jpg", jpg.tobytes()))
        return out
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ExportError(f"--calibration {directory}: no {'/'.join(IMAGE_SUFFIXES)} images")
    for i, path in enumerate(files[:MAX_IMAGES]):
        data = path.read_bytes()
        decode_image(data)  # refuses what the runtime would refuse, naming the problem
        out.append((f"{CALIBRATION_DIR}/{i:02d}{path.suffix.lower()}", data))
    return out


def _inputs(config: BundleConfig, images: list[tuple[str, bytes]]) -> Iterator[dict[str, np.ndarray]]:
    name = config.inputs[0].name
    for _, data in images:
        yield {name: prepare(decode_image(data), config.preprocess).tensor}


def golden_agreement(model_file: Path, config: BundleConfig, bundle_dir: Path) -> float:
    """The worse of label-map and semantic-map agreement of ``model_file`` (onnxruntime, weights inside)
    with the golden sample: the measure the runtime's plan check applies (``plans.Planner.verify``)."""
    golden = config.golden
    if not golden:
        raise ExportError("the int8 variant needs the golden sample to be measured against")
    rgb = decode_image((bundle_dir / golden.image).read_bytes())
    prepared = prepare(rgb, config.preprocess)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    logits, masks = session.run([o.name for o in config.outputs], {config.inputs[0].name: prepared.tensor})
    measures = [(postprocess(logits, masks, prepared, config).label_map, golden.label_map)]
    if golden.semantic:
        measures.append((semantic_labels(logits, masks)[0], golden.semantic))
    out = []
    for got, name in measures:
        expected = cv2.imread(str(bundle_dir / name), cv2.IMREAD_UNCHANGED)
        if expected is None:
            raise ExportError(f"golden file {name} unreadable")
        out.append(pixel_agreement(got, expected))
    return min(out)


def pre_process(model: Path, out: Path) -> None:
    """onnxruntime's pre-quantization pass of ``model`` into ``out`` (+ ``out.data``, one weights file).

    Its symbolic shape inference does not cover this graph's dynamic sizes and, failing, leaves scratch
    files in the working directory: it is skipped; ONNX shape inference covers the graph.
    """
    from onnxruntime.quantization import quant_pre_process

    quant_pre_process(model, out, skip_symbolic_shape=True, save_as_external_data=True,
                      all_tensors_to_one_file=True, external_data_location=f"{out.name}.data")


def write_int8(stage: Path, config: BundleConfig, images: list[tuple[str, bytes]]) -> Variant:
    """Quantize ``stage/<model_file>`` into ``stage/model.int8.onnx``, write the calibration images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = _inputs(config, images)

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    for name, data in images:
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_bytes(data)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        pre_process(stage / config.model_file, pre)
        quantize_static(pre, stage / VARIANT_FILE, Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=False)
    agreement = golden_agreement(stage / VARIANT_FILE, config, stage)
    log.info("%s: int8 variant agrees %.2f%% with the golden sample (%d calibration images)", config.version,
             100 * agreement, len(images))
    return Variant(model_file=VARIANT_FILE, precision="int8", calibration=tuple(n for n, _ in images),
                   agreement=round(agreement, 6))
