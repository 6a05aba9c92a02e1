"""A ModelScope model directory (``configuration.json`` + ``pytorch_model.pt``) as an export source: on disk,
from the ModelScope hub (online only; fails within seconds when offline), and written (tests, demos)."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from pathlib import Path

import torch

from m2fpkit.runtime.bundle import jsonfile
from m2fpkit.runtime.bundle.config import MAX_TRAINED_ON
from m2fpkit.runtime.errors import MalformedFile

from .model import config as mcfg
from .source_types import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, SourceError, probe

#: ``configuration.json``'s key for what this project adds to a ModelScope model directory (ModelScope ignores it)
OURS_KEY = "m2fpkit"


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
    ck = Checkpoint(kind="dir", uri=uri or str(root.resolve()), config=config,
                    sha256=_sha256_file(w_path), state_dict=sd)
    trained_on = _trained_on(raw, cfg_path)
    if trained_on is not None:
        ck.lineage["trained_on"] = trained_on
    return ck


def _trained_on(raw: dict, cfg_path: Path) -> str | None:
    """``configuration.json → m2fpkit → trained_on``: what a demo checkpoint was trained on (the bundle records it
    and the runtime says so beside every result), None when absent."""
    ours = raw.get(OURS_KEY)
    if ours is None:
        return None
    value = ours.get("trained_on") if isinstance(ours, dict) else None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TRAINED_ON or not value.isprintable():
        raise SourceError(f"{cfg_path}: {OURS_KEY} → trained_on must be a line of at most {MAX_TRAINED_ON} printable "
                          f"characters")
    return value


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


def save_modelscope_dir(path: str | os.PathLike, config: mcfg.M2FPConfig, state_dict: dict[str, torch.Tensor],
                        *, trained_on: str | None = None) -> Path:
    """Write a ModelScope-format model directory (used by tests and demos); ``trained_on`` marks a demo
    checkpoint (``configuration.json → m2fpkit → trained_on``)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    conf: dict = {"framework": "pytorch", "task": "image-segmentation",
                  "pipeline": {"type": "image-human-parsing"}, "model": config.to_modelscope()}
    if trained_on is not None:
        conf[OURS_KEY] = {"trained_on": trained_on}
    (root / CONFIG_FILE).write_text(json.dumps(conf, indent=2))
    torch.save({"model": {k: v.detach().clone() for k, v in state_dict.items()}}, root / WEIGHTS_FILE)
    return root
