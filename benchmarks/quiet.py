"""Quiet-box guard: is anything else using this machine while a benchmark measures it?

A *sample* is taken while this process sleeps (an idle window of :data:`WINDOW` seconds): load average
1/5 min, the whole box's CPU utilisation over the window from ``/proc/stat`` (user + nice + system + irq
+ softirq + steal share of all jiffies), the steal share, and the three other processes that used the
most CPU in the window (``/proc/<pid>/stat``; this process and its descendants excluded).

The one rule (:func:`reasons`; benchmarks/README.md says the same): a section is **busy** if at its start
or its end the window's utilisation exceeds :data:`MAX_UTILISATION`, or steal exceeds :data:`MAX_STEAL`;
a run is busy if, before it starts anything, the 1-minute load average also exceeds
:data:`MAX_LOAD_PER_4_CORES` per four logical CPUs (0.5 on a box with ≤ 4). The load average is judged at
the run's start only: it trails the last minute, so after the run's own exports or sections it reports
our own work, while the idle window reports only what else runs. A busy section's figures are not usable.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

WINDOW = 3.0
MAX_UTILISATION = 0.10
MAX_STEAL = 0.02
MAX_LOAD_PER_4_CORES = 0.5
QUIET = "quiet"

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system (idle iowait) irq softirq steal
_STEAL = 7


def _cpu_jiffies() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat: user nice system idle iowait irq softirq steal (jiffies)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return [int(x) for x in fields[1:9]]


def _proc_times() -> dict[int, tuple[str, int, int]]:
    """pid → (command name, parent pid, utime + stime in clock ticks) of every readable process."""
    out: dict[int, tuple[str, int, int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on
        out[int(d.name)] = (name, int(rest[1]), int(rest[11]) + int(rest[12]))
    return out


def _ours(procs: dict[int, tuple[str, int, int]]) -> set[int]:
    """This process and its descendants."""
    me, ours = os.getpid(), {os.getpid()}
    for pid in procs:
        chain, p = [], pid
        while p not in ours and p > 1 and p in procs and len(chain) < 64:
            chain.append(p)
            p = procs[p][1]
        if p in ours or p == me:
            ours.update(chain)
    return ours


def sample(window: float = WINDOW) -> dict[str, Any]:
    """One reading of the box (see the module docstring); sleeps ``window`` seconds."""
    load1, load5, _ = os.getloadavg()
    j0, p0 = _cpu_jiffies(), _proc_times()
    time.sleep(window)
    j1, p1 = _cpu_jiffies(), _proc_times()
    delta = [b - a for a, b in zip(j0, j1)]
    total = sum(delta) or 1
    tick = os.sysconf("SC_CLK_TCK")
    ours = _ours(p1) | _ours(p0)
    used = sorted(((p1[pid][2] - p0[pid][2], pid, p1[pid][0]) for pid in p1
                   if pid in p0 and pid not in ours and p1[pid][2] > p0[pid][2]), reverse=True)[:3]
    return {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "window_seconds": window,
            "load1": round(load1, 2), "load5": round(load5, 2), "logical_cpus": os.cpu_count() or 1,
            "utilisation": round(sum(delta[i] for i in _BUSY_FIELDS) / total, 4),
            "steal": round(delta[_STEAL] / total, 4),
            "top_other": [{"pid": pid, "name": name, "cpu_share": round(ticks / tick / window, 3)}
                          for ticks, pid, name in used]}


def load_limit(logical_cpus: int) -> float:
    """Highest 1-minute load average a quiet start allows: 0.5 up to 4 CPUs, scaled linearly above."""
    return MAX_LOAD_PER_4_CORES * max(1.0, logical_cpus / 4)


def reasons(s: dict[str, Any], at_start: bool) -> list[str]:
    """Why sample ``s`` is busy (empty: quiet) — the one rule of the module docstring."""
    out = []
    if s["utilisation"] > MAX_UTILISATION:
        top = ", ".join(f"{p['name']} {100 * p['cpu_share']:.0f}%" for p in s.get("top_other", []))
        out.append(f"{'start' if at_start else 'end'} utilisation {100 * s['utilisation']:.0f}% > "
                   f"{100 * MAX_UTILISATION:.0f}%" + (f" ({top})" if top else ""))
    if s["steal"] > MAX_STEAL:
        out.append(f"{'start' if at_start else 'end'} steal {100 * s['steal']:.1f}% > {100 * MAX_STEAL:.0f}%")
    if at_start and s["load1"] > load_limit(s["logical_cpus"]):
        out.append(f"start load1 {s['load1']:.2f} > {load_limit(s['logical_cpus']):.2f}")
    return out


def verdict(start: dict[str, Any], end: dict[str, Any], run_start: bool = True) -> str:
    """``"quiet"`` or ``"busy: <reasons>"`` for a section that began at ``start`` and ended at ``end``;
    ``run_start``: ``start`` was taken before the run did anything (its load average counts)."""
    why = [r for r in reasons(start, True) if run_start or not r.startswith("start load1")] + reasons(end, False)
    return QUIET if not why else "busy: " + "; ".join(why)


def box(start: dict[str, Any], end: dict[str, Any], run_start: bool = True) -> dict[str, Any]:
    """The ``box`` entry of a section's JSON."""
    return {"start": start, "end": end, "verdict": verdict(start, end, run_start)}


def is_busy(entry: dict[str, Any] | None) -> bool:
    """Whether a ``box`` entry (or a missing one: unknown is not quiet) says busy."""
    return not entry or entry.get("verdict") != QUIET


def overall(boxes: dict[str, dict[str, Any]]) -> str:
    """The run's verdict: quiet only if every section was."""
    busy = sorted(name for name, b in boxes.items() if is_busy(b))
    return QUIET if boxes and not busy else "busy: " + (", ".join(busy) if busy else "no section measured")


def wait_quiet(timeout: float, window: float = WINDOW) -> tuple[dict[str, Any], bool]:
    """Sample until one is quiet as a start sample or ``timeout`` seconds passed: (last sample, quiet?)."""
    deadline = time.monotonic() + timeout
    while True:
        s = sample(window)
        if not reasons(s, True) or time.monotonic() >= deadline:
            return s, not reasons(s, True)
