"""Where the bundle root is: one rule for ``m2fp-serve``, ``m2fp-export``, ``m2fp-bundle`` and the library.

``--bundles PATH``, else ``$M2FP_BUNDLES``, else ``./bundles`` (relative to the working directory) —
never a path inside the installed package. Commands that only read a store (``m2fp-serve``,
``m2fp-bundle list``/``pack``/``sign``/``promote``/``rm``, :class:`~m2fpkit.runtime.api.Runtime`) refuse a
root that does not exist, naming it; commands that create it by design (``m2fp-export``,
``m2fp-bundle install``/``pull``) say so in their help.

A server's state directory (the last-known-good record) is named the same way: ``--state-dir``, else
``$M2FP_STATE_DIR``, else none (the registry then uses the store directory when it is writable).

Light on purpose (no numpy/onnxruntime): every CLI imports it before parsing its arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import BundleError

ENV_BUNDLES = "M2FP_BUNDLES"
ENV_STATE_DIR = "M2FP_STATE_DIR"
#: the root when neither ``--bundles`` nor ``$M2FP_BUNDLES`` names one (relative to the working directory)
DEFAULT_ROOT = Path("bundles")


def default_root() -> Path:
    """``$M2FP_BUNDLES`` if set and not empty, else ``./bundles``."""
    return Path(os.environ.get(ENV_BUNDLES) or DEFAULT_ROOT)


def resolve_root(given: str | os.PathLike | None = None) -> Path:
    """``given`` if not None/empty, else :func:`default_root`."""
    return Path(given) if given not in (None, "") else default_root()


def require_root(root: str | os.PathLike) -> Path:
    """``root`` as a Path if it is an existing directory; BundleError naming it otherwise."""
    path = Path(root)
    if not path.exists():
        raise BundleError(f"bundle root {path} does not exist (give --bundles or ${ENV_BUNDLES}; "
                          f"the default is ./{DEFAULT_ROOT})")
    if not path.is_dir():
        raise BundleError(f"bundle root {path} is not a directory")
    return path


def bundles_option(*, creates: bool = False) -> Any:
    """The ``--bundles`` click option of every CLI, with the rule above.

    ``creates=False``: a root that does not exist is a usage error naming it (exit status 2).
    ``creates=True``: the command creates the root (and ``m2fp/``) when it writes the first version.
    """
    import click

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Path:
        path = Path(value)
        if not creates:
            try:
                require_root(path)
            except BundleError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return path

    text = f"Bundle root (holds m2fp/<version>/). Env {ENV_BUNDLES}, else ./{DEFAULT_ROOT}."
    text += " Created if it does not exist." if creates else " Must exist."
    return click.option("--bundles", type=click.Path(file_okay=False, path_type=Path), envvar=ENV_BUNDLES,
                        default=str(DEFAULT_ROOT), show_default=True, callback=check, help=text)
