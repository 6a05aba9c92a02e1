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
    #: seconds to finish requests on shutdown (``--drain-timeout``)
    drain_timeout: float = 30.0

    # ---------------------------------------------------------------------------------------------------
    # Bounds: what one client can make the server hold or do. Every bound of the server is a field below,
    # with its flag; docs/limits.md lists each with its default, flag and status (a test keeps them in step).
    # A "client" is the peer address of the TCP connection (an IPv6 address by its /64); X-Forwarded-For is
    # never trusted. Runtime bounds (--max-pixels, --concurrency) live in ``runtime`` (RegistryOptions).

    # inbound bounds (server/connections.py, server/intake.py, server/admission.py): connections, heads, bodies
    #: open connections, all clients together; 0: the descriptor limit (RLIMIT_NOFILE) minus those in use at
    #: start, a reserve (``connections.FD_RESERVE``) and one accept batch (``connections.BACKLOG``). Over it a new
    #: connection gets 503 and is closed
    max_connections: int = 0
    #: open connections from one client address (0: no per-client cap; set that behind a proxy, whose address
    #: every client shares). Over it the client's oldest idle connection is closed, else the new one gets 503
    max_connections_per_client: int = 64
    #: seconds from a connection's accept, or from the first byte of its next request, to the complete request
    #: head (request line and headers); after it 408 and the connection closed. An idle keep-alive connection
    #: gets ``keepalive_timeout`` instead
    header_timeout: float = 5.0
    #: seconds an idle keep-alive connection stays open between requests
    keepalive_timeout: float = 75.0
    #: largest request body (413 above)
    max_body_bytes: int = 20 * 2**20
    #: seconds a request body may take to arrive once it may be read (408 and the connection closed after)
    body_timeout: float = 30.0
    #: bytes/s a request body must average once ``body_grace`` s have passed (408 and closed below)
    min_body_rate: int = 4096
    #: seconds a body may take before ``min_body_rate`` applies (connection set-up, slow start)
    body_grace: float = 5.0
    #: request bodies received at once (bodies in reception hold at most this × max_body_bytes)
    max_uploads: int = 4
    #: of those, bodies received at once from one client address (0: no per-client cap)
    max_uploads_per_client: int = 2
    #: seconds a request waits for an upload slot before 503 + Retry-After
    upload_wait: float = 1.0
    #: parses allowed to wait for a worker before new ones get 503 + Retry-After (the parses run at once are
    #: ``runtime.settings.concurrent_runs``, ``--concurrency``: its one home)
    max_queue: int = 8
    #: seconds a parse may take, queue included, before 504
    request_timeout: float = 60.0

    # outbound bounds (server/replies.py): what one client can make the server build, hold and send
    #: largest parse reply (/api parse, /api/compare, OIP infer); 413 above, before inference when it can be told
    max_reply_bytes: int = 128 * 2**20
    #: largest OIP output sent as JSON numbers (binary data is 4 bytes per pixel, JSON up to 6); 413 above
    max_json_output_bytes: int = 16 * 2**20
    #: reply bytes built and not yet taken by their clients, all clients together; 503 + Retry-After above
    reply_bytes_in_flight: int = 384 * 2**20
    #: the same for one client address
    reply_bytes_per_client: int = 128 * 2**20
    #: seconds a client has to take a whole reply; after that the connection is closed (counted)
    write_timeout: float = 30.0
    #: the API version this server speaks when a client does not say (X-API-Version)
    default_api: str | None = None
