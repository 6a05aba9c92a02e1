"""Where an M2FP version comes from, behind one interface.

URIs (:func:`parse` is the one reader of these strings; :func:`resolve` loads what they name)::

    /path/to/modelscope_dir                  configuration.json + pytorch_model.pt
    modelscope:damo/cv_resnet101_image-multiple-human-parsing[@v1.0.1]   hub download (online only)
    random:tiny[?seed=12&task=single-human]  seeded random init of a preset (r101 or tiny)
    mlflow:models:/NAME/3                    a registered model version (registry: $MLFLOW_TRACKING_URI)
    mlflow:models:/NAME@champion             the version an alias points to ([mlflow] extra)
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

import torch

from .model import config as mcfg
from .model.lively import liven
from .model.m2fp import build
from .modelscope_source import load_modelscope_dir, load_modelscope_hub, save_modelscope_dir
from .source_types import (
    CONFIG_FILE,
    MLFLOW_FORMS,
    WEIGHTS_FILE,
    Checkpoint,
    DirSource,
    HubSource,
    MlflowSource,
    RandomSource,
    SourceError,
    SourceRef,
    check_keys,
    probe,
)

__all__ = ["CONFIG_FILE", "MLFLOW_FORMS", "WEIGHTS_FILE", "Checkpoint", "DirSource", "HubSource", "MlflowSource",
           "RandomSource", "SourceError", "SourceRef", "check_keys", "load_modelscope_dir", "load_modelscope_hub",
           "parse", "probe", "random_source", "resolve", "save_modelscope_dir", "state_dict_sha256"]

#: MLflow's own rules: a model name has no ``/`` or ``:``; an alias is word characters and dashes
_MLFLOW_ALIAS = re.compile(r"[\w-]{1,255}")
_MLFLOW_VERSION = re.compile(r"[0-9]{1,18}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def random_source(preset: str, seed: int, task: str) -> Checkpoint:
    try:
        config = mcfg.preset(preset, task)
    except mcfg.ConfigError as exc:
        raise SourceError(str(exc)) from None
    model = liven(build(config, seed=seed), task)  # heads that parse visibly (still random: export/model/lively.py)
    uri = f"random:{preset}?seed={seed}&task={task}"
    state = model.state_dict()
    return Checkpoint(kind="random", uri=uri, config=config, seed=seed, state_dict=state,
                      sha256=state_dict_sha256(state))


def _parse_mlflow(uri: str) -> MlflowSource:
    rest = uri[len("mlflow:"):]
    if not rest.startswith("models:/"):
        raise SourceError(f"{uri!r}: expected {MLFLOW_FORMS}")
    parts = rest[len("models:/"):].split("/")
    if len(parts) == 2:
        name, version = parts
        if not _MLFLOW_VERSION.fullmatch(version) or int(version) < 1:
            raise SourceError(f"{uri!r}: {version!r} is not a version number (stages and 'latest' are not "
                              f"supported: pin a version or use an alias); expected {MLFLOW_FORMS}")
        ref = MlflowSource(name, version=int(version))
    elif len(parts) == 1 and "@" in parts[0]:
        name, alias = parts[0].rsplit("@", 1)
        if not _MLFLOW_ALIAS.fullmatch(alias):
            raise SourceError(f"{uri!r}: alias {alias!r} must be 1-255 letters, digits, '_' or '-'")
        ref = MlflowSource(name, alias=alias)
    else:
        raise SourceError(f"{uri!r}: name a version or an alias; expected {MLFLOW_FORMS}")
    if not name.strip() or name in (".", "..") or ":" in name or _CONTROL.search(name):
        raise SourceError(f"{uri!r}: {name!r} is not a registered model name (no '/', ':' or control characters)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"{uri!r}: the model name is not valid UTF-8") from None
    return ref


def _parse_random(uri: str) -> RandomSource:
    try:
        parts = urllib.parse.urlsplit(uri[len("random:"):])
        query = urllib.parse.parse_qs(parts.query, max_num_fields=8)
    except ValueError as exc:
        raise SourceError(f"{uri!r}: expected random:PRESET[?seed=N&task=T] ({exc})") from None
    unknown = set(query) - {"seed", "task"}
    if unknown:
        raise SourceError(f"{uri!r}: unknown parameter(s) {', '.join(sorted(unknown))} (seed, task)")
    seed = query.get("seed", ["0"])[0]
    if not re.fullmatch(r"-?[0-9]{1,18}", seed):
        raise SourceError(f"{uri!r}: seed must be an integer")
    return RandomSource(parts.path, int(seed), query["task"][0] if "task" in query else None)


def parse(uri: str) -> SourceRef:
    """What a source string names, without touching disk or network; :class:`SourceError` if it is malformed."""
    if not uri:
        raise SourceError("empty source: expected a ModelScope directory, modelscope:ID[@REV], "
                          f"random:PRESET[?seed=N] or {MLFLOW_FORMS}")
    if uri.startswith("modelscope:"):
        model_id, _, rev = uri[len("modelscope:"):].partition("@")
        if model_id.count("/") != 1:
            raise SourceError(f"{uri!r}: expected modelscope:OWNER/NAME[@REVISION]")
        return HubSource(model_id, rev or None)
    if uri.startswith("random:"):
        return _parse_random(uri)
    if uri.startswith("mlflow:"):
        return _parse_mlflow(uri)
    return DirSource(uri)


def resolve(uri: str, *, task: str | None = None) -> Checkpoint:
    """Turn a source URI into a :class:`Checkpoint`; ``task`` is the default for ``random:`` presets."""
    ref = parse(uri)
    if isinstance(ref, HubSource):
        return load_modelscope_hub(ref.model_id, ref.revision)
    if isinstance(ref, RandomSource):
        return random_source(ref.preset, ref.seed, ref.task or task or "multi-human")
    if isinstance(ref, MlflowSource):
        from . import mlflow_source  # the [mlflow] extra is imported only for an mlflow: source
        return mlflow_source.load(ref)
    return load_modelscope_dir(ref.path)
