"""Hot swaps under load: with the file watcher on, versions are added, replaced, refused and removed
while requests keep flowing, and not one request fails.

Four asyncio tasks send requests in a loop (two to ``latest``, two to ``v1.0`` by exact name) while a
driver changes the bundle store the way an operator would: publish a new version, replace a version's
content (store staging + atomic exchange), drop in corrupted bundles under a new name and as
replacements of working versions, and remove the version ``latest`` points at while a request holds it.
The driver never calls ``rescan()``: every change is found by the watcher (inotify, then polling).

Checks: zero failed requests; every answer names a version whose bundle was complete; requests started
after a swap get the new content, requests during a refused replacement keep getting the old one; a
predictor is closed only when no prediction is running on it, and a removed version drains (in_flight
down to 0) before it disappears from the status.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass

import pytest

from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.errors import VersionUnavailable
from m2fpkit.runtime.predictor import ImageLimits, Predictor
from m2fpkit.runtime.registry import Registry, RegistryOptions, VersionStatus
from reference.bundles import clone_bundle, corrupt, replace_bundle, synthetic_png

IMAGES = [synthetic_png(h, w, seed=i) for i, (h, w) in enumerate([(96, 128), (72, 96), (128, 96), (100, 100)])]
PHASE_TIMEOUT = 45.0
TEST_TIMEOUT = 300.0
DEFAULT_LIMITS = ImageLimits()  # the spy's default, as Predictor.predict's (a frozen dataclass: one instance is enough)


@dataclass(frozen=True)
class Answer:
    name: str          # what was asked for
    started: float     # monotonic time when the request was issued
    version: str       # prediction.version
    task: str          # which content answered: multi-human or single-human


class PredictorSpy:
    """Counts predictions running on each predictor and records closes that would cut one short."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.running: collections.Counter[int] = collections.Counter()
        self.closed: dict[int, str] = {}
        self.keep: list[Predictor] = []  # keep ids unique for the whole test
        self.bad: list[str] = []
        predict, close = Predictor.predict, Predictor.close
        spy = self

        def spy_predict(self: Predictor, data: bytes, limits: ImageLimits = DEFAULT_LIMITS):
            with spy.lock:
                if id(self) in spy.closed:
                    spy.bad.append(f"prediction started on closed predictor of {self.version}")
                spy.running[id(self)] += 1
            try:
                return predict(self, data, limits)
            finally:
                with spy.lock:
                    spy.running[id(self)] -= 1

        def spy_close(self: Predictor) -> None:
            with spy.lock:
                if spy.running[id(self)]:
                    spy.bad.append(f"predictor of {self.version} closed with {spy.running[id(self)]} running")
                spy.closed[id(self)] = self.version
                spy.keep.append(self)
            close(self)

        monkeypatch.setattr(Predictor, "predict", spy_predict)
        monkeypatch.setattr(Predictor, "close", spy_close)


async def _wait(cond, what: str, log: list[str], timeout: float = PHASE_TIMEOUT) -> float:
    """Poll ``cond`` until true; return the monotonic time it was seen true."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; timeline:\n" + "\n".join(log))
        await asyncio.sleep(0.02)
    return time.monotonic()


def _status(reg: Registry) -> dict[str, VersionStatus]:
    return {s.version: s for s in reg.status().versions}


@pytest.mark.parametrize("watch_polling", [False, True], ids=["inotify", "polling"])
async def test_swaps_under_load_never_fail_a_request(fast_multi_src, fast_single_src, tmp_path, monkeypatch,
                                                     watch_polling):
    root = tmp_path / "bundles"
    for v in ("v1.0", "v2.0"):
        clone_bundle(fast_multi_src, root, v)
    store = BundleStore(root)
    spy = PredictorSpy(monkeypatch)
    reg = Registry(root, RegistryOptions(watch=True, watch_polling=watch_polling, idle_ttl=0))
    answers: list[Answer] = []
    failures: list[str] = []
    log: list[str] = []
    stop = asyncio.Event()
    t_begin = time.monotonic()

    def note(msg: str) -> None:
        log.append(f"{time.monotonic() - t_begin:7.2f}s {msg} | " + ", ".join(
            f"{s.version}:{s.state.value}/{s.in_flight}" for s in reg.status().versions))

    async def client(name: str, k: int) -> None:
        i = k
        while not stop.is_set():
            started = time.monotonic()
            try:
                pred = await reg.predict(name, IMAGES[i % len(IMAGES)])
            except Exception as exc:  # every failure is a test failure, reported at the end
                failures.append(f"{started - t_begin:.2f}s {name}: {type(exc).__name__}: {exc}")
            else:
                answers.append(Answer(name, started, pred.version, pred.result.task))
            i += 1

    def healthy(phase: str) -> None:
        note(phase)
        assert failures == [], f"failed requests by '{phase}':\n" + "\n".join(failures) + "\n" + "\n".join(log)
        assert spy.bad == [], f"by '{phase}': {spy.bad}"

    def since(t: float, name: str) -> list[Answer]:
        return [a for a in answers if a.name == name and a.started > t]

    async def answered(name: str, after: float, n: int = 2) -> None:
        """Wait for ``n`` answers to ``name`` to requests issued after ``after``."""
        await _wait(lambda: len(since(after, name)) >= n, f"{n} answers to {name}", log)

    await reg.start()
    clients: list[asyncio.Task] = []
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            clients = [asyncio.create_task(client(name, k)) for k, name in
                       enumerate(("latest", "latest", "v1.0", "v1.0"))]
            await answered("latest", t_begin)
            await answered("v1.0", t_begin)
            healthy("clients running")

            # 1. publish v3.0 (single-human content); once it is ready it becomes latest
            await asyncio.to_thread(clone_bundle, fast_single_src, root, "v3.0")
            await _wait(lambda: "v3.0" in _status(reg), "the watcher to discover v3.0", log)
            note("v3.0 discovered")
            assert await reg.load("v3.0") == "v3.0"
            t_added = await _wait(lambda: reg.latest() == "v3.0", "latest to move to v3.0", log)
            healthy("latest is v3.0")
            await answered("latest", t_added)
            assert {(a.version, a.task) for a in since(t_added, "latest")} == {("v3.0", "single-human")}

            # 2. replace v1.0's content (multi-human → single-human) by staging + atomic exchange
            swaps = reg.events["swaps"]
            source_before = reg.config("v1.0").source["sha256"]
            t_replace = time.monotonic()
            await asyncio.to_thread(replace_bundle, fast_single_src, root, "v1.0")
            t_swapped = await _wait(lambda: reg.events["swaps"] == swaps + 1, "v1.0 to be swapped", log)
            healthy("v1.0 swapped")
            assert reg.config("v1.0").task == "single-human"
            assert reg.config("v1.0").source["sha256"] == reg.config("v3.0").source["sha256"] != source_before
            await answered("v1.0", t_swapped)
            assert {a.task for a in answers if a.name == "v1.0" and a.started < t_replace} == {"multi-human"}
            assert {(a.version, a.task) for a in since(t_swapped, "v1.0")} == {("v1.0", "single-human")}

            # 3. corrupted bundles under new names: refused, nothing else changes
            await asyncio.to_thread(clone_bundle, fast_multi_src, root, "v4.0",
                                    then=lambda s: corrupt(s, "flip-byte"))
            await asyncio.to_thread(clone_bundle, fast_multi_src, root, "v5.0",
                                    then=lambda s: corrupt(s, "extra-class"))
            await _wait(lambda: getattr(_status(reg).get("v4.0"), "state", None) == "failed", "v4.0 to be refused", log)
            await _wait(lambda: "v5.0" in _status(reg), "the watcher to discover v5.0", log)
            with pytest.raises(VersionUnavailable, match="does not match config.json"):
                await reg.load("v5.0")  # passes file checks, fails against the graph
            st = _status(reg)
            healthy("v4.0 and v5.0 refused")
            assert st["v4.0"].state == "failed" and "model.onnx.data" in st["v4.0"].reason
            assert st["v5.0"].state == "failed" and "pred_logits" in st["v5.0"].reason
            assert reg.latest() == "v3.0"

            # 4. corrupted replacements of working versions: the old content keeps serving
            failures_before = reg.events["load_failures"]
            await asyncio.to_thread(replace_bundle, fast_multi_src, root, "v3.0",
                                    then=lambda s: corrupt(s, "flip-byte"))
            await asyncio.to_thread(replace_bundle, fast_multi_src, root, "v1.0",
                                    then=lambda s: corrupt(s, "extra-class"))
            t_refused = await _wait(
                lambda: (_status(reg)["v3.0"].update_error or "").startswith("model.onnx.data")
                and "pred_logits" in (_status(reg)["v1.0"].update_error or ""),
                "both replacements to be refused", log)
            healthy("corrupted replacements refused")
            st = _status(reg)
            assert st["v3.0"].state == st["v1.0"].state == "ready"
            assert st["v3.0"].reason is None and st["v1.0"].reason is None
            assert reg.events["load_failures"] == failures_before + 1  # v1.0's; v3.0's failed verification
            assert reg.events["swaps"] == swaps + 1
            await answered("latest", t_refused)
            await answered("v1.0", t_refused)
            assert {(a.version, a.task) for a in since(t_refused, "latest")} == {("v3.0", "single-human")}
            assert {(a.version, a.task) for a in since(t_refused, "v1.0")} == {("v1.0", "single-human")}

            # 5. remove v3.0 (latest, never asked for by name) while a request holds it
            async with reg.lease("v3.0") as held:
                await asyncio.to_thread(store.remove, "v3.0")
                t_removed = await _wait(lambda: getattr(_status(reg).get("v3.0"), "state", None) == "draining",
                                        "v3.0 to drain", log)
                healthy("v3.0 removed, draining")
                assert _status(reg)["v3.0"].in_flight >= 1
                assert reg.latest() == "v2.0" and "v3.0" not in reg.versions()
                # the held predictor still works: it is closed only when its last lease returns
                assert held.session is not None
                assert (await reg.run_in_executor(held.predict, IMAGES[0])).version == "v3.0"
                await answered("latest", t_removed)
            await _wait(lambda: "v3.0" not in _status(reg), "v3.0 to disappear after draining", log)
            healthy("v3.0 gone")
            await _wait(lambda: held.session is None, "v3.0's predictor to be closed after the drain", log)
            assert {(a.version, a.task) for a in since(t_removed, "latest")} == {("v2.0", "multi-human")}
            await answered("v1.0", time.monotonic())

            stop.set()
            await asyncio.gather(*clients)
    finally:
        stop.set()
        for t in clients:
            t.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await reg.close(drain_timeout=10)

    note("stopped")
    print("\n".join(log), f"\nanswers: {len(answers)}, events: {reg.events}")
    assert failures == [], "failed requests:\n" + "\n".join(failures) + "\ntimeline:\n" + "\n".join(log)
    assert spy.bad == []
    complete = {"v1.0", "v2.0", "v3.0"}
    assert {a.version for a in answers} <= complete
    assert {a.version for a in answers if a.name == "v1.0"} == {"v1.0"}
    assert {a.version for a in answers if a.name == "latest"} == {"v2.0", "v3.0"}
    assert len(answers) >= 20


async def test_the_watcher_sees_changes_under_a_relative_bundle_root(fast_multi_src, tmp_path, monkeypatch):
    """``m2fp-serve --bundles bundles`` (the README's command) passes a relative root; watchfiles reports
    absolute paths, and a filter comparing the two once ignored every change."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    clone_bundle(fast_multi_src, tmp_path / "bundles", "v1.0")
    reg = Registry(Path("bundles"), RegistryOptions(watch=True, idle_ttl=0))
    await reg.start()
    log: list[str] = []
    try:
        assert (await reg.predict("v1.0", IMAGES[0])).version == "v1.0"
        await asyncio.sleep(0.5)  # the watcher is running
        await asyncio.to_thread(clone_bundle, fast_multi_src, tmp_path / "bundles", "v2.0")
        await _wait(lambda: "v2.0" in reg.versions(), "v2.0 discovered", log, timeout=60)
        await asyncio.to_thread(replace_bundle, fast_multi_src, tmp_path / "bundles", "v1.0", notes="replaced")
        await _wait(lambda: reg.events["swaps"] >= 1 and _status(reg)["v1.0"].notes == "replaced",
                    "v1.0 swapped", log, timeout=120)
    finally:
        await reg.close(drain_timeout=5)


@pytest.mark.parametrize("watch_polling", [False, True], ids=["inotify", "polling"])
async def test_a_store_directory_that_appears_later_is_noticed(fast_multi_src, tmp_path, watch_polling):
    """An empty root has no ``m2fp/`` and the registry does not create it: the watcher watches the root,
    so the first publish (which creates ``m2fp/``) is seen all the same."""
    root = tmp_path / "bundles"
    root.mkdir()
    reg = Registry(root, RegistryOptions(watch=True, watch_polling=watch_polling, idle_ttl=0))
    await reg.start()
    log: list[str] = []
    try:
        assert reg.versions() == [] and list(root.iterdir()) == []
        await asyncio.sleep(0.5)  # the watcher is running
        (root / "unrelated").mkdir()  # not under m2fp/: ignored
        await asyncio.to_thread(clone_bundle, fast_multi_src, root, "v1.0")
        await _wait(lambda: reg.is_ready("v1.0"), "v1.0 in a store directory that did not exist to be served", log,
                    timeout=60)
        assert reg.latest() == "v1.0" and (await reg.predict("latest", IMAGES[0])).version == "v1.0"
    finally:
        await reg.close(drain_timeout=5)
