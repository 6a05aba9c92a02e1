"""Property tests of the quality package's readers of untrusted bytes, and of the confusion matrix.

The property of each reader: it returns a usable result or raises its own error — ``DatasetError`` for a
dataset's ``classes.txt``, label maps and directory, nothing at all for grade files (a bad one is skipped) —
never anything else, and never a blocked read on a FIFO. What a reader accepts is usable: class names are
distinct printable names, a label map is ``(H, W)`` uint8, a grade loaded can be recorded again.
:class:`Confusion` is compared with a count of every pixel by hand. Derandomized and bounded: a few seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from m2fpkit.runtime.errors import DatasetError
from m2fpkit.runtime.figures import CIHP_PARSING
from m2fpkit.runtime.quality import grades
from m2fpkit.runtime.quality.dataset import Dataset, class_map, decode_label, parse_classes
from m2fpkit.runtime.quality.metrics import IGNORE, Confusion

FUZZ = settings(derandomize=True, max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=40)
#: labels decoded in these tests stay tiny: a header may claim anything up to this
SMALL = 64 * 64


def _label_png(h: int = 6, w: int = 8, seed: int = 0) -> bytes:
    values = np.random.default_rng(seed).integers(0, 20, size=(h, w), dtype=np.uint8)
    return cv2.imencode(".png", values)[1].tobytes()


# ------------------------------------------------------------------------------------------ classes.txt
NAMES = st.text(st.characters(codec="utf-8"), max_size=12)


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.lists(NAMES, max_size=30).map(lambda names: "\n".join(names).encode("utf-8", "surrogatepass"))))
@example(b"\xef\xbb\xbfBackground\r\nHat\r\n")
@example("\n".join(f"c{i}" for i in range(256)).encode())
def test_classes_txt_is_a_list_of_distinct_names_or_refused(data: bytes):
    try:
        classes = parse_classes(data)
    except DatasetError as exc:
        assert exc.file == "classes.txt"
        return
    assert 1 <= len(classes) <= 255 and len(set(classes)) == len(classes)
    assert all(c and c == c.strip() and c.isprintable() for c in classes)


@FUZZ
@given(st.lists(st.sampled_from([*CIHP_PARSING, "upper clothes", "HAIR", "Tail", "left_arm"]), min_size=1,
                max_size=25, unique=True))
def test_a_class_map_sends_each_class_to_its_namesake_or_is_refused(names: list[str]):
    try:
        lut = class_map(names, CIHP_PARSING)
    except DatasetError as exc:
        assert exc.file == "classes.txt"
        assert "Tail" in names or "both map" in exc.reason
        return
    fold = lambda n: n.replace("-", "").replace("_", "").replace(" ", "").casefold()  # noqa: E731
    for j, name in enumerate(names):
        assert fold(CIHP_PARSING[lut[j]]) == fold(name)
    assert lut[IGNORE] == IGNORE


# ------------------------------------------------------------------------------------------ label maps
def _check_label(data: bytes) -> None:
    try:
        label = decode_label(data, "labels/x.png", max_pixels=SMALL)
    except DatasetError as exc:
        assert exc.file == "labels/x.png"
        return
    assert label.dtype == np.uint8 and label.ndim == 2 and label.size <= SMALL


@FUZZ
@given(st.binary(max_size=200))
@example(_label_png())
@example(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
def test_arbitrary_bytes_are_a_label_map_or_refused(data: bytes):
    _check_label(data)


@FUZZ
@given(st.data())
def test_damaged_label_pngs_are_a_label_map_or_refused(data: st.DataObject):
    raw = bytearray(_label_png(seed=data.draw(st.integers(0, 3))))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    _check_label(bytes(raw))


@FEW
@given(label=st.binary(max_size=120) | st.just(_label_png(96, 128)), classes=st.none() | st.binary(max_size=80))
def test_a_dataset_of_arbitrary_files_opens_or_is_refused_naming_a_file(label: bytes, classes: bytes | None):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "set"
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        image = np.zeros((96, 128, 3), np.uint8)
        (root / "images" / "a.png").write_bytes(cv2.imencode(".png", image)[1].tobytes())
        (root / "labels" / "a.png").write_bytes(label)
        if classes is not None:
            (root / "classes.txt").write_bytes(classes)
        try:
            dataset = Dataset.open(root)
        except DatasetError as exc:
            assert str(root) in exc.file
            return
        try:
            samples = list(dataset.samples(CIHP_PARSING))
        except DatasetError as exc:
            assert str(root) in exc.file
            return
        assert samples[0].label.shape == (96, 128)


def test_fifos_in_a_dataset_are_refused_at_once(tmp_path: Path):
    from test_special_files import FifoGuard, fifo

    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "images" / "a.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    (root / "labels" / "a.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    for path in (root / "classes.txt", root / "labels" / "a.png", root / "images" / "a.png"):
        saved = path.read_bytes() if path.exists() else None
        with FifoGuard([fifo(path)]) as guard:
            try:
                Dataset.open(root)
            except DatasetError as exc:
                assert "FIFO" in str(exc) and exc.file == str(path)
            else:
                raise AssertionError(f"a FIFO as {path.name} was accepted")
        assert guard.rescues == 0
        path.unlink()
        if saved is not None:
            path.write_bytes(saved)


# ------------------------------------------------------------------------------------------ grade files
VALID = grades.Grade(version="v1.2", identity="ab" * 32, plan="ort-fp32",
                     dataset=grades.DatasetRef("figures-val", "/data/figures-val", 50, "cd" * 32), miou=0.71,
                     pixel_accuracy=0.9, mean_class_accuracy=0.8, per_class={"Background": 0.95},
                     images_per_s=12.5, at=1_700_000_000.0).to_json()
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
PATHS = [("version",), ("identity",), ("plan",), ("dataset",), ("dataset", "name"), ("dataset", "path"),
         ("dataset", "images"), ("dataset", "sha256"), ("miou",), ("pixel_accuracy",), ("mean_class_accuracy",),
         ("per_class",), ("per_class", "Background"), ("images_per_s",), ("at",)]


def _name_for(raw: Any) -> str:
    """The file name the grade ``raw`` would be recorded under (a fixed one when it has no such key)."""
    try:
        return grades.file_name((raw["identity"], raw["dataset"]["sha256"], raw["plan"]))
    except (TypeError, KeyError):
        return "0" * 32 + ".json"


def _load_checked(folder: Path) -> list[grades.Grade]:
    loaded = grades.load(folder)
    for grade in loaded:  # what load accepts, record takes back
        assert grades.why_not(grade.to_json()) is None
        with tempfile.TemporaryDirectory() as again:
            grades.record(Path(again), grade)
    return loaded


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_a_grade_file_are_skipped(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / grades.GRADES_DIR).mkdir()
        (Path(tmp) / grades.GRADES_DIR / _name_for(VALID)).write_bytes(data)
        assert len(_load_checked(Path(tmp))) <= 1


@FUZZ
@given(JSON)
def test_arbitrary_json_as_a_grade_file_is_skipped(value: Any):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / grades.GRADES_DIR).mkdir()
        (Path(tmp) / grades.GRADES_DIR / _name_for(value)).write_text(json.dumps(value))
        assert _load_checked(Path(tmp)) == []


@FUZZ
@given(st.sampled_from(PATHS), st.one_of(JSON, st.just("delete"), st.floats(), st.integers(-2, 2)))
@example(("miou",), float("nan"))
@example(("dataset", "images"), True)
@example(("plan",), ["ort-fp32"])
def test_a_grade_with_one_field_damaged_is_skipped_or_still_valid(path: tuple[str, ...], value: Any):
    raw = json.loads(json.dumps(VALID))
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    if value == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / grades.GRADES_DIR).mkdir()
        text = json.dumps(raw)  # NaN and Infinity written as their literals: refused by the reader
        (Path(tmp) / grades.GRADES_DIR / _name_for(raw)).write_text(text)
        assert len(_load_checked(Path(tmp))) <= 1


# ------------------------------------------------------------------------------------------ confusion
@st.composite
def label_pairs(draw: st.DrawFn) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    n = draw(st.integers(1, 6))
    images = []
    for _ in range(draw(st.integers(1, 3))):
        shape = draw(st.tuples(st.integers(1, 7), st.integers(1, 7)))
        truth = draw(hnp.arrays(np.uint8, shape, elements=st.sampled_from([*range(n), IGNORE])))
        predicted = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, n - 1)))
        images.append((predicted, truth))
    return n, images


@FUZZ
@given(label_pairs())
def test_confusion_agrees_with_a_count_of_every_pixel(case: tuple[int, list[tuple[np.ndarray, np.ndarray]]]):
    n, images = case
    confusion = Confusion(n)
    counts: dict[tuple[int, int], int] = {}
    for predicted, truth in images:
        confusion.add(predicted, truth)
        for p, t in zip(predicted.ravel().tolist(), truth.ravel().tolist()):
            if t != IGNORE:
                counts[(t, p)] = counts.get((t, p), 0) + 1
    names = [f"class{i}" for i in range(n)]
    scores = confusion.scores(names)
    total = sum(counts.values())
    assert scores.pixels == total
    if total == 0:
        assert scores.per_class == {} and scores.miou == 0.0
        return
    ious, recalls = {}, []
    for c in range(n):
        truth_c = sum(v for (t, _), v in counts.items() if t == c)
        if truth_c == 0:
            continue
        pred_c = sum(v for (_, p), v in counts.items() if p == c)
        inter = counts.get((c, c), 0)
        ious[names[c]] = inter / (truth_c + pred_c - inter)
        recalls.append(inter / truth_c)
    assert scores.per_class.keys() == ious.keys()
    for name, iou in ious.items():
        assert abs(scores.per_class[name] - iou) < 1e-12
    assert abs(scores.miou - sum(ious.values()) / len(ious)) < 1e-12
    assert abs(scores.mean_class_accuracy - sum(recalls) / len(recalls)) < 1e-12
    assert abs(scores.pixel_accuracy - sum(counts.get((c, c), 0) for c in range(n)) / total) < 1e-12
    assert all(0.0 <= v <= 1.0 for v in (scores.miou, scores.pixel_accuracy, scores.mean_class_accuracy))


@FEW
@given(label_pairs(), st.integers(0, 2))
def test_a_refused_image_leaves_the_matrix_unchanged(case: tuple[int, list[tuple[np.ndarray, np.ndarray]]],
                                                     where: int):
    n, images = case
    confusion = Confusion(n)
    predicted, truth = images[0]
    confusion.add(predicted, truth)
    before = confusion.matrix.copy()
    bad = [predicted.copy(), truth.copy()]
    bad[where % 2].flat[0] = n  # one class id past the list
    if where == 2:
        bad = [predicted, truth[:, :-1] if truth.shape[1] > 1 else truth[:-1]]
    try:
        confusion.add(bad[0], bad[1])
    except ValueError:
        assert (confusion.matrix == before).all()
    else:  # the bad id fell on an ignored truth pixel: nothing wrong was counted
        assert where == 0 and truth.flat[0] == IGNORE

