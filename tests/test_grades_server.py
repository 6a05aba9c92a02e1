"""Grades where people decide (``server/quality.py``, ``server/score.py``): grades recorded by ``m2fp-eval
--state-dir`` appear in ``/api/versions``, ``/api/{version}/meta`` and ``/metrics`` for the bundle identity they
were measured on only; files in the grades directory that are not grades never break an endpoint; and
``POST /api/{version}/score`` scores a parse against a user's label map with ``m2fp-eval``'s arithmetic,
refusing each kind of bad label with its own status and a message naming the problem."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiohttp import FormData
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from m2fpkit.runtime.bundle.reader import identity_of
from m2fpkit.runtime.quality import grades
from m2fpkit.runtime.quality.grades import DatasetRef, Grade
from m2fpkit.runtime.registry.options import RegistryOptions
from m2fpkit.server import quality
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from m2fpkit.server.errors import HTTPProblem
from m2fpkit.server.score import read_label

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import copy_root, decode_png_b64, encode, png_bytes  # noqa: E402

VERSIONS = ("v1.0", "v1.2")
OTHER_IDENTITY = "ab" * 32  # a bundle that was v1.2 once: re-exported since, so not the served one
IMAGE = png_bytes(96, 72, seed=5)


def grade(version: str, identity: str, dataset: str = "figures-val", miou: float = 0.71, at: float = 1000.0,
          sha: str | None = None, plan: str = "ort-fp32") -> Grade:
    sha = sha or (dataset.encode().hex() * 64)[:64]
    return Grade(version=version, identity=identity, plan=plan,
                 dataset=DatasetRef(dataset, f"/data/{dataset}", 12, sha), miou=miou, pixel_accuracy=0.9,
                 mean_class_accuracy=0.8, per_class={"Background": 0.95, "Face": 0.5}, images_per_s=3.0, at=at)


@pytest.fixture(scope="module")
def root(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_root(demo_root, tmp_path_factory.mktemp("graded") / "bundles", versions=VERSIONS)


@pytest.fixture(scope="module")
def identities(root: Path) -> dict[str, str]:
    return {v: identity_of(root / "m2fp" / v) for v in VERSIONS}


def config(root: Path, state_dir: Path | None, **server) -> ServerConfig:
    return ServerConfig(bundles=root, runtime=dataclasses.replace(RegistryOptions(), state_dir=state_dir), **server)


async def get_json(client, path: str) -> dict:
    r = await client.get(path)
    body = await r.json()
    assert r.status == 200, body
    return body


async def quality_of(client) -> dict[str, list[dict]]:
    return {v["version"]: v["quality"] for v in (await get_json(client, "/api/versions"))["versions"]}


async def quality_metric(client) -> dict[tuple[str, str, str], float]:
    r = await client.get("/metrics")
    assert r.status == 200
    return {(s.labels["version"], s.labels["dataset"], s.labels["metric"]): s.value
            for f in text_string_to_metric_families(await r.text()) if f.name == "m2fp_version_quality"
            for s in f.samples}


# ================================================================================== grades shown
async def test_grades_appear_for_their_bundle_identity_only(aiohttp_client, root, identities, tmp_path):
    state = tmp_path / "state"
    grades.record(state, grade("v1.2", identities["v1.2"], "figures-val", 0.71, at=2000.0))
    grades.record(state, grade("v1.2", identities["v1.2"], "figures-test", 0.64, at=1000.0))
    grades.record(state, grade("v1.2", OTHER_IDENTITY, "figures-val", 0.99, at=3000.0))  # the old content's
    grades.record(state, grade("v1.0", identities["v1.0"], "figures-val", 0.42, at=1500.0))
    grades.record(state, grade("v9.9", "cd" * 32, "figures-val", 0.5))  # a version this server does not know
    client = await aiohttp_client(make_app(config(root, state)))

    versions = (await get_json(client, "/api/versions"))["versions"]
    by_version = {v["version"]: v for v in versions}
    assert {v: by_version[v]["identity"] for v in VERSIONS} == identities
    v12 = by_version["v1.2"]["quality"]
    assert [(q["dataset"]["name"], q["miou"]) for q in v12] == [("figures-val", 0.71), ("figures-test", 0.64)]
    assert v12[0] == {"dataset": {"name": "figures-val", "sha256": grade("", "", "figures-val").dataset.sha256,
                                  "images": 12},
                      "plan": "ort-fp32", "miou": 0.71, "pixel_accuracy": 0.9, "mean_class_accuracy": 0.8,
                      "per_class": {"Background": 0.95, "Face": 0.5}, "at": 2000.0}  # no path, no identity
    assert [q["miou"] for q in by_version["v1.0"]["quality"]] == [0.42]

    meta = await get_json(client, "/api/latest/meta")
    assert meta["version"] == "v1.2" and meta["quality"] == v12
    assert (await get_json(client, "/api/stable/meta"))["quality"] == by_version["v1.0"]["quality"]

    assert await quality_metric(client) == {
        **{("v1.2", "figures-val", m): v for m, v in (("miou", 0.71), ("pixel_accuracy", 0.9),
                                                     ("mean_class_accuracy", 0.8))},
        **{("v1.2", "figures-test", m): v for m, v in (("miou", 0.64), ("pixel_accuracy", 0.9),
                                                      ("mean_class_accuracy", 0.8))},
        **{("v1.0", "figures-val", m): v for m, v in (("miou", 0.42), ("pixel_accuracy", 0.9),
                                                     ("mean_class_accuracy", 0.8))},
    }


async def test_the_metric_keeps_the_latest_grade_per_dataset_and_a_bounded_number(aiohttp_client, root,
                                                                                     identities, tmp_path):
    state = tmp_path / "state"
    ident = identities["v1.2"]
    # the same dataset name measured twice (the set changed: another fingerprint); the latest is the metric
    grades.record(state, grade("v1.2", ident, "figures-val", 0.30, at=10.0, sha="1" * 64))
    grades.record(state, grade("v1.2", ident, "figures-val", 0.60, at=20.0, sha="2" * 64))
    for i in range(quality.MAX_PER_VERSION + 4):  # more datasets than the list and the metric keep
        grades.record(state, grade("v1.2", ident, f"set-{i:02d}", 0.5, at=100.0 + i))
    client = await aiohttp_client(make_app(config(root, state)))
    listed = (await quality_of(client))["v1.2"]
    assert len(listed) == quality.MAX_PER_VERSION
    assert [q["at"] for q in listed] == sorted((q["at"] for q in listed), reverse=True)
    metric = await quality_metric(client)
    datasets = {d for (_v, d, _m) in metric}
    assert len(datasets) == quality.MAX_METRIC_DATASETS
    assert datasets == {f"set-{i:02d}" for i in range(quality.MAX_PER_VERSION + 4)[-quality.MAX_METRIC_DATASETS:]}
    assert {m for (_v, _d, m) in metric} == set(quality.METRICS)

    # with few datasets, the most recent measurement of a name wins
    state2 = tmp_path / "state2"
    grades.record(state2, grade("v1.2", ident, "figures-val", 0.30, at=10.0, sha="1" * 64))
    grades.record(state2, grade("v1.2", ident, "figures-val", 0.60, at=20.0, sha="2" * 64))
    client2 = await aiohttp_client(make_app(config(root, state2)))
    assert (await quality_metric(client2))[("v1.2", "figures-val", "miou")] == 0.60
    assert [q["miou"] for q in (await quality_of(client2))["v1.2"]] == [0.60, 0.30]


async def test_without_a_state_dir_grades_are_read_from_the_store_directory(aiohttp_client, root, identities,
                                                                           tmp_path):
    own = copy_root(root, tmp_path / "bundles", versions=("v1.2",))
    grades.record(own / "m2fp", grade("v1.2", identities["v1.2"]))
    client = await aiohttp_client(make_app(config(own, None)))
    assert [q["dataset"]["name"] for q in (await quality_of(client))["v1.2"]] == ["figures-val"]
    assert ("v1.2", "figures-val", "miou") in await quality_metric(client)


async def test_files_that_are_not_grades_never_break_an_endpoint(aiohttp_client, root, identities, tmp_path):
    state = tmp_path / "state"
    good = grades.record(state, grade("v1.2", identities["v1.2"]))
    folder = good.parent
    forged = grade("v1.0", identities["v1.0"], miou=0.99).to_json()
    (folder / "forged.json").write_text(json.dumps(forged))  # a valid grade under a name that is not its key
    wrong = {**grade("v1.0", identities["v1.0"]).to_json(), "miou": 7.5}  # a ratio out of range, right name
    (folder / grades.file_name((identities["v1.0"], wrong["dataset"]["sha256"], "ort-fp32"))).write_text(
        json.dumps(wrong))
    (folder / "garbage.json").write_bytes(b"\x00\xff{not json")
    (folder / "array.json").write_text("[1, 2, 3]")
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "huge.json").write_bytes(b" " * (grades.MAX_BYTES + 1))
    (folder / "dir.json").mkdir()
    os.mkfifo(folder / "fifo.json")
    (folder / "link.json").symlink_to(good)
    (folder / "nan.json").write_text(json.dumps({**forged, "miou": float("nan")}))
    client = await aiohttp_client(make_app(config(root, state)))
    for _ in range(2):
        assert {v: [q["miou"] for q in qs] for v, qs in (await quality_of(client)).items()} == {
            "v1.0": [], "v1.2": [0.71]}
        assert (await get_json(client, "/api/v1.0/meta"))["quality"] == []
        assert set(await quality_metric(client)) == {("v1.2", "figures-val", m) for m in quality.METRICS}
    # the grades directory itself unreadable or replaced by a file: no grades, no error
    os.unlink(folder / "fifo.json")
    for child in folder.iterdir():
        (child.rmdir if child.is_dir() and not child.is_symlink() else child.unlink)()
    folder.rmdir()
    folder.write_text("not a directory")
    client2 = await aiohttp_client(make_app(config(root, state)))
    assert (await quality_of(client2)) == {"v1.0": [], "v1.2": []}
    assert await quality_metric(client2) == {}


async def test_grades_recorded_while_serving_appear_at_the_next_refresh(aiohttp_client, root, identities, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(quality, "REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(quality, "RELOAD_SECONDS", 0.0)
    state = tmp_path / "state"
    client = await aiohttp_client(make_app(config(root, state)))
    assert (await quality_of(client))["v1.2"] == []
    grades.record(state, grade("v1.2", identities["v1.2"], "figures-val", 0.71))
    assert [q["miou"] for q in (await quality_of(client))["v1.2"]] == [0.71]
    grades.record(state, grade("v1.2", identities["v1.2"], "figures-val", 0.75, at=5000.0))  # same key: replaced
    assert [q["miou"] for q in (await quality_of(client))["v1.2"]] == [0.75]


# ============================================================================ the board, by itself
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_the_board_reads_at_most_once_per_refresh_and_only_when_the_directory_changed(tmp_path):
    calls: list[Path] = []

    def loader(path: Path) -> list[Grade]:
        calls.append(path)
        return grades.load(path)

    clock = FakeClock()
    board = quality.GradeBoard(tmp_path, refresh=5.0, reload=60.0, wait=5.0, clock=clock, loader=loader)
    assert await board.current() == {} and len(calls) == 1
    grades.record(tmp_path, grade("v1.2", "ef" * 32))
    assert await board.current() == {} and len(calls) == 1  # within the refresh interval: the previous read
    clock.now = 5.0
    assert [g.miou for g in (await board.current())["ef" * 32]] == [0.71] and len(calls) == 2
    clock.now = 10.0
    await board.current()
    assert len(calls) == 2  # the directory did not change: not read again
    clock.now = 70.0
    await board.current()
    assert len(calls) == 3  # ... until the reload interval passed
    assert await quality.GradeBoard(None).current() == {}  # no state directory, no grades


async def test_a_slow_read_does_not_hold_requests(tmp_path):
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(path: Path) -> list[Grade]:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        return [grade("v1.2", "ef" * 32)]

    board = quality.GradeBoard(tmp_path, refresh=0.0, wait=0.05, loader=slow)
    t0 = time.monotonic()
    assert await board.current() == {}  # answered from the previous (empty) read
    assert time.monotonic() - t0 < 5
    release.set()
    board.wait = 10.0  # now wait for the read in progress (or a new one: refresh is 0)
    assert [g.miou for g in (await board.current())["ef" * 32]] == [0.71]
    board.close()


def test_index_keeps_the_most_recent_grades_per_identity():
    many = [grade("v1.2", "ef" * 32, f"s{i}", at=float(i)) for i in range(40)]
    indexed = quality.index([*many, grade("v1.0", "cd" * 32)], per_identity=5)
    assert [g.at for g in indexed["ef" * 32]] == [39.0, 38.0, 37.0, 36.0, 35.0]
    assert len(indexed["cd" * 32]) == 1


# ======================================================================================== /score
def png(label: np.ndarray) -> bytes:
    return encode(label, ".png")


def score_form(label: bytes, image: bytes = IMAGE, label_name: str = "label") -> FormData:
    form = FormData()
    form.add_field("image", image, filename="person.png", content_type="image/png")
    form.add_field(label_name, label, filename="label.png", content_type="image/png")
    return form


@pytest.fixture
async def client(aiohttp_client, root: Path, tmp_path: Path):
    return await aiohttp_client(make_app(config(root, tmp_path / "state")))


async def own_label_map(client, version: str, image: bytes = IMAGE) -> np.ndarray:
    form = FormData()
    form.add_field("image", image, filename="person.png", content_type="image/png")
    body = await (await client.post(f"/api/{version}/parse?include=label_map&visualization=0", data=form)).json()
    label = decode_png_b64(body["label_map"])
    assert label.dtype == np.uint8 and label.shape == (72, 96)
    return label


async def post_score(client, version: str, form: FormData, status: int = 200) -> dict:
    r = await client.post(f"/api/{version}/score", data=form)
    body = await r.json()
    assert r.status == status, body
    assert r.headers["X-Request-ID"] == body["request_id"]
    return body


async def test_a_parse_scored_against_its_own_label_map_is_perfect(client):
    label = await own_label_map(client, "v1.2")
    body = await post_score(client, "latest", score_form(png(label)))
    meta = await get_json(client, "/api/v1.2/meta")
    present = {meta["classes"][c] for c in np.unique(label)}
    assert body["version"] == "v1.2" and body["route"] == "latest" and body["plan"]
    assert body["miou"] == body["pixel_accuracy"] == body["mean_class_accuracy"] == 1.0
    assert body["per_class"] == dict.fromkeys(present, 1.0)
    assert body["pixels"] == label.size and body["image"] == {"height": 72, "width": 96}
    assert {"label", "queue", "decode", "inference", "score"} <= set(body["timing"])
    # pixels marked 255 are not scored
    ignored = label.copy()
    ignored[:10] = 255
    body = await post_score(client, "v1.2", score_form(png(ignored)))
    assert body["miou"] == 1.0 and body["pixels"] == label.size - 10 * 96


async def test_a_relabeled_class_scores_what_arithmetic_predicts(client):
    label = await own_label_map(client, "v1.0")
    meta = await get_json(client, "/api/v1.0/meta")
    ids, counts = np.unique(label, return_counts=True)
    c = int(ids[np.argmin(counts)])  # the smallest class present becomes ...
    d = int(ids[np.argmax(counts)]) if len(ids) > 1 else (c + 1) % meta["num_classes"]  # ... another class
    truth = label.copy()
    truth[label == c] = d
    body = await post_score(client, "v1.0", score_form(png(truth)))
    n_c, n_d = int((label == c).sum()), int((label == d).sum())
    names = meta["classes"]
    others = {names[i]: 1.0 for i in ids if i not in (c, d)}
    iou_d = n_d / (n_d + n_c)  # predicted d: n_d pixels, all truly d; truth d: n_d + n_c pixels
    assert body["per_class"] == pytest.approx({**others, names[d]: iou_d})
    assert names[c] not in body["per_class"] or c == d
    assert body["miou"] == pytest.approx((len(others) + iou_d) / (len(others) + 1))
    assert body["pixel_accuracy"] == pytest.approx(1 - n_c / label.size)
    assert body["mean_class_accuracy"] == pytest.approx((len(others) + iou_d) / (len(others) + 1))  # recall = IoU


def rgb_png(shape: tuple[int, int]) -> bytes:
    return png(np.zeros((*shape, 3), np.uint8))


BAD_LABELS = {
    # case: (label bytes (None: from the version's own map), status, error, words the detail must hold)
    "a JPEG": (encode(np.zeros((72, 96, 3), np.uint8), ".jpg"), 400, "bad_label", ["JPEG", "PNG"]),
    "an RGB PNG": (rgb_png((72, 96)), 400, "bad_label", ["RGB", "8-bit single-channel"]),
    "a 16-bit PNG": (png(np.zeros((72, 96), np.uint16)), 400, "bad_label", ["16-bit", "8-bit single-channel"]),
    "empty": (b"", 400, "bad_label", ["empty"]),
    "not an image": (b"class ids, honest", 400, "bad_label", ["label"]),
    "a truncated PNG": (png(np.zeros((72, 96), np.uint8))[:60], 400, "bad_label", ["truncated or corrupt"]),
    "a PNG cut inside its header": (png(np.zeros((72, 96), np.uint8))[:25], 400, "bad_label", ["truncated"]),
    "over the pixel limit": (png(np.zeros((1, 1), np.uint8))[:16] + (9000).to_bytes(4, "big") * 2
                             + png(np.zeros((1, 1), np.uint8))[24:], 400, "bad_label", ["Mpx"]),
    "another size": (png(np.zeros((96, 72), np.uint8)), 422, "label_mismatch", ["72x96", "96x72", "image's size"]),
    "a class id outside the classes": (png(np.full((72, 96), 40, np.uint8)), 422, "label_mismatch",
                                       ["class id 40", "v1.2 has 21 classes"]),
    "every pixel ignored": (png(np.full((72, 96), 255, np.uint8)), 422, "nothing_to_score", ["255"]),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
async def test_each_bad_label_has_its_status_and_names_the_problem(aiohttp_client, latest_only_root, case):
    client = await aiohttp_client(make_app(config(latest_only_root, None, max_body_bytes=1 << 20)))
    data, status, error, words = BAD_LABELS[case]
    body = await post_score(client, "v1.2", score_form(data), status)
    assert body["error"] == error and body["success"] is False
    assert all(w in body["detail"] for w in words), body["detail"]
    assert body["detail"].startswith("label") or error != "bad_label"


async def test_score_requests_are_parse_requests(aiohttp_client, latest_only_root):
    """Same intake, version choice and image errors as /parse; only multipart with both files."""
    client = await aiohttp_client(make_app(config(latest_only_root, None, max_body_bytes=64 << 10)))
    label = png(np.zeros((72, 96), np.uint8))
    cases = [
        (score_form(label, label_name="other"), 400, "missing_label"),
        (score_form(label, image=b"GIF89a not supported"), 415, "unsupported_media_type"),
        (score_form(label, image=b""), 400, "empty_image"),
        (score_form(label, image=png_bytes(300, 300)), 413, "body_too_large"),
    ]
    for form, status, error in cases:
        body = await post_score(client, "v1.2", form, status)
        assert body["error"] == error, body
    r = await client.post("/api/v1.2/score", data=IMAGE, headers={"Content-Type": "image/png"})
    assert r.status == 415 and "'image' and 'label'" in (await r.json())["detail"]
    r = await client.post("/api/v7.7/score", data=score_form(label))
    assert r.status == 404 and (await r.json())["error"] == "unknown_version"
    r = await client.post("/api/..%2Fetc/score", data=score_form(label))
    assert r.status in (400, 404)
    # counted as a parse: the request metric has the version and the rule
    text = await (await client.get("/metrics")).text()
    counted = {(s.labels["version"], s.labels["rule"], s.labels["status"])
               for f in text_string_to_metric_families(text) if f.name == "m2fp_requests" for s in f.samples}
    assert ("v1.2", "exact", "415") in counted and ("v1.2", "exact", "413") in counted


# ====================================================================== the label reader, property
LABEL_ARRAYS = st.tuples(st.integers(1, 16), st.integers(1, 16), st.integers(0, 2**32 - 1)).map(
    lambda t: np.random.default_rng(t[2]).integers(0, 256, (t[0], t[1]), dtype=np.uint8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LABEL_ARRAYS)
def test_a_label_png_reads_back_exactly(label):
    assert np.array_equal(read_label(png(label), 10_000), label)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LABEL_ARRAYS, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, 400)))
def test_any_mutation_of_a_label_is_a_label_or_a_400(label, flips, cut):
    data = bytearray(png(label))
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data if cut is None else data[:cut])
    try:
        out = read_label(data, 10_000)
    except HTTPProblem as exc:
        assert exc.status == 400 and exc.error == "bad_label" and exc.detail.startswith("label")
    else:
        assert out.dtype == np.uint8 and out.ndim == 2 and out.size <= 10_000


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_a_label_or_a_400(data):
    try:
        out = read_label(data, 10_000)
    except HTTPProblem as exc:
        assert exc.status == 400 and exc.error == "bad_label"
    else:
        assert out.dtype == np.uint8 and out.ndim == 2


def test_other_png_kinds_are_refused_naming_them():
    with pytest.raises(HTTPProblem) as exc:
        read_label(png(np.zeros((4, 4, 4), np.uint8)), 10_000)
    assert "RGBA" in exc.value.detail and exc.value.status == 400
    ok, buf = cv2.imencode(".png", np.zeros((4, 4), np.uint8), [cv2.IMWRITE_PNG_BILEVEL, 1])
    assert ok
    with pytest.raises(HTTPProblem) as exc:
        read_label(buf.tobytes(), 10_000)
    assert "1-bit" in exc.value.detail


def test_the_openapi_document_states_the_bounds_the_server_keeps():
    doc = json.loads((Path(quality.__file__).with_name("static") / "openapi.json").read_text())
    schemas = doc["components"]["schemas"]
    for name in ("VersionStatus", "Meta"):
        assert schemas[name]["properties"]["quality"]["maxItems"] == quality.MAX_PER_VERSION
        assert "quality" in schemas[name]["required"]
    grade_schema = schemas["Grade"]
    assert set(grade_schema["required"]) == set(quality.to_public(grade("v1.2", "ef" * 32)))
    for key in quality.METRICS:
        assert (grade_schema["properties"][key]["minimum"], grade_schema["properties"][key]["maximum"]) == (0, 1)
    score = doc["paths"]["/api/{version}/score"]["post"]
    assert score["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["image", "label"]
    assert set(schemas["ScoreResult"]["required"]) >= {"version", "miou", "pixel_accuracy", "mean_class_accuracy",
                                                        "per_class", "pixels"}
