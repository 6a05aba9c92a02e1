"""Routes are validated as data (issue 11, fault 5): weights are finite numbers in [0, MAX_WEIGHT], refused
with the key named from the routes file and from the admin API (4xx, never 500), each refusal logged and
counted in ``m2fp_routes_refused_total{source}``; the routes watcher survives any content and applies the
next valid edit."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from m2fpkit.runtime import watcher
from m2fpkit.runtime.registry import RegistryOptions
from m2fpkit.runtime.routes_file import MAX_WEIGHT, RoutesError, loads_routes, parse_routes
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]

DIGITS_400 = "9" * 400
ADMIN = {"Authorization": "Bearer s3cret"}


def strict_json(text: str):
    """Parse as RFC 8259 JSON: NaN / Infinity literals are an error."""
    def no_constant(name: str):
        raise ValueError(f"{name} in the JSON text")
    return json.loads(text, parse_constant=no_constant)


# ===================================================================================== parsing
@pytest.mark.parametrize("text,fmt", [
    ('[weights]\n"v1.0" = nan\n', "toml"),
    ('[weights]\n"v1.0" = inf\n', "toml"),
    ('[weights]\n"v1.0" = -inf\n', "toml"),
    (f'[weights]\n"v1.0" = {DIGITS_400}\n', "toml"),
    ('[weights]\n"v1.0" = 1e308\n"v1.2" = 1e308\n', "toml"),  # finite each, but the sum overflows
    ('[weights]\n"v1.0" = 1000000.5\n', "toml"),
    (f'{{"weights": {{"v1.0": {DIGITS_400}}}}}', "json"),
    ('{"weights": {"v1.0": 1e300}}', "json"),
])
def test_out_of_range_weights_are_refused_naming_the_key(text, fmt):
    with pytest.raises(RoutesError) as info:
        loads_routes(text, fmt, source="routes.x")
    message = str(info.value)
    assert message.startswith("routes.x → weights → v1.0: expected a finite number in [0, 1000000]"), message
    assert len(message) < 200, message  # a 400-digit value is not echoed back


@pytest.mark.parametrize("text", ['{"weights": {"v1.0": NaN}}', '{"weights": {"v1.0": Infinity}}',
                                  '{"weights": {"v1.0": -Infinity}}', '{"weights": {"v1.0": 1e400}}'])
def test_json_without_a_finite_double_is_refused(text):
    with pytest.raises(RoutesError, match="routes.json"):
        loads_routes(text, "json", source="routes.json")


def test_weights_at_the_edges_of_the_range():
    r = parse_routes({"weights": {"v1.0": 0, "v1.1": -0.0, "v1.2": MAX_WEIGHT, "v2.0": 1e-300}})
    assert r.weights == (("v1.0", 0.0), ("v1.1", 0.0), ("v1.2", MAX_WEIGHT), ("v2.0", 1e-300))
    assert math.copysign(1, r.weights[1][1]) == 1  # -0.0 is stored as 0.0
    with pytest.raises(RoutesError, match="about 5000 digits"):  # beyond what str() of an int allows
        parse_routes({"weights": {"v1.0": 10 ** 4999}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["v1.0", "v1.2", "v2.0-beta", "x"]), json_values, max_size=4),
       st.one_of(st.none(), json_values))
def test_any_weights_either_parse_in_range_or_raise_routes_error(weights, shadow_fraction):
    raw: dict = {"weights": weights}
    if shadow_fraction is not None:
        raw["shadow"] = {"version": "v1.2", "fraction": shadow_fraction}
    try:
        r = parse_routes(raw, "prop")
    except RoutesError as exc:
        assert str(exc).startswith("prop")
        return
    assert all(math.isfinite(w) and 0 <= w <= MAX_WEIGHT for _, w in r.weights)
    assert math.isfinite(sum(w for _, w in r.weights))
    strict_json(json.dumps(r.to_dict()))


# ===================================================================================== watcher
async def test_the_watch_loop_survives_any_exception_of_its_callback(tmp_path: Path):
    stop = asyncio.Event()
    seen: list[int] = []
    failures = [ValueError("x"), OverflowError("y"), RecursionError(), asyncio.CancelledError(), KeyError("z")]

    async def on_change() -> None:
        seen.append(len(seen))
        if failures:
            raise failures.pop(0)

    task = asyncio.ensure_future(watcher.watch(tmp_path, lambda _c, _p: True, on_change, stop, debounce=50))
    deadline = time.monotonic() + 20
    n = 0
    while len(seen) < 7:
        assert time.monotonic() < deadline, f"callback ran {len(seen)} times"
        assert not task.done(), task
        (tmp_path / f"f{n}").write_text("x")
        n += 1
        await asyncio.sleep(0.2)
    assert not failures
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_the_watch_loop_restarts_when_watchfiles_fails(tmp_path: Path, monkeypatch, caplog):
    real = watcher.watchfiles.awatch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("inotify instance limit reached")
        return real(*args, **kwargs)

    monkeypatch.setattr(watcher.watchfiles, "awatch", flaky)
    caplog.set_level(logging.ERROR, logger="m2fpkit.runtime.watcher")
    stop = asyncio.Event()
    seen: list[float] = []

    async def on_change() -> None:
        seen.append(time.monotonic())

    task = asyncio.ensure_future(watcher.watch(tmp_path, lambda _c, _p: True, on_change, stop, debounce=50))
    deadline = time.monotonic() + 20
    while len(seen) < 2:  # one catch-up run after the restart, then a real change
        assert time.monotonic() < deadline and not task.done()
        (tmp_path / "f").write_text(str(time.monotonic()))
        await asyncio.sleep(0.2)
    assert calls["n"] >= 2
    assert any("inotify instance limit" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    stop.set()
    await asyncio.wait_for(task, 10)


# ========================================================================================= app
async def refused(client, source: str) -> float:
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "m2fp_routes_refused_total" and s.labels["source"] == source:
                return s.value
    raise AssertionError("m2fp_routes_refused_total missing")


async def weights_now(client) -> dict:
    text = await (await client.get("/api/versions")).text()
    return strict_json(text)["routes"]["weights"]


async def test_routes_file_with_nan_inf_or_huge_weights_is_refused_and_the_watcher_survives(
        aiohttp_client, demo_root: Path, tmp_path: Path, caplog):
    routes = tmp_path / "routes.toml"
    routes.write_text('[weights]\n"v1.0" = 70\n"v1.2" = 30\n')
    state = tmp_path / "state"
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root, routes_file=routes,
                                                        runtime=RegistryOptions(state_dir=state))))
    assert await weights_now(client) == {"v1.0": 70.0, "v1.2": 30.0}
    assert await refused(client, "file") == 0
    caplog.set_level(logging.ERROR, logger="m2fpkit.server.routes_state")

    for bad in ("nan", "inf", DIGITS_400, "1e308"):
        before = await refused(client, "file")
        deadline = time.monotonic() + 15
        last_write = 0.0
        while await refused(client, "file") == before:  # rewritten each second: the watcher may start late
            assert time.monotonic() < deadline, f"weight {bad[:10]} never refused"
            if time.monotonic() - last_write > 1.0:
                routes.write_text(f'[weights]\n"v1.0" = {bad}\n"v1.2" = 30\n')
                last_write = time.monotonic()
            await asyncio.sleep(0.1)
        assert await weights_now(client) == {"v1.0": 70.0, "v1.2": 30.0}  # previous routes kept, valid JSON
        assert any("weights → v1.0" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
    assert strict_json((state / ".lkg.json").read_text())["routes"]["weights"] == {"v1.0": 70.0, "v1.2": 30.0}

    # a later valid edit still applies: the watcher is alive
    deadline = time.monotonic() + 15
    last_write = 0.0
    while await weights_now(client) != {"v1.1": 1.0, "v1.2": 3.0}:
        assert time.monotonic() < deadline, "the valid edit after the refusals was never applied"
        if time.monotonic() - last_write > 1.0:
            routes.write_text('[weights]\n"v1.1" = 1\n"v1.2" = 3\n')
            last_write = time.monotonic()
        await asyncio.sleep(0.1)


async def test_admin_weights_refuse_non_finite_and_huge_values_with_4xx(aiohttp_client, demo_root: Path,
                                                                        tmp_path: Path, caplog):
    state = tmp_path / "state"
    client = await aiohttp_client(make_app(ServerConfig(
        bundles=demo_root, admin_token="s3cret", runtime=RegistryOptions(watch=False, state_dir=state))))
    r = await client.put("/admin/routes/weights", headers=ADMIN, json={"v1.0": 80, "v1.2": 20})
    assert r.status == 200, await r.text()
    caplog.set_level(logging.ERROR, logger="m2fpkit.server.routes_state")

    cases = [
        (b'{"v1.0": NaN}', 400, "bad_json", "NaN"),
        (b'{"v1.0": Infinity}', 400, "bad_json", "Infinity"),
        (b'{"v1.0": -Infinity}', 400, "bad_json", "Infinity"),
        (b'{"v1.0": 1e400}', 400, "bad_json", "1e400"),
        (b'{"v1.0": ' + DIGITS_400.encode() + b"}", 422, "bad_weights", "weights → v1.0"),
        (b'{"v1.0": 1e300}', 422, "bad_weights", "weights → v1.0"),
        (b'{"v1.0": 1000001}', 422, "bad_weights", "weights → v1.0"),
        (b'{"v1.0": -1}', 422, "bad_weights", "weights → v1.0"),
        (b'{"v1.0": "5"}', 422, "bad_weights", "weights → v1.0"),
        (b'{"v1.0": true}', 422, "bad_weights", "weights → v1.0"),
        (b'{"v1.0": null}', 422, "bad_weights", "weights → v1.0"),
        (b'{"v1.0": 1, "v1.2": [1]}', 422, "bad_weights", "weights → v1.2"),
        (b'{"v9.9": 1}', 404, "unknown_version", "v9.9"),
    ]
    for n, (payload, status, error, named) in enumerate(cases, start=1):
        r = await client.put("/admin/routes/weights", headers=ADMIN, data=payload)
        body = strict_json(await r.text())
        assert (r.status, body["error"]) == (status, error), (payload[:40], body)
        assert named in body["detail"] and len(body["detail"]) < 300, body
        assert await refused(client, "admin") == n
        assert await weights_now(client) == {"v1.0": 80.0, "v1.2": 20.0}
    assert sum("routes refused (admin)" in r.getMessage() for r in caplog.records) == len(cases)
    strict_json((state / ".lkg.json").read_text())

    # the edges of the range are fine
    r = await client.put("/admin/routes/weights", headers=ADMIN, data=b'{"v1.0": 1000000, "v1.2": 0}')
    assert r.status == 200 and (await r.json())["routes"]["weights"] == {"v1.0": 1e6, "v1.2": 0.0}


async def test_a_routes_file_naming_versions_this_server_lacks_applies_with_a_warning_naming_them(
        aiohttp_client, demo_root: Path, tmp_path: Path, caplog):
    """Audit: ``shadow.version = "v7.7"`` (not installed) was accepted silently and every shadow run counted as
    dropped. A routes file may name a version before it is pulled, so it still applies (as unknown weighted
    versions always did: they get no traffic), now with a warning naming each missing version; the admin
    API, a person at a prompt, refuses them (404)."""
    caplog.set_level(logging.WARNING, logger="m2fpkit.server.routes_state")
    routes = tmp_path / "routes.toml"
    routes.write_text('[weights]\n"v1.2" = 1\n"v9.9" = 1\n[aliases]\nbeta = "v8.8"\n'
                      '[shadow]\nversion = "v7.7"\nfraction = 1.0\n')
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root, routes_file=routes, admin_token="s3cret",
                                                        runtime=RegistryOptions(watch=False))))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("do" in m and "weights → v9.9" in m and "aliases → beta → v8.8" in m and "shadow → v7.7" in m
               for m in warnings), warnings
    assert not any("v1.2" in m for m in warnings)
    r = await client.get("/admin/routes", headers=ADMIN)
    assert (await r.json())["routes"]["shadow"]["version"] == "v7.7"
    r = await client.put("/admin/routes/weights", headers=ADMIN, json={"v7.7": 1})
    assert r.status == 404 and "v7.7" in (await r.json())["detail"]


def test_the_server_and_m2fp_bundle_rm_read_a_routes_file_under_one_size_cap(tmp_path: Path):
    """Before: ``m2fp-bundle rm --routes`` read a routes file of up to 4 MiB with its own parser, the server up to
    1 MiB. One parser now (``runtime.routes_file``), one cap, one reading of every key."""
    from m2fpkit.runtime.delivery.install import load_routes_refs
    from m2fpkit.runtime.errors import BundleError
    from m2fpkit.runtime.routes_file import MAX_ROUTES_BYTES, load_routes

    path = tmp_path / "routes.toml"
    path.write_text('[weights]\n"v1.0" = 1\n' + "#" * MAX_ROUTES_BYTES + "\n")
    with pytest.raises(RoutesError, match=f"the {MAX_ROUTES_BYTES}-byte limit"):
        load_routes(path)
    with pytest.raises(BundleError, match=f"the {MAX_ROUTES_BYTES}-byte limit"):
        load_routes_refs(path)
    path.write_text('[weights]\n"v1.0" = 1\n"v1.1" = "lots"\n')  # the server refuses it: rm cannot trust it either
    with pytest.raises(BundleError, match="weights → v1.1"):
        load_routes_refs(path)
    path.write_text('[weights]\n"v1.0" = 1\n[shadow]\nversion = "v1.1"\n')
    assert load_routes_refs(path) == {"v1.0": ["routes file routes.toml → weights (1)"],
                                      "v1.1": ["routes file routes.toml → shadow"]}
