"""``m2fp-serve`` as a real process: parsing over HTTP, graceful SIGTERM with a parse in flight, and
the hot-swap guarantee (versions added, replaced and removed on disk under a stream of requests)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.bundle.writer import seal

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import ServerProcess, copy_root, png_bytes  # noqa: E402

PNG = {"Content-Type": "image/png"}


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float | None:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def versions(session: aiohttp.ClientSession, url: str) -> dict[str, dict]:
    async with session.get(url + "/api/versions") as r:
        return {v["version"]: v for v in (await r.json())["versions"]}


async def value(x):
    return x


async def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


async def test_parse_over_http_and_graceful_sigterm(latest_only_root: Path, tmp_path: Path):
    root = copy_root(latest_only_root, tmp_path / "bundles")
    server = ServerProcess(root, tmp_path / "server.log", "--drain-timeout", "30", "--max-queue", "8")
    await asyncio.to_thread(server.start)
    try:
        image = png_bytes(160, 120)
        async with aiohttp.ClientSession() as s:
            form = aiohttp.FormData()
            form.add_field("image", image, filename="p.png", content_type="image/png")
            async with s.post(server.url + "/api/latest/parse", data=form) as r:
                body = await r.json()
                assert r.status == 200, body
                assert r.headers["X-Model-Version"] == body["version"] == "v1.2"
            async with s.get(server.url + "/") as r:
                assert r.status == 200 and "<select id=\"version\"" in await r.text()

            # several parses in flight (one runs, the others queue), then SIGTERM
            async def one() -> tuple[int, str | None]:
                async with s.post(server.url + "/api/latest/parse?visualization=0", data=image, headers=PNG) as r:
                    await r.read()
                    return r.status, r.headers.get("X-Model-Version")

            tasks = [asyncio.ensure_future(one()) for _ in range(3)]
            await wait_for(lambda: metric(s, server.url, "m2fp_in_flight"), 30, "a parse in flight", step=0.02)
            server.terminate()
            t_term = time.monotonic()
            assert not all(t.done() for t in tasks), "every parse finished before SIGTERM: nothing was in flight"
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            assert results == [(200, "v1.2")] * 3, results
            code = await asyncio.to_thread(server.proc.wait, 40)
            assert code == 0, server.log_tail()
            assert time.monotonic() - t_term < 35
            # it no longer listens
            with pytest.raises(aiohttp.ClientConnectionError):
                async with s.get(server.url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)):
                    pass
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


@dataclass
class Answer:
    target: str
    sent: float
    done: float
    status: int
    version: str | None
    error: str | None


async def stream(session: aiohttp.ClientSession, url: str, target: str, image: bytes, stop: asyncio.Event,
                 out: list[Answer], max_requests: int = 200) -> None:
    """Parse ``target`` back to back until ``stop`` (bounded in count)."""
    for _ in range(max_requests):
        if stop.is_set():
            return
        sent = time.monotonic()
        try:
            async with session.post(f"{url}/api/{target}/parse?visualization=0", data=image, headers=PNG,
                                    timeout=aiohttp.ClientTimeout(total=120)) as r:
                body = await r.json()
                out.append(Answer(target, sent, time.monotonic(), r.status, r.headers.get("X-Model-Version"),
                                  None if r.status == 200 else body.get("error")))
        except (TimeoutError, aiohttp.ClientError) as exc:
            out.append(Answer(target, sent, time.monotonic(), 0, None, f"{type(exc).__name__}: {exc}"))
        await asyncio.sleep(0.05)


async def test_hot_swap_under_load_over_http(demo_root: Path, tmp_path: Path):
    root = copy_root(demo_root, tmp_path / "bundles", versions=("v1.0", "v1.2", "v2.0-beta"))
    store = BundleStore(root)
    server = ServerProcess(root, tmp_path / "server.log", "--max-queue", "16")
    await asyncio.to_thread(server.start)
    image = png_bytes(96, 72)
    answers: list[Answer] = []
    stop = asyncio.Event()
    stop_removed = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as s:
            url = server.url
            # two streams each on latest and on v1.0 (which gets replaced), one on v2.0-beta (removed)
            workers = [asyncio.ensure_future(stream(s, url, target, image, stop, answers))
                       for target in ("latest", "v1.0", "latest", "v1.0")]
            workers.append(asyncio.ensure_future(stream(s, url, "v2.0-beta", image, stop_removed, answers)))

            async def answered(target: str) -> bool:
                return any(a.target == target and a.status == 200 for a in answers)

            for target in ("latest", "v1.0", "v2.0-beta"):
                await wait_for(lambda t=target: answered(t), 90, f"a first answer from {target}")

            # 1. add v1.1: copied into a staging dot-directory, then renamed into place
            staging = store.dir / ".incoming-v1.1"
            await asyncio.to_thread(shutil.copytree, demo_root / "m2fp" / "v1.1", staging)
            t_added = time.monotonic()
            os.rename(staging, store.dir / "v1.1")

            async def has_v11() -> bool:
                return "v1.1" in await versions(s, url)

            await wait_for(has_v11, 30, "v1.1 to be discovered")
            workers.append(asyncio.ensure_future(stream(s, url, "v1.1", image, stop, answers)))

            # 2. replace v1.0 (in use by its stream) with new content, published by an atomic swap
            def republish() -> None:
                with store.scratch("v1.0") as tmp:
                    stage = tmp / "v1.0"
                    shutil.copytree(demo_root / "m2fp" / "v1.0", stage)
                    cfg = json.loads((stage / "config.json").read_text())
                    cfg["notes"] = "replaced under load"
                    (stage / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
                    seal(stage)
                    store.publish(stage, "v1.0", force=True)

            t_republish = time.monotonic()
            await asyncio.to_thread(republish)

            async def swapped() -> bool:
                return (await metric(s, url, "m2fp_version_events", event="swaps") or 0) >= 1

            await wait_for(swapped, 60, "the replacement of v1.0 to be swapped in")
            t_swapped = time.monotonic()
            async with s.get(url + "/api/v1.0/meta") as r:
                assert (await r.json())["notes"] == "replaced under load"

            # 3. remove v2.0-beta (renamed away first, so it never looks half-deleted)
            t_removed = time.monotonic()
            await asyncio.to_thread(store.remove, "v2.0-beta")
            t_removed_end = time.monotonic()

            async def beta_gone() -> bool:
                return "v2.0-beta" not in await versions(s, url)

            await wait_for(beta_gone, 30, "v2.0-beta to disappear")
            await wait_for(lambda: value(any(a.target == "v2.0-beta" and a.status == 404 for a in answers)), 60,
                           "a 404 from the removed v2.0-beta")
            stop_removed.set()

            # keep the streams going a little after the last change, then stop
            n = len(answers)
            await wait_for(lambda: value(len(answers) >= n + 6), 60, "more answers after the changes")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 180)

            final = await versions(s, url)
            events = {e: await metric(s, url, "m2fp_version_events", event=e) for e in ("swaps", "load_failures")}
    finally:
        stop.set()
        stop_removed.set()
        server.stop()

    by_target: dict[str, list[Answer]] = {}
    for a in answers:
        by_target.setdefault(a.target, []).append(a)
    # versions that stay: not a single failed request
    for target, version in (("latest", "v1.2"), ("v1.0", "v1.0"), ("v1.1", "v1.1")):
        got = by_target.get(target, [])
        assert got, f"no requests to {target}"
        failed = [a for a in got if a.status != 200]
        assert not failed, f"{len(failed)} of {len(got)} requests to {target} failed: {failed[:3]}"
        assert {a.version for a in got} == {version}, (target, {a.version for a in got})
    # the replacement of v1.0 really happened under its traffic
    assert any(a.target == "v1.0" and a.sent <= t_swapped and a.done >= t_republish for a in answers)
    # every answer came from a version that was complete on disk at the time
    for a in answers:
        if a.status != 200:
            continue
        assert a.version in ("v1.0", "v1.1", "v1.2", "v2.0-beta"), a
        if a.version == "v1.1":
            assert a.done >= t_added, a
        if a.version == "v2.0-beta":
            assert a.sent <= t_removed_end, f"answered by v2.0-beta after it was removed: {a}"
    # the removed version: answers until it goes, then 404 — never a 500 or a broken connection
    beta = by_target["v2.0-beta"]
    assert any(a.status == 200 for a in beta)
    for a in beta:
        assert a.status in (200, 404, 503), a
        if a.status != 200:  # a request accepted just before the removal may still find it gone
            assert a.done >= t_removed, f"v2.0-beta failed before it was removed: {a}"
    assert all(a.status == 404 and a.error == "unknown_version" for a in beta if a.sent > t_removed_end + 5), beta

    assert set(final) == {"v1.0", "v1.1", "v1.2"}
    assert final["v1.0"]["state"] == "ready" and final["v1.0"]["update_error"] is None
    assert final["v1.0"]["notes"] == "replaced under load"
    assert events["swaps"] >= 1 and events["load_failures"] == 0
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


async def test_removing_the_latest_version_fails_no_queued_latest_request(demo_root: Path, tmp_path: Path):
    root = copy_root(demo_root, tmp_path / "bundles", versions=("v1.0", "v1.2"))
    server = ServerProcess(root, tmp_path / "server.log", "--max-queue", "8", "--concurrency", "1")
    await asyncio.to_thread(server.start)
    image = png_bytes(160, 120)
    try:
        async with aiohttp.ClientSession() as s:
            async def one() -> tuple[int, str | None, str]:
                async with s.post(server.url + "/api/latest/parse?visualization=0", data=image, headers=PNG) as r:
                    return r.status, r.headers.get("X-Model-Version"), (await r.text())[:200]

            tasks = [asyncio.ensure_future(one()) for _ in range(4)]
            await wait_for(lambda: metric(s, server.url, "m2fp_queue_depth"), 60, "parses queued", step=0.02)
            await asyncio.to_thread(BundleStore(root).remove, "v1.2")
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)

            async def v12_gone() -> bool:
                return "v1.2" not in await versions(s, server.url)

            await wait_for(v12_gone, 30, "v1.2 to disappear")
            async with s.post(server.url + "/api/latest/parse?visualization=0", data=image, headers=PNG) as r:
                assert r.status == 200 and r.headers["X-Model-Version"] == "v1.0"
    finally:
        server.stop()
    assert [(status, v in ("v1.2", "v1.0")) for status, v, _ in results] == [(200, True)] * 4, results


def test_serve_refuses_an_unusable_public_key_before_starting(tmp_path):
    from click.testing import CliRunner

    from m2fpkit.server.cli import main

    bad = tmp_path / "key.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    r = CliRunner().invoke(main, ["--bundles", str(tmp_path), "--public-key", str(bad)])
    assert r.exit_code == 2, r.output
    assert "--public-key" in r.output and str(bad) in r.output and "Traceback" not in r.output
