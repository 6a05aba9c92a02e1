"""Every command of the README is run by a test, or listed here as skipped with the reason.

The README's fenced ``bash`` blocks are split into commands (comment lines dropped, a heredoc kept with
its command) and its ``python`` blocks taken whole; :data:`PLAN` maps each to the test that runs it or
to the reason it is skipped (online only, the full-size r101 model, long), and
:func:`test_every_readme_command_is_run_or_skipped_with_a_reason` fails on a command the plan does not
know (or a plan entry that no longer matches anything). The fast ones run here, in temporary
directories, against copies of the tiny demo root: the README's text itself, with only the port (and,
where said, a version name) substituted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import ServerProcess, copy_root, free_port, http_json, png_bytes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent
DEMO = {"v1.0", "v1.1", "v1.2", "v2.0-beta"}
ADMIN_TOKEN = "readme-admin-token"

RUN, SKIP = "run", "skip"
#: (pattern matched at the start of a command or python block, RUN + the test that runs it | SKIP + the reason)
PLAN: list[tuple[str, str, str]] = [
    (r"make serve", RUN, "test_make_serve_runs_the_server_with_the_demo_versions"),
    (r"make test", SKIP, "the whole suite: this suite is what it runs"),
    (r"make shell", RUN, "test_make_shell_puts_the_command_line_tools_on_path"),
    (r"cd server/static/samples", RUN, "test_the_http_examples_answer"),
    (r"curl ", RUN, "test_the_http_examples_answer"),
    (r"m2fp-export --list", RUN, "test_export_list_runs"),
    (r"m2fp-export v1\.2 +#", SKIP, "long (an export: 7-30 s); tests/test_export_cli.py exports tiny specs"),
    (r"m2fp-export v1\.2 --source /models/", SKIP, "needs a ModelScope checkpoint; test_export_cli.py makes one"),
    (r"m2fp-export v1\.2 --force", SKIP, "long (an export); test_export_cli.py covers --force"),
    (r"m2fp-export v\d\.\d --source modelscope:", SKIP, "online only (downloads ModelScope's r101 checkpoint)"),
    (r"m2fp-export v9\.0 --source 'random:tiny", RUN, "test_the_seeded_random_export_runs"),
    (r"m2fp-export v5\.[01] --source /models/", SKIP, "needs ModelScope's r101 checkpoint (r101: long)"),
    (r"m2fp-bundle (sign|pack|install|promote) v?5\.0|m2fp-bundle (pack|install)", RUN,
     "test_the_edge_box_steps_run (v1.2 stands for v5.0, whose r101 export is skipped)"),
    (r"m2fp-export v4\.", SKIP, "needs a registered MLflow model (docs/mlflow.md's walk-through makes one; "
     "tests/test_mlflow_source.py runs the same steps)"),
    (r"docker compose", SKIP, "no Docker engine here; tests/test_deploy_files.py validates deploy/compose.yaml"),
    (r"promtool check rules", RUN, "test_promtool_checks_the_alert_rules"),
    (r"make bench-quick", SKIP, "long (every benchmark on tiny bundles: minutes)"),
    (r"make bench ", SKIP, "the full-size r101 benchmarks: tens of minutes"),
    (r"python:from m2fpkit\.runtime import Runtime", RUN, "test_the_library_example_runs"),
    (r"python:import base64, json", RUN, "test_the_inference_protocol_example_runs"),
    (r"m2fp-figures figures-val", SKIP, "50 scenes: seconds; tests/test_figures.py runs m2fp-figures on a few"),
    (r"m2fp-eval v1\.[012]", SKIP, "grades 50 scenes per version (a minute); tests/test_eval.py runs m2fp-eval "
     "on a small generated set, with its JSON"),
    (r"make train-demo", SKIP, "long (~25 min of training); tests/test_training.py runs a few steps whose loss "
     "must fall"),
]


def code_blocks(lang: str) -> list[str]:
    text = README.read_text()
    return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


def bash_commands(block: str) -> list[str]:
    """The commands of one bash block: comment-only lines dropped, a heredoc kept with its command."""
    commands: list[str] = []
    lines = iter(block.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            body = [line]
            for more in lines:
                body.append(more)
                if more.strip() == heredoc.group(1):
                    break
            line = "\n".join(body)
        commands.append(line)
    return commands


def readme_entries() -> list[str]:
    """Every bash command, and every python block as ``python:<its first line>``."""
    entries = [c for block in code_blocks("bash") for c in bash_commands(block)]
    return entries + ["python:" + block.splitlines()[0] for block in code_blocks("python")]


def plan_for(entry: str) -> list[tuple[str, str, str]]:
    return [p for p in PLAN if re.match(p[0], entry)]


def run_bash(script: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                                **(env or {})}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def on_port(text: str, port: int) -> str:
    return text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    entries = readme_entries()
    unplanned = [e for e in entries if len(plan_for(e)) != 1]
    assert not unplanned, f"README commands without exactly one PLAN entry (run or skip with a reason): {unplanned}"
    stale = [p[0] for p in PLAN if not any(re.match(p[0], e) for e in entries)]
    assert not stale, f"PLAN entries matching no README command: {stale}"
    ran = {p[2].split()[0] for e in entries for p in plan_for(e) if p[1] == RUN}
    assert ran <= set(globals()), f"PLAN names tests that do not exist: {ran - set(globals())}"


def test_the_first_two_commands_are_serve_and_test():
    first = [c.split("#")[0].strip() for c in bash_commands(code_blocks("bash")[0])]
    assert first[:2] == ["make serve", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_make_serve_runs_the_server_with_the_demo_versions(demo_root: Path, tmp_path: Path):
    """``make serve`` (not ``-s``: as a user types it) prints only what a user reads, passes PORT= and
    ADMIN_TOKEN= through, and serves the demo versions. The demo versions are already exported into this
    bundle root, as after a first ``make serve``; the command still runs its export step first."""
    bundles = copy_root(demo_root, tmp_path / "bundles")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["make", "serve", f"PORT={port}", f"BUNDLES={bundles}", f"ADMIN_TOKEN={ADMIN_TOKEN}"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, status = time.monotonic() + 300, 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, ready = http_json(f"http://127.0.0.1:{port}/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)  # polling the condition (readiness), with a deadline
        output = (tmp_path / "serve.log").read_text(errors="replace")
        assert status == 200, output[-3000:]
        _, body = http_json(f"http://127.0.0.1:{port}/api/versions")
        assert DEMO <= {v["version"] for v in body["versions"]} and body["latest"] == "v1.2"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/latest/parse", data=png_bytes(),
                                     headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and r.headers["X-Model-Version"] == "v1.2"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert b"<select" in r.read()
        # ADMIN_TOKEN= enables the admin routes (the token comes through the environment, not argv)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/admin/routes",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        # quiet: no recipe echoed, no export progress, no pip or setuptools; only the server's own lines
        before_server = output.split("m2fpkit.server")[0]
        noise = [line for line in before_server.splitlines()
                 if re.search(r"bin/m2fp-|pip|setuptools|INFO m2fpkit\.export|make\[", line)]
        assert not noise, f"make serve printed set-up noise: {noise}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert ADMIN_TOKEN not in output, "the admin token was printed"


def test_make_shell_puts_the_command_line_tools_on_path(tmp_path: Path):
    """After ``make serve`` the tools are one ``make shell`` away (a plain shell does not have them)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)
    env["SHELL"] = "/bin/sh"
    script = "for t in m2fp-export m2fp-bundle m2fp-serve; do command -v $t; done; m2fp-bundle --help >/dev/null\n"
    proc = subprocess.run(["make", "-s", "shell"], cwd=REPO, input=script, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = proc.stdout.splitlines()[-3:]
    assert [Path(p).name for p in found] == ["m2fp-export", "m2fp-bundle", "m2fp-serve"], proc.stdout
    assert all(Path(p).parent == REPO / ".venv" / "bin" for p in found), found


@pytest.fixture(scope="module")
def api_server(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("readme_api")
    with ServerProcess(copy_root(demo_root, work / "bundles"), work / "server.log",
                       "--admin-token", ADMIN_TOKEN) as server:
        yield server


def test_the_http_examples_answer(api_server: ServerProcess):
    """The quick start's and the HTTP API section's curl lines, verbatim but for the port, each answered 2xx."""
    blocks = [b for b in code_blocks("bash") if bash_commands(b) and re.match(r"curl |cd server/static/samples",
                                                                              bash_commands(b)[0])]
    assert len(blocks) == 2, blocks
    curl = 'curl() { command curl -sS --fail-with-body -o /dev/null --max-time 60 "$@"; }\n'
    for block in blocks:
        run_bash(curl + on_port(block, api_server.port), cwd=REPO, env={"TOKEN": ADMIN_TOKEN})
    # the last example, with the admin token, changed the routing weights
    req = urllib.request.Request(f"{api_server.url}/admin/routes", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r)["routes"]["weights"] == {"v1.0": 80, "v1.2": 20}


def test_export_list_runs(tmp_path: Path):
    out = run_bash("m2fp-export --list", cwd=tmp_path)
    assert "v1.2" in out and "v3.0-r101" in out, out


def test_the_seeded_random_export_runs(tmp_path: Path):
    """The README's seeded random-init export, as written, passes the parity gate into ./bundles."""
    block = next(b for b in code_blocks("bash") if "m2fp-export --list" in b)
    command = next(c for c in bash_commands(block) if "random:" in c)
    run_bash(command, cwd=tmp_path, env={"M2FP_BUNDLES": "bundles"}, timeout=300)  # the default root, ./bundles
    config = json.loads((tmp_path / "bundles" / "m2fp" / "v9.0" / "config.json").read_text())
    assert config["task"] == "single-human", config


def test_the_edge_box_steps_run(demo_root: Path, tmp_path: Path):
    """Sign, pack, install on another box with the public key, promote: v1.2 stands for v5.0."""
    block = next(b for b in code_blocks("bash") if "m2fp-bundle sign" in b)
    steps = [c.replace("v5.0", "v1.2") for c in bash_commands(block) if c.startswith("m2fp-bundle")]
    assert [s.split()[1] for s in steps] == ["sign", "pack", "install", "promote"], steps
    central, edge, config = tmp_path / "central", tmp_path / "edge", tmp_path / "config"
    copy_root(demo_root, central / "bundles", versions=("v1.2",))
    edge.mkdir()
    home = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(config)}  # keygen's key pair: not the user's
    run_bash("m2fp-bundle keygen\n" + "\n".join(steps[:2]), cwd=central, env=home)
    # 3. copy the archive and the public key to the edge box
    (edge / "m2fp-v1.2.tar").write_bytes((central / "m2fp-v1.2.tar").read_bytes())
    (edge / "m2fp-signing.pub").write_bytes((config / "m2fpkit" / "m2fp-signing.pub").read_bytes())
    run_bash("\n".join(steps[2:]), cwd=edge, env=home)
    assert (edge / "bundles" / "m2fp" / "v1.2" / "manifest.sig").is_file()
    assert '"latest": "v1.2"' in (edge / "bundles" / "m2fp" / "aliases.json").read_text()


def python_block(first_line: str) -> str:
    return next(b for b in code_blocks("python") if b.startswith(first_line))


def test_the_library_example_runs(demo_root: Path, tmp_path: Path):
    copy_root(demo_root, tmp_path / "bundles", versions=("v1.2",))
    (tmp_path / "server" / "static").mkdir(parents=True)
    (tmp_path / "server" / "static" / "samples").symlink_to(REPO / "server" / "static" / "samples")
    code = python_block("from m2fpkit.runtime import Runtime")
    out = run_bash(f"python - <<'EOF'\n{code}\nprint(pred.version, pred.result.label_map.shape)\nEOF", cwd=tmp_path)
    assert out.split() == ["v1.2", "(512,", "512)"], out


def test_the_inference_protocol_example_runs(api_server: ServerProcess):
    code = on_port(python_block("import base64, json"), api_server.port)
    out = run_bash(f"python - <<'EOF'\n{code}\nEOF", cwd=REPO)
    first, second = out.strip().splitlines()[-2:]
    assert first.startswith("v1.2 (512, 512)"), out
    assert second.split()[1] in ("auto", "auto-fallback"), out


def test_promtool_checks_the_alert_rules():
    line = next(c for c in readme_entries() if c.startswith("promtool check rules"))
    if not Path("/usr/bin/promtool").exists():
        pytest.fail("promtool is missing: make test installs Debian's prometheus")
    run_bash(line, cwd=REPO)
