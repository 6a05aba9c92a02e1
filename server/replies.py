"""Parse replies at bounded cost: their size, the bytes waiting to be taken, the time a client has to take them.

Invariants (every parse reply: ``/api/{v}/parse``, ``/api/compare``, OIP ``infer``):

- A reply holds a :class:`Lease` on the app's :class:`ReplyBudget` for its bytes until it is sent or its
  connection is gone. OIP takes it before inference, from the image header and the outputs asked for
  (``server/oip_codec.py`` ``output_bound``); ``/api`` replies, whose size depends on compression, take it
  at their encoded size, as soon as the worker's body is encoded.
- Refusals: a reply over ``max_reply_bytes`` is 413 ``reply_too_large``; one that would put more than
  ``reply_bytes_per_client`` of one client address, or ``reply_bytes_in_flight`` of all clients, in flight
  is 503 ``replies_in_flight`` with ``Retry-After`` (when the oldest lease in the way runs out).
- :func:`send` writes a reply in slices of :data:`SLICE` bytes (the transport holds one slice, not a copy
  of the reply) within ``write_timeout`` s of its start; a client that has not taken it by then is cut
  (connection aborted, ``m2fp_replies_cut_total{reason="write_timeout"}``), one that hung up is counted
  ``client_gone``; either way the lease is released.
- No reply is serialised on the event loop: :func:`json_reply` runs :func:`json_bytes` in an executor
  thread (:func:`off_loop`), as OIP runs its codec.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from . import keys
from .config import ServerConfig
from .connections import client_key
from .errors import HTTPProblem
from .metrics import Metrics

log = logging.getLogger(__name__)

#: bytes handed to the transport at once
SLICE = 1 << 20
T = TypeVar("T")


def _mb(n: int) -> str:
    return f"{n / 2**20:g}"


class Lease:
    """Bytes of one reply, counted in flight from :meth:`ReplyBudget.reserve` until :meth:`release`."""

    def __init__(self, budget: ReplyBudget, client: str, nbytes: int) -> None:
        self.budget, self.client, self.nbytes = budget, client, nbytes
        #: monotonic time the reply must be taken by (set when sending starts)
        self.deadline = time.monotonic() + budget.write_timeout
        self.released = False

    def resize(self, nbytes: int, what: str = "the reply") -> None:
        """The reply's real size, once built (413 when it is over the cap; in flight either way until sent)."""
        if self.released:
            return
        self.budget.check_size(nbytes, what)
        self.budget._adjust(self.client, nbytes - self.nbytes)
        self.nbytes = nbytes

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget._release(self)


class ReplyBudget:
    """Reply bytes in flight, per client address and in total (one per app; see the module docstring)."""

    def __init__(self, max_reply: int, in_flight: int, per_client: int, write_timeout: float,
                 metrics: Metrics | None = None) -> None:
        if min(max_reply, in_flight, per_client) < 1 or write_timeout <= 0:
            raise ValueError("reply limits must be positive")
        self.max_reply, self.in_flight_cap, self.per_client_cap = max_reply, in_flight, per_client
        self.write_timeout = write_timeout
        self.metrics = metrics
        self.in_flight = 0
        self.by_client: dict[str, int] = {}
        self._leases: set[Lease] = set()

    @classmethod
    def of(cls, cfg: ServerConfig, metrics: Metrics | None = None) -> ReplyBudget:
        return cls(cfg.max_reply_bytes, cfg.reply_bytes_in_flight, cfg.reply_bytes_per_client, cfg.write_timeout,
                   metrics)

    def check_size(self, nbytes: int, what: str = "the reply") -> None:
        """413 for a reply that could never be sent: over the reply cap, or over what may be in flight."""
        over = [f"{cap} bytes ({flag} {_mb(cap)})" for cap, flag in (
            (self.max_reply, "--max-reply-mb"), (self.per_client_cap, "--reply-per-client-mb"),
            (self.in_flight_cap, "--replies-in-flight-mb")) if nbytes > cap]
        if over:
            raise HTTPProblem(413, "reply_too_large", f"{what} would be {nbytes} bytes, more than the limit of "
                                                      f"{' and '.join(over)}; ask for less or send a smaller image")

    def reserve(self, client: str, nbytes: int, what: str = "the reply") -> Lease:
        """A lease on ``nbytes`` for ``client``, or 413 (over the reply cap) / 503 (too much in flight)."""
        self.check_size(nbytes, what)
        mine = self.by_client.get(client, 0)
        if mine + nbytes > self.per_client_cap:
            self._refuse(f"{mine} bytes of replies to this client address are waiting to be taken (limit "
                         f"{self.per_client_cap}, --reply-per-client-mb {_mb(self.per_client_cap)})",
                         [le for le in self._leases if le.client == client])
        if self.in_flight + nbytes > self.in_flight_cap:
            self._refuse(f"{self.in_flight} bytes of replies are waiting to be taken (limit {self.in_flight_cap}, "
                         f"--replies-in-flight-mb {_mb(self.in_flight_cap)})", list(self._leases))
        lease = Lease(self, client, 0)
        self._leases.add(lease)
        self._adjust(client, nbytes)
        lease.nbytes = nbytes
        return lease

    def _refuse(self, detail: str, holding: Sequence[Lease]) -> None:
        soonest = min((le.deadline for le in holding), default=time.monotonic() + 1)
        retry = max(1, math.ceil(soonest - time.monotonic()))
        raise HTTPProblem(503, "replies_in_flight", f"server busy: {detail}; retry in {retry} s",
                          {"Retry-After": str(retry)})

    def _adjust(self, client: str, delta: int) -> None:
        self.in_flight += delta
        left = self.by_client.get(client, 0) + delta
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)
        if self.metrics is not None:
            self.metrics.reply_bytes.set(self.in_flight)

    def _release(self, lease: Lease) -> None:
        self._leases.discard(lease)
        self._adjust(lease.client, -lease.nbytes)


BUDGET = web.AppKey("reply_budget", ReplyBudget)


def setup(app: web.Application) -> None:
    """The app's reply budget, from its config (``app[keys.CONFIG]`` and ``app[keys.METRICS]`` set first)."""
    app[BUDGET] = ReplyBudget.of(app[keys.CONFIG], app[keys.METRICS])


def client_address(request: web.Request) -> str:
    """Whom a reply's bytes are counted against: the connection's client (``connections.client_key``)."""
    transport = request.transport
    return client_key(transport.get_extra_info("peername") if transport is not None else None)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the loop's executor: parsing and encoding that take milliseconds never run on the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def json_bytes(body: Any) -> bytes:
    """A reply's JSON text (compact)."""
    return json.dumps(body, separators=(",", ":")).encode()


async def json_reply(request: web.Request, body: Any, headers: dict[str, str] | None = None,
                     what: str = "the reply") -> web.StreamResponse:
    """``body`` as JSON, encoded off the loop, leased and sent under the budget (see the module docstring)."""
    payload = await off_loop(json_bytes, body)
    del body
    lease = request.app[BUDGET].reserve(client_address(request), len(payload), what)
    return await send(request, lease, (payload,), "application/json", headers)


async def send(request: web.Request, lease: Lease, chunks: Sequence[bytes | memoryview], content_type: str,
               headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Send ``chunks`` as one 200 reply within the write deadline; release ``lease`` however it ends."""
    budget = request.app[BUDGET]
    lease.deadline = time.monotonic() + budget.write_timeout
    deadline = asyncio.timeout_at(asyncio.get_running_loop().time() + budget.write_timeout)
    try:
        resp = web.StreamResponse(headers=headers)
        resp.content_type = content_type
        resp.content_length = sum(memoryview(c).nbytes for c in chunks)
        async with deadline:
            await resp.prepare(request)
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                for i in range(0, view.nbytes, SLICE):
                    await resp.write(view[i:i + SLICE])
            await resp.write_eof()
    except TimeoutError:
        if not deadline.expired():
            raise
        _cut(request, "write_timeout", lease)
    except ConnectionError:
        _cut(request, "client_gone", lease)
    finally:
        lease.release()
    return resp


def _cut(request: web.Request, reason: str, lease: Lease) -> None:
    if request.transport is not None:
        request.transport.abort()
    request.app[keys.METRICS].replies_cut.labels(reason).inc()
    log.info("reply of %d bytes to %s cut: %s", lease.nbytes, lease.client, reason.replace("_", " "))
