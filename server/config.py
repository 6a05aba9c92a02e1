"""Server settings: one frozen object, built by ``m2fp-serve`` or by tests.

Invariant: runtime options live in ``runtime`` (:class:`~m2fpkit.runtime.registry.RegistryOptions`, the
object the library takes too) and nowhere else; this class adds only what is the server's own. Host and
port belong to the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from m2fpkit.runtime.registry.options import RegistryOptions
from m2fpkit.runtime.roots import default_root


@dataclass(frozen=True)
class ServerConfig:
    #: the bundle root (``--bundles``, else ``$M2FP_BUNDLES``, else ``./bundles``)
    bundles: Path = field(default_factory=default_root)
    #: everything the registry and the sessions use (limits, TTL, budget, preload, watch, trust, state dir)
    runtime: RegistryOptions = field(default_factory=RegistryOptions)
    #: routes file (TOML or JSON), hot-reloaded; None: no weights, no route aliases
    routes_file: Path | None = None
    #: bearer token enabling /admin/*; disabled when None
    admin_token: str | None = None
    #: bearer token enabling the read-only bundle downloads (/bundles); disabled when None
    distribution_token: str | None = None
    max_body_bytes: int = 20 * 2**20
    #: seconds a request body may take to arrive once it may be read (408 and the connection closed after)
    body_timeout: float = 30.0
    #: request bodies received at once (bodies in reception hold at most this × max_body_bytes)
    max_uploads: int = 4
    #: seconds a request waits for an upload slot before 503 + Retry-After
    upload_wait: float = 1.0
    #: parses allowed to wait for a worker before new ones get 503 + Retry-After
    max_queue: int = 8
    request_timeout: float = 60.0
    drain_timeout: float = 30.0
    #: the API version this server speaks when a client does not say (X-API-Version)
    default_api: str | None = None
