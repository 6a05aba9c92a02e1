"""PyTorch M2FP → ONNX (dynamo exporter, dynamic height/width in multiples of 32, external weights).

Optional graph cache, for test sessions that export the same model several times: with
``$M2FP_EXPORT_CACHE`` naming a directory, a graph is stored there under a key that hashes everything
it is a function of — the architecture config, every weight and buffer, the opset and example size,
the source of the export code (``onnx_export.py`` and ``model/``) and the torch/onnx/onnxscript
versions — and an export of an identical model copies it instead of tracing again. Entries are
published by an atomic rename, so concurrent exports never see half a graph. Off when unset; the
parity gate still compares every reused graph with the PyTorch model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch

from .model.m2fp import M2FP, SIZE_DIVISIBILITY

log = logging.getLogger(__name__)

INPUT = "image"
OUTPUTS = ("pred_logits", "pred_masks")
MAX_SIDE_BLOCKS = 256  # dynamic sides up to 256 * 32 = 8192 px
#: directory of the optional graph cache (see the module docstring)
CACHE_ENV = "M2FP_EXPORT_CACHE"
_CODE = (Path(__file__), *sorted(Path(__file__).with_name("model").glob("*.py")))


def export_onnx(model: M2FP, path: Path, *, opset: int, example_hw: tuple[int, int] = (256, 320)) -> None:
    """Write ``path`` (+ ``path.data``): input ``image [1,3,32*h,32*w]`` normalised RGB, outputs logits/masks."""
    h, w = example_hw
    if h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
        raise ValueError(f"example size {example_hw} must be a multiple of {SIZE_DIVISIBILITY}")
    path = Path(path)
    cache = os.environ.get(CACHE_ENV)
    entry = Path(cache) / cache_key(model, path.name, opset=opset, example_hw=example_hw) if cache else None
    if entry is not None and _restore(entry, path):
        log.info("ONNX graph reused from the export cache (%s)", entry.name[:16])
        return
    _export(model, path, opset=opset, example_hw=example_hw)
    if entry is not None:
        _store(entry, path)


#: loggers whose warnings say nothing about this model ("torchvision is not installed. Skipping
#: torchvision::roi_align", "Skipping constant folding for op Split"): quiet while exporting
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding")


@contextlib.contextmanager
def _quiet_exporter_logs():
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model: M2FP, path: Path, *, opset: int, example_hw: tuple[int, int]) -> None:
    x = torch.zeros(1, 3, *example_hw)
    hd = torch.export.Dim("h32", min=1, max=MAX_SIDE_BLOCKS)
    wd = torch.export.Dim("w32", min=1, max=MAX_SIDE_BLOCKS)
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), torch.no_grad(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), input_names=[INPUT], output_names=list(OUTPUTS), dynamo=True,
            opset_version=opset, external_data=True, optimize=True, verbose=False,
            dynamic_shapes={"image": {2: SIZE_DIVISIBILITY * hd, 3: SIZE_DIVISIBILITY * wd}},
        )
    for line in out.getvalue().splitlines():
        log.debug("torch.onnx: %s", line)


def cache_key(model: M2FP, file_name: str, *, opset: int, example_hw: tuple[int, int]) -> str:
    """SHA-256 of everything the exported graph depends on (see the module docstring)."""
    import onnx
    import onnxscript

    from .sources import state_dict_sha256

    h = hashlib.sha256()
    h.update(json.dumps({"config": dataclasses.asdict(model.config), "file": file_name, "opset": opset,
                         "example_hw": list(example_hw), "training": model.training, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
                        sort_keys=True, default=str).encode())
    h.update(state_dict_sha256(model.state_dict()).encode())
    for code in _CODE:
        h.update(code.name.encode() + b"\0" + code.read_bytes())
    return h.hexdigest()


def _files(path: Path) -> tuple[Path, Path]:
    return path, path.with_name(path.name + ".data")


def _restore(entry: Path, path: Path) -> bool:
    if not entry.is_dir():
        return False
    for src, dst in zip(_files(entry / path.name), _files(path)):
        shutil.copyfile(src, dst)
    return True


def _store(entry: Path, path: Path) -> None:
    tmp = entry.with_name(f".tmp-{entry.name}-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    for src, dst in zip(_files(path), _files(tmp / path.name)):
        shutil.copyfile(src, dst)
    try:
        tmp.rename(entry)
    except OSError:  # another export stored the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Store bundle identity in the graph's ``metadata_props`` (readable through onnxruntime)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for k, v in sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.save(model, str(path))
