"""Every reader of untrusted JSON (and of the routes file's TOML), fed arbitrary bytes and damaged documents.

The property, for each reader: it returns a valid typed result or raises its own typed error —
:class:`MalformedFile` / :class:`BundleError` for bundle files, :class:`SignatureError` for
``manifest.sig``, :class:`RoutesError` for routes; ``BundleStore.read_aliases`` and ``lkg.load`` return
``{}`` / ``None`` and log — never any other exception (no RecursionError, TypeError, OverflowError,
UnicodeEncodeError, …), and what it accepts is usable (finite numbers, names that are names, file names
that can be opened, a config the writer can write back).

Inputs: arbitrary bytes; JSON text built from random values (deep nesting, huge integers,
``NaN``/``Infinity``/``1e400`` literals and look-alike strings, unpaired surrogates, unicode, duplicate
keys written as raw text); and, for every field of a valid document in turn, that document with the
field replaced by a wrong value, deleted, duplicated, renamed or nested 100,000 deep. Derandomized and
bounded: part of every ``pytest`` run, a few seconds.

Also fault 8 of the audit: ``model_file``, ``weights_index`` and the index's ``data_file`` may not name
``manifest.json`` or ``manifest.sig`` (the two files no hash covers).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from m2fpkit.runtime import lkg
from m2fpkit.runtime.bundle import jsonfile, manifest, reader, signature, weights_index
from m2fpkit.runtime.bundle.config import MAX_SIDE, BundleConfig
from m2fpkit.runtime.bundle.store import ALIASES, BundleStore
from m2fpkit.runtime.bundle.versions import is_alias_name, is_version_name
from m2fpkit.runtime.bundle.writer import seal
from m2fpkit.runtime.delivery.install import load_routes_refs
from m2fpkit.runtime.errors import BundleError, MalformedFile, SignatureError
from m2fpkit.runtime.palette import palette_for
from m2fpkit.runtime.routes_file import Routes, RoutesError, Shadow, load_routes, loads_routes

FUZZ = settings(derandomize=True, max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])
PER_FIELD = settings(FUZZ, max_examples=10)
FEW = settings(FUZZ, max_examples=40)

DEEP = 100_000
HEX64 = "0123456789abcdef" * 4


# ============================================================================== valid documents
CLASSES = ["Background", "Hat", "Hair", "Face", "UpperClothes", "Human"]


def valid_config() -> dict[str, Any]:
    return {
        "schema_version": 1, "name": "m2fp", "version": "v1.2", "created_at": "2026-01-01T00:00:00Z",
        "channel": "recommended", "notes": "fuzz", "task": "multi-human", "backbone": "resnet101",
        "num_classes": len(CLASSES), "classes": list(CLASSES), "palette": [list(c) for c in palette_for(CLASSES)],
        "human_class": 5, "num_queries": 20,
        "inputs": [{"name": "image", "dtype": "float32", "shape": [1, 3, "height", "width"]}],
        "outputs": [{"name": "pred_logits", "dtype": "float32", "shape": [1, 20, 7]},
                    {"name": "pred_masks", "dtype": "float32", "shape": [1, 20, "h4", "w4"]}],
        "compatible_api": ["1.0"], "model_file": "model.onnx", "weights_index": "weights.json",
        "preprocess": {"resize": "shortest-edge", "short_edge": 640, "max_size": 1333, "canvas_fill": 128,
                       "interpolation": "bilinear-antialias", "channel_order": "RGB",
                       "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
                       "size_divisibility": 32, "pad_value": 0.0},
        "postprocess": {"topk": 100, "human_score_threshold": 0.1, "part_score_threshold": 0.1,
                        "instance_paste_threshold": 0.5},
        "source": {"kind": "random", "uri": "random:tiny?seed=1", "sha256": HEX64},
        "tools": {"opset": 18}, "parity": {"passed": True}, "architecture": {"parameters": 123},
        "golden": {"image": "golden/image.png", "label_map": "golden/label_map.png", "min_agreement": 0.99},
    }


def valid_single_config() -> dict[str, Any]:
    raw = valid_config()
    raw.update(task="single-human", human_class=None, classes=CLASSES[:5], num_classes=5,
               palette=[list(c) for c in palette_for(CLASSES[:5])])
    raw["preprocess"] = {"resize": "center-canvas", "canvas": [384, 512], "canvas_fill": 128}
    return raw


def valid_manifest() -> dict[str, Any]:
    return {"algorithm": "sha256", "files": {
        "model.onnx": {"size": 1024, "sha256": HEX64}, "model.onnx.data": {"size": 48, "sha256": HEX64},
        "config.json": {"size": 10, "sha256": HEX64}, "golden/image.png": {"size": 0, "sha256": HEX64}}}


def valid_index() -> dict[str, Any]:
    return {"format": 1, "data_file": "model.onnx.data", "tensors": [
        {"name": "a.weight", "offset": 0, "length": 24, "dtype": "float32", "shape": [2, 3], "sha256": HEX64},
        {"name": "a.bias", "offset": 32, "length": 16, "dtype": "int64", "shape": [2], "sha256": HEX64}]}


def valid_signature() -> dict[str, Any]:
    return {"algorithm": "ed25519", "key_id": "0123456789abcdef",
            "signature": base64.b64encode(bytes(range(64))).decode()}


def valid_aliases() -> dict[str, Any]:
    return {"latest": "v1.2", "stable": "v1.0"}


def valid_lkg() -> dict[str, Any]:
    return {"schema": 1, "recorded_at": "2026-11-25T12:00:00Z",
            "versions": {"v1.0": HEX64, "v1.2": HEX64 + "-" + HEX64[:16]},
            "aliases": {"latest": "v1.2"}, "routes": {"weights": {"v1.2": 90, "v1.0": 10}}}


def valid_routes() -> dict[str, Any]:
    return {"weights": {"v1.0": 90, "v1.2": 10.5}, "aliases": {"canary": "v1.2", "stable": "v1.0"},
            "sticky": {"header": "X-Route-Key", "cookie": "m2fp_route"},
            "shadow": {"version": "v2.0-beta", "fraction": 0.25}}


# ==================================================================== documents as raw text
@dataclass(frozen=True)
class Raw:
    """A literal token written as is (``NaN``, ``1e400``, a 5000-digit integer, an unpaired surrogate)."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """An object written pair by pair, so a key may appear twice."""

    items: tuple[tuple[str, Any], ...]


def to_text(value: Any) -> str:
    """JSON text of ``value``; :class:`Raw` and :class:`Pairs` write what ``json.dumps`` never would."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, (dict, Pairs)):
        items = value.items if isinstance(value, Pairs) else value.items()
        return "{" + ", ".join(f"{json.dumps(k)}: {to_text(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_text(v) for v in value) + "]"
    return json.dumps(value)


def to_bytes(value: Any) -> bytes:
    return to_text(value).encode("utf-8")


def toml_value(value: Any) -> str:
    """TOML text of a value (inline arrays and tables; :class:`Raw` tokens as is, null as "")."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return '""'
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    items = value.items if isinstance(value, Pairs) else value.items()
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in items) + "}"


def toml_document(doc: Any) -> str:
    """A routes document as TOML: one ``[table]`` per top-level object, other values as ``key = value``."""
    if not isinstance(doc, (dict, Pairs)):
        return "value = " + toml_value(doc) + "\n"
    items = list(doc.items if isinstance(doc, Pairs) else doc.items())
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in items if not isinstance(v, (dict, Pairs))]
    for k, v in items:
        if isinstance(v, (dict, Pairs)):
            lines.append(f"[{json.dumps(k)}]")
            lines += [f"{json.dumps(kk)} = {toml_value(vv)}"
                      for kk, vv in (v.items if isinstance(v, Pairs) else v.items())]
    return "\n".join(lines) + "\n"


# =================================================================================== strategies
ODD_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "9" * 5000, "-0", "0.0e0",
              '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', '"a\\u0000b"', "1.7976931348623157e308",
              "123456789012345678901234567890", "tru", "nul", '"\\x"', "[1,]", "{,}", '{"a" 1}', "01"]
TOML_TOKENS = ["inf", "-inf", "nan", "+nan", "1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", "0x7fffffff",
               "0o777", "0b101", "1_000", "9" * 5000, "1e400", '"""multi\nline"""', "'literal'", "[1, [2, [3]]]",
               "{a = {b = {c = 1}}}", '"\\ud800"', "1979-02-30", "24:00:00"]
ODD_STRINGS = ["NaN", "nan", "Infinity", "-Infinity", "inf", "1e400", "", " ", "0", "-1", "true", "null",
               "..", "../x", "/etc/passwd", "a/../b", ".hidden", "a//b", "a\\b", "a\x00b", "manifest.json",
               "manifest.sig", "model.onnx", "weights.json", "v1.2", "v2.0-beta", "v١.٢", "latest", "auto",
               "Latest", "x" * 5000, HEX64, HEX64.upper(), "é", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u202e", "\ufeff", "\U0010ffff"]
#: unpaired UTF-16 surrogates: ``st.text()`` never draws them, JSON's ``\\ud800`` escapes make them
SURROGATES = ["\ud800", "a\udc80", "\udfff\ud800", "model\udcff.onnx"]
BIG_NUMBERS = [2 ** 62, 2 ** 63, 2 ** 64, 2 ** 1024, 10 ** 400, -(10 ** 400), -1, 0, 255, 256, 2 ** 40,
               1e308, -1e308, 5e-324, -0.0]
KEYS = ["algorithm", "files", "size", "sha256", "format", "data_file", "tensors", "name", "offset", "length",
        "dtype", "shape", "schema", "schema_version", "versions", "aliases", "routes", "weights", "sticky",
        "shadow", "version", "fraction", "signature", "key_id", "latest", "v1.2", "model.onnx", "task",
        "classes", "palette", "preprocess", "postprocess", "golden"]

odd_text = st.one_of(st.sampled_from(ODD_STRINGS), st.sampled_from(SURROGATES), st.text(max_size=12))
big_numbers = st.one_of(st.sampled_from(BIG_NUMBERS), st.integers(-(10 ** 400), 10 ** 400))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), big_numbers,
                    st.floats(allow_nan=False, allow_infinity=False), odd_text)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    keys = st.one_of(st.sampled_from(KEYS), odd_text)
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        st.lists(st.tuples(st.sampled_from(KEYS[:8]), children), min_size=2, max_size=4)
        .map(lambda kv: Pairs(tuple(kv))),  # keys from a small set: duplicates are likely
    )


json_values = st.recursive(st.one_of(scalars, st.sampled_from(ODD_TOKENS).map(Raw)), _containers, max_leaves=24)
toml_values = st.recursive(st.one_of(scalars, st.sampled_from(TOML_TOKENS).map(Raw)), _containers, max_leaves=16)


def nested(depth: int, kind: str) -> Raw:
    """``depth`` levels of JSON arrays, objects or both, closed or left open."""
    if kind == "arrays":
        return Raw("[" * depth + "]" * depth)
    if kind == "objects":
        return Raw('{"a":' * depth + "1" + "}" * depth)
    if kind == "mixed":
        return Raw('[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2))
    return Raw("[" * depth)  # unterminated


def nested_toml(depth: int, kind: str) -> Raw:
    return Raw("[" * depth + "]" * depth if kind == "arrays" else "{a = " * depth + "1" + "}" * depth)


deep_json = st.builds(nested, st.sampled_from([33, 1000, DEEP]),
                      st.sampled_from(["arrays", "objects", "mixed", "open"]))
deep_toml = st.builds(nested_toml, st.sampled_from([100, 1000, DEEP]), st.sampled_from(["arrays", "tables"]))
any_json = st.one_of(json_values, deep_json)
any_toml = st.one_of(toml_values, deep_toml)


# ----------------------------------------------------------------- one field of a valid document
def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every node of a document: () for the root, then (key, index, …) paths."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


HOW = ["replace", "replace", "replace", "delete", "duplicate", "rename", "deep"]


def mutate(doc: Any, path: tuple, how: str, new: Any, new_key: str = "x", deep: Raw | None = None) -> Any:
    """A copy of ``doc`` with the node at ``path`` replaced / deleted / duplicated / renamed / nested deeply."""
    if not path:
        return Raw("") if how == "delete" else new
    root = json.loads(json.dumps(doc))
    parent = root
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if how == "replace":
        parent[last] = new
    elif how == "deep":
        parent[last] = deep or nested(DEEP, "arrays")
    elif how == "delete":
        del parent[last]
    elif isinstance(parent, dict):  # duplicate or rename: the object is written pair by pair
        items = ([(new_key if k == last else k, v) for k, v in parent.items()] if how == "rename"
                 else [*parent.items(), (last, new)])
        if not path[:-1]:
            return Pairs(tuple(items))
        holder = root
        for k in path[:-2]:
            holder = holder[k]
        holder[path[-2]] = Pairs(tuple(items))
    else:  # duplicate or rename inside a list: one more element
        parent.insert(last, new)
    return root


def mutations(make: Callable[[], Any], values: st.SearchStrategy = any_json) -> st.SearchStrategy:
    """A valid document (from ``make``) with one random field changed in one way."""
    doc = make()
    return st.builds(lambda path, how, new, key: mutate(doc, path, how, new, key),
                     st.sampled_from(list(paths(doc))), st.sampled_from(HOW),
                     st.one_of(scalars, values), odd_text)


def documents(make: Callable[[], Any]) -> st.SearchStrategy:
    """Bytes of: a damaged valid document, a random JSON value, or arbitrary bytes."""
    return st.one_of(mutations(make).map(to_bytes), any_json.map(to_bytes), st.binary(max_size=256))


def toml_documents() -> st.SearchStrategy:
    """TOML text of: a damaged valid routes document, a random value, a deep one, or any text."""
    return st.one_of(mutations(valid_routes, any_toml).map(toml_document), toml_values.map(toml_document),
                     deep_toml.map(lambda r: f"x = {r.text}\n"), st.text(max_size=200))


# ========================================================================== the invariant, per reader
def typed(fn: Callable[[], Any], *errors: type[BaseException]) -> Any:
    """``fn()``'s result, or None when it raised one of ``errors``; any other exception fails the test."""
    try:
        return fn()
    except errors:
        return None


def usable_file_name(rel: str) -> bool:
    rel.encode("utf-8")  # UnicodeEncodeError (not OSError) from open() otherwise
    return manifest.check_rel_path(rel, "x") == rel and rel not in manifest.SIDE_FILES


def check_manifest(data: bytes) -> None:
    m = typed(lambda: manifest.parse(data), MalformedFile)
    if m is not None:
        assert m.raw == data and m.files
        for rel, entry in m.files.items():
            assert usable_file_name(rel)
            assert type(entry.size) is int and entry.size >= 0 and len(entry.sha256) == 64


def check_config(data: bytes) -> None:
    cfg = typed(lambda: BundleConfig.from_bytes(data), MalformedFile)
    if cfg is None:
        return
    assert isinstance(cfg, BundleConfig) and is_version_name(cfg.version)
    assert len(cfg.palette) == len(cfg.classes) >= 1
    assert all(usable_file_name(name) for name in cfg.files())
    assert cfg.num_queries >= 1 and cfg.postprocess.topk >= 1 and 0 <= cfg.preprocess.canvas_fill <= 255
    pre = cfg.preprocess
    assert 1 <= pre.short_edge <= pre.max_size <= MAX_SIDE and 1 <= pre.size_divisibility <= 1024
    floats = [*cfg.preprocess.mean, *cfg.preprocess.std, cfg.preprocess.pad_value,
              cfg.postprocess.human_score_threshold, cfg.postprocess.part_score_threshold,
              cfg.postprocess.instance_paste_threshold]
    assert all(isinstance(x, float) and math.isfinite(x) for x in floats)
    # what the reader accepts, the writer writes and the reader reads back unchanged
    assert BundleConfig.from_bytes(cfg.to_json().encode()) == cfg


def check_index(data: bytes, data_size: int | None = None) -> None:
    index = typed(lambda: weights_index.parse(data, "weights.json", data_size), MalformedFile)
    if index is None:
        return
    assert usable_file_name(index.data_file)
    offsets = [t.offset for t in index.tensors]
    assert offsets == sorted(offsets) and len({t.name for t in index.tensors}) == len(index.tensors)
    for a, b in zip(index.tensors, index.tensors[1:]):
        assert a.offset + a.length <= b.offset
    for t in index.tensors:
        assert t.dtype in weights_index.DTYPES and len(t.sha256) == 64 and all(type(d) is int for d in t.shape)
        assert data_size is None or t.offset + t.length <= data_size


def check_signature(data: bytes) -> None:
    parsed = typed(lambda: signature.parse_signature(data), SignatureError)
    if parsed is not None:
        kid, sig = parsed
        assert isinstance(kid, str) and (kid == "?" or (kid.isascii() and kid.isalnum() and len(kid) <= 64))
        assert isinstance(sig, bytes) and len(sig) == 64


def check_aliases(data: bytes, scratch: Path) -> None:
    store = BundleStore(scratch / "aliases-root")
    store.dir.mkdir(parents=True, exist_ok=True)
    (store.dir / ALIASES).write_bytes(data)
    aliases = store.read_aliases()
    assert isinstance(aliases, dict)
    assert all(is_alias_name(a) and is_version_name(v) for a, v in aliases.items())


def check_lkg(data: bytes, scratch: Path) -> None:
    store_dir = scratch / "lkg-store"
    store_dir.mkdir(exist_ok=True)
    (store_dir / lkg.LKG).write_bytes(data)
    state = lkg.load(store_dir)
    assert state is None or isinstance(state, lkg.LastKnownGood)
    if state is not None:
        assert all(is_version_name(v) for v in state.versions)
        assert all(is_alias_name(a) and is_version_name(v) for a, v in state.aliases.items())
        assert isinstance(state.routes, dict) and isinstance(state.recorded_at, str)


def check_routes(data: bytes | str, fmt: str) -> None:
    routes = typed(lambda: loads_routes(data, fmt, f"routes.{fmt}"), RoutesError)
    if routes is None:
        return
    assert isinstance(routes, Routes)
    for v, w in routes.weights:
        assert is_version_name(v) and isinstance(w, float) and math.isfinite(w) and w >= 0
    assert all(is_alias_name(a) and a != "auto" and is_version_name(v) for a, v in routes.aliases.items())
    for name in (routes.key_header, routes.key_cookie):
        assert isinstance(name, str) and name and name.isascii() and " " not in name
    if routes.shadow is not None:
        assert isinstance(routes.shadow, Shadow) and is_version_name(routes.shadow.version)
        assert 0.0 <= routes.shadow.fraction <= 1.0


def check_routes_refs(data: bytes, name: str, scratch: Path) -> None:
    """``m2fp-bundle rm``'s reading of the routes file: a dict of references, or a BundleError."""
    path = scratch / name
    path.write_bytes(data)
    refs = typed(lambda: load_routes_refs(path), BundleError)
    if refs is not None:
        assert all(isinstance(v, str) and all(isinstance(r, str) for r in rs) for v, rs in refs.items())


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="untrusted-json-") as d:
        yield Path(d)


# ============================================================================= properties: jsonfile
def _depth_of(value: Any) -> int:
    if isinstance(value, (list, dict)):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((_depth_of(v) for v in children), default=0)
    return 0


def _plain(value: Any) -> bool:
    """Finite floats, strings of Unicode scalar values, all the way down."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int))


@FUZZ
@given(st.one_of(any_json.map(to_bytes), st.binary(max_size=512)))
@example(b"[" * DEEP).via("fault 6")
@example(b'"\\ud800"').via("found: an unpaired surrogate could not be written back or opened as a file")
@example(b"1e400").via("found: read as inf although NaN/Infinity are refused")
def test_jsonfile_loads_returns_plain_json_or_malformed_file(data):
    try:
        value = jsonfile.loads(data, "some.json")
    except MalformedFile as exc:
        assert exc.file == "some.json" and str(exc).startswith("some.json: ")
        return
    assert _depth_of(value) <= jsonfile.MAX_DEPTH and _plain(value)
    assert jsonfile.loads(jsonfile.dumps(value), "again.json") == value  # what is read can be written back


@FEW
@given(st.text(max_size=64) | st.sampled_from(SURROGATES).map(json.dumps))
def test_jsonfile_loads_takes_str_too(text):
    typed(lambda: jsonfile.loads(text, "some.json"), MalformedFile)


@FEW
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 300), 10 ** 300),
                              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=16))
def test_jsonfile_reads_every_plain_value_back(value):
    assert jsonfile.loads(jsonfile.dumps(value), "x.json") == value
    assert jsonfile.loads(json.dumps(value), "x.json") == value


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "9" * 5000, '"\\udc80"',
                                   '{"a": 1, "a": 2}', "\ufeff{}", "[" * 33 + "]" * 33, "[" * DEEP])
def test_jsonfile_refuses_what_json_dumps_never_writes(token):
    with pytest.raises(MalformedFile, match=r"^f\.json: "):
        jsonfile.loads(token.encode(), "f.json")


# ====================================================================== properties: each reader
@FUZZ
@given(documents(valid_manifest))
@example(b"[" * DEEP).via("fault 6")
@example(b'{"algorithm": "sha256", "files": {"\\ud800": {"size": 1, "sha256": "' + HEX64.encode() + b'"}}}')
def test_manifest_parse(data):
    check_manifest(data)


@FUZZ
@given(st.one_of(documents(valid_config), mutations(valid_single_config).map(to_bytes)))
@example(b"[" * DEEP).via("fault 6")
def test_config_from_bytes(data):
    check_config(data)


@FUZZ
@given(documents(valid_index), st.one_of(st.none(), st.integers(0, 2 ** 64), st.sampled_from([0, 39, 40, 48])))
@example(b"[" * DEEP, None).via("fault 6")
def test_weights_index_parse(data, data_size):
    check_index(data, data_size)


@FUZZ
@given(documents(valid_signature))
@example(b"[" * DEEP).via("fault 6")
def test_parse_signature(data):
    check_signature(data)


@FUZZ
@given(documents(valid_aliases))
@example(b"[" * DEEP).via("fault 6")
def test_read_aliases(scratch, data):
    check_aliases(data, scratch)


@FUZZ
@given(documents(valid_lkg))
@example(b"[" * DEEP).via("fault 6")
def test_lkg_load(scratch, data):
    check_lkg(data, scratch)


@FUZZ
@given(documents(valid_routes))
@example(b"[" * DEEP).via("fault 6")
def test_routes_json(data):
    check_routes(data, "json")


@FUZZ
@given(st.one_of(toml_documents().map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=256)))
@example(("x = " + "[" * DEEP + "]" * DEEP).encode()).via("fault 6")
def test_routes_toml(data):
    check_routes(data, "toml")


@FEW
@given(st.one_of(documents(valid_routes), toml_documents().map(lambda t: t.encode("utf-8", "surrogatepass"))),
       st.sampled_from(["routes.json", "routes.toml"]))
def test_install_load_routes_refs(scratch, data, name):
    check_routes_refs(data, name, scratch)


# -------------------------------------------------------------- every field of every valid document
def _json_reader(check: Callable[[bytes], None]) -> Callable[[Any, Path], None]:
    return lambda doc, _scratch: check(to_bytes(doc))


READERS: dict[str, tuple[Callable[[], Any], Callable[[Any, Path], None]]] = {
    "manifest": (valid_manifest, _json_reader(check_manifest)),
    "config": (valid_config, _json_reader(check_config)),
    "config-single": (valid_single_config, _json_reader(check_config)),
    "weights": (valid_index, _json_reader(check_index)),
    "weights-sized": (valid_index, _json_reader(lambda data: check_index(data, 48))),
    "signature": (valid_signature, _json_reader(check_signature)),
    "aliases": (valid_aliases, lambda doc, scratch: check_aliases(to_bytes(doc), scratch)),
    "lkg": (valid_lkg, lambda doc, scratch: check_lkg(to_bytes(doc), scratch)),
    "routes-json": (valid_routes, _json_reader(lambda data: check_routes(data, "json"))),
    "routes-toml": (valid_routes, lambda doc, _s: check_routes(toml_document(doc).encode("utf-8", "surrogatepass"),
                                                               "toml")),
}
#: the single-human config and the sized index only add their own fields (the rest is the same code path)
_OWN_FIELDS = {"config-single": ("task", "human_class", "preprocess"), "weights-sized": ("tensors",)}
FIELDS = [(name, path) for name, (make, _) in READERS.items() for path in paths(make())
          if name not in _OWN_FIELDS or (path and path[0] in _OWN_FIELDS[name])]


@pytest.mark.parametrize("name,path", FIELDS, ids=[f"{n}:{'.'.join(map(str, p)) or '<root>'}" for n, p in FIELDS])
@PER_FIELD
@given(how=st.sampled_from(HOW), new=st.one_of(scalars, big_numbers, odd_text, any_json), key=odd_text)
def test_every_field_of_every_valid_document(scratch, name, path, how, new, key):
    """The valid document with this one field made wrong: typed result or typed error, nothing else."""
    make, check = READERS[name]
    check(mutate(make(), path, how, new, key, nested_toml(DEEP, "arrays") if name == "routes-toml" else None),
          scratch)


@pytest.mark.parametrize("name", sorted(READERS))
def test_the_valid_documents_are_accepted(scratch, name):
    """Control: each reader accepts the undamaged document the properties start from."""
    make, _ = READERS[name]
    doc = make()
    if name.startswith("config"):
        assert BundleConfig.from_bytes(to_bytes(doc)).version == "v1.2"
    elif name == "manifest":
        assert set(manifest.parse(to_bytes(doc)).files) == set(doc["files"])
    elif name.startswith("weights"):
        assert [t.name for t in weights_index.parse(to_bytes(doc), "weights.json", 48).tensors] == ["a.weight",
                                                                                                   "a.bias"]
    elif name == "signature":
        assert signature.parse_signature(to_bytes(doc)) == ("0123456789abcdef", bytes(range(64)))
    elif name == "aliases":
        store = BundleStore(scratch / "control")
        store.dir.mkdir(parents=True, exist_ok=True)
        (store.dir / ALIASES).write_bytes(to_bytes(doc))
        assert store.read_aliases() == doc
    elif name == "lkg":
        (scratch / lkg.LKG).write_bytes(to_bytes(doc))
        state = lkg.load(scratch)
        assert state is not None and state.versions == doc["versions"] and state.aliases == doc["aliases"]
    else:
        text = toml_document(doc) if name == "routes-toml" else to_bytes(doc)
        routes = loads_routes(text, name.split("-")[1], "routes")
        assert routes.weights == (("v1.0", 90.0), ("v1.2", 10.5)) and routes.shadow == Shadow("v2.0-beta", 0.25)
        assert routes.aliases == doc["aliases"] and (routes.key_header, routes.key_cookie) == ("X-Route-Key",
                                                                                              "m2fp_route")


# ================================================================= bugs the properties found
@pytest.mark.parametrize("key,value,where", [
    ("preprocess.pad_value", Raw("1" + "0" * 400), "config.json → preprocess → pad_value"),
    ("preprocess.mean", [1, 2, Raw("1" + "0" * 400)], "config.json → preprocess → mean"),
    ("preprocess.std", [1, 2, Raw("1e400")], "config.json: not valid JSON"),
    ("postprocess.human_score_threshold", Raw("-" + "9" * 400), "config.json → postprocess → human_score_threshold"),
    ("postprocess.topk", 0, "config.json → postprocess → topk"),
    ("preprocess.canvas_fill", 256, "config.json → preprocess → canvas_fill"),
    ("num_queries", -1, "config.json → num_queries"),
    ("preprocess.max_size", 10 ** 300, "config.json → preprocess: "),
    ("preprocess.size_divisibility", 0, "config.json → preprocess: "),
    ("notes", Raw('"\\ud800"'), "config.json: a string holds an unpaired"),
    ("model_file", Raw('"model\\udcff.onnx"'), "config.json: a string holds an unpaired"),
])
def test_config_values_out_of_range_are_malformed_files(key, value, where):
    """OverflowError for integers beyond a double; values no pipeline can use (topk 0, fill 256); strings
    that can be neither written back nor opened (UnicodeEncodeError)."""
    raw = valid_config()
    *parents, last = key.split(".")
    node = raw
    for k in parents:
        node = node[k]
    node[last] = value
    with pytest.raises(MalformedFile) as info:
        BundleConfig.from_bytes(to_bytes(raw))
    assert str(info.value).startswith(where), str(info.value)


def test_manifest_entry_with_an_unpaired_surrogate_is_malformed():
    """It used to parse, then reader.inspect died in os.open with UnicodeEncodeError (not an OSError)."""
    raw = b'{"algorithm": "sha256", "files": {"model\\udcff.onnx": {"size": 1, "sha256": "' + HEX64.encode() + b'"}}}'
    with pytest.raises(MalformedFile, match=r"^manifest\.json: a string holds an unpaired"):
        manifest.parse(raw)


@pytest.mark.parametrize("value", [["float32"], {"a": 1}, None])
def test_weights_index_unhashable_dtype_is_malformed(value):
    """A list or an object as dtype raised TypeError (unhashable) instead."""
    raw = valid_index()
    raw["tensors"][0]["dtype"] = value
    with pytest.raises(MalformedFile, match=r"^weights\.json → tensors\[0\] → dtype: "):
        weights_index.parse(to_bytes(raw), "weights.json")


@pytest.mark.parametrize("value", [True, 1.0, "1"])
def test_weights_index_format_must_be_the_integer_one(value):
    raw = valid_index()
    raw["format"] = value
    with pytest.raises(MalformedFile, match=r"^weights\.json → format: "):
        weights_index.parse(to_bytes(raw), "weights.json")


@pytest.mark.parametrize("text,fragment", [
    ('[weights]\n"v1.0" = nan\n', "weights → v1.0"),
    ('[weights]\n"v1.0" = inf\n', "weights → v1.0"),
    ('[weights]\n"v1.0" = 1' + "0" * 400 + "\n", "weights → v1.0"),
    ("[sticky]\nheader = 7\n", "sticky → header"),
    ('[sticky]\nheader = "X Route"\n', "sticky → header"),
    ('[sticky]\nheder = "X-Route"\n', "sticky: unknown key(s) heder"),
    ("[shadow]\nversion = 1\n", "shadow"),
    ("x = " + "[" * DEEP + "]" * DEEP + "\n", "nested too deeply"),
    ("x = " + "{a = " * 2000 + "1" + "}" * 2000 + "\n", "nested too deeply"),
])
def test_routes_toml_errors_are_routes_errors(text, fragment):
    """NaN/infinite weights were accepted, huge integer weights raised OverflowError, sticky names were
    str()-ed from any value, deep TOML raised RecursionError."""
    with pytest.raises(RoutesError) as info:
        loads_routes(text, "toml", "routes.toml")
    assert str(info.value).startswith("routes.toml") and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("text,fragment", [
    ('{"weights": {"v1.0": 1e400}}', "routes.json: not valid JSON"),
    ('{"weights": {"v1.0": 1' + "0" * 400 + "}}", "routes.json → weights → v1.0"),
    ("[" * DEEP + "]" * DEEP, "routes.json: nested deeper"),
    ('{"weights": {}, "weights": {"v1.0": 1}}', "appears twice"),
])
def test_routes_json_errors_are_routes_errors(text, fragment):
    with pytest.raises(RoutesError) as info:
        loads_routes(text.encode(), "json", "routes.json")
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("name", ["routes.json", "routes.toml"])
def test_routes_file_not_utf8_or_too_deep_is_a_routes_error(tmp_path, name):
    """A routes file that is not UTF-8 raised UnicodeDecodeError out of load_routes; deep JSON RecursionError."""
    path = tmp_path / name
    path.write_bytes(b"\xff\xfe[weights]\n")
    with pytest.raises(RoutesError, match=name):
        load_routes(path)
    path.write_bytes(("" if name.endswith(".json") else "x = ").encode() + b"[" * DEEP + b"]" * DEEP)
    with pytest.raises(RoutesError, match=name):
        load_routes(path)
    with pytest.raises(BundleError, match=f"routes file .*{name}: unreadable"):
        load_routes_refs(path)


def test_read_aliases_warns_once_per_state_of_the_file(tmp_path, caplog):
    """The registry reads aliases.json on every request: a broken file is one warning, not one per request."""
    store = BundleStore(tmp_path)
    store.dir.mkdir(parents=True)
    (store.dir / ALIASES).write_bytes(b"[" * DEEP + b"]" * DEEP)
    with caplog.at_level(logging.WARNING, logger="m2fpkit.runtime.bundle.store"):
        for _ in range(5):
            assert store.read_aliases() == {}
        (store.dir / ALIASES).write_bytes(b"[]")
        assert store.read_aliases() == {}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "aliases.json ignored: m2fp/aliases.json: nested deeper than 32 levels" in messages[0]
    assert "aliases.json ignored: expected an object" in messages[1]


def test_lkg_load_logs_what_it_ignores(tmp_path, caplog):
    (tmp_path / lkg.LKG).write_bytes(b"[" * DEEP + b"]" * DEEP)
    with caplog.at_level(logging.WARNING, logger="m2fpkit.runtime.lkg"):
        assert lkg.load(tmp_path) is None
    assert any(".lkg.json" in r.getMessage() and "nested deeper" in r.getMessage() for r in caplog.records)


# ===================================================================== fault 8: side files named
@pytest.mark.parametrize("side", sorted(manifest.SIDE_FILES))
@pytest.mark.parametrize("key", ["model_file", "weights_index"])
def test_config_may_not_name_a_side_file(key, side):
    raw = valid_config()
    raw[key] = side
    with pytest.raises(MalformedFile) as info:
        BundleConfig.from_bytes(to_bytes(raw))
    assert info.value.file == f"config.json → {key}"
    assert str(info.value).startswith(f"config.json → {key}: {side} describes the manifest")


@pytest.mark.parametrize("side", sorted(manifest.SIDE_FILES))
def test_weights_index_data_file_may_not_name_a_side_file(side):
    raw = valid_index()
    raw["data_file"] = side
    with pytest.raises(MalformedFile) as info:
        weights_index.parse(to_bytes(raw), "weights.json", 48)
    assert info.value.file == "weights.json → data_file"
    assert str(info.value).startswith(f"weights.json → data_file: {side} describes the manifest")


def write_bundle(bundle: Path, config: dict[str, Any], index: dict[str, Any]) -> Path:
    """A sealed bundle directory the reader can check without onnxruntime (the graph is not opened)."""
    (bundle / "golden").mkdir(parents=True)
    (bundle / "model.onnx").write_bytes(b"graph")
    (bundle / "model.onnx.data").write_bytes(bytes(48))
    for name in ("image.png", "label_map.png"):
        (bundle / "golden" / name).write_bytes(b"png")
    (bundle / "weights.json").write_bytes(jsonfile.dumps(index))
    (bundle / "config.json").write_bytes(jsonfile.dumps(config))
    seal(bundle)
    return bundle


@pytest.mark.parametrize("side", sorted(manifest.SIDE_FILES))
@pytest.mark.parametrize("key", ["model_file", "weights_index", "data_file"])
def test_inspect_refuses_a_bundle_naming_a_side_file(tmp_path, key, side):
    """The same through the reader, on a sealed bundle directory (the manifest hashes every other file)."""
    config, index = valid_config(), valid_index()
    (index if key == "data_file" else config)[key] = side
    bundle = write_bundle(tmp_path / "v1.2", config, index)
    with pytest.raises(MalformedFile) as info:
        reader.inspect(bundle)
    where = "weights.json → data_file" if key == "data_file" else f"config.json → {key}"
    assert info.value.file == where and f"{side} describes the manifest" in str(info.value)
    report = reader.verify(bundle)
    assert not report.ok and report.first_failure().name == ("weights" if key == "data_file" else "config")


def test_inspect_accepts_the_control_bundle(tmp_path):
    """The bundle of the test above with no side file named: the reader accepts it."""
    info = reader.inspect(write_bundle(tmp_path / "v1.2", valid_config(), valid_index()))
    assert info.version == "v1.2" and info.index is not None and len(info.index.tensors) == 2
