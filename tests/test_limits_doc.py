"""docs/limits.md lists every bound of ``ServerConfig`` with a flag ``m2fp-serve`` really has: one home for
the bounds, and a page that cannot drift from it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from m2fpkit.server.cli import main
from m2fpkit.server.config import ServerConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "limits.md"
#: ServerConfig fields that are not bounds on what a client can make the server hold or do
NOT_BOUNDS = {"bundles", "runtime", "routes_file", "admin_token", "distribution_token", "drain_timeout", "default_api"}


def rows() -> dict[str, str]:
    """First backticked cell of each table row → the row."""
    out = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([\w.]+)`\s*\|", line)
        if m:
            out[m.group(1)] = line
    return out


def test_every_bound_is_listed_with_a_flag_the_cli_has():
    documented = rows()
    bounds = {f.name for f in dataclasses.fields(ServerConfig)} - NOT_BOUNDS
    assert bounds - set(documented) == set(), "bounds missing from docs/limits.md"
    flags = {opt for p in main.params for opt in p.opts}
    for name, row in documented.items():
        named = set(re.findall(r"`(--[a-z0-9-]+)`", row))
        if name in bounds:
            assert len(named) == 1, f"{name}: expected its one flag in {row!r}"
        assert named <= flags, f"{name}: {named - flags} is not an m2fp-serve option"


def test_every_documented_default_is_the_configs():
    cfg, documented = ServerConfig(), rows()
    for name in ("max_connections_per_client", "header_timeout", "keepalive_timeout", "body_timeout",
                 "min_body_rate", "body_grace", "max_uploads", "max_uploads_per_client", "upload_wait", "max_queue",
                 "request_timeout"):
        default = documented[name].split("|")[2]
        assert re.search(rf"(?<![\d.]){getattr(cfg, name):g}(?![\d.])", default), (name, default)
    assert f"{cfg.max_body_bytes // 2**20} MiB" in documented["max_body_bytes"]
