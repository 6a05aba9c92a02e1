"""``POST /api/compare?versions=v1.0,v1.2``: one image through several versions, and how far they agree.

Invariants:

* ``versions`` is untrusted text, accepted exactly when it matches :data:`VERSIONS_PATTERN` (the OpenAPI
  document's): 2..:data:`MAX_VERSIONS` names, comma-separated, no spaces, at most :data:`MAX_QUERY`
  characters, each name valid as a parse route's path name; anything else is 400 (``bad_parameter``, or
  ``invalid_version_name`` naming the position). A name given twice, and names that stand for the same
  version (``latest`` and ``v1.2``), are merged: that version runs once and lists every name that chose it.
  Fewer than two distinct versions after merging is 409 ``same_version`` (it depends on where aliases point).
* Every version is chosen and run through the parse route's own path (:func:`handlers.choose_version` with
  the client's API filter, one :func:`intake.read_image`, :func:`handlers.run_parse`: lease, admission,
  request timeout, metrics), one version after the other, so their latencies are comparable and a compare
  holds one worker at a time.
* Agreement is computed on label maps at the original image size, by class *name* (two versions may number
  their classes differently): :func:`m2fpkit.runtime.agreement.by_class_name`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import itertools
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from aiohttp import web

from m2fpkit.runtime.agreement import by_class_name
from m2fpkit.runtime.bundle.jsonfile import brief
from m2fpkit.runtime.bundle.versions import ALIAS_PATTERN, VERSION_PATTERN, check_name
from m2fpkit.runtime.errors import InvalidVersionName
from m2fpkit.runtime.predictor import ImageLimits, Predictor

from . import handlers, keys, render, replies
from .errors import HTTPProblem
from .intake import read_image

#: most versions one compare may run (each is a full parse)
MAX_VERSIONS = 8
#: longest ``versions`` value accepted
MAX_QUERY = 512
#: what ``versions`` accepts, as the OpenAPI document states it (2..MAX_VERSIONS names, no spaces); a test
#: checks that :func:`parse_versions` accepts exactly these strings
_NAME = f"(?:{VERSION_PATTERN}|{ALIAS_PATTERN})"
VERSIONS_PATTERN = rf"^{_NAME}(?:,{_NAME}){{1,{MAX_VERSIONS - 1}}}$"


def bad(detail: str) -> HTTPProblem:
    return HTTPProblem(400, "bad_parameter", f"versions: {detail}")


def parse_versions(raw: Sequence[str]) -> list[str]:
    """The names of a ``versions`` query (every value given, each a comma-separated list), validated.

    Accepts exactly what :data:`VERSIONS_PATTERN` describes (the OpenAPI document's pattern) and returns the
    distinct names in the order given; raises :class:`HTTPProblem` (400 ``bad_parameter``) or
    :class:`InvalidVersionName` (400 ``invalid_version_name``) naming the problem."""
    if not raw or not any(raw):
        raise bad("give two or more version names or aliases, comma-separated (e.g. versions=v1.0,v1.2)")
    text = ",".join(raw)
    if len(text) > MAX_QUERY:
        raise bad(f"longer than {MAX_QUERY} characters")
    items = text.split(",")
    if len(items) > MAX_VERSIONS:
        raise bad(f"{len(items)} names; at most {MAX_VERSIONS} versions can be compared at once")
    if len(items) < 2:
        raise bad(f"only {brief(items[0], 40)}: give two or more versions, comma-separated")
    for i, name in enumerate(items, 1):
        if not name:
            raise bad(f"name {i} is empty (a stray comma?)")
        try:
            check_name(name)
        except InvalidVersionName as exc:
            raise InvalidVersionName(f"versions: name {i}: {exc}") from None
    return list(dict.fromkeys(items))


def decode_label_map(b64: str) -> np.ndarray:
    """The label map of a parse body (``include=label_map``: base64 8-bit PNG of class ids)."""
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2:
        raise RuntimeError("a parse body's label map does not decode")
    return img


def render_keeping_map(opts: render.RenderOptions, kept: list[tuple[np.ndarray, tuple[str, ...]]],
                       predictor: Predictor, data: bytes, limits: ImageLimits) -> dict[str, Any]:
    """:func:`render.parse` with the label map, which is also kept (decoded, with the classes of the
    predictor that ran) in ``kept`` for the agreement; on the inference pool."""
    body = render.parse(predictor, data, limits, dataclasses.replace(opts, include=opts.include | {"label_map"}))
    kept.append((decode_label_map(body["label_map"]), predictor.config.classes))
    if "label_map" not in opts.include:
        del body["label_map"]
    return body


def pairwise(results: list[dict[str, Any]], maps: list[np.ndarray], classes: list[tuple[str, ...]]) -> list[dict]:
    """Agreement of every pair of versions, in request order (runs on the inference pool: CPU work)."""
    out = []
    for i, j in itertools.combinations(range(len(results)), 2):
        out.append({"a": results[i]["version"], "b": results[j]["version"],
                    **by_class_name(maps[i], classes[i], maps[j], classes[j])})
    return out


# ---------------------------------------------------------------------------------------- handler
async def compare(request: web.Request) -> web.StreamResponse:
    registry = request.app[keys.REGISTRY]
    names = parse_versions(request.query.getall("versions", []))
    opts = handlers.render_options(request)
    chosen: dict[str, tuple[str, list[str]]] = {}  # version → (rule, names that chose it), in request order
    for name in names:  # fail fast on bad or unknown names, before any body byte is read
        version, rule = handlers.choose_version(request, name)
        chosen.setdefault(version, (rule, []))[1].append(name)
    if len(chosen) < 2:
        raise HTTPProblem(409, "same_version", f"{', '.join(names)} all stand for {next(iter(chosen))} now: "
                                               "nothing to compare; give two or more different versions")
    request[keys.VERSION], request[keys.RULE] = ",".join(chosen), "compare"
    data = await read_image(request)  # bounded: upload slot, body deadline, size cap (server/intake.py)
    results: list[dict[str, Any]] = []
    kept: list[tuple[np.ndarray, tuple[str, ...]]] = []
    for version, (rule, requested) in chosen.items():
        t0 = time.perf_counter()
        body = await handlers.run_parse(request, version, rule, data, functools.partial(render_keeping_map, opts, kept))
        latency = (time.perf_counter() - t0) * 1000
        results.append({**body, "route": rule, "request_id": request[keys.REQUEST_ID], "requested": requested,
                        "latency_ms": round(latency, 2)})
    pairs = await registry.run_in_executor(pairwise, results, [m for m, _ in kept], [c for _, c in kept])
    del kept
    return await replies.json_reply(request, {"success": True, "request_id": request[keys.REQUEST_ID],
                                              "image": results[0]["image"], "versions": list(chosen),
                                              "results": results, "agreement": pairs},
                                    {"X-Model-Version": ",".join(chosen), "X-Route-Rule": "compare"},
                                    "the compare reply (every version's parse)")
