"""Sticky weighted routing: the pure functions of ``server/routing.py``, then the app's ``auto`` route,
the admin endpoints and the hot-reloaded routes file."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from m2fpkit.runtime.registry import RegistryOptions
from m2fpkit.runtime.routes_file import Routes, RoutesError, Shadow, load_routes, parse_routes
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from m2fpkit.server.routing import BUCKETS, bucket, pick

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import png_bytes  # noqa: E402


def always(_v: str) -> bool:
    return True


def random_keys(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"user-{rng.getrandbits(64):016x}" for _ in range(n)]


def assert_within_3_sigma(count: int, n: int, p: float, what: str) -> None:
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 3 * sigma, f"{what}: {count} of {n}, expected {n * p:.0f} ± {3 * sigma:.0f}"


# =========================================================================================== bucket
def test_bucket_is_stable_across_releases():
    # pinned values: a change of the hash moves every user to another version after an upgrade
    assert [bucket(k) for k in ("", "alice", "user-42", "203.0.113.7", "ключ")] == [1652, 207, 5129, 4575, 7024]
    assert all(bucket("same key") == bucket("same key") for _ in range(100))


def test_bucket_is_in_range_and_roughly_uniform():
    keys = random_keys(20_000, seed=1)
    buckets = [bucket(k) for k in keys]
    assert all(0 <= b < BUCKETS for b in buckets)
    bins = 20
    counts = [0] * bins
    for b in buckets:
        counts[b * bins // BUCKETS] += 1
    expected = len(keys) / bins
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 43.8, f"chi² = {chi2:.1f} over {bins} bins (critical value 43.8 at p = 0.001): {counts}"
    # the address-like keys a fallback produces spread too
    addr = [bucket(f"10.0.{i // 256}.{i % 256}") for i in range(4096)]
    assert len(set(addr)) > 3000
    assert_within_3_sigma(sum(b < BUCKETS // 2 for b in addr), len(addr), 0.5, "addresses in the lower half")


# ============================================================================================= pick
@pytest.mark.parametrize("weights", [
    (("v1.2", 90.0), ("v2.0-beta", 10.0)),
    (("v1.0", 50.0), ("v1.1", 30.0), ("v1.2", 20.0)),
    (("v1.0", 1.0), ("v1.2", 1.0), ("v2.0-beta", 2.0)),
])
def test_pick_proportions_follow_weights(weights):
    keys = random_keys(20_000, seed=2)
    counts = {v: 0 for v, _ in weights}
    for k in keys:
        counts[pick(weights, bucket(k), always)] += 1
    total = sum(w for _, w in weights)
    for v, w in weights:
        assert_within_3_sigma(counts[v], len(keys), w / total, v)


def test_pick_owns_consecutive_ranges_in_listed_order():
    w = (("a1", 50.0), ("b1", 30.0), ("c1", 20.0))
    owner = [pick(w, b, always) for b in range(BUCKETS)]
    assert owner[0] == owner[4999] == "a1"
    assert owner[5000] == owner[7999] == "b1"
    assert owner[8000] == owner[BUCKETS - 1] == "c1"
    # exactly three runs: a range per version, no interleaving
    assert [v for v, _ in itertools.groupby(owner)] == ["a1", "b1", "c1"]
    assert owner.count("a1") == 5000 and owner.count("b1") == 3000 and owner.count("c1") == 2000


def test_pick_ignores_zero_weights_and_returns_none_without_candidates():
    assert pick((("v1.0", 0.0), ("v1.2", 5.0)), 0, always) == "v1.2"
    assert pick((("v1.0", 0.0),), 123, always) is None
    assert pick((), 123, always) is None
    assert pick((("v1.0", 1.0),), 123, lambda v: False) is None


def test_pick_is_sticky_per_key():
    weights = (("v1.0", 50.0), ("v1.1", 30.0), ("v1.2", 20.0))
    for k in random_keys(500, seed=3):
        first = pick(weights, bucket(k), always)
        assert all(pick(weights, bucket(k), always) == first for _ in range(5)), k
        # an equal table built afresh (a reload of the same file) gives the same answer
        assert pick(tuple(weights), bucket(str(k)), always) == first


@pytest.mark.parametrize("before,after", [
    # canary last, the stable weight unchanged
    ((("v1.2", 95.0), ("v2.0-beta", 5.0)), (("v1.2", 95.0), ("v2.0-beta", 20.0))),
    # canary last, the stable weight lowered so the total stays 100
    ((("v1.2", 95.0), ("v2.0-beta", 5.0)), (("v1.2", 80.0), ("v2.0-beta", 20.0))),
    # canary first
    ((("v2.0-beta", 5.0), ("v1.2", 95.0)), (("v2.0-beta", 20.0), ("v1.2", 80.0))),
    # canary between two versions that shrink in proportion
    ((("v1.0", 50.0), ("v2.0-beta", 5.0), ("v1.2", 45.0)),
     (("v1.0", 50.0 * 80 / 95), ("v2.0-beta", 20.0), ("v1.2", 45.0 * 80 / 95))),
])
def test_raising_a_canary_only_adds_users_to_it(before, after):
    canary = "v2.0-beta"
    old = [pick(before, b, always) for b in range(BUCKETS)]
    new = [pick(after, b, always) for b in range(BUCKETS)]
    moved_off = [b for b in range(BUCKETS) if old[b] == canary and new[b] != canary]
    assert not moved_off, f"{len(moved_off)} buckets left the canary, e.g. {moved_off[:5]}"
    share = new.count(canary) / BUCKETS
    want = dict(after)[canary] / sum(w for _, w in after)
    assert abs(share - want) < 0.001, share
    # and users that were not on the canary either stay where they were or join the canary
    assert all(new[b] in (old[b], canary) for b in range(BUCKETS))


def test_not_ready_versions_are_respread_and_never_give_none():
    weights = (("v1.0", 50.0), ("v1.1", 30.0), ("v1.2", 20.0))
    names = [v for v, _ in weights]
    for r in range(1, len(names) + 1):
        for ready in itertools.combinations(names, r):
            usable = set(ready).__contains__
            owners = [pick(weights, b, usable) for b in range(BUCKETS)]
            assert None not in owners, ready
            assert set(owners) == set(ready), (ready, set(owners))
            total = sum(w for v, w in weights if v in ready)
            for v in ready:  # the remaining versions keep their relative weights
                assert abs(owners.count(v) / BUCKETS - dict(weights)[v] / total) < 0.001, (ready, v)
    assert all(pick(weights, b, lambda v: False) is None for b in range(0, BUCKETS, 97))


def test_keys_of_ready_versions_stay_when_another_version_is_not_ready():
    weights = (("v1.0", 50.0), ("v1.1", 30.0), ("v1.2", 20.0))
    for down in ("v1.0", "v1.1", "v1.2"):
        usable = lambda v, down=down: v != down  # noqa: E731
        for b in range(BUCKETS):
            before = pick(weights, b, always)
            if before != down:
                assert pick(weights, b, usable) == before, (down, b, before)


# =========================================================================================== routes file
def test_routes_from_toml(tmp_path: Path):
    path = tmp_path / "routes.toml"
    path.write_text('[weights]\n"v1.2" = 90\n"v2.0-beta" = 10\n\n[aliases]\ncanary = "v2.0-beta"\n\n'
                    '[sticky]\nheader = "X-User"\ncookie = "uid"\n\n[shadow]\nversion = "v2.0-beta"\nfraction = 0.25\n')
    r = load_routes(path)
    assert r.weights == (("v1.2", 90.0), ("v2.0-beta", 10.0))  # order kept: it decides the ranges
    assert r.aliases == {"canary": "v2.0-beta"}
    assert (r.key_header, r.key_cookie) == ("X-User", "uid")
    assert r.shadow == Shadow("v2.0-beta", 0.25)
    assert r.weighted_versions() == {"v1.2", "v2.0-beta"}
    assert r.source == str(path)


def test_routes_from_json_and_defaults(tmp_path: Path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"weights": {"v2.0-beta": 1, "v1.0": 3}}))
    r = load_routes(path)
    assert r.weights == (("v2.0-beta", 1.0), ("v1.0", 3.0))
    assert r.aliases == {} and r.shadow is None
    assert (r.key_header, r.key_cookie) == ("X-Route-Key", "m2fp_route")
    assert parse_routes({}) == Routes(source="routes")
    d = r.to_dict()
    assert d["weights"] == {"v2.0-beta": 1.0, "v1.0": 3.0} and d["sticky"]["header"] == "X-Route-Key"


@pytest.mark.parametrize("raw,named", [
    ({"weights": {"v1.2": -1}}, "weights → v1.2"),
    ({"weights": {"v1.2": "ten"}}, "weights → v1.2"),
    ({"weights": {"v1.2": True}}, "weights → v1.2"),
    ({"weights": {"../etc": 1}}, "weights → ../etc"),
    ({"weights": [1, 2]}, "weights"),
    ({"aliases": {"auto": "v1.2"}}, "aliases → auto"),
    ({"aliases": {"Canary": "v1.2"}}, "aliases → Canary"),
    ({"aliases": {"canary": "latest"}}, "aliases → canary"),
    ({"sticky": "X-User"}, "sticky"),
    ({"shadow": {"version": "v2.0-beta", "fraction": 2}}, "shadow → fraction"),
    ({"shadow": {"fraction": 0.1}}, "shadow"),
    ({"wieghts": {"v1.2": 1}}, "wieghts"),
])
def test_routes_errors_name_the_key(raw, named):
    with pytest.raises(RoutesError) as info:
        parse_routes(raw, "routes.toml")
    assert named in str(info.value)
    assert str(info.value).startswith("routes.toml")


def test_routes_file_syntax_errors_and_missing_file(tmp_path: Path):
    bad = tmp_path / "routes.toml"
    bad.write_text("[weights\n")
    with pytest.raises(RoutesError, match="routes.toml"):
        load_routes(bad)
    bad_json = tmp_path / "routes.json"
    bad_json.write_text("{not json")
    with pytest.raises(RoutesError, match="routes.json"):
        load_routes(bad_json)
    with pytest.raises(RoutesError, match="missing.toml"):
        load_routes(tmp_path / "missing.toml")


# ============================================================================================== app
def write_routes(path: Path, weights: dict[str, float], extra: str = "") -> None:
    lines = ["[weights]"] + [f'"{v}" = {w}' for v, w in weights.items()]
    path.write_text("\n".join(lines) + "\n" + extra)


async def counts_by_version(client, rule: str, status: str) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "m2fp_requests":
            for s in fam.samples:
                if s.name == "m2fp_requests_total" and s.labels["rule"] == rule and s.labels["status"] == status:
                    out[s.labels["version"]] = s.value
    return out


async def test_auto_splits_by_weight_and_is_sticky(aiohttp_client, demo_root: Path, tmp_path: Path):
    routes = tmp_path / "routes.toml"
    weights = {"v1.0": 70, "v1.2": 30}
    write_routes(routes, weights)
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root, routes_file=routes)))
    table = tuple((v, float(w)) for v, w in weights.items())

    # many keys, cheaply: an empty body is refused (400) after the version was chosen, and the
    # choice is counted per version in m2fp_requests_total{rule="auto"}
    keys = random_keys(300, seed=4)
    expected = {"v1.0": 0, "v1.2": 0}
    for k in keys:
        expected[pick(table, bucket(k), always)] += 1
        r = await client.post("/api/auto/parse", data=b"", headers={"X-Route-Key": k, "Content-Type": "image/png"})
        assert r.status == 400, await r.text()
    got = await counts_by_version(client, "auto", "400")
    assert got == {v: float(n) for v, n in expected.items()}
    assert_within_3_sigma(int(got["v1.0"]), len(keys), 0.7, "v1.0 share")

    # real parses: the answering version is the one the routing table gives the key, every time
    chosen = {"v1.0": [], "v1.2": []}
    for k in random_keys(200, seed=5):
        v = pick(table, bucket(k), always)
        if len(chosen[v]) < 2:
            chosen[v].append(k)
    image = png_bytes(96, 64)
    for v, ks in chosen.items():
        for k in ks:
            for attempt in range(2):
                r = await client.post("/api/auto/parse?visualization=0", data=image,
                                      headers={"X-Route-Key": k, "Content-Type": "image/png"})
                body = await r.json()
                assert r.status == 200, body
                assert r.headers["X-Model-Version"] == body["version"] == v, (k, attempt)
                assert r.headers["X-Route-Rule"] == body["route"] == "auto"
    # the cookie is a key too, when no header is sent
    k = chosen["v1.2"][0]
    r = await client.post("/api/auto/parse?visualization=0", data=image, headers={"Content-Type": "image/png"},
                          cookies={"m2fp_route": k})
    assert r.status == 200 and r.headers["X-Model-Version"] == "v1.2"


async def test_auto_skips_an_incompatible_version_and_falls_back(aiohttp_client, demo_root: Path, tmp_path: Path):
    routes = tmp_path / "routes.toml"
    write_routes(routes, {"v2.0-beta": 100})
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root, routes_file=routes)))
    image = png_bytes(96, 64)
    r = await client.post("/api/auto/parse?visualization=0", data=image,
                          headers={"X-Route-Key": "k1", "Content-Type": "image/png", "X-API-Version": "2.0"})
    assert (r.status, r.headers["X-Model-Version"], r.headers["X-Route-Rule"]) == (200, "v2.0-beta", "auto")
    # a 1.0 client cannot use the only weighted version: auto falls back to latest
    r = await client.post("/api/auto/parse?visualization=0", data=image,
                          headers={"X-Route-Key": "k1", "Content-Type": "image/png", "X-API-Version": "1.0"})
    assert (r.status, r.headers["X-Model-Version"], r.headers["X-Route-Rule"]) == (200, "v1.2", "auto-fallback")


async def test_admin_is_disabled_without_a_token(aiohttp_client, demo_root: Path):
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root)))
    for method, path in (("GET", "/admin/routes"), ("POST", "/admin/routes/reload"),
                         ("PUT", "/admin/routes/weights"), ("POST", "/admin/routes/rollback")):
        r = await client.request(method, path, headers={"Authorization": "Bearer anything"}, data=b"{}")
        body = await r.json()
        assert r.status == 404, (path, body)
        assert body["error"] == "admin_disabled" and body["success"] is False


async def test_admin_auth_weights_rollback_and_reload(aiohttp_client, demo_root: Path, tmp_path: Path):
    routes = tmp_path / "routes.toml"
    write_routes(routes, {"v1.0": 70, "v1.2": 30})
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root, routes_file=routes, admin_token="s3cret",
                                                        runtime=RegistryOptions(watch=False))))
    good = {"Authorization": "Bearer s3cret"}

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Basic czNjcmV0"}):
        for method, path in (("GET", "/admin/routes"), ("POST", "/admin/routes/reload"),
                             ("PUT", "/admin/routes/weights"), ("POST", "/admin/routes/rollback")):
            r = await client.request(method, path, headers=headers, data=b'{"v1.0": 1}')
            assert r.status == 401, (headers, path)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await r.json())["error"] == "unauthorized"
    # nothing changed
    r = await client.get("/admin/routes", headers=good)
    assert r.status == 200
    assert (await r.json())["routes"]["weights"] == {"v1.0": 70.0, "v1.2": 30.0}

    # set weights
    r = await client.put("/admin/routes/weights", headers=good, json={"v1.0": 20, "v2.0-beta": 80})
    body = await r.json()
    assert r.status == 200, body
    assert body["success"] is True and body["routes"]["weights"] == {"v1.0": 20.0, "v2.0-beta": 80.0}
    assert body["routes"]["source"] == "admin"
    listing = await (await client.get("/api/versions")).json()
    assert {v["version"]: v["weight"] for v in listing["versions"]} == {
        "v1.0": 20.0, "v1.1": 0.0, "v1.2": 0.0, "v2.0-beta": 80.0}
    assert listing["routes"]["weights"] == {"v1.0": 20.0, "v2.0-beta": 80.0}
    # a weighted version is pinned (kept loaded)
    assert {v["version"]: v["pinned"] for v in listing["versions"]}["v2.0-beta"] is True

    # bad weights are refused and change nothing
    for payload, status, error in ((b"{not json", 400, "bad_json"), (b"[1, 2]", 400, "bad_json"),
                                   (b'{"v9.9": 1}', 404, "unknown_version"), (b'{"v1.0": -5}', 422, "bad_weights")):
        r = await client.put("/admin/routes/weights", headers=good, data=payload)
        assert (r.status, (await r.json())["error"]) == (status, error), payload
    r = await client.get("/admin/routes", headers=good)
    assert (await r.json())["routes"]["weights"] == {"v1.0": 20.0, "v2.0-beta": 80.0}

    # rollback restores the previous weights (the routes file's)
    r = await client.post("/admin/routes/rollback", headers=good)
    body = await r.json()
    assert r.status == 200 and body["routes"]["weights"] == {"v1.0": 70.0, "v1.2": 30.0}
    listing = await (await client.get("/api/versions")).json()
    assert listing["routes"]["weights"] == {"v1.0": 70.0, "v1.2": 30.0}
    # ...then the routes before the file was read, then there is nothing left
    r = await client.post("/admin/routes/rollback", headers=good)
    assert r.status == 200 and (await r.json())["routes"]["weights"] == {}
    r = await client.post("/admin/routes/rollback", headers=good)
    assert (r.status, (await r.json())["error"]) == (409, "no_history")

    # reload reads the file again (the watcher is off here)
    write_routes(routes, {"v1.1": 1, "v1.2": 3})
    r = await client.post("/admin/routes/reload", headers=good)
    body = await r.json()
    assert r.status == 200, body
    assert body["routes"]["weights"] == {"v1.1": 1.0, "v1.2": 3.0}
    # a broken file is refused with the key named, and the routes stay
    routes.write_text('[weights]\n"v1.2" = -3\n')
    r = await client.post("/admin/routes/reload", headers=good)
    body = await r.json()
    assert r.status == 422 and body["error"] == "bad_routes" and "weights → v1.2" in body["detail"]
    r = await client.get("/admin/routes", headers=good)
    assert (await r.json())["routes"]["weights"] == {"v1.1": 1.0, "v1.2": 3.0}


async def test_reload_without_routes_file_is_refused(aiohttp_client, demo_root: Path):
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root, admin_token="t")))
    r = await client.post("/admin/routes/reload", headers={"Authorization": "Bearer t"})
    body = await r.json()
    assert r.status == 422 and body["error"] == "bad_routes" and "--routes" in body["detail"]


async def _poll_weights(client, want: dict[str, float], rewrite, timeout: float = 15.0) -> dict:
    """Poll /api/versions until the routes' weights equal ``want``; ``rewrite()`` is called every
    second meanwhile (a change made before the watcher started would otherwise go unseen)."""
    deadline = time.monotonic() + timeout
    last_write = 0.0
    weights = None
    while time.monotonic() < deadline:
        weights = (await (await client.get("/api/versions")).json())["routes"]["weights"]
        if weights == want:
            return weights
        if time.monotonic() - last_write > 1.0:
            rewrite()
            last_write = time.monotonic()
        await asyncio.sleep(0.1)
    raise AssertionError(f"routes file change not picked up within {timeout:g} s: weights {weights}, want {want}")


async def test_routes_file_edits_are_picked_up_and_broken_edits_ignored(aiohttp_client, demo_root: Path,
                                                                       tmp_path: Path, caplog):
    routes = tmp_path / "routes.toml"
    write_routes(routes, {"v1.0": 70, "v1.2": 30})
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root, routes_file=routes)))
    r = await client.get("/api/versions")
    assert (await r.json())["routes"]["weights"] == {"v1.0": 70.0, "v1.2": 30.0}

    await _poll_weights(client, {"v1.0": 10.0, "v1.2": 90.0}, lambda: write_routes(routes, {"v1.0": 10, "v1.2": 90}))
    r = await client.post("/api/auto/parse", data=b"", headers={"X-Route-Key": "x", "Content-Type": "image/png"})
    assert r.status == 400 and r.headers.get("X-Model-Version") is None

    # a broken edit: logged and ignored, the routes in force stay
    caplog.set_level(logging.ERROR, logger="m2fpkit.server.routes_state")
    deadline = time.monotonic() + 15
    last_write = 0.0
    while not any("routes refused (file)" in rec.getMessage() for rec in caplog.records):
        assert time.monotonic() < deadline, "the broken routes file was never looked at"
        if time.monotonic() - last_write > 1.0:
            routes.write_text('[weights]\n"v1.0" = "lots"\n')
            last_write = time.monotonic()
        await asyncio.sleep(0.1)
    assert any("weights → v1.0" in rec.getMessage() for rec in caplog.records)
    r = await client.get("/api/versions")
    assert (await r.json())["routes"]["weights"] == {"v1.0": 10.0, "v1.2": 90.0}

    # and the watcher is still alive for the next good edit
    await _poll_weights(client, {"v1.1": 1.0, "v1.2": 1.0}, lambda: write_routes(routes, {"v1.1": 1, "v1.2": 1}))


async def shadow_samples(client, outcome: str) -> dict[tuple[str, str], float]:
    text = await (await client.get("/metrics")).text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "m2fp_shadow_runs_total" and s.labels.get("outcome") == outcome:
                out[(s.labels["primary"], s.labels["candidate"])] = s.value
            if s.name == "m2fp_shadow_label_agreement_count" and outcome == "agreement":
                out[(s.labels["primary"], s.labels["candidate"])] = s.value
    return out


async def test_shadow_traffic_compares_label_maps_when_idle(aiohttp_client, demo_root: Path, tmp_path: Path):
    routes = tmp_path / "routes.toml"
    write_routes(routes, {"v1.2": 1}, '[shadow]\nversion = "v1.0"\nfraction = 1.0\n')
    client = await aiohttp_client(make_app(ServerConfig(bundles=demo_root, routes_file=routes)))
    image = png_bytes(96, 64)
    r = await client.post("/api/v1.2/parse?visualization=0", data=image, headers={"Content-Type": "image/png"})
    assert r.status == 200 and r.headers["X-Model-Version"] == "v1.2"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not await shadow_samples(client, "compared"):
        await asyncio.sleep(0.2)
    assert await shadow_samples(client, "compared") == {("v1.2", "v1.0"): 1.0}
    assert await shadow_samples(client, "agreement") == {("v1.2", "v1.0"): 1.0}
    # the shadow version itself answers normally and is never shadowed against itself
    r = await client.post("/api/v1.0/parse?visualization=0", data=image, headers={"Content-Type": "image/png"})
    assert r.status == 200 and r.headers["X-Model-Version"] == "v1.0"
    await asyncio.sleep(0.5)
    assert ("v1.0", "v1.0") not in await shadow_samples(client, "compared")
