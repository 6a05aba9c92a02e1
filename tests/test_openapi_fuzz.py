"""The OpenAPI document describes exactly what the server does: schemathesis against a real ``m2fp-serve``.

One server over a copy of the tiny demo root, with a routes file and both tokens set. Time-bounded
``st run`` passes over ``/api/openapi.json`` with ``--checks all`` and every phase (examples, coverage,
fuzzing, stateful):

1. with the admin and distribution bearer tokens (schemathesis' auth config, per security scheme) —
   its ``ignored_auth`` and missing-header checks also send those routes no or wrong credentials —
   twice: with the pinned seed (the same cases every run) and with a fresh seed (new cases every run;
   the seed is logged and named in a failure: ``M2FP_FUZZ_SEED=<seed>`` replays it);
2. without any credentials, on the admin and distribution routes only (every answer a documented 401).

Parse bodies are real images (``tests/openapi_fuzz_hooks.py``). Zero failures, no baseline file.

One documented exception: schemathesis' ``positive_data_acceptance`` check also accepts 415 on the
operations that take an image. Their schema says "non-empty bytes" (``format: binary``, ``minLength:
1``), but "bytes that decode as an image" is not something JSON Schema can state, so a schema-valid
body may be bytes that are no image at all (the coverage phase sends such strings), which the server
rightly refuses with 415 ``unsupported_media``. Likewise ``score`` (``/api/{version}/score``) also accepts 400
and 422: its ``label`` must be a PNG of the image's size holding the version's class ids, which a schema cannot
tie to the other part (the hook draws 8-bit label PNGs of their own size: mostly 422 ``label_mismatch``; the
coverage phase's arbitrary strings are 400 ``bad_label``).
"""

from __future__ import annotations

import logging
import os
import random
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
SEED = 20261129  # the pinned seed
FRESH_SEED_ENV = "M2FP_FUZZ_SEED"  # replays a fresh-seed run: M2FP_FUZZ_SEED=<seed printed by the failure>
ADMIN_TOKEN, DISTRIBUTION_TOKEN = "fuzz-admin-token", "fuzz-distribution-token"
ROUTES = '[weights]\n"v1.0" = 50\n"v1.2" = 50\n\n[aliases]\ncanary = "v1.2"\n'
#: the access log's path and status of a request to an admin or distribution route
ACCESS_LINE = re.compile(r"m2fpkit\.access: \S+ [A-Z]+ (/admin/\S*|/bundles\S*) (\d{3}) ")
#: the operations that take an image, where bytes that are not one are a schema-valid 415 (module docstring)
IMAGE_OPERATIONS = ("parse", "compare", "score", "oipInfer", "oipInferVersioned")
#: statuses a schema-valid request may also get, per operation, beyond 415 (module docstring)
ALSO_ACCEPTED = {"score": ["400", "422"]}
POSITIVE_STATUSES = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis' defaults
IMAGE_OPERATIONS_ACCEPT_415 = "".join(
    f'[[operations]]\ninclude-operation-id = "{op}"\n'
    f"checks.positive_data_acceptance.expected-statuses = {[*POSITIVE_STATUSES, '415', *ALSO_ACCEPTED.get(op, [])]!r}\n"
    for op in IMAGE_OPERATIONS).replace("'", '"')


def fresh_seed() -> int:
    """A new seed every run unless ``M2FP_FUZZ_SEED`` names one (to replay a failure)."""
    given = os.environ.get(FRESH_SEED_ENV)
    return int(given) if given else random.SystemRandom().randrange(2**31)


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


def schemathesis_run(server: ServerProcess, work: Path, name: str, config: str, *args: str, seed: int,
                     max_time: int, timeout: float) -> str:
    """``st run`` over the served document; returns its output (asserted free of failures and errors)."""
    cfg = work / f"{name}.toml"
    cfg.write_text(config + IMAGE_OPERATIONS_ACCEPT_415)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "openapi_fuzz_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    cmd = [str(ST), "--no-color", "--config-file", str(cfg), "run", f"{server.url}/api/openapi.json",
           "--checks", "all", "--seed", str(seed), "--max-examples", "25", "--workers", "1",
           "--max-time", str(max_time), "--request-timeout", "20", *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    out, rc = proc.stdout + proc.stderr, proc.returncode
    (work / f"{name}.txt").write_text(out)
    summary = re.search(r"^Test cases:\s*\n\s*(.+)$", out, re.MULTILINE)
    log.info("schemathesis %s, seed %d: %s", name, seed, summary[1] if summary else "(no summary)")
    failed = rc != 0 or not summary or "fail" in summary[1] or "error" in summary[1]
    assert not failed, (f"schemathesis {name} with seed {seed} (replay: {FRESH_SEED_ENV}={seed}; exit {rc}):\n"
                        f"{out[-12000:]}\nserver log:\n{server.log_tail(30)}")
    return out


def test_openapi_matches_the_server(fuzz_server) -> None:
    server, work = fuzz_server
    tokens = (f'[auth.openapi.bearerAuth]\nbearer = "{ADMIN_TOKEN}"\n'
              f'[auth.openapi.distributionAuth]\nbearer = "{DISTRIBUTION_TOKEN}"\n')
    seed = fresh_seed()
    log.info("schemathesis fresh seed: %d (replay with %s=%d)", seed, FRESH_SEED_ENV, seed)
    for name, run_seed in (("with_tokens_pinned_seed", SEED), ("with_tokens_fresh_seed", seed)):
        authed = schemathesis_run(server, work, name, tokens, seed=run_seed, max_time=15, timeout=90)
        assert re.search(r"Operations:\s+(\d+) selected / \1 total", authed), "every documented operation is fuzzed"
    log_before = server.log_path.stat().st_size
    anonymous = schemathesis_run(server, work, "without_tokens", "", "--include-tag", "admin",
                                 "--include-tag", "distribution", seed=SEED, max_time=8, timeout=90)
    assert "6 selected" in anonymous and "Tested: 6" in anonymous, anonymous[-3000:]
    # without credentials nothing on those routes succeeds (a request can fail earlier than the token check,
    # e.g. 400 for a malformed X-Request-ID or 405 for another method, so count successes, not 401s)
    with open(server.log_path, "rb") as f:
        f.seek(log_before)
        answered = ACCESS_LINE.findall(f.read().decode(errors="replace"))
    assert {path for path, _ in answered} >= {"/admin/routes", "/bundles"}, answered[:20]
    assert not [(path, status) for path, status in answered if status.startswith("2")], answered
    assert server.proc is not None and server.proc.poll() is None, "the server died under the fuzzer"
