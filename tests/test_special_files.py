"""Files of the store and the state directory that are not regular files, and reads on the event loop.

Before (``0aa94e1``): ``aliases.json`` replaced by a FIFO froze the whole server until something wrote to
the pipe — it was opened with a plain ``open()`` on the event loop; a FIFO as the plan cache, the
last-known-good record or the routes file did the same (at start: the server never listened). Now every
such file is opened by ``runtime.bundle.regular`` (``O_NONBLOCK``, ``fstat`` → a regular file or a clear
refusal, a size cap) and read off the event loop.

A :class:`FifoGuard` keeps a broken build from hanging the suite: after its grace period it opens each
FIFO for writing whenever a reader is stuck on it (the read then sees an empty file) and counts the
rescues; a passing test needed none.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from m2fpkit.runtime import lkg
from m2fpkit.runtime.bundle import jsonfile, manifest, reader, regular, signature
from m2fpkit.runtime.bundle.store import ALIASES, BundleStore
from m2fpkit.runtime.errors import BundleError, MalformedFile
from m2fpkit.runtime.registry import RegistryOptions
from m2fpkit.runtime.routes_file import RoutesError, load_routes
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from reference.bundles import clone_bundle

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import png_bytes  # noqa: E402

#: a read stuck on a FIFO longer than this is rescued (and the test fails)
GRACE = 8.0


class FifoGuard:
    """Rescue readers stuck on the given FIFOs after ``grace`` seconds (see the module docstring)."""

    def __init__(self, fifos: list[Path], grace: float = GRACE) -> None:
        self.fifos, self.grace = fifos, grace
        self.rescues = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self._stop.wait(self.grace):
            return
        while not self._stop.wait(0.05):
            for fifo in self.fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:  # ENXIO: nobody is reading it
                    if exc.errno not in (errno.ENXIO, errno.ENOENT):
                        raise
                    continue
                os.close(fd)
                self.rescues += 1

    def __enter__(self) -> FifoGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.mkfifo(path)
    return path


def timed(fn, *args, **kwargs):
    """(result or exception, seconds) of a call guarded against FIFOs."""
    t0 = time.monotonic()
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:  # the caller inspects it
        out = exc
    return out, time.monotonic() - t0


# ----------------------------------------------------------------------------------- the one rule
def test_every_kind_of_special_file_is_refused_at_once_with_its_name(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    sock_path = tmp_path / "sock.json"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    cases = {fifo(tmp_path / "fifo.json"): "FIFO", Path("/dev/zero"): "character device",
             tmp_path: "directory", sock_path: "socket"}
    try:
        with FifoGuard([tmp_path / "fifo.json"]) as guard:
            for path, kind in cases.items():
                with pytest.raises(MalformedFile, match=f"{kind}.*not a regular file"):
                    regular.read_regular(path, max_bytes=1024)
            with pytest.raises(MalformedFile, match="symbolic link"):
                regular.read_regular(link, max_bytes=1024, follow_links=False)
            assert regular.read_regular(link, max_bytes=1024) == b"{}"  # an operator's link is followed by default
        assert guard.rescues == 0
    finally:
        sock.close()


def test_a_file_over_its_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB by size, nothing on disk
    out, seconds = timed(regular.read_regular, big, "big.json", max_bytes=1 << 20)
    assert isinstance(out, MalformedFile) and "68719476736 bytes, more than the 1048576-byte limit" in str(out)
    assert seconds < 1


@pytest.mark.parametrize("name", ["aliases", "lkg", "routes.toml", "routes.json", "manifest", "signature"])
def test_each_reader_refuses_a_fifo_at_once(tmp_path: Path, name: str) -> None:
    store = BundleStore(tmp_path)
    bundle = store.dir / "v1.0"
    bundle.mkdir(parents=True)
    paths = {"aliases": store.dir / ALIASES, "lkg": tmp_path / lkg.LKG, "routes.toml": tmp_path / "routes.toml",
             "routes.json": tmp_path / "routes.json", "manifest": bundle / manifest.MANIFEST,
             "signature": bundle / signature.SIGNATURE}
    readers = {"aliases": store.read_aliases, "lkg": lambda: lkg.load(tmp_path),
               "routes.toml": lambda: load_routes(paths["routes.toml"]),
               "routes.json": lambda: load_routes(paths["routes.json"]),
               "manifest": lambda: manifest.read(bundle), "signature": lambda: signature.read_signature_bytes(bundle)}
    with FifoGuard([fifo(paths[name])]) as guard:
        out, seconds = timed(readers[name])
    assert guard.rescues == 0, f"the {name} reader blocked on a FIFO"
    assert seconds < 1
    if name == "aliases":
        assert out == {}
    elif name == "lkg":
        assert out is None
    elif name.startswith("routes"):
        assert isinstance(out, RoutesError) and "FIFO" in str(out) and paths[name].name in str(out), out
    else:
        assert isinstance(out, BundleError) and "FIFO" in str(out), out


def test_a_fifo_inside_a_bundle_fails_that_bundle_at_once(fast_multi_src: Path, tmp_path: Path) -> None:
    """A listed file (the graph) or ``config.json`` replaced by a FIFO: the verification refuses it, promptly."""
    bundle = clone_bundle(fast_multi_src, tmp_path, "v1.0")
    config = fifo(bundle / "config.json")
    with FifoGuard([config]) as guard:
        out, seconds = timed(reader.inspect, bundle)
    assert guard.rescues == 0 and seconds < 5
    assert isinstance(out, BundleError) and "config.json" in str(out) and "regular file" in str(out), out


# ----------------------------------------------------------------------------------- the server
async def _prompt(client, path: str, limit: float = 2.0, headers: dict[str, str] | None = None):
    t0 = time.monotonic()
    r = await client.get(path, headers=headers)
    took = time.monotonic() - t0
    assert took < limit, f"{path} took {took:.1f} s"
    return r


async def test_a_fifo_as_aliases_json_is_refused_and_the_server_answers(aiohttp_client, fast_multi_src, tmp_path,
                                                                         caplog):
    caplog.set_level(logging.WARNING, logger="m2fpkit")
    root = tmp_path / "bundles"
    clone_bundle(fast_multi_src, root, "v1.0")
    pipe = fifo(root / "m2fp" / ALIASES)
    with FifoGuard([pipe]) as guard:
        client = await aiohttp_client(make_app(ServerConfig(bundles=root, runtime=RegistryOptions(watch=False))))
        assert (await _prompt(client, "/healthz")).status == 200
        r = await _prompt(client, "/api/versions")
        assert r.status == 200 and (await r.json())["aliases"] == {}
        r = await client.post("/api/latest/parse", data=png_bytes(96, 80), headers={"Content-Type": "image/png"})
        assert r.status == 200, await r.text()
    assert guard.rescues == 0, "a read blocked on the FIFO"
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any("aliases.json ignored" in m and "FIFO" in m and "not a regular file" in m for m in warnings), warnings


async def test_a_fifo_as_the_last_known_good_record_is_ignored_at_start(aiohttp_client, fast_multi_src, tmp_path,
                                                                         caplog):
    caplog.set_level(logging.WARNING, logger="m2fpkit")
    root, state = tmp_path / "bundles", tmp_path / "state"
    clone_bundle(fast_multi_src, root, "v1.0")
    pipe = fifo(state / lkg.LKG)
    with FifoGuard([pipe]) as guard:
        client = await aiohttp_client(make_app(ServerConfig(bundles=root, runtime=RegistryOptions(
            watch=False, state_dir=state))))
        assert (await _prompt(client, "/healthz")).status == 200
        assert (await _prompt(client, "/readyz")).status == 200
    assert guard.rescues == 0, "the start blocked on the FIFO"
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any(".lkg.json ignored" in m and "FIFO" in m for m in warnings), warnings


async def test_a_fifo_as_the_routes_file_is_refused_and_the_server_answers(aiohttp_client, fast_multi_src, tmp_path):
    root, routes = tmp_path / "bundles", tmp_path / "etc" / "routes.toml"
    clone_bundle(fast_multi_src, root, "v1.0")
    routes.parent.mkdir()
    routes.write_text('[weights]\n"v1.0" = 1\n')
    auth = {"Authorization": "Bearer admin-secret"}
    client = await aiohttp_client(make_app(ServerConfig(bundles=root, routes_file=routes, admin_token="admin-secret",
                                                        runtime=RegistryOptions(watch=False))))
    with FifoGuard([fifo(routes)]) as guard:
        reload = asyncio.ensure_future(client.post("/admin/routes/reload", headers=auth))
        assert (await _prompt(client, "/healthz")).status == 200
        r = await reload
        body = await r.json()
        assert r.status == 422 and "routes.toml" in body["detail"] and "FIFO" in body["detail"], body
        r = await _prompt(client, "/admin/routes", 5.0, auth)
        assert (await r.json())["routes"]["weights"] == {"v1.0": 1.0}  # the routes in force stay
    assert guard.rescues == 0, "the reload blocked on the FIFO"


# ----------------------------------------------------------------------------- off the event loop
class LoopReads:
    """Records files under ``dirs`` opened for reading by a thread that runs an event loop (an audit hook:
    it sees ``open()`` and ``os.open`` alike, whatever module calls them)."""

    active: LoopReads | None = None
    installed = False

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = [str(d.resolve()) + os.sep for d in dirs]
        self.seen: list[str] = []

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        me = cls.active
        if me is None or event != "open" or asyncio._get_running_loop() is None:
            return
        path, mode, flags = args
        if not isinstance(path, (str, bytes, os.PathLike)):
            return
        reading = ("r" in mode and "+" not in mode) if isinstance(mode, str) else (flags & os.O_ACCMODE) == os.O_RDONLY
        name = os.fsdecode(path)
        if reading and any(os.path.abspath(name).startswith(d) for d in me.dirs):
            me.seen.append(name)

    def __enter__(self) -> list[str]:
        if not LoopReads.installed:
            sys.addaudithook(LoopReads._hook)
            LoopReads.installed = True
        LoopReads.active = self
        return self.seen

    def __exit__(self, *exc: object) -> None:
        LoopReads.active = None


@contextlib.contextmanager
def no_loop_reads(*dirs: Path) -> Iterator[list[str]]:
    with LoopReads(list(dirs)) as seen:
        yield seen


async def test_no_store_or_state_file_is_read_on_the_event_loop(aiohttp_client, fast_multi_src, tmp_path):
    root, state, etc = tmp_path / "bundles", tmp_path / "state", tmp_path / "etc"
    for version in ("v1.0", "v1.2"):
        clone_bundle(fast_multi_src, root, version)
    BundleStore(root).set_alias("stable", "v1.0")
    etc.mkdir()
    routes = etc / "routes.toml"
    routes.write_text('[weights]\n"v1.2" = 1\n[shadow]\nversion = "v1.0"\nfraction = 0.0\n')
    config = ServerConfig(bundles=root, routes_file=routes, admin_token="a", distribution_token="d",
                          runtime=RegistryOptions(state_dir=state, watch=False))
    first = await aiohttp_client(make_app(config))  # records the last-known-good state
    assert (await first.get("/readyz")).status == 200
    await first.close()
    assert (state / lkg.LKG).is_file()

    with no_loop_reads(root, state, etc) as seen:
        client = await aiohttp_client(make_app(config))  # reads the record, the routes file, aliases.json
        for path in ("/healthz", "/readyz", "/api/versions", "/api/stable/meta", "/api/v1.2/meta"):
            assert (await client.get(path)).status == 200, path
        r = await client.post("/api/stable/parse", data=png_bytes(96, 80), headers={"Content-Type": "image/png"})
        assert r.status == 200, await r.text()
        r = await client.post("/admin/routes/reload", headers={"Authorization": "Bearer a"})
        assert r.status == 200, await r.text()
        r = await client.get("/bundles", headers={"Authorization": "Bearer d"})
        assert r.status == 200, await r.text()
        r = await client.get("/bundles/v1.0.tar", headers={"Authorization": "Bearer d"})
        assert r.status == 200 and len(await r.read()) > 0
        await client.close()
    assert seen == [], f"read on the event loop: {sorted(set(seen))}"


def test_the_plain_json_reader_uses_the_one_rule(tmp_path: Path) -> None:
    """``jsonfile.read`` goes through ``regular.read_regular``: a FIFO is a MalformedFile naming it."""
    pipe = fifo(tmp_path / "x.json")
    with FifoGuard([pipe]) as guard:
        out, _ = timed(jsonfile.read, pipe, "x.json")
    assert guard.rescues == 0
    assert isinstance(out, MalformedFile) and str(out).startswith("x.json: a FIFO"), out
