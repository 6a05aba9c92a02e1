"""``m2fp-eval``: grade versions on a labeled dataset (mIoU, per-class IoU, pixel and mean class accuracy).

``m2fp-eval VERSION... --data DIR [--bundles ROOT] [--plan P] [--json FILE] [--state-dir DIR]``: each version
(or alias) is loaded as the server loads it and runs every image of DIR (:mod:`.dataset`'s layout) with a
progress bar on stderr; a table on stdout compares them. ``--json`` writes one object per version (a list for
several). Each grade is recorded (:mod:`.grades`) where a server on the same store finds it: ``--state-dir``,
else ``$M2FP_STATE_DIR``, else the store directory ``<bundles>/m2fp`` when it is writable (the server's rule,
``registry.recovery.place``); ``--no-record`` records nothing. Failures are one line ``Error: …`` and exit 1
(``..cli_errors``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import plans
from ..cli_errors import Command
from ..roots import ENV_STATE_DIR, bundles_option

if TYPE_CHECKING:
    from .evaluate import Evaluation


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("m2fpkit").setLevel(logging.INFO if verbose else logging.WARNING)


def table(evaluations: list[Evaluation]) -> str:
    """The readable comparison of ``evaluations`` (one column per version; ``-``: class absent there)."""
    first = evaluations[0].dataset
    lines = [f"dataset {first.name}: {first.images} images, sha256 {first.sha256} ({first.path})", ""]
    rows: list[tuple[str, list[str]]] = [
        ("version", [e.version for e in evaluations]),
        ("plan", [e.plan for e in evaluations]),
        ("mIoU", [f"{e.scores.miou:.4f}" for e in evaluations]),
        ("pixel accuracy", [f"{e.scores.pixel_accuracy:.4f}" for e in evaluations]),
        ("mean class accuracy", [f"{e.scores.mean_class_accuracy:.4f}" for e in evaluations]),
        ("images/s", [f"{e.images_per_s:.2f}" for e in evaluations]),
        ("IoU per class", ["" for _ in evaluations]),
    ]
    names = list(dict.fromkeys(n for e in evaluations for n in e.scores.per_class))
    for name in names:
        rows.append((f"  {name}", [f"{e.scores.per_class[name]:.4f}" if name in e.scores.per_class else "-"
                                   for e in evaluations]))
    left = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(evaluations))]
    for label, cells in rows:
        line = label.ljust(left) + "".join("  " + cell.rjust(w) for cell, w in zip(cells, widths))
        lines.append(line.rstrip())
    return "\n".join(lines)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("versions", nargs=-1, required=True)
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Dataset directory: images/NAME.jpg|png, labels/NAME.png (8-bit class ids, 255 = ignore), "
                   "optional classes.txt (one class name a line; else the bundle's order).")
@click.option("--name", "dataset_name", help="The dataset's name in reports and grades. Default: DIR's name.")
@bundles_option()
@click.option("--plan", default="fp32", show_default=True, type=click.Choice(plans.MODES),
              help="Execution plan: fp32 = onnxruntime fp32 (the reference), a plan name (served only on its "
                   "evidence, else the reference runs: the report names the plan that ran) or auto.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results as JSON (an object, or a list for several versions).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar=ENV_STATE_DIR,
              help=f"Where grades are recorded (env {ENV_STATE_DIR}). Default: the store directory <bundles>/m2fp "
                   "when writable, where m2fp-serve on the same store reads them.")
@click.option("--no-record", is_flag=True, help="Record no grade.")
@click.option("--public-key", "public_keys", multiple=True, envvar="M2FP_PUBLIC_KEY",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Trusted Ed25519 public key (PEM); repeatable (env M2FP_PUBLIC_KEY, ':'-separated). Makes a "
                   "valid signature mandatory, as for m2fp-serve.")
@click.option("-v", "--verbose", is_flag=True, help="Log what is loaded and measured.")
def main(versions: tuple[str, ...], data: Path, dataset_name: str | None, bundles: Path, plan: str,
         json_file: Path | None, state_dir: Path | None, no_record: bool, public_keys: tuple[Path, ...],
         verbose: bool) -> None:
    """Grade each VERSION (or alias) on the labeled dataset DIR: mIoU over the classes present in the ground
    truth, IoU per class, pixel accuracy, mean class accuracy, images/s and the dataset's fingerprint."""
    from ..bundle import jsonfile
    from ..bundle.atomic import write_atomic
    from ..bundle.signature import TrustPolicy
    from ..bundle.store import BundleStore
    from ..registry.recovery import place
    from . import grades
    from .dataset import Dataset
    from .evaluate import evaluate, load_predictor

    _setup_logging(verbose)
    trust = TrustPolicy.from_keys(list(public_keys))
    dataset = Dataset.open(data, dataset_name)
    results = []
    for name in versions:
        predictor = load_predictor(bundles, name, plan, trust=trust)
        try:
            with click.progressbar(length=len(dataset), label=f"{predictor.version} ({predictor.plan_name})",
                                   file=sys.stderr, show_pos=True) as bar:
                results.append(evaluate(predictor, dataset, bar.update))
        finally:
            predictor.close()
    click.echo(table(results))
    if json_file is not None:
        body = [r.to_json() for r in results]
        write_atomic(json_file, jsonfile.dumps(body[0] if len(body) == 1 else body))
    if no_record:
        return
    where, why = place(BundleStore(bundles), state_dir)
    if where is None:
        logging.getLogger(__name__).warning("grades not recorded: %s", why)
        return
    for result in results:
        path = grades.record(where, result.grade())
        click.echo(f"recorded {result.version}'s grade in {path}", err=True)
