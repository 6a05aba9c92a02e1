"""The README's first two commands: ``make serve`` brings the server up with the demo versions."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from server_fixtures import copy_root, free_port, http_json, png_bytes

pytest_plugins = ["server_fixtures"]
REPO = Path(__file__).resolve().parent.parent
DEMO = {"v1.0", "v1.1", "v1.2", "v2.0-beta"}


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README has no bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_first_two_commands_are_serve_and_test():
    assert readme_commands()[:2] == ["make serve", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_make_serve_runs_the_server_with_the_demo_versions(demo_root: Path, tmp_path: Path):
    # the demo versions are already exported into this bundle root, as after a first `make serve`;
    # the command still runs its export step (`m2fp-export --all`, which finds nothing to do) first
    bundles = copy_root(demo_root, tmp_path / "bundles")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["make", "-s", "serve", f"PORT={port}", f"BUNDLES={bundles}"], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, status = time.monotonic() + 300, 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, ready = http_json(f"http://127.0.0.1:{port}/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert status == 200, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
        _, body = http_json(f"http://127.0.0.1:{port}/api/versions")
        assert DEMO <= {v["version"] for v in body["versions"]} and body["latest"] == "v1.2"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/latest/parse", data=png_bytes(),
                                     headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and r.headers["X-Model-Version"] == "v1.2"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert b"<select" in r.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
