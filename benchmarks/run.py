"""One entry point: ``python -m benchmarks.run [--quick] [--only NAMES] [--out DIR] [--require-quiet SECONDS]``.

Builds (or reuses) the bundles of the mode, records the environment and the box's SGEMM rate,
then runs the benchmarks in order — e2e, forward, options, server, memory, swaps, plans, headline,
threads, devloop — each isolated so that one failure is reported without sinking the others. Results are
written after every benchmark: ``<out>/<mode>.json``, ``<out>/<mode>.md`` and PNG plots; ``<out>``
defaults to ``benchmarks/results/<cpu-slug>/`` (results are kept per CPU model). With ``--only``, the
results of the other benchmarks already in ``<mode>.json`` are kept (each section says when it was
measured). The quiet-box guard (:mod:`benchmarks.quiet`) samples the box before the run and after
every section; each section's JSON carries ``box`` with its verdict. Nothing here asserts anything
about speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import bundles, env, quiet, report
from .common import MODES, REPO, child_env, log, run_all

BENCHMARKS = ("e2e", "forward", "options", "server", "memory", "swaps", "plans", "headline", "threads",
              "devloop")
ROLES = {"e2e": ("multi", "single"), "forward": ("multi",), "options": ("multi", "single"),
         "server": ("single",), "memory": ("multi", "heads-1", "heads-2", "seed-1", "seed-2"),
         "swaps": ("single",), "plans": ("multi",), "headline": ("multi",),
         "threads": ("multi", "heads-1", "heads-2"), "devloop": ()}
#: exit status when ``--require-quiet`` never saw a quiet box
NOT_QUIET = 3


def _module(name: str):
    import importlib
    return importlib.import_module(f"benchmarks.{'server_load' if name == 'server' else name}")


def _overall(r: dict) -> str:
    """The run's quiet-box verdict over the SGEMM measurement and every section in the results."""
    return quiet.overall({"run start": r.get("run_start_box"), "env (SGEMM)": r["env"].get("box"),
                          **{n: s.get("box") for n, s in r["results"].items()}})


def ensure_bundles(mode: str, names: list[str]) -> dict:
    roles = sorted({r for n in names for r in ROLES[n]})
    todo = bundles.missing(mode, roles)
    if not todo:
        return {}
    log(f"building {mode} bundles {', '.join(todo)} (one-off; cached in {bundles.CACHE / mode})")
    out = bundles.CACHE / mode / "built.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bundles", "--mode", mode, "--roles", ",".join(todo),
                           "--json", str(out)], cwd=REPO, env=child_env())
    if proc.returncode != 0:
        raise SystemExit(f"building the {mode} bundles failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny bundles, a few runs each (CI; seconds, not minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default: benchmarks/results/<cpu-slug>/, one per CPU model)")
    ap.add_argument("--fresh", action="store_true", help="with --only: drop earlier results instead of merging")
    ap.add_argument("--require-quiet", type=float, metavar="SECONDS", default=None,
                    help=f"wait up to SECONDS for a quiet box before starting; exit {NOT_QUIET} if none comes")
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = Path(__file__).resolve().parent / "results" / env.this_cpu_slug()
    mode = MODES["quick" if a.quick else "full"]
    names = [n.strip() for n in a.only.replace(" ", ",").split(",") if n.strip()] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    if mode.name == "quick":  # children see it: torch at 1 thread, passive OpenMP waits (tiny runs)
        os.environ["M2FP_BENCH_QUICK"] = "1"
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TMPDIR", str(a.out / "tmp"))
    (a.out / "tmp").mkdir(exist_ok=True)

    if a.require_quiet is not None:
        log(f"waiting up to {a.require_quiet:.0f} s for a quiet box")
        first, ok = quiet.wait_quiet(a.require_quiet)
        if not ok:
            log("the box never became quiet: " + "; ".join(quiet.reasons(first, True)) + " — not starting")
            return NOT_QUIET
    else:
        first = quiet.sample()
    run_start = first  # the only sample whose load average is judged (see quiet.py)
    built = ensure_bundles(mode.name, names)
    if built:  # the export children ran after the first sample: read the box again
        first = quiet.sample()
    t0 = time.perf_counter()
    path = a.out / f"{mode.name}.json"
    previous = json.loads(path.read_text()) if path.exists() and a.only and not a.fresh else {}
    r: dict = {"mode": mode.name, "parameters": mode.to_dict(), "results": previous.get("results", {}),
               "measured_at": previous.get("measured_at", {}), "errors": {}, "bundles_built_seconds": built,
               "load_average": {"start": round(os.getloadavg()[0], 2)}}
    r["env"] = env.run(mode, a.out)
    last = quiet.sample()
    r["env"]["box"] = quiet.box(first, last, run_start=first is run_start)
    r["run_start_box"] = quiet.box(run_start, run_start)
    r["bundles"] = {role: v.version for role, v in bundles.variants(mode.name).items()}
    def job(name: str):
        def run_one():
            log(f"=== {name} ===")
            t = time.perf_counter()
            out = _module(name).run(mode, a.out)
            out["_seconds"] = round(time.perf_counter() - t, 1)
            log(f"{name}: {out['_seconds']:.0f} s")
            return out
        return run_one

    # full: one benchmark at a time, results written after each; quick: two side by side (it asserts
    # nothing about speed and its tiny runs are dominated by process start-up)
    groups = [[n] for n in names] if mode.name == "full" else [names]
    for group in groups:
        outs = run_all([job(n) for n in group], parallel=1 if mode.name == "full" else 2)
        end = quiet.sample()  # every child of the section has exited
        section_box = quiet.box(last, end, run_start=False)
        last = end
        for name, out in zip(group, outs):
            if isinstance(out, Exception):  # report it and go on with the next benchmark
                r["errors"][name] = "".join(traceback.format_exception(out))
                log(f"{name} failed:\n{r['errors'][name]}")
            else:
                out["box"] = section_box
                if quiet.is_busy(section_box):
                    log(f"{name}: BUSY box — {section_box['verdict']}")
                r["results"][name] = out
                r["measured_at"][name] = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["load_average"]["end"] = round(os.getloadavg()[0], 2)
        r["box_verdict"] = _overall(r)
        files = report.write(r, a.out)
        log(f"wrote {files['md']}")
    r["skipped"] = [n for n in BENCHMARKS if n not in r["results"]]
    r["box_verdict"] = _overall(r)
    files = report.write(r, a.out)
    print(files["md"].read_text())
    log(f"done in {time.perf_counter() - t0:.0f} s: {files['json']}, {files['md']}")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
