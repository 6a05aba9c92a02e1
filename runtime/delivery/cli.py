"""``m2fp-bundle``: pack, sign, verify, install, pull, list, promote and remove bundle versions.

Every command works on ``<bundles>/m2fp/`` (``--bundles``, env ``M2FP_BUNDLES``, default ``./bundles``),
which must exist, except for ``install`` and ``pull``, which create it.
A public key (``--public-key``, repeatable, env ``M2FP_PUBLIC_KEY``: paths separated by ``:``) makes
signatures mandatory for verify, install, pull and promote. Failures print one line ``Error: …`` on
stderr and exit 1 (the rule of every CLI: ``..cli_errors``); ``verify`` prints its report and exits 0
when every check passed, else 1. ``keygen`` writes the key pair outside the working directory by
default (``..bundle.signing.key_dir``), where ``sign`` finds the private key.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..cli_errors import Group
from ..errors import BundleError
from ..roots import bundles_option

#: the bundle root rule of every CLI (``..roots``); commands that only read the store need it to exist
BUNDLES = bundles_option()
#: install and pull create the root (and ``m2fp/``) when it does not exist yet
BUNDLES_CREATED = bundles_option(creates=True)
PUBLIC_KEY = click.option("--public-key", "public_key", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                          envvar="M2FP_PUBLIC_KEY",
                          help="Trusted Ed25519 public key (PEM); repeatable. Makes a valid signature mandatory. "
                               "Env M2FP_PUBLIC_KEY (':'-separated).")


def _trust(paths: tuple[Path, ...]):
    """The trust policy of ``--public-key`` paths (SignatureError, one line, for an unusable key file)."""
    from ..bundle.signature import TrustPolicy

    return TrustPolicy.from_keys(list(paths))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Move verified M2FP bundles between machines: pack → sign → copy or pull → verify → install."""


def _version_dir(bundles: Path, version_or_dir: str) -> Path:
    from ..bundle.store import BundleStore
    from ..bundle.versions import is_version_name

    p = Path(version_or_dir)
    if is_version_name(version_or_dir) and not p.is_dir():
        path = BundleStore(bundles).path(version_or_dir)
        if not path.is_dir():
            raise BundleError(f"{version_or_dir} is not installed in {bundles}")
        return path
    if p.is_dir():
        return p
    raise BundleError(f"{version_or_dir}: neither an installed version nor a bundle directory")


@main.command()
@click.argument("version")
@BUNDLES
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Archive file or directory "
              "(default ./m2fp-<version>.tar).")
def pack(version: str, bundles: Path, output: Path | None) -> None:
    """Pack VERSION (or a bundle directory) into one tar file, checking every hash on the way."""
    from ..bundle.archive import pack as do_pack

    packed = do_pack(_version_dir(bundles, version), output)
    click.echo(f"packed {packed.version}: {packed.files} files, {packed.bytes / 2**20:.1f} MB → {packed.path}")


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@PUBLIC_KEY
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(target: Path, public_key: tuple[Path, ...], as_json: bool) -> None:
    """Verify an archive or a bundle directory: archive safety, manifest, schema, graph, signature."""
    from .install import verify as do_verify

    report = do_verify(target, _trust(public_key))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@BUNDLES_CREATED
@click.option("--force", is_flag=True, help="Replace the version if it is installed (atomic swap).")
@PUBLIC_KEY
def install(source: Path, bundles: Path, force: bool, public_key: tuple[Path, ...]) -> None:
    """Verify SOURCE (archive or directory) in a staging directory, then publish it atomically."""
    from ..errors import VerificationFailed
    from .install import install as do_install

    try:
        done = do_install(source, bundles, force=force, trust=_trust(public_key))
    except VerificationFailed as exc:
        if exc.report is not None:
            click.echo(exc.report.render(), err=True)
        raise
    click.echo(done.report.render())
    click.echo(f"installed {done.version} → {done.path}" + (" (replaced the previous copy)" if done.replaced else ""))


@main.command("list")
@BUNDLES
@PUBLIC_KEY
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(bundles: Path, public_key: tuple[Path, ...], as_json: bool) -> None:
    """Installed versions: channel, task, aliases, signature, size."""
    from .install import list_versions

    rows = list_versions(bundles, _trust(public_key))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no versions in {bundles}/m2fp")
        return
    header = ("VERSION", "CHANNEL", "TASK", "ALIASES", "SIGNED", "SIZE", "PROBLEM")
    table = [header] + [(r["version"], r["channel"] or "?", r["task"] or "?", ",".join(r["aliases"]) or "-",
                         r["signed"], f"{r['bytes'] / 2**20:.1f} MB" if r["bytes"] is not None else "?",
                         r["problem"] or "") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


@main.command()
@click.argument("version")
@click.option("--alias", required=True, help="Alias to move, e.g. latest or stable.")
@BUNDLES
@PUBLIC_KEY
def promote(version: str, alias: str, bundles: Path, public_key: tuple[Path, ...]) -> None:
    """Point ALIAS at VERSION in aliases.json (atomic) — refused unless VERSION verifies."""
    from .install import promote as do_promote

    do_promote(bundles, version, alias, trust=_trust(public_key))
    click.echo(f"{alias} → {version}")


@main.command()
@click.argument("version")
@BUNDLES
@click.option("--routes", "routes_file", type=click.Path(dir_okay=False, path_type=Path), envvar="M2FP_ROUTES",
              help="Routes file the servers use; a version it names is not removed. Env M2FP_ROUTES.")
@click.option("--force", is_flag=True, help="Remove even if aliases or the routes file still name it.")
def rm(version: str, bundles: Path, routes_file: Path | None, force: bool) -> None:
    """Remove VERSION (renamed away, then deleted) unless something still routes to it."""
    from .install import remove

    refs = remove(bundles, version, routes_file=routes_file, force=force)
    click.echo(f"removed {version}" + (f" (still referenced: {'; '.join(refs)})" if refs else ""))


#: where keygen writes and sign reads a key pair by default (``..bundle.signing.key_dir``)
_KEY_DIR = "$XDG_CONFIG_HOME/m2fpkit/, else ~/.config/m2fpkit/"


@main.command()
@click.option("--private-key", type=click.Path(dir_okay=False, path_type=Path),
              help=f"Where to write the private key (PEM, mode 0600). Default: m2fp-signing.key in {_KEY_DIR}")
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the public key (PEM). Default: the private key's path with .pub")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(private_key: Path | None, public_key: Path | None, force: bool) -> None:
    """Create an Ed25519 key pair for signing bundles (by default in your config directory, never in the
    working directory: a key there is one `git add` away from a repository)."""
    from ..bundle import signing

    kid = signing.keygen(private_key, public_key, force=force)
    private_key = private_key or signing.default_private_key()
    public_key = public_key or private_key.with_suffix(".pub")
    click.echo(f"key {kid}: private {private_key} (keep it on the build machine), public {public_key} "
               f"(copy it to the edge boxes)")


@main.command()
@click.argument("version")
@click.option("--private-key", type=click.Path(dir_okay=False, path_type=Path), envvar="M2FP_PRIVATE_KEY",
              help=f"Ed25519 private key (PEM). Env M2FP_PRIVATE_KEY. Default: keygen's, m2fp-signing.key in "
                   f"{_KEY_DIR}")
@BUNDLES
def sign(version: str, private_key: Path | None, bundles: Path) -> None:
    """Sign VERSION (or a bundle directory): writes manifest.sig over manifest.json."""
    from ..bundle import signing

    path = _version_dir(bundles, version)
    kid = signing.sign(path, private_key or signing.default_private_key())
    click.echo(f"signed {path.name} with key {kid} → {path / 'manifest.sig'}")


@main.command()
@click.argument("url")
@click.argument("version")
@BUNDLES_CREATED
@click.option("--token", envvar="M2FP_DISTRIBUTION_TOKEN", help="Bearer token of the central server's "
              "distribution endpoints. Env M2FP_DISTRIBUTION_TOKEN.")
@PUBLIC_KEY
@click.option("--force", is_flag=True, help="Replace the version if it is installed.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds without progress before giving up.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True),
              help="Seconds for the whole download (default: one hour); past it the pull stops, run it again "
                   "to resume.")
def pull(url: str, version: str, bundles: Path, token: str | None, public_key: tuple[Path, ...], force: bool,
         timeout: float, deadline: float | None) -> None:
    """Download VERSION from the server at URL (resumable), verify and install it.

    Redirects are followed only within URL's scheme, host and port (the token goes nowhere else); the
    archive must hold VERSION and may not be larger than the server announced.
    """
    from ..errors import VerificationFailed
    from .pull import DEFAULT_DEADLINE
    from .pull import pull as do_pull

    try:
        done = do_pull(url, version, bundles, token=token, trust=_trust(public_key), force=force, timeout=timeout,
                       deadline=deadline if deadline is not None else DEFAULT_DEADLINE)
    except VerificationFailed as exc:
        if exc.report is not None:
            click.echo(exc.report.render(), err=True)
        raise
    resumed = f", resumed at {done.resumed_from} bytes" if done.resumed_from else ""
    click.echo(done.installed.report.render())
    click.echo(f"pulled {done.installed.version} ({done.bytes / 2**20:.1f} MB{resumed}) → {done.installed.path}")


def run() -> None:
    """The ``m2fp-bundle`` program: :func:`main` at background priority, since it shares edge boxes with a
    serving ``m2fp-serve`` whose forwards its hashing, unpacking and verification must not stall."""
    from ..priority import lower_this_thread

    lower_this_thread()  # before any thread exists: the whole process
    main(prog_name=os.path.basename(sys.argv[0]))


if __name__ == "__main__":  # pragma: no cover
    run()
