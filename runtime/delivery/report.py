"""What ``m2fp-bundle verify`` / ``install`` report: every check on one bundle, as text or JSON.

The bundle layer's file checks (:class:`~m2fpkit.runtime.bundle.reader.Verification`) followed by what
delivery checks around them: the archive, the graph ⇄ config and the golden self-test.
"""

from __future__ import annotations

from typing import Any

from ..bundle.reader import Verification


class Report(Verification):
    """The checks of one bundle (a directory or an archive), named by ``subject`` (what was given)."""

    subject: str

    def __init__(self, subject: str, version: str | None = None) -> None:
        super().__init__(version)
        self.subject = subject

    def render(self) -> str:
        lines = [f"{self.subject}" + (f" → {self.version}" if self.version else "")]
        lines += [f"  {c.status:<4}  {c.name:<10} {c.detail}" for c in self.checks]
        failure = self.first_failure()
        lines.append("verified" if self.ok else f"NOT verified: {failure.name if failure else 'no checks'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "version": self.version, "ok": self.ok,
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks]}
