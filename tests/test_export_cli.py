"""``m2fp-export``: the CLI (click's CliRunner and the installed console script) and the export's guarantees.

Runs four tiny exports besides the session fixtures: the demo version (subprocess), ``--source``
with a ModelScope directory, ``--force`` and the export after a killed one; all but the first trace of
each model take its graph from the session's export cache (``conftest.export_cache``) and still run the
parity gate. Parity-gate failures and the alias tests reuse ``ms_multi``'s ONNX file instead of exporting
again (the graph cache's integrity rules: ``tests/test_graph_cache_integrity.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from m2fpkit.export import build, onnx_export, parity, sources
from m2fpkit.export.cli import main
from m2fpkit.export.specs import VersionSpec
from m2fpkit.export.specs import load as load_specs
from m2fpkit.runtime.bundle import manifest as bundle_manifest
from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.bundle.config import SCHEMA_VERSION, BundleConfig
from m2fpkit.runtime.bundle.manifest import MANIFEST
from m2fpkit.runtime.bundle.store import ALIASES, BundleStore
from reference.bundles import clone_bundle
from reference.cases import normalise_and_pad, sample_image

EXE = Path(sys.executable).with_name("m2fp-export")
HUB_ID = "damo/cv_resnet101_image-multiple-human-parsing"


def closed_loopback_port() -> int:
    """A loopback port nobody listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Whatever a test does, the ModelScope hub is a closed loopback port (no network)."""
    monkeypatch.setenv("MODELSCOPE_DOMAIN", f"127.0.0.1:{closed_loopback_port()}")


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "MODELSCOPE_DOMAIN": f"127.0.0.1:{closed_loopback_port()}", **extra}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The installed console script in a fresh interpreter."""
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), cwd=str(Path(__file__).parent))


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=True)


def entries(store_dir: Path) -> list[str]:
    return sorted(p.name for p in store_dir.iterdir()) if store_dir.is_dir() else []


def snapshot(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


def dot_entries(store_dir: Path) -> list[str]:
    return [n for n in entries(store_dir) if n.startswith(".")]


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def assert_clean_failure(result, caplog, *fragments: str) -> str:
    """Exit 1, one error line naming ``fragments``, no traceback; return that line."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert not any(r.exc_info for r in caplog.records)
    lines = [m for m in errors(caplog) if all(f in m for f in fragments)]
    assert lines, (fragments, errors(caplog))
    assert "\n" not in lines[0]
    assert "export failed for" in result.output
    return lines[0]


def assert_nothing_published(root: Path) -> None:
    store = BundleStore(root)
    assert store.versions() == []
    assert [n for n in entries(store.dir) if n != ALIASES] == []


@dataclass
class Demo:
    root: Path
    proc: subprocess.CompletedProcess

    @property
    def bundle(self) -> Path:
        return self.root / "m2fp" / "v1.2"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """``m2fp-export v1.2`` (the demo spec: trained tiny weights in the repository) run as a real subprocess;
    read-only."""
    root = tmp_path_factory.mktemp("demo") / "bundles"
    proc = run_cli("v1.2", "--bundles", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Demo(root, proc)


# ------------------------------------------------------------------------------------------ --list

def test_list_shows_the_specs(tmp_bundles):
    result = invoke("--list", "--bundles", str(tmp_bundles))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:6] == ["VERSION", "TASK", "CHANNEL", "API", "BUILT", "ALIASES"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    specs = load_specs()
    assert set(rows) == set(specs.versions) >= {"v1.0", "v1.1", "v1.2", "v2.0-beta"}
    for version, spec in specs.versions.items():
        row = rows[version]
        assert row[1] == spec.task and row[2] == spec.channel and row[3] == ",".join(spec.compatible_api)
        assert row[4] == "no"
        assert row[-1] == spec.source
    assert rows["v1.2"][5] == "latest" and rows["v1.0"][5] == "stable"
    assert not tmp_bundles.exists()  # listing creates nothing


def test_list_marks_built_versions(demo):
    result = invoke("--list", "--bundles", str(demo.root))
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert rows["v1.2"][4] == "yes" and rows["v1.0"][4] == "no"


# --------------------------------------------------------------------------------- a demo version

def test_demo_export_is_a_verified_bundle(demo):
    assert f"v1.2: {demo.bundle}" in demo.proc.stdout
    assert "Traceback" not in demo.proc.stderr
    store = BundleStore(demo.root)
    assert store.versions() == ["v1.2"]
    assert dot_entries(store.dir) == []
    info = reader.inspect(demo.bundle)
    assert {"model.onnx", "model.onnx.data", "config.json", "weights.json"} <= set(info.manifest.files)
    assert info.manifest.raw == (demo.bundle / MANIFEST).read_bytes()
    # canonical JSON of exactly the directory's files (sorted keys, indent 2, final newline)
    assert info.manifest.raw.decode() == json.dumps(bundle_manifest.build(demo.bundle), indent=2,
                                                    sort_keys=True) + "\n"
    assert info.config.weights_index == "weights.json" and info.index is not None
    assert info.index.data_file == "model.onnx.data" and info.index.tensors

    cfg = BundleConfig.read(demo.bundle)
    spec = load_specs().get("v1.2")
    assert cfg.name == "m2fp" and cfg.version == "v1.2" and cfg.schema_version == SCHEMA_VERSION
    assert cfg.task == spec.task == "multi-human"
    assert cfg.channel == spec.channel and cfg.compatible_api == spec.compatible_api and cfg.notes == spec.notes
    assert cfg.num_classes == 21 and cfg.human_class == 20
    assert cfg.source == {"kind": "dir", "uri": spec.source, "sha256": cfg.source["sha256"],
                          "trained_on": "synthetic figures (m2fp-figures)"}  # the demo checkpoint's own mark
    assert cfg.random_weights is False and cfg.trained_on == cfg.source["trained_on"]
    assert cfg.parity["passed"] is True and len(cfg.parity["inputs"]) >= 3
    assert cfg.tools["opset"] == spec.opset

    sess = ort.InferenceSession(str(demo.bundle / cfg.model_file), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["m2fp.name"] == "m2fp"
    assert meta["m2fp.version"] == "v1.2"
    assert meta["m2fp.semver"] == "1.2.0"
    assert meta["m2fp.schema_version"] == str(SCHEMA_VERSION)
    assert meta["m2fp.task"] == "multi-human" and meta["m2fp.num_classes"] == "21"
    assert meta["m2fp.created_at"] == cfg.created_at
    assert meta["m2fp.source_sha256"] == cfg.source["sha256"]

    # the graph runs at a size it was not exported or checked at
    x = normalise_and_pad(sample_image(100, 150, seed=5)).numpy()
    logits, masks = sess.run(None, {"image": x})
    assert logits.shape == (1, cfg.num_queries, 22) and masks.shape == (1, cfg.num_queries, 128 // 4, 160 // 4)

    # a fresh store: the spec file's [aliases] are created, only those whose version is built
    aliases = json.loads((store.dir / ALIASES).read_text())
    expected = {a: v for a, v in load_specs().aliases.items() if v == "v1.2"}
    assert expected == {"latest": "v1.2"}
    assert aliases == expected == store.read_aliases()


def test_demo_source_is_the_committed_trained_checkpoint(demo):
    cfg = BundleConfig.read(demo.bundle)
    specs = load_specs()
    assert cfg.source["sha256"] == sources.load_modelscope_dir(specs.get("v1.2").source).sha256
    assert cfg.source["sha256"] != sources.load_modelscope_dir(specs.get("v1.0").source).sha256


# ------------------------------------------------------------------------ existing version / --force

def test_existing_version_without_force_fails_and_keeps_the_bundle(demo, tmp_path):
    root = tmp_path / "bundles"
    shutil.copytree(demo.root, root, symlinks=True)
    bundle = root / "m2fp" / "v1.2"
    before = snapshot(bundle)
    proc = run_cli("v1.2", "--bundles", str(root))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if "already exists" in ln]
    assert len(line) == 1 and "--force" in line[0] and "v1.2" in line[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "Error: export failed for v1.2"
    assert snapshot(bundle) == before
    reader.inspect(bundle)
    assert dot_entries(root / "m2fp") == []


def test_force_replaces_the_version(demo, tmp_path):
    root = tmp_path / "bundles"
    shutil.copytree(demo.root, root, symlinks=True)
    bundle = root / "m2fp" / "v1.2"
    old_cfg = BundleConfig.read(bundle)
    old_manifest = (bundle / MANIFEST).read_bytes()
    result = invoke("v1.2", "--bundles", str(root), "--force")
    assert result.exit_code == 0, result.output
    new_cfg = BundleConfig.read(bundle)
    assert new_cfg.created_at != old_cfg.created_at
    assert (bundle / MANIFEST).read_bytes() != old_manifest
    reader.inspect(bundle)
    meta = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map
    assert meta["m2fp.created_at"] == new_cfg.created_at
    assert new_cfg.source == old_cfg.source  # same spec, same seeded weights
    assert BundleStore(root).versions() == ["v1.2"]
    assert dot_entries(root / "m2fp") == []
    assert entries(root / "m2fp") == [ALIASES, "v1.2"]


# ---------------------------------------------------------------------------------- usage errors

def test_unknown_version_without_source(tmp_bundles):
    result = invoke("v7.7", "--bundles", str(tmp_bundles))
    assert result.exit_code == 1
    assert "no spec for 'v7.7'" in result.output and "--source" in result.output
    assert "Traceback" not in result.output
    assert BundleStore(tmp_bundles).versions() == []


def test_unknown_version_subprocess(tmp_bundles):
    proc = run_cli("v7.7", "--bundles", str(tmp_bundles))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: no spec for 'v7.7'")
    assert not (tmp_bundles / "m2fp" / "v7.7").exists()


@pytest.mark.parametrize("args,fragment", [
    (["../etc"], "not a version name"),
    (["v1.2/../x"], "not a version name"),
    ([], "name a VERSION"),
    (["v1.0", "v1.2", "--source", "random:tiny"], "--source goes with exactly one VERSION"),
])
def test_usage_errors(tmp_bundles, args, fragment):
    result = invoke(*args, "--bundles", str(tmp_bundles))
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (tmp_bundles / "etc").exists() and BundleStore(tmp_bundles).versions() == []


# ----------------------------------------------------------------------------------- bad sources

@pytest.mark.parametrize("kind", ["missing-dir", "random:nope", "modelscope:bad", "random:tiny?size=3"])
def test_bad_source_uri(tmp_bundles, tmp_path, caplog, kind):
    uri, fragments = {
        "missing-dir": (str(tmp_path / "no-such-dir"), ["no-such-dir", "not a directory"]),
        "random:nope": ("random:nope", ["unknown 'nope'"]),
        "modelscope:bad": ("modelscope:bad", ["modelscope:bad", "OWNER/NAME"]),
        "random:tiny?size=3": ("random:tiny?size=3", ["unknown parameter", "size"]),
    }[kind]
    result = invoke("v1.2", "--source", uri, "--bundles", str(tmp_bundles))
    assert_clean_failure(result, caplog, *fragments)
    assert_nothing_published(tmp_bundles)


def test_bad_source_uri_subprocess(tmp_bundles):
    proc = run_cli("v1.2", "--source", "random:nope", "--bundles", str(tmp_bundles))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "Error: export failed for v1.2"
    reason = [ln for ln in lines if "ERROR" in ln]
    assert len(reason) == 1 and "unknown 'nope'" in reason[0] and "r101, tiny" in reason[0]
    assert_nothing_published(tmp_bundles)


def test_directory_without_weights(tmp_bundles, tmp_path, caplog, ms_multi):
    d = tmp_path / "half"
    d.mkdir()
    shutil.copy(ms_multi.model_dir / "configuration.json", d)
    result = invoke("v1.2", "--source", str(d), "--bundles", str(tmp_bundles))
    assert_clean_failure(result, caplog, "pytorch_model.pt", "missing")
    assert_nothing_published(tmp_bundles)


def test_source_task_mismatch(tmp_bundles, caplog, ms_multi):
    result = invoke("v1.2", "--source", str(ms_multi.model_dir), "--task", "single-human",
                    "--bundles", str(tmp_bundles))
    assert_clean_failure(result, caplog, "'single-human'", "'multi-human'")
    assert_nothing_published(tmp_bundles)


def _tamper(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    blob = torch.load(dst / "pytorch_model.pt", map_location="cpu", weights_only=True)
    edit(blob["model"])
    torch.save(blob, dst / "pytorch_model.pt")
    return dst


MISSING_KEY = "sem_seg_head.predictor.class_embed.bias"
EXTRA_KEY = "sem_seg_head.predictor.extra_embed.weight"


def test_key_mismatch_names_both_keys(tmp_bundles, tmp_path, caplog, ms_multi):
    def edit(sd):
        del sd[MISSING_KEY]
        sd[EXTRA_KEY] = torch.zeros(3, 3)

    d = _tamper(ms_multi.model_dir, tmp_path / "tampered", edit)
    result = invoke("v1.2", "--source", str(d), "--bundles", str(tmp_bundles))
    line = assert_clean_failure(result, caplog, MISSING_KEY, EXTRA_KEY)
    assert "missing" in line and "unexpected" in line
    assert_nothing_published(tmp_bundles)
    # the same through the library call
    with pytest.raises(sources.SourceError) as info:
        build.export_version(VersionSpec(version="v1.3", source=str(d), task=None), tmp_bundles)
    assert MISSING_KEY in str(info.value) and EXTRA_KEY in str(info.value)
    assert_nothing_published(tmp_bundles)


def test_shape_mismatch_is_refused(tmp_bundles, tmp_path, caplog, ms_multi):
    def edit(sd):
        sd["sem_seg_head.predictor.class_embed.weight"] = torch.zeros(5, 32)

    d = _tamper(ms_multi.model_dir, tmp_path / "tampered", edit)
    result = invoke("v1.2", "--source", str(d), "--bundles", str(tmp_bundles))
    assert_clean_failure(result, caplog, "class_embed.weight", "shape")
    assert_nothing_published(tmp_bundles)


@pytest.mark.parametrize("uri", [f"modelscope:{HUB_ID}", f"modelscope:{HUB_ID}@v1.0.1"])
def test_offline_hub_fails_fast(tmp_bundles, caplog, uri):
    port = closed_loopback_port()
    t0 = time.monotonic()
    result = invoke("v1.2", "--source", uri, "--bundles", str(tmp_bundles),
                    env={"MODELSCOPE_DOMAIN": f"127.0.0.1:{port}"})
    elapsed = time.monotonic() - t0
    line = assert_clean_failure(result, caplog, "hub", f"127.0.0.1:{port}")
    assert "offline" in line
    assert elapsed < 15, elapsed
    assert_nothing_published(tmp_bundles)


def test_offline_hub_subprocess(tmp_bundles):
    port = closed_loopback_port()
    proc = run_cli("v1.2", "--source", f"modelscope:{HUB_ID}", "--bundles", str(tmp_bundles),
                   env=cli_env(MODELSCOPE_DOMAIN=f"127.0.0.1:{port}"), timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    reason = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln]
    assert len(reason) == 1 and "hub" in reason[0] and "offline" in reason[0]
    assert_nothing_published(tmp_bundles)


# ------------------------------------------------------------------------------- --source <dir>

def test_a_demo_checkpoint_records_what_it_was_trained_on(tmp_path):
    """``configuration.json → m2fpkit → trained_on`` reaches the checkpoint's lineage (the bundle's ``source``);
    a value that is no short printable line is refused, naming the file and key."""
    from m2fpkit.export.model import config as mcfg
    from m2fpkit.export.model.m2fp import build as build_model
    from m2fpkit.export.modelscope_source import load_modelscope_dir, save_modelscope_dir

    cfg = mcfg.preset("tiny")
    weights = build_model(cfg, seed=1).state_dict()
    plain = load_modelscope_dir(save_modelscope_dir(tmp_path / "plain", cfg, weights))
    assert "trained_on" not in plain.lineage
    demo = load_modelscope_dir(save_modelscope_dir(tmp_path / "demo", cfg, weights, trained_on="drawn figures"))
    assert demo.lineage["trained_on"] == "drawn figures"
    for bad in ("", "two\nlines", "x" * 201, 3, {"a": 1}):
        conf = json.loads((tmp_path / "demo" / "configuration.json").read_text())
        conf["m2fpkit"] = {"trained_on": bad}
        (tmp_path / "demo" / "configuration.json").write_text(json.dumps(conf))
        with pytest.raises(sources.SourceError, match=r"configuration\.json: m2fpkit → trained_on"):
            load_modelscope_dir(tmp_path / "demo")


def test_source_modelscope_dir(tmp_bundles, ms_multi):
    result = invoke("v1.2", "--source", str(ms_multi.model_dir), "--bundles", str(tmp_bundles))
    assert result.exit_code == 0, result.output
    bundle = tmp_bundles / "m2fp" / "v1.2"
    assert f"v1.2: {bundle}" in result.output
    reader.inspect(bundle)
    cfg = BundleConfig.read(bundle)
    spec = load_specs().get("v1.2")
    assert cfg.version == "v1.2" and cfg.task == "multi-human"
    assert cfg.channel == spec.channel and cfg.compatible_api == spec.compatible_api
    assert cfg.source == ms_multi.config.source  # the same directory, the same weights file
    assert cfg.source["kind"] == "dir" and cfg.source["uri"] == str(ms_multi.model_dir.resolve())
    assert cfg.parity["passed"] is True
    assert BundleStore(tmp_bundles).read_aliases() == {"latest": "v1.2"}
    assert dot_entries(tmp_bundles / "m2fp") == []
    # computes what the session case's bundle of the same directory computes
    x = normalise_and_pad(sample_image(150, 200, seed=9)).numpy()
    a = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    b = ort.InferenceSession(str(ms_multi.bundle_dir / "model.onnx"),
                             providers=["CPUExecutionProvider"]).run(None, {"image": x})
    for u, v in zip(a, b):
        assert u.shape == v.shape and float(np.abs(u - v).max()) <= 1e-5


# --------------------------------------------------------------------------------- atomic publish

def test_killed_export_publishes_nothing(tmp_path):
    root = tmp_path / "bundles"
    store = BundleStore(root)
    log = open(tmp_path / "export.log", "w")
    proc = subprocess.Popen([str(EXE), "v1.2", "--bundles", str(root)], stdout=log, stderr=subprocess.STDOUT,
                            env=cli_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        staging: list[Path] = []
        while not staging and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            staging = list(store.dir.glob(".staging-*")) if store.dir.is_dir() else []
        assert staging, f"no staging directory appeared (exit {proc.poll()})"
        assert proc.poll() is None, "export finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    # a reader sees no version, only the dead export's hidden staging directory
    assert store.versions() == []
    assert not (store.dir / "v1.2").exists()
    assert [p.name for p in store.dir.iterdir() if not p.name.startswith(".")] == []
    assert [p for p in store.dir.iterdir() if p.name.startswith(".staging-v1.2-")]

    # and a new export succeeds next to the leftover
    result = invoke("v1.2", "--bundles", str(root))
    assert result.exit_code == 0, result.output
    assert store.versions() == ["v1.2"]
    reader.inspect(store.path("v1.2"))
    assert BundleConfig.read(store.path("v1.2")).version == "v1.2"


# ------------------------------------------------------------------------------------ parity gate

@pytest.fixture
def reuse_onnx(monkeypatch, ms_multi):
    """Make ``export_onnx`` copy ms_multi's already exported graph (same weights) instead of exporting."""
    calls = []

    def fake_export(model, path, *, opset, example_hw=(256, 320)):
        calls.append(path)
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copyfile(ms_multi.bundle_dir / name, Path(path).with_name(name))

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    return calls


def _spec(ms_multi, version="v5.0") -> VersionSpec:
    return VersionSpec(version=version, source=str(ms_multi.model_dir), task=None, channel="experimental")


def test_parity_gate_passes_with_the_reused_graph(reuse_onnx, ms_multi, tmp_bundles):
    """Control for the failure tests below: the shortcut itself yields a passing, published bundle."""
    result = build.export_version(_spec(ms_multi), tmp_bundles)
    assert reuse_onnx and result.config.parity["passed"] is True
    assert BundleStore(tmp_bundles).versions() == ["v5.0"]
    reader.inspect(result.bundle_dir)


def _no_tolerance(monkeypatch) -> None:
    """The gate allowing no error at all: every real graph then fails it (its rounding differs from PyTorch's)."""
    monkeypatch.setattr(parity, "NOISE_FACTOR", 0.0)
    monkeypatch.setattr(parity, "ABS_FLOOR", 0.0)


def test_parity_failure_on_tolerance_publishes_nothing(reuse_onnx, ms_multi, tmp_bundles, monkeypatch):
    _no_tolerance(monkeypatch)
    with pytest.raises(parity.ParityError) as info:
        build.export_version(_spec(ms_multi), tmp_bundles)
    msg = str(info.value)
    sizes = build.parity_sizes(ms_multi.config.preprocess)
    for h, w in sizes:
        for name in ("pred_logits", "pred_masks"):
            assert f"{name} at {h}x{w}" in msg, msg
    assert reuse_onnx
    assert_nothing_published(tmp_bundles)


@pytest.mark.parametrize("target", ["pred_logits", "pred_masks"])
def test_parity_failure_on_perturbed_output_publishes_nothing(reuse_onnx, ms_multi, tmp_bundles, monkeypatch,
                                                              target):
    real = ort.InferenceSession

    class Perturbed:
        def __init__(self, *args, **kwargs):
            self._sess = real(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._sess, name)

        def run(self, names, feeds, *args, **kwargs):
            outs = self._sess.run(names, feeds, *args, **kwargs)
            return [o + np.float32(0.5) if n == target else o for n, o in zip(names, outs)]

    monkeypatch.setattr(parity.ort, "InferenceSession", Perturbed)
    with pytest.raises(parity.ParityError) as info:
        build.export_version(_spec(ms_multi), tmp_bundles)
    msg = str(info.value)
    other = "pred_masks" if target == "pred_logits" else "pred_logits"
    for h, w in build.parity_sizes(ms_multi.config.preprocess):
        assert f"{target} at {h}x{w}" in msg, msg
        assert f"{other} at {h}x{w}" not in msg, msg
    assert_nothing_published(tmp_bundles)


def test_parity_failure_through_the_cli(reuse_onnx, ms_multi, tmp_bundles, monkeypatch, caplog):
    _no_tolerance(monkeypatch)
    result = invoke("v5.0", "--source", str(ms_multi.model_dir), "--bundles", str(tmp_bundles))
    assert_clean_failure(result, caplog, "ONNX graph differs from the PyTorch model", "pred_masks")
    assert_nothing_published(tmp_bundles)


def test_parity_failure_keeps_the_old_version_on_force(reuse_onnx, ms_multi, tmp_bundles, monkeypatch):
    first = build.export_version(_spec(ms_multi), tmp_bundles)
    manifest = (first.bundle_dir / MANIFEST).read_bytes()
    _no_tolerance(monkeypatch)
    with pytest.raises(parity.ParityError):
        build.export_version(_spec(ms_multi), tmp_bundles, force=True)
    assert (first.bundle_dir / MANIFEST).read_bytes() == manifest
    reader.inspect(first.bundle_dir)
    assert BundleStore(tmp_bundles).versions() == ["v5.0"]
    assert dot_entries(tmp_bundles / "m2fp") == []


# ------------------------------------------------------------------------------ the graph cache

def test_graph_cache_traces_an_architecture_once_for_any_weights(export_cache, uncached_tiny_export, tmp_path,
                                                                   monkeypatch, caplog):
    """The graph cache (the session's, ``conftest.export_cache``): one trace per architecture + export code,
    whatever the weights. A reused graph carries the new model's weights (the parity gate passes against
    that model) and its files equal an uncached export of the same model (a fresh trace, made by the
    session's background builder) byte for byte; ``off`` caches nothing."""
    from m2fpkit.export.model import config as mcfg
    from m2fpkit.export.model.m2fp import build as build_model
    from reference.background import UNCACHED_SEED

    traced: list[int] = []
    real_trace = onnx_export._trace

    def counting_trace(model, **kwargs):
        traced.append(1)
        return real_trace(model, **kwargs)

    monkeypatch.setattr(onnx_export, "_trace", counting_trace)
    cfg = mcfg.preset("tiny")

    def export(name: str, seed: int) -> Path:
        (tmp_path / name).mkdir()
        path = tmp_path / name / "model.onnx"
        onnx_export.export_onnx(build_model(cfg, seed=seed), path, opset=18)
        return path

    def files(path: Path) -> list[bytes]:
        return [path.read_bytes(), path.with_name(path.name + ".data").read_bytes()]

    first = export("a", seed=101)  # traced here unless an earlier test exported this architecture
    with caplog.at_level("INFO", logger="m2fpkit.export.onnx_export"):
        second = export("b", seed=UNCACHED_SEED)
    assert len(traced) <= 1 and "reused from the export cache" in caplog.text
    assert files(first)[1] != files(second)[1]  # the weights are the new model's
    report = parity.check(build_model(cfg, seed=UNCACHED_SEED), second, [(256, 320), (320, 256), (320, 320)],
                          enforce=True)
    assert report["passed"] is True
    assert (export_cache / onnx_export.cache_key(build_model(cfg), opset=18, example_hw=(256, 320))).is_dir()
    assert files(uncached_tiny_export) == files(second)
    monkeypatch.setenv(onnx_export.CACHE_ENV, "off")
    for name in ("_load", "_store"):  # the cache is shared with the run's other processes: watch its calls
        monkeypatch.setattr(onnx_export, name, lambda *args, name=name: pytest.fail(f"cache {name} called"))
    monkeypatch.setattr(onnx_export, "_trace", lambda model, **kwargs: pytest.fail("traced"))
    with pytest.raises(pytest.fail.Exception, match="traced"):  # off: no lookup, straight to a trace
        export("c", seed=UNCACHED_SEED)


def test_graph_cache_key_follows_the_architecture_not_the_weights():
    import dataclasses

    from m2fpkit.export.model import config as mcfg
    from m2fpkit.export.model.m2fp import build as build_model

    tiny = mcfg.preset("tiny")

    def key(cfg=tiny, seed=1, opset=18, example_hw=(256, 320)) -> str:
        return onnx_export.cache_key(build_model(cfg, seed=seed), opset=opset, example_hw=example_hw)

    assert key(seed=1) == key(seed=2)
    model = build_model(tiny, seed=1)
    with torch.no_grad():
        model.sem_seg_head.predictor.class_embed.bias[0] += 1.0
    assert onnx_export.cache_key(model, opset=18, example_hw=(256, 320)) == key()
    others = {key(opset=19), key(example_hw=(320, 320)), key(mcfg.preset("tiny", "single-human")),
              key(dataclasses.replace(tiny, decoder=dataclasses.replace(tiny.decoder, dec_layers=6)))}
    assert key() not in others and len(others) == 4
    # what only pre- and postprocessing read is not part of the graph
    assert key(dataclasses.replace(tiny, parsing_ins_score_thr=0.9, single_human_size=(256, 256))) == key()


# ------------------------------------------------------------------------------------------ aliases
# Aliases belong to the store's operator: an export writes an alias only when it does not exist yet, or
# when asked (--alias NAME, --apply-aliases); a failed export changes nothing in the store. The store holds
# cheap clones of the session's bundle as v1.2 (the packaged spec file's latest) and v9.0; the operator
# promoted latest to v9.0.

@pytest.fixture(scope="module")
def promoted_root(ms_multi, tmp_path_factory) -> Path:
    """v1.2 and v9.0 published, the operator's ``latest`` promoted to v9.0 (read-only: copy it)."""
    root = tmp_path_factory.mktemp("promoted")
    clone_bundle(ms_multi.bundle_dir, root, "v1.2", preprocess={"short_edge": 160})
    clone_bundle(ms_multi.bundle_dir, root, "v9.0", preprocess={"short_edge": 160})
    BundleStore(root).set_alias("latest", "v9.0")  # what `m2fp-bundle promote v9.0 --alias latest` writes
    return root


@pytest.fixture
def store(promoted_root, tmp_path) -> BundleStore:
    root = tmp_path / "bundles"
    shutil.copytree(promoted_root, root)
    return BundleStore(root)


def export_into(store: BundleStore, *args: str):
    return CliRunner().invoke(main, [*args, "--bundles", str(store.root)], catch_exceptions=True)


def alias_state(store: BundleStore) -> tuple[bytes, list[str]]:
    return (store.dir / ALIASES).read_bytes(), sorted(p.name for p in store.dir.iterdir())


def test_export_keeps_an_operators_promotion(store, reuse_onnx, ms_multi):
    result = export_into(store, "v1.0", "--source", str(ms_multi.model_dir))
    assert result.exit_code == 0, result.output
    assert store.versions() == ["v1.0", "v1.2", "v9.0"]
    # latest stays where the operator put it; stable did not exist yet, so the spec's is written
    assert store.read_aliases() == {"latest": "v9.0", "stable": "v1.0"}


@pytest.mark.parametrize("failure,flags", [("parity gate", ()),
                                           ("bad source", ("--alias", "latest", "--apply-aliases"))])
def test_a_failed_export_changes_nothing_in_the_store(store, reuse_onnx, ms_multi, monkeypatch, failure, flags):
    (store.dir / ALIASES).write_text('{"latest":"v9.0"}')  # not the canonical form: compared byte for byte
    before = alias_state(store)
    source = str(ms_multi.model_dir)
    if failure == "parity gate":
        _no_tolerance(monkeypatch)
    else:
        source = "random:nope"
    result = export_into(store, "v1.0", "--source", source, *flags)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert alias_state(store) == before


def test_alias_option_moves_the_named_alias(store, reuse_onnx, ms_multi):
    result = export_into(store, "v5.0", "--source", str(ms_multi.model_dir), "--alias", "latest", "--alias", "canary")
    assert result.exit_code == 0, result.output
    assert store.read_aliases() == {"latest": "v5.0", "canary": "v5.0"}


def test_apply_aliases_applies_the_spec_files_aliases(store):
    result = export_into(store, "--apply-aliases")
    assert result.exit_code == 0, result.output
    # the packaged spec file: latest = v1.2 (published), stable = v1.0 (not published: left out)
    assert store.read_aliases() == {"latest": "v1.2"}


def test_alias_option_is_checked_before_anything_is_exported(store):
    before = alias_state(store)
    for args in (["v1.0", "--alias", "Not An Alias"], ["v1.0", "v1.2", "--alias", "latest"]):
        result = export_into(store, *args)
        assert result.exit_code == 2, result.output
    assert alias_state(store) == before


def test_help_says_who_owns_aliases():
    text = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    assert "--alias" in text and "--apply-aliases" in text and "operator" in text
