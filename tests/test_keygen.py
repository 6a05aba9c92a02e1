"""``m2fp-bundle keygen`` never leaves a private key where ``git add -A`` would pick it up: by default the
pair goes to ``$XDG_CONFIG_HOME/m2fpkit/`` (0700 directory, 0600 key), where ``sign`` finds it, and the
repository's ``.gitignore`` covers ``*.key``."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.bundle.signature import TrustPolicy
from m2fpkit.runtime.delivery.cli import main
from reference.bundles import clone_bundle

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def work_tree(tmp_path, monkeypatch) -> Path:
    """A git work tree as the working directory, and a private config directory."""
    repo = tmp_path / "repo"
    repo.mkdir()
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("M2FP_PRIVATE_KEY", raising=False)
    return repo


def test_keygen_writes_the_pair_outside_the_working_directory(work_tree, tmp_path):
    r = CliRunner().invoke(main, ["keygen"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in work_tree.iterdir() if p.name != ".git") == []
    home = tmp_path / "config" / "m2fpkit"
    private, public = home / "m2fp-signing.key", home / "m2fp-signing.pub"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and b"PRIVATE KEY" in private.read_bytes()
    assert b"PUBLIC KEY" in public.read_bytes()
    assert str(private) in r.output and str(public) in r.output
    again = CliRunner().invoke(main, ["keygen"])
    assert again.exit_code == 1 and "not overwritten" in again.output


def test_sign_uses_the_default_key(work_tree, tmp_path, ms_multi):
    bundle = clone_bundle(ms_multi.bundle_dir, tmp_path / "bundles", "v1.0")
    assert CliRunner().invoke(main, ["keygen"]).exit_code == 0
    r = CliRunner().invoke(main, ["sign", str(bundle), "--bundles", str(tmp_path / "bundles")])
    assert r.exit_code == 0, r.output
    public = tmp_path / "config" / "m2fpkit" / "m2fp-signing.pub"
    assert reader.inspect(bundle, TrustPolicy.from_keys(public)).signed_by


def test_gitignore_covers_private_keys():
    if not shutil.which("git") or not (REPO / ".git").exists():
        pytest.skip("needs git and the repository's work tree")
    for name in ("m2fp-signing.key", "deploy/signing.key"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=REPO)
        assert r.returncode == 0, f"{name} is not ignored by .gitignore"
