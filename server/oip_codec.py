"""The Open Inference Protocol's tensor codec for the model ``m2fp``: pure functions, no aiohttp handler.

Invariants:

- :func:`decode_request` takes any body and any ``Inference-Header-Content-Length`` and gives an
  :class:`InferRequest` or an :class:`HTTPProblem`: 400 ``bad_infer_request`` naming the problem, or 413
  ``infer_header_too_large`` when the JSON header of a binary-extension request (the header length given)
  is over :data:`MAX_HEADER_BYTES` (64 KiB, the cap of the server's admin bodies). A JSON-only request (no
  header length) carries the image as base64 text inside the JSON: it may be as long as the body limit.
  Both parse in an executor thread (the caller's duty; they take milliseconds per MB).
- :func:`encode_response` builds only the outputs asked for, holds each tensor once (binary data are views
  of the int32 arrays, never joined into one buffer), and writes JSON numbers in slices of
  :data:`JSON_SLICE` elements (no Python list of the whole map, no single call holding the GIL for long).
- :func:`output_bound` is what an output can weigh, from its shape alone: exact for binary data (4 bytes a
  pixel), an upper bound for JSON (digits of the largest possible id, plus a comma); callers check it
  against their caps before any inference.

The model ``m2fp``: input ``image``, ``BYTES`` ``[1]``, one encoded image (as OpenVINO Model Server takes
encoded images) — binary (4-byte little-endian length, then the file's bytes) or, in JSON, its base64
text. Outputs: ``label_map`` ``INT32`` ``[H, W]`` (class ids at the image's size, those of
``/api/{v}/parse?include=label_map``), ``person_map`` ``INT32`` ``[H, W]`` (person ids, 0 = nobody;
multi-human versions only: asked of a single-human version, it is left out of the response) and
``instances`` ``BYTES`` ``[1]``: one JSON text with ``version``, ``task``, ``labels``, ``scores``
(ModelScope's lists), ``classes_present`` and ``persons`` (id, score, parts).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m2fpkit.runtime.bundle import jsonfile
from m2fpkit.runtime.bundle.store import MODEL
from m2fpkit.runtime.errors import MalformedFile

from .errors import HTTPProblem

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT = "image"
#: output → (datatype, shape) as the model metadata lists them (-1: the image's size)
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "label_map": ("INT32", [-1, -1]), "person_map": ("INT32", [-1, -1]), "instances": ("BYTES", [1])}
#: outputs a single-human version does not produce
MULTI_HUMAN_ONLY = frozenset({"person_map"})
#: outputs of shape [H, W]: their size grows with the image
MAPS = ("label_map", "person_map")
#: largest id a map holds (label_map: the version's classes, uint8; person_map: uint16)
MAX_ID = {"label_map": 255, "person_map": 65535}
#: the JSON header of a binary-extension request, at most (as the server's admin JSON bodies)
MAX_HEADER_BYTES = 64 << 10
#: room for everything of a reply but its maps: the JSON header and the ``instances`` text
REPLY_SLACK = 16 << 10
#: JSON numbers written per slice
JSON_SLICE = 1 << 16
#: a route key given as a request parameter (as the route key header allows: visible text, bounded)
MAX_ROUTE_KEY = 256
MAX_REQUEST_ID = 256
_BYTE_COUNT = re.compile(r"[0-9]{1,15}")
_UINT32 = struct.Struct("<I")
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    #: True: binary data; False: JSON; None: the request's ``binary_data_output``
    binary: bool | None = None


@dataclass(frozen=True)
class InferRequest:
    """An inference request as this server uses it: the one image and how to answer."""

    image: bytes
    id: str | None = None
    #: empty: every output the version produces
    outputs: tuple[RequestedOutput, ...] = ()
    binary_output: bool = False
    route_key: str | None = None

    def chosen(self, produced: Sequence[str]) -> list[tuple[str, bool]]:
        """(name, binary) of each output to send, in the order asked: those named (else every one the
        version produces), less those it does not produce."""
        wanted = self.outputs or tuple(RequestedOutput(n) for n in produced)
        return [(o.name, self.binary_output if o.binary is None else o.binary) for o in wanted if o.name in produced]


@dataclass(frozen=True)
class Tensor:
    """One output: ``INT32`` with a numpy array, or ``BYTES`` with one element."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | bytes


@dataclass(frozen=True)
class EncodedReply:
    """A response body as the buffers to send in order (views, not copies), and its JSON header's length
    when binary data follow it."""

    chunks: tuple[bytes | memoryview, ...]
    header_length: int | None

    @property
    def size(self) -> int:
        return sum(memoryview(c).nbytes for c in self.chunks)


def bad_request(detail: str) -> HTTPProblem:
    return HTTPProblem(400, "bad_infer_request", detail)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) by ``Inference-Header-Content-Length`` (absent: all of it is JSON)."""
    if header_length is None:
        return body, b""
    value = header_length.strip()
    if not _BYTE_COUNT.fullmatch(value):
        raise bad_request(f"{HEADER_LENGTH}: expected a byte count, got {jsonfile.brief(header_length, 40)}")
    n = int(value)
    if n > len(body):
        raise bad_request(f"{HEADER_LENGTH}: {n} bytes of JSON header announced, the body has {len(body)}")
    if n > MAX_HEADER_BYTES:
        raise HTTPProblem(413, "infer_header_too_large",
                          f"{HEADER_LENGTH}: a JSON header of {n} bytes, more than the limit of {MAX_HEADER_BYTES} "
                          "bytes; send the image as binary data after the header (or the whole request as JSON)")
    return body[:n], body[n:]


#: a key that is not there (``null`` is a value, refused where another type is expected)
MISSING: Any = object()


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is MISSING:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where}: expected a JSON object")
    return value


def _flag(params: dict[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key, MISSING)
    if value is MISSING:
        return None
    if not isinstance(value, bool):
        raise bad_request(f"{where} → {key}: expected true or false, got {jsonfile.brief(value, 40)}")
    return value


def _text(value: Any, where: str, limit: int) -> str | None:
    if value is MISSING:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise bad_request(f"{where}: expected a string of 1 to {limit} characters")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{where}: expected a byte count (integer ≥ 0), got {jsonfile.brief(value, 40)}")
    return value


def unpack_bytes(raw: bytes, where: str) -> bytes:
    """The one element of a binary ``BYTES`` tensor of shape [1]: a 4-byte little-endian length, the bytes."""
    if len(raw) < _UINT32.size:
        raise bad_request(f"{where}: {len(raw)} bytes of binary data, less than the 4-byte element length")
    (n,) = _UINT32.unpack_from(raw)
    if _UINT32.size + n != len(raw):
        raise bad_request(f"{where}: the element announces {n} bytes, the binary data holds "
                          f"{len(raw) - _UINT32.size} after its length (shape [1] is one element)")
    return raw[_UINT32.size:]


def pack_bytes(element: bytes) -> bytes:
    return _UINT32.pack(len(element)) + element


def _json_image(data: Any, where: str) -> bytes:
    """The image of a JSON ``BYTES`` input: one base64 string, flat (``["…"]``) or nested (``[["…"]]``)."""
    while isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], str):
        raise bad_request(f"{where} → data: expected one string (the image, base64), shape [1]")
    try:
        return base64.b64decode(data[0], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} → data: the image must be base64 text in JSON "
                          "(or send it as binary data)") from None


def _image(inputs: Any, binary: bytes) -> bytes:
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request(f"inputs: expected exactly one input, {INPUT!r}")
    inp, where = inputs[0], f"inputs → {INPUT}"
    if inp.get("name") != INPUT:
        raise bad_request(f"inputs → name: expected {INPUT!r}, got {jsonfile.brief(inp.get('name'), 40)}")
    if inp.get("datatype") != "BYTES":
        raise bad_request(f"{where} → datatype: expected 'BYTES', got {jsonfile.brief(inp.get('datatype'), 40)}")
    shape = inp.get("shape")
    if not isinstance(shape, list) or shape != [1] or isinstance(shape[0], bool):
        raise bad_request(f"{where} → shape: expected [1] (one encoded image), got {jsonfile.brief(shape, 40)}")
    params = _object(inp.get("parameters", MISSING), f"{where} → parameters")
    size = params.get("binary_data_size", MISSING)
    if size is MISSING:
        if binary:
            raise bad_request(f"{len(binary)} bytes of binary data follow the JSON header, but the input "
                              "declares no binary_data_size")
        if "data" not in inp:
            raise bad_request(f"{where}: no data and no binary_data_size")
        return _json_image(inp["data"], where)
    size = _count(size, f"{where} → parameters → binary_data_size")
    if "data" in inp:
        raise bad_request(f"{where}: both data and binary_data_size given")
    if size != len(binary):
        raise bad_request(f"{where} → parameters → binary_data_size: {size} bytes declared, "
                          f"{len(binary)} bytes of binary data follow the JSON header")
    return unpack_bytes(binary, f"{where} (binary data)")


def _outputs(value: Any) -> tuple[RequestedOutput, ...]:
    if value is MISSING:
        return ()
    if not isinstance(value, list) or len(value) > len(OUTPUTS):
        raise bad_request(f"outputs: expected a list of at most {len(OUTPUTS)} outputs")
    out: list[RequestedOutput] = []
    for n, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] not in OUTPUTS:
            raise bad_request(f"outputs → {n}: expected {{\"name\": …}} naming one of {', '.join(OUTPUTS)}")
        name = item["name"]
        params = _object(item.get("parameters", MISSING), f"outputs → {name} → parameters")
        flag = _flag(params, "binary_data", f"outputs → {name} → parameters")
        if all(o.name != name for o in out):  # named twice: answered once, as first asked
            out.append(RequestedOutput(name, flag))
    return tuple(out)


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an inference request (JSON, or JSON + binary data); a 400 (or 413, see above) naming the problem."""
    header, binary = split_body(body, header_length)
    try:
        doc = jsonfile.loads(header, "inference request", max_bytes=max(1, len(header)))
    except MalformedFile as exc:
        raise bad_request(f"the inference request (its JSON header) is unusable: {exc.reason}") from None
    if not isinstance(doc, dict):
        raise bad_request("the inference request must be a JSON object")
    unknown = sorted(set(doc) - _REQUEST_KEYS)
    if unknown:
        raise bad_request(f"unknown key {jsonfile.brief(unknown[0], 40)} (expected {', '.join(sorted(_REQUEST_KEYS))})")
    params = _object(doc.get("parameters", MISSING), "parameters")
    return InferRequest(
        image=_image(doc.get("inputs", MISSING), binary),
        id=_text(doc.get("id", MISSING), "id", MAX_REQUEST_ID),
        outputs=_outputs(doc.get("outputs", MISSING)),
        binary_output=bool(_flag(params, "binary_data_output", "parameters")),
        route_key=_text(params.get("route_key", MISSING), "parameters → route_key", MAX_ROUTE_KEY),
    )


# ------------------------------------------------------------------------------------ output
def output_bound(name: str, binary: bool, pixels: int) -> int:
    """Bytes output ``name`` can take for an image of ``pixels`` pixels (0 for ``instances``, which
    :data:`REPLY_SLACK` covers): binary 4 a pixel, JSON the digits of :data:`MAX_ID` plus a comma."""
    if name not in MAPS:
        return 0
    return pixels * (4 if binary else len(str(MAX_ID[name])) + 1)


def _json_ints(data: np.ndarray) -> Iterator[bytes]:
    """The numbers of a map, comma-separated, row-major, a slice at a time."""
    flat = data.reshape(-1)
    for i in range(0, flat.size, JSON_SLICE):
        text = ",".join(map(str, flat[i:i + JSON_SLICE].tolist()))
        yield (b"," if i else b"") + text.encode("ascii")


def _binary(t: Tensor) -> memoryview:
    if isinstance(t.data, bytes):
        return memoryview(pack_bytes(t.data))
    return np.ascontiguousarray(t.data, dtype="<i4").data.cast("B")


def _entry(t: Tensor) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def encode_response(request: InferRequest, version: str, tensors: list[Tensor],
                    parameters: dict[str, Any]) -> EncodedReply:
    """The response to ``request``: its outputs in the order asked, each as binary data or JSON as asked
    (outputs the version does not produce — not in ``tensors`` — are left out, as its metadata says)."""
    by_name = {t.name: t for t in tensors}
    head: dict[str, Any] = {"model_name": MODEL, "model_version": version, "parameters": parameters}
    if request.id is not None:
        head["id"] = request.id
    text: list[bytes] = [json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"outputs":[']
    binary: list[memoryview] = []
    for name, as_binary in request.chosen(list(by_name)):
        t = by_name[name]
        entry = _entry(t)
        if len(text) > 1:
            text.append(b",")
        if as_binary:
            raw = _binary(t)
            entry["parameters"] = {"binary_data_size": raw.nbytes}
            text.append(json.dumps(entry, separators=(",", ":")).encode())
            binary.append(raw)
        else:
            text.append(json.dumps(entry, separators=(",", ":")).encode()[:-1] + b',"data":[')
            if isinstance(t.data, bytes):
                text.append(json.dumps(t.data.decode("utf-8")).encode())
            else:
                text.extend(_json_ints(t.data))
            text.append(b"]}")
    text.append(b"]}")
    header_length = sum(len(c) for c in text) if binary else None
    return EncodedReply((*text, *binary), header_length)
