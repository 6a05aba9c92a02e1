"""``python -m m2fpkit.export.train [RECIPE...]``: train the demo versions' weights (``make train-demo``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from m2fpkit.runtime.cli_errors import Command

from .recipes import RECIPES
from .run import DEFAULT_OUT, train_all


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipes", nargs=-1, type=click.Choice(sorted(RECIPES)))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Directory of the version directories (ModelScope model directories + training.json).")
@click.option("--jobs", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Recipes trained at once, one process and one thread each.")
@click.option("--steps-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply every recipe's steps (quick tries; the committed weights use 1).")
@click.option("--log-every", type=click.IntRange(min=1), default=25, show_default=True,
              help="Steps per logged (averaged) loss.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(recipes: tuple[str, ...], out: Path, jobs: int, steps_scale: float, log_every: int, quiet: bool) -> None:
    """Train the tiny M2FP on drawn figures with the Mask2Former set loss, one RECIPE per run (default:
    all), and write each checkpoint as a demo version's weights under --out."""
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("m2fpkit").setLevel(level)
    for line in train_all(list(recipes) or list(RECIPES), out, jobs=jobs, steps_scale=steps_scale,
                          log_every=log_every, log_level=level):
        click.echo(line)


if __name__ == "__main__":
    main()
