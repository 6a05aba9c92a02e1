"""The labelled figure generator (``runtime/figures.py``): seeded, labels agree with person ids, enough
people and classes show, left and right are the person's, datasets and the command line round-trip."""

from __future__ import annotations

import ast
import tomllib

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_import_graph import MODULES, ROOT

from m2fpkit.runtime import figures
from m2fpkit.runtime.figures import CIHP_PARSING, LIP_PARSING, Scene, item_seed, scene, write_dataset

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIDES = st.integers(figures.MIN_SIDE, 160)
TASK = st.sampled_from(figures.TASKS)
ARM = (CIHP_PARSING.index("Left-arm"), CIHP_PARSING.index("Right-arm"))
LIMBS = {"arm": ARM, "leg": (CIHP_PARSING.index("Left-leg"), CIHP_PARSING.index("Right-leg")),
         "shoe": (CIHP_PARSING.index("Left-shoe"), CIHP_PARSING.index("Right-shoe"))}


def same(a: Scene, b: Scene) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
            and np.array_equal(a.humans, b.humans) and a.people == b.people and a.classes == b.classes)


# ================================================================================== determinism
@FAST
@given(seed=st.integers(0, 2**63), h=SIDES, w=SIDES, task=TASK)
def test_the_same_seed_gives_the_same_scene(seed, h, w, task):
    assert same(scene(seed, h, w, task=task), scene(seed, h, w, task=task))


def test_different_seeds_give_different_scenes():
    scenes = [scene(s, 96, 128) for s in range(8)]
    for i, a in enumerate(scenes):
        for b in scenes[i + 1:]:
            assert not np.array_equal(a.image, b.image)
            assert not np.array_equal(a.labels, b.labels)


# ================================================================================== the maps
@FAST
@given(seed=st.integers(0, 10_000), h=SIDES, w=SIDES, task=TASK, people=st.none() | st.integers(1, figures.MAX_PEOPLE))
def test_labels_agree_with_person_ids_and_everyone_shows(seed, h, w, task, people):
    s = scene(seed, h, w, task=task, people=people)
    assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8
    assert s.labels.shape == s.humans.shape == (h, w) and s.labels.dtype == s.humans.dtype == np.uint8
    assert s.classes == (LIP_PARSING if task == "single-human" else CIHP_PARSING)
    assert s.labels.max() < len(s.classes)  # no id outside the 20, and no IGNORE: edges are hard
    assert np.array_equal(s.humans > 0, s.labels != 0)
    n = people or (1 if task == "single-human" else len(s.people))
    assert [p.index for p in s.people] == list(range(1, n + 1))
    counts = np.bincount(s.humans.ravel(), minlength=n + 1)
    assert len(counts) == n + 1 and counts[1:].min() >= figures.min_person_pixels(h, w)
    if n >= 2:
        assert np.count_nonzero(np.bincount(s.labels.ravel(), minlength=20)[1:]) >= figures.MIN_CLASSES


def test_default_multi_human_scenes_have_two_to_four_people_and_eight_classes():
    for seed in range(24):
        s = scene(seed)
        counts = np.bincount(s.humans.ravel())
        assert 3 <= len(counts) <= 5, seed  # background + 2..4 people
        assert counts[1:].min() >= figures.min_person_pixels(384, 512), (seed, counts)
        assert np.count_nonzero(np.bincount(s.labels.ravel())[1:]) >= 8, seed


def test_single_human_scenes_have_one_person_and_use_jumpsuits_not_torso_skin():
    torso_or_jumpsuit = CIHP_PARSING.index("Torso-skin")
    seen = {"single-human": 0, "multi-human": 0}
    for seed in range(30):
        single = scene(seed, 128, 96, task="single-human")
        assert single.humans.max() == 1 and len(single.people) == 1
        seen["single-human"] += bool((single.labels == torso_or_jumpsuit).any())
        seen["multi-human"] += bool((scene(seed, 96, 128).labels == torso_or_jumpsuit).any())
    # id 10 is drawn in both tasks: as jumpsuits for LIP, as bare torso skin (neck, neckline) for CIHP
    assert seen["single-human"] >= 1 and seen["multi-human"] >= 10, seen


def test_people_are_cut_off_by_the_border_and_occlude_each_other():
    cut = overlapping = 0
    for seed in range(20):
        s = scene(seed, 128, 160)
        boxes = [p.box for p in s.people]
        cut += any(x0 < 0 or y0 < 0 or x1 > 160 or y1 > 128 for x0, y0, x1, y1 in boxes)
        for p in s.people[1:]:  # a later person stands in part of an earlier one's box
            overlapping += any(min(p.box[2], q.box[2]) > max(p.box[0], q.box[0])
                               and min(p.box[3], q.box[3]) > max(p.box[1], q.box[1]) for q in s.people[:p.index - 1])
    assert cut >= 5 and overlapping >= 5, (cut, overlapping)


# ================================================================================== left and right
def test_left_and_right_parts_are_the_persons_own():
    """Facing the camera, Left-arm/leg/shoe lie right of Right-arm/leg/shoe in the image; from the back, left."""
    checked = {("front", limb): 0 for limb in LIMBS} | {("back", limb): 0 for limb in LIMBS}
    xs = np.arange(256, dtype=np.float64)[None, :]
    for seed in range(40):
        s = scene(seed, 192, 256)
        for p in s.people:
            own = s.humans == p.index
            for limb, (left_id, right_id) in LIMBS.items():
                left, right = own & (s.labels == left_id), own & (s.labels == right_id)
                if left.sum() < 15 or right.sum() < 15:
                    continue
                left_x = (np.broadcast_to(xs, left.shape)[left]).mean()
                right_x = (np.broadcast_to(xs, right.shape)[right]).mean()
                assert (left_x > right_x) == (p.facing == "front"), (seed, p, limb, left_x, right_x)
                checked[p.facing, limb] += 1
    assert min(checked.values()) >= 5, checked


# ================================================================================== arguments
@pytest.mark.parametrize("kwargs,named", [
    ({"height": 63}, "height"), ({"height": 4097}, "height"), ({"width": 63}, "width"),
    ({"width": 4097}, "width"), ({"task": "crowd"}, "task"), ({"people": 0}, "people"),
    ({"people": 13}, "people"), ({"seed": -1}, "seed"),
])
def test_bad_arguments_are_value_errors_naming_the_argument(kwargs, named):
    args = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=named):
        scene(**args)


# ================================================================================== datasets
def test_write_dataset_round_trips_through_png(tmp_path):
    names = write_dataset(tmp_path / "set", 3, seed=7, height=80, width=112)
    assert names == ["figure-00000", "figure-00001", "figure-00002"]
    out = tmp_path / "set"
    assert (out / "classes.txt").read_text().splitlines() == list(CIHP_PARSING)
    for i, name in enumerate(names):
        s = scene(item_seed(7, i), 80, 112)
        labels = cv2.imread(str(out / "labels" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        humans = cv2.imread(str(out / "humans" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(out / "images" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert labels.ndim == 2 and labels.dtype == np.uint8 and np.array_equal(labels, s.labels)
        assert humans.ndim == 2 and humans.dtype == np.uint8 and np.array_equal(humans, s.humans)
        assert np.array_equal(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), s.image)
    assert len({item_seed(7, i) for i in range(3)} | {item_seed(8, 0)}) == 4


def test_a_single_human_dataset_lists_the_lip_classes(tmp_path):
    assert write_dataset(tmp_path, 1, height=64, width=64, task="single-human") == ["figure-00000"]
    assert (tmp_path / "classes.txt").read_text().splitlines() == list(LIP_PARSING)


# ================================================================================== command line
def test_the_command_writes_a_dataset(tmp_path):
    r = CliRunner().invoke(figures.main, [str(tmp_path / "out"), "--count", "2", "--seed", "3", "--size", "72x90",
                                          "--task", "single-human"])
    assert r.exit_code == 0, r.output
    written = sorted(p.name for p in (tmp_path / "out" / "labels").iterdir())
    assert written == ["figure-00000.png", "figure-00001.png"]
    labels = cv2.imread(str(tmp_path / "out" / "labels" / written[1]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(labels, scene(item_seed(3, 1), 72, 90, task="single-human").labels)


@pytest.mark.parametrize("args,option", [
    (["--size", "32x64"], "--size"), (["--size", "64x5000"], "--size"), (["--size", "big"], "--size"),
    (["--count", "0"], "--count"), (["--seed", "-1"], "--seed"), (["--task", "crowd"], "--task"),
])
def test_the_command_refuses_bad_options_with_status_2(tmp_path, args, option):
    r = CliRunner().invoke(figures.main, [str(tmp_path / "out"), "--count", "1", *args])
    assert r.exit_code == 2 and option in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_the_command_is_registered():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["m2fp-figures"] == "m2fpkit.runtime.figures:main"


# ================================================================================== one home
def test_the_class_lists_are_written_only_in_the_generator():
    from m2fpkit.export.model import config

    assert config.CIHP_CLASSES == (*CIHP_PARSING, "Human") and config.LIP_CLASSES == LIP_PARSING
    copies = []
    for module, path in MODULES.items():
        if module == "m2fpkit.runtime.figures":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.List):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if len(names & set(CIHP_PARSING)) >= 10:
                    copies.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not copies, copies
