"""The WebUI in a real browser: Debian's headless Chromium driven by Playwright against ``m2fp-serve``.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``:
the browser is the system's, at /usr/bin/chromium). The screenshot lands in /tmp/webui.png.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import SAMPLES, ServerProcess, copy_root  # noqa: E402

CHROMIUM = Path(os.environ.get("M2FP_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path("/tmp/webui.png")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install playwright (not `playwright install`)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def server(demo_root: Path, tmp_path: Path):
    root = copy_root(demo_root, tmp_path / "bundles")
    # a broken version: v1.1's bundle under another name does not verify (config says v1.1)
    shutil.copytree(root / "m2fp" / "v1.1", root / "m2fp" / "v0.9")
    with ServerProcess(root, tmp_path / "server.log") as srv:
        yield srv


def test_webui_parses_a_sample_and_an_upload(browser, server):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console_errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    outside: list[str] = []
    page.on("request", lambda r: r.url.startswith(server.url) or r.url.startswith(("data:", "blob:"))
            or outside.append(r.url))
    page.goto(server.url + "/")

    # the dropdown lists latest, auto, the alias and every version with its channel and task
    version = page.locator("#version")
    expect(version.locator("option[value='v2.0-beta']")).to_have_count(1, timeout=30_000)
    options = {o.get_attribute("value"): (o.inner_text(), o.is_disabled())
               for o in version.locator("option").all()}
    assert {"latest", "auto", "stable", "v0.9", "v1.0", "v1.1", "v1.2", "v2.0-beta"} <= set(options), options
    for v, channel, task in (("v1.0", "stable", "multi-human"), ("v1.1", "stable", "single-human"),
                             ("v1.2", "recommended", "multi-human"), ("v2.0-beta", "experimental", "multi-human")):
        text, disabled = options[v]
        assert channel in text and task in text and not disabled, (v, text)
    assert "v1.2" in options["latest"][0] and "v1.0" in options["stable"][0]
    text, disabled = options["v0.9"]
    assert disabled and "failed" in text, text
    assert version.input_value() == "latest"

    # experimental versions carry a visible warning; others do not
    warning = page.locator("#warning")
    expect(warning).to_be_hidden()
    version.select_option("v2.0-beta")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("experimental")
    version.select_option("v1.0")
    expect(warning).to_be_hidden()
    version.select_option("v2.0-beta")
    expect(warning).to_be_visible()

    # a bundled sample, parsed by the chosen version
    page.locator("#sample").select_option("two_people.jpg")
    expect(page.locator("#original-img")).to_have_attribute("src", re.compile(r"^blob:"), timeout=10_000)
    expect(page.locator("#original-img")).to_be_visible()
    page.locator("#parse").click()
    result = page.locator("#result-img")
    page.wait_for_function("document.querySelector('#result-img').src.startsWith('data:image/png;base64,')",
                           timeout=120_000)
    expect(result).to_be_visible()
    expect(page.locator("#answered-version")).to_have_text("v2.0-beta")
    expect(page.locator("#latency")).to_contain_text("ms")
    expect(page.locator("#error")).to_be_hidden()
    assert page.locator("#legend li").count() >= 1
    size = page.evaluate("() => { const i = document.querySelector('#result-img');"
                         " return [i.naturalWidth, i.naturalHeight]; }")
    assert size == [320, 240], size  # the overlay has the sample's size
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # a file upload through the alias
    version.select_option("stable")
    expect(warning).to_be_hidden()
    page.locator("#file").set_input_files(str(SAMPLES / "one_person.png"))
    page.locator("#parse").click()
    expect(page.locator("#answered-version")).to_have_text("v1.0", timeout=120_000)
    size = page.evaluate("() => { const i = document.querySelector('#result-img');"
                         " return [i.naturalWidth, i.naturalHeight]; }")
    assert size == [240, 320], size

    # an error is shown readably
    page.locator("#file").set_input_files(files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                  "buffer": b"this is not a picture"}])
    page.locator("#parse").click()
    expect(page.locator("#error")).to_be_visible(timeout=30_000)
    expect(page.locator("#error")).to_contain_text("415")
    expect(page.locator("#error")).to_contain_text("unsupported")
    page.screenshot(path=str(SCREENSHOT.with_name("webui-error.png")), full_page=True)

    assert not outside, f"the page reached outside the server: {outside}"
    assert not [e for e in console_errors if "415" not in e], console_errors
    page.close()
