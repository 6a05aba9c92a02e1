"""Open Inference Protocol v2 (KServe / Triton REST) beside ``/api``, over the same registry and limits: the
aiohttp handlers (the tensor codec is ``server/oip_codec.py``, which also describes the model ``m2fp``).

Invariants:

- ``infer`` takes its body through :func:`intake.read_body` (upload slot, body deadline, size cap), parses it
  off the event loop (:func:`oip_codec.decode_request`: a binary-extension request's JSON header is capped at
  64 KiB, a JSON-only request's embedded image at the body limit), and runs through
  :func:`handlers.run_parse`, the path of ``/api/{version}/parse`` (lease, admission, timeout, metrics,
  shadow). ``{v}`` is what ``/api/{v}/parse`` takes (a version, an alias, ``latest``, ``auto``) and
  resolves through :func:`handlers.choose_version`; without a version the request is routed like
  ``/api/auto/parse``, on the request parameter ``route_key`` when given, else the usual route key.
- Before inference, the outputs asked for are sized from the image header (``server/replies.py``): JSON
  outputs over ``--max-json-output-mb`` and replies over ``--max-reply-mb`` are 413, replies that would
  put too many bytes in flight 503; the worker then builds and encodes only those outputs, and the reply
  is sent under the write deadline.
- Errors are the one mapping of ``server/errors.py``; only the body differs: ``{"error": <public
  reason>, "code": <error code>, "request_id"}`` (the protocol reads ``error``).
- The model repository extension (index, load, unload) needs the admin bearer token (``server/auth.py``);
  it maps onto the registry's ``load`` / ``unload``; a version the server keeps loaded (pinned: ``latest``,
  an alias target, a routed or preloaded version) is not unloaded (409).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from importlib import metadata
from typing import Any

from aiohttp import web

from m2fpkit.runtime.bundle import jsonfile
from m2fpkit.runtime.bundle.store import MODEL
from m2fpkit.runtime.errors import InputError, MalformedFile, VersionUnavailable
from m2fpkit.runtime.imageio import probe
from m2fpkit.runtime.predictor import ImageLimits, Predictor

from . import keys, oip_codec, replies
from .auth import require_bearer
from .errors import HTTPProblem, error_body, public_reason
from .handlers import choose_version, readiness, run_parse
from .intake import read_body
from .oip_codec import HEADER_LENGTH, INPUT, MULTI_HUMAN_ONLY, OUTPUTS, InferRequest, Tensor
from .render import persons, predicted
from .render import summary as answer_summary

log = logging.getLogger(__name__)

PREFIX = "/v2"
EXTENSIONS = ("binary_tensor_data", "model_repository")
#: a repository request body is one small JSON object
MAX_REPOSITORY_BODY = 64 << 10


# ------------------------------------------------------------------------------- the model
def outputs_of(task: str | None) -> list[str]:
    """The outputs a version of ``task`` produces (every output when unknown)."""
    return [n for n in OUTPUTS if task != "single-human" or n not in MULTI_HUMAN_ONLY]


def render(request: InferRequest, version: str, names: frozenset[str], parameters: dict[str, Any],
           predictor: Predictor, data: bytes, limits: ImageLimits) -> dict[str, Any]:
    """Decode, predict, build the outputs in ``names`` (no other) and encode the reply: the worker thread's
    part of an ``infer``; timed in ms."""
    _, pred = predicted(predictor, data, limits)
    timings = pred.timings
    t1 = time.perf_counter()
    res = pred.result
    tensors = []
    if "label_map" in names:
        tensors.append(Tensor("label_map", "INT32", res.hw, res.label_map.astype("<i4")))
    if "person_map" in names and res.person_map is not None:
        tensors.append(Tensor("person_map", "INT32", res.hw, res.person_map.astype("<i4")))
    if "instances" in names:
        summary = {**answer_summary(predictor, pred), "persons": persons(res)}
        tensors.append(Tensor("instances", "BYTES", (1,), json.dumps(summary, separators=(",", ":")).encode()))
    reply = oip_codec.encode_response(request, version, tensors, parameters)
    timings["render"] = time.perf_counter() - t1
    return {"reply": reply, "timing": {k: round(v * 1000, 2) for k, v in timings.items()}}


def _decoded(body: bytes, header_length: str | None) -> tuple[InferRequest, int | None]:
    """The request and its image's pixels by its header (None when the header does not say: the parse will
    refuse the image with the error ``/api`` gives); off the event loop."""
    req = oip_codec.decode_request(body, header_length)
    try:
        return req, probe(req.image).pixels
    except InputError:
        return req, None


def _reserve(request: web.Request, outputs: list[tuple[str, bool]], pixels: int | None) -> replies.Lease:
    """A lease on what the outputs asked for can weigh (``oip_codec.output_bound``), or 413/503."""
    cfg = request.app[keys.CONFIG]
    if pixels is None or pixels > cfg.runtime.limits.max_pixels:  # the parse refuses it first
        pixels = 0
    sizes = [(name, binary, oip_codec.output_bound(name, binary, pixels)) for name, binary in outputs]
    as_json = [(name, size) for name, binary, size in sizes if not binary and size]
    json_total = sum(size for _, size in as_json)
    if json_total > cfg.max_json_output_bytes:
        cap = cfg.max_json_output_bytes
        raise HTTPProblem(413, "json_output_too_large",
                          f"{' and '.join(n for n, _ in as_json)} as JSON could take {json_total} bytes for this "
                          f"{pixels}-pixel image, more than the limit of {cap} bytes for JSON output "
                          f"(--max-json-output-mb {cap / 2**20:g}); ask for binary data instead "
                          "(parameters.binary_data_output = true, or the output's parameters.binary_data = true: "
                          "4 bytes a pixel)")
    what = "the outputs asked for (" + ", ".join(f"{n} {size} bytes" if size else n for n, _, size in sizes) + ")"
    total = sum(size for _, _, size in sizes) + oip_codec.REPLY_SLACK
    return request.app[replies.BUDGET].reserve(replies.client_address(request), total, what)


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
    _, why = readiness(request.app[keys.REGISTRY].status())
    if why is not None:
        return _not_ready(why)
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


async def infer(request: web.Request) -> web.StreamResponse:
    _model(request)
    name = request.match_info.get("version")
    if name is not None:  # fail fast on bad names, before the body is read
        request[keys.VERSION], request[keys.RULE] = choose_version(request, name)
    body = await read_body(request)  # bounded: upload slot, body deadline, size cap (server/intake.py)
    req, pixels = await replies.off_loop(_decoded, body, request.headers.get(HEADER_LENGTH))
    del body
    if name is None:
        request[keys.VERSION], request[keys.RULE] = choose_version(request, "auto", req.route_key)
    version, rule = request[keys.VERSION], request[keys.RULE]
    cfg = request.app[keys.REGISTRY].config(version)
    outputs = req.chosen(outputs_of(cfg.task if cfg else None))
    lease = _reserve(request, outputs, pixels)  # before any inference: 413 / 503
    try:
        parameters = {"route": rule, "request_id": request[keys.REQUEST_ID]}
        renderer = functools.partial(render, req, version, frozenset(n for n, _ in outputs), parameters)
        reply = (await run_parse(request, version, rule, req.image, renderer))["reply"]
        lease.resize(reply.size)
    except BaseException:
        lease.release()
        raise
    headers = {"X-Model-Version": version, "X-Route-Rule": rule}
    if reply.header_length is None:
        return await replies.send(request, lease, reply.chunks, "application/json", headers)
    headers[HEADER_LENGTH] = str(reply.header_length)
    return await replies.send(request, lease, reply.chunks, "application/octet-stream", headers)


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
