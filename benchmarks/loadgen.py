"""A small HTTP load generator (aiohttp client), run in its own process on loopback.

- closed loop: ``--concurrency C`` clients, each sending the next request when its last one is
  answered, until ``--requests N`` were sent, ``--duration`` elapsed or ``--stop-file`` exists;
- open loop: arrivals at ``--rate R`` per second for ``--duration`` seconds, regardless of answers
  (what a server at capacity really faces).

Every request is recorded: start time (epoch), latency, status, whether ``Retry-After`` was sent,
and the server's own timing breakdown when the answer is a parse result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from .common import write_json


async def _one(session, url: str, body: bytes, records: list, timeout: float) -> None:
    import aiohttp

    t0 = time.time()
    p0 = time.perf_counter()
    rec: dict = {"start": t0}
    try:
        async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            payload = await r.read()
            rec.update(status=r.status, retry_after=r.headers.get("Retry-After"),
                       version=r.headers.get("X-Model-Version"))
            if r.status == 200:
                try:
                    rec["server_timing"] = json.loads(payload).get("timing")
                except ValueError:
                    rec["error"] = "bad json"
    except Exception as exc:  # connection errors and timeouts are failures to count, not to raise
        rec.update(status=0, error=f"{type(exc).__name__}: {exc}"[:200])
    rec["latency"] = time.perf_counter() - p0
    records.append(rec)


async def closed_loop(url: str, body: bytes, concurrency: int, requests: int | None, duration: float | None,
                      stop_file: Path | None, timeout: float) -> list[dict]:
    import aiohttp

    records: list[dict] = []
    sent = 0
    deadline = time.perf_counter() + duration if duration else None

    def more() -> bool:
        if requests is not None and sent >= requests:
            return False
        if deadline is not None and time.perf_counter() >= deadline:
            return False
        return not (stop_file is not None and stop_file.exists())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client() -> None:
            nonlocal sent
            while more():
                sent += 1
                await _one(session, url, body, records, timeout)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


async def open_loop(url: str, body: bytes, rate: float, duration: float, timeout: float) -> list[dict]:
    import aiohttp

    records: list[dict] = []
    n = max(1, int(rate * duration))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(session, url, body, records, timeout)))
        await asyncio.gather(*tasks)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--url", required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--concurrency", default="1", help="C, or C1,C2,… for several closed-loop levels in turn")
    ap.add_argument("--requests", default=None, help="N, or N1,N2,… (one per level)")
    ap.add_argument("--duration", type=float)
    ap.add_argument("--rate", type=float, help="open loop: arrivals per second")
    ap.add_argument("--stop-file", type=Path)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    body = a.image.read_bytes()
    t0 = time.perf_counter()
    if a.rate:
        recs = asyncio.run(open_loop(a.url, body, a.rate, a.duration or 10.0, a.timeout))
        write_json(a.json, {"wall_seconds": time.perf_counter() - t0, "records": recs})
        return 0
    levels = [int(c) for c in a.concurrency.split(",")]
    counts = [int(n) for n in a.requests.split(",")] if a.requests else [None] * len(levels)
    out = {}
    for c, n in zip(levels, counts):
        t1 = time.perf_counter()
        recs = asyncio.run(closed_loop(a.url, body, c, n, a.duration, a.stop_file, a.timeout))
        out[str(c)] = {"wall_seconds": time.perf_counter() - t1, "records": recs}
    if len(levels) == 1:
        write_json(a.json, next(iter(out.values())))
    else:
        write_json(a.json, {"levels": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
