"""A read-only bundle root (compose's ``bundles:/bundles:ro``, a read-only Kubernetes PVC).

Before: an empty one crashed the server (EROFS creating ``m2fp/``); a non-empty one silently turned
last-known-good off with a warning on every load. Now: nothing is created in the root at start (an
absent ``m2fp/`` is an empty store, and the watcher still sees it appear); last-known-good goes to
``--state-dir`` when given, else it is declared off once at start with the reason, also shown in
``/readyz`` and ``/api/versions``.

How "read-only" is made: tests run as root, where ``chmod 0555`` does not stop writes, so the root is a
real **read-only bind mount** (``mount --bind`` + ``mount -o remount,ro,bind``, unmounted in a finally) of
a writable directory — which the tests use to publish "from elsewhere", as an admin pod would. Where
mounting is not permitted, the in-process tests **simulate EROFS by monkeypatching** ``os.access``,
``os.mkdir``, ``os.open`` (for writing), ``os.rename`` and ``os.replace`` for paths under the root
(:func:`simulate_erofs`), and the subprocess tests are skipped (a monkeypatch cannot reach them).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from m2fpkit.runtime import lkg
from m2fpkit.runtime.bundle.reader import identity_of
from m2fpkit.runtime.registry import RegistryOptions
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import ServerProcess, copy_root, http_json, png_bytes  # noqa: E402

PNG = {"Content-Type": "image/png"}
OFF = "last-known-good off"


@dataclass
class ReadOnlyRoot:
    #: the bundle root the server is given (read-only)
    path: Path
    #: a writable path to the same files ("another machine" publishing); None when simulated
    writable: Path | None
    how: str  # "bind-mount" or "simulated"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


def _mount_read_only(src: Path, dst: Path) -> str | None:
    """Bind-mount ``src`` read-only at ``dst``; None when done, else why it could not be done."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    dst.mkdir()
    bind = _run("mount", "--bind", str(src), str(dst))
    if bind.returncode != 0:
        return f"mount --bind: {bind.stderr.strip()}"
    remount = _run("mount", "-o", "remount,ro,bind", str(dst))
    try:
        (dst / ".probe").touch()
    except OSError as exc:
        if exc.errno == errno.EROFS and remount.returncode == 0:
            return None
    else:
        (dst / ".probe").unlink()
    _run("umount", str(dst))
    return f"remount read-only failed: {remount.stderr.strip() or 'still writable'}"


def simulate_erofs(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make every write under ``root`` fail with EROFS, and ``os.access(..., W_OK)`` say so."""
    prefix = os.path.abspath(root)

    def under(path) -> bool:
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return False
        return p == prefix or p.startswith(prefix + os.sep)

    def refuse(path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_access, real_mkdir, real_open = os.access, os.mkdir, os.open
    real_rename, real_replace = os.rename, os.replace
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def access(path, mode, *a, **kw):
        return False if under(path) and mode & os.W_OK else real_access(path, mode, *a, **kw)

    def mkdir(path, *a, **kw):
        return refuse(path) if under(path) else real_mkdir(path, *a, **kw)

    def open_(path, flags, *a, **kw):
        return refuse(path) if under(path) and flags & writes else real_open(path, flags, *a, **kw)

    def rename(src, dst, *a, **kw):
        return refuse(dst) if under(src) or under(dst) else real_rename(src, dst, *a, **kw)

    def replace(src, dst, *a, **kw):
        return refuse(dst) if under(src) or under(dst) else real_replace(src, dst, *a, **kw)

    for name, fn in (("access", access), ("mkdir", mkdir), ("open", open_), ("rename", rename),
                     ("replace", replace)):
        monkeypatch.setattr(os, name, fn)


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[tuple[Path, Path, str | None]]:
    """(writable source, mount point, None if mounted read-only else why not); unmounted afterwards."""
    src, dst = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    why = _mount_read_only(src, dst)
    try:
        yield src, dst, why
    finally:
        if why is None:
            for _ in range(20):  # a server that just exited may still hold it for a moment
                if _run("umount", str(dst)).returncode == 0:
                    break
                time.sleep(0.25)


def make_read_only(mount_point, monkeypatch, fill=None) -> ReadOnlyRoot:
    """A read-only root, filled first by ``fill(path)``: the bind mount, else the simulation."""
    src, dst, why = mount_point
    if fill is not None:
        fill(src)
    if why is None:
        return ReadOnlyRoot(dst, src, "bind-mount")
    simulate_erofs(monkeypatch, src)
    return ReadOnlyRoot(src, None, "simulated")


def needs_mount(mount_point) -> None:
    if mount_point[2] is not None:
        pytest.skip(f"a real process needs a read-only bind mount ({mount_point[2]})")


def off_reason(kind: str, path: Path) -> str:
    """The public reason (``path`` only documents which directory: the status itself names none)."""
    return f"off: the bundle {kind} is read-only; give a writable --state-dir (env M2FP_STATE_DIR)"


def fill_with(demo_root: Path, versions: tuple[str, ...]):
    def fill(src: Path) -> None:
        copy_root(demo_root, src, versions=versions)

    return fill


# ---------------------------------------------------------------------------------- in process
async def test_an_empty_read_only_root_starts_with_no_versions_yet(aiohttp_client, mount_point, monkeypatch):
    ro = make_read_only(mount_point, monkeypatch)
    client = await aiohttp_client(make_app(ServerConfig(bundles=ro.path)))
    assert (await client.get("/healthz")).status == 200
    r = await client.get("/readyz")
    body = await r.json()
    assert r.status == 503, (ro.how, body)
    assert body == {"ready": False, "versions": [], "latest": None, "detail": "no versions yet",
                    "last_known_good": off_reason("root", ro.path)}
    r = await client.get("/api/versions")
    listing = await r.json()
    assert r.status == 200 and listing["versions"] == [] and listing["latest"] is None
    assert listing["last_known_good"] == off_reason("root", ro.path)
    assert list(ro.path.iterdir()) == []


async def test_a_read_only_store_serves_and_declares_last_known_good_off_once(aiohttp_client, mount_point,
                                                                            monkeypatch, demo_root, caplog):
    ro = make_read_only(mount_point, monkeypatch, fill_with(demo_root, ("v1.0", "v1.1", "v1.2")))
    caplog.set_level(logging.INFO, logger="m2fpkit")
    client = await aiohttp_client(make_app(ServerConfig(bundles=ro.path)))
    for version in ("latest", "stable", "v1.1"):  # v1.2 and v1.0 load at start, v1.1 on this request
        r = await client.post(f"/api/{version}/parse?visualization=0", data=png_bytes(64, 48), headers=PNG)
        assert r.status == 200, await r.text()
    listing = await (await client.get("/api/versions")).json()
    assert {v["version"]: v["state"] for v in listing["versions"]} == {"v1.0": "ready", "v1.1": "ready",
                                                                      "v1.2": "ready"}
    assert listing["last_known_good"] == off_reason("store", ro.path / "m2fp")
    assert (await (await client.get("/readyz")).json())["last_known_good"] == listing["last_known_good"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("ready in" in m for m in messages) == 3, (ro.how, messages)
    (logged,) = [m for m in messages if m.startswith("last-known-good")]  # once, at start; never per load
    assert logged.startswith(f"last-known-good off (store {ro.path / 'm2fp'}") and \
        logged.endswith(listing["last_known_good"][5:]), ro.how  # the log names the path, the status does not
    assert not (ro.path / "m2fp" / lkg.LKG).exists()


async def test_with_a_state_dir_last_known_good_is_recorded_there(aiohttp_client, mount_point, monkeypatch,
                                                                  demo_root, tmp_path):
    ro = make_read_only(mount_point, monkeypatch, fill_with(demo_root, ("v1.2",)))
    state = tmp_path / "state"
    client = await aiohttp_client(make_app(ServerConfig(bundles=ro.path, runtime=RegistryOptions(state_dir=state))))
    r = await client.post("/api/latest/parse?visualization=0", data=png_bytes(64, 48), headers=PNG)
    assert r.status == 200, await r.text()
    assert (await (await client.get("/api/versions")).json())["last_known_good"] == "on"
    recorded = lkg.load(state)
    assert recorded is not None and recorded.versions == {"v1.2": identity_of(ro.path / "m2fp" / "v1.2")}
    assert recorded.aliases.get("latest") == "v1.2"
    assert not (ro.path / "m2fp" / lkg.LKG).exists()


# ------------------------------------------------------------------------------ real processes
async def test_m2fp_serve_on_an_empty_read_only_root_waits_for_its_first_version(mount_point, demo_root,
                                                                               tmp_path):
    needs_mount(mount_point)
    src, ro, _ = mount_point
    server = ServerProcess(ro, tmp_path / "server.log", "--idle-ttl", "0")
    await asyncio.to_thread(server.start, 90.0, "/healthz")
    try:
        status, body = http_json(server.url + "/readyz")
        assert status == 503 and body["detail"] == "no versions yet", body
        assert body["last_known_good"] == off_reason("root", ro)
        status, listing = http_json(server.url + "/api/versions")
        assert status == 200 and listing["versions"] == [], listing
        # another machine publishes into the (for it writable) volume: m2fp/ appears, then the version
        staging = src / "m2fp" / ".incoming-v1.2"
        await asyncio.to_thread(shutil.copytree, demo_root / "m2fp" / "v1.2", staging)
        os.rename(staging, src / "m2fp" / "v1.2")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and http_json(server.url + "/readyz")[0] != 200:
            await asyncio.sleep(0.25)
        status, body = http_json(server.url + "/readyz")
        assert status == 200 and body["versions"] == ["v1.2"], (body, server.log_tail())
    finally:
        code = server.stop()
    log = server.log_path.read_text(errors="replace")
    assert code == 0 and "Traceback" not in log and "Read-only file system" not in log, log[-3000:]
    assert log.count(OFF) == 1, log[-3000:]


async def test_m2fp_serve_on_a_read_only_store_with_and_without_a_state_dir(mount_point, demo_root, tmp_path):
    needs_mount(mount_point)
    src, ro, _ = mount_point
    copy_root(demo_root, src, versions=("v1.0", "v1.1", "v1.2"))
    state = tmp_path / "state"
    for args, expect in (((), off_reason("store", ro / "m2fp")), (("--state-dir", str(state)), "on")):
        log_path = tmp_path / f"server{len(args)}.log"
        server = ServerProcess(ro, log_path, "--idle-ttl", "0", *args)
        await asyncio.to_thread(server.start)
        try:
            for version in ("latest", "stable", "v1.1"):
                req = urllib.request.Request(f"{server.url}/api/{version}/parse?visualization=0",
                                             data=png_bytes(64, 48), headers=PNG)
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert r.status == 200
            status, listing = http_json(server.url + "/api/versions")
            assert listing["last_known_good"] == expect, listing
            assert {v["version"] for v in listing["versions"] if v["state"] == "ready"} == {"v1.0", "v1.1", "v1.2"}
        finally:
            assert server.stop() == 0, server.log_tail()
        log = log_path.read_text(errors="replace")
        assert "Traceback" not in log and "cannot record" not in log, log[-3000:]
        assert log.count(OFF) == (0 if args else 1), log[-3000:]
    recorded = lkg.load(state)
    assert recorded is not None and set(recorded.versions) == {"v1.0", "v1.1", "v1.2"}
    assert recorded.aliases == {"latest": "v1.2", "stable": "v1.0"}
    assert not (src / "m2fp" / lkg.LKG).exists()
