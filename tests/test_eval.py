"""``m2fp-eval`` and the quality package: datasets in the CIHP/LIP layout, scores, grades.

Expected numbers are computed here from pixel counts with numpy, never by the code under test. The tiny test
bundles have random weights (their label maps are one class everywhere), so two kinds of run: the real model
on labels that are its own predictions (mIoU 1.0), and an oracle whose label maps are the scenes' true labels
(``Predictor.predict_rgb`` patched; loading, the dataset, the mapping and the metrics stay real) for arithmetic
on maps of many classes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from m2fpkit.runtime import figures
from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.errors import DatasetError
from m2fpkit.runtime.predictor import Prediction, Predictor
from m2fpkit.runtime.quality import cli, grades
from m2fpkit.runtime.quality.dataset import Dataset
from m2fpkit.runtime.quality.metrics import Confusion, score
from m2fpkit.runtime.result import ParseResult
from reference.bundles import clone_bundle

H, W = 96, 128
CIHP = figures.CIHP_PARSING
JSON_KEYS = {"version", "plan", "dataset", "miou", "pixel_accuracy", "mean_class_accuracy", "per_class"}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def store(fast_multi_src: Path, fast_single_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle root: v0.1 and v0.3 multi-human (CIHP classes + Human), v0.2 single-human (LIP classes)."""
    root = tmp_path_factory.mktemp("eval_store")
    clone_bundle(fast_multi_src, root, "v0.1")
    clone_bundle(fast_multi_src, root, "v0.3")
    clone_bundle(fast_single_src, root, "v0.2")
    return root


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _labels(data: Path) -> dict[str, np.ndarray]:
    return {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((data / "labels").glob("*.png"))}


def _scenes(out: Path, count: int = 3, task: str = "multi-human", seed: int = 0) -> Path:
    figures.write_dataset(out, count, seed, height=H, width=W, task=task)
    shutil.rmtree(out / "humans")
    return out


def _own_predictions(root: Path, version: str, out: Path, task: str) -> Path:
    """Scenes whose labels are ``version``'s own label maps (bundle order: no classes.txt)."""
    _scenes(out, task=task)
    (out / "classes.txt").unlink()
    predictor = Predictor.load(root / "m2fp" / version)
    for image in sorted((out / "images").glob("*.png")):
        rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
        _png(out / "labels" / image.name, predictor.predict_rgb(rgb).result.label_map)
    return out


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch):
    """Make every predictor answer each image with the label map registered for it (by its pixels)."""
    answers: dict[bytes, np.ndarray] = {}

    def predict_rgb(self: Predictor, rgb: np.ndarray, timings: dict[str, float] | None = None) -> Prediction:
        label_map = answers[rgb.tobytes()]
        return Prediction(self.version, ParseResult(self.config.task, self.config.classes, label_map, ()))

    monkeypatch.setattr(Predictor, "predict_rgb", predict_rgb)

    def register(data: Path, maps: dict[str, np.ndarray]) -> None:
        for name, label_map in maps.items():
            bgr = cv2.imread(str(data / "images" / f"{name}.png"))
            answers[cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).tobytes()] = label_map
    return register


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------------------------------ m2fp-eval
def test_a_versions_own_predictions_score_one_through_the_installed_command(store: Path, tmp_path: Path):
    data = _own_predictions(store, "v0.1", tmp_path / "own", "multi-human")
    out, state = tmp_path / "result.json", tmp_path / "state"
    env = {**os.environ, "M2FP_STATE_DIR": str(state)}
    proc = subprocess.run([str(Path(sys.executable).with_name("m2fp-eval")), "v0.1", "--data", str(data),
                           "--bundles", str(store), "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(out.read_text())
    assert body["miou"] == body["pixel_accuracy"] == body["mean_class_accuracy"] == 1.0
    assert set(body["per_class"].values()) == {1.0}
    assert body["version"] == "v0.1" and body["plan"] == "ort-fp32"
    fingerprint = Dataset.open(data).sha256
    assert body["dataset"]["sha256"] == fingerprint and body["dataset"]["images"] == 3
    assert "mIoU" in proc.stdout and "1.0000" in proc.stdout and fingerprint in proc.stdout
    # the grade lands in $M2FP_STATE_DIR, under the identity the runtime gives the bundle
    (grade,) = grades.load(state)
    assert grade.identity == reader.identity_of(store / "m2fp" / "v0.1") and grade.miou == 1.0
    assert grade.dataset.sha256 == fingerprint and grade.dataset.name == "own"


def test_a_single_human_versions_own_predictions_score_one(store: Path, tmp_path: Path):
    data = _own_predictions(store, "v0.2", tmp_path / "own-single", "single-human")
    code, stdout, stderr = _run("v0.2", "--data", str(data), "--bundles", str(store), "--no-record",
                                "--json", str(tmp_path / "r.json"))
    assert code == 0, stderr
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["miou"] == 1.0 and body["pixel_accuracy"] == 1.0
    assert not (store / "m2fp" / "grades").exists()


def test_one_class_relabeled_in_the_truth_gives_the_iou_the_counts_predict(store: Path, tmp_path: Path, oracle):
    data = _scenes(tmp_path / "relabeled")
    predicted = _labels(data)
    oracle(data, predicted)
    hair, face = CIHP.index("Hair"), CIHP.index("Face")
    stacked = np.concatenate([m.ravel() for m in predicted.values()])
    n_hair, n_face, n = int((stacked == hair).sum()), int((stacked == face).sum()), stacked.size
    assert n_hair > 0 and n_face > 0
    for name, label in predicted.items():  # every Hair pixel written as Face in the ground truth
        _png(data / "labels" / f"{name}.png", np.where(label == hair, face, label).astype(np.uint8))
    code, _, stderr = _run("v0.1", "--data", str(data), "--bundles", str(store), "--json", str(tmp_path / "r.json"),
                           "--state-dir", str(tmp_path / "state"))
    assert code == 0, stderr
    body = json.loads((tmp_path / "r.json").read_text())
    truth_classes = {CIHP[c] for c in np.unique(np.where(stacked == hair, face, stacked))}
    assert set(body["per_class"]) == truth_classes and "Hair" not in truth_classes
    expected_face = n_face / (n_face + n_hair)  # truth Face = predicted Face ∪ predicted Hair
    assert body["per_class"]["Face"] == pytest.approx(expected_face, abs=1e-12)
    assert all(body["per_class"][c] == 1.0 for c in truth_classes - {"Face"})
    k = len(truth_classes)
    assert body["miou"] == pytest.approx((k - 1 + expected_face) / k, abs=1e-12)
    assert body["pixel_accuracy"] == pytest.approx(1 - n_hair / n, abs=1e-12)
    assert body["mean_class_accuracy"] == pytest.approx((k - 1 + expected_face) / k, abs=1e-12)


def test_ignored_pixels_are_not_scored(store: Path, tmp_path: Path, oracle):
    data = _scenes(tmp_path / "ignored", count=2)
    truth = _labels(data)
    oracle(data, {name: np.zeros_like(m) for name, m in truth.items()})  # all Background
    for name, label in truth.items():  # everything but Background and Face ignored
        keep = (label == 0) | (label == CIHP.index("Face"))
        _png(data / "labels" / f"{name}.png", np.where(keep, label, 255).astype(np.uint8))
    stacked = np.concatenate([m.ravel() for m in truth.values()])
    n_bg, n_face = int((stacked == 0).sum()), int((stacked == CIHP.index("Face")).sum())
    code, _, stderr = _run("v0.1", "--data", str(data), "--bundles", str(store), "--no-record",
                           "--json", str(tmp_path / "r.json"))
    assert code == 0, stderr
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["per_class"] == {"Background": pytest.approx(n_bg / (n_bg + n_face)), "Face": 0.0}
    assert body["pixel_accuracy"] == pytest.approx(n_bg / (n_bg + n_face))
    assert body["mean_class_accuracy"] == pytest.approx(0.5)
    assert body["pixels"] == n_bg + n_face


def test_several_versions_give_a_json_list_and_a_table_with_a_column_each(store: Path, tmp_path: Path, oracle):
    data = _scenes(tmp_path / "two")
    oracle(data, _labels(data))
    (store / "m2fp" / "aliases.json").write_text(json.dumps({"stable": "v0.3"}))
    try:
        code, stdout, stderr = _run("v0.1", "stable", "--data", str(data), "--bundles", str(store), "--no-record",
                                    "--json", str(tmp_path / "r.json"), "--name", "figures-val")
    finally:
        (store / "m2fp" / "aliases.json").unlink()
    assert code == 0, stderr
    body = json.loads((tmp_path / "r.json").read_text())
    assert [b["version"] for b in body] == ["v0.1", "v0.3"]
    for b in body:
        assert JSON_KEYS <= set(b)
        assert set(b["dataset"]) >= {"path", "images", "sha256"} and b["dataset"]["path"] == os.path.abspath(data)
        assert b["dataset"]["name"] == "figures-val"
        assert all(0.0 <= b[k] <= 1.0 for k in ("miou", "pixel_accuracy", "mean_class_accuracy"))
        assert b["miou"] == 1.0 and all(isinstance(v, float) for v in b["per_class"].values())
    header = next(line for line in stdout.splitlines() if line.startswith("version"))
    assert header.split() == ["version", "v0.1", "v0.3"]
    assert "Face" in stdout and "images/s" in stdout


def test_a_class_list_in_another_order_is_mapped_by_name(store: Path, tmp_path: Path, oracle):
    data = _scenes(tmp_path / "shuffled")
    truth = _labels(data)
    oracle(data, truth)
    order = list(reversed(CIHP))
    order[order.index("UpperClothes")] = "upper_clothes"  # case, '-' and '_' aside
    (data / "classes.txt").write_text("\n".join(order) + "\n")
    lut = np.full(256, 255, np.uint8)
    lut[:len(CIHP)] = [len(CIHP) - 1 - i for i in range(len(CIHP))]
    for name, label in truth.items():
        _png(data / "labels" / f"{name}.png", lut[label])
    code, _, stderr = _run("v0.1", "--data", str(data), "--bundles", str(store), "--no-record",
                           "--json", str(tmp_path / "r.json"))
    assert code == 0, stderr
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["miou"] == 1.0 and "UpperClothes" in body["per_class"]


def test_a_class_list_that_does_not_map_is_refused_naming_the_classes(store: Path, tmp_path: Path):
    data = _scenes(tmp_path / "foreign", count=1)
    names = list(CIHP)
    names[3], names[7] = "Tail", "Wing"
    (data / "classes.txt").write_text("\n".join(names) + "\n")
    code, _, stderr = _run("v0.1", "--data", str(data), "--bundles", str(store), "--no-record")
    assert code == 1
    assert "classes.txt" in stderr and "'Tail'" in stderr and "'Wing'" in stderr
    # the single-human bundle has no Torso-skin: the CIHP list is refused for it, naming it
    (data / "classes.txt").write_text("\n".join(CIHP) + "\n")
    code, _, stderr = _run("v0.2", "--data", str(data), "--bundles", str(store), "--no-record")
    assert code == 1 and "'Torso-skin'" in stderr


def test_a_bad_file_fails_the_command_in_one_line_naming_it(store: Path, tmp_path: Path):
    data = _scenes(tmp_path / "bad", count=2)
    (data / "labels" / "figure-00001.png").unlink()
    code, stdout, stderr = _run("v0.1", "--data", str(data), "--bundles", str(store), "--no-record")
    assert code == 1 and stdout == ""
    assert stderr.startswith("Error: ") and "images/figure-00001.png" in stderr and len(stderr.splitlines()) == 1


def test_an_unknown_version_fails_in_one_line(store: Path, tmp_path: Path):
    data = _scenes(tmp_path / "ok", count=1)
    code, _, stderr = _run("v9.9", "--data", str(data), "--bundles", str(store), "--no-record")
    assert code == 1 and "v9.9" in stderr


def test_the_grade_goes_where_the_server_keeps_its_state_by_default(store: Path, tmp_path: Path, oracle):
    data = _scenes(tmp_path / "default", count=1)
    oracle(data, _labels(data))
    try:
        code, _, stderr = _run("v0.1", "--data", str(data), "--bundles", str(store))
        assert code == 0, stderr
        (grade,) = grades.load(store / "m2fp")
        assert grade.version == "v0.1" and grade.miou == 1.0
    finally:
        shutil.rmtree(store / "m2fp" / "grades", ignore_errors=True)


# ------------------------------------------------------------------------------------------ bad datasets
@pytest.fixture
def good(tmp_path: Path) -> Path:
    return _scenes(tmp_path / "set", count=2)


def _refused(data: Path, file: str) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        Dataset.open(data)
    assert file in str(info.value) and file in info.value.file
    return info.value


def test_an_image_without_a_label_is_refused(good: Path):
    (good / "labels" / "figure-00000.png").unlink()
    assert "no label" in str(_refused(good, "images/figure-00000.png"))


def test_a_label_without_an_image_is_refused(good: Path):
    (good / "images" / "figure-00001.png").unlink()
    assert "no image" in str(_refused(good, "labels/figure-00001.png"))


def test_a_label_of_another_size_than_its_image_is_refused(good: Path):
    _png(good / "labels" / "figure-00001.png", np.zeros((H, W + 2), np.uint8))
    assert f"{W + 2}x{H}" in str(_refused(good, "labels/figure-00001.png"))


@pytest.mark.parametrize("kind", ["rgb", "16-bit", "jpeg", "palette"])
def test_a_label_that_is_not_an_8_bit_single_channel_png_is_refused(good: Path, kind: str):
    path = good / "labels" / "figure-00000.png"
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if kind == "rgb":
        _png(path, np.dstack([label] * 3))
    elif kind == "16-bit":
        _png(path, label.astype(np.uint16))
    elif kind == "jpeg":
        path.write_bytes(cv2.imencode(".jpg", label)[1].tobytes())
    else:  # a palette PNG: colour type 3 in IHDR
        data = bytearray(path.read_bytes())
        data[25] = 3
        path.write_bytes(bytes(data))
    error = _refused(good, "labels/figure-00000.png")
    assert "8-bit single-channel" in str(error) or "PNG (lossless)" in str(error)


def test_a_class_id_outside_the_class_list_is_refused(good: Path):
    label = cv2.imread(str(good / "labels" / "figure-00001.png"), cv2.IMREAD_UNCHANGED)
    label[0, 0] = len(CIHP)  # 20: one past the list; 255 stays allowed
    label[0, 1] = 255
    _png(good / "labels" / "figure-00001.png", label)
    assert "class id 20" in str(_refused(good, "labels/figure-00001.png"))


def test_a_class_id_outside_the_bundles_list_is_refused_when_there_is_no_classes_txt(good: Path):
    (good / "classes.txt").unlink()
    label = cv2.imread(str(good / "labels" / "figure-00000.png"), cv2.IMREAD_UNCHANGED)
    label[5, 5] = 30
    _png(good / "labels" / "figure-00000.png", label)
    dataset = Dataset.open(good)  # the class list is the bundle's: known only when one is chosen
    dataset.mapping(figures.LIP_PARSING + ("a",) * 20)  # 40 classes: 30 is one
    with pytest.raises(DatasetError, match="class id 30") as info:
        dataset.mapping(figures.LIP_PARSING)
    assert "labels/figure-00000.png" in info.value.file


def test_an_empty_set_is_refused(tmp_path: Path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    assert "no images" in str(_refused(tmp_path / "empty", "images"))


def test_a_missing_labels_directory_is_refused(good: Path):
    shutil.rmtree(good / "labels")
    _refused(good, "labels")


@pytest.mark.parametrize("content, why", [
    (b"Background\n\nHat\n", "line 2: empty"),
    (b"Background\nHat\nBackground\n", "line 3"),
    (b"\xff\xfe", "not UTF-8"),
    (b"\n\n", "no class names"),
    (b"Back\x07ground\n", "printable"),
    ("".join(f"c{i}\n" for i in range(300)).encode(), "more than 255"),
])
def test_a_malformed_classes_txt_is_refused_saying_why(good: Path, content: bytes, why: str):
    (good / "classes.txt").write_bytes(content)
    assert why in str(_refused(good, "classes.txt"))


def test_unreadable_files_are_refused_naming_them(good: Path):
    label = good / "labels" / "figure-00000.png"
    label.unlink()
    os.mkfifo(label)  # a FIFO: refused at once, never a blocked read
    assert "FIFO" in str(_refused(good, "labels/figure-00000.png"))
    label.unlink()
    label.mkdir()
    _refused(good, "labels/figure-00000.png")


def test_an_undecodable_image_is_refused_naming_it(good: Path):
    path = good / "images" / "figure-00001.png"
    path.write_bytes(path.read_bytes()[:40])  # the header survives: open() accepts it, decoding does not
    dataset = Dataset.open(good)
    with pytest.raises(DatasetError) as info:
        list(dataset.samples(CIHP))
    assert "images/figure-00001.png" in info.value.file


def test_files_of_other_kinds_and_twin_names_are_refused(good: Path):
    (good / "images" / "notes.txt").write_text("x")
    assert "not a" in str(_refused(good, "images/notes.txt"))
    (good / "images" / "notes.txt").unlink()
    shutil.copy(good / "images" / "figure-00000.png", good / "images" / "figure-00000.jpg")
    assert "second file" in str(_refused(good, "images/figure-00000"))


def test_a_file_changed_after_the_fingerprint_is_refused(good: Path):
    dataset = Dataset.open(good)
    _png(good / "labels" / "figure-00001.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match="changed since") as info:
        list(dataset.samples(CIHP))
    assert "labels/figure-00001.png" in info.value.file


def test_the_fingerprint_survives_a_move_and_changes_with_any_byte(tmp_path: Path):
    a = _scenes(tmp_path / "a", count=2)
    first = Dataset.open(a)
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert Dataset.open(b).sha256 == first.sha256 and Dataset.open(b).name == "b"
    (b / "classes.txt").write_text("\n".join(reversed(CIHP)) + "\n")
    assert Dataset.open(b).sha256 != first.sha256
    shutil.copytree(a, tmp_path / "c")
    label = cv2.imread(str(tmp_path / "c" / "labels" / "figure-00000.png"), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 255 if label[0, 0] != 255 else 0
    _png(tmp_path / "c" / "labels" / "figure-00000.png", label)
    assert Dataset.open(tmp_path / "c").sha256 != first.sha256


# ------------------------------------------------------------------------------------------ metrics
def test_scores_of_one_image_by_hand():
    truth = np.array([[0, 0, 1], [1, 2, 255]], np.uint8)
    predicted = np.array([[0, 1, 1], [1, 1, 0]], np.uint8)
    s = score(predicted, truth, ["a", "b", "c", "d"])
    # a: inter 1, union 2 (truth 2, pred 1); b: inter 2, union 4 (truth 2, pred 3 scored); c: inter 0, union 1
    assert s.per_class == {"a": 0.5, "b": 0.5, "c": 0.0} and s.pixels == 5
    assert s.miou == pytest.approx(1 / 3) and s.pixel_accuracy == pytest.approx(3 / 5)
    assert s.mean_class_accuracy == pytest.approx((1 / 2 + 2 / 2 + 0) / 3)


def test_confusion_refuses_what_it_cannot_count():
    c = Confusion(3)
    with pytest.raises(ValueError, match="shape"):
        c.add(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="class id 3"):
        c.add(np.zeros((2, 2), np.uint8), np.full((2, 2), 3, np.uint8))
    with pytest.raises(ValueError, match="predicted"):
        c.add(np.full((2, 2), 7, np.uint8), np.zeros((2, 2), np.uint8))
    assert c.pixels == 0 and c.scores("abc").miou == 0.0
    with pytest.raises(ValueError, match="names"):
        c.scores(["a", "b"])


# ------------------------------------------------------------------------------------------ grades
def _grade(**change) -> grades.Grade:
    fields = dict(version="v1.2", identity="ab" * 32, plan="ort-fp32",
                  dataset=grades.DatasetRef("figures-val", "/data/figures-val", 50, "cd" * 32),
                  miou=0.71, pixel_accuracy=0.9, mean_class_accuracy=0.8, per_class={"Background": 0.95, "Face": 0.5},
                  images_per_s=12.5, at=1_700_000_000.0)
    return grades.Grade(**{**fields, **change})


def test_grades_round_trip_and_the_json_shape(tmp_path: Path):
    grade = _grade()
    path = grades.record(tmp_path, grade)
    assert path.parent == tmp_path / grades.GRADES_DIR
    assert grades.load(tmp_path) == [grade]
    assert json.loads(path.read_text()) == {
        "version": "v1.2", "plan": "ort-fp32", "identity": "ab" * 32,
        "dataset": {"name": "figures-val", "path": "/data/figures-val", "images": 50, "sha256": "cd" * 32},
        "miou": 0.71, "pixel_accuracy": 0.9, "mean_class_accuracy": 0.8,
        "per_class": {"Background": 0.95, "Face": 0.5}, "images_per_s": 12.5, "at": 1_700_000_000.0}
    assert grade.brief() == "mIoU 0.71 on figures-val"


def test_a_later_grade_of_the_same_key_replaces_the_earlier(tmp_path: Path):
    grades.record(tmp_path, _grade())
    grades.record(tmp_path, _grade(miou=0.75, version="v1.3", at=1_700_000_100.0))  # same content, renamed
    assert [g.miou for g in grades.load(tmp_path)] == [0.75]
    grades.record(tmp_path, _grade(plan="ort-int8"))
    grades.record(tmp_path, _grade(dataset=grades.DatasetRef("other", "/o", 3, "ef" * 32)))
    grades.record(tmp_path, _grade(identity="12" * 32 + "-" + "3" * 16))
    loaded = grades.load(tmp_path)
    assert len(loaded) == 4 and len(list((tmp_path / grades.GRADES_DIR).iterdir())) == 4
    assert [g.plan for g in grades.for_identity(loaded, "ab" * 32)] == ["ort-fp32", "ort-int8", "ort-fp32"]
    assert loaded == sorted(loaded, key=lambda g: g.at)


def test_only_the_most_recent_grades_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(grades, "GRADES_KEEP", 3)
    paths = []
    for i in range(5):
        paths.append(grades.record(tmp_path, _grade(identity=f"{i:064x}")))
        os.utime(paths[-1], (1000 + i, 1000 + i))
    assert sorted(g.identity for g in grades.load(tmp_path)) == [f"{i:064x}" for i in (2, 3, 4)]


def test_recording_refuses_a_grade_load_would_refuse(tmp_path: Path):
    with pytest.raises(ValueError, match="miou"):
        grades.record(tmp_path, _grade(miou=1.5))
    with pytest.raises(ValueError, match="plan"):
        grades.record(tmp_path, _grade(plan="fp32"))
    assert not (tmp_path / grades.GRADES_DIR).exists()


def test_bad_grade_files_are_skipped_with_a_warning_naming_the_field(tmp_path: Path, caplog):
    good = grades.record(tmp_path, _grade())
    folder = good.parent
    raw = json.loads(good.read_text())
    (folder / "a.json").write_text(json.dumps({**raw, "miou": "high"}))
    (folder / "b.json").write_text(json.dumps({**raw, "dataset": {**raw["dataset"], "sha256": "x"}}))
    (folder / "c.json").write_text("{")
    os.mkfifo(folder / "d.json")
    (folder / "e.json").symlink_to(good)
    (folder / "f.json").write_text(json.dumps(raw))  # valid, but not under the name its key gives
    with caplog.at_level(logging.WARNING, logger="m2fpkit.runtime.quality.grades"):
        start = time.monotonic()
        assert grades.load(tmp_path) == [_grade()]
        assert time.monotonic() - start < 5
    text = caplog.text
    assert "a.json" in text and "miou" in text
    assert "b.json" in text and "dataset → sha256" in text
    assert "c.json" in text and "d.json" in text and "FIFO" in text and "e.json" in text
    assert "f.json" in text and "key" in text


def test_no_grades_directory_is_no_grades(tmp_path: Path):
    assert grades.load(tmp_path) == []
    (tmp_path / grades.GRADES_DIR).write_text("not a directory")
    assert grades.load(tmp_path) == []
