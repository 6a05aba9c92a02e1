"""Where an M2FP version comes from, behind one interface.

URIs::

    /path/to/modelscope_dir                  configuration.json + pytorch_model.pt
    modelscope:damo/cv_resnet101_image-multiple-human-parsing[@v1.0.1]   hub download (online only)
    random:tiny[?seed=12&task=single-human]  seeded random init of a preset (r101 or tiny)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch

from m2fpkit.runtime.bundle import jsonfile
from m2fpkit.runtime.errors import ExportError, MalformedFile

from .model import config as mcfg
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


def _probe(host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise SourceError(f"cannot reach the ModelScope hub at {host}:{port} ({exc}); "
                          "offline? download the model directory elsewhere and pass its path") from None


def load_modelscope_hub(model_id: str, revision: str | None, timeout: float = 5.0) -> Checkpoint:
    """Download with ``modelscope.snapshot_download``; fails within ``timeout`` when offline."""
    endpoint = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    parsed = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    _probe(parsed.hostname or endpoint, parsed.port or (80 if parsed.scheme == "http" else 443), timeout)
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
    model = build(config, seed=seed)
    uri = f"random:{preset}?seed={seed}&task={task}"
    return Checkpoint(kind="random", uri=uri, config=config, seed=seed,
                      sha256=state_dict_sha256(model.state_dict()))


def resolve(uri: str, *, task: str | None = None) -> Checkpoint:
    """Turn a source URI into a :class:`Checkpoint`; ``task`` is the default for ``random:`` presets."""
    if uri.startswith("modelscope:"):
        ident = uri[len("modelscope:"):]
        model_id, _, rev = ident.partition("@")
        if model_id.count("/") != 1:
            raise SourceError(f"{uri}: expected modelscope:OWNER/NAME[@REVISION]")
        return load_modelscope_hub(model_id, rev or None)
    if uri.startswith("random:"):
        parts = urllib.parse.urlsplit(uri[len("random:"):])
        query = urllib.parse.parse_qs(parts.query)
        unknown = set(query) - {"seed", "task"}
        if unknown:
            raise SourceError(f"{uri}: unknown parameter(s) {', '.join(sorted(unknown))} (seed, task)")
        try:
            seed = int(query.get("seed", ["0"])[0])
        except ValueError:
            raise SourceError(f"{uri}: seed must be an integer") from None
        return random_source(parts.path, seed, query.get("task", [task or "multi-human"])[0])
    return load_modelscope_dir(uri)


def save_modelscope_dir(path: str | os.PathLike, config: mcfg.M2FPConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a ModelScope-format model directory (used by tests and demos)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    conf = {"framework": "pytorch", "task": "image-segmentation",
            "pipeline": {"type": "image-human-parsing"}, "model": config.to_modelscope()}
    (root / CONFIG_FILE).write_text(json.dumps(conf, indent=2))
    torch.save({"model": {k: v.detach().clone() for k, v in state_dict.items()}}, root / WEIGHTS_FILE)
    return root
