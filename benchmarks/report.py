"""Results → ``<mode>.json``, a Markdown report ``<mode>.md`` and PNG plots.

``python -m benchmarks.report benchmarks/results/<cpu>/full.json`` re-renders the Markdown and plots
from a saved JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import quiet
from .common import write_json

BUSY_BANNER = "**BUSY — figures not usable**"


def _f(x, nd: int = 2, unit: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def _mb(n) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


def _pct(x, nd: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{nd}f} %"


def _lat(s: dict | None) -> str:
    if not s or not s.get("n"):
        return "–"
    return f"{s['p50']:.3f} / {s['p95']:.3f}"


# ------------------------------------------------------------------------------------- sections

def section_env(r: dict) -> list[str]:
    env = r.get("env", {})
    cpu = env.get("cpu", {})
    flags = ", ".join(f for f, on in cpu.get("flags", {}).items() if on) or "–"
    sg = env.get("sgemm_gflops", {})
    v = env.get("versions", {})
    la = r.get("load_average", {})
    out = [f"# M2FP benchmarks — {r.get('mode')} mode", "", *_run_banner(r),
           f"- Date: {env.get('date')} (UTC); git {env.get('git', {}).get('commit')}"
           f"{' (dirty)' if env.get('git', {}).get('dirty') else ''}; total run time {_f(r.get('seconds'), 0)} s",
           f"- CPU: {cpu.get('model')}, {cpu.get('cores')} cores, {cpu.get('memory_gb')} GB"
           f"{', virtualised' if cpu.get('virtualised') else ''}; flags: {flags}",
           f"- SGEMM (n={sg.get('n')}, all cores, best of {sg.get('repeats')}): numpy {sg.get('numpy')}, "
           f"onnxruntime {sg.get('onnxruntime')}, torch {sg.get('torch')} GFLOP/s → peak **{sg.get('peak')} GFLOP/s**",
           "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
           f"- Load average (1 min) at start / end: {la.get('start')} / {la.get('end')} — other processes share "
           "the cores, so wall times are noisy; CPU-seconds and ratios measured side by side are the robust numbers",
           ""]
    when = sorted({v[:16] for v in (r.get("measured_at") or {}).values() if v})
    if len(when) > 1:
        out[-1:-1] = [f"- Sections were measured by separate `--only` runs ({when[0]} … {when[-1]} UTC); the lines "
                      "above describe the last one, each section's footer says when it ran"]
    if r.get("errors"):
        out += ["**Parts that failed:** " + "; ".join(f"{k}: {e.splitlines()[-1][:200] if e else ''}"
                                                    for k, e in r["errors"].items()), ""]
    if r.get("skipped"):
        out += [f"**Not run:** {', '.join(r['skipped'])}", ""]
    return out


def _run_banner(r: dict) -> list[str]:
    """The loud line at the top: the run's quiet-box verdict (benchmarks/quiet.py)."""
    verdict = r.get("box_verdict")
    if verdict == quiet.QUIET:
        return ["Box: **quiet** at the start and end of every section (benchmarks/quiet.py).", ""]
    return [f"> {BUSY_BANNER}: {verdict or 'no quiet-box record (run predates the guard)'}. "
            "Sections marked BUSY below must not be quoted.", ""]


def _box_line(box: dict | None) -> list[str]:
    if not quiet.is_busy(box):
        return []
    if not box:
        return [f"> {BUSY_BANNER}: no quiet-box record for this section.", ""]
    return [f"> {BUSY_BANNER}: {box['verdict']}.", ""]


def _box_footer(box: dict | None) -> str:
    if not box:
        return ""
    a, b = box["start"], box["end"]
    return (f"; box start util {100 * a['utilisation']:.0f} %, steal {100 * a['steal']:.1f} %, load1 {a['load1']}"
            f" / end util {100 * b['utilisation']:.0f} %, steal {100 * b['steal']:.1f} %")


def section_plans(p: dict) -> list[str]:
    out = ["## Execution plans on this box (multi-human bundle, one process)", "",
           f"Golden agreement with the export's PyTorch fp32 reference; a plan is verified on evidence against "
           f"ort-fp32 (floor {_pct(p.get('min_agreement'))} of decisive pixels, docs/plans.md); forward "
           f"on the {p.get('image')} image's input {p.get('input_shape')}, plans alternating, {p.get('repeats')} runs "
           "each; speed-up = paired ratio ort-fp32 / plan (median). A plan the golden check refused is timed too "
           "(what it would give where it verifies); the runtime never serves it.", "",
           "| plan | engine / precision | status | build s | agreement label / semantic | forward p50 / p95 s "
           "| **speed-up vs ort-fp32** |", "|---|---|---|---|---|---|---|"]
    for name, e in p.get("plans", {}).items():
        status = ("unavailable: " + e["unavailable"]) if "unavailable" in e else (
            ("refused: " + e["refused"]) if "refused" in e else "verified")
        ag = e.get("agreement") or {}
        sp = e.get("speedup_vs_fp32") or {}
        out.append(f"| {name} | {e.get('engine')} / {e.get('precision')} | {status} | {_f(e.get('build_seconds'), 1)} "
                   f"| {_pct(ag.get('label'), 2)} / {_pct(ag.get('semantic'), 2)} | {_lat(e.get('forward'))} "
                   f"| {_f(sp.get('p50'))}× |")
    a = p.get("auto") or {}
    out += ["", f"`--plan auto` chose **{a.get('chosen')}**; that load (every candidate built, verified, timed) "
            f"took {_f(a.get('load_seconds'), 1)} s, a reload with the cached decision "
            f"{_f(a.get('cached_reload_seconds'), 1)} s (cache used: {a.get('reload_used_cache')}).", ""]
    return out


def section_headline(h: dict) -> list[str]:
    out = ["## Headline: r101 multi-human over HTTP vs the ModelScope pipeline (goal cell of issue 12)", "",
           f"Image {h.get('image')}, concurrency 1, {h.get('requests_per_block')} requests per block after warm-up, "
           f"default server settings (overlay rendered). Order: {', '.join(h.get('order', []))}. Ratios use the faster "
           "ModelScope block.", "",
           "| block | p50 / p95 s |", "|---|---|",
           f"| ModelScope (1st) | {_lat(h['modelscope_1']['latency'])} |",
           f"| direct `Predictor.predict` (fp32) | {_lat(h['direct']['latency'])} |",
           f"| HTTP `--plan fp32` | {_lat(h['fp32']['http']['latency_ok'])} |",
           f"| HTTP `--plan auto` ({(h['auto'].get('plan') or {}).get('name')}) "
           f"| {_lat(h['auto']['http']['latency_ok'])} |",
           f"| ModelScope (2nd; drift {_f(h.get('modelscope_drift'))}×) | {_lat(h['modelscope_2']['latency'])} |", "",
           "| goal | measured | verdict |", "|---|---|---|"]
    # a verdict only counts for the goal cell (full mode) measured on a quiet box
    void = [why for why, bad in (("busy box", quiet.is_busy(h.get("box"))),
                                 (f"{h.get('mode')} mode, not the goal cell", h.get("mode") != "full")) if bad]
    suffix = f" — not usable ({'; '.join(void)})" if void else ""
    for plan in ("auto", "fp32"):
        r = h["ratios"][plan]
        out.append(f"| ModelScope / ours ({plan}) ≥ {r['goal']}× | {_f(r['modelscope_over_ours_p50'])}× "
                   f"(per block {', '.join(_f(x) for x in r['per_modelscope_block'])}) | **{r['verdict']}**{suffix} |")
    o = h["http_overhead"]
    out.append(f"| HTTP overhead ≤ {_pct(o['goal'], 0)} of end to end | {_pct(o['share_of_end_to_end'])} "
               f"(HTTP {_f(o['http_p50'], 3)} s vs direct {_f(o['direct_p50'], 3)} s; includes the overlay) "
               f"| **{o['verdict']}**{suffix} |")
    c = h.get("auto_choice", {})
    out += ["", f"Auto plan {c.get('plan')} (agreement {_pct(c.get('agreement'), 2)}): process start → ready "
            f"{_f(c.get('selection_start_to_ready_seconds'), 1)} s with the selection, "
            f"{_f(c.get('restart_start_to_ready_seconds'), 1)} s on restart "
            f"(cached decision: {c.get('restart_cached')}).", ""]
    return out


def section_threads(t: dict) -> list[str]:
    out = ["## Thread pools: versions busy at once", "",
           f"One client thread per busy version looping `Predictor.predict` on the {t.get('image')} JPEG, "
           f"{t.get('runs_per_client')} runs each; versions {', '.join(t.get('versions', []))}; each setting in its "
           "own process. Throughput in images/s; latency p50 / p95 s (a client's wait for the admission slot "
           "included).",
           "", "| setting | 1 busy | 2 busy | 3 busy |", "|---|---|---|---|"]
    for name, s in t.get("settings", {}).items():
        cells = []
        for n in ("1", "2", "3"):
            c = s.get("busy", {}).get(n)
            cells.append("–" if not c else f"{_f(c['throughput_ips'])} img/s, {_lat(c['latency'])}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out + [""]


def section_devloop(d: dict) -> list[str]:
    c, w = d["cold"], d["cached"]
    return ["## Developer loop: one tiny export", "",
            f"`m2fp-export {d['version']}` in its own process, process start → exit, {d['repeats']} runs each, "
            "alternating. Cold: an empty graph cache (the first export after changing the export code or the "
            "architecture); cached: the architecture traced before, by another demo version (other weights).", "",
            "| graph cache | p50 / max s | goal |", "|---|---|---|",
            f"| cold | {_f(c['p50'], 1)} / {_f(c['max'], 1)} | ≤ {_f(d['goal_seconds'], 0)} s: {d['cold_verdict']} |",
            f"| cached | {_f(w['p50'], 1)} / {_f(w['max'], 1)} | ≤ {_f(d['goal_seconds'], 0)} s: "
            f"**{d['verdict']}** |", "",
            f"Cold / cached: {_f(d['cold_over_cached'], 2)}×.", ""]


def section_e2e(e: dict) -> list[str]:
    out = ["## End to end: image bytes → result (ours vs ModelScope pipeline, same weights)", "",
           f"{e['repeats']} timed runs after {e['warmup']} warm-up per cell; latency p50 / p95 in seconds; CPU = "
           "CPU-seconds per image (all threads); peak RSS in MB while parsing that size. Speed-up = ModelScope / ours.",
           "",
           "| task | image (w×h) | ours p50 / p95 | ModelScope p50 / p95 | **speed-up p50** | CPU-s ours / MS (ratio) "
           "| peak RSS ours / MS MB | instances ours / MS | label-map agreement |",
           "|---|---|---|---|---|---|---|---|---|"]
    order = e.get("sizes") or []

    def rows_of(t: dict):
        return [(k, t["sizes"][k]) for k in order if k in t["sizes"]] or list(t["sizes"].items())

    for task, t in e["tasks"].items():
        for size, row in rows_of(t):
            o, m = row["ours"], row["modelscope"]
            ag = row["agreement"]
            out.append(f"| {task} ({t['bundle']}) | {size} | {_lat(o['latency'])} | {_lat(m['latency'])} | "
                       f"**{row['speedup_p50']:.2f}×** | {o['cpu']['p50']:.2f} / {m['cpu']['p50']:.2f} "
                       f"({row['cpu_ratio']:.2f}×) | {_mb(o['peak_rss'])} / {_mb(m['peak_rss'])} | "
                       f"{o['instances']} / {m['instances']} | {_pct(ag['label_map_agreement'], 2)} |")
    out += ["", "Where the time goes (p50 seconds per stage):", "",
            "| task | image | system | decode | preprocess | inference | postprocess | render | encode |",
            "|---|---|---|---|---|---|---|---|---|"]
    for task, t in e["tasks"].items():
        for size, row in rows_of(t):
            for sysname in ("ours", "modelscope"):
                st = row[sysname]["stages"]
                out.append(f"| {task} | {size} | {sysname} | " + " | ".join(
                    _f(st.get(k), 3) for k in ("decode", "preprocess", "inference", "postprocess", "render",
                                               "encode")) + " |")
    for cell, err in e.get("errors", {}).items():
        out += ["", f"**{cell} failed:** {err.strip().splitlines()[-1][:300]}"]
    rows = [(task, size, row["post_trained_like"]) for task, t in e["tasks"].items()
            for size, row in rows_of(t) if "post_trained_like" in row]
    if rows:
        out += ["", "Multi-human postprocessing alone on *trained-like* outputs (3 people, 15 parts; random "
                "weights give no instance above the thresholds, which flatters select-before-upsample):", "",
                "| image | ours p50 s | ModelScope p50 s | speed-up | instances ours / MS |", "|---|---|---|---|---|"]
        for _task, size, p in rows:
            out.append(f"| {size} | {p['ours']['latency']['p50']:.3f} | {p['modelscope']['latency']['p50']:.3f} | "
                       f"{p['speedup_p50']:.2f}× | {p['ours']['instances']} / {p['modelscope']['instances']} |")
    return out + [""]


def section_forward(f: dict) -> list[str]:
    out = ["## Forward only: PyTorch eager vs onnxruntime, against the SGEMM peak", ""]
    for r in f.values():
        if not isinstance(r, dict) or "sizes" not in r:
            continue
        sg = r["sgemm_gflops"]
        out += [f"Bundle {r.get('bundle')} ({r['parameters'] / 1e6:.2f} M parameters), {r['threads']} threads; "
                f"SGEMM measured in the same process just before: {sg['peak']} GFLOP/s wall-clock, "
                f"{_f(sg.get('peak_per_cpu_second'), 1)} GFLOP per CPU-second. Runs alternate torch / ort / "
                "ort at level ALL (the `ort-fp32-nchwc` plan). "
                "'% of SGEMM (CPU)' compares GFLOP per CPU-second of the forward with SGEMM's: the same "
                "ratio as wall-clock on an idle box, but much less disturbed by other processes.", "",
                "| input (h×w) | GMAC | torch p50 / p95 s | ORT p50 / p95 s | ORT speed-up (paired) | ORT GFLOP/s | "
                "ORT % of SGEMM (wall) | **ORT % of SGEMM (CPU)** | torch % (wall / CPU) | max |Δ| logits / masks |"
                " `ort-fp32-nchwc` p50 s, paired vs ORT, % of SGEMM (wall / CPU) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for size, e in r["sizes"].items():
            d = e["max_abs_diff"]
            o, t = e["onnxruntime"], e["torch"]
            n = e.get("onnxruntime_nchwc")
            nchwc = (f"{n['latency']['p50']:.3f}, {e['nchwc_paired_speedups']['p50']:.2f}×, "
                     f"{n['pct_of_sgemm']:.0f} % / {_f(n.get('pct_of_sgemm_cpu'), 0, ' %')}") if n else "–"
            out.append(f"| {size} | {e['gmacs']:.1f} | {_lat(t['latency'])} | {_lat(o['latency'])} | "
                       f"{e['paired_speedups']['p50']:.2f}× | {o['gflops']:.1f} | {o['pct_of_sgemm']:.0f} % | "
                       f"**{_f(o.get('pct_of_sgemm_cpu'), 0, ' %')}** | {t['pct_of_sgemm']:.0f} % / "
                       f"{_f(t.get('pct_of_sgemm_cpu'), 0, ' %')} | {d['pred_logits']:.1e} / {d['pred_masks']:.1e} | "
                       f"{nchwc} |")
        first = next(iter(r["sizes"].values()))
        parts = first["macs"]["by_part"]
        out += ["", "MACs by part: " + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in parts.items())
                + "; by aten op: "
                + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in first["macs"]["by_aten_op"].items()), ""]
        prof = first.get("profile")
        if prof:
            out += [f"onnxruntime per-node profile at {next(iter(r['sizes']))} (the third run of a new session: "
                    f"{prof['run_seconds']:.3f} s, kernels {prof['kernel_seconds']:.3f} s):", "",
                    "| op type | share of kernel time | seconds | nodes | achieved GFLOP/s (op family) | % of SGEMM |",
                    "|---|---|---|---|---|---|"]
            for op, v in sorted(prof["by_op"].items(), key=lambda kv: -kv[1]["seconds"])[:14]:
                out.append(f"| {op} | {100 * v['share']:.1f} % | {v['seconds']:.3f} | {v['nodes']} | "
                           f"{_f(v.get('family_gflops'), 1)} | {_f(v.get('family_pct_of_sgemm'), 0, ' %')} |")
            out += ["", "| model part | share | seconds |", "|---|---|---|"]
            for part, v in sorted(prof["by_part"].items(), key=lambda kv: -kv[1]["seconds"]):
                out.append(f"| {part} | {100 * v['share']:.1f} % | {v['seconds']:.3f} |")
            out += ["", "Slowest nodes: " + "; ".join(f"{n['node']} ({n['op']}) {1000 * n['seconds']:.0f} ms"
                                                       for n in prof["top_nodes"][:6])]
        after = first.get("profile_nchwc")
        if prof and after:
            out += ["", f"Before / after by op type: the runtime default (EXTENDED, {prof['kernel_seconds']:.3f} s of "
                    f"kernels) vs level ALL, the `ort-fp32-nchwc` plan ({after['kernel_seconds']:.3f} s), one "
                    "profiled run each:", "", "| op type | before s | after s |", "|---|---|---|"]
            ops = sorted(set(prof["by_op"]) | set(after["by_op"]),
                         key=lambda k: -max(prof["by_op"].get(k, {}).get("seconds", 0),
                                            after["by_op"].get(k, {}).get("seconds", 0)))
            for op in ops[:16]:
                b, a = prof["by_op"].get(op, {}).get("seconds"), after["by_op"].get(op, {}).get("seconds")
                out.append(f"| {op} | {_f(b, 3)} | {_f(a, 3)} |")
    return out + [""]


def section_options(o: dict) -> list[str]:
    out = ["## onnxruntime options (speed and agreement vs the fp32 default)", "",
           f"Each option in its own process next to a default session; runs alternate. Agreement bar: "
           f"{100 * o['agreement_bar']:.1f} % of pixels (semantic argmax at mask resolution, and the final "
           "label map).", "",
           "With random-init weights one class tends to win everywhere (see 'classes'), so pixel agreement is weak "
           "evidence on its own; the largest logit difference is the sharper one.", "",
           "| option | bundle, input | default p50 s | option p50 s | **speed-up** (paired median) "
           "| load s default / option | worst agreement (classes) | max abs Δ logits | verdict |",
           "|---|---|---|---|---|---|---|---|---|"]
    from .options import OPTIONS  # the benchmark's own order (the JSON's keys are sorted)

    names = [n for n in OPTIONS if n in o["options"]] + [n for n in o["options"] if n not in OPTIONS]
    for name in names:
        r = o["options"][name]
        if "error" in r:
            out.append(f"| {name} | – | – | – | – | – | – | – | failed: {r['error'].strip().splitlines()[-1][:120]} |")
            continue
        ps = r["paired_speedups"]
        verdict = ("faster" if ps["p50"] >= 1.05 and ps["min"] >= 0.98 else
                   "slower" if ps["p50"] <= 0.95 else "no clear change")
        dlog = max(a["max_abs_logits"] for a in r["agreement"])
        ncls = min(a.get("semantic_classes", 0) for a in r["agreement"])
        if r["loses_agreement"]:
            verdict = f"**LOSES AGREEMENT** ({verdict})"
        elif ncls <= 1 and dlog > 0.05:
            verdict = f"{verdict}; agreement **unproven** (logits move {dlog:.2f}, one-class maps)"
        if r.get("not_interleaved"):
            verdict += "; separate processes, not interleaved"
        inp = "×".join(map(str, r["input_hw"])) + (f"→{'×'.join(map(str, r['option_input_hw']))}"
                                                   if r["option_input_hw"] != r["input_hw"] else "")
        out.append(f"| {name} | {r['bundle']}, {inp} | {r['baseline']['latency']['p50']:.3f} | "
                   f"{r['option_run']['latency']['p50']:.3f} | **{r['paired_speedups']['p50']:.2f}×** "
                   f"({r['paired_speedups']['min']:.2f}–{r['paired_speedups']['max']:.2f}) | "
                   f"{r['baseline']['load_seconds']:.2f} / {r['option_run']['load_seconds']:.2f} | "
                   f"{_pct(r['worst_agreement'], 2)} ({min(a.get('semantic_classes', 0) for a in r['agreement'])}) | "
                   f"{max(a['max_abs_logits'] for a in r['agreement']):.1e} | {verdict} |")
    return out + [""]


def section_server(s: dict) -> list[str]:
    d = s["direct"]["latency"]
    out = ["## Server: HTTP vs a direct runtime call", "",
           f"Bundle {s['bundle']}, image {s['image']}; load generator: {s['load_generator']}. Direct "
           f"`Predictor.predict` p50 {d['p50']:.3f} s (p99 {d['p99']:.3f} s). Cold start to /readyz 200: "
           f"{s['cold_start_to_ready_seconds']:.1f} s.", "",
           "| concurrency | requests | HTTP p50 s | HTTP p99 s | throughput req/s | status codes "
           "| server: queue / render p50 s |",
           "|---|---|---|---|---|---|---|"]
    for c, lv in s["levels"].items():
        st = lv["server_timing_p50"]
        out.append(f"| {c} | {lv['requests']} | {_f(lv['latency_ok'].get('p50'), 3)} "
                   f"| {_f(lv['latency_ok'].get('p99'), 3)} | {lv['throughput_rps']:.3f} | {lv['status_counts']} "
                   f"| {_f(st.get('queue'), 3)} / {_f(st.get('render'), 3)} |")
    out += ["", f"HTTP overhead at concurrency 1: **{s.get('overhead_ratio_p50', 0):.3f}×** the direct call "
                f"(+{s.get('overhead_ms_p50', 0):.0f} ms p50, including the base64 PNG overlay; the direct call and "
                "the HTTP runs are measured one after the other, so run-to-run noise is in this figure)."]
    first = next(iter(s["levels"].values()), None)
    if first and first["latency_ok"].get("p50"):
        st = first["server_timing_p50"]
        inside = sum(v for k, v in st.items() if v and k != "queue")
        out += [f"Same requests, from the server's own timing: decode + preprocess + inference + postprocess + "
                f"render = {inside:.3f} s (render {_f(st.get('render'), 3)} s) of "
                f"{first['latency_ok']['p50']:.3f} s, so HTTP transport + JSON + aiohttp ≈ "
                f"**{1000 * (first['latency_ok']['p50'] - inside):.0f} ms** per request "
                f"({100 * (first['latency_ok']['p50'] - inside) / first['latency_ok']['p50']:.1f} %)."]
    ov = s.get("overload")
    if ov:
        out += ["", f"At 4× capacity ({ov['offered_rps']:.2f} req/s offered for {ov['duration_seconds']:.0f} s; "
                    f"capacity {ov['capacity_rps']:.3f} req/s): status {ov['status_counts']}, "
                    f"{ov['retry_after_on_503']} × 503 with Retry-After; admitted p50 "
                    f"{_f(ov['latency_ok'].get('p50'), 2)} s, p99 **{_f(ov['latency_ok'].get('p99'), 2)} s**; "
                    f"server RSS max {_mb(ov.get('server_rss_max'))} MB "
                    f"(VmHWM {_mb(ov.get('server_vmhwm'))} MB, idle {_mb(s.get('server_rss_idle'))} MB)."]
    return out + [""]


def section_memory(m: dict) -> list[str]:
    cells_run = ("a fresh process per cell" if m["fresh_process_each"]
                 else "versions loaded one after another in one process")
    out = ["## Versions and memory", "",
           f"RSS / PSS in MB after loading n versions and running each once at {m['input_hw'][0]}×{m['input_hw'][1]} "
           f"({cells_run}); "
           "'sum' = the seed's sum of versions (n × one version + empty process).", "",
           "| kind | settings | 1 version RSS / PSS | 2 versions | 3 versions | 3 vs sum of versions |",
           "|---|---|---|---|---|---|"]
    for kind, k in m["kinds"].items():
        for st in ("unshared", "default", "tuned"):
            rows = k.get(st)
            if not rows:
                continue
            cells = []
            for n in ("1", "2", "3"):
                r = rows.get(n)
                cells.append("–" if not r else f"{_mb(r['after_run']['Rss'])} / {_mb(r['after_run']['Pss'])} "
                                                f"(sum {_mb(r['sum_of_versions_rss'])})")
            last = rows.get("3") or rows[max(rows)]
            out.append(f"| {kind} | {st} | " + " | ".join(cells) + f" | {_pct(last['vs_sum_of_versions'], 0)} |")
    lk = m.get("leak")
    if lk:
        out += ["", f"Leak check: {lk['cycles']} load → run → close cycles: RSS after close "
                    f"{_mb(lk['after_first_close_rss'])} MB (cycle 1) → {_mb(lk['after_last_close_rss'])} MB "
                    f"(cycle {lk['cycles']}), growth "
                    f"**{lk['growth_first_to_last'] / 2**20:+.0f} MB**; empty process {_mb(lk['empty_rss'])} MB."]
    return out + [""]


def section_swaps(sw: dict) -> list[str]:
    runs = sw["plans"]
    first = next(iter(runs.values()))
    out = ["## Hot swaps under load", "",
           f"Bundle {first.get('bundle')}, {first.get('clients')} closed-loop HTTP clients, image "
           f"{first.get('image')}; {first.get('swaps_requested')} swaps back to back after a steady phase, each "
           "waited for, the bundle written at background priority (as `m2fp-bundle` writes it); one server per "
           "plan mode. Latency of answered requests, each client's first (warm-up) answer left out; load = "
           "verify + build + golden self-test (its run is the warm-up).",
           "", "| plan mode (served plan) | swaps done | failed | steady p50 / p95 / p99 s "
           "| during swaps p50 / p95 / p99 s | p95 during / steady | **p99 during / steady** | load p50 / max s "
           "| publish → swapped p50 s | cold start s | restart after the swaps s (plan basis) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, s in runs.items():
        st, du = s.get("steady", {}).get("latency_ok", {}), s.get("during_swaps", {}).get("latency_ok", {})
        plan = s.get("served_plan")
        served = plan.get("name") if isinstance(plan, dict) else plan
        load = s.get("load_seconds", {})
        out.append(f"| {mode} ({served}) | {s.get('swaps_completed')} of {s.get('swaps_requested')} | "
                   f"{s.get('failed_requests')} of {s.get('total_requests')} | {_f(st.get('p50'), 3)} / "
                   f"{_f(st.get('p95'), 3)} / {_f(st.get('p99'), 3)} | {_f(du.get('p50'), 3)} / "
                   f"{_f(du.get('p95'), 3)} / {_f(du.get('p99'), 3)} | {_f(s.get('p95_ratio_during_vs_steady'), 2)}× | "
                   f"**{_f(s.get('p99_ratio_during_vs_steady'), 2)}×** | {_f(load.get('p50'), 2)} / "
                   f"{_f(load.get('max'), 2)} | {_f(s.get('publish_to_swapped', {}).get('p50'), 2)} | "
                   f"{_f(s.get('cold_start_to_ready_seconds'), 1)} | {_f(s.get('restart_to_ready_seconds'), 1)} "
                   f"({(s.get('restart_plan') or {}).get('basis', '–')}) |")
    return out + [""]


SECTIONS = (("e2e", section_e2e), ("forward", section_forward), ("options", section_options),
            ("server", section_server), ("memory", section_memory), ("swaps", section_swaps),
            ("plans", section_plans), ("headline", section_headline), ("threads", section_threads),
            ("devloop", section_devloop))


def markdown(r: dict) -> str:
    lines = section_env(r)
    for key, fn in SECTIONS:
        if key in r.get("results", {}):
            sec = r["results"][key]
            try:
                body = fn(sec)
                # the section's title, then its busy banner, then the tables
                lines += body[:2] + _box_line(sec.get("box")) + body[2:]
                extra = r.get("section_env", {}).get(key, {})
                la = (extra.get("load_average") or {})
                lines += [f"_Measured {r.get('measured_at', {}).get(key)} in {sec.get('_seconds', '?')} s"
                          + (f"; load average {la.get('start')} → {la.get('end')}" if la else "")
                          + _box_footer(sec.get("box")) + "._", ""]
            except (KeyError, TypeError, ValueError, StopIteration) as exc:
                lines += [f"## {key}", "", f"(could not render: {type(exc).__name__}: {exc})", ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots

def _save(fig, ax, title: str, path: Path) -> str:
    """Title, grid and legend as every plot here has them; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(r: dict, out_dir: Path, mode: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    res = r.get("results", {})
    if "e2e" in res:
        e = res["e2e"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        sizes = e["sizes"]
        px = [int(s.split("x")[0]) * int(s.split("x")[1]) / 1e6 for s in sizes]
        for task, t in e["tasks"].items():
            for sysname, style in (("ours", "-o"), ("modelscope", "--s")):
                p50 = [t["sizes"][s][sysname]["latency"]["p50"] for s in sizes]
                p95 = [t["sizes"][s][sysname]["latency"]["p95"] for s in sizes]
                ax.errorbar(px, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95)]], fmt=style, capsize=3,
                            label=f"{'ours' if sysname == 'ours' else 'ModelScope'} {task}-human")
        ax.set_xlabel("image size (megapixels): " + ", ".join(sizes))
        ax.set_ylabel("latency p50 (s), bar to p95")
        made.append(_save(fig, ax, f"End-to-end latency vs image size ({mode})",
                          out_dir / f"{mode}_latency_vs_size.png"))
    if "memory" in res:
        m = res["memory"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, k in m["kinds"].items():
            for st, style in (("unshared", "-^"), ("default", "-o"), ("tuned", "-s")):
                rows = k.get(st)
                if not rows:
                    continue
                ns = sorted(rows, key=int)
                ax.plot([int(n) for n in ns], [rows[n]["after_run"]["Rss"] / 2**20 for n in ns], style,
                        label=f"{kind}, {st}")
                if kind == "different" and st == "unshared":
                    ax.plot([int(n) for n in ns], [rows[n]["sum_of_versions_rss"] / 2**20 for n in ns], ":k",
                            label="sum of versions (unshared)")
        ax.set_xlabel("versions loaded")
        ax.set_ylabel("RSS (MB) after one run each")
        ax.set_xticks([1, 2, 3])
        made.append(_save(fig, ax, f"Memory vs number of versions ({mode})",
                          out_dir / f"{mode}_memory_vs_versions.png"))
    return made


def write(r: dict, out_dir: Path) -> dict[str, Path]:
    mode = r["mode"]
    out_dir.mkdir(parents=True, exist_ok=True)
    r["plots"] = plots(r, out_dir, mode)
    md = markdown(r)
    if r["plots"]:
        md += "\n" + "\n".join(f"![{p}]({p})" for p in r["plots"]) + "\n"
    else:
        md += "\n(plots skipped: install the `bench` extra for matplotlib)\n"
    write_json(out_dir / f"{mode}.json", r)
    (out_dir / f"{mode}.md").write_text(md, encoding="utf-8")
    return {"json": out_dir / f"{mode}.json", "md": out_dir / f"{mode}.md"}


def merge(into: dict, other: dict) -> dict:
    """Copy ``other``'s benchmark sections into ``into`` (each keeps its own measured_at and env summary)."""
    for name, section in other.get("results", {}).items():
        into.setdefault("results", {})[name] = section
        into.setdefault("measured_at", {})[name] = other.get("measured_at", {}).get(name)
        env = other.get("env", {})
        into.setdefault("section_env", {})[name] = {"date": env.get("date"), "sgemm_gflops": env.get("sgemm_gflops"),
                                                    "load_average": other.get("load_average")}
        into.get("errors", {}).pop(name, None)
    into["skipped"] = [n for n in into.get("skipped", []) if n not in into["results"]]
    return into


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Re-render a results JSON (optionally merging sections of others).")
    ap.add_argument("json", type=Path)
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="other results JSONs whose sections to copy in")
    a = ap.parse_args()
    data = json.loads(a.json.read_text())
    for other in a.merge:
        merge(data, json.loads(other.read_text()))
    print(write(data, a.json.parent)["md"])
