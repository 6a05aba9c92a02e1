"""OpenVINO behind the session interface the predictor uses (``run``, ``get_inputs``, ``get_outputs``,
``get_modelmeta``), built from a bundle's verified bytes only.

Optional (``pip install 'm2fpkit[openvino]'``): nothing imports this module unless a plan asks for the
openvino engine. OpenVINO reads the ONNX graph from memory: the external weights are the verified
tensors of :meth:`BundleContent.tensors`, embedded into the in-memory model before OpenVINO sees it, so
the files on disk are never opened. Compiled models hold their own copy of the weights.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle.reader import BundleContent
from .errors import BundleError, engine_reason
from .priority import run_in_background

log = logging.getLogger(__name__)

#: OpenVINO ``INFERENCE_PRECISION_HINT`` per plan precision
PRECISION_HINTS = {"f32": "f32", "bf16": "bf16", "int8": "f32"}


def available() -> str | None:
    """None if OpenVINO and onnx import, else why not (the plan is then skipped with this reason)."""
    try:
        import onnx  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"openvino is not installed (pip install 'm2fpkit[openvino]'): {exc.name}"
    return None


def version() -> str:
    import openvino

    return str(openvino.__version__)


@dataclass(frozen=True)
class _Arg:
    """What ``graph_check.check_graph`` reads of an input or output (onnxruntime's NodeArg shape)."""

    name: str
    shape: list[int | str]
    type: str


@dataclass(frozen=True)
class _Meta:
    custom_metadata_map: dict[str, str]


_ONNX_TYPES = {1: "tensor(float)", 7: "tensor(int64)", 6: "tensor(int32)", 2: "tensor(uint8)", 10: "tensor(float16)"}


def _args(values: Any) -> list[_Arg]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        out.append(_Arg(v.name, dims, _ONNX_TYPES.get(t.elem_type, f"onnx type {t.elem_type}")))
    return out


def _in_memory_model(content: BundleContent, model_file: str) -> Any:
    """The verified graph with every external tensor embedded from the verified weights."""
    import onnx

    model = onnx.load_model_from_string(content.files[model_file])
    external = {t.name: t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    if external:
        if model_file != content.config.model_file:
            raise BundleError(f"{model_file}: a variant graph must carry its weights inside")
        for entry, data in content.tensors():
            tensor = external.pop(entry.name, None)
            if tensor is not None:
                tensor.raw_data = data.tobytes()
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
        if external:
            raise BundleError(f"{model_file}: the weights index lacks {len(external)} external tensor(s), "
                              f"e.g. {next(iter(external))}")
    return model


class OpenVINOSession:
    """A compiled OpenVINO model; ``run`` is thread-safe (one infer request per concurrent caller)."""

    def __init__(self, content: BundleContent, model_file: str, precision: str, threads: int) -> None:
        import openvino as ov

        # reading and embedding the weights at background priority; compiling (threads) at normal priority
        model = run_in_background(_in_memory_model, content, model_file)
        self._inputs, self._outputs = _args(model.graph.input), _args(model.graph.output)
        self._meta = _Meta({p.key: p.value for p in model.metadata_props})
        core = ov.Core()
        properties = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            # the snippets kernel fails on this graph's attention subgraph in bf16 ("Cannot initialize brgemm")
            "SNIPPETS_MODE": "DISABLE",
        }
        try:
            self._compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU", properties)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with multi-line C++ messages
            raise BundleError(f"openvino cannot compile {model_file}: {engine_reason(exc)}") from None
        self._names = [o.get_any_name() for o in self._compiled.outputs]
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            results = request.infer(feeds)
            by_name = {port.get_any_name(): np.array(value, copy=True) for port, value in results.items()}
        finally:
            self._requests.put(request)
        return [by_name[n] for n in (output_names or self._names)]

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        return self._outputs

    def get_modelmeta(self) -> _Meta:
        return self._meta

    @property
    def shared_bytes(self) -> int:
        return 0
