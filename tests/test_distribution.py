"""A central server exposes its verified bundles; an edge box pulls one and serves it (two servers on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from m2fpkit.runtime.bundle import manifest as manifest_mod
from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.bundle.archive import pack
from m2fpkit.runtime.bundle.signature import TrustPolicy
from m2fpkit.runtime.bundle.signing import keygen, sign
from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.delivery import ArchiveError, TransferError, Unauthorized, VerificationFailed
from m2fpkit.runtime.delivery import pull as pull_mod
from m2fpkit.runtime.delivery.install import install, verify
from m2fpkit.runtime.delivery.pull import pull
from reference.bundles import clone_bundle, corrupt
from server_fixtures import ServerProcess, http_json, png_bytes

FAST = {"short_edge": 160}
TOKEN = "dist-token-123"
ADMIN = "admin-token-456"
M2FP_BUNDLE = Path(sys.executable).with_name("m2fp-bundle")


def get(url: str, token: str | None = TOKEN, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=h), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist_keys")
    keygen(d / "k.key", d / "k.pub")
    return {"private": d / "k.key", "public": d / "k.pub"}


@pytest.fixture(scope="module")
def central(ms_multi, keys, tmp_path_factory):
    """The central server: v1.0 (signed), v1.2 (unsigned), v1.3 (damaged), distribution enabled."""
    root = tmp_path_factory.mktemp("central") / "bundles"
    clone_bundle(ms_multi.bundle_dir, root, "v1.0", preprocess=FAST)
    sign(root / "m2fp" / "v1.0", keys["private"])
    clone_bundle(ms_multi.bundle_dir, root, "v1.2", preprocess=FAST)
    clone_bundle(ms_multi.bundle_dir, root, "v1.3", preprocess=FAST, then=lambda p: corrupt(p, "flip-byte"))
    server = ServerProcess(root, root.parent / "central.log", "--distribution-token", TOKEN, "--admin-token", ADMIN,
                           "--idle-ttl", "0")
    server.root = root
    with server:
        yield server


@pytest.fixture(scope="module")
def edge(central, tmp_path_factory):
    """The edge box: v1.0 installed from a packed file, its own server (watcher on, no distribution)."""
    root = tmp_path_factory.mktemp("edge") / "bundles"
    archive = pack(central.root / "m2fp" / "v1.0", root.parent).path
    install(archive, root)
    server = ServerProcess(root, root.parent / "edge.log", "--idle-ttl", "0")
    server.root = root
    with server:
        yield server


# ------------------------------------------------------------------------------------ endpoints
def test_listing_needs_the_distribution_token(central, edge):
    status, _, body = get(central.url + "/bundles", token=None)
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    assert get(central.url + "/bundles", token="wrong")[0] == 401
    assert get(central.url + "/bundles", token=ADMIN)[0] == 401  # the admin token is another token
    status, headers, _ = get(central.url + "/bundles/v1.0.tar", token="wrong")
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
    status, _, body = get(edge.url + "/bundles")  # no --distribution-token: disabled
    assert status == 404 and json.loads(body)["error"] == "distribution_disabled"


def test_listing_shows_verified_versions_with_digest_and_signature(central):
    status, _, body = get(central.url + "/bundles")
    assert status == 200
    listing = json.loads(body)
    rows = {r["version"]: r for r in listing["versions"]}
    assert sorted(rows) == ["v1.0", "v1.2"]
    assert rows["v1.0"]["signed"] is True and rows["v1.2"]["signed"] is False
    for v in ("v1.0", "v1.2"):
        assert rows[v]["manifest_sha256"] == manifest_mod.read(central.root / "m2fp" / v).sha256
        assert rows[v]["url"] == f"/bundles/{v}.tar" and rows[v]["task"] == "multi-human"
    refused = {r["version"]: r["reason"] for r in listing["refused"]}
    assert list(refused) == ["v1.3"] and "SHA-256" in refused["v1.3"]


@pytest.mark.parametrize("path, error", [
    ("/bundles/v9.9.tar", "unknown_version"),
    ("/bundles/v1.3.tar", "version_refused"),
    ("/bundles/latest.tar", "not_found"),
    ("/bundles/v1.0", "not_found"),
    ("/bundles/..%2F..%2F..%2Fetc%2Fpasswd", "not_found"),
    ("/bundles/..%2Fm2fp%2Fv1.0.tar", "not_found"),
])
def test_download_names_are_checked(central, path, error):
    status, _, body = get(central.url + path)
    assert status == 404, body
    assert json.loads(body)["error"] == error


def test_download_is_the_packed_bundle_with_ranges(central, tmp_path):
    status, headers, full = get(central.url + "/bundles/v1.0.tar")
    assert status == 200
    local = pack(central.root / "m2fp" / "v1.0", tmp_path / "local.tar").path.read_bytes()
    assert full == local  # deterministic packing: the same bytes as `m2fp-bundle pack` on the server
    etag = headers["ETag"]
    assert etag.strip('"') == reader.identity_of(central.root / "m2fp" / "v1.0")  # manifest SHA-256 + signature
    assert etag.strip('"').startswith(manifest_mod.read(central.root / "m2fp" / "v1.0").sha256)
    assert headers["Accept-Ranges"] == "bytes" and headers["Content-Type"] == "application/x-tar"
    status, headers, tail = get(central.url + "/bundles/v1.0.tar", headers={"Range": "bytes=1000-", "If-Range": etag})
    assert status == 206 and tail == full[1000:]
    assert headers["Content-Range"] == f"bytes 1000-{len(full) - 1}/{len(full)}"
    status, _, part = get(central.url + "/bundles/v1.0.tar", headers={"Range": "bytes=10-19"})
    assert status == 206 and part == full[10:20]
    status, _, whole = get(central.url + "/bundles/v1.0.tar", headers={"Range": "bytes=1000-", "If-Range": '"other"'})
    assert status == 200 and whole == full  # the client's part is of other content: everything again
    status, headers, _ = get(central.url + "/bundles/v1.0.tar", headers={"Range": f"bytes={len(full) + 5}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(full)}"
    assert not list((central.root / "m2fp").glob(".distribution/*.tmp"))


# ----------------------------------------------------------------------------------------- pull
def test_pull_into_a_running_edge_box_which_then_serves_the_version(central, edge):
    assert http_json(edge.url + "/api/versions")[1]["latest"] == "v1.0"
    r = subprocess.run([str(M2FP_BUNDLE), "pull", central.url, "v1.2", "--bundles", str(edge.root)],
                       capture_output=True, text=True, timeout=180,
                       env={**os.environ, "M2FP_DISTRIBUTION_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr
    assert "pulled v1.2" in r.stdout and "ok    manifest" in r.stdout
    assert BundleStore(edge.root).versions() == ["v1.0", "v1.2"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # the edge server's watcher picks the new version up
        versions = {v["version"]: v for v in http_json(edge.url + "/api/versions")[1].get("versions", [])}
        if "v1.2" in versions:
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"edge server did not pick v1.2 up:\n{edge.log_tail()}")
    request = urllib.request.Request(edge.url + "/api/v1.2/parse?visualization=0", data=png_bytes(),
                                     headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.status == 200 and resp.headers["X-Model-Version"] == "v1.2"
        assert json.loads(resp.read())["version"] == "v1.2"
    assert not list((edge.root / "m2fp" / ".downloads").glob("*.part"))


def test_pull_with_a_wrong_token_fails_cleanly(central, tmp_path):
    root = tmp_path / "bundles"
    r = subprocess.run([str(M2FP_BUNDLE), "pull", central.url, "v1.2", "--bundles", str(root), "--token", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and "401" in r.stderr and r.stderr.count("\n") == 1
    assert BundleStore(root).versions() == []
    with pytest.raises(Unauthorized):
        pull(central.url, "v1.2", root, token=None)
    with pytest.raises(TransferError, match="404"):
        pull(central.url, "v7.7", root, token=TOKEN)
    assert not [p for p in (root / "m2fp").rglob("*") if p.name.endswith(".part") or p.name.startswith(".staging")]


def test_an_interrupted_download_resumes(central, tmp_path, monkeypatch):
    root = tmp_path / "bundles"
    real = pull_mod.read_chunk
    calls = {"n": 0}

    def drop_after_first_chunk(response, size):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(response, size)

    monkeypatch.setattr(pull_mod, "read_chunk", drop_after_first_chunk)
    with pytest.raises(TransferError, match="interrupted after 1048576 of .* run the same command again"):
        pull(central.url, "v1.0", root, token=TOKEN)
    part = root / "m2fp" / ".downloads" / "m2fp-v1.0.tar.part"
    assert part.stat().st_size == 1 << 20
    assert BundleStore(root).versions() == []  # nothing half-installed
    monkeypatch.setattr(pull_mod, "read_chunk", real)
    done = pull(central.url, "v1.0", root, token=TOKEN)
    assert done.resumed_from == 1 << 20  # the server answered 206 with the rest
    assert done.installed.version == "v1.0" and verify(root / "m2fp" / "v1.0").ok
    assert not part.exists()
    # a stale part of other content is not glued to new bytes: If-Range makes the server send it all
    part.write_bytes(b"x" * 5000)
    (part.parent / "m2fp-v1.0.tar.part.json").write_text(json.dumps(
        {"url": done.url, "etag": '"' + "0" * 64 + '"', "total": done.bytes}))
    again = pull(central.url, "v1.0", root, token=TOKEN, force=True)
    assert again.resumed_from == 0 and again.installed.replaced


def test_pull_with_a_public_key_requires_the_signature(central, keys, tmp_path):
    root = tmp_path / "bundles"
    trust = TrustPolicy.from_keys(keys["public"])
    done = pull(central.url, "v1.0", root, token=TOKEN, trust=trust)
    assert any(c.name == "signature" and c.status == "ok" for c in done.installed.report.checks)
    with pytest.raises(VerificationFailed, match="unsigned"):
        pull(central.url, "v1.2", root, token=TOKEN, trust=trust)
    assert BundleStore(root).versions() == ["v1.0"]
    assert not list((root / "m2fp" / ".downloads").glob("*.part"))  # a refused file is not kept


def test_pull_refuses_an_archive_of_another_version(central, tmp_path):
    """``pull URL v1.2`` where URL serves v1.0's archive: nothing is installed, not as v1.0 either, and
    with --force an installed v1.0 is not replaced."""
    root = tmp_path / "bundles"
    wrong = central.url + "/bundles/v1.0.tar"  # a .tar URL is fetched as given
    env = {**os.environ, "M2FP_DISTRIBUTION_TOKEN": TOKEN}
    r = subprocess.run([str(M2FP_BUNDLE), "pull", wrong, "v1.2", "--bundles", str(root)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stdout
    assert r.stderr.count("\n") == 1 and "holds version v1.0, not the requested v1.2" in r.stderr, r.stderr
    assert BundleStore(root).versions() == []
    assert not list((root / "m2fp" / ".downloads").glob("*.part*"))  # the foreign file is not kept
    # an installed v1.0 is not replaced by it, even with --force
    pull(central.url, "v1.0", root, token=TOKEN)
    installed = root / "m2fp" / "v1.0"
    before = (installed.stat().st_ino, reader.identity_of(installed))
    r = subprocess.run([str(M2FP_BUNDLE), "pull", wrong, "v1.2", "--bundles", str(root), "--force"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "not the requested v1.2" in r.stderr, r.stderr
    assert (installed.stat().st_ino, reader.identity_of(installed)) == before
    assert BundleStore(root).versions() == ["v1.0"]
    with pytest.raises(ArchiveError, match="holds version v1.0"):
        pull(wrong, "v1.2", root, token=TOKEN, force=True)
    assert not [p for p in (root / "m2fp").iterdir() if p.name.startswith((".staging-", ".replaced-"))]


def test_pull_refuses_an_installed_version(central, edge):
    r = subprocess.run([str(M2FP_BUNDLE), "pull", central.url, "v1.0", "--bundles", str(edge.root),
                        "--token", TOKEN], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "already installed" in r.stderr


def test_central_cache_is_invisible_to_the_registry(central):
    status, body = http_json(central.url + "/api/versions")
    assert status == 200
    assert sorted(v["version"] for v in body["versions"]) == ["v1.0", "v1.2", "v1.3"]
    assert (central.root / "m2fp" / ".distribution").is_dir()  # the packed-bundle cache, a dot-directory
