"""The HTTP server under load: overhead over a direct runtime call, concurrency, 4× capacity.

``m2fp-serve`` runs as a subprocess on 127.0.0.1 (one bundle, preloaded; default settings:
one parse at a time on all cores, queue of 8); the load generator (:mod:`benchmarks.loadgen`,
aiohttp client) is a separate process. Measured:

1. a direct ``Predictor.predict(bytes)`` in a fresh process (same bundle, same image) — the baseline;
2. closed loop at concurrency 1, 2, 4, 8: HTTP latency p50/p99 and throughput; overhead ratio =
   HTTP p50 at concurrency 1 / direct p50 (the HTTP path also renders the base64 PNG overlay, as
   the seed's API did: the server's own timing breakdown shows how much that is);
3. open loop at 4 × the best measured throughput for a bounded time: status counts (200, 503 with
   Retry-After, others), p99 of admitted requests, server RSS (VmRSS sampled, VmHWM).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import bundles
from .common import REPO, Mode, child_env, jpeg_bytes, log, person_image, proc_status, summary, write_json

ROLE = "single"


# ------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_bundle(src: Path, root: Path, version: str | None = None, copy: bool = False) -> Path:
    """Put bundle ``src`` at ``root/m2fp/<version>`` (hard links unless ``copy``)."""
    dst = root / bundles.MODEL / (version or src.name)
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, copy_function=shutil.copy2 if copy else os.link)
    return dst


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def start_server(root: Path, preload: str, log_path: Path, extra: list[str] = (), ready_timeout: float = 900):
    """Start m2fp-serve; returns (process, base URL, seconds from process start to /readyz 200)."""
    port = free_port()
    exe = Path(sys.executable).with_name("m2fp-serve")
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-c", "from m2fpkit.server.cli import main; main()"])
    cmd += ["--bundles", str(root), "--host", "127.0.0.1", "--port", str(port), "--preload", preload,
            "--log-level", "warning", "--timeout", "600", *extra]
    lf = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=lf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"m2fp-serve exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        status, _ = get(f"{url}/readyz", timeout=2)
        if status == 200:
            return proc, url, time.perf_counter() - t0
        if time.perf_counter() - t0 > ready_timeout:
            proc.kill()
            raise RuntimeError("m2fp-serve did not become ready")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loadgen(args: list, scratch: Path, label: str, sample_pid: int | None = None) -> dict:
    """Run the load generator process; while it runs, sample ``sample_pid``'s RSS every 0.5 s."""
    out = scratch / f"{label}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.loadgen", *map(str, args), "--json", str(out)]
    with open(scratch / f"{label}.log", "w") as lf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=lf, stderr=subprocess.STDOUT)
        rss = []
        while proc.poll() is None:
            if sample_pid:
                rss.append(proc_status(sample_pid).get("VmRSS", 0))
            time.sleep(0.5)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"loadgen {label} failed: {(scratch / f'{label}.log').read_text()[-2000:]}")
    data = json.loads(out.read_text())
    data["server_rss_samples"] = rss
    return data


def digest(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r.get("status") == 200]
    codes: dict[str, int] = {}
    for r in records:
        codes[str(r.get("status"))] = codes.get(str(r.get("status")), 0) + 1
    timing_keys = ("decode", "preprocess", "inference", "postprocess", "render", "queue")
    server = {k: summary([r["server_timing"][k] / 1000 for r in ok if r.get("server_timing", {}).get(k) is not None])
              for k in timing_keys}
    return {"requests": len(records), "status_counts": codes,
            "retry_after_on_503": sum(1 for r in records if r.get("status") == 503 and r.get("retry_after")),
            "latency_ok": summary([r["latency"] for r in ok]), "throughput_rps": len(ok) / wall if wall else 0,
            "wall_seconds": wall, "server_timing_p50": {k: v.get("p50") for k, v in server.items()},
            "errors": sorted({r["error"] for r in records if r.get("error")})[:5]}


# ---------------------------------------------------------------------------------- direct call

def direct(bundle: Path, image: Path, repeats: int) -> dict:
    from m2fpkit.runtime.predictor import Predictor

    from .common import measure
    pred = Predictor.load(bundle)
    data = image.read_bytes()
    wall, cpu, _ = measure(lambda: pred.predict(data), repeats, warmup=1)
    return {"latency": wall, "cpu": cpu}


# ------------------------------------------------------------------------------------------ run

def run(mode: Mode, out_dir: Path) -> dict:
    from .common import run_child

    scratch = out_dir / "tmp" / mode.name / "server"
    scratch.mkdir(parents=True, exist_ok=True)
    v = bundles.variants(mode.name)[ROLE]
    root = scratch / "root"
    shutil.rmtree(root, ignore_errors=True)
    # a copy: a hard link would make the cached bundle's files multiply linked, which onnx refuses to read
    # (the options benchmark quantises from the cache, side by side with this one in quick mode)
    link_bundle(bundles.bundle_dir(mode.name, ROLE), root, copy=True)
    w, h = mode.sizes[1]
    image = scratch / f"{w}x{h}.jpg"
    image.write_bytes(jpeg_bytes(person_image(w, h, seed=7)))
    res: dict = {"bundle": v.version, "image": f"{w}x{h}", "levels": {},
                 "load_generator": "benchmarks.loadgen (aiohttp client, separate process, keep-alive)"}
    log("server: direct Predictor.predict baseline")
    direct_args = ["--bundle", bundles.bundle_dir(mode.name, ROLE), "--image", image, "--repeats", mode.direct_repeats]
    if mode.name == "full":
        res["direct"] = run_child("server_load", direct_args, out_dir / "tmp" / mode.name, label="server_direct")
        proc, url, cold = start_server(root, v.version, scratch / "server.log")
    else:  # quick: the direct run and the server start side by side
        from .common import run_all
        direct, started = run_all([
            lambda: run_child("server_load", direct_args, out_dir / "tmp" / mode.name, label="server_direct"),
            lambda: start_server(root, v.version, scratch / "server.log")], parallel=2)
        for x in (direct, started):
            if isinstance(x, Exception):
                if not isinstance(started, Exception):
                    stop_server(started[0])
                raise x
        res["direct"] = direct
        proc, url, cold = started
    res["cold_start_to_ready_seconds"] = cold
    res["server_rss_idle"] = proc_status(proc.pid).get("VmRSS")
    parse_url = f"{url}/api/{v.version}/parse"
    try:
        counts = [max(mode.server_min_requests, mode.server_per_client * c) for c in mode.server_levels]
        log(f"server: concurrency {mode.server_levels}, {counts} requests (one load-generator process, levels in turn)")
        data = loadgen(["--url", parse_url, "--image", image, "--concurrency", ",".join(map(str, mode.server_levels)),
                        "--requests", ",".join(map(str, counts))], scratch, "closed")
        levels = data["levels"] if "levels" in data else {str(mode.server_levels[0]): data}
        for c, lv in levels.items():
            res["levels"][c] = digest(lv["records"], lv["wall_seconds"])
        capacity = max(lv["throughput_rps"] for lv in res["levels"].values())
        rate = 4 * capacity
        log(f"server: open loop at 4× capacity = {rate:.2f} req/s for {mode.overload_seconds:.0f} s")
        data = loadgen(["--url", parse_url, "--image", image, "--rate", rate, "--duration", mode.overload_seconds],
                       scratch, "overload", sample_pid=proc.pid)
        ov = digest(data["records"], data["wall_seconds"])
        ov.update(capacity_rps=capacity, offered_rps=rate, duration_seconds=mode.overload_seconds,
                  server_rss_max=max(data["server_rss_samples"], default=None),
                  server_vmhwm=proc_status(proc.pid).get("VmHWM"))
        res["overload"] = ov
        one = res["levels"][str(mode.server_levels[0])]
        res["overhead_ratio_p50"] = one["latency_ok"]["p50"] / res["direct"]["latency"]["p50"]
        res["overhead_ms_p50"] = 1000 * (one["latency_ok"]["p50"] - res["direct"]["latency"]["p50"])
        res["direct_throughput_rps"] = 1 / res["direct"]["latency"]["p50"]
    finally:
        stop_server(proc)
    shutil.rmtree(root, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    write_json(a.json, direct(a.bundle, a.image, a.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
