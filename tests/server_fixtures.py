"""Fixtures and helpers of the server tests (a pytest plugin: ``pytest_plugins = ["server_fixtures"]``).

Session fixture (built once, read-only — copy it with :func:`copy_root` before changing anything):

``demo_root``
    A bundle root holding the demo versions of ``versions.toml`` — v1.0 (multi-human, stable),
    v1.1 (single-human, stable), v1.2 (multi-human, recommended, ``latest``) and v2.0-beta
    (experimental, API 2.0 only) — plus their aliases (``latest`` → v1.2, ``stable`` → v1.0), built
    with the library's ``export_version`` (the graph cache traces each architecture once). Setting
    ``M2FP_TEST_DEMO_BUNDLES`` to a root that already holds those versions (e.g. one made by
    ``m2fp-export v1.0 v1.1 v1.2 v2.0-beta --bundles DIR``) reuses it instead; it is never written to.

``latest_only_root``
    The same with v1.2 alone (``stable`` then names a missing version): cheaper to start.

Helpers: image bytes made with OpenCV, a free port, and :class:`ServerProcess` (``m2fp-serve`` in a
subprocess, stopped by its own pid).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

DEMO_VERSIONS = ("v1.0", "v1.1", "v1.2", "v2.0-beta")
DEMO_ALIASES = {"latest": "v1.2", "stable": "v1.0"}
SAMPLES = Path(__file__).resolve().parent.parent / "server" / "static" / "samples"
M2FP_SERVE = Path(sys.executable).with_name("m2fp-serve")


# ------------------------------------------------------------------------------------- bundles
def _has_demo_versions(root: Path) -> bool:
    return all((root / "m2fp" / v / "manifest.json").is_file() for v in DEMO_VERSIONS)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory, _background) -> Path:
    """The demo versions and aliases, built by the session's background builder (``conftest._background``),
    or copied from ``$M2FP_TEST_DEMO_BUNDLES``. Read-only: copy it (``copy_root``) before changing anything."""
    given = os.environ.get("M2FP_TEST_DEMO_BUNDLES")
    if given:
        root = Path(given)
        if not _has_demo_versions(root):
            pytest.fail(f"M2FP_TEST_DEMO_BUNDLES={given} lacks one of {', '.join(DEMO_VERSIONS)}")
        # a private copy all the same: tests must never depend on (or risk) a root they do not own
        return copy_root(root, tmp_path_factory.mktemp("demo_bundles") / "root")
    from reference import background

    return background.step(_background, "demo_bundles")


def copy_root(src: Path, dst: Path, versions: tuple[str, ...] | None = None) -> Path:
    """Copy a bundle root (all versions, or only ``versions``) with its aliases; returns ``dst``."""
    (dst / "m2fp").mkdir(parents=True, exist_ok=True)
    for child in sorted((src / "m2fp").iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if versions is None or child.name in versions:
                shutil.copytree(child, dst / "m2fp" / child.name)
        else:
            shutil.copy2(child, dst / "m2fp" / child.name)
    return dst


@pytest.fixture(scope="session")
def latest_only_root(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only root with v1.2 alone (and the demo aliases): an app over it starts with one load."""
    return copy_root(demo_root, tmp_path_factory.mktemp("latest_only") / "root", versions=("v1.2",))


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the demo root."""
    return copy_root(demo_root, tmp_path / "bundles")


@pytest.fixture
def empty_root(tmp_path: Path) -> Path:
    root = tmp_path / "empty_bundles"
    root.mkdir()
    return root


# -------------------------------------------------------------------------------------- images
def person_image(width: int = 160, height: int = 120, seed: int = 0) -> np.ndarray:
    """A small BGR picture: gradient background and a blob figure (deterministic)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = ((1 - y) * np.array([200, 210, 220]) + y * np.array([90, 110, 130])).astype(np.float32)
    img = np.broadcast_to(img, (height, width, 3)).copy()
    img += rng.normal(0, 3, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    cx, u = width // 2, height / 10
    cv2.circle(img, (cx, int(1.2 * u)), max(3, int(0.8 * u)), (150, 180, 225), -1)
    cv2.rectangle(img, (cx - int(1.2 * u), int(2.2 * u)), (cx + int(1.2 * u), int(5.6 * u)), (40, 90, 220), -1)
    cv2.rectangle(img, (cx - int(u), int(5.6 * u)), (cx + int(u), int(9.6 * u)), (110, 60, 30), -1)
    return img


def encode(img: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok, ext
    return buf.tobytes()


def png_bytes(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    return encode(person_image(width, height, seed), ".png")


def jpeg_bytes(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    return encode(person_image(width, height, seed), ".jpg")


def decode_png_b64(data: str) -> np.ndarray:
    import base64

    raw = base64.b64decode(data, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None, "PNG does not decode"
    return img


# ------------------------------------------------------------------------------------- process
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    """GET ``url``; (status, JSON body) for any status, (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


class ServerProcess:
    """``m2fp-serve`` on 127.0.0.1 in a subprocess; output goes to ``log_path``."""

    def __init__(self, bundles: Path, log_path: Path, *args: str) -> None:
        self.bundles, self.log_path, self.args = bundles, log_path, args
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 90.0, until: str = "/readyz") -> ServerProcess:
        """Start and wait until ``until`` answers 200 (``/healthz`` for a server with nothing to serve yet)."""
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [str(M2FP_SERVE), "--bundles", str(self.bundles), "--host", "127.0.0.1", "--port", str(self.port),
             *self.args], stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"m2fp-serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, _ = http_json(self.url + until, timeout=2)
            if status == 200:
                return self
            time.sleep(0.25)
        raise AssertionError(f"m2fp-serve not ready within {ready_timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait, then SIGKILL (this process only) if it does not exit in time."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self._log:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
