"""Open Inference Protocol v2 (KServe / Triton REST) beside ``/api``, over the same registry and limits.

Invariants:

- ``infer`` takes its body through :func:`intake.read_body` (upload slot, body deadline, size cap) and
  parses through :func:`handlers.run_parse`, the path of ``/api/{version}/parse`` (lease, admission,
  timeout, metrics, shadow). ``{v}`` is what ``/api/{v}/parse`` takes (a version, an alias, ``latest``,
  ``auto``) and resolves through :func:`handlers.choose_version`; without a version the request is routed
  like ``/api/auto/parse``, on the request parameter ``route_key`` when given, else the usual route key.
- Errors are the one mapping of ``server/errors.py``; only the body differs: ``{"error": <public
  reason>, "code": <error code>, "request_id"}`` (the protocol reads ``error``).
- The binary tensor data codec (:func:`decode_request`, :func:`encode_response`) is pure: any body and
  any ``Inference-Header-Content-Length`` give an :class:`InferRequest` or a 400 :class:`HTTPProblem`.
- The model repository extension (index, load, unload) needs the admin bearer token (``server/auth.py``);
  it maps onto the registry's ``load`` / ``unload``; a version the server keeps loaded (pinned: ``latest``,
  an alias target, a routed or preloaded version) is not unloaded (409).

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
import logging
import re
import struct
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from aiohttp import web

from m2fpkit.runtime.bundle import jsonfile
from m2fpkit.runtime.bundle.store import MODEL
from m2fpkit.runtime.errors import MalformedFile, VersionUnavailable
from m2fpkit.runtime.predictor import ImageLimits, Predictor

from . import keys
from .auth import require_bearer
from .errors import HTTPProblem, error_body, public_reason
from .handlers import choose_version, run_parse
from .intake import read_body
from .render import predicted
from .render import summary as answer_summary

log = logging.getLogger(__name__)

PREFIX = "/v2"
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data", "model_repository")
INPUT = "image"
#: output → (datatype, shape) as the model metadata lists them (-1: the image's size)
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "label_map": ("INT32", [-1, -1]), "person_map": ("INT32", [-1, -1]), "instances": ("BYTES", [1])}
#: outputs a single-human version does not produce
MULTI_HUMAN_ONLY = frozenset({"person_map"})
#: a route key given as a request parameter (as the route key header allows: visible text, bounded)
MAX_ROUTE_KEY = 256
MAX_ID = 256
#: a repository request body is one small JSON object
MAX_REPOSITORY_BODY = 64 << 10
_BYTE_COUNT = re.compile(r"[0-9]{1,15}")
_UINT32 = struct.Struct("<I")
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})


# ------------------------------------------------------------------------------------ codec
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


@dataclass(frozen=True)
class Tensor:
    """One output: ``INT32`` with a numpy array, or ``BYTES`` with one element."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | bytes


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
    """Parse an inference request (JSON, or JSON + binary data); a 400 naming the problem otherwise."""
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
        id=_text(doc.get("id", MISSING), "id", MAX_ID),
        outputs=_outputs(doc.get("outputs", MISSING)),
        binary_output=bool(_flag(params, "binary_data_output", "parameters")),
        route_key=_text(params.get("route_key", MISSING), "parameters → route_key", MAX_ROUTE_KEY),
    )


def _tensor_bytes(t: Tensor) -> bytes:
    if isinstance(t.data, bytes):
        return pack_bytes(t.data)
    return np.ascontiguousarray(t.data, dtype="<i4").tobytes()


def _tensor_json(t: Tensor) -> list[Any]:
    if isinstance(t.data, bytes):
        return [t.data.decode("utf-8")]
    return t.data.ravel().tolist()


def encode_response(request: InferRequest, version: str, tensors: list[Tensor],
                    parameters: dict[str, Any]) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary data follows it, else None) for the outputs asked for (those
    the version does not produce are left out, as its model metadata says)."""
    by_name = {t.name: t for t in tensors}
    wanted = request.outputs or tuple(RequestedOutput(t.name) for t in tensors)
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in wanted:
        t = by_name.get(out.name)
        if t is None:  # not produced by this version (person_map of a single-human one): left out
            continue
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if request.binary_output if out.binary is None else out.binary:
            raw = _tensor_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _tensor_json(t)
        entries.append(entry)
    head: dict[str, Any] = {"model_name": MODEL, "model_version": version, "outputs": entries,
                            "parameters": parameters}
    if request.id is not None:
        head["id"] = request.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


# ------------------------------------------------------------------------------- the model
def outputs_of(task: str | None) -> list[str]:
    """The outputs a version of ``task`` produces (every output when unknown)."""
    return [n for n in OUTPUTS if task != "single-human" or n not in MULTI_HUMAN_ONLY]


def render(predictor: Predictor, data: bytes, limits: ImageLimits) -> dict[str, Any]:
    """Decode, predict and build the output tensors (the worker thread's part of an ``infer``); timed in ms."""
    _, pred = predicted(predictor, data, limits)
    timings = pred.timings
    t1 = time.perf_counter()
    res = pred.result
    hw = res.hw
    tensors = [Tensor("label_map", "INT32", hw, res.label_map.astype("<i4"))]
    if res.person_map is not None:
        tensors.append(Tensor("person_map", "INT32", hw, res.person_map.astype("<i4")))
    summary = {**answer_summary(predictor, pred), "persons": [
        {"id": p.id, "score": round(float(p.score), 6),
         "parts": [{"label": q.class_name, "score": round(float(q.score), 6)} for q in p.parts]}
        for p in res.persons]}
    tensors.append(Tensor("instances", "BYTES", (1,), json.dumps(summary, separators=(",", ":")).encode()))
    timings["render"] = time.perf_counter() - t1
    return {"tensors": tensors, "timing": {k: round(v * 1000, 2) for k, v in timings.items()}}


# ---------------------------------------------------------------------------------- errors
def handles(request: web.Request) -> bool:
    """True for the protocol's URL space (its errors take the protocol's body)."""
    return request.path == PREFIX or request.path.startswith(PREFIX + "/")


def error_response(request: web.Request, status: int, error: str, detail: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """The error of ``server/errors.py`` in the protocol's shape: ``{"error": <public reason>, "code", …}``."""
    body = error_body(request, status, error, detail)
    return web.json_response({"error": body["detail"], "code": body["error"], "request_id": body["request_id"]},
                             status=status, headers=headers)


def _model(request: web.Request) -> None:
    name = request.match_info["model"]
    if name != MODEL:
        raise HTTPProblem(404, "unknown_model", f"no model named {jsonfile.brief(name, 60)}; this server "
                                                f"serves {MODEL!r}")


def _not_ready(detail: str) -> web.Response:
    """The protocol's "false" of a readiness probe: a 4xx status — 409, the state conflicts — with the reason."""
    return web.json_response({"ready": False, "error": detail}, status=409)


# -------------------------------------------------------------------------------- handlers
async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    """Ready once a version answers (as ``/readyz``)."""
    snapshot = request.app[keys.REGISTRY].status()
    if not snapshot.ready():
        return _not_ready("no versions yet" if not snapshot.versions else "no version is ready")
    return web.json_response({"ready": True})


async def server_metadata(request: web.Request) -> web.Response:
    try:
        version = metadata.version("m2fpkit")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout that is not installed
        version = "unknown"
    return web.json_response({"name": "m2fp-serve", "version": version, "extensions": list(EXTENSIONS)})


def _tensor_metadata(names: list[str]) -> list[dict[str, Any]]:
    return [{"name": n, "datatype": OUTPUTS[n][0], "shape": OUTPUTS[n][1]} for n in names]


async def model_metadata(request: web.Request) -> web.Response:
    """Every listed version (no version given), or the one ``{v}`` resolves to; inputs and outputs."""
    _model(request)
    registry = request.app[keys.REGISTRY]
    name = request.match_info.get("version")
    if name is None:
        versions, task = registry.versions(), None
    else:
        version, _rule = choose_version(request, name)
        cfg = registry.config(version)
        versions, task = [version], cfg.task if cfg else None
    body = {"name": MODEL, "versions": versions, "platform": "onnxruntime",
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [1]}],
            "outputs": _tensor_metadata(outputs_of(task))}
    headers = {"X-Model-Version": versions[0]} if name is not None else None
    return web.json_response(body, headers=headers)


async def model_ready(request: web.Request) -> web.Response:
    """200 when the version ``{v}`` resolves to (else the one an unversioned ``infer`` reaches) is loaded."""
    _model(request)
    version, _rule = choose_version(request, request.match_info.get("version", "auto"))
    if not request.app[keys.REGISTRY].is_ready(version):
        return _not_ready(f"version {version} is not loaded")
    return web.json_response({"name": MODEL, "version": version, "ready": True},
                             headers={"X-Model-Version": version})


async def infer(request: web.Request) -> web.Response:
    _model(request)
    name = request.match_info.get("version")
    if name is not None:  # fail fast on bad names, before the body is read
        request[keys.VERSION], request[keys.RULE] = choose_version(request, name)
    body = await read_body(request)  # bounded: upload slot, body deadline, size cap (server/intake.py)
    req = decode_request(body, request.headers.get(HEADER_LENGTH))
    del body
    if name is None:
        request[keys.VERSION], request[keys.RULE] = choose_version(request, "auto", req.route_key)
    version, rule = request[keys.VERSION], request[keys.RULE]
    result = await run_parse(request, req.image, render)
    payload, header_length = encode_response(req, version, result["tensors"],
                                             {"route": rule, "request_id": request[keys.REQUEST_ID]})
    headers = {"X-Model-Version": version, "X-Route-Rule": rule}
    if header_length is None:
        return web.Response(body=payload, headers=headers, content_type="application/json")
    headers[HEADER_LENGTH] = str(header_length)
    return web.Response(body=payload, headers=headers, content_type="application/octet-stream")


# ----------------------------------------------------------------------------- repository
def _authorize(request: web.Request) -> None:
    require_bearer(request, request.app[keys.CONFIG].admin_token, realm="m2fp-admin",
                   disabled=("admin_disabled", "the model repository extension is disabled "
                                               "(start with --admin-token)"))


async def _repository_body(request: web.Request) -> dict[str, Any]:
    """The small JSON object of a repository request ({} when empty)."""
    data = await request.read()
    if not data.strip():
        return {}
    try:
        doc = jsonfile.loads(data, "request body", max_bytes=MAX_REPOSITORY_BODY)
    except MalformedFile as exc:
        raise HTTPProblem(400, "bad_json", f"the body must be a JSON object: {exc.reason}") from None
    if not isinstance(doc, dict):
        raise HTTPProblem(400, "bad_json", "the body must be a JSON object")
    return doc


def _version_parameter(request: web.Request, doc: dict[str, Any]) -> str | None:
    """The version a load/unload names: ``parameters.version`` in the body, else the ``version`` query."""
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise HTTPProblem(400, "bad_json", "parameters: expected a JSON object")
    if not isinstance(params.get("unload_dependents", False), bool):
        raise HTTPProblem(400, "bad_json", "parameters → unload_dependents: expected true or false")
    given = params.get("version", request.query.get("version"))
    if ("version" in params and given is None) or (given is not None and not isinstance(given, str)):
        raise HTTPProblem(400, "bad_json", "parameters → version: expected a version or alias name")
    return given


async def repository_index(request: web.Request) -> web.Response:
    """Every listed version: ``{"name", "version", "state": READY|LOADING|UNAVAILABLE, "reason"}``."""
    _authorize(request)
    doc = await _repository_body(request)
    only_ready = doc.get("ready", False)
    if not isinstance(only_ready, bool):  # null too
        raise HTTPProblem(400, "bad_json", "ready: expected true or false")
    rows = []
    for s in request.app[keys.REGISTRY].status().versions:
        state = "READY" if s.loaded else "LOADING" if s.state.value == "loading" else "UNAVAILABLE"
        if only_ready and state != "READY":
            continue
        reason = "" if s.reason is None else public_reason(s.reason)
        rows.append({"name": MODEL, "version": s.version, "state": state, "reason": reason})
    return web.json_response(rows)


async def repository_load(request: web.Request) -> web.Response:
    """Load the version named (``parameters.version`` / ``?version=``; default ``latest``)."""
    _authorize(request)
    _model(request)
    doc = await _repository_body(request)
    registry = request.app[keys.REGISTRY]
    name = _version_parameter(request, doc)
    version = await registry.load("latest" if name is None else name)
    if not registry.is_ready(version):
        raise VersionUnavailable(f"{version} did not load")
    return web.json_response({"name": MODEL, "version": version, "state": "READY"})


async def repository_unload(request: web.Request) -> web.Response:
    """Unload the version named, or every loaded version the server does not keep loaded (pinned ones:
    ``latest``, alias targets, routed and preloaded versions — unloading one of those by name is 409)."""
    _authorize(request)
    _model(request)
    doc = await _repository_body(request)
    registry = request.app[keys.REGISTRY]
    name = _version_parameter(request, doc)
    pinned = registry.pinned()
    if name is not None:
        version = registry.resolve(name)
        if version in pinned:
            raise HTTPProblem(409, "pinned", f"{version} is kept loaded (latest, an alias target, routed or "
                                             "preloaded); change the routes or aliases first")
        targets = [version]
    else:
        targets = [s.version for s in registry.status().versions if s.loaded and s.version not in pinned]
    for version in targets:
        await registry.unload(version)
    return web.json_response({"name": MODEL, "unloaded": targets})


def setup(app: web.Application) -> None:
    """Register the protocol's routes (``/v2``, ``/v2/health/*``, ``/v2/models/m2fp[/versions/{v}]/…``,
    ``/v2/repository/…``)."""
    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(base, model_metadata)
        r.add_get(base + "/ready", model_ready)
        r.add_post(base + "/infer", infer)
    r.add_post("/v2/repository/index", repository_index)
    r.add_post("/v2/repository/models/{model}/load", repository_load)
    r.add_post("/v2/repository/models/{model}/unload", repository_unload)
