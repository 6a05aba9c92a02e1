"""Where each external initializer of a saved ONNX graph lies in its data file (for ``weights.json``).

The runtime has no ``onnx`` package, so the locations are read here, from the graph; the bundle
layer's writer hashes each range and writes the index (``runtime/bundle/weights_index.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from m2fpkit.runtime.bundle.weights_index import DTYPES
from m2fpkit.runtime.errors import ExportError


def external_tensors(model_path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """(data file, rows of name/offset/length/dtype/shape) of the graph's external initializers."""
    model = onnx.load(str(model_path), load_external_data=False)
    tensors, data_files = [], set()
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).name
        if dtype not in DTYPES:
            raise ExportError(f"{init.name}: dtype {dtype} cannot be indexed")
        data_files.add(info["location"])
        tensors.append({"name": init.name, "offset": int(info.get("offset", 0)), "length": int(info["length"]),
                        "dtype": dtype, "shape": [int(d) for d in init.dims]})
    if len(data_files) > 1:
        raise ExportError(f"{model_path.name}: external weights in several files {sorted(data_files)}")
    return (data_files.pop() if data_files else None), tensors
