"""Every CLI fails the same way (``runtime/cli_errors.py``): an error of the project's tree or of the
operating system is one line ``Error: …`` on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from m2fpkit.runtime import cli_errors
from m2fpkit.runtime.errors import ExportError, IntegrityError, M2FPError, SignatureError, UnknownVersion

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("exc,line", [
    (ExportError("v1.2: parity gate failed"), "v1.2: parity gate failed"),
    (IntegrityError("model.onnx: size 3,\n expected 4"), "model.onnx: size 3, expected 4"),
    (UnknownVersion(), "UnknownVersion"),
    (FileNotFoundError(2, "No such file or directory", "/x/y"), "No such file or directory: /x/y"),
])
def test_one_rule_maps_the_tree_to_one_line_and_status_1(exc, line):
    @click.command(cls=cli_errors.Command)
    def cmd() -> None:
        raise exc

    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == cli_errors.EXIT_FAILURE == 1
    assert r.output == f"Error: {line}\n"
    assert isinstance(r.exception, SystemExit)


def test_a_bug_keeps_its_traceback():
    @click.group(cls=cli_errors.Group)
    def group() -> None:
        pass

    @group.command()
    def bug() -> None:
        raise KeyError("a bug")

    @group.command()
    def known() -> None:
        raise SignatureError("unsigned")

    assert isinstance(CliRunner().invoke(group, ["bug"]).exception, KeyError)
    r = CliRunner().invoke(group, ["known"])
    assert r.exit_code == 1 and r.output == "Error: unsigned\n"
    assert issubclass(SignatureError, M2FPError)


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_m2fp_export_an_export_error_is_one_line(tmp_path):
    """``--calibration`` without images (an ExportError): refused before anything is exported."""
    (empty := tmp_path / "photos").mkdir()
    r = script("m2fp-export", "v1.2", "--int8", "--calibration", str(empty), "--bundles", str(tmp_path / "b"),
               cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: ") and "no .jpg" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "b" / "m2fp" / "v1.2").exists()


def test_m2fp_bundle_a_missing_file_is_one_line(tmp_path):
    r = script("m2fp-bundle", "verify", str(tmp_path / "missing.tar"), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr == f"Error: {tmp_path / 'missing.tar'}: no such file or directory\n"
