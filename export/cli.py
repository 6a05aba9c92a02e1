"""``m2fp-export``: build versions into verified bundles.

The bundle root is the one every CLI uses (``--bundles``, else ``$M2FP_BUNDLES``, else ``./bundles``);
exporting creates it (and ``m2fp/``) when it does not exist yet. Aliases belong to the store's operator
(``m2fp-bundle promote``): an export creates the spec file's ``[aliases]`` only where the alias does not
exist yet, and moves one only when asked (``--alias NAME``, ``--apply-aliases``); a run in which an export
failed changes no alias. Failures follow the rule of every CLI (``runtime/cli_errors.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

from m2fpkit.runtime.cli_errors import Command, one_line
from m2fpkit.runtime.roots import bundles_option


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("m2fpkit").setLevel(level)
    # the exporter's own chatter (rewrite rules, constant folding) is noise at our level of detail
    for name in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR if verbose < 2 else logging.DEBUG)


def _alias_names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from m2fpkit.runtime.bundle.versions import is_alias_name

    for alias in value:
        if not is_alias_name(alias) or alias == "auto":
            raise click.BadParameter(f"{alias!r} is not an alias name (a lower-case word like latest; not 'auto')")
    return value


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("versions", nargs=-1)
@click.option("--all", "build_all", is_flag=True,
              help="Build every spec marked build_by_default that is not built yet.")
@click.option("--list", "list_specs", is_flag=True, help="List the version specs and exit.")
@click.option("--source",
              help="Override the spec's source: a ModelScope dir, modelscope:ID[@REV], random:PRESET[?seed=N], "
                   "mlflow:models:/NAME/VERSION or mlflow:models:/NAME@ALIAS (registry: $MLFLOW_TRACKING_URI).")
@click.option("--task", type=click.Choice(["multi-human", "single-human"]),
              help="Task for --source (default: the checkpoint's).")
@click.option("--channel", type=click.Choice(["stable", "recommended", "experimental"]),
              help="Channel for a version without a spec.")
@bundles_option(creates=True)
@click.option("--specs", "specs_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Version spec file (default: the packaged versions.toml).")
@click.option("--force", is_flag=True, help="Replace an existing version (atomically).")
@click.option("--int8", is_flag=True, help="Also ship an int8 QDQ variant for the runtime's int8 plans (on by a "
                                             "spec's int8 = true).")
@click.option("--calibration", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Directory of real photos (JPEG/PNG) to calibrate the int8 variant on; shipped in the bundle "
                   "(default: synthetic scenes, fine for random weights only).")
@click.option("--golden", "golden_image", type=click.Path(dir_okay=False, path_type=Path), metavar="IMAGE",
              help="Golden sample: this photo (JPEG/PNG/…, people in it) instead of the drawn scene of people; "
                   "the runtime re-parses it at every load.")
@click.option("--strict-golden", is_flag=True,
              help="Refuse an export whose golden label map is degenerate (one class, or no person pixel) instead "
                   "of marking it in config.json.")
@click.option("--mlflow-tag", is_flag=True,
              help="After export, tag the MLflow model version with the bundle's content key and parity figures "
                   "(mlflow: sources only).")
@click.option("--alias", "alias_names", multiple=True, metavar="NAME", callback=_alias_names,
              help="After the export, point alias NAME at the version, replacing the operator's choice "
                   "(repeatable; exactly one VERSION).")
@click.option("--apply-aliases", is_flag=True,
              help="Point every alias of the spec file's [aliases] at its version if published, replacing the "
                   "operator's choice (alone: without exporting). Without it the spec's aliases only fill in "
                   "aliases the store does not have yet.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(versions: tuple[str, ...], build_all: bool, list_specs: bool, source: str | None, task: str | None,
         channel: str | None, bundles: Path, specs_path: Path | None, force: bool, int8: bool,
         calibration: Path | None, golden_image: Path | None, strict_golden: bool, mlflow_tag: bool,
         alias_names: tuple[str, ...], apply_aliases: bool, verbose: int, quiet: bool) -> None:
    """Export M2FP VERSIONS (e.g. v1.2) into verified, self-describing ONNX bundles under --bundles
    (created if it does not exist).

    Aliases belong to the store's operator (m2fp-bundle promote): an export writes an alias of the spec
    file's [aliases] only if the store has no such alias yet, and moves one only with --alias or
    --apply-aliases. A failed export changes nothing in the store: no version, no alias."""
    _setup_logging(-1 if quiet else verbose)
    from . import specs as specs_mod  # light; heavy imports below only when exporting

    try:
        specfile = specs_mod.load(specs_path) if specs_path else specs_mod.load()
    except specs_mod.SpecError as exc:
        raise click.ClickException(str(exc)) from None
    if list_specs:
        _list(specfile, bundles)
        return
    if build_all:
        from m2fpkit.runtime.bundle.store import BundleStore
        present = set(BundleStore(bundles).versions())
        versions = tuple(v for v, s in specfile.versions.items() if s.build_by_default and (force or v not in present))
        if not versions:
            click.echo("all default versions are built", err=True)
    elif not versions and apply_aliases and not alias_names:
        _write_aliases(bundles, specfile.aliases, apply=True, named={})
        return
    elif not versions:
        raise click.UsageError("name a VERSION (see --list), or use --all")
    if source and len(versions) != 1:
        raise click.UsageError("--source goes with exactly one VERSION")
    if alias_names and len(versions) != 1:
        raise click.UsageError("--alias goes with exactly one VERSION")
    try:
        from . import build
    except ImportError as exc:
        raise click.ClickException(f"{exc.name} is missing: install with the [export] extra "
                                   "(pip install -e '.[export]' torch==2.13.0)") from None
    from m2fpkit.runtime.bundle.versions import is_version_name
    from m2fpkit.runtime.errors import M2FPError

    if mlflow_tag:
        _check_mlflow_sources(versions, source, specfile, build.sources)

    if calibration:  # the photos are checked before minutes of export, not after
        build.quantize.calibration_images(calibration)
    if golden_image is not None:  # so is the golden photo: a bad one fails before any stage is written
        build.golden.read_image(golden_image)
    failed = []
    for version in versions:
        if not is_version_name(version):
            raise click.UsageError(f"{version!r} is not a version name like v1.2 or v2.0-beta")
        spec = specfile.versions.get(version)
        if spec is None and not source:
            raise click.ClickException(str(specs_mod.SpecError(
                f"no spec for {version!r} (known: {', '.join(specfile.versions)}); pass --source to export it anyway")))
        if spec is None:
            assert source is not None  # checked above: no spec needs --source
            spec = specs_mod.VersionSpec(version=version, source=source, task=task, channel=channel or "experimental",
                                         notes=f"exported from {source}")
        elif source:
            spec = dataclasses.replace(spec, source=source, task=task, channel=channel or spec.channel)
        if int8 or calibration:
            spec = dataclasses.replace(spec, int8=True)
        try:
            result = build.export_version(spec, bundles, force=force, calibration=calibration,
                                          golden_image=golden_image, strict_golden=strict_golden)
        except (M2FPError, OSError) as exc:
            logging.getLogger("m2fpkit.export").error("%s: %s", version, one_line(exc))
            failed.append(version)
            continue
        click.echo(f"{version}: {result.bundle_dir} ({result.seconds:.1f} s)")
        if mlflow_tag:
            from . import mlflow_source
            try:
                key, _ = mlflow_source.tag_bundle(result.bundle_dir)
            except (M2FPError, OSError) as exc:
                logging.getLogger("m2fpkit.export").error("%s: published, but not tagged in MLflow: %s", version,
                                                          one_line(exc))
                failed.append(version)
                continue
            src = result.config.source
            click.echo(f"{version}: tagged {src['model_name']!r} version {src['model_version']} with {key}")
    if failed:
        raise click.ClickException(f"export failed for {', '.join(failed)}")  # and no alias changed
    _write_aliases(bundles, specfile.aliases, apply=apply_aliases,
                   named={alias: versions[0] for alias in alias_names})


def _write_aliases(bundles: Path, spec_aliases: dict[str, str], *, apply: bool, named: dict[str, str]) -> None:
    from .build import update_aliases

    changed = update_aliases(bundles, spec_aliases, apply=apply, named=named)
    if changed:
        logging.getLogger("m2fpkit.export").info("aliases: %s", ", ".join(f"{a} → {v}" for a, v in changed.items()))


def _check_mlflow_sources(versions: tuple[str, ...], source: str | None, specfile, sources) -> None:
    """``--mlflow-tag`` only with an ``mlflow:`` source for every version, checked before anything is exported."""
    for version in versions:
        src = source or (specfile.versions[version].source if version in specfile.versions else "")
        try:
            ref = sources.parse(src)
        except sources.SourceError as exc:
            raise click.UsageError(f"{version}: {exc}") from None
        if not isinstance(ref, sources.MlflowSource):
            raise click.UsageError(f"--mlflow-tag needs an mlflow: source; {version} is from {src!r}")


def _list(specfile, bundles: Path) -> None:
    from m2fpkit.runtime.bundle.store import BundleStore
    present = set(BundleStore(bundles).versions())
    aliases: dict[str, list[str]] = {}
    for a, v in specfile.aliases.items():
        aliases.setdefault(v, []).append(a)
    click.echo(f"{'VERSION':<12} {'TASK':<13} {'CHANNEL':<13} {'API':<10} {'BUILT':<6} {'ALIASES':<14} SOURCE")
    for v, s in specfile.versions.items():
        click.echo(f"{v:<12} {s.task or '-':<13} {s.channel:<13} {','.join(s.compatible_api):<10} "
                   f"{'yes' if v in present else 'no':<6} {','.join(aliases.get(v, [])) or '-':<14} {s.source}")
