"""What every export source shares, in one module that imports no source: the error, the resolved
:class:`Checkpoint`, the parsed references (:data:`SourceRef`, made by ``sources.parse``) and the
reachability probe. ``sources`` dispatches to ``modelscope_source`` and ``mlflow_source``; those two
import this module and never ``sources``, so no source module imports another in a cycle.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from m2fpkit.runtime.errors import ExportError

from .model import config as mcfg
from .model.m2fp import M2FP, build

#: the files of a ModelScope model directory
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


def probe(host: str, port: int, timeout: float, what: str, hint: str) -> None:
    """Fail within ``timeout`` when ``host:port`` takes no TCP connection (offline), instead of a client's retries."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise SourceError(f"cannot reach {what} at {host}:{port} ({exc}); {hint}") from None


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
