"""One rule for how every CLI (``m2fp-export``, ``m2fp-bundle``, ``m2fp-serve``) fails.

An error of the project's tree (:mod:`.errors`) or of the operating system (``OSError``: a file not
found, a full disk, a port in use) is one line ``Error: <message>`` on stderr and exit status
:data:`EXIT_FAILURE`; usage errors stay click's (``Error: …`` after the usage line, status 2). Anything
else is a bug and keeps its traceback. A command opts in with ``cls=Command`` (or ``cls=Group``).
"""

from __future__ import annotations

from typing import Any

import click

from .errors import M2FPError

#: exit status of a failure the CLI explains in one line (click's usage errors exit 2)
EXIT_FAILURE = 1
#: what a CLI turns into one line; the rest propagates
EXPLAINED: tuple[type[BaseException], ...] = (M2FPError, OSError)


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: an OSError as ``<reason>: <file>``, anything else its message with line breaks
    folded (the name of its type if it has none)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


class _Explained(click.ClickException):
    exit_code = EXIT_FAILURE


def explained(exc: BaseException) -> click.ClickException:
    """The click exception that prints ``Error: <one line>`` and exits :data:`EXIT_FAILURE`."""
    return _Explained(one_line(exc))


class _Handling:
    """Mixin: errors in :data:`EXPLAINED` raised by the command (or any subcommand) become :func:`explained`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except EXPLAINED as exc:
            raise explained(exc) from None


class Command(_Handling, click.Command):
    """A click command that fails by the rule of this module."""


class Group(_Handling, click.Group):
    """A click group whose subcommands fail by the rule of this module."""
