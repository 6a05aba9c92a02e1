"""Memory with 1, 2, 3 versions loaded, default vs tuned settings, and after 20 load/unload cycles.

Each measurement is a fresh subprocess (quick mode: one process per kind and setting, loading the
versions one after another) that loads the versions with ``Predictor.load`` and runs each once
(``Predictor.run``) on the same 384×512 input tensor (the arena grows on the first run), then reads
``/proc/self/smaps_rollup`` (Rss, Pss, Pss_Anon, Pss_File) and VmHWM. Kinds:

- ``same-backbone``: ``multi`` + two versions whose transformer decoder/heads differ (backbone and
  pixel decoder weights byte-identical) — what the seed's "shared backbone cache" hoped to share;
- ``different``: ``multi`` + two versions with every weight different.

Weights live in private memory: loading a version reads its data file once (hashing it against the
manifest) and copies every tensor into a private buffer (``runtime/weights.py``); nothing is mapped
from the bundle's files, so weights count as anonymous memory (Pss_Anon, not Pss_File) and the
kernel cannot evict them as it could clean pages of a file mapping — what RSS shows stays resident.

Settings: ``default`` = ``RuntimeSettings()`` (a tensor identical across loaded versions is held
once, ``share_weights``); ``unshared`` = the default without that (every session gets its own copy
of its weights, onnxruntime's own behaviour); ``tuned`` (``m2fp-serve --lean-memory``) = default +
shared arena + ``disable_prepacking`` + BASIC optimisation. The seed's "sum of versions" is
n × (one version's footprint) on top of the empty process. The leak check loads, runs and closes
one version 20 times and reads RSS after each.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from . import bundles
from .common import Mode, log, mb, proc_status, run_all, run_child, smaps_rollup, write_json

KINDS = {"same-backbone": ("multi", "heads-1", "heads-2"), "different": ("multi", "seed-1", "seed-2")}
SETTINGS = ("unshared", "default", "tuned")
INPUT_HW = (512, 384)


def settings_for(name: str):
    from m2fpkit.runtime.session import RuntimeSettings
    if name == "tuned":
        return RuntimeSettings(shared_arena=True, disable_prepacking=True, optimization="basic")
    return RuntimeSettings(share_weights=name != "unshared")


def reading() -> dict:
    s = smaps_rollup()
    st = proc_status()
    return {k: s.get(k, 0) for k in ("Rss", "Pss", "Pss_Anon", "Pss_File")} | {"VmHWM": st.get("VmHWM", 0)}


def child_versions(dirs: list[Path], settings: str) -> dict:
    import numpy as np

    from m2fpkit.runtime.predictor import Predictor
    from m2fpkit.runtime.session import SessionFactory

    factory = SessionFactory(settings_for(settings))
    x = np.random.default_rng(0).standard_normal((1, 3, *INPUT_HW), dtype=np.float32)
    out = {"empty": reading(), "after": []}
    preds = []
    for d in dirs:
        t0 = time.perf_counter()
        p = Predictor.load(d, factory)
        load = time.perf_counter() - t0
        loaded = reading()
        p.run(x)
        preds.append(p)
        out["after"].append({"version": d.name, "load_seconds": load, "loaded": loaded, "after_run": reading()})
    return out


def child_cycles(d: Path, cycles: int, settings: str) -> dict:
    import numpy as np

    from m2fpkit.runtime.memory import trim_heap
    from m2fpkit.runtime.predictor import Predictor
    from m2fpkit.runtime.session import SessionFactory

    factory = SessionFactory(settings_for(settings))
    x = np.random.default_rng(0).standard_normal((1, 3, *INPUT_HW), dtype=np.float32)
    out = {"empty": reading(), "cycles": []}
    for _ in range(cycles):
        p = Predictor.load(d, factory)
        p.run(x)
        loaded = reading()["Rss"]
        p.close()
        del p
        gc.collect()
        trim_heap()
        out["cycles"].append({"loaded_rss": loaded, "after_close_rss": reading()["Rss"]})
    return out


def run(mode: Mode, out_dir: Path) -> dict:
    res: dict = {"input_hw": list(INPUT_HW), "kinds": {}, "fresh_process_each": mode.memory_fresh_each}
    tmp = out_dir / "tmp" / mode.name
    cells = []  # (kind, settings, n or None for incremental)
    for kind, roles in KINDS.items():
        res["kinds"][kind] = {"versions": [bundles.bundle_dir(mode.name, r).name for r in roles]}
        for st in SETTINGS:
            if mode.memory_fresh_each:
                cells += [(kind, st, n) for n in mode.memory_counts]
            else:
                cells.append((kind, st, None))

    def job(kind: str, st: str, n: int | None):
        dirs = [bundles.bundle_dir(mode.name, r) for r in KINDS[kind]]
        count = n or max(mode.memory_counts)
        label = f"memory_{kind}_{st}" + (f"_{n}" if n else "")
        return lambda: (log(f"memory: {kind}, {st}, {count} version(s)"),
                        run_child("memory", ["--settings", st, *dirs[:count]], tmp, label=label))[1]

    # quick mode: cells side by side (PSS of shared libraries is then split between them)
    outs = run_all([job(*c) for c in cells], parallel=1 if mode.memory_fresh_each else 4)
    for (kind, st, n), r in zip(cells, outs):
        if isinstance(r, Exception):
            raise r
        rows = res["kinds"][kind].setdefault(st, {})
        if n:
            rows[str(n)] = {"empty": r["empty"], **r["after"][-1]}
        else:
            for m in mode.memory_counts:
                rows[str(m)] = {"empty": r["empty"], **r["after"][m - 1]}
    for kind in KINDS:
        for st in SETTINGS:
            rows = res["kinds"][kind][st]
            one = rows["1"]["after_run"]["Rss"] - rows["1"]["empty"]["Rss"]
            for n, row in rows.items():
                row["sum_of_versions_rss"] = row["empty"]["Rss"] + int(n) * one
                row["vs_sum_of_versions"] = row["after_run"]["Rss"] / row["sum_of_versions_rss"]
            log(f"memory {kind} {st}: " + ", ".join(f"{n}: {mb(r['after_run']['Rss'])} MB" for n, r in rows.items()))
    log(f"memory: {mode.leak_cycles} load/unload cycles")
    r = run_child("memory", ["--settings", "default", "--cycles", mode.leak_cycles,
                             bundles.bundle_dir(mode.name, "multi")],
                  out_dir / "tmp" / mode.name, label="memory_cycles")
    cyc = r["cycles"]
    res["leak"] = {"cycles": len(cyc), "empty_rss": r["empty"]["Rss"],
                   "after_first_close_rss": cyc[0]["after_close_rss"],
                   "after_last_close_rss": cyc[-1]["after_close_rss"],
                   "growth_first_to_last": cyc[-1]["after_close_rss"] - cyc[0]["after_close_rss"],
                   "loaded_rss_first": cyc[0]["loaded_rss"], "loaded_rss_last": cyc[-1]["loaded_rss"],
                   "after_close_rss": [c["after_close_rss"] for c in cyc]}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--settings", choices=SETTINGS, default="default")
    ap.add_argument("--cycles", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("bundles", nargs="+", type=Path)
    a = ap.parse_args(argv)
    out = child_cycles(a.bundles[0], a.cycles, a.settings) if a.cycles else child_versions(a.bundles, a.settings)
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
