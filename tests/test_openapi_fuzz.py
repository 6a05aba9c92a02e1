"""The OpenAPI document describes exactly what the server does: schemathesis against a real ``m2fp-serve``.

One server over a copy of the tiny demo root, with a routes file and both tokens set. Two seeded,
time-bounded ``st run`` passes over ``/api/openapi.json`` with ``--checks all`` and every phase
(examples, coverage, fuzzing, stateful):

1. with the admin and distribution bearer tokens (schemathesis' auth config, per security scheme) —
   its ``ignored_auth`` and missing-header checks also send those routes no or wrong credentials;
2. without any credentials, on the admin and distribution routes only (every answer a documented 401).

Parse bodies are real images (``tests/openapi_fuzz_hooks.py``). Zero failures, no baseline file.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import ServerProcess, copy_root  # noqa: E402

log = logging.getLogger(__name__)

ST = Path(sys.executable).with_name("st")
TESTS = Path(__file__).resolve().parent
SEED = 20261129
ADMIN_TOKEN, DISTRIBUTION_TOKEN = "fuzz-admin-token", "fuzz-distribution-token"
ROUTES = '[weights]\n"v1.0" = 50\n"v1.2" = 50\n\n[aliases]\ncanary = "v1.2"\n'


@pytest.fixture(scope="module")
def fuzz_server(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("openapi_fuzz")
    root = copy_root(demo_root, work / "bundles")
    routes = work / "routes.toml"
    routes.write_text(ROUTES)
    server = ServerProcess(root, work / "server.log", "--routes", str(routes), "--admin-token", ADMIN_TOKEN,
                           "--distribution-token", DISTRIBUTION_TOKEN, "--max-queue", "64")
    server.start()
    try:
        yield server, work
    finally:
        server.stop()


def schemathesis_run(server: ServerProcess, work: Path, name: str, config: str, *args: str,
                     max_time: int, timeout: float) -> str:
    """``st run`` over the served document; returns its output (asserted free of failures and errors)."""
    cfg = work / f"{name}.toml"
    cfg.write_text(config)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "openapi_fuzz_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    cmd = [str(ST), "--no-color", "--config-file", str(cfg), "run", f"{server.url}/api/openapi.json",
           "--checks", "all", "--seed", str(SEED), "--max-examples", "25", "--workers", "1",
           "--max-time", str(max_time), "--request-timeout", "20", *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    out, rc = proc.stdout + proc.stderr, proc.returncode
    (work / f"{name}.txt").write_text(out)
    summary = re.search(r"^Test cases:\s*\n\s*(.+)$", out, re.MULTILINE)
    log.info("schemathesis %s: %s", name, summary[1] if summary else "(no summary)")
    failed = rc != 0 or not summary or "fail" in summary[1] or "error" in summary[1]
    assert not failed, f"schemathesis {name} (exit {rc}):\n{out[-12000:]}\nserver log:\n{server.log_tail(30)}"
    return out


def test_openapi_matches_the_server(fuzz_server) -> None:
    server, work = fuzz_server
    authed = schemathesis_run(
        server, work, "with_tokens",
        f'[auth.openapi.bearerAuth]\nbearer = "{ADMIN_TOKEN}"\n'
        f'[auth.openapi.distributionAuth]\nbearer = "{DISTRIBUTION_TOKEN}"\n',
        max_time=45, timeout=130)
    assert re.search(r"Operations:\s+(\d+) selected / \1 total", authed), "every documented operation is fuzzed"
    anonymous = schemathesis_run(server, work, "without_tokens", "", "--include-tag", "admin",
                                 "--include-tag", "distribution", max_time=8, timeout=90)
    assert "6 selected" in anonymous and "6 operations returned only 401/403" in anonymous, anonymous[-3000:]
    assert server.proc is not None and server.proc.poll() is None, "the server died under the fuzzer"
