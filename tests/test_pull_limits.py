"""``m2fp-bundle pull`` against hostile or broken servers: small local HTTP servers on 127.0.0.1.

Each test reproduces an audit finding: a cross-origin redirect must not carry the bearer token away,
an archive of another version must not be installed, the download is capped by the announced size
and by a byte limit, a full disk leaves no part file, and an overall deadline stops a server that
drips one byte per second. The archives are synthetic (a manifest and two small files): the limits
act before, or regardless of, the bundle's own verification.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from m2fpkit.runtime.bundle.archive import MAX_ARCHIVE_BYTES, MAX_TOTAL_BYTES
from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.delivery import pull as pull_mod
from m2fpkit.runtime.delivery.cli import main
from m2fpkit.runtime.delivery.install import install
from m2fpkit.runtime.delivery.pull import pull
from m2fpkit.runtime.errors import ArchiveError, TransferError, VerificationFailed

TOKEN = "pull-limits-secret-token"


def archive_of(version: str) -> bytes:
    """A small, consistent bundle-shaped tar of ``version`` (it unpacks; its config does not verify)."""
    files = {"config.json": b'{"version": "%s"}\n' % version.encode(), "model.onnx.data": os.urandom(3000)}
    manifest = json.dumps({"algorithm": "sha256", "files": {
        rel: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in files.items()}}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel, data in [("manifest.json", manifest), *sorted(files.items())]:
            info = tarfile.TarInfo(f"{version}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


# ------------------------------------------------------------------------------------- servers
class _Handler(http.server.BaseHTTPRequestHandler):
    """Records every request, then lets the test's ``app(handler)`` answer (HTTP/1.0: close ends a body)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.seen.append((self.path, dict(self.headers)))  # type: ignore[attr-defined]
        try:
            self.server.app(self)  # type: ignore[attr-defined]
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: that is what several tests expect

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class Server:
    def __init__(self, app: Callable[[_Handler], None]) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.app, self.httpd.seen = app, []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def seen(self) -> list[tuple[str, dict[str, str]]]:
        return self.httpd.seen  # type: ignore[attr-defined]

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[_Handler], None]], Server]]:
    servers: list[Server] = []

    def start(app: Callable[[_Handler], None]) -> Server:
        servers.append(Server(app))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def tar_answer(data: bytes) -> Callable[[_Handler], None]:
    return lambda h: h.send(200, data, {"Content-Type": "application/x-tar", "Content-Length": str(len(data))})


def part_files(root: Path) -> list[str]:
    d = root / "m2fp" / ".downloads"
    return sorted(p.name for p in d.iterdir() if ".part" in p.name) if d.is_dir() else []


# ------------------------------------------------------------------------------- 5. redirects
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_refused_and_the_token_never_leaves(serve, tmp_path, code):
    other = serve(tar_answer(archive_of("v1.0")))  # 127.0.0.1, another port: another origin
    first = serve(lambda h: h.send(code, b"", {"Location": f"{other.url}/steal/v1.0.tar", "Content-Length": "0"}))
    root = tmp_path / "bundles"
    with pytest.raises(TransferError, match=r"redirects to http://127\.0\.0\.1:\d+, another origin; refused"):
        pull(first.url, "v1.0", root, token=TOKEN)
    assert first.seen and first.seen[0][1].get("Authorization") == f"Bearer {TOKEN}"
    assert other.seen == []  # never contacted, so it never saw the token
    assert BundleStore(root).versions() == [] and part_files(root) == []


def test_a_redirect_within_the_origin_is_followed_with_the_token(serve, tmp_path):
    data = archive_of("v1.0")

    def app(h: _Handler) -> None:
        if h.path.startswith("/bundles/"):
            h.send(302, b"", {"Location": "/mirror/v1.0.tar", "Content-Length": "0"})
        else:
            tar_answer(data)(h)

    server = serve(app)
    with pytest.raises(VerificationFailed, match="config"):  # downloaded and unpacked; the synthetic config fails
        pull(server.url, "v1.0", tmp_path / "bundles", token=TOKEN)
    assert [p for p, _ in server.seen] == ["/bundles/v1.0.tar", "/mirror/v1.0.tar"]
    assert server.seen[1][1].get("Authorization") == f"Bearer {TOKEN}"


# -------------------------------------------------------------------------- 4. another version
def test_an_archive_of_another_version_is_refused_before_installing(serve, tmp_path):
    server = serve(tar_answer(archive_of("v1.0")))  # asked for v1.2, serves v1.0
    root = tmp_path / "bundles"
    with pytest.raises(ArchiveError, match="holds version v1.0, not the requested v1.2"):
        pull(server.url, "v1.2", root, token=TOKEN)
    assert BundleStore(root).versions() == [] and part_files(root) == []
    # with --force an installed v1.0 is not touched either
    installed = root / "m2fp" / "v1.0"
    installed.mkdir(parents=True)
    (installed / "marker").write_text("the installed v1.0")
    result = CliRunner().invoke(main, ["pull", server.url, "v1.2", "--bundles", str(root), "--token", TOKEN,
                                       "--force"])
    assert result.exit_code == 1 and "not the requested v1.2" in result.stderr
    assert result.stderr.count("\n") == 1
    assert (installed / "marker").read_text() == "the installed v1.0" and sorted(os.listdir(installed)) == ["marker"]
    assert BundleStore(root).versions() == ["v1.0"] and part_files(root) == []


def test_install_expect_version_is_the_one_rule(tmp_path):
    archive = tmp_path / "m2fp-v1.2.tar"  # the file name says v1.2; the content is v1.0
    archive.write_bytes(archive_of("v1.0"))
    with pytest.raises(ArchiveError, match="holds version v1.0, not the requested v1.2"):
        install(archive, tmp_path / "bundles", expect_version="v1.2", force=True)
    assert not (tmp_path / "bundles" / "m2fp").exists() or BundleStore(tmp_path / "bundles").versions() == []


# ---------------------------------------------------------------------------------- 6. size caps
def test_an_announced_size_over_the_cap_is_refused_before_any_byte(serve, tmp_path):
    server = serve(lambda h: h.send(200, b"x" * 100, {"Content-Length": str(50 << 20)}))
    root = tmp_path / "bundles"
    with pytest.raises(TransferError, match=r"announces 52428800 bytes, more than the 1048576-byte limit"):
        pull(server.url, "v1.0", root, token=TOKEN, max_bytes=1 << 20)
    assert part_files(root) == []


def test_a_body_without_length_is_cut_at_the_cap_and_deleted(serve, tmp_path):
    server = serve(lambda h: h.send(200, b"y" * 300_000))  # no Content-Length: the body ends when it closes
    root = tmp_path / "bundles"
    with pytest.raises(TransferError, match=r"runs past byte 100000, the 100000-byte limit"):
        pull(server.url, "v1.0", root, token=TOKEN, max_bytes=100_000)
    assert part_files(root) == []


def test_a_body_longer_than_the_announced_range_is_refused_and_deleted(serve, tmp_path):
    """Resuming at byte 100 of 200, the server's 206 says ``bytes 100-199/200`` and then sends 5000 bytes."""
    server = serve(lambda h: h.send(206, b"z" * 5000, {"Content-Range": "bytes 100-199/200", "ETag": '"e"'}))
    root = tmp_path / "bundles"
    downloads = root / "m2fp" / ".downloads"
    downloads.mkdir(parents=True)
    (downloads / "m2fp-v1.0.tar.part").write_bytes(b"a" * 100)
    (downloads / "m2fp-v1.0.tar.part.json").write_text(json.dumps(
        {"url": f"{server.url}/bundles/v1.0.tar", "etag": '"e"', "total": 200}))
    with pytest.raises(TransferError, match=r"runs past byte 200, the range the server announced"):
        pull(server.url, "v1.0", root, token=TOKEN)
    assert server.seen[0][1].get("Range") == "bytes=100-"
    assert part_files(root) == []


def test_the_default_cap_is_the_largest_archive_a_bundle_packs_to():
    assert MAX_TOTAL_BYTES < MAX_ARCHIVE_BYTES < MAX_TOTAL_BYTES + (1 << 30)
    assert pull.__kwdefaults__["max_bytes"] == MAX_ARCHIVE_BYTES


def test_a_full_disk_removes_the_part_file(serve, tmp_path, monkeypatch):
    data = os.urandom(3 << 20)
    server = serve(tar_answer(data))
    real, written = pull_mod.write_all, {"n": 0}

    def full_disk(fd: int, chunk) -> None:
        if written["n"] + len(chunk) > 1_500_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written["n"] += len(chunk)
        real(fd, chunk)

    monkeypatch.setattr(pull_mod, "write_all", full_disk)
    root = tmp_path / "bundles"
    with pytest.raises(OSError) as info:
        pull(server.url, "v1.0", root, token=TOKEN)
    assert info.value.errno == errno.ENOSPC and written["n"] > 0
    assert part_files(root) == []  # neither the part nor its .part.json
    result = CliRunner().invoke(main, ["pull", server.url, "v1.0", "--bundles", str(root), "--token", TOKEN])
    assert result.exit_code == 1 and "No space left on device" in result.stderr and result.stderr.count("\n") == 1
    assert part_files(root) == []


# ------------------------------------------------------------------------------------ deadline
def dripping(server_stop: Callable[[], threading.Event], size: int = 1000, every: float = 1.0):
    """Announces ``size`` bytes, then sends one byte per ``every`` seconds (each well inside the per-read timeout)."""
    def app(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(size))
        h.end_headers()
        h.wfile.flush()
        for _ in range(size):
            if server_stop().wait(every):
                return
            h.wfile.write(b"d")
            h.wfile.flush()
    return app


def test_a_server_dripping_one_byte_per_second_ends_at_the_deadline(serve, tmp_path):
    holder: list[Server] = []
    holder.append(serve(dripping(lambda: holder[0].stop)))
    root = tmp_path / "bundles"
    start = time.monotonic()
    with pytest.raises(TransferError, match=r"not finished within the 2.5-second deadline .*run the same command "
                                            r"again to resume"):
        pull(holder[0].url, "v1.0", root, token=TOKEN, timeout=5, deadline=2.5)
    took = time.monotonic() - start
    assert 2.4 < took < 4.5, took
    assert part_files(root) == ["m2fp-v1.0.tar.part", "m2fp-v1.0.tar.part.json"]  # kept: it may be resumed


def test_the_deadline_option_of_the_command(serve, tmp_path):
    holder: list[Server] = []
    holder.append(serve(dripping(lambda: holder[0].stop)))
    start = time.monotonic()
    result = CliRunner().invoke(main, ["pull", holder[0].url, "v1.0", "--bundles", str(tmp_path / "b"), "--token",
                                       TOKEN, "--deadline", "1.5", "--timeout", "5"])
    assert result.exit_code == 1 and "1.5-second deadline" in result.stderr and result.stderr.count("\n") == 1
    assert time.monotonic() - start < 4
    result = CliRunner().invoke(main, ["pull", holder[0].url, "v1.0", "--deadline", "0"])
    assert result.exit_code == 2 and "--deadline" in result.output


def test_the_per_read_timeout_still_applies(serve, tmp_path):
    holder: list[Server] = []
    holder.append(serve(dripping(lambda: holder[0].stop, every=30)))  # headers, then silence
    start = time.monotonic()
    with pytest.raises(TransferError, match="interrupted after 0 of 1000 bytes .*timed out"):
        pull(holder[0].url, "v1.0", tmp_path / "bundles", token=TOKEN, timeout=1, deadline=60)
    assert time.monotonic() - start < 4
