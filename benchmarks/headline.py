"""The issue's goal cell: r101 multi-human, the 640×853 image, served over HTTP vs the ModelScope pipeline.

A real ``m2fp-serve`` (:func:`server_load.start_server`, default settings, ``visualization`` on) answers
a closed loop at concurrency 1 (:mod:`benchmarks.loadgen`), once with ``--plan fp32`` and once with
``--plan auto`` on a fresh ``--state-dir`` (the chosen plan, the process start → ``/readyz`` time
that includes the auto selection, and a restart's time that finds the cached decision). ModelScope's
own pipeline on the same checkpoint runs in e2e's child at this one size, before and after (drift
check). A direct ``Predictor.predict`` (fp32, in-process, e2e's image) gives the HTTP overhead.

Order: ModelScope, direct, fp32 server, auto server, ModelScope again. The ratio ModelScope / ours is
judged against the goals with the *faster* of the two ModelScope blocks (the smaller ratio): no fudge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import bundles
from .common import Mode, log, run_child, test_jpeg
from .e2e import size_key
from .server_load import digest, get, link_bundle, loadgen, start_server, stop_server

ROLE = "multi"
#: ModelScope / ours, p50 end to end over HTTP (issue 12)
GOALS = {"auto": 3.0, "fp32": 1.8}
#: HTTP overhead over a direct call, as a share of the end-to-end latency
OVERHEAD_GOAL = 0.05


def _served(url: str, version: str) -> dict:
    """What the server says about the version: its plan (``/meta``) and its registry status entry."""
    _, body = get(f"{url}/api/{version}/meta")
    plan = json.loads(body).get("plan") if body else None
    _, body = get(f"{url}/api/versions")
    entry = next((v for v in (json.loads(body).get("versions", []) if body else []) if v.get("version") == version), {})
    return {"plan": plan, "status": entry}


def _server_block(root: Path, version: str, image: Path, state_dir: Path, plan: str, n: int, warmup: int,
                  scratch: Path, label: str, restart: bool = False) -> dict:
    proc, url, cold = start_server(root, version, scratch / f"{label}.log",
                                   ["--plan", plan, "--state-dir", str(state_dir)])
    try:
        block: dict = {"plan_mode": plan, "start_to_ready_seconds": cold, **_served(url, version)}
        data = loadgen(["--url", f"{url}/api/{version}/parse", "--image", image, "--concurrency", 1,
                        "--requests", warmup + n], scratch, label)
        records = data["records"]
        block["warmup_requests"] = warmup
        block["http"] = digest(records[warmup:], data["wall_seconds"])
    finally:
        stop_server(proc)
    if restart:  # same state dir: the decision is cached, only the chosen plan is built and re-verified
        proc, url, again = start_server(root, version, scratch / f"{label}_restart.log",
                                        ["--plan", plan, "--state-dir", str(state_dir)])
        try:
            block["restart"] = {"start_to_ready_seconds": again, **_served(url, version)}
        finally:
            stop_server(proc)
    log(f"headline {label}: plan {(block.get('plan') or {}).get('name')}, "
        f"p50 {block['http']['latency_ok'].get('p50', float('nan')):.3f} s, ready in {cold:.1f} s")
    return block


def _modelscope(mode: Mode, image: Path, label: str, out_dir: Path) -> dict:
    from m2fpkit.runtime.bundle.config import BundleConfig

    pre = BundleConfig.read(bundles.bundle_dir(mode.name, ROLE)).preprocess
    got = run_child("e2e", ["--system", "modelscope", "--run", f"{ROLE}={bundles.modelscope_dir(mode.name, ROLE)}",
                            "--repeats", mode.e2e_repeats, "--warmup", mode.warmup, "--min-size", pre.short_edge,
                            "--max-size", pre.max_size, image], out_dir / "tmp" / mode.name, label=label)
    cell = got["tasks"][ROLE]["sizes"][image.stem]
    log(f"headline {label}: ModelScope p50 {cell['latency']['p50']:.3f} s")
    return {"latency": cell["latency"], "cpu": cell["cpu"], "stages": cell["stages"],
            "weights_identical_to_checkpoint": got["tasks"][ROLE]["weights_identical_to_checkpoint"]}


def _verdict(ratio: float | None, goal: float) -> str:
    return "MISS (not measured)" if ratio is None else ("PASS" if ratio >= goal else "MISS")


def run(mode: Mode, out_dir: Path) -> dict:
    scratch = out_dir / "tmp" / mode.name / "headline"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    w, h = mode.sizes[1]  # full: 640×853, e2e's image (same seed)
    image = scratch / f"{size_key(w, h)}.jpg"
    image.write_bytes(test_jpeg(w, h, seed=1))
    version = bundles.variants(mode.name)[ROLE].version
    root = scratch / "root"
    link_bundle(bundles.bundle_dir(mode.name, ROLE), root, copy=True)  # see server_load.run
    n = max(2, mode.e2e_repeats) if mode.name == "quick" else 5
    res: dict = {"mode": mode.name, "bundle": version, "image": size_key(w, h), "requests_per_block": n,
                 "order": ["modelscope_1", "direct", "fp32", "auto", "modelscope_2"], "goals": GOALS,
                 "overhead_goal": OVERHEAD_GOAL}
    res["modelscope_1"] = _modelscope(mode, image, "headline_modelscope_1", out_dir)
    res["direct"] = run_child("server_load", ["--bundle", bundles.bundle_dir(mode.name, ROLE), "--image", image,
                                              "--repeats", n], out_dir / "tmp" / mode.name, label="headline_direct")
    res["fp32"] = _server_block(root, version, image, scratch / "state-fp32", "fp32", n, mode.warmup, scratch, "fp32")
    res["auto"] = _server_block(root, version, image, scratch / "state-auto", "auto", n, mode.warmup, scratch, "auto",
                                restart=True)
    res["modelscope_2"] = _modelscope(mode, image, "headline_modelscope_2", out_dir)

    ms = [res[k]["latency"]["p50"] for k in ("modelscope_1", "modelscope_2")]
    res["modelscope_drift"] = ms[1] / ms[0] if ms[0] else None
    ms_fast = min(ms)
    res["ratios"] = {}
    for plan in ("fp32", "auto"):
        ours = res[plan]["http"]["latency_ok"].get("p50")
        r = ms_fast / ours if ours else None
        res["ratios"][plan] = {"modelscope_over_ours_p50": r,
                               "per_modelscope_block": [m / ours if ours else None for m in ms],
                               "goal": GOALS[plan], "verdict": _verdict(r, GOALS[plan])}
    http, direct = res["fp32"]["http"]["latency_ok"].get("p50"), res["direct"]["latency"]["p50"]
    share = (http - direct) / http if http else None
    res["http_overhead"] = {"http_p50": http, "direct_p50": direct, "share_of_end_to_end": share,
                            "goal": OVERHEAD_GOAL,
                            "verdict": "MISS (not measured)" if share is None else
                            ("PASS" if share <= OVERHEAD_GOAL else "MISS"),
                            "note": "the HTTP path also renders and encodes the overlay (visualization on by default)"}
    served, restart = res["auto"].get("plan") or {}, res["auto"].get("restart", {})
    res["auto_choice"] = {"plan": served.get("name"), "agreement": served.get("agreement"),
                          "selection_start_to_ready_seconds": res["auto"]["start_to_ready_seconds"],
                          "restart_start_to_ready_seconds": restart.get("start_to_ready_seconds"),
                          "restart_cached": (restart.get("plan") or {}).get("cached")}
    shutil.rmtree(root, ignore_errors=True)
    return res


