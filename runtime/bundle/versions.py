"""The one grammar of version, alias and API-version names (no path tricks), and semantic-version order.

Every check of a name calls these; the ``*_PATTERN`` strings are the same grammar as regular-expression
source for documents that must state it (the OpenAPI schema).
"""

from __future__ import annotations

import re
from functools import total_ordering

from ..errors import InvalidVersionName

_NUM = r"(0|[1-9][0-9]{0,5})"  # no leading zeros: v01.2 would be another name for v1.2
#: a version name (``v1``, ``v1.2``, ``v1.2.3``, ``v2.0-beta.1``), to be matched whole
VERSION_PATTERN = rf"v{_NUM}(?:\.{_NUM})?(?:\.{_NUM})?(?:-([0-9A-Za-z]+(?:\.[0-9A-Za-z]+)*))?"
#: an alias name (``latest``, ``canary``), to be matched whole; a string of both grammars is a version
ALIAS_PATTERN = r"[a-z][a-z0-9_-]{0,31}"
#: an API version a bundle declares and a client speaks (``1.0``, ``2.0``): digits "." digits
API_PATTERN = r"[0-9]{1,4}\.[0-9]{1,4}"
_VERSION = re.compile(VERSION_PATTERN, re.ASCII)
_ALIAS = re.compile(ALIAS_PATTERN, re.ASCII)
_API = re.compile(API_PATTERN, re.ASCII)


def is_version_name(name: str) -> bool:
    return bool(_VERSION.fullmatch(name))


def is_alias_name(name: str) -> bool:
    return bool(_ALIAS.fullmatch(name)) and not is_version_name(name)


def is_api_version(text: object) -> bool:
    return isinstance(text, str) and bool(_API.fullmatch(text))


def check_name(name: str) -> str:
    """Return ``name`` if it is a version (``v1.2``, ``v2.0-beta``) or alias (``latest``); raise otherwise."""
    if not isinstance(name, str) or not (is_version_name(name) or is_alias_name(name)):
        raise InvalidVersionName(f"{name!r} is not a version name (like v1.2 or v2.0-beta) or an alias (like latest)")
    return name


@total_ordering
class SemVer:
    """Semantic version of a version name: ``v1.2`` → 1.2.0, ``v2.0-beta`` → 2.0.0-beta."""

    __slots__ = ("major", "minor", "patch", "pre")

    def __init__(self, major: int, minor: int, patch: int, pre: str = "") -> None:
        self.major, self.minor, self.patch, self.pre = major, minor, patch, pre

    @classmethod
    def parse(cls, name: str) -> SemVer:
        m = _VERSION.fullmatch(name)
        if not m:
            raise InvalidVersionName(f"{name!r} is not a version name (like v1.2 or v2.0-beta)")
        return cls(int(m[1]), int(m[2] or 0), int(m[3] or 0), m[4] or "")

    @property
    def prerelease(self) -> bool:
        return bool(self.pre)

    def _key(self) -> tuple:
        # a pre-release sorts before its release; numeric identifiers compare numerically
        pre: tuple = (1,) if not self.pre else (0, *[(0, int(p), "") if p.isdigit() else (1, 0, p)
                                                      for p in self.pre.split(".")])
        return (self.major, self.minor, self.patch, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SemVer) and self._key() == other._key()

    def __lt__(self, other: SemVer) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" + (f"-{self.pre}" if self.pre else "")
