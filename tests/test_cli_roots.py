"""One bundle-root rule for ``m2fp-serve``, ``m2fp-export``, ``m2fp-bundle`` and the library: ``--bundles``,
else ``$M2FP_BUNDLES``, else ``./bundles`` — never a path inside the installed package. A root that does not
exist is an error naming it (exit status ≠ 0), except for the commands that create it by design
(``m2fp-export``, ``m2fp-bundle install``/``pull``), whose help says so.

Each check runs the click command in process (``CliRunner``) in a temporary working directory; one runs the
installed ``m2fp-serve`` script for real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from m2fpkit.export.cli import main as export_main
from m2fpkit.runtime.delivery.cli import main as bundle_main
from m2fpkit.runtime.errors import BundleError
from m2fpkit.runtime.roots import DEFAULT_ROOT, ENV_BUNDLES, default_root, require_root, resolve_root
from m2fpkit.server.cli import main as serve_main

REPO = Path(__file__).resolve().parent.parent
M2FP_SERVE = Path(sys.executable).with_name("m2fp-serve")
#: m2fp-bundle commands that read an existing store, with the arguments they need besides --bundles
READERS = {"list": [], "pack": ["v1.0"], "sign": ["v1.0", "--private-key", "k.key"],
           "promote": ["v1.0", "--alias", "stable"], "rm": ["v1.0"]}
CREATORS = ("install", "pull")


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """A working directory without ./bundles, and no $M2FP_BUNDLES."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(ENV_BUNDLES, raising=False)
    return work


def invoke(command: click.Command, *args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(command, [str(a) for a in args], env=env)


def help_text(command: click.Command) -> str:
    """``--help`` output with the wrapping undone."""
    return " ".join(invoke(command, "--help").output.split())


def assert_missing_root_error(result, path: Path | str) -> None:
    assert result.exit_code != 0, result.output
    assert f"bundle root {path} does not exist" in result.output, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, BundleError)


# --------------------------------------------------------------------------------------- the rule
def test_the_rule(cwd, monkeypatch):
    assert DEFAULT_ROOT == Path("bundles") and default_root() == Path("bundles")
    assert resolve_root(None) == resolve_root("") == Path("bundles")
    monkeypatch.setenv(ENV_BUNDLES, "/srv/from-env")
    assert default_root() == resolve_root(None) == Path("/srv/from-env")
    assert resolve_root("given") == Path("given")
    monkeypatch.setenv(ENV_BUNDLES, "")  # empty: as if unset
    assert default_root() == Path("bundles")


def test_require_root_names_the_path(tmp_path):
    assert require_root(tmp_path) == tmp_path
    with pytest.raises(BundleError, match=f"bundle root {tmp_path / 'nope'} does not exist"):
        require_root(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is not a directory"):
        require_root(tmp_path / "file")


def _bundles_params() -> dict[str, click.Parameter]:
    commands = {"m2fp-serve": serve_main, "m2fp-export": export_main}
    commands.update({f"m2fp-bundle {name}": cmd for name, cmd in bundle_main.commands.items()})
    return {name: p for name, cmd in commands.items() for p in cmd.params if p.name == "bundles"}


def test_every_cli_declares_the_same_option():
    params = _bundles_params()
    assert {"m2fp-serve", "m2fp-export", *(f"m2fp-bundle {c}" for c in (*READERS, *CREATORS))} <= set(params)
    for name, param in params.items():
        assert param.envvar == ENV_BUNDLES and param.default == "bundles", name
        assert not str(param.default).startswith(str(REPO)), name  # never the source tree / installed package


def test_commands_that_create_the_root_say_so_and_readers_say_it_must_exist():
    for cmd in (export_main, *(bundle_main.commands[c] for c in CREATORS)):
        assert "Created if it does not exist" in help_text(cmd), cmd.name
    for cmd in (serve_main, *(bundle_main.commands[c] for c in READERS)):
        assert "Must exist" in help_text(cmd), cmd.name


# ----------------------------------------------------------------------------------- m2fp-serve
def test_serve_refuses_a_missing_root_given_by_option_env_or_default(cwd):
    assert_missing_root_error(invoke(serve_main, "--bundles", cwd / "nope"), cwd / "nope")
    assert_missing_root_error(invoke(serve_main, env={ENV_BUNDLES: str(cwd / "from-env")}), cwd / "from-env")
    result = invoke(serve_main)
    assert_missing_root_error(result, "bundles")
    assert result.exit_code == 2 and "--bundles" in result.output


def test_serve_script_exits_non_zero_naming_the_root(tmp_path):
    missing = tmp_path / "missing-root"
    proc = subprocess.run([str(M2FP_SERVE), "--bundles", str(missing), "--port", "0"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"bundle root {missing} does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not missing.exists()


# ---------------------------------------------------------------------------------- m2fp-bundle
@pytest.mark.parametrize("command", sorted(READERS))
def test_bundle_readers_refuse_a_missing_root(cwd, command):
    assert_missing_root_error(invoke(bundle_main, command, *READERS[command], "--bundles", cwd / "nope"),
                              cwd / "nope")
    assert_missing_root_error(invoke(bundle_main, command, *READERS[command]), "bundles")
    assert_missing_root_error(invoke(bundle_main, command, *READERS[command], env={ENV_BUNDLES: "elsewhere"}),
                              "elsewhere")
    assert not (cwd / "nope").exists() and not (cwd / "bundles").exists()


def test_bundle_list_reads_the_root_the_rule_names(cwd, monkeypatch):
    (cwd / "bundles").mkdir()
    result = invoke(bundle_main, "list")
    assert result.exit_code == 0 and "no versions in bundles/m2fp" in result.output
    other = cwd / "other"
    other.mkdir()
    result = invoke(bundle_main, "list", env={ENV_BUNDLES: str(other)})
    assert result.exit_code == 0 and f"no versions in {other}/m2fp" in result.output
    result = invoke(bundle_main, "list", "--bundles", cwd / "bundles", env={ENV_BUNDLES: str(other)})
    assert f"no versions in {cwd / 'bundles'}/m2fp" in result.output  # the option wins over the environment


# ---------------------------------------------------------------------------------- m2fp-export
def test_export_uses_the_same_root_and_does_not_need_it_to_exist(cwd):
    def built(root_args: list[str], env: dict[str, str] | None = None) -> dict[str, str]:
        result = invoke(export_main, "--list", *root_args, env=env)
        assert result.exit_code == 0, result.output
        rows = [line.split() for line in result.output.splitlines()[1:]]
        return {row[0]: row[4] for row in rows}

    assert set(built([]).values()) == {"no"} and not (cwd / "bundles").exists()  # ./bundles, absent: nothing built
    (cwd / "bundles" / "m2fp" / "v1.2").mkdir(parents=True)
    (cwd / "elsewhere" / "m2fp" / "v1.0").mkdir(parents=True)
    assert built([])["v1.2"] == "yes" and built([])["v1.0"] == "no"
    assert built([], env={ENV_BUNDLES: str(cwd / "elsewhere")})["v1.0"] == "yes"
    assert built(["--bundles", str(cwd / "bundles")], env={ENV_BUNDLES: str(cwd / "elsewhere")})["v1.2"] == "yes"


# ------------------------------------------------------------------------------------ library
def test_the_library_uses_the_same_rule(cwd, monkeypatch):
    from m2fpkit.runtime import Runtime
    from m2fpkit.runtime.registry import RegistryOptions

    options = RegistryOptions(watch=False, idle_ttl=0)
    with pytest.raises(BundleError, match="bundle root bundles does not exist"):
        Runtime(options=options)
    (cwd / "from-env").mkdir()
    monkeypatch.setenv(ENV_BUNDLES, str(cwd / "from-env"))
    with Runtime(options=options) as rt:
        assert rt.registry.store.root == cwd / "from-env" and rt.status().versions == ()
    assert list((cwd / "from-env").iterdir()) == []


# ------------------------------------------------------------------------------------- Makefile
def test_make_serve_passes_one_root_to_export_and_serve():
    proc = subprocess.run(["make", "-n", "serve", "BUNDLES=some/root"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    export = [line for line in lines if "m2fp-export" in line]
    serve = [line for line in lines if "m2fp-serve" in line]
    assert export and "--all" in export[-1].split() and "--bundles some/root" in export[-1]  # creates the root
    # and the demo versions (their aliases too, since a fresh store has none) …
    assert serve and "--bundles some/root" in serve[-1]  # … then serves them
    assert lines.index(export[-1]) < lines.index(serve[-1])
