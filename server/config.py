"""Server settings (one frozen object, built by the CLI or by tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from m2fpkit.runtime.predictor import ImageLimits
from m2fpkit.runtime.session import RuntimeSettings

DEFAULT_BUNDLES = Path(__file__).resolve().parent.parent / "bundles"


@dataclass(frozen=True)
class ServerConfig:
    bundles: Path = DEFAULT_BUNDLES
    routes_file: Path | None = None
    admin_token: str | None = None
    #: bearer token enabling the read-only bundle downloads (/bundles); disabled when None
    distribution_token: str | None = None
    max_body_bytes: int = 20 * 2**20
    limits: ImageLimits = field(default_factory=ImageLimits)
    #: parses allowed to wait for a worker before new ones get 503 + Retry-After
    max_queue: int = 8
    request_timeout: float = 60.0
    drain_timeout: float = 30.0
    idle_ttl: float = 600.0
    memory_budget_mb: int | None = None
    preload: tuple[str, ...] = ()
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    #: trusted Ed25519 public keys (PEM paths); when given, unsigned or wrongly signed bundles never load
    trusted_keys: tuple[Path, ...] = ()
    watch: bool = True
    watch_polling: bool = False
    #: the API version this server speaks when a client does not say (X-API-Version)
    default_api: str | None = None
