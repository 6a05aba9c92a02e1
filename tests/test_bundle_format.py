"""The bundle format without any export: config.json schema, manifest, store, aliases, palette, versions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from m2fpkit.runtime.bundle import manifest, reader
from m2fpkit.runtime.bundle.config import (
    GOLDEN_MIN_AGREEMENT,
    SCHEMA_VERSION,
    BundleConfig,
    Golden,
    Postprocess,
    Preprocess,
    TensorSpec,
)
from m2fpkit.runtime.bundle.manifest import MANIFEST
from m2fpkit.runtime.bundle.store import ALIASES, BundleStore
from m2fpkit.runtime.bundle.versions import SemVer, check_name, is_alias_name, is_version_name
from m2fpkit.runtime.bundle.writer import seal, stage
from m2fpkit.runtime.errors import BundleError, IntegrityError, InvalidVersionName, MalformedFile, VersionExists
from m2fpkit.runtime.palette import KNOWN_COLOURS, palette_for, voc_colour

CIHP = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks",
    "Pants", "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg",
    "Right-leg", "Left-shoe", "Right-shoe", "Human",
)
LIP = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat", "Socks",
    "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg",
    "Right-leg", "Left-shoe", "Right-shoe",
)
#: The LIP/CIHP visualisation palette (LIP_JPPNet ``label_colours``), index = class id.
LIP_PALETTE = [
    (0, 0, 0), (128, 0, 0), (255, 0, 0), (0, 85, 0), (170, 0, 51), (255, 85, 0), (0, 0, 85), (0, 119, 221),
    (85, 85, 0), (0, 85, 85), (85, 51, 0), (52, 86, 128), (0, 128, 0), (0, 0, 255), (51, 170, 221),
    (0, 255, 255), (85, 255, 170), (170, 255, 85), (255, 255, 0), (255, 170, 0),
]


def make_config(task: str = "multi-human", version: str = "v1.2", **overrides) -> BundleConfig:
    classes = CIHP if task == "multi-human" else LIP
    pre = (Preprocess() if task == "multi-human"
           else Preprocess(resize="center-canvas", canvas=(384, 512), canvas_fill=128))
    cfg = BundleConfig(
        name="m2fp", version=version, created_at="2025-01-01T00:00:00Z", task=task, backbone="resnet101",
        classes=classes, palette=tuple(palette_for(classes)), num_queries=100,
        inputs=(TensorSpec("image", "float32", (1, 3, "height", "width")),),
        outputs=(TensorSpec("pred_logits", "float32", (1, 100, len(classes) + 1)),
                 TensorSpec("pred_masks", "float32", (1, 100, "height/4", "width/4"))),
        compatible_api=("1.0", "1.1"), preprocess=pre, postprocess=Postprocess(instance_paste_threshold=0.5),
        channel="recommended", notes="test", human_class=20 if task == "multi-human" else None,
        source={"kind": "random", "uri": "random:tiny?seed=1", "sha256": "0" * 64},
        tools={"opset": 18}, parity={"passed": True, "inputs": [{"height": 640, "width": 640}]},
        architecture={"parameters": 123},
    )
    return dataclasses.replace(cfg, **overrides)


def raw_config(task: str = "multi-human") -> dict:
    return json.loads(make_config(task).to_json())


def config_error(raw) -> str:
    with pytest.raises(BundleError) as info:
        BundleConfig.from_dict(raw)
    return str(info.value)


# ---------------------------------------------------------------------------------- config.json

@pytest.mark.parametrize("task", ["multi-human", "single-human"])
def test_config_round_trip(task):
    cfg = make_config(task)
    text = cfg.to_json()
    raw = json.loads(text)
    assert BundleConfig.from_dict(raw) == cfg
    assert raw["schema_version"] == SCHEMA_VERSION
    assert raw["num_classes"] == len(cfg.classes)
    assert raw["semver"] == "1.2.0"
    # sorted keys, so equal configs give byte-equal files
    assert text == json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_random_weights_are_read_from_the_source_not_the_name():
    assert make_config().random_weights is True and "m2fp-export" in make_config().weights_note
    assert make_config(source={"uri": "random:r101?seed=3"}).random_weights is True
    for source in ({"kind": "dir", "uri": "/models/m2fp", "sha256": "1" * 64},
                   {"kind": "modelscope", "uri": "modelscope:damo/x@v1.0.1", "sha256": "1" * 64}, {}):
        cfg = make_config(version="v2.0-random", source=source)  # a name never decides it
        assert cfg.random_weights is False and cfg.weights_note is None, source


def test_a_demo_checkpoint_says_what_it_was_trained_on_and_nothing_else_is_echoed():
    trained = {"kind": "dir", "uri": "/x/demo_weights/v1.2", "sha256": "1" * 64,
               "trained_on": "synthetic figures (m2fp-figures)"}
    cfg = make_config(source=trained)
    assert cfg.random_weights is False and cfg.trained_on == trained["trained_on"]
    assert cfg.weights_note is not None and "trained on synthetic figures (m2fp-figures)" in cfg.weights_note
    for bad in ("", "x" * 201, "line\nbreak", "<b>\x1b[31m</b>", 7, None, ["a"]):
        cfg = make_config(source={**trained, "trained_on": bad})
        assert cfg.trained_on is None and cfg.weights_note is None, bad


def test_config_input_size():
    assert make_config("single-human").input_size == [512, 384]  # [height, width] of a 384x512 (W,H) canvas
    assert make_config("multi-human").input_size is None


def test_config_read_from_directory(tmp_path):
    cfg = make_config()
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert BundleConfig.read(tmp_path) == cfg


def test_config_read_missing_and_broken(tmp_path):
    with pytest.raises(BundleError, match="config.json is missing"):
        BundleConfig.read(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        BundleConfig.read(tmp_path)


def test_config_not_an_object():
    assert "JSON object" in config_error([1, 2])


# (task, key path to change, new value or KeyError to delete, text the error must contain)
BAD = [
    ("multi-human", "schema_version", 2, "config.json → schema_version"),
    ("multi-human", "schema_version", KeyError, "config.json → schema_version: missing"),
    ("multi-human", "schema_version", "1", "config.json → schema_version"),
    ("multi-human", "palette", [[0, 0, 0]] * 20, "config.json → palette: 20 colours for 21 classes"),
    ("multi-human", "palette.3", [0, 0, 256], "config.json → palette → 3"),
    ("multi-human", "palette.4", [0, 0], "config.json → palette → 4"),
    ("multi-human", "palette.5", "#ff0000", "config.json → palette → 5"),
    ("multi-human", "palette.6", [0, True, 0], "config.json → palette → 6"),
    ("multi-human", "task", "crowd-human", "config.json → task"),
    ("multi-human", "version", "1.2", "config.json → version"),
    ("multi-human", "version", "../v1.2", "config.json → version"),
    ("multi-human", "version", "latest", "config.json → version"),
    ("multi-human", "channel", "nightly", "config.json → channel"),
    ("multi-human", "classes", [], "config.json → classes"),
    ("multi-human", "classes", KeyError, "config.json → classes: missing"),
    ("multi-human", "num_classes", 20, "config.json → num_classes"),
    ("multi-human", "human_class", None, "config.json → human_class"),
    ("multi-human", "human_class", KeyError, "config.json → human_class"),
    ("multi-human", "human_class", 21, "config.json → human_class"),
    ("multi-human", "human_class", True, "config.json → human_class"),
    ("single-human", "human_class", 19, "config.json → human_class"),
    ("multi-human", "compatible_api", [], "config.json → compatible_api"),
    ("multi-human", "compatible_api", [1.0], "config.json → compatible_api"),
    ("multi-human", "compatible_api", ["v1"], "config.json → compatible_api"),  # no client could ask for it
    ("multi-human", "compatible_api", ["1.0", "1.0 "], "config.json → compatible_api"),
    ("multi-human", "model_file", "../model.onnx", "config.json → model_file"),
    ("multi-human", "model_file", "/abs/model.onnx", "config.json → model_file"),
    ("multi-human", "model_file", "sub/../model.onnx", "config.json → model_file"),
    ("multi-human", "model_file", ".hidden.onnx", "config.json → model_file"),
    ("multi-human", "model_file", "manifest.json", "config.json → model_file: manifest.json describes the manifest"),
    ("multi-human", "model_file", "manifest.sig", "config.json → model_file: manifest.sig describes the manifest"),
    ("multi-human", "weights_index", "manifest.json", "config.json → weights_index: manifest.json describes"),
    ("multi-human", "weights_index", 3, "config.json → weights_index"),
    ("multi-human", "name", KeyError, "config.json → name: missing"),
    ("multi-human", "name", 7, "config.json → name"),
    ("multi-human", "num_queries", True, "config.json → num_queries"),
    ("multi-human", "num_queries", "100", "config.json → num_queries"),
    ("multi-human", "inputs", [], "config.json → inputs"),
    ("multi-human", "inputs", KeyError, "config.json → inputs"),
    ("multi-human", "outputs.0.shape", "1x100", "config.json → outputs → 0 → shape"),
    ("multi-human", "outputs.1.shape", [1, 100, 2.5], "config.json → outputs → 1 → shape"),
    ("multi-human", "outputs.1.name", KeyError, "config.json → outputs → 1 → name: missing"),
    ("single-human", "preprocess.canvas", None, "config.json → preprocess → canvas"),
    ("single-human", "preprocess.canvas", KeyError, "config.json → preprocess → canvas"),
    ("single-human", "preprocess.canvas", [384], "config.json → preprocess → canvas"),
    ("single-human", "preprocess.canvas", [0, 512], "config.json → preprocess → canvas"),
    ("multi-human", "preprocess.resize", "center-canvas", "config.json → preprocess → canvas"),
    ("single-human", "preprocess.resize", "shortest-edge", "config.json → preprocess → resize"),
    ("multi-human", "preprocess.resize", "stretch", "config.json → preprocess → resize"),
    ("multi-human", "preprocess.mean", [1.0, 2.0], "config.json → preprocess → mean"),
    ("multi-human", "preprocess.std", [1.0, 0.0, 1.0], "config.json → preprocess → std"),
    ("multi-human", "preprocess.channel_order", "RGBA", "config.json → preprocess → channel_order"),
    ("multi-human", "preprocess.short_edge", "640", "config.json → preprocess → short_edge"),
    ("multi-human", "preprocess.max_size", 100, "config.json → preprocess"),
    ("multi-human", "preprocess", [], "config.json → preprocess"),
    ("multi-human", "postprocess.topk", "100", "config.json → postprocess → topk"),
    ("multi-human", "postprocess.human_score_threshold", "high", "config.json → postprocess → human_score_threshold"),
    ("multi-human", "postprocess", 3, "config.json → postprocess"),
    ("multi-human", "source", "random", "config.json → source"),
    ("multi-human", "golden", [1], "config.json → golden"),
]


@pytest.mark.parametrize("task,path,value,expected", BAD, ids=[f"{p}={v!r}" for _, p, v, _ in BAD])
def test_config_errors_name_the_key_path(task, path, value, expected):
    raw = raw_config(task)
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = raw
    for k in parents:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    msg = config_error(raw)
    assert expected in msg, msg


#: ``golden`` as export has always written it (0aa94e1 and before): the on-disk format stays readable
GOLDEN_ON_DISK = {"image": "golden/input.png", "label_map": "golden/labels.png", "semantic": "golden/semantic.png",
                  "min_agreement": 0.99, "classes_present": ["Background", "Face", "Hair"]}


def test_golden_is_a_frozen_dataclass_read_from_the_format_export_writes():
    raw = raw_config()
    raw["golden"] = dict(GOLDEN_ON_DISK)
    cfg = BundleConfig.from_dict(raw)
    assert cfg.golden == Golden("golden/input.png", "golden/labels.png", "golden/semantic.png", 0.99,
                                ("Background", "Face", "Hair"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.golden.min_agreement = 0.5  # type: ignore[misc]
    # written back in the same shape, with ``degenerate`` (null: this config records no verdict) added
    assert json.loads(cfg.to_json())["golden"] == {**GOLDEN_ON_DISK, "degenerate": None}
    assert BundleConfig.from_bytes(cfg.to_json().encode()) == cfg
    assert cfg.files()[-3:] == ("golden/input.png", "golden/labels.png", "golden/semantic.png")


def test_golden_optional_keys_take_their_defaults():
    raw = raw_config()
    raw["golden"] = {"image": "golden/image.png", "label_map": "golden/label_map.png"}  # a hand-made sample
    golden = BundleConfig.from_dict(raw).golden
    assert golden == Golden("golden/image.png", "golden/label_map.png", None, GOLDEN_MIN_AGREEMENT, ())
    assert golden.files() == ("golden/image.png", "golden/label_map.png")
    raw["golden"] = None
    assert BundleConfig.from_dict(raw).golden is None


GOLDEN_BAD = [
    ("image", KeyError, "config.json → golden → image"),
    ("label_map", "../labels.png", "config.json → golden → label_map"),
    ("semantic", 3, "config.json → golden → semantic"),
    ("semantic", "manifest.json", "config.json → golden → semantic"),
    ("min_agreement", 0, "config.json → golden → min_agreement"),
    ("min_agreement", "0.99", "config.json → golden → min_agreement"),
    ("min_agreement", True, "config.json → golden → min_agreement"),
    ("classes_present", "Face", "config.json → golden → classes_present"),
    ("classes_present", [1], "config.json → golden → classes_present"),
]


@pytest.mark.parametrize("key,value,expected", GOLDEN_BAD, ids=[f"{k}={v!r}" for k, v, _ in GOLDEN_BAD])
def test_golden_errors_name_the_key_path(key, value, expected):
    raw = raw_config()
    raw["golden"] = dict(GOLDEN_ON_DISK)
    if value is KeyError:
        del raw["golden"][key]
    else:
        raw["golden"][key] = value
    assert expected in config_error(raw)


def test_config_integer_numbers_accepted_where_floats_are_expected():
    raw = raw_config()
    raw["preprocess"]["mean"] = [124, 116, 104]
    raw["postprocess"]["human_score_threshold"] = 0
    cfg = BundleConfig.from_dict(raw)
    assert cfg.preprocess.mean == (124.0, 116.0, 104.0)
    assert cfg.postprocess.human_score_threshold == 0.0


# ------------------------------------------------------------------------------------- manifest

@pytest.fixture
def bundle(tmp_path) -> Path:
    d = tmp_path / "v1.0"
    d.mkdir()
    (d / "model.onnx").write_bytes(bytes(range(256)) * 4)
    (d / "model.onnx.data").write_bytes(b"\x01\x02\x03" * 1000)
    (d / "config.json").write_text(make_config(version="v1.0").to_json())
    (d / "extra").mkdir()
    (d / "extra" / "golden.npz").write_bytes(b"golden")
    seal(d)
    return d


def test_manifest_lists_every_file_with_size_and_hash(bundle):
    m = reader.inspect(bundle).manifest
    assert json.loads(m.raw)["algorithm"] == "sha256"
    assert set(m.files) == {"model.onnx", "model.onnx.data", "config.json", "extra/golden.npz"}
    assert m.files["model.onnx"].size == 1024
    import hashlib
    assert m.files["extra/golden.npz"].sha256 == hashlib.sha256(b"golden").hexdigest()
    assert MANIFEST not in m.files
    assert m.raw == (bundle / MANIFEST).read_bytes() and m == manifest.read(bundle)
    assert json.loads(m.raw) == manifest.build(bundle)


def test_manifest_catches_flipped_byte(bundle):
    p = bundle / "model.onnx.data"
    data = bytearray(p.read_bytes())
    data[1234] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data: SHA-256"):
        reader.inspect(bundle)


def test_manifest_catches_truncated_file(bundle):
    p = bundle / "model.onnx"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match=r"model\.onnx: size 1023 bytes, manifest says 1024"):
        reader.inspect(bundle)


def test_manifest_catches_extra_file(bundle):
    (bundle / "notes.txt").write_text("hello")
    with pytest.raises(IntegrityError, match=r"files not in manifest\.json: notes\.txt"):
        reader.inspect(bundle)
    (bundle / "notes.txt").unlink()
    (bundle / "extra" / "more.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"extra/more\.bin"):
        reader.inspect(bundle)


def test_manifest_catches_missing_file(bundle):
    (bundle / "config.json").unlink()
    with pytest.raises(IntegrityError, match=r"config\.json: listed in manifest\.json but missing"):
        reader.inspect(bundle)


def test_manifest_sig_is_an_allowed_side_file(bundle):
    (bundle / "manifest.sig").write_bytes(b"signature")
    reader.inspect(bundle)
    assert "manifest.sig" not in manifest.build(bundle)["files"]


@pytest.mark.parametrize("text", ["[]", "null", '"files"'])
def test_manifest_not_an_object(bundle, text):
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(MalformedFile, match="manifest.json"):
        reader.inspect(bundle)


def test_manifest_missing_or_malformed(bundle):
    (bundle / MANIFEST).write_text("{broken")
    with pytest.raises(MalformedFile, match=r"^manifest\.json: not valid JSON"):
        reader.inspect(bundle)
    (bundle / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": {}}))
    with pytest.raises(BundleError):
        reader.inspect(bundle)
    (bundle / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": {"config.json": {"size": "1"}}}))
    with pytest.raises(MalformedFile, match=r"manifest\.json → files → config\.json: expected a size ≥ 0 and 64"):
        reader.inspect(bundle)
    (bundle / MANIFEST).write_text(json.dumps({"algorithm": "md5", "files": {"a": {"size": 1, "sha256": "x"}}}))
    with pytest.raises(MalformedFile, match="sha256"):
        manifest.read(bundle)
    (bundle / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match="manifest.json is missing"):
        reader.inspect(bundle)


@pytest.mark.parametrize("entry", ["../outside", "/etc/passwd", "extra/../../outside", ".hidden", "manifest.sig"])
def test_manifest_entry_leaving_the_bundle_is_refused(bundle, tmp_path, entry):
    (tmp_path / "outside").write_bytes(b"x")
    (bundle / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": {
        entry: {"size": 1, "sha256": "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"}}}))
    with pytest.raises(MalformedFile, match=r"^manifest\.json → files: ") as info:
        reader.inspect(bundle)
    assert entry in str(info.value)


def test_manifest_refuses_symlinks(bundle, tmp_path):
    (tmp_path / "target").write_bytes(b"x")
    (bundle / "link").symlink_to(tmp_path / "target")
    with pytest.raises(IntegrityError, match="symbolic links"):
        seal(bundle)


# ---------------------------------------------------------------------------------------- store

def test_store_versions_ignore_dot_dirs_non_versions_and_links(tmp_bundles):
    store = BundleStore(tmp_bundles)
    assert store.versions() == []
    for name in ("v1.10", "v1.9", "v2.0-beta", "v2.0", "v1.2", ".staging-v3.0-abcd1234", ".replaced-v1.2-ab",
                 ".v4.0", "latest", "notes", "V5.0", "v6"):
        (store.dir / name).mkdir(parents=True)
    (store.dir / "v7.0").write_text("a file, not a bundle")
    (store.dir / "v8.0").symlink_to(store.dir / "v1.2")
    (store.dir / ALIASES).write_text("{}")
    assert store.versions() == ["v1.2", "v1.9", "v1.10", "v2.0-beta", "v2.0", "v6"]


def publish(store: BundleStore, version: str, files: dict[str, str], *, force: bool = False) -> Path:
    """Publish a minimal bundle (``files`` + config.json + manifest) through the writer's staging."""
    with stage(store, version, force=force) as staged:
        for name, text in files.items():
            (staged.dir / name).write_text(text)
        staged.finish(make_config(version=version, model_file="a"))
    return store.path(version)


def test_store_staging_publishes_on_success(tmp_bundles):
    store = BundleStore(tmp_bundles)
    with stage(store, "v1.0") as staged:
        # a hidden directory next to the versions (same file system: publishing is one rename)
        assert staged.dir.parent.parent == store.dir and staged.dir.parent.name.startswith(".")
        assert store.versions() == []  # nothing visible while staging
        (staged.dir / "model.onnx").write_bytes(b"m")
        staged.finish(make_config(version="v1.0"))
        assert store.versions() == []  # finished is not published yet
    assert store.versions() == ["v1.0"]
    assert (store.path("v1.0") / "model.onnx").read_bytes() == b"m"
    assert sorted(p.name for p in store.path("v1.0").iterdir()) == ["config.json", "manifest.json", "model.onnx"]
    assert reader.inspect(store.path("v1.0")).config == make_config(version="v1.0")
    assert sorted(p.name for p in store.dir.iterdir()) == ["v1.0"]


def test_store_staging_leaves_nothing_on_exception(tmp_bundles):
    store = BundleStore(tmp_bundles)
    with pytest.raises(RuntimeError, match="boom"):
        with stage(store, "v1.0") as staged:
            (staged.dir / "model.onnx").write_bytes(b"half")
            raise RuntimeError("boom")
    assert store.versions() == []
    assert list(store.dir.iterdir()) == []


def test_store_staging_publishes_nothing_unfinished_or_unverifiable(tmp_bundles):
    store = BundleStore(tmp_bundles)
    with pytest.raises(BundleError, match="not finished; nothing published"):
        with stage(store, "v1.0") as staged:
            (staged.dir / "model.onnx").write_bytes(b"m")
    with pytest.raises(IntegrityError, match=r"config\.json names model\.onnx, which is not in manifest\.json"):
        with stage(store, "v1.0") as staged:
            staged.finish(make_config(version="v1.0"))  # the config names a graph that was never written
    assert store.versions() == []
    assert list(store.dir.iterdir()) == []


def test_store_existing_version_is_immutable_without_force(tmp_bundles):
    store = BundleStore(tmp_bundles)
    publish(store, "v1.0", {"a": "old"})
    with pytest.raises(VersionExists, match="v1.0 already exists"):
        publish(store, "v1.0", {"a": "new"})
    assert (store.path("v1.0") / "a").read_text() == "old"
    assert sorted(p.name for p in store.dir.iterdir()) == ["v1.0"]


def test_store_never_replaces_a_version_directory_that_appeared_meanwhile(tmp_bundles):
    """Even an empty directory made by another writer while exporting is kept (no silent rename-over)."""
    store = BundleStore(tmp_bundles)
    with pytest.raises(VersionExists, match="v1.0 appeared meanwhile; not replaced"):
        with stage(store, "v1.0") as staged:
            (staged.dir / "a").write_text("new")
            staged.finish(make_config(version="v1.0", model_file="a"))
            store.path("v1.0").mkdir()
    assert list(store.path("v1.0").iterdir()) == []
    assert sorted(p.name for p in store.dir.iterdir()) == ["v1.0"]


def test_store_force_replaces_and_cleans_up(tmp_bundles):
    store = BundleStore(tmp_bundles)
    publish(store, "v1.0", {"a": "old", "only-old": "x"})
    final = publish(store, "v1.0", {"a": "new"}, force=True)
    assert (final / "a").read_text() == "new"
    assert not (final / "only-old").exists()  # replaced, not merged
    reader.inspect(final)
    assert sorted(p.name for p in store.dir.iterdir()) == ["v1.0"]


def test_store_force_failure_keeps_old_version(tmp_bundles):
    store = BundleStore(tmp_bundles)
    publish(store, "v1.0", {"a": "old"})
    with pytest.raises(ValueError):
        with stage(store, "v1.0", force=True) as staged:
            (staged.dir / "a").write_text("new")
            raise ValueError("parity")
    assert (store.path("v1.0") / "a").read_text() == "old"
    reader.inspect(store.path("v1.0"))
    assert sorted(p.name for p in store.dir.iterdir()) == ["v1.0"]


def test_store_remove(tmp_bundles):
    store = BundleStore(tmp_bundles)
    publish(store, "v1.0", {"a": "x"})
    store.remove("v1.0")
    assert store.versions() == [] and list(store.dir.iterdir()) == []
    with pytest.raises(BundleError):
        store.remove("v1.0")


@pytest.mark.parametrize("name", ["../etc", "v1.2/../x", "", "latest/..", "/etc", "v1.2/", ".", ".."])
def test_store_path_rejects_traversal(tmp_bundles, name):
    with pytest.raises(InvalidVersionName):
        BundleStore(tmp_bundles).path(name)
    with pytest.raises(InvalidVersionName):
        with stage(BundleStore(tmp_bundles), name):
            pass  # pragma: no cover
    assert not tmp_bundles.exists()


def test_store_path_refuses_an_alias(tmp_bundles):
    with pytest.raises(BundleError, match="alias"):
        BundleStore(tmp_bundles).path("latest")


def test_aliases_round_trip(tmp_bundles):
    store = BundleStore(tmp_bundles)
    assert store.read_aliases() == {}
    store.write_aliases({"latest": "v1.2", "stable": "v1.0"})
    assert store.read_aliases() == {"latest": "v1.2", "stable": "v1.0"}
    store.set_alias("latest", "v2.0-beta")
    assert store.read_aliases() == {"latest": "v2.0-beta", "stable": "v1.0"}
    assert json.loads((store.dir / ALIASES).read_text()) == {"latest": "v2.0-beta", "stable": "v1.0"}
    assert [p.name for p in store.dir.iterdir()] == [ALIASES]  # no temp or lock file left


def test_alias_updates_from_many_writers_are_never_lost(tmp_bundles):
    """Each set_alias is a locked read-modify-write: concurrent writers cannot drop each other's alias."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"canary{chr(97 + i)}" for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda a: BundleStore(tmp_bundles).set_alias(a, "v1.0"), names))
    assert BundleStore(tmp_bundles).read_aliases() == dict.fromkeys(names, "v1.0")


@pytest.mark.parametrize("text", ["{broken", "[]", '"latest"', "null", ""])
def test_aliases_junk_file_is_ignored(tmp_bundles, text):
    store = BundleStore(tmp_bundles)
    store.dir.mkdir(parents=True)
    (store.dir / ALIASES).write_text(text)
    assert store.read_aliases() == {}


def test_aliases_junk_entries_are_dropped(tmp_bundles):
    store = BundleStore(tmp_bundles)
    store.dir.mkdir(parents=True)
    (store.dir / ALIASES).write_text(json.dumps({
        "latest": "v1.2", "../evil": "v1.0", "v1.0": "v1.2", "stable": "../v1.0", "beta": 3, "Upper": "v1.0",
        "ok": "v2.0-beta"}))
    assert store.read_aliases() == {"latest": "v1.2", "ok": "v2.0-beta"}


@pytest.mark.parametrize("alias,target",
                         [("../x", "v1.0"), ("latest", "latest"), ("v1.0", "v1.0"), ("latest", "../v1")])
def test_aliases_write_rejects_bad_names(tmp_bundles, alias, target):
    with pytest.raises(BundleError):
        BundleStore(tmp_bundles).write_aliases({alias: target})
    assert not (tmp_bundles / "m2fp" / ALIASES).exists()


# -------------------------------------------------------------------------------------- palette

def test_palette_known_colours():
    cihp = palette_for(CIHP)
    assert cihp[0] == (0, 0, 0)                    # Background
    assert cihp[CIHP.index("Face")] == (0, 0, 255)
    assert cihp[CIHP.index("Hair")] == (255, 0, 0)
    assert cihp[CIHP.index("Human")] == (255, 255, 255)
    assert cihp[:20] == LIP_PALETTE
    assert palette_for(LIP) == LIP_PALETTE


def test_palette_cihp_and_lip_agree_on_shared_names():
    cihp, lip = dict(zip(CIHP, palette_for(CIHP))), dict(zip(LIP, palette_for(LIP)))
    shared = set(cihp) & set(lip)
    assert len(shared) >= 18
    for name in shared:
        assert cihp[name] == lip[name], name
    # the renamed classes keep their index colour
    assert cihp["UpperClothes"] == lip["Upper-clothes"]
    assert cihp["Torso-skin"] == lip["Jumpsuits"]


def test_palette_is_stable_across_versions():
    a = make_config(version="v1.0")
    b = make_config(version="v2.0-beta")
    assert a.palette == b.palette == tuple(palette_for(CIHP))
    assert BundleConfig.from_dict(json.loads(a.to_json())).palette == a.palette
    assert palette_for(list(CIHP)) == palette_for(tuple(CIHP))


def test_palette_unknown_classes_use_voc_colours():
    assert voc_colour(0) == (0, 0, 0)
    assert voc_colour(1) == (128, 0, 0)
    assert voc_colour(2) == (0, 128, 0)
    assert voc_colour(3) == (128, 128, 0)
    assert voc_colour(15) == (192, 128, 128)  # VOC "person"
    pal = palette_for(["Background", "Cape", "Face", "Tail"])
    assert pal == [(0, 0, 0), voc_colour(1), (0, 0, 255), voc_colour(3)]
    assert all(len(c) == 3 and all(0 <= x <= 255 for x in c) for c in palette_for([f"c{i}" for i in range(300)]))
    assert set(KNOWN_COLOURS) >= set(CIHP) | set(LIP)


# -------------------------------------------------------------------------------------- versions

def test_semver_ordering():
    p = SemVer.parse
    assert p("v1.10") > p("v1.9")
    assert p("v2.0-beta") < p("v2.0")
    assert p("v1.2") == p("v1.2.0") and hash(p("v1.2")) == hash(p("v1.2.0"))
    assert str(p("v1.2")) == "1.2.0" and str(p("v2.0-beta")) == "2.0.0-beta"
    assert p("v2.0-alpha") < p("v2.0-beta") < p("v2.0-rc.1") < p("v2.0")
    assert p("v2.0-beta.2") < p("v2.0-beta.10")  # numeric identifiers compare as numbers
    assert p("v2.0-1") < p("v2.0-alpha")          # numeric identifiers sort before alphanumeric
    assert p("v1") == p("v1.0.0") and p("v1.0.1") > p("v1.0")
    assert p("v2.0-beta").prerelease and not p("v2.0").prerelease
    names = ["v2.0", "v1.10", "v1.2", "v2.0-beta", "v1.9", "v10.0", "v1.2.1"]
    assert sorted(names, key=p) == ["v1.2", "v1.2.1", "v1.9", "v1.10", "v2.0-beta", "v2.0", "v10.0"]


@pytest.mark.parametrize("name", ["v1.2", "v2.0-beta", "v1", "v1.2.3", "v3.0-r101", "v2.0-rc.1"])
def test_valid_version_names(name):
    assert is_version_name(name) and not is_alias_name(name)
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["latest", "stable", "beta-2", "canary_1"])
def test_valid_alias_names(name):
    assert is_alias_name(name) and not is_version_name(name)
    assert check_name(name) == name


@pytest.mark.parametrize("name", [
    "../etc", "v1.2/../x", "", "latest/..", "..", ".", "/v1.2", "v1.2/", "v1.2\\..\\x", "1.2", "V1.2", " v1.2",
    "v1.2 ", "v1.2.3.4", "v1.2-", "v1.2-beta..1", "v1.2\x00", "Latest", "latest!", "a" * 40, "-latest",
])
def test_invalid_names_are_rejected(name):
    assert not is_version_name(name) and not is_alias_name(name)
    with pytest.raises(InvalidVersionName):
        check_name(name)
    with pytest.raises(InvalidVersionName):
        SemVer.parse(name)


@pytest.mark.parametrize("name", ["v1.2\n", "latest\n"])
def test_trailing_newline_is_not_a_name(name):
    assert not is_version_name(name) and not is_alias_name(name)


def test_check_name_rejects_non_strings():
    with pytest.raises(InvalidVersionName):
        check_name(None)  # type: ignore[arg-type]
