"""The version registry: discovery, life cycle, lazy single-flight loads, ``latest`` and aliases, failures,
idle unload, memory-budget eviction, warm-up and golden self-test, and the blocking ``Runtime`` facade.

Every bundle root is made of cheap clones (:mod:`reference.bundles`) of the session's exported bundles,
with a small input size so inference stays quick on a shared 2-core machine. The file watcher is off
here (``rescan()`` is called explicitly); ``test_hot_swap.py`` covers it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from m2fpkit.runtime.api import Runtime
from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.errors import InvalidVersionName, UnknownVersion, VersionUnavailable
from m2fpkit.runtime.planner import Planner
from m2fpkit.runtime.predictor import Predictor
from m2fpkit.runtime.registry import Registry, RegistryOptions, RouteOverlay, State, VersionStatus
from m2fpkit.runtime.registry import lifecycle as lifecycle_mod
from reference.bundles import add_golden, clone_bundle, corrupt, edit_config, replace_bundle, synthetic_png

MB = 1 << 20
IMAGE = synthetic_png(96, 128, seed=7)


# ---------------------------------------------------------------------------------- helpers

def bounded(seconds: float):
    """Fail an async test that runs longer than ``seconds`` instead of hanging the suite."""

    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            async with asyncio.timeout(seconds):
                return await fn(*args, **kwargs)

        return wrapper

    return deco


async def wait_until(cond, what: str, timeout: float = 30.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(step)


def states(reg: Registry) -> dict[str, str]:
    return {s.version: s.state.value for s in reg.status().versions}


def status_of(reg: Registry, version: str) -> VersionStatus:
    status = reg.status().get(version)
    assert status is not None, f"{version} is not in the status"
    return status


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "bundles"


@pytest.fixture
async def make_registry():
    made: list[Registry] = []

    async def make(root: Path, *, start: bool = True, **options) -> Registry:
        options.setdefault("watch", False)
        options.setdefault("idle_ttl", 0)
        reg = Registry(root, RegistryOptions(**options))
        made.append(reg)
        if start:
            await reg.start()
        return reg

    yield make
    for reg in made:
        await reg.close(drain_timeout=5)


def publish(src: Path, root: Path, *versions: str, **kw) -> None:
    for v in versions:
        clone_bundle(src, root, v, **kw)


# -------------------------------------------------------------------------------- discovery

@bounded(120)
async def test_discovery_ignores_hidden_staging_and_non_version_entries(fast_multi_src, fast_single_src, root,
                                                                         make_registry):
    publish(fast_multi_src, root, "v1.0")
    publish(fast_single_src, root, "v1.1-rc.1", channel="experimental")
    d = root / "m2fp"
    shutil.copytree(d / "v1.0", d / ".staging-v3.0-0123abcd")  # complete, but hidden: not published yet
    shutil.copytree(d / "v1.0", d / ".removed-v0.9-0123abcd")
    shutil.copytree(d / "v1.0", d / "current")                 # not a version name
    shutil.copytree(d / "v1.0", d / "V4.0")                    # not a version name (capital V)
    (d / "v5.0").write_text("a file named like a version\n")
    (d / "v6.0").symlink_to(d / "v1.0", target_is_directory=True)  # links are ignored
    (d / "notes").mkdir()

    reg = await make_registry(root)
    assert reg.versions() == ["v1.0", "v1.1-rc.1"]
    st = {s.version: s for s in reg.status().versions}
    assert list(st) == ["v1.0", "v1.1-rc.1"]
    assert st["v1.0"].state is State.READY and st["v1.0"].aliases == ("latest",)  # preloaded as latest
    assert st["v1.1-rc.1"].state is State.DISCOVERED and not st["v1.1-rc.1"].loaded
    # discovery verified the bundle and read its config without loading it
    assert (st["v1.1-rc.1"].task, st["v1.1-rc.1"].channel) == ("single-human", "experimental")
    assert reg.events["loads"] == 1
    with pytest.raises(InvalidVersionName):
        reg.resolve(".staging-v3.0-0123abcd")
    with pytest.raises(UnknownVersion):
        reg.resolve("v6.0")
    with pytest.raises(UnknownVersion):
        reg.resolve("v5.0")


# ------------------------------------------------------------------- life cycle and lazy load

@bounded(180)
async def test_states_lazy_load_and_warmup_before_ready(fast_multi_src, root, make_registry, monkeypatch):
    publish(fast_multi_src, root, "v1.0", "v2.0")
    seen: list[tuple[str, bool, State | None]] = []
    reg = await make_registry(root, start=False)
    original = Predictor.golden_agreement  # with a golden sample, its verification run is the warm-up

    def spy(self):
        seen.append((self.version, reg.is_ready(self.version), reg.status().states().get(self.version)))
        return original(self)

    monkeypatch.setattr(Predictor, "golden_agreement", spy)
    await reg.start()
    # latest (v2.0) is loaded at start and warmed up before it became ready; v1.0 only discovered
    assert seen == [("v2.0", False, State.LOADING)]
    assert reg.status().states() == {"v1.0": State.DISCOVERED, "v2.0": State.READY}
    assert reg.config("v1.0") is not None and reg.config("v1.0").version == "v1.0"
    assert reg.events["loads"] == 1

    task = asyncio.create_task(reg.predict("v1.0", IMAGE))
    await wait_until(lambda: reg.status().states()["v1.0"] == State.LOADING, "v1.0 to be loading")
    assert status_of(reg, "v1.0").state is State.LOADING and not reg.is_ready("v1.0")
    pred = await task
    assert pred.version == "v1.0" and pred.result.label_map.shape == (96, 128)
    assert reg.status().states()["v1.0"] == State.READY
    assert seen[-1] == ("v1.0", False, State.LOADING)
    assert len(seen) == 2 and reg.events["loads"] == 2
    s = status_of(reg, "v1.0")
    assert s.loaded and s.requests == 1 and s.in_flight == 0 and s.load_seconds > 0


@bounded(120)
async def test_warmup_can_be_switched_off(fast_multi_src, root, make_registry, monkeypatch):
    """A bundle without a golden sample gets a separate warm-up run (with one, the golden run is the warm-up)."""
    clone_bundle(fast_multi_src, root, "v1.0",
                 then=lambda stage: edit_config(stage, lambda raw: raw.update(golden=None)))
    calls: list[str] = []
    monkeypatch.setattr(Predictor, "warmup", lambda self: calls.append(self.version))
    reg = await make_registry(root, warmup=False)
    assert reg.is_ready("v1.0")
    assert (await reg.predict("latest", IMAGE)).version == "v1.0"
    assert calls == []
    warm = await make_registry(root, warmup=True)
    assert warm.is_ready("v1.0") and calls == ["v1.0"]


@bounded(180)
async def test_concurrent_first_requests_load_once(fast_multi_src, root, make_registry, monkeypatch):
    publish(fast_multi_src, root, "v1.0", "v2.0")
    reg = await make_registry(root)
    assert reg.events["loads"] == 1  # latest
    loads: list[str] = []
    original = Planner.load

    def counting_load(self, content):
        loads.append(content.config.version)
        return original(self, content)

    monkeypatch.setattr(Planner, "load", counting_load)
    preds = await asyncio.gather(*(reg.predict("v1.0", IMAGE) for _ in range(8)), reg.load("v1.0"), reg.load("v1.0"))
    assert [p.version for p in preds[:8]] == ["v1.0"] * 8
    assert preds[8:] == ["v1.0", "v1.0"]
    assert loads == ["v1.0"]
    assert reg.events["loads"] == 2 and reg.events["load_failures"] == 0
    assert status_of(reg, "v1.0").requests == 8


@bounded(180)
async def test_a_loads_golden_run_never_overlaps_a_served_forward(fast_multi_src, root, make_registry, monkeypatch):
    """At ``concurrent_runs`` 1 (the default), a version loading while another serves takes a forward slot
    for its golden run like a request does: no two forward passes of the registry ever overlap."""
    import onnxruntime as ort

    publish(fast_multi_src, root, "v1.0", "v2.0")
    reg = await make_registry(root)  # v2.0 (latest) loaded and serving
    runs: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    real_run = ort.InferenceSession.run

    def recorded_run(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = real_run(self, *args, **kwargs)
        time.sleep(0.03)  # a wider window for an overlap to show
        with lock:
            runs.append((threading.current_thread().name, t0, time.perf_counter()))
        return out

    monkeypatch.setattr(ort.InferenceSession, "run", recorded_run)
    loaded = asyncio.Event()

    async def serve() -> int:
        n = 0
        while not loaded.is_set() or n < 3:
            assert (await reg.predict("v2.0", IMAGE)).version == "v2.0"
            n += 1
        return n

    server = asyncio.create_task(serve())
    await wait_until(lambda: len(runs) >= 2, "v2.0 to serve")
    await reg.load("v1.0")
    loaded.set()
    await server
    served = [r for r in runs if r[0].startswith("m2fp-infer")]
    golden = [r for r in runs if r[0].startswith("m2fp-load")]
    assert golden and served[0][1] < golden[0][1] < served[-1][2], runs  # the load ran while v2.0 served
    ordered = sorted(runs, key=lambda r: r[1])
    overlaps = [(a, b) for a, b in zip(ordered, ordered[1:]) if b[1] < a[2]]
    assert not overlaps, overlaps


# ------------------------------------------------------------------------- latest and aliases

@bounded(120)
async def test_latest_is_the_newest_release_by_semver(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v2.0", "v9.0", "v10.0", "v10.1-rc.1")
    reg = await make_registry(root)
    assert reg.latest() == "v10.0"  # not "v9.0" (string order), not the newer pre-release
    assert reg.resolve("latest") == "v10.0"
    assert reg.is_ready("v10.0") and "v10.0" in reg.pinned()
    assert (await reg.predict("latest", IMAGE)).version == "v10.0"
    assert status_of(reg, "v10.0").aliases == ("latest",)
    assert status_of(reg, "v10.1-rc.1").aliases == ()
    # a version becomes latest once it is ready
    publish(fast_multi_src, root, "v11.0")
    await reg.rescan()
    assert await reg.load("v11.0") == "v11.0"
    assert reg.latest() == "v11.0"
    assert (await reg.predict("latest", IMAGE)).version == "v11.0"


@bounded(120)
async def test_prereleases_only_when_there_is_no_release(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v1.0-alpha", "v1.0-beta.2", "v1.0-beta.10", "v0.9-rc.1")
    reg = await make_registry(root)
    assert reg.latest() == "v1.0-beta.10"  # numeric identifiers compare numerically
    assert (await reg.predict("latest", IMAGE)).version == "v1.0-beta.10"


@bounded(60)
async def test_published_release_becomes_latest_without_a_request(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v1.0")
    reg = await make_registry(root)
    assert reg.latest() == "v1.0"
    publish(fast_multi_src, root, "v2.0")
    await reg.rescan()
    deadline = time.monotonic() + 10
    while reg.latest() != "v2.0" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert reg.latest() == "v2.0"
    assert reg.is_ready("v2.0")  # latest is a loaded, verified version


@bounded(120)
async def test_alias_file_overrides_latest(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v1.0", "v2.0")
    publish(fast_multi_src, root, "v3.0", then=lambda s: corrupt(s, "flip-byte"))
    reg = await make_registry(root)
    assert reg.latest() == "v2.0"
    store = BundleStore(root)
    store.set_alias("latest", "v1.0")
    assert reg.latest() == "v2.0"  # aliases.json is read by scans (the store watcher starts one on each change)
    await reg.rescan()
    assert reg.latest() == "v1.0" and reg.resolve("latest") == "v1.0"
    assert (await reg.predict("latest", IMAGE)).version == "v1.0"
    assert status_of(reg, "v1.0").aliases == ("latest",) and status_of(reg, "v2.0").aliases == ()
    # an alias to a missing or failed version does not take latest down with it (it falls back to a
    # working version: the newest ready release, or the last-known-good target of the alias)
    for broken in ("v8.0", "v3.0"):
        store.set_alias("latest", broken)
        await reg.rescan()
        assert reg.latest() in ("v1.0", "v2.0")
        assert reg.resolve("latest") == reg.latest()
        assert (await reg.predict("latest", IMAGE)).version == reg.latest()


@bounded(60)
async def test_status_shows_where_latest_resolves_with_a_dangling_latest_alias(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v1.0", "v2.0")
    reg = await make_registry(root)
    BundleStore(root).set_alias("latest", "v8.0")
    await reg.rescan()
    assert reg.latest() == "v2.0"
    assert "latest" in status_of(reg, "v2.0").aliases
    assert reg.status().latest == "v2.0" and reg.status().aliases["latest"] == "v8.0"


@bounded(120)
async def test_alias_resolution(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v1.0", "v2.0")
    reg = await make_registry(root)
    store = BundleStore(root)
    store.set_alias("stable", "v1.0")
    store.set_alias("gone", "v8.0")
    await reg.rescan()
    assert reg.aliases() == {"stable": "v1.0", "gone": "v8.0"}
    assert reg.resolve("stable") == "v1.0"
    assert (await reg.predict("stable", IMAGE)).version == "v1.0"
    assert "v1.0" in reg.pinned() and status_of(reg, "v1.0").pinned
    assert status_of(reg, "v1.0").aliases == ("stable",)
    with pytest.raises(UnknownVersion, match="gone"):
        reg.resolve("gone")
    with pytest.raises(UnknownVersion, match="nope"):
        await reg.predict("nope", IMAGE)
    # the routing file's aliases override the store's
    reg.apply_routes(RouteOverlay(aliases={"stable": "v2.0", "canary": "v2.0"}))
    assert reg.resolve("stable") == "v2.0" and reg.resolve("canary") == "v2.0"
    assert (await reg.predict("canary", IMAGE)).version == "v2.0"
    assert status_of(reg, "v2.0").aliases == ("canary", "latest", "stable")
    reg.apply_routes(RouteOverlay())
    assert reg.resolve("stable") == "v1.0"
    with pytest.raises(UnknownVersion, match="canary"):
        reg.resolve("canary")


BAD_NAMES = ["..", ".", "../v1.0", "v1.0/..", "v1.0/../../etc", "/etc/passwd", "m2fp/v1.0", "", "V1.0",
             " v1.0", "v1.0 ", "v1.0\x00", ".staging-v1.0-0123abcd", "aliases.json", "~", "..\\v1.0",
             "v1.0%2F..", "latest/..", "Latest", "a" * 40]


@bounded(60)
async def test_unknown_and_invalid_names(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v1.0")
    reg = await make_registry(root)
    for name in ("v7.0", "v1", "v1.0.1", "v1.0-rc.1"):
        with pytest.raises(UnknownVersion):
            reg.resolve(name)
        with pytest.raises(UnknownVersion):
            await reg.predict(name, IMAGE)
    for name in BAD_NAMES:
        with pytest.raises(InvalidVersionName):
            reg.resolve(name)
        with pytest.raises(InvalidVersionName):
            await reg.predict(name, IMAGE)
        with pytest.raises(InvalidVersionName):
            BundleStore(root).path(name)
    with pytest.raises(InvalidVersionName):
        reg.resolve(None)  # type: ignore[arg-type]
    assert reg.versions() == ["v1.0"]


# ---------------------------------------------------------------------------------- failures

@bounded(180)
async def test_corrupted_bundles_fail_with_a_reason_and_others_keep_working(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v1.0")
    publish(fast_multi_src, root, "v0.9", then=lambda s: corrupt(s, "config-schema"))
    publish(fast_multi_src, root, "v2.0", then=lambda s: corrupt(s, "flip-byte"))
    publish(fast_multi_src, root, "v3.0", then=lambda s: corrupt(s, "extra-class"))  # caught only when loaded
    reg = await make_registry(root)
    st = {s.version: s for s in reg.status().versions}
    # v3.0 looked like latest until its load failed; then v1.0 was preloaded as latest instead
    assert {v: s.state.value for v, s in st.items()} == {
        "v0.9": "failed", "v1.0": "ready", "v2.0": "failed", "v3.0": "failed"}
    assert "config.json → preprocess → mean" in st["v0.9"].reason
    assert "model.onnx.data" in st["v2.0"].reason and "SHA-256" in st["v2.0"].reason
    assert "does not match config.json" in st["v3.0"].reason and "pred_logits" in st["v3.0"].reason
    assert st["v1.0"].reason is None and st["v1.0"].aliases == ("latest",)
    assert [v for v, s in st.items() if s.loaded] == ["v1.0"]
    assert reg.events["load_failures"] == 1

    for version, fragment in (("v0.9", "preprocess"), ("v2.0", "SHA-256"), ("v3.0", "pred_logits")):
        with pytest.raises(VersionUnavailable, match=fragment):
            await reg.predict(version, IMAGE)
    assert reg.events["load_failures"] == 1  # a failed version is not retried on every request
    assert reg.latest() == "v1.0"
    assert (await reg.predict("latest", IMAGE)).version == "v1.0"
    assert (await reg.predict("v1.0", IMAGE)).version == "v1.0"

    # a fixed bundle is picked up on the next scan
    replace_bundle(fast_multi_src, root, "v2.0")
    await reg.rescan()
    assert status_of(reg, "v2.0").reason is None
    assert (await reg.predict("v2.0", IMAGE)).version == "v2.0"
    assert states(reg)["v3.0"] == "failed"


# ------------------------------------------------------------------------- idle and memory

@bounded(180)
async def test_idle_versions_unload_but_pinned_ones_stay(fast_multi_src, root, make_registry):
    publish(fast_multi_src, root, "v1.0", "v1.5", "v2.0", "v3.0")
    reg = await make_registry(root, idle_ttl=0.5)
    BundleStore(root).set_alias("stable", "v2.0")
    await reg.rescan()
    reg.apply_routes(RouteOverlay(pinned=frozenset({"v1.5"})))
    for v in ("v1.0", "v1.5", "v2.0", "v3.0"):
        assert (await reg.predict(v, IMAGE)).version == v
        assert reg.is_ready(v)
    assert reg.pinned() == {"v1.5", "v2.0", "v3.0"}
    await wait_until(lambda: states(reg)["v1.0"] == "unloaded", "idle v1.0 to unload", timeout=30)
    await asyncio.sleep(1.5)  # three more TTLs: the pinned ones stay
    assert states(reg) == {"v1.0": "unloaded", "v1.5": "ready", "v2.0": "ready", "v3.0": "ready"}
    assert reg.events["unloads"] == 1
    s = status_of(reg, "v1.0")
    assert not s.loaded and s.memory_bytes == 0 and s.reason is None
    loads = reg.events["loads"]
    assert (await reg.predict("v1.0", IMAGE)).version == "v1.0"  # lazily loaded again
    assert reg.events["loads"] == loads + 1


@bounded(180)
async def test_memory_budget_evicts_least_recently_used_unpinned(fast_multi_src, root, make_registry, monkeypatch):
    # each load measures exactly 100 MB (the real RSS delta of a tiny model is noise)
    counter = itertools.count()
    monkeypatch.setattr(lifecycle_mod, "rss_bytes", lambda: next(counter) * 100 * MB)
    publish(fast_multi_src, root, "v1.0", "v2.0", "v3.0", "v4.0")
    reg = await make_registry(root, memory_budget=350 * MB)
    assert states(reg)["v4.0"] == "ready" and status_of(reg, "v4.0").memory_bytes == 100 * MB
    for v in ("v1.0", "v2.0", "v1.0"):  # v1.0 used again after v2.0
        await reg.predict(v, IMAGE)
    assert reg.events["evictions"] == 0
    await reg.predict("v3.0", IMAGE)  # 400 MB > 350 MB: the least recently used unpinned version goes
    assert states(reg) == {"v1.0": "ready", "v2.0": "unloaded", "v3.0": "ready", "v4.0": "ready"}
    assert reg.events["evictions"] == 1

    reg.apply_routes(RouteOverlay(pinned=frozenset({"v1.0", "v3.0"})))
    await reg.predict("v2.0", IMAGE)  # over budget again, but everything else is pinned
    assert states(reg) == {"v1.0": "ready", "v2.0": "ready", "v3.0": "ready", "v4.0": "ready"}
    assert reg.events["evictions"] == 1

    reg.apply_routes(RouteOverlay())
    await reg.predict("v1.0", IMAGE)  # a hit does not load, so no eviction happens here
    assert reg.events["evictions"] == 1
    assert sum(s.memory_bytes for s in reg.status().versions) == 400 * MB


@bounded(180)
async def test_pinned_latest_is_never_evicted(fast_multi_src, root, make_registry, monkeypatch):
    counter = itertools.count()
    monkeypatch.setattr(lifecycle_mod, "rss_bytes", lambda: next(counter) * 100 * MB)
    publish(fast_multi_src, root, "v1.0", "v2.0", "v3.0")
    reg = await make_registry(root, memory_budget=1)  # everything is over budget
    for v in ("v1.0", "v2.0", "v1.0"):
        await reg.predict(v, IMAGE)
        assert reg.is_ready("v3.0")
    assert states(reg) == {"v1.0": "ready", "v2.0": "unloaded", "v3.0": "ready"}
    assert reg.events["evictions"] == 2


# ---------------------------------------------------------------------------- golden samples

@bounded(180)
async def test_golden_self_test_gates_readiness(fast_multi_src, root, make_registry):
    golden_png = synthetic_png(100, 100, seed=11)
    probe = Predictor.load(fast_multi_src)
    try:
        expected = probe.predict(golden_png).result.label_map.copy()
        n_classes = probe.config.num_classes
    finally:
        probe.close()
    wrong = ((expected.astype(np.int64) + 1) % n_classes).astype(np.uint8)
    slightly_off = expected.copy()
    flat = slightly_off.reshape(-1)
    flat[:: 50] = (flat[:: 50] + 1) % n_classes  # 2 % of the pixels disagree

    publish(fast_multi_src, root, "v1.0", then=lambda s: add_golden(s, golden_png, expected))
    publish(fast_multi_src, root, "v2.0", then=lambda s: add_golden(s, golden_png, wrong))
    publish(fast_multi_src, root, "v3.0", then=lambda s: add_golden(s, golden_png, slightly_off, min_agreement=0.97))
    publish(fast_multi_src, root, "v3.1", then=lambda s: add_golden(s, golden_png, slightly_off))
    reg = await make_registry(root)
    for v in ("v1.0", "v3.0"):
        assert (await reg.predict(v, IMAGE)).version == v
        assert reg.config(v).golden is not None
    for v, share in (("v2.0", "0.00%"), ("v3.1", "98.00%")):
        with pytest.raises(VersionUnavailable, match="golden self-test"):
            await reg.predict(v, IMAGE)
        s = status_of(reg, v)
        assert s.state is State.FAILED and not s.loaded
        assert "golden self-test" in s.reason and share in s.reason, s.reason
    assert reg.latest() == "v3.0"  # the newest version that passed its self-test


@bounded(60)
async def test_golden_sample_outside_the_bundle_is_refused(fast_multi_src, root):
    from m2fpkit.runtime.errors import BundleError

    golden_png = synthetic_png(64, 64, seed=1)
    probe = Predictor.load(fast_multi_src)
    expected = probe.predict(golden_png).result.label_map.copy()
    probe.close()
    publish(fast_multi_src, root, "v1.0", then=lambda s: add_golden(s, golden_png, expected))

    def point_outside(stage: Path) -> None:
        from reference.bundles import edit_config
        edit_config(stage, lambda raw: raw.update(golden={"image": "../v1.0/golden/image.png",
                                                           "label_map": "../v1.0/golden/labels.png"}))

    path = clone_bundle(fast_multi_src, root, "v2.0", then=point_outside)
    with pytest.raises(BundleError, match="golden"):
        predictor = Predictor.load(path)
        try:
            predictor.self_test()
        finally:
            predictor.close()


# ------------------------------------------------------------------------------- sync facade

def test_runtime_facade_works_from_plain_threads(fast_multi_src, fast_single_src, root):
    publish(fast_multi_src, root, "v1.0")
    publish(fast_single_src, root, "v2.0")
    results: list[tuple[str, str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    with Runtime(root, RegistryOptions(watch=False, idle_ttl=0)) as rt:
        assert rt.resolve("latest") == "v2.0"

        def worker(i: int) -> None:
            try:
                for name in ("latest", "v1.0", "latest"):
                    pred = rt.predict(name, synthetic_png(64 + 8 * i, 96, seed=i))
                    with lock:
                        results.append((name, pred.version, pred.result.task))
            except BaseException as exc:  # reported below
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert sorted(set(results)) == [("latest", "v2.0", "single-human"), ("v1.0", "v1.0", "multi-human")]
        assert len(results) == 12
        assert rt.status().states() == {"v1.0": State.READY, "v2.0": State.READY}

        publish(fast_multi_src, root, "v3.0")
        rt.rescan()
        assert [s.version for s in rt.status().versions] == ["v1.0", "v2.0", "v3.0"]
        assert rt.predict("v3.0", IMAGE).version == "v3.0"
        with pytest.raises(UnknownVersion):
            rt.predict("v7.0", IMAGE)
        with pytest.raises(InvalidVersionName):
            rt.predict("../v1.0", IMAGE)
    assert not rt._thread.is_alive()


# ------------------------------------------------------------------------------- signatures

@bounded(120)
async def test_with_trusted_keys_only_correctly_signed_bundles_load(fast_multi_src, root, tmp_path, make_registry):
    """The server-side signature policy: unsigned, foreign-signed and tampered-after-signing bundles fail."""
    from m2fpkit.runtime.bundle.signature import TrustPolicy
    from m2fpkit.runtime.bundle.signing import keygen, sign
    from m2fpkit.runtime.bundle.writer import seal

    for name in ("ours", "theirs"):
        keygen(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
    publish(fast_multi_src, root, "v1.0", then=lambda s: sign(s, tmp_path / "ours.key"))
    publish(fast_multi_src, root, "v1.1")
    publish(fast_multi_src, root, "v1.2", then=lambda s: sign(s, tmp_path / "theirs.key"))

    def tamper(stage: Path) -> None:  # signed, then the notes changed and the manifest rewritten
        sign(stage, tmp_path / "ours.key")
        (stage / "config.json").write_text((stage / "config.json").read_text().replace('"notes": "', '"notes": "x'))
        seal(stage)

    publish(fast_multi_src, root, "v1.3", then=tamper)
    reg = await make_registry(root, trust=TrustPolicy.from_keys([tmp_path / "ours.pub"]))
    assert (await reg.predict("v1.0", IMAGE)).version == "v1.0"
    for version, reason in (("v1.1", "unsigned: manifest.sig is missing"), ("v1.2", "wrong signature: signed by key"),
                            ("v1.3", "wrong signature")):
        with pytest.raises(VersionUnavailable):
            await reg.predict(version, IMAGE)
        assert states(reg)[version] == "failed" and reason in status_of(reg, version).reason, status_of(reg, version)
    assert reg.latest() == "v1.0"
    # without a policy every intact bundle loads
    open_reg = await make_registry(root)
    assert (await open_reg.predict("v1.1", IMAGE)).version == "v1.1"


# ---------------------------------------------------------------------------- roots and state

async def test_a_missing_bundle_root_is_an_error_naming_it(tmp_path, make_registry):
    from m2fpkit.runtime.errors import BundleError

    missing = tmp_path / "no-such-root"
    with pytest.raises(BundleError, match=f"bundle root {missing} does not exist"):
        await make_registry(missing)
    with pytest.raises(BundleError, match="does not exist"):
        Runtime(missing, RegistryOptions(watch=False, idle_ttl=0))
    assert not missing.exists()


@bounded(60)
async def test_an_empty_root_is_an_empty_store_and_nothing_is_created(tmp_path, make_registry):
    root = tmp_path / "bundles"
    root.mkdir()
    reg = await make_registry(root, state_dir=None)
    assert reg.versions() == [] and reg.status().versions == () and reg.latest() is None
    with pytest.raises(VersionUnavailable, match="no versions yet"):
        reg.resolve("latest")
    assert reg.status().last_known_good == "on"
    await reg.rescan()
    assert list(root.iterdir()) == []  # no m2fp/, no .lkg.json: the registry never creates them itself


@bounded(120)
async def test_last_known_good_is_recorded_in_the_state_dir_and_served_first(fast_multi_src, root, tmp_path,
                                                                             make_registry):
    from m2fpkit.runtime import lkg
    from m2fpkit.runtime.bundle.reader import identity_of

    publish(fast_multi_src, root, "v1.0")
    BundleStore(root).set_alias("stable", "v1.0")
    state = tmp_path / "state"
    reg = await make_registry(root, state_dir=state)
    assert reg.status().last_known_good == "on" and (state / ".lkg.json").is_file()
    recorded = lkg.load(state)
    assert recorded is not None and recorded.versions == {"v1.0": identity_of(root / "m2fp" / "v1.0")}
    assert recorded.aliases == {"stable": "v1.0"}
    assert not (root / "m2fp" / lkg.LKG).exists()
    reg.apply_routes(RouteOverlay(aliases={"canary": "v1.0"}, routes={"weights": {"v1.0": 1.0}}))
    recorded = lkg.load(state)
    assert recorded.aliases == {"stable": "v1.0", "canary": "v1.0"} and recorded.routes == {"weights": {"v1.0": 1.0}}
    await reg.close(drain_timeout=5)

    # next boot: a broken newer release was published and promoted; the recorded set still serves
    publish(fast_multi_src, root, "v2.0", then=lambda s: corrupt(s, "extra-class"))
    BundleStore(root).set_alias("stable", "v2.0")
    again = await make_registry(root, state_dir=state)
    assert again.last_known_good is not None and again.last_known_good.versions == recorded.versions
    assert again.is_ready("v1.0") and states(again)["v2.0"] == "failed"
    assert again.latest() == "v1.0"
    assert again.resolve("stable") == "v1.0"  # the dangling alias falls back to its recorded target
    with pytest.raises(UnknownVersion):
        again.resolve("canary")  # a route alias is the routes' to give (the server re-applies them)


def test_options_refuse_nonsense_and_keep_one_default_each():
    assert RegistryOptions().idle_ttl == RegistryOptions.idle_ttl == 600.0
    assert RegistryOptions(preload=["v1.0"]).preload == ("v1.0",)
    for bad in ({"idle_ttl": -1}, {"memory_budget": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RegistryOptions(**bad)


@bounded(60)
async def test_the_status_is_a_frozen_snapshot(fast_multi_src, root, make_registry):
    import dataclasses

    publish(fast_multi_src, root, "v1.0")
    reg = await make_registry(root)
    snap = reg.status()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.versions[0].state = State.FAILED  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.aliases["x"] = "v1.0"  # type: ignore[index]
    rendered = snap.versions[0].to_dict()
    rendered["weight"] = 5.0  # a renderer adds to its own copy
    assert "weight" not in snap.versions[0].to_dict() and len(snap.versions[0].to_dict()) == 24
    assert rendered["state"] == "ready" and rendered["aliases"] == ["latest"]
    await reg.predict("v1.0", IMAGE)
    assert snap.versions[0].requests == 0 and reg.status().get("v1.0").requests == 1
