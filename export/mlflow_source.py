"""An MLflow model registry as an export source, and the export recorded back on the model version.

The registry is the one ``$MLFLOW_TRACKING_URI`` names (``$MLFLOW_REGISTRY_URI`` if set, as in MLflow):
a local ``sqlite:`` store needs no server, an ``http(s):`` one is probed first so that offline fails
within seconds. The model version's artifacts must be a ModelScope checkpoint directory. The lineage
(registry, model name, version, alias used, run id, artifact digest) lands in ``config.json → source``;
URIs are recorded without user info, so no password reaches a bundle.

Artifact digest: SHA-256 over the lines ``"<sha256 of file>  <relative POSIX path>\\n"`` of every
downloaded file, sorted by path (UTF-8 bytes) — what ``sha256sum`` of the sorted files, hashed again, gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .modelscope_source import load_modelscope_dir
from .source_types import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, MlflowSource, SourceError, probe

log = logging.getLogger(__name__)

TRACKING_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"
#: model version tag written by ``--mlflow-tag``, one per bundle version (``m2fpkit.bundle.v1.2``)
TAG_PREFIX = "m2fpkit.bundle."
PROBE_TIMEOUT = 5.0
MISSING_EXTRA = "the mlflow package is missing: install with the [mlflow] extra (pip install -e '.[mlflow]')"


@dataclass(frozen=True)
class Registry:
    """Where to look: the tracking and registry URIs as configured (with any credentials they hold)."""

    tracking_uri: str
    registry_uri: str

    @classmethod
    def from_env(cls) -> Registry:
        tracking = os.environ.get(TRACKING_ENV, "").strip()
        if not tracking:
            raise SourceError(f"{TRACKING_ENV} is not set: point it at the registry, e.g. "
                              "sqlite:////abs/path/mlflow.db or https://mlflow.example.com")
        registry = cls(tracking, os.environ.get(REGISTRY_ENV, "").strip() or tracking)
        for env, uri in ((TRACKING_ENV, registry.tracking_uri), (REGISTRY_ENV, registry.registry_uri)):
            try:
                _ = urllib.parse.urlsplit(uri).port  # urlsplit checks the authority, .port the port
            except ValueError as exc:
                raise SourceError(f"{env}: not a usable URI ({exc})") from None
        return registry

    def client(self) -> Any:
        """An ``MlflowClient`` for this registry, after checking that it can be reached without side effects."""
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise SourceError(MISSING_EXTRA) from None
        for uri in dict.fromkeys((self.tracking_uri, self.registry_uri)):
            _check_reachable(uri)
        with _registry_errors(f"opening {redact(self.registry_uri)}", self):
            return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)


def redact(uri: str) -> str:
    """``uri`` without the user info of its authority (``https://u:p@host/x`` → ``https://host/x``)."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return "(unparseable URI)"
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _check_reachable(uri: str) -> None:
    """An http(s) server takes connections; a sqlite database file exists (MLflow would create an empty one)."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        port = parts.port or (443 if scheme == "https" else 80)
        probe(parts.hostname or "", port, PROBE_TIMEOUT, "the MLflow server",
              f"offline? check {TRACKING_ENV} / {REGISTRY_ENV} ({redact(uri)})")
    elif scheme.startswith("sqlite"):
        try:
            from sqlalchemy.engine import make_url
        except ImportError:
            raise SourceError(MISSING_EXTRA) from None
        try:
            database = make_url(uri).database
        except Exception as exc:  # sqlalchemy's ArgumentError and friends
            raise SourceError(f"{redact(uri)}: not a database URI ({exc})") from None
        if not database or database == ":memory:" or not Path(database).is_file():
            raise SourceError(f"{redact(uri)}: no MLflow database at {database or '(none)'} "
                              f"(sqlite:////abs/path/mlflow.db names an absolute path)")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def artifact_digest(root: Path) -> str:
    """SHA-256 of the sorted ``"<file sha256>  <path>"`` lines of every file under ``root`` (see module doc)."""
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix().encode())
    h = hashlib.sha256()
    for p in files:
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                fh.update(chunk)
        h.update(f"{fh.hexdigest()}  {p.relative_to(root).as_posix()}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _registry_errors(what: str, registry: Registry) -> Iterator[None]:
    """Errors of a registry call as one-line :class:`SourceError` s, without the URIs' credentials."""
    from mlflow.exceptions import MlflowException

    def clean(exc: BaseException) -> str:
        text = _first_line(exc)
        for uri in (registry.tracking_uri, registry.registry_uri):
            text = text.replace(uri, redact(uri))
        return text

    try:
        yield
    except MlflowException as exc:
        raise SourceError(f"{what}: {clean(exc)} (registry {redact(registry.registry_uri)})") from None
    except Exception as exc:  # the stores raise their own types (sqlalchemy, requests) for a broken registry
        raise SourceError(f"{what}: the MLflow registry {redact(registry.registry_uri)} failed: "
                          f"{type(exc).__name__}: {clean(exc)}") from None


def load(ref: MlflowSource) -> Checkpoint:
    """Resolve ``ref`` to one model version, download its artifacts and load them as a ModelScope directory."""
    registry = Registry.from_env()
    client = registry.client()
    import mlflow.artifacts

    with _registry_errors(ref.uri, registry):
        if ref.alias:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            mv = client.get_model_version(ref.name, str(ref.version))
    with tempfile.TemporaryDirectory(prefix="m2fp-mlflow-") as tmp:
        with _registry_errors(f"{ref.uri}: downloading the artifacts of version {mv.version}", registry):
            # the version resolved above, not the alias again: an alias moved meanwhile cannot mix two versions
            path = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{ref.name}/{mv.version}", dst_path=tmp,
                tracking_uri=registry.tracking_uri, registry_uri=registry.registry_uri))
        if not path.is_dir() or not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else [path.name]
            raise SourceError(f"{ref.uri}: the artifacts of version {mv.version} are not a ModelScope checkpoint "
                              f"directory (need {CONFIG_FILE} and {WEIGHTS_FILE} at the top; found: "
                              f"{', '.join(found) or 'nothing'})")
        digest = artifact_digest(path)
        try:
            ck = load_modelscope_dir(path, uri=ref.uri)
        except SourceError as exc:
            raise SourceError(f"{ref.uri} (version {mv.version}): {str(exc).replace(str(path), 'artifacts')}") from None
    ck.kind = "mlflow"
    ck.lineage = {
        "registry_uri": redact(registry.registry_uri), "tracking_uri": redact(registry.tracking_uri),
        "model_name": ref.name, "model_version": int(mv.version), "alias": ref.alias,
        "run_id": mv.run_id or None, "artifact_uri": redact(str(mv.source)), "artifact_digest": digest,
    }
    log.info("%s: version %s of %r (run %s), artifact digest %s…", ref.uri, mv.version, ref.name,
             mv.run_id or "-", digest[:12])
    return ck


def parity_summary(parity: dict[str, Any]) -> dict[str, Any]:
    """The gate's verdict and worst figures per output over every checked input size."""
    out: dict[str, Any] = {"passed": parity.get("passed"), "gate": parity.get("gate")}
    for entry in parity.get("inputs", []):
        for name, figures in entry.items():
            if isinstance(figures, dict) and "noise_ratio" in figures:
                worst = out.setdefault(name, {"max_abs": 0.0, "noise_ratio": 0.0})
                worst["max_abs"] = max(worst["max_abs"], figures.get("max_abs", 0.0))
                worst["noise_ratio"] = max(worst["noise_ratio"], figures["noise_ratio"])
            elif name == "label_agreement":
                out["label_agreement"] = min(out.get("label_agreement", 1.0), figures)
    return out


def tag_bundle(bundle_dir: Path) -> tuple[str, str]:
    """Record a published bundle on the model version it came from; returns the tag ``(key, value)``.

    The value is JSON: bundle version, content key (:func:`m2fpkit.runtime.bundle.reader.identity` of
    the verified bundle) and the parity figures. The bundle must come from an ``mlflow:`` source.
    """
    from m2fpkit.runtime.bundle import reader

    info = reader.inspect(bundle_dir)
    source = info.config.source
    if (source.get("kind") != "mlflow" or not isinstance(source.get("model_name"), str)
            or not isinstance(source.get("model_version"), int)):
        raise SourceError(f"{info.version}: --mlflow-tag needs a bundle exported from an mlflow: source, "
                          f"this one is from {source.get('uri')!r}")
    registry = Registry.from_env()
    if redact(registry.registry_uri) != source.get("registry_uri"):
        raise SourceError(f"{info.version}: exported from the registry {source.get('registry_uri')}, "
                          f"but {TRACKING_ENV} now names {redact(registry.registry_uri)}")
    key = TAG_PREFIX + info.version
    value = json.dumps({"bundle": f"{info.config.name}/{info.version}", "content_key": info.identity,
                        "parity": parity_summary(info.config.parity)}, sort_keys=True, separators=(",", ":"))
    client = registry.client()
    name, version = source["model_name"], str(source["model_version"])
    with _registry_errors(f"{info.version}: tagging {name!r} version {version}", registry):
        client.set_model_version_tag(name, version, key, value)
    log.info("%s: tagged %r version %s with %s", info.version, name, version, key)
    return key, value
