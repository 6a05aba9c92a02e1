"""PyTorch M2FP → ONNX (dynamo exporter, dynamic height/width in multiples of 32, external weights).

An export is a trace (``torch.export``, decomposition, translation to ONNX: ~4/5 of its time), then
torch.onnx's optimisation and save. The trace is a function of the architecture and the code, never of
the weights' values (``torch.export`` traces with fake tensors), so it is cached: the translated, not
yet optimised graph is stored **without its parameters** under a key that hashes everything the trace
depends on — the config's architecture sections (backbone, encoder, decoder: all ``M2FP`` builds its
modules from; class names, thresholds and preprocessing are not in the graph), the parameter names,
shapes and dtypes, the opset and example size, the source of the export code (``onnx_export.py`` and
``model/``) and the torch/onnx/onnxscript versions. An export whose key is stored loads that graph,
gives it the model's own weights and runs the same optimisation and save as a fresh trace: the files
are byte-identical to an uncached export (``tests/test_export_cli.py`` checks it), and the parity gate
still compares every graph with the PyTorch model.

The cache lives in ``$M2FP_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/m2fpkit/onnx-graphs`` (``~/.cache``);
``M2FP_EXPORT_CACHE=off`` disables it. Entries are published by an atomic rename (concurrent exports
never see half a graph), an export holds a lock per key while it looks up and traces (concurrent exports of
one architecture trace it once), the least recently used beyond :data:`CACHE_KEEP` are deleted, and a cache
that cannot be written only costs the time of a trace.

The cache trusts only what this user traced: each entry holds an HMAC-SHA256 of its key and graph bytes
(:data:`DIGEST`), made with a per-user secret (:data:`KEY_FILE`, 32 random bytes, mode 0600, created on
first use) when the graph was traced and checked before the graph is reused; an entry that fails it is
deleted and traced again. A cache directory, key or entry that another user could have written (owned
by another uid, group- or other-writable; the key also readable) is refused: logged, traced, not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from m2fpkit.runtime.recent import keep_most_recent

from .model.m2fp import M2FP, SIZE_DIVISIBILITY

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

INPUT = "image"
OUTPUTS = ("pred_logits", "pred_masks")
MAX_SIDE_BLOCKS = 256  # dynamic sides up to 256 * 32 = 8192 px
#: directory of the graph cache (see the module docstring); "off" disables it
CACHE_ENV = "M2FP_EXPORT_CACHE"
#: entries kept: the most recently used (a tiny graph without weights is ~5 MB, r101's ~20 MB)
CACHE_KEEP = 16
_GRAPH = "graph.onnx"  # the traced graph, parameters as inputs without values
#: per entry: hex HMAC-SHA256 (keyed by :data:`KEY_FILE`) of the entry's name and the bytes of its graph
DIGEST = "graph.hmac"
#: the cache's secret key, beside the entries (a dot-file: never taken for an entry or pruned)
KEY_FILE = ".key"
_KEY_BYTES = 32
#: graph metadata the trace adds about itself (dropped: not about the model, and not deterministic)
_TRACE_NOTES = "pkg.torch.export."
_CODE = (Path(__file__), *sorted(Path(__file__).with_name("model").glob("*.py")))


def export_onnx(model: M2FP, path: Path, *, opset: int, example_hw: tuple[int, int] = (256, 320)) -> None:
    """Write ``path`` (+ ``path.data``): input ``image [1,3,32*h,32*w]`` normalised RGB, outputs logits/masks."""
    h, w = example_hw
    if h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
        raise ValueError(f"example size {example_hw} must be a multiple of {SIZE_DIVISIBILITY}")
    cache = _open_cache()
    entry = cache[0] / cache_key(model, opset=opset, example_hw=example_hw) if cache else None
    with _tracing_lock(entry):
        stored = _load(entry, cache[1]) if cache and entry is not None else None
        program = _with_weights(stored, model) if stored is not None else None
        if program is not None:
            log.info("ONNX graph reused from the export cache, the model's weights applied")
        else:
            graph = _without_weights(_trace(model, opset=opset, example_hw=example_hw), model)
            if cache and entry is not None:
                _store(entry, graph, cache[1])
            program = _with_weights(graph, model)
            assert program is not None, "a fresh trace always fits its own model"
    with _quiet_exporter_logs(), contextlib.redirect_stdout(io.StringIO()):
        program.optimize()
    program.save(str(path), external_data=True)


@contextlib.contextmanager
def _tracing_lock(entry: Path | None) -> Iterator[None]:
    """Held while an export looks ``entry`` up and traces on a miss: concurrent exports of one architecture
    (the same key) trace it once, the others wait and reuse it. Without a cache, or if the lock file cannot
    be made, nothing is locked (they may trace twice, never wrongly)."""
    if entry is None:
        yield
        return
    try:
        fd = os.open(entry.with_name(f".lock-{entry.name}"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def cache_dir() -> Path | None:
    """The graph cache's directory, or None when ``$M2FP_EXPORT_CACHE`` is ``off``."""
    configured = os.environ.get(CACHE_ENV, "")
    if configured.lower() == "off":
        return None
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "m2fpkit" / "onnx-graphs"


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


def _trace(model: M2FP, *, opset: int, example_hw: tuple[int, int]) -> torch.onnx.ONNXProgram:
    """The translated graph, not optimised (initializers named after the model's state-dict keys)."""
    x = torch.zeros(1, 3, *example_hw)
    hd = torch.export.Dim("h32", min=1, max=MAX_SIDE_BLOCKS)
    wd = torch.export.Dim("w32", min=1, max=MAX_SIDE_BLOCKS)
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), torch.no_grad(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (x,), None, input_names=[INPUT], output_names=list(OUTPUTS), dynamo=True,
            opset_version=opset, optimize=False, verbose=False,
            dynamic_shapes={"image": {2: SIZE_DIVISIBILITY * hd, 3: SIZE_DIVISIBILITY * wd}},
        )
    for line in out.getvalue().splitlines():
        log.debug("torch.onnx: %s", line)
    assert program is not None
    return program


def cache_key(model: M2FP, *, opset: int, example_hw: tuple[int, int]) -> str:
    """SHA-256 of everything the traced graph depends on (see the module docstring): no weight values."""
    import onnx
    import onnxscript

    h = hashlib.sha256()
    arch = {part: dataclasses.asdict(getattr(model.config, part)) for part in ("backbone", "encoder", "decoder")}
    h.update(json.dumps({"architecture": arch, "opset": opset,
                         "example_hw": list(example_hw), "training": model.training, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
                         "state": [(k, str(t.dtype), list(t.shape)) for k, t in sorted(model.state_dict().items())]},
                        sort_keys=True, default=str).encode())
    for code in _CODE:
        h.update(code.name.encode() + b"\0" + code.read_bytes())
    return h.hexdigest()


def _without_weights(program: torch.onnx.ONNXProgram, model: M2FP) -> onnx.ModelProto:
    """The traced graph with every parameter turned into an extra graph input (name, dtype, shape; no values),
    without the trace's own notes (``pkg.torch.export.*`` graph metadata: torch's graph signature and range
    constraints, whose order varies with the process's string hashing).

    Fresh and cached exports both continue from this form, so they cannot differ.
    """
    import onnx_ir as ir

    graph = program.model.graph
    for key in [key for key in graph.metadata_props if key.startswith(_TRACE_NOTES)]:
        del graph.metadata_props[key]
    for name in [name for name in model.state_dict() if name in graph.initializers]:
        graph.inputs.append(graph.initializers.pop(name))
    return ir.serde.serialize_model(program.model)


def _with_weights(graph: onnx.ModelProto, model: M2FP) -> torch.onnx.ONNXProgram | None:
    """``graph`` with ``model``'s weights as its initializers; None if its parameters are not ``model``'s."""
    import onnx_ir as ir

    ir_model = ir.serde.deserialize_model(graph)
    state = model.state_dict()
    inputs = ir_model.graph.inputs
    fitted = []  # (parameter input, the model's array for it): all checked before the graph changes
    for value in [value for value in inputs if value.name != INPUT]:
        tensor = state.get(value.name or "")
        array = None if tensor is None else tensor.numpy(force=True)
        if array is None or array.shape != tuple(value.shape or ()) \
                or value.dtype != ir.DataType.from_numpy(array.dtype):
            log.warning("cached ONNX graph does not fit the model (parameter %s): tracing again", value.name)
            return None
        fitted.append((value, array))
    for value, array in fitted:
        inputs.remove(value)
        value.const_value = ir.Tensor(array, name=value.name)
        ir_model.graph.register_initializer(value)
    return torch.onnx.ONNXProgram(ir_model, None)


class _Refused(Exception):
    """A cache path another user could have written."""


def _check_private(st: os.stat_result, what: str, *, kind: int, unreadable: bool = False) -> None:
    """_Refused unless ``st`` is a ``kind`` (S_IFDIR/S_IFREG) owned by this user that no one else may write
    (nor read, with ``unreadable``)."""
    if stat.S_IFMT(st.st_mode) != kind:
        raise _Refused(f"{what} is not a {'directory' if kind == stat.S_IFDIR else 'regular file'}")
    if st.st_uid != os.geteuid():
        raise _Refused(f"{what} is owned by uid {st.st_uid}, not by this user")
    mask = 0o077 if unreadable else 0o022
    if st.st_mode & mask:
        raise _Refused(f"{what} has mode {stat.S_IMODE(st.st_mode):04o} (must not be "
                       f"{'accessible' if unreadable else 'writable'} by group or others)")


def _read_private(path: Path, what: str, *, limit: int, unreadable: bool = False) -> bytes:
    """The bytes of ``path`` (not followed if a link), checked by :func:`_check_private` on the open file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_private(os.fstat(fd), what, kind=stat.S_IFREG, unreadable=unreadable)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _open_cache() -> tuple[Path, bytes] | None:
    """(directory, secret key) of the graph cache, both created on first use; None when it is off, cannot be
    created, or is refused (logged): the export then traces and stores nothing."""
    cache = cache_dir()
    if cache is None:
        return None
    key_path = cache / KEY_FILE
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(os.stat(cache), f"directory {cache}", kind=stat.S_IFDIR)
        if not os.path.lexists(key_path):
            tmp = cache / f".key-{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(_KEY_BYTES))
                with contextlib.suppress(FileExistsError):  # another export created it first: theirs is used
                    os.link(tmp, key_path)
            finally:
                tmp.unlink(missing_ok=True)
        key = _read_private(key_path, f"key {key_path}", limit=_KEY_BYTES, unreadable=True)
        if len(key) != _KEY_BYTES:
            raise _Refused(f"key {key_path} is not {_KEY_BYTES} bytes")
    except _Refused as exc:
        log.warning("export cache %s refused: %s; tracing, the cache unused", cache, exc)
        return None
    except OSError as exc:
        log.warning("export cache %s unusable (%s): tracing, the cache unused", cache, exc.strerror or exc)
        return None
    return cache, key


def _digest(key: bytes, entry: Path, data: bytes) -> str:
    return hmac.new(key, entry.name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def _load(entry: Path, key: bytes) -> onnx.ModelProto | None:
    """The entry's graph if this user wrote it (checked before it is parsed); None on a miss."""
    import onnx

    try:
        _check_private(os.lstat(entry), f"entry {entry.name[:16]}", kind=stat.S_IFDIR)
        data = _read_private(entry / _GRAPH, f"entry {entry.name[:16]}", limit=1 << 31)
        digest = _read_private(entry / DIGEST, f"entry {entry.name[:16]}", limit=256)
    except FileNotFoundError:
        if not os.path.lexists(entry):
            return None  # a miss
        data, digest = b"", b""  # half an entry: fails the check below
    except _Refused as exc:
        log.warning("export cache %s refused: %s; tracing again", entry.parent, exc)
        return None
    except OSError as exc:
        log.warning("export cache entry %s unreadable (%s): tracing again", entry.name[:16], exc.strerror or exc)
        return None
    if not hmac.compare_digest(digest.strip(), _digest(key, entry, data).encode()):
        log.warning("export cache entry %s fails its integrity check (changed since it was traced): "
                    "deleted, tracing again", entry.name[:16])
        shutil.rmtree(entry, ignore_errors=True)
        return None
    try:
        graph = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - an entry this user wrote but onnx cannot parse is a miss
        log.warning("export cache entry %s unreadable (%s): tracing again", entry.name[:16], exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):  # a read-only cache is still used, only never pruned by use
        os.utime(entry)  # recently used: kept by keep_most_recent
    return graph


def _store(entry: Path, graph: onnx.ModelProto, key: bytes) -> None:
    tmp = entry.with_name(f".tmp-{entry.name}-{uuid.uuid4().hex}")
    data = graph.SerializeToString()
    try:
        tmp.mkdir(mode=0o700)
        for name, content in ((_GRAPH, data), (DIGEST, _digest(key, entry, data).encode())):
            with os.fdopen(os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(content)
        tmp.rename(entry)
        keep_most_recent((p for p in entry.parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         CACHE_KEEP, _drop)
    except OSError as exc:  # another export stored the same entry first, or the cache is not writable
        if not entry.is_dir():
            log.warning("export cache %s not written (%s): the next export traces again", entry.parent, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop(entry: Path) -> None:
    """Delete a pruned entry and its lock file (an export holding that lock only traces once more)."""
    shutil.rmtree(entry, ignore_errors=True)
    entry.with_name(f".lock-{entry.name}").unlink(missing_ok=True)


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Store bundle identity in the graph's ``metadata_props`` (readable through onnxruntime)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for k, v in sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.save(model, str(path))
