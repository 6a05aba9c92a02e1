"""``m2fp-export --source mlflow:…``: a real MLflow registry in a local sqlite file, no server, no network.

The module's registry holds one registered model, ``m2fp-tiny``, whose versions are runs' artifacts:
version 1 and 2 are tiny ModelScope checkpoints with different weights, version 3 is not a checkpoint.
Alias ``champion`` points to version 1. Costs two tiny exports (by alias, by version number); the
error cases stop before any export.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from m2fpkit.export import mlflow_source, sources
from m2fpkit.export.cli import main
from m2fpkit.export.model import config as mcfg
from m2fpkit.export.model.m2fp import build
from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.delivery.cli import main as bundle_cli

MODEL = "m2fp-tiny"
#: never phone home from a test run (MLflow's usage telemetry)
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_REGISTRY_URI": None}


def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(mp: pytest.MonkeyPatch) -> None:
    for k, v in QUIET_ENV.items():
        if v is None:
            mp.delenv(k, raising=False)
        else:
            mp.setenv(k, v)


@dataclass
class Registry:
    uri: str                      # sqlite:////abs/path/mlflow.db (tracking and registry)
    checkpoints: dict[int, Path]  # model version → the checkpoint directory logged for it
    run_ids: dict[int, str]

    def client(self):
        from mlflow import MlflowClient
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def digest(root: Path) -> str:
    """The artifact digest as docs/mlflow.md documents it, computed here independently of the exporter."""
    files = sorted((p.relative_to(root).as_posix().encode(), p) for p in root.rglob("*") if p.is_file())
    text = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {rel.decode()}\n" for rel, p in files)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """A sqlite registry with a file artifact store, both under a temporary directory."""
    with pytest.MonkeyPatch.context() as mp:
        quiet_env(mp)
        from mlflow import MlflowClient

        root = tmp_path_factory.mktemp("mlflow")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.create_experiment("m2fp", artifact_location=(root / "artifacts").as_uri())
        client.create_registered_model(MODEL)
        cfg = mcfg.preset("tiny", "multi-human")
        checkpoints, run_ids = {}, {}
        for version, seed in ((1, 31), (2, 32), (3, None)):
            d = root / f"checkpoint{version}"
            if seed is None:
                d.mkdir()
                (d / "README.txt").write_text("notes, not a checkpoint\n")
            else:
                sources.save_modelscope_dir(d, cfg, build(cfg, seed=seed).state_dict())
            run = client.create_run(exp)
            client.log_artifacts(run.info.run_id, str(d), "checkpoint")
            client.set_terminated(run.info.run_id)
            mv = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/checkpoint", run_id=run.info.run_id)
            assert int(mv.version) == version
            checkpoints[version], run_ids[version] = d, run.info.run_id
        client.set_registered_model_alias(MODEL, "champion", "1")
        return Registry(uri, checkpoints, run_ids)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    quiet_env(monkeypatch)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", f"127.0.0.1:{closed_loopback_port()}")


def export(*args: str, tracking_uri: str | None):
    return CliRunner().invoke(main, list(args), env={"MLFLOW_TRACKING_URI": tracking_uri}, catch_exceptions=True)


def expected_lineage(reg: Registry, version: int, alias: str | None, uri: str) -> dict:
    ck = reg.checkpoints[version]
    weights_sha256 = hashlib.sha256((ck / sources.WEIGHTS_FILE).read_bytes()).hexdigest()
    return {"kind": "mlflow", "uri": uri, "sha256": weights_sha256,
            "registry_uri": reg.uri, "tracking_uri": reg.uri, "model_name": MODEL, "model_version": version,
            "alias": alias, "run_id": reg.run_ids[version],
            "artifact_uri": f"runs:/{reg.run_ids[version]}/checkpoint", "artifact_digest": digest(ck)}


# ------------------------------------------------------------------------------------------- exports
def test_export_by_alias_records_the_lineage_and_tags_the_model_version(registry, tmp_path):
    bundles = tmp_path / "bundles"
    uri = f"mlflow:models:/{MODEL}@champion"
    result = export("v3.0", "--source", uri, "--bundles", str(bundles), "--mlflow-tag", tracking_uri=registry.uri)
    assert result.exit_code == 0, result.output
    bundle = bundles / "m2fp" / "v3.0"

    info = reader.inspect(bundle)  # verified: manifest, config (untrusted parse), weights index
    assert info.config.source == expected_lineage(registry, 1, "champion", uri)
    verified = CliRunner().invoke(bundle_cli, ["verify", str(bundle)])
    assert verified.exit_code == 0 and "verified" in verified.output, verified.output

    tags = registry.client().get_model_version(MODEL, "1").tags
    assert "m2fpkit.bundle.v3.0" in result.output
    tag = json.loads(tags["m2fpkit.bundle.v3.0"])
    assert tag["bundle"] == "m2fp/v3.0"
    assert tag["content_key"] == info.identity == reader.identity_of(bundle)
    parity = info.config.parity
    assert tag["parity"]["passed"] is True and tag["parity"]["gate"] == "enforced"
    for output in ("pred_logits", "pred_masks"):
        assert tag["parity"][output]["max_abs"] == max(e[output]["max_abs"] for e in parity["inputs"])
        assert tag["parity"][output]["noise_ratio"] == max(e[output]["noise_ratio"] for e in parity["inputs"])
    assert tag["parity"]["label_agreement"] == min(e["label_agreement"] for e in parity["inputs"])
    assert "m2fpkit.bundle.v3.0" not in registry.client().get_model_version(MODEL, "2").tags


def test_export_by_version_number_takes_that_versions_weights(registry, tmp_path):
    bundles = tmp_path / "bundles"
    uri = f"mlflow:models:/{MODEL}/2"
    result = export("v3.1", "--source", uri, "--bundles", str(bundles), tracking_uri=registry.uri)
    assert result.exit_code == 0, result.output
    config = reader.inspect(bundles / "m2fp" / "v3.1").config
    assert config.source == expected_lineage(registry, 2, None, uri)
    assert config.source["sha256"] != expected_lineage(registry, 1, None, uri)["sha256"]
    # no --mlflow-tag: the registry is left alone
    assert not any(k.startswith("m2fpkit.") for k in registry.client().get_model_version(MODEL, "2").tags)


def test_an_alias_resolves_to_the_version_it_points_to_now(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    client = registry.client()
    try:
        for version in (1, 2):
            client.set_registered_model_alias(MODEL, "moving", str(version))
            ck = sources.resolve(f"mlflow:models:/{MODEL}@moving")
            assert ck.kind == "mlflow" and ck.lineage["model_version"] == version
            assert ck.sha256 == expected_lineage(registry, version, "moving", "")["sha256"]
            assert ck.lineage["artifact_digest"] == digest(registry.checkpoints[version])
    finally:
        client.delete_registered_model_alias(MODEL, "moving")


def test_recorded_uris_carry_no_credentials():
    assert mlflow_source.redact("https://alice:s3cret@mlflow.example.com:5000/x?y=1") == \
        "https://mlflow.example.com:5000/x?y=1"
    assert mlflow_source.redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


# -------------------------------------------------------------------------------------------- errors
def assert_one_line_failure(result, caplog, bundles: Path, *fragments: str) -> None:
    """Exit ≠ 0, no traceback, one error line naming ``fragments``, nothing published."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert not any(r.exc_info for r in caplog.records)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    assert BundleStore(bundles).versions() == []


@pytest.mark.parametrize(("source", "fragments"), [
    ("mlflow:models:/no-such-model@champion", ["no-such-model", "not found"]),
    ("mlflow:models:/no-such-model/1", ["no-such-model", "not found"]),
    (f"mlflow:models:/{MODEL}/9", [MODEL, "version=9", "not found"]),
    (f"mlflow:models:/{MODEL}@nosuch", ["alias nosuch not found"]),
    (f"mlflow:models:/{MODEL}/3", ["not a ModelScope checkpoint directory", "README.txt", "version 3"]),
    (f"mlflow:models:/{MODEL}/latest", ["not a version number", "pin a version or use an alias"]),
    (f"mlflow:models:/{MODEL}", ["name a version or an alias"]),
    ("mlflow:runs:/abc/model", ["expected mlflow:models:/NAME/VERSION"]),
])
def test_a_bad_mlflow_source_fails_in_one_line(registry, tmp_path, caplog, source, fragments):
    bundles = tmp_path / "bundles"
    result = export("v3.2", "--source", source, "--bundles", str(bundles), tracking_uri=registry.uri)
    assert_one_line_failure(result, caplog, bundles, *fragments)


def test_no_tracking_uri_is_named_as_the_problem(registry, tmp_path, caplog):
    bundles = tmp_path / "bundles"
    result = export("v3.2", "--source", f"mlflow:models:/{MODEL}@champion", "--bundles", str(bundles),
                    tracking_uri=None)
    assert_one_line_failure(result, caplog, bundles, "MLFLOW_TRACKING_URI is not set")


def test_a_missing_sqlite_database_is_refused_not_created(tmp_path, caplog):
    bundles, db = tmp_path / "bundles", tmp_path / "typo.db"
    result = export("v3.2", "--source", f"mlflow:models:/{MODEL}@champion", "--bundles", str(bundles),
                    tracking_uri=f"sqlite:///{db}")
    assert_one_line_failure(result, caplog, bundles, "no MLflow database", str(db))
    assert not db.exists()


@pytest.mark.parametrize(("content", "fragments"), [
    (b"not a database, just bytes" * 100, ["MLflow registry", "failed", "DatabaseError"]),
    (b"", ["no-model", "not found"]),  # an empty file is an empty sqlite database: MLflow sets it up, finds nothing
])
def test_a_sqlite_file_that_is_no_registry_fails_in_one_line(tmp_path, caplog, content, fragments):
    bundles, db = tmp_path / "bundles", tmp_path / "mlflow.db"
    db.write_bytes(content)
    result = export("v3.2", "--source", "mlflow:models:/no-model/1", "--bundles", str(bundles),
                    tracking_uri=f"sqlite:///{db}")
    assert_one_line_failure(result, caplog, bundles, *fragments)


def test_a_tracking_uri_with_a_bad_port_is_named(tmp_path, caplog):
    bundles = tmp_path / "bundles"
    result = export("v3.2", "--source", f"mlflow:models:/{MODEL}/1", "--bundles", str(bundles),
                    tracking_uri="http://127.0.0.1:99999")
    assert_one_line_failure(result, caplog, bundles, "MLFLOW_TRACKING_URI: not a usable URI")


def test_an_unreachable_tracking_server_fails_fast(tmp_path, caplog):
    bundles = tmp_path / "bundles"
    start = time.monotonic()
    result = export("v3.2", "--source", f"mlflow:models:/{MODEL}/1", "--bundles", str(bundles),
                    tracking_uri=f"http://alice:s3cretpw@127.0.0.1:{closed_loopback_port()}")
    assert_one_line_failure(result, caplog, bundles, "cannot reach the MLflow server at 127.0.0.1:",
                            "MLFLOW_TRACKING_URI")
    assert "s3cretpw" not in caplog.text and "alice" not in caplog.text
    assert time.monotonic() - start < mlflow_source.PROBE_TIMEOUT + 5


def test_without_the_mlflow_extra_the_cli_says_which_extra(registry, tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is not installed
    bundles = tmp_path / "bundles"
    result = export("v3.2", "--source", f"mlflow:models:/{MODEL}@champion", "--bundles", str(bundles),
                    tracking_uri=registry.uri)
    assert_one_line_failure(result, caplog, bundles, "mlflow package is missing", "[mlflow] extra")


@pytest.mark.parametrize(("source", "fragment"), [
    ("random:tiny?seed=3", "--mlflow-tag needs an mlflow: source"),
    ("mlflow:models:/x/notanumber", "not a version number"),
])
def test_mlflow_tag_is_checked_before_anything_is_exported(tmp_path, source, fragment):
    result = export("v3.2", "--source", source, "--bundles", str(tmp_path / "b"), "--mlflow-tag", tracking_uri=None)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (tmp_path / "b" / "m2fp").exists()


# ------------------------------------------------------------------------------------ source strings
SOURCE_TEXT = st.one_of(
    st.text(),
    st.builds(lambda p, t: p + t, st.sampled_from(["mlflow:", "mlflow:models:/", "random:", "modelscope:",
                                                   "mlflow:models:/m@", "mlflow:models:/m/"]), st.text()),
)


@given(SOURCE_TEXT)
def test_any_source_string_parses_or_is_refused_cleanly(text):
    try:
        ref = sources.parse(text)
    except sources.SourceError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(ref, (sources.DirSource, sources.HubSource, sources.RandomSource, sources.MlflowSource))
    if isinstance(ref, sources.MlflowSource):
        assert ref.name.strip() and "/" not in ref.name and ":" not in ref.name
        assert (ref.version is None) != (ref.alias is None)
        assert ref.version is None or ref.version >= 1


NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/:"), min_size=1,
                max_size=40).filter(lambda n: n.strip() and n not in (".", ".."))
ALIASES = st.from_regex(r"[\w-]{1,30}", fullmatch=True)


@given(NAMES, st.one_of(st.integers(1, 10**12).map(lambda v: (v, None)), ALIASES.map(lambda a: (None, a))))
def test_an_mlflow_source_round_trips_through_its_uri(name, selector):
    version, alias = selector
    ref = sources.MlflowSource(name, version=version, alias=alias)
    assert sources.parse(ref.uri) == ref


def test_source_strings_name_what_they_are():
    assert sources.parse("mlflow:models:/m2fp@champion") == sources.MlflowSource("m2fp", alias="champion")
    assert sources.parse("mlflow:models:/m2fp/3") == sources.MlflowSource("m2fp", version=3)
    assert sources.parse("random:tiny?seed=12&task=single-human") == sources.RandomSource("tiny", 12, "single-human")
    assert sources.parse("modelscope:damo/x@v1.0.1") == sources.HubSource("damo/x", "v1.0.1")
    assert sources.parse(os.sep + "models" + os.sep + "m2fp") == sources.DirSource("/models/m2fp")
