"""Golden samples with people in them (issue 23, part 2).

The default golden image is a drawn scene of people (``runtime.figures``), ``m2fp-export --golden IMAGE`` uses a
photo instead, and a degenerate golden label map (one class, or no person pixel: ``runtime.bundle.golden_check``) is
recorded at export, refused by ``--strict-golden``, and judged again by the runtime from the label map itself —
shown in ``/api/versions``, ``/api/{v}/meta``, ``/metrics`` and the WebUI.

Costs: the session bundles ``ms_multi`` / ``ms_single`` and two exports of ``ms_multi``'s architecture through
the session's graph cache; the served bundles are clones of ``fast_multi_src`` (no export).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from m2fpkit.export import build
from m2fpkit.export import golden as export_golden
from m2fpkit.export.cli import main as export_main
from m2fpkit.export.specs import VersionSpec
from m2fpkit.runtime import figures
from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.bundle.config import BundleConfig
from m2fpkit.runtime.bundle.golden_check import GoldenVerdict, judge
from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.errors import ExportError, MalformedFile
from m2fpkit.runtime.imageio import decode_image
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from reference.bundles import clone_bundle, edit_config, png_bytes, synthetic_png

SAMPLES = Path(__file__).resolve().parent.parent / "server" / "static" / "samples"
PHOTO = SAMPLES / "astronaut.jpg"
CIHP = figures.CIHP_PARSING
FACE = CIHP.index("Face")


def label_png(bundle: Path) -> np.ndarray:
    config = BundleConfig.read(bundle)
    assert config.golden is not None
    image = cv2.imread(str(bundle / config.golden.label_map), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.ndim == 2
    return image


def published(root: Path) -> list[str]:
    """Versions and hidden (staging) entries of the store at ``root``."""
    store = BundleStore(root)
    if not store.dir.is_dir():
        return []
    return store.versions() + sorted(p.name for p in store.dir.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------ the rule

def test_the_rule_one_class_or_no_person_pixel_is_degenerate():
    background = judge(np.zeros((4, 6), np.uint8), CIHP)
    assert background == GoldenVerdict("one class (Background) in the golden label map: no person pixel",
                                        ("Background",))
    assert background.degenerate and background.to_dict() == {
        "degenerate": True, "reason": background.reason, "classes": ["Background"]}
    face = judge(np.full((4, 6), FACE, np.uint8), CIHP)
    assert face.degenerate and face.reason == "one class (Face) in the golden label map"
    assert judge(np.zeros((0, 6), np.uint8), CIHP).degenerate
    two = np.zeros((4, 6), np.uint8)
    two[1, 2] = FACE  # a single person pixel is enough: the rule is about classes, not area
    fine = judge(two, CIHP)
    assert not fine.degenerate and fine.reason is None and fine.classes == ("Background", "Face")
    assert fine.to_dict() == {"degenerate": False, "reason": None, "classes": ["Background", "Face"]}
    assert judge(np.full((2, 2), 42, np.uint8), CIHP).classes == ("class 42",)  # an id the bundle does not name


# ------------------------------------------------------------------------------------ config.json

def _raw_golden_config(bundle: Path) -> dict:
    return json.loads((bundle / "config.json").read_text())


def test_golden_degenerate_is_read_written_and_validated(ms_multi):
    raw = _raw_golden_config(ms_multi.bundle_dir)
    raw["golden"]["degenerate"] = "one class (Face) in the golden label map"
    config = BundleConfig.from_dict(raw)
    assert config.golden is not None and config.golden.degenerate == "one class (Face) in the golden label map"
    assert json.loads(config.to_json())["golden"]["degenerate"] == config.golden.degenerate
    assert BundleConfig.from_bytes(config.to_json().encode()) == config
    raw["golden"]["degenerate"] = None
    assert BundleConfig.from_dict(raw).golden.degenerate is None  # type: ignore[union-attr]
    del raw["golden"]["degenerate"]  # a bundle written before the field
    assert BundleConfig.from_dict(raw).golden.degenerate is None  # type: ignore[union-attr]
    for bad in (True, 1, "", ["one class"]):
        raw["golden"]["degenerate"] = bad
        with pytest.raises(MalformedFile, match="config.json → golden → degenerate"):
            BundleConfig.from_dict(raw)


# ---------------------------------------------------------------------------- the default golden image

@pytest.mark.parametrize("case", ["ms_multi", "ms_single"])
def test_the_default_golden_image_is_a_scene_of_people(case, request):
    """The exported golden image is exactly ``figures.scene`` of the fixed seed, at the size the task calls for,
    and that scene has people in it; the recorded verdict is the rule applied to the written label map."""
    bundle = request.getfixturevalue(case).bundle_dir
    config = BundleConfig.read(bundle)
    assert config.golden is not None
    got = decode_image((bundle / config.golden.image).read_bytes())
    if config.task == "single-human":
        w, h = config.preprocess.canvas  # type: ignore[misc]
        assert got.shape[:2] == (h, w)  # fills the canvas: neither shrunk nor padded by the preprocessing
    else:
        assert got.shape[:2] == export_golden.MULTI_HUMAN_SIZE
    scene = figures.scene(export_golden.SCENE_SEED, *got.shape[:2], task=config.task)
    assert np.array_equal(got, scene.image)
    people = np.unique(scene.humans[scene.humans > 0])
    assert len(people) == len(scene.people) and len(people) >= 1
    assert len(people) == 1 if config.task == "single-human" else len(people) >= 2
    assert (scene.labels > 0).mean() > 0.05  # people fill a real share of the picture, not a few pixels
    assert config.golden.degenerate == judge(label_png(bundle), config.classes).reason


# ------------------------------------------------------------------------------------- m2fp-export

def invoke(*args: str):
    return CliRunner().invoke(export_main, list(args), catch_exceptions=True)


def forced(verdict: GoldenVerdict):
    return lambda label_map, classes: verdict


def test_golden_option_uses_the_photo(ms_multi, tmp_bundles, monkeypatch):
    """``--golden PHOTO``: the bundle's golden image decodes to the photo. ``--strict-golden`` lets it pass when
    the label map is judged fine (forced here: the random model sees nothing in any photo)."""
    monkeypatch.setattr(export_golden, "judge", forced(GoldenVerdict(None, ("Background", "Face"))))
    result = invoke("v5.1", "--source", str(ms_multi.model_dir), "--golden", str(PHOTO), "--strict-golden",
                    "--bundles", str(tmp_bundles))
    assert result.exit_code == 0, result.output
    bundle = tmp_bundles / "m2fp" / "v5.1"
    reader.inspect(bundle)
    config = BundleConfig.read(bundle)
    assert config.golden is not None and config.golden.degenerate is None
    photo = decode_image(PHOTO.read_bytes())
    assert np.array_equal(decode_image((bundle / config.golden.image).read_bytes()), photo)
    default = decode_image((ms_multi.bundle_dir / config.golden.image).read_bytes())
    assert default.shape != photo.shape or not np.array_equal(default, photo)  # not the default scene


@pytest.mark.parametrize("content", [b"this is not a picture\n", None], ids=["not-an-image", "missing"])
def test_a_bad_golden_file_is_refused_naming_it_before_anything_is_staged(ms_multi, tmp_bundles, tmp_path, content):
    bad = tmp_path / "notes.txt"
    if content is not None:
        bad.write_bytes(content)
    result = invoke("v5.2", "--source", str(ms_multi.model_dir), "--golden", str(bad), "--bundles", str(tmp_bundles))
    assert result.exit_code == 1, result.output
    assert f"golden image {bad}" in result.output and "Traceback" not in result.output
    assert published(tmp_bundles) == []
    spec = VersionSpec(version="v5.2", source=str(ms_multi.model_dir), task=None, channel="experimental")
    with pytest.raises(ExportError, match=f"golden image {bad}"):
        build.export_version(spec, tmp_bundles, golden_image=bad)
    assert published(tmp_bundles) == []


def test_strict_golden_refuses_a_degenerate_export(ms_multi, tmp_bundles, monkeypatch, caplog):
    monkeypatch.setattr(export_golden, "judge", forced(GoldenVerdict("forced for the test", ("Background",))))
    result = invoke("v5.3", "--source", str(ms_multi.model_dir), "--strict-golden", "--bundles", str(tmp_bundles))
    assert result.exit_code == 1, result.output
    assert "export failed for v5.3" in result.output
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("golden sample degenerate (forced for the test)" in m and "--strict-golden" in m for m in errors), errors
    assert published(tmp_bundles) == []


# ------------------------------------------------------------------------------------------ serving

def _with_labels(labels: np.ndarray | None, degenerate: object) -> Callable[[Path], None]:
    """A ``clone_bundle(then=…)`` step: golden labels replaced by ``labels``, ``golden → degenerate`` set to
    ``degenerate`` (``KeyError``: the key removed, as in a bundle written before it existed), and a floor the
    random model's own label map meets whatever it is (the self-test still runs)."""

    def then(stage: Path) -> None:
        config = BundleConfig.read(stage)
        assert config.golden is not None
        if labels is not None:
            (stage / config.golden.label_map).write_bytes(png_bytes(labels))

        def change(raw: dict) -> None:
            raw["golden"]["min_agreement"] = 0.05
            if degenerate is KeyError:
                raw["golden"].pop("degenerate", None)
            else:
                raw["golden"]["degenerate"] = degenerate

        edit_config(stage, change)  # and the manifest

    return then


@pytest.fixture(scope="module")
def golden_root(fast_multi_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v0.3: golden labels all Background, config says not degenerate; v0.4: the same in the old format (no
    ``degenerate`` key); v0.5 (latest): half Background, half Face, config wrongly says degenerate."""
    root = tmp_path_factory.mktemp("golden_root")
    shape = label_png(fast_multi_src).shape
    zeros = np.zeros(shape, np.uint8)
    half = zeros.copy()
    half[:, shape[1] // 2:] = FACE
    clone_bundle(fast_multi_src, root, "v0.3", then=_with_labels(zeros, None))
    clone_bundle(fast_multi_src, root, "v0.4", then=_with_labels(zeros, KeyError))
    clone_bundle(fast_multi_src, root, "v0.5", then=_with_labels(half, "a wrong claim"))
    return root


BACKGROUND_ONLY = {"degenerate": True, "reason": "one class (Background) in the golden label map: no person pixel",
                   "classes": ["Background"]}
TWO_CLASSES = {"degenerate": False, "reason": None, "classes": ["Background", "Face"]}
EXPECTED = {"v0.3": BACKGROUND_ONLY, "v0.4": BACKGROUND_ONLY, "v0.5": TWO_CLASSES}


def test_the_runtime_judges_the_label_map_not_the_config(golden_root):
    for version, expected in EXPECTED.items():
        content = reader.load(golden_root / "m2fp" / version)
        assert content.golden_verdict is not None and content.golden_verdict.to_dict() == expected, version
    assert "degenerate" not in _raw_golden_config(golden_root / "m2fp" / "v0.4")["golden"]  # the old format


def gauge(text: str, name: str) -> dict[str, float]:
    return {s.labels["version"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


async def test_a_degenerate_version_loads_serves_and_says_so_everywhere(aiohttp_client, golden_root):
    client = await aiohttp_client(make_app(ServerConfig(bundles=golden_root)))
    r = await client.get("/api/versions")
    body = await r.json()
    assert r.status == 200
    before = {v["version"]: v for v in body["versions"]}
    assert before["v0.3"]["state"] == "discovered"  # judged from the verified file on disk before any load
    assert {v: s["golden"] for v, s in before.items()} == EXPECTED
    for version in ("v0.3", "v0.4"):  # a degenerate golden sample still loads and serves
        r = await client.post(f"/api/{version}/parse", data=synthetic_png(96, 128, seed=3),
                              headers={"Content-Type": "image/png"})
        assert r.status == 200, await r.text()
        assert r.headers["X-Model-Version"] == version
    body = await (await client.get("/api/versions")).json()
    after = {v["version"]: v for v in body["versions"]}
    assert after["v0.3"]["state"] == after["v0.4"]["state"] == "ready"
    assert {v: s["golden"] for v, s in after.items()} == EXPECTED  # judged again from the loaded bytes
    for version, expected in EXPECTED.items():
        meta = await (await client.get(f"/api/{version}/meta")).json()
        assert meta["golden"] == expected, version
    metrics = await (await client.get("/metrics")).text()
    assert gauge(metrics, "m2fp_golden_degenerate") == {"v0.3": 1.0, "v0.4": 1.0, "v0.5": 0.0}


def test_the_webui_marks_a_degenerate_version(golden_root, tmp_path):
    """The picker (option tooltip, a ⚠ badge and the hint under the select), the compare picker and the versions
    table say "golden sample degenerate: …" for v0.3 and v0.4, and nothing of the kind for v0.5."""
    from server_fixtures import ServerProcess

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.fail(f"{chromium} is missing: apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    note = "golden sample degenerate: " + BACKGROUND_ONLY["reason"]
    with ServerProcess(golden_root, tmp_path / "server.log") as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/")
            option = page.locator("#version option[value='v0.3']")
            expect(option).to_have_count(1, timeout=30_000)
            assert note in (option.get_attribute("title") or "")
            assert option.get_attribute("data-golden") == "degenerate"
            fine = page.locator("#version option[value='v0.5']")
            assert "golden sample degenerate" not in (fine.get_attribute("title") or "")
            assert fine.get_attribute("data-golden") == ""
            page.locator("#version").select_option("v0.4")
            expect(page.locator("#golden-badge")).to_be_visible()
            expect(page.locator("#golden-badge")).to_have_attribute("title", note)
            expect(page.locator("#version-info")).to_contain_text(note)
            page.locator("#version").select_option("v0.5")
            expect(page.locator("#golden-badge")).to_be_hidden()
            expect(page.locator("#version-info")).not_to_contain_text("golden sample degenerate")
            page.locator("#versions-details summary").click()
            golden_cells = page.locator("#versions-table tbody tr td:nth-child(6)").all_text_contents()
            assert sorted(golden_cells) == ["degenerate", "degenerate", "ok"]
            page.locator("#mode-compare").check()
            expect(page.locator("#compare-picker input[value='v0.3']")).to_have_count(1)
            badges = page.locator("#compare-picker label:has(.golden-badge) input")
            assert sorted(badges.evaluate_all("boxes => boxes.map(b => b.value)")) == ["v0.3", "v0.4"]
        finally:
            browser.close()
