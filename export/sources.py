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
import json
import logging
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2fpkit.runtime.bundle import jsonfile
from m2fpkit.runtime.errors import ExportError, MalformedFile

from .model import config as mcfg
from .model.lively import liven
from .model.m2fp import M2FP, build

log = logging.getLogger(__name__)

CONFIG_FILE = "configuration.json"
WEIGHTS_FILE = "pytorch_model.pt"
_IGNORED_SUFFIX = "num_batches_tracked"


class SourceError(ExportError):
    """The checkpoint cannot be used; the message says why and names keys or paths."""


@dataclass
class Checkpoint:
    """A resolved source: architecture, weights (or a seed) and identity."""

    kind: str
    uri: str
    config: mcfg.M2FPConfig
    sha256: str
    state_dict: dict[str, torch.Tensor] | None = None
    seed: int | None = None
    #: where the checkpoint came from beyond ``uri`` (e.g. an MLflow model version); joins ``config.json → source``
    lineage: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> M2FP:
        """The PyTorch network in eval mode with exactly this checkpoint's weights."""
        if self.state_dict is None:
            return build(self.config, seed=self.seed)
        model = build(self.config)
        check_keys(model.state_dict(), self.state_dict)
        model.load_state_dict(self.state_dict, strict=False)  # keys checked above (num_batches_tracked aside)
        return model.eval()


def check_keys(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Fail unless both key sets match exactly (``num_batches_tracked`` aside) with equal shapes."""
    want = {k for k in expected if not k.endswith(_IGNORED_SUFFIX)}
    have = {k for k in got if not k.endswith(_IGNORED_SUFFIX)}
    missing, unexpected = sorted(want - have), sorted(have - want)
    problems = []
    if missing:
        more = " …" if len(missing) > 20 else ""
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:20])}{more}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:20])}"
                        + (" …" if len(unexpected) > 20 else ""))
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(want & have) if tuple(got[k].shape) != tuple(expected[k].shape)]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:10]))
    if problems:
        raise SourceError("checkpoint does not match the architecture in its configuration: " + " | ".join(problems))


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_modelscope_dir(path: str | os.PathLike, uri: str | None = None) -> Checkpoint:
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    cfg_path, w_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SourceError(f"{p}: missing (a ModelScope model directory has {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = jsonfile.read(cfg_path, str(cfg_path))
    except (OSError, MalformedFile) as exc:
        raise SourceError(str(exc)) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise SourceError(f"{cfg_path}: no \"model\" object")
    try:
        config = mcfg.from_modelscope(raw["model"], path=f"{CONFIG_FILE} → model")
    except mcfg.ConfigError as exc:
        raise SourceError(str(exc)) from None
    try:
        blob = torch.load(w_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise SourceError(f"{w_path}: cannot be read as a PyTorch checkpoint: {exc}") from None
    sd = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SourceError(f"{w_path}: expected a dict with a \"model\" state dict of tensors")
    return Checkpoint(kind="dir", uri=uri or str(root.resolve()), config=config,
                      sha256=_sha256_file(w_path), state_dict=sd)


def probe(host: str, port: int, timeout: float, what: str, hint: str) -> None:
    """Fail within ``timeout`` when ``host:port`` takes no TCP connection (offline), instead of a client's retries."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise SourceError(f"cannot reach {what} at {host}:{port} ({exc}); {hint}") from None


def load_modelscope_hub(model_id: str, revision: str | None, timeout: float = 5.0) -> Checkpoint:
    """Download with ``modelscope.snapshot_download``; fails within ``timeout`` when offline."""
    endpoint = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    parsed = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    probe(parsed.hostname or endpoint, parsed.port or (80 if parsed.scheme == "http" else 443), timeout,
          "the ModelScope hub", "offline? download the model directory elsewhere and pass its path")
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise SourceError("the modelscope package is missing: install with the [export] extra") from None
    try:
        path = snapshot_download(model_id, revision=revision) if revision else snapshot_download(model_id)
    except Exception as exc:  # the hub client raises its own error types
        raise SourceError(f"modelscope download of {model_id}@{revision or 'default'} failed: {exc}") from None
    ck = load_modelscope_dir(path, uri=f"modelscope:{model_id}" + (f"@{revision}" if revision else ""))
    ck.kind = "modelscope"
    return ck


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


@dataclass(frozen=True)
class DirSource:
    """A ModelScope model directory on disk."""

    path: str


@dataclass(frozen=True)
class HubSource:
    """``modelscope:OWNER/NAME[@REVISION]``."""

    model_id: str
    revision: str | None = None


@dataclass(frozen=True)
class RandomSource:
    """``random:PRESET[?seed=N&task=T]``; ``task`` None means the caller's default."""

    preset: str
    seed: int = 0
    task: str | None = None


#: MLflow's own rules: a model name has no ``/`` or ``:``; an alias is word characters and dashes
_MLFLOW_ALIAS = re.compile(r"[\w-]{1,255}")
_MLFLOW_VERSION = re.compile(r"[0-9]{1,18}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MLFLOW_FORMS = "mlflow:models:/NAME/VERSION or mlflow:models:/NAME@ALIAS"


@dataclass(frozen=True)
class MlflowSource:
    """A registered model version in an MLflow registry: by ``version`` number or by ``alias``."""

    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"mlflow:models:/{self.name}" + (f"@{self.alias}" if self.alias else f"/{self.version}")

    @property
    def selector(self) -> str:
        return f"alias {self.alias!r}" if self.alias else f"version {self.version}"


SourceRef = DirSource | HubSource | RandomSource | MlflowSource


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


def save_modelscope_dir(path: str | os.PathLike, config: mcfg.M2FPConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a ModelScope-format model directory (used by tests and demos)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    conf = {"framework": "pytorch", "task": "image-segmentation",
            "pipeline": {"type": "image-human-parsing"}, "model": config.to_modelscope()}
    (root / CONFIG_FILE).write_text(json.dumps(conf, indent=2))
    torch.save({"model": {k: v.detach().clone() for k, v in state_dict.items()}}, root / WEIGHTS_FILE)
    return root
