"""Hot swaps under steady load, over HTTP: failed requests, p99 during swaps vs steady, load time, cold start.

Run twice, with ``m2fp-serve --plan auto`` (the default: the engine the box serves fastest, whose build
each swap repeats) and ``--plan fp32`` (onnxruntime, the reference).

``m2fp-serve`` serves one version V (the single-human bundle) with its file watcher on; a load
generator process keeps ``swap_clients`` closed-loop clients busy the whole time. After a steady
phase, V's bundle is replaced on disk ``swaps`` times with ``bundle.writer.stage(store, V, force=True)``
(a full copy of the bundle whose ``config.json`` notes differ, so the content — and its manifest —
is new and the server must verify, load, warm up and self-test it aside, then flip and drain the old
one). The bundle is written at background priority, as ``m2fp-bundle`` (install, pull) runs on a serving
box (``runtime.priority``). Each swap waits until ``/metrics`` counts it before the next one. The first
answer of each client is its warm-up (the served session's first run at this size) and is left out of
the steady phase. Cold start is process start
→ ``/readyz`` 200; after the swaps the server is started again on the same store (and state directory):
restart is that start → ``/readyz`` 200, with how the last content's plan was decided (``auto``: from
the plan cache when the swaps' inherited choice could be cached — every candidate of the first decision
verified — else timed again).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from pathlib import Path

from m2fpkit.runtime.priority import run_in_background

from . import bundles
from .common import Mode, jpeg_bytes, log, person_image, summary
from .server_load import ROLE, digest, get, link_bundle, start_server, stop_server

_SWAPS = re.compile(r'^m2fp_version_events\{event="swaps"\}\s+([0-9.e+]+)', re.M)
_REQUESTS = re.compile(r'^m2fp_requests_total\{[^}]*\}\s+([0-9.e+]+)', re.M)


def requests_answered(url: str) -> int:
    status, body = get(f"{url}/metrics")
    return int(sum(float(x) for x in _REQUESTS.findall(body.decode(errors="replace")))) if status == 200 else 0


def swaps_done(url: str) -> int:
    status, body = get(f"{url}/metrics")
    m = _SWAPS.search(body.decode(errors="replace")) if status == 200 else None
    return int(float(m.group(1))) if m else 0


def publish(src: Path, root: Path, version: str, n: int) -> None:
    """Replace ``version`` on disk with a copy of ``src`` whose notes say ``swap n``."""
    from m2fpkit.runtime.bundle import writer
    from m2fpkit.runtime.bundle.config import BundleConfig
    from m2fpkit.runtime.bundle.store import BundleStore

    cfg = BundleConfig.read(src)
    with writer.stage(BundleStore(root, bundles.MODEL), version, force=True) as staged:
        stage = staged.dir
        for p in src.rglob("*"):
            rel = p.relative_to(src)
            if p.is_dir():
                (stage / rel).mkdir(parents=True, exist_ok=True)
            elif rel.as_posix() not in ("config.json", "manifest.json", "manifest.sig"):
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, stage / rel)
        staged.finish(dataclasses.replace(cfg, notes=f"{cfg.notes} (swap {n})"))


def version_status(url: str, version: str) -> dict:
    import json

    status, body = get(f"{url}/api/versions")
    if status != 200:
        return {}
    return next((v for v in json.loads(body)["versions"] if v["version"] == version), {})


#: execution plans compared: the default (``auto``, whichever engine the box serves fastest) and the reference
PLANS = ("auto", "fp32")


def run(mode: Mode, out_dir: Path) -> dict:
    return {"plans": {plan: _run_plan(mode, out_dir, plan) for plan in PLANS}}


def _run_plan(mode: Mode, out_dir: Path, plan: str) -> dict:
    scratch = out_dir / "tmp" / mode.name / "swaps" / plan
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    v = bundles.variants(mode.name)[ROLE]
    src = bundles.bundle_dir(mode.name, ROLE)
    root = scratch / "root"
    link_bundle(src, root, copy=True)
    w, h = mode.sizes[0]
    image = scratch / f"{w}x{h}.jpg"
    image.write_bytes(jpeg_bytes(person_image(w, h, seed=11)))
    proc, url, cold = start_server(root, v.version, scratch / "server.log", ["--plan", plan])
    res: dict = {"plan_mode": plan, "served_plan": version_status(url, v.version).get("plan"),
                 "bundle": v.version, "image": f"{w}x{h}", "clients": mode.swap_clients,
                 "cold_start_to_ready_seconds": cold, "swaps_requested": mode.swaps}
    stop = scratch / "stop"
    swap_log: list[dict] = []
    try:
        import subprocess
        import sys

        from .common import REPO, child_env
        out = scratch / "load.json"
        lg = subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", "--url", f"{url}/api/{v.version}/parse",
                               "--image", str(image), "--concurrency", str(mode.swap_clients),
                               "--stop-file", str(stop), "--json", str(out)],
                              cwd=REPO, env=child_env(), stdout=open(scratch / "load.log", "w"),
                              stderr=subprocess.STDOUT)
        log(f"swaps: steady load for {mode.steady_seconds:.0f} s (and at least {2 * mode.swap_clients} answers)")
        t_steady = time.perf_counter()
        while (time.perf_counter() - t_steady < mode.steady_seconds
               or requests_answered(url) < 2 * mode.swap_clients) and lg.poll() is None:
            time.sleep(0.2)
        swap_start = time.time()
        before = swaps_done(url)
        for n in range(1, mode.swaps + 1):
            t0 = time.perf_counter()
            run_in_background(publish, src, root, v.version, n)
            published = time.perf_counter() - t0
            deadline = time.perf_counter() + 900
            while swaps_done(url) < before + n and time.perf_counter() < deadline and lg.poll() is None:
                time.sleep(0.1)
            st = version_status(url, v.version)
            swap_log.append({"n": n, "publish_seconds": published,
                             "publish_to_swapped_seconds": time.perf_counter() - t0,
                             "load_seconds": st.get("load_seconds"), "state": st.get("state")})
            log(f"swaps: {n}/{mode.swaps} swapped in {swap_log[-1]['publish_to_swapped_seconds']:.1f} s "
                f"(load {st.get('load_seconds')} s)")
        swap_end = time.time()
        time.sleep(0.5)
        stop.touch()
        lg.wait(timeout=1200)
        import json
        data = json.loads(out.read_text())
        recs = data["records"]
        warmup = {id(r) for r in sorted(recs, key=lambda r: r["start"])[:mode.swap_clients]}
        steady = [r for r in recs if r["start"] < swap_start and id(r) not in warmup]
        during = [r for r in recs if swap_start <= r["start"] <= swap_end]
        res.update(
            swaps_completed=swaps_done(url) - before,
            steady=digest(steady, swap_start - min((r["start"] for r in recs), default=swap_start)),
            during_swaps=digest(during, swap_end - swap_start),
            failed_requests=sum(1 for r in recs if r.get("status") != 200),
            total_requests=len(recs),
            load_seconds=summary([s["load_seconds"] for s in swap_log if s["load_seconds"] is not None]),
            publish_to_swapped=summary([s["publish_to_swapped_seconds"] for s in swap_log]),
            swap_log=swap_log,
        )
        sp99, dp99 = res["steady"]["latency_ok"].get("p99"), res["during_swaps"]["latency_ok"].get("p99")
        res["p99_ratio_during_vs_steady"] = dp99 / sp99 if sp99 and dp99 else None
        sp95, dp95 = res["steady"]["latency_ok"].get("p95"), res["during_swaps"]["latency_ok"].get("p95")
        res["p95_ratio_during_vs_steady"] = dp95 / sp95 if sp95 and dp95 else None
    finally:
        stop.touch()
        stop_server(proc)
    proc, url, res["restart_to_ready_seconds"] = start_server(root, v.version, scratch / "restart.log",
                                                              ["--plan", plan])
    try:
        res["restart_plan"] = version_status(url, v.version).get("plan")
    finally:
        stop_server(proc)
    shutil.rmtree(root, ignore_errors=True)
    return res
