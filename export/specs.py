"""Version specs: the declarative ``versions.toml`` that names every exportable version.

A ``source`` that is a relative directory (no ``scheme:`` prefix such as ``random:``) is relative to the spec
file, not to the working directory: :func:`load` makes it absolute, so a spec means the same from anywhere.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2fpkit.runtime.bundle.config import CHANNELS, TASKS
from m2fpkit.runtime.bundle.versions import is_alias_name, is_api_version, is_version_name
from m2fpkit.runtime.errors import ExportError

DEFAULT_SPECS = Path(__file__).with_name("versions.toml")
#: a source URI's scheme (``modelscope:``, ``random:``, ``mlflow:``): anything without one is a directory
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_KEYS = {"source", "task", "channel", "compatible_api", "notes", "opset", "preprocess", "build_by_default", "int8"}


class SpecError(ExportError, ValueError):
    """versions.toml is wrong; the message names the key path."""


@dataclass(frozen=True)
class VersionSpec:
    version: str
    source: str
    #: None: whatever the checkpoint is (a ModelScope directory says so in its configuration)
    task: str | None = "multi-human"
    channel: str = "stable"
    compatible_api: tuple[str, ...] = ("1.0",)
    notes: str = ""
    opset: int = 18
    #: overrides of the task's default preprocessing (e.g. short_edge, max_size)
    preprocess: dict[str, Any] = field(default_factory=dict)
    build_by_default: bool = True
    #: also ship an int8 QDQ variant (calibrated at export) for the runtime's int8 plans
    int8: bool = False


@dataclass(frozen=True)
class SpecFile:
    versions: dict[str, VersionSpec]
    aliases: dict[str, str]

    def get(self, version: str) -> VersionSpec:
        try:
            return self.versions[version]
        except KeyError:
            known = ", ".join(self.versions) or "none"
            raise SpecError(f"no spec for {version!r} (known: {known}); pass --source to export it anyway") from None


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise SpecError(f"versions.toml → {path}: {msg}")


def anchored(source: str, base: Path) -> str:
    """``source`` with a relative directory taken relative to ``base`` (the spec file's directory)."""
    if not source or _SCHEME.match(source) or Path(source).is_absolute():
        return source
    return str((base / source).resolve())


def load(path: Path = DEFAULT_SPECS) -> SpecFile:
    """Parse a versions.toml; SpecError naming the file and key path for anything unusable."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise SpecError(f"{path}: nested too deeply") from None
    except ValueError as exc:  # TOMLDecodeError, not UTF-8, integers beyond Python's digit limit
        raise SpecError(f"{path}: {exc}") from None
    defaults = raw.get("defaults", {})
    _check(isinstance(defaults, dict), "defaults", "expected a table")
    table = raw.get("versions", {})
    _check(isinstance(table, dict), "versions", "expected a table of version specs")
    versions: dict[str, VersionSpec] = {}
    for name, body in table.items():
        p = f"versions.{name}"
        _check(is_version_name(name), p, "version names look like v1.2 or v2.0-beta")
        _check(isinstance(body, dict), p, "expected a table")
        merged = {**{k: v for k, v in defaults.items() if k in ("opset", "compatible_api")}, **body}
        unknown = set(merged) - _KEYS
        _check(not unknown, p, f"unknown key(s) {', '.join(sorted(unknown))}")
        _check(isinstance(merged.get("source"), str), f"{p}.source", "missing or not a string")
        task = merged.get("task", "multi-human")
        _check(task in TASKS, f"{p}.task", f"expected one of {', '.join(TASKS)}")
        channel = merged.get("channel", "stable")
        _check(channel in CHANNELS, f"{p}.channel", f"expected one of {', '.join(CHANNELS)}")
        api = merged.get("compatible_api", ["1.0"])
        _check(isinstance(api, list) and bool(api) and all(is_api_version(a) for a in api),
               f"{p}.compatible_api", "expected a list of strings like [\"1.0\"]")
        opset = merged.get("opset", 18)
        _check(isinstance(opset, int) and opset >= 18, f"{p}.opset", "expected an integer ≥ 18")
        int8 = merged.get("int8", False)
        _check(isinstance(int8, bool), f"{p}.int8", "expected true or false")
        pre = merged.get("preprocess", {})
        _check(isinstance(pre, dict), f"{p}.preprocess", "expected a table")
        _check("\x00" not in merged["source"], f"{p}.source", "contains a NUL character")
        source = anchored(merged["source"], Path(path).resolve().parent)
        versions[name] = VersionSpec(version=name, source=source, task=task, channel=channel,
                                     compatible_api=tuple(api), notes=str(merged.get("notes", "")), opset=opset,
                                     preprocess=dict(pre), build_by_default=bool(merged.get("build_by_default", True)),
                                     int8=int8)
    aliases = raw.get("aliases", {})
    _check(isinstance(aliases, dict), "aliases", "expected a table")
    for alias, target in aliases.items():
        _check(is_alias_name(alias), f"aliases.{alias}", "alias names are lower-case words like latest")
        _check(isinstance(target, str) and target in versions, f"aliases.{alias}",
               f"{target!r}"[:80] + " is not a version in this file")
    return SpecFile(versions=versions, aliases=dict(aliases))
