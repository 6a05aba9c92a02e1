"""``m2fp-serve``: the HTTP server over a bundle root.

Parses arguments into one :class:`~m2fpkit.server.config.ServerConfig` (its ``runtime`` is the library's
:class:`~m2fpkit.runtime.registry.RegistryOptions`; option defaults are read from those classes) and
runs :func:`~m2fpkit.server.app.make_app`. The bundle root must exist (``--bundles``, else
``$M2FP_BUNDLES``, else ``./bundles``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from m2fpkit.runtime import plans
from m2fpkit.runtime.cli_errors import Command
from m2fpkit.runtime.registry.options import RegistryOptions
from m2fpkit.runtime.roots import ENV_STATE_DIR, bundles_option

from .config import ServerConfig
from .logs import RateLimit


class JsonFormatter(logging.Formatter):
    FIELDS = ("request_id", "status", "version", "rule", "latency_ms")

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RateLimit())  # a repeated warning or error at most a few times a minute (server/logs.py)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


#: every default of the runtime options (the CLI shows them; nothing restates them)
_RUNTIME = RegistryOptions(plan=plans.DEFAULT_MODE)  # the plan's default is read at invocation (env M2FP_PLAN)


def _mb(_ctx: click.Context, _param: click.Parameter, value: float) -> int:
    """A ``--…-mb`` option as the bytes its config field holds."""
    return int(value * 2**20)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@bundles_option()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar=ENV_STATE_DIR,
              help=f"Writable directory for the last-known-good record (env {ENV_STATE_DIR}). Default: the store "
                   "directory <bundles>/m2fp when it is writable; otherwise last-known-good is off, said once at "
                   "start and in /readyz and /api/versions.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--routes", "routes_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Routes file (TOML or JSON): weights, aliases, sticky key, shadow. Hot-reloaded.")
@click.option("--admin-token", envvar="M2FP_ADMIN_TOKEN", help="Bearer token enabling /admin/* (env M2FP_ADMIN_TOKEN).")
@click.option("--distribution-token", envvar="M2FP_DISTRIBUTION_TOKEN",
              help="Bearer token enabling read-only bundle downloads at /bundles for m2fp-bundle pull "
                   "(env M2FP_DISTRIBUTION_TOKEN; must differ from the admin token).")
@click.option("--max-connections", default=ServerConfig.max_connections, show_default=True, type=click.IntRange(min=0),
              help="Open connections, all clients together (503 and closed above); 0: the descriptor limit "
                   "(ulimit -n) minus those in use at start and a reserve. See docs/limits.md.")
@click.option("--max-connections-per-client", default=ServerConfig.max_connections_per_client, show_default=True,
              type=click.IntRange(min=0),
              help="Open connections from one client address (its oldest idle one is closed, else 503); 0: no "
                   "per-client cap (behind a proxy every client has the proxy's address).")
@click.option("--header-timeout", default=ServerConfig.header_timeout, show_default=True,
              type=click.FloatRange(min=0.001),
              help="Seconds from a connection's accept, or the first byte of its next request, to the complete "
                   "request head (408 and closed after).")
@click.option("--keepalive-timeout", default=ServerConfig.keepalive_timeout, show_default=True,
              type=click.FloatRange(min=0.001), help="Seconds an idle keep-alive connection stays open.")
@click.option("--max-body-mb", default=ServerConfig.max_body_bytes / 2**20, show_default=True,
              help="Largest request body (413 above).")
@click.option("--min-body-rate", default=ServerConfig.min_body_rate, show_default=True, type=click.IntRange(min=1),
              help="Bytes/s a request body must average after --body-grace (408 and closed below).")
@click.option("--body-grace", default=ServerConfig.body_grace, show_default=True, type=click.FloatRange(min=0),
              help="Seconds a request body may take before --min-body-rate applies.")
@click.option("--max-uploads-per-client", default=ServerConfig.max_uploads_per_client, show_default=True,
              type=click.IntRange(min=0),
              help="Of --max-uploads, bodies received at once from one client address (0: no per-client cap).")
@click.option("--upload-wait", default=ServerConfig.upload_wait, show_default=True, type=click.FloatRange(min=0),
              help="Seconds a request waits for an upload slot before 503 + Retry-After.")
@click.option("--body-timeout", default=ServerConfig.body_timeout, show_default=True, type=click.FloatRange(min=0.001),
              help="Seconds a request body may take to arrive (408 and the connection closed after).")
@click.option("--max-uploads", default=ServerConfig.max_uploads, show_default=True, type=click.IntRange(min=1),
              help="Request bodies received at once (more wait briefly, then 503 + Retry-After); bodies in "
                   "reception hold at most this × --max-body-mb.")
@click.option("--max-reply-mb", "max_reply_bytes", default=ServerConfig.max_reply_bytes / 2**20, show_default=True,
              type=click.FloatRange(min=0.001), callback=_mb,
              help="Largest parse reply (/api parse, compare, OIP infer): 413 above, before inference for OIP.")
@click.option("--max-json-output-mb", "max_json_output_bytes", default=ServerConfig.max_json_output_bytes / 2**20,
              show_default=True, type=click.FloatRange(min=0.001), callback=_mb,
              help="Largest OIP output as JSON numbers (413 above, naming binary data: 4 bytes a pixel).")
@click.option("--replies-in-flight-mb", "reply_bytes_in_flight", default=ServerConfig.reply_bytes_in_flight / 2**20,
              show_default=True, type=click.FloatRange(min=0.001), callback=_mb,
              help="Reply bytes built and not yet taken, all clients together (503 + Retry-After above).")
@click.option("--reply-per-client-mb", "reply_bytes_per_client", default=ServerConfig.reply_bytes_per_client / 2**20,
              show_default=True, type=click.FloatRange(min=0.001), callback=_mb,
              help="Reply bytes built and not yet taken, one client address (503 + Retry-After above).")
@click.option("--write-timeout", default=ServerConfig.write_timeout, show_default=True,
              type=click.FloatRange(min=0.001),
              help="Seconds a client has to take a whole reply (the connection is closed after, counted).")
@click.option("--max-pixels", default=_RUNTIME.limits.max_pixels, show_default=True,
              help="Largest image, checked before decoding.")
@click.option("--max-queue", default=ServerConfig.max_queue, show_default=True,
              help="Parses that may wait; more get 503 + Retry-After.")
@click.option("--concurrency", default=_RUNTIME.settings.concurrent_runs, show_default=True,
              help="Parses run at once (threads split between them).")
@click.option("--timeout", "request_timeout", default=ServerConfig.request_timeout, show_default=True,
              help="Seconds before a 504.")
@click.option("--idle-ttl", default=_RUNTIME.idle_ttl, show_default=True,
              help="Unload unpinned versions idle this long (s; 0: never).")
@click.option("--memory-budget-mb", type=int, help="Evict least recently used unpinned versions above this.")
@click.option("--preload", multiple=True, help="Versions to load at start (latest and aliases always are).")
@click.option("--lean-memory", is_flag=True,
              help="Shared arena, no weight prepacking, basic graph optimisation: 3 r101 versions take 47-68 % "
                   "of the memory of 3 separate ones, at some latency cost (see README, Benchmarks).")
@click.option("--public-key", "public_keys", multiple=True, envvar="M2FP_PUBLIC_KEY",
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Trusted Ed25519 public key (PEM); repeatable (env M2FP_PUBLIC_KEY, paths separated by ':'). "
                   "Only bundles signed by one of them load; others are marked failed with the reason.")
@click.option("--plan", default=plans.default_mode, show_default=plans.DEFAULT_MODE, type=click.Choice(plans.MODES),
              help="Execution plan per version: auto = the fastest plan verified on the bundle's golden sample on "
                   f"this CPU (a later plan of the list must beat the current choice, paired, by "
                   f">{plans.TIE_MARGIN:.0%} on the same engine, >{plans.ENGINE_MARGIN:.0%} on another; "
                   "decision cached in the state dir); fp32 = onnxruntime fp32 (the reference); or a plan "
                   "name. A plan that cannot run or verify is skipped, never served. Default: $M2FP_PLAN, else auto.")
@click.option("--drain-timeout", default=ServerConfig.drain_timeout, show_default=True,
              help="Seconds to finish requests on shutdown.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
def main(bundles: Path, state_dir: Path | None, host: str, port: int, routes_file: Path | None,
         admin_token: str | None, distribution_token: str | None, max_body_mb: float, body_timeout: float,
         max_uploads: int, max_pixels: int,
         max_queue: int, concurrency: int, request_timeout: float, idle_ttl: float, memory_budget_mb: int | None,
         preload: tuple[str, ...], lean_memory: bool, public_keys: tuple[Path, ...], plan: str, drain_timeout: float,
         log_format: str, log_level: str, **bounds: Any) -> None:
    """Serve M2FP bundles over HTTP: parse API, versions, WebUI, metrics. Bounds: docs/limits.md."""
    if distribution_token and distribution_token == admin_token:
        raise click.BadParameter("must differ from the admin token", param_hint="--distribution-token")
    setup_logging(log_format, log_level)
    from m2fpkit.runtime.bundle.signature import TrustPolicy
    from m2fpkit.runtime.errors import BundleError
    from m2fpkit.runtime.imageio import limit_decoder_pixels
    from m2fpkit.runtime.session import cap_library_threads

    from .app import make_app
    from .serve import BindError, bind, serve

    try:
        trust = TrustPolicy.from_keys(list(public_keys))
    except BundleError as exc:
        raise click.BadParameter(str(exc), param_hint="--public-key") from None
    try:
        runtime = dataclasses.replace(
            _RUNTIME, limits=dataclasses.replace(_RUNTIME.limits, max_pixels=max_pixels),
            settings=dataclasses.replace(_RUNTIME.settings, concurrent_runs=concurrency, shared_arena=lean_memory,
                                         disable_prepacking=lean_memory,
                                         optimization="basic" if lean_memory else _RUNTIME.settings.optimization),
            idle_ttl=idle_ttl, memory_budget=memory_budget_mb * 2**20 if memory_budget_mb else None,
            preload=preload, trust=trust, state_dir=state_dir, plan=plan)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    cfg = ServerConfig(bundles=bundles, runtime=runtime, routes_file=routes_file, admin_token=admin_token,
                       distribution_token=distribution_token, max_body_bytes=int(max_body_mb * 2**20),
                       body_timeout=body_timeout, max_uploads=max_uploads,
                       max_queue=max_queue, request_timeout=request_timeout, drain_timeout=drain_timeout, **bounds)
    try:
        socks = bind(host, port)  # before any work: a busy port fails now, in one line
    except BindError as exc:
        raise click.ClickException(str(exc)) from None
    cap_library_threads(1)
    limit_decoder_pixels(max_pixels)
    serve(make_app(cfg), socks, cfg)
