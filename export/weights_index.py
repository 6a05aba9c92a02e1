"""Write ``weights.json``: where each external initializer lies in the data file, and its SHA-256.

The runtime (``m2fpkit.runtime.weights``) uses it to map a tensor that several loaded versions have
in common only once. It has no ``onnx`` package, so the index is made here, from the saved graph.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from m2fpkit.runtime.weights import DTYPES, INDEX_FORMAT

INDEX_FILE = "weights.json"


def write_index(model_path: Path) -> str | None:
    """Index the external initializers of ``model_path`` (one data file); return the index's name, if any."""
    model = onnx.load(str(model_path), load_external_data=False)
    tensors, data_files = [], set()
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).name
        if dtype not in DTYPES:
            raise ValueError(f"{init.name}: dtype {dtype} cannot be indexed")
        data_files.add(info["location"])
        offset, length = int(info.get("offset", 0)), int(info["length"])
        tensors.append({"name": init.name, "offset": offset, "length": length, "dtype": dtype,
                        "shape": [int(d) for d in init.dims], "sha256": None})
    if len(data_files) > 1:
        raise ValueError(f"{model_path.name}: external weights in several files {sorted(data_files)}")
    if not tensors:
        return None
    data_file = data_files.pop()
    with open(model_path.parent / data_file, "rb") as f:
        for t in tensors:
            f.seek(t["offset"])
            t["sha256"] = hashlib.sha256(f.read(t["length"])).hexdigest()
    rows = ",\n  ".join(json.dumps(t) for t in tensors)  # one tensor per line
    text = f'{{"format": {INDEX_FORMAT}, "data_file": {json.dumps(data_file)}, "tensors": [\n  {rows}\n]}}\n'
    (model_path.parent / INDEX_FILE).write_text(text, encoding="utf-8")
    return INDEX_FILE
