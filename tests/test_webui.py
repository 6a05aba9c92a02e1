"""The WebUI in a real browser: Debian's headless Chromium driven by Playwright against ``m2fp-serve``.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``:
the browser is the system's, at /usr/bin/chromium). Screenshots land in ``$M2FP_WEBUI_SCREENSHOTS``
(default /tmp/webui-screenshots; the README's pictures ``docs/webui-*.png`` are four of them).
The demo root's versions are trained on drawn figures (export/demo_weights), not M2FP's checkpoint: every result
says so in the demo banner (tests/test_bundle_format.py holds the rule behind ``weights_note``). v1.2 has a
grade (recorded as ``m2fp-eval --state-dir`` would, in the store directory: the server's default state dir).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from m2fpkit.runtime.bundle.reader import identity_of
from m2fpkit.runtime.quality import grades
from m2fpkit.runtime.quality.grades import DatasetRef, Grade

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import SAMPLES, ServerProcess, copy_root  # noqa: E402

CHROMIUM = Path(os.environ.get("M2FP_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("M2FP_WEBUI_SCREENSHOTS", "/tmp/webui-screenshots"))
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install playwright (not `playwright install`)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("webui")
    root = copy_root(demo_root, work / "bundles")
    # a broken version: v1.1's bundle under another name does not verify (config says v1.1)
    shutil.copytree(root / "m2fp" / "v1.1", root / "m2fp" / "v0.9")
    grades.record(root / "m2fp", Grade("v1.2", identity_of(root / "m2fp" / "v1.2"), "ort-fp32",
                                       DatasetRef("figures-val", "/data/figures-val", 40, "0" * 64), miou=0.71,
                                       pixel_accuracy=0.9, mean_class_accuracy=0.8, per_class={"Face": 0.5}, at=1e9))
    with ServerProcess(root, work / "server.log") as srv:
        yield srv


def open_page(browser, server, viewport: dict):
    """A page on the WebUI that records console errors and any request leaving the server."""
    page = browser.new_page(viewport=viewport)
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.outside = []
    page.on("request", lambda r: r.url.startswith(server.url) or r.url.startswith(("data:", "blob:"))
            or page.outside.append(r.url))
    page.goto(server.url + "/")
    return page


def scroll_width(page) -> int:
    return page.evaluate("() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)")


def choose_sample(page, name: str) -> None:
    from playwright.sync_api import expect

    page.locator("#sample").select_option(name)
    expect(page.locator("#original-img")).to_have_attribute("src", re.compile(r"^blob:"), timeout=10_000)


def compare(page, versions: tuple[str, ...]) -> None:
    """Compare mode, exactly ``versions`` ticked, run on the chosen image; waits for every overlay."""
    from playwright.sync_api import expect

    page.locator("#mode-compare").check()
    expect(page.locator("#compare-picker input[value='v1.0']")).to_have_count(1, timeout=30_000)
    page.locator("#compare-none").click()
    for v in versions:
        page.locator(f"#compare-picker input[value='{v}']").check()
    expect(page.locator("#parse")).to_have_text("Compare")
    page.locator("#parse").click()
    expect(page.locator("#compare-grid figure[data-version]")).to_have_count(len(versions), timeout=120_000)


# the cells of a table whose text wraps inside a word (more lines than words: broken letter by letter)
BROKEN_WORDS = """sel => Array.from(document.querySelectorAll(sel)).filter(c => {
  const r = document.createRange(); r.selectNodeContents(c);
  const lines = new Set(Array.from(r.getClientRects()).map(x => Math.round(x.top))).size;
  return lines > Math.max(1, c.textContent.trim().split(/\\s+/).length);
}).map(c => c.textContent)"""
# the options of a <select> whose label does not fit in the select's box (cut off when chosen)
CUT_OFF_OPTIONS = """s => {
  const st = getComputedStyle(s), ctx = document.createElement("canvas").getContext("2d");
  ctx.font = st.font;
  const room = s.clientWidth - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight) - 20;  // 20: the arrow
  return Array.from(s.options).filter(o => ctx.measureText(o.text).width > room).map(o => o.text);
}"""


def test_webui_parses_a_sample_and_an_upload(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server, DESKTOP)

    # the dropdown lists latest, auto, the alias and every version with its channel and task (trained demo weights:
    # not marked as random)
    version = page.locator("#version")
    expect(version.locator("option[value='v2.0-beta']")).to_have_count(1, timeout=30_000)
    options = {o.get_attribute("value"): (o.inner_text(), o.is_disabled())
               for o in version.locator("option").all()}
    assert {"latest", "auto", "stable", "v0.9", "v1.0", "v1.1", "v1.2", "v2.0-beta"} <= set(options), options
    for v, channel, task in (("v1.0", "stable", "multi-human"), ("v1.1", "stable", "single-human"),
                             ("v1.2", "recommended", "multi-human"), ("v2.0-beta", "experimental", "multi-human")):
        text, disabled = options[v]
        assert channel in text and not disabled, (v, text)
        # the whole description (task, weights) is the option's tooltip and, once chosen, the line below
        title = version.locator(f"option[value='{v}']").get_attribute("title")
        assert task in title and "demo: trained on drawn figures" in title, (v, title)
    assert "v1.2" in options["latest"][0] and "v1.0" in options["stable"][0]
    text, disabled = options["v0.9"]
    assert disabled and "failed" in text, text
    assert version.input_value() == "latest"
    expect(page.locator("#version-info")).to_contain_text("multi-human")
    expect(page.locator("#version-info")).to_contain_text("demo: trained on drawn figures")
    # the grade people decide on, beside the picker (latest → v1.2, graded); none for an ungraded version
    expect(page.locator("#version-grade")).to_have_text("v1.2 · mIoU 0.71 on figures-val")

    # experimental versions carry a visible warning; others do not
    warning = page.locator("#warning")
    expect(warning).to_be_hidden()
    version.select_option("v2.0-beta")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("experimental")
    version.select_option("v1.0")
    expect(warning).to_be_hidden()
    expect(page.locator("#version-grade")).to_be_hidden()
    version.select_option("v2.0-beta")
    expect(warning).to_be_visible()

    # a bundled sample, parsed by the chosen version: v2.0-beta is not loaded yet, so the page says it loads
    choose_sample(page, "two_people.jpg")
    expect(page.locator("#original-img")).to_be_visible()
    banner = page.locator("#demo-banner")
    expect(banner).to_be_hidden()
    page.locator("#parse").click()
    expect(page.locator("#status")).to_contain_text("loading version v2.0-beta")
    result = page.locator("#result-img")
    page.wait_for_function("document.querySelector('#result-img').src.startsWith('data:image/')", timeout=120_000)
    expect(result).to_be_visible()
    expect(page.locator("#answered-version")).to_have_text("v2.0-beta")
    expect(page.locator("#answered-channel")).to_have_text("experimental")
    expect(page.locator("#latency")).to_contain_text("ms")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("done")
    # demo weights trained on drawn figures: the banner says so
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("v2.0-beta is not M2FP's checkpoint")
    expect(banner).to_contain_text("trained on synthetic figures (m2fp-figures)")
    assert page.locator("#legend li").count() >= 1
    timing = page.locator("#timing").text_content()
    assert "inference" in timing and "unit" not in timing, timing  # numbers only, all in ms
    size = page.evaluate("() => { const i = document.querySelector('#result-img');"
                         " return [i.naturalWidth, i.naturalHeight]; }")
    assert size == [320, 240], size  # the overlay has the sample's size
    page.screenshot(path=str(SHOTS / "webui-desktop.png"), full_page=True)

    # choosing another image clears the result and the "done" status
    version.select_option("stable")
    expect(warning).to_be_hidden()
    page.locator("#file").set_input_files(str(SAMPLES / "one_person.png"))
    expect(page.locator("#status")).to_have_text("")
    expect(banner).to_be_hidden()
    expect(page.locator("#answered-version")).to_have_text("–")
    page.locator("#parse").click()  # a file upload through the alias
    expect(page.locator("#answered-version")).to_have_text("v1.0", timeout=120_000)
    size = page.evaluate("() => { const i = document.querySelector('#result-img');"
                         " return [i.naturalWidth, i.naturalHeight]; }")
    assert size == [240, 320], size
    expect(banner).to_contain_text("v1.0 is not M2FP's checkpoint")

    # an error is shown readably
    page.locator("#file").set_input_files(files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                  "buffer": b"this is not a picture"}])
    page.locator("#parse").click()
    expect(page.locator("#error")).to_be_visible(timeout=30_000)
    expect(page.locator("#error")).to_contain_text("415")
    expect(page.locator("#error")).to_contain_text("unsupported")
    page.screenshot(path=str(SHOTS / "webui-error.png"), full_page=True)

    assert not page.outside, f"the page reached outside the server: {page.outside}"
    assert not [e for e in page.console_errors if "415" not in e], page.console_errors
    page.close()


def test_webui_compares_two_versions(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server, DESKTOP)
    choose_sample(page, "two_people.jpg")
    expect(page.locator("#compare-panel")).to_be_hidden()
    compare(page, ("v1.0", "v1.2"))
    expect(page.locator("#result-panel")).to_be_hidden()
    for v in ("v1.0", "v1.2"):  # each version's overlay, at the sample's size, with its latency and demo badge
        figure = page.locator(f"#compare-grid figure[data-version='{v}']")
        expect(figure.locator("img")).to_be_visible()
        expect(figure.locator("figcaption")).to_contain_text(re.compile(r"\d+ ms"))
        expect(figure.locator(".demo-badge")).to_have_count(1)
        size = figure.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert size == [320, 240], (v, size)
    expect(page.locator("#compare-demo-banner")).to_contain_text("v1.0, v1.2 are not M2FP's checkpoint")
    grid = page.locator("#compare-grid")
    expect(grid.locator("figure[data-version='v1.2'] .grade")).to_have_text("mIoU 0.71 on figures-val")
    expect(grid.locator("figure[data-version='v1.0'] .grade")).to_have_text("not graded")
    row = page.locator("#agreement tbody tr[data-pair='v1.0|v1.2']")
    expect(row).to_have_count(1)
    agreement = row.locator("td").nth(1).text_content()
    assert re.fullmatch(r"\d{1,3}\.\d %", agreement), agreement
    assert 0.0 <= float(agreement.split()[0]) <= 100.0
    page.locator("#agreement-classes summary").first.click()
    assert page.locator("#agreement-classes tbody tr").count() >= 1
    expect(page.locator("#status")).to_have_text("done")
    expect(page.locator("#error")).to_be_hidden()
    page.screenshot(path=str(SHOTS / "webui-compare-desktop.png"), full_page=True)

    # a label map for the image: v1.0's own parse, so v1.0 scores 1 against it and v1.2 what it agrees
    label = base64.b64decode(page.evaluate("""async () => {
      const form = new FormData();
      form.append("image", await (await fetch("/static/samples/two_people.jpg")).blob(), "two_people.jpg");
      const r = await fetch("/api/v1.0/parse?include=label_map&visualization=0", {method: "POST", body: form});
      return (await r.json()).label_map; }"""))
    page.locator("#label-file").set_input_files(files=[{"name": "label.png", "mimeType": "image/png",
                                                         "buffer": label}])
    scores = page.locator("#score-table")
    expect(scores.locator("tr[data-row='miou'] td[data-version='v1.0']")).to_have_text("1.000", timeout=60_000)
    assert re.fullmatch(r"[01]\.\d{3}", scores.locator("tr[data-row='miou'] td[data-version='v1.2']").inner_text())
    assert scores.locator("tbody tr").count() >= 3  # mIoU, pixel accuracy and a row per class in the label
    expect(grid.locator("figure[data-version='v1.0'] .vs-label")).to_have_text("vs your label: mIoU 1.000")
    expect(page.locator("#status")).to_have_text("done")
    page.screenshot(path=str(SHOTS / "webui-compare-label-desktop.png"), full_page=True)

    # "all" ticks every version that can serve, loaded or not (v1.1 is not loaded yet), never a failed one
    page.locator("#compare-none").click()
    states = {v["version"]: v["state"] for v in page.evaluate("() => fetch('/api/versions').then(r => r.json())"
                                                             ".then(b => b.versions)")}
    assert states["v0.9"] == "failed" and {"ready"} < set(states.values()), states
    page.locator("#compare-all").click()
    ticked = {i.get_attribute("value") for i in page.locator("#compare-picker input:checked").all()}
    assert ticked == {"v1.0", "v1.1", "v1.2", "v2.0-beta"}, (ticked, states)

    # one version is refused in the page, before any request
    page.locator("#compare-none").click()
    page.locator("#compare-picker input[value='v1.0']").check()
    page.locator("#parse").click()
    expect(page.locator("#error")).to_contain_text("two or more")
    assert not page.outside and not page.console_errors, (page.outside, page.console_errors)
    page.close()


def test_webui_fits_a_phone_in_every_state(browser, server):
    """390×844: no horizontal scroll with the picker, a result, a compare, the versions table and an error."""
    from playwright.sync_api import expect

    page = open_page(browser, server, PHONE)
    expect(page.locator("#version option[value='v2.0-beta']")).to_have_count(1, timeout=30_000)
    widths = {"picker": scroll_width(page)}
    # every entry of the model select shows whole when chosen: nothing cut off at the select's edge
    cut_off = page.locator("#version").evaluate(CUT_OFF_OPTIONS)
    choose_sample(page, "crowd.png")
    page.locator("#version").select_option("v1.2")
    page.locator("#parse").click()
    expect(page.locator("#answered-version")).to_have_text("v1.2", timeout=120_000)
    expect(page.locator("#demo-banner")).to_be_visible()
    page.locator("#timing").evaluate("e => e.closest('details').open = true")
    widths["result"] = scroll_width(page)
    page.screenshot(path=str(SHOTS / "webui-phone.png"), full_page=True)
    page.locator("#versions-details summary").click()
    expect(page.locator("#versions-table")).to_be_visible()
    widths["versions table"] = scroll_width(page)
    # the table scrolls inside its frame rather than breaking words letter by letter
    broken = page.evaluate(BROKEN_WORDS, "#versions-table th, #versions-table td")
    page.locator("#versions-details summary").click()
    compare(page, ("v1.0", "v1.1", "v1.2"))
    expect(page.locator("#agreement tbody tr")).to_have_count(3)
    for summary in page.locator("#agreement-classes summary").all():
        summary.click()
    widths["compare"] = scroll_width(page)
    page.screenshot(path=str(SHOTS / "webui-compare-phone.png"), full_page=True)
    page.locator("#mode-single").check()
    page.locator("#file").set_input_files(files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                  "buffer": b"this is not a picture"}])
    page.locator("#parse").click()
    expect(page.locator("#error")).to_be_visible(timeout=30_000)
    widths["error"] = scroll_width(page)
    assert all(w <= PHONE["width"] for w in widths.values()), widths
    assert not cut_off, f"model select entries cut off on a phone: {cut_off}"
    assert not broken, f"versions table cells broken inside words: {broken}"
    assert not page.outside, page.outside
    page.close()
