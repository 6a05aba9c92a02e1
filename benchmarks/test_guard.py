"""The quiet-box rule, the per-CPU results folder and the bundle cache stamp (``pytest benchmarks/test_guard.py``)."""

from __future__ import annotations

import os

import pytest

from benchmarks import bundles, env, quiet


def reading(util: float = 0.0, steal: float = 0.0, load1: float = 0.0, cpus: int = 2) -> dict:
    return {"utilisation": util, "steal": steal, "load1": load1, "load5": load1, "logical_cpus": cpus,
            "top_other": [{"pid": 1, "name": "pytest", "cpu_share": util * cpus}]}


def test_an_idle_box_is_quiet():
    assert quiet.verdict(reading(), reading()) == quiet.QUIET


@pytest.mark.parametrize("start,end,why", [
    (reading(util=0.11), reading(), "start utilisation 11%"),
    (reading(), reading(util=0.5), "end utilisation 50%"),
    (reading(steal=0.03), reading(), "start steal 3.0%"),
    (reading(), reading(steal=0.021), "end steal 2.1%"),
    (reading(load1=0.6), reading(), "start load1 0.60 > 0.50"),
])
def test_each_limit_makes_a_section_busy_and_says_why(start, end, why):
    v = quiet.verdict(start, end)
    assert v.startswith("busy: ") and why in v


def test_load_counts_at_the_start_only_and_scales_above_four_cpus():
    assert quiet.verdict(reading(), reading(load1=3.0)) == quiet.QUIET
    assert quiet.load_limit(4) == 0.5 and quiet.load_limit(16) == 2.0
    assert quiet.verdict(reading(load1=1.9, cpus=16), reading(cpus=16)) == quiet.QUIET
    assert quiet.verdict(reading(load1=2.1, cpus=16), reading(cpus=16)) != quiet.QUIET


def test_the_limits_are_inclusive_of_the_threshold():
    assert quiet.verdict(reading(util=0.10, steal=0.02, load1=0.5), reading(util=0.10, steal=0.02)) == quiet.QUIET


def test_a_run_is_quiet_only_if_every_section_was():
    q, b = quiet.box(reading(), reading()), quiet.box(reading(util=0.9), reading())
    assert quiet.overall({"a": q, "b": q}) == quiet.QUIET
    assert quiet.overall({"a": q, "b": b}) == "busy: b"
    assert quiet.overall({"a": q, "b": None}) == "busy: b"  # no record is not a quiet record
    assert quiet.overall({}) != quiet.QUIET


def test_a_sample_reads_this_box_and_excludes_our_own_busy_child():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        s = quiet.sample(0.5)
    finally:
        child.kill()
        child.wait()
    assert 0.0 <= s["steal"] <= s["utilisation"] <= 1.0
    assert s["logical_cpus"] == os.cpu_count()
    assert child.pid not in {p["pid"] for p in s["top_other"]}
    assert len(s["top_other"]) <= 3


@pytest.mark.parametrize("model,flags,slug", [
    ("AMD EPYC", {"avx2", "fma"}, "amd-epyc-avx2"),
    ("AMD EPYC", {"avx2", "avx512f"}, "amd-epyc-avx512"),
    ("INTEL(R) XEON(R) PLATINUM 8581C CPU @ 2.30GHz", {"avx2", "avx512f", "amx_tile"},
     "intel-r-xeon-r-platinum-8581c-cpu-2-30ghz-amx"),
    ("Some CPU", {"sse4_2"}, "some-cpu"),
])
def test_cpu_slug(model, flags, slug):
    assert env.cpu_slug(model, flags) == slug


def test_a_results_file_is_filed_under_the_cpu_it_recorded():
    r = {"env": {"cpu": {"model": "AMD EPYC", "flags": {"avx2": True, "avx512f": False}}}}
    assert env.recorded_cpu_slug(r) == "amd-epyc-avx2"


def test_bundle_stamp_follows_the_export_code_and_the_spec(tmp_path, monkeypatch):
    code = bundles.export_code_digest()
    assert bundles.stamp_key("quick", "multi", code) == bundles.stamp_key("quick", "multi", code)
    assert bundles.stamp_key("quick", "multi", code) != bundles.stamp_key("quick", "multi", "0" * 64)
    assert bundles.stamp_key("quick", "multi", code) != bundles.stamp_key("quick", "single", code)
    # a derived role follows multi's key
    assert bundles.stamp_key("quick", "heads-1", code) != bundles.stamp_key("quick", "heads-1", "0" * 64)
    monkeypatch.setattr(bundles, "CACHE", tmp_path)
    assert bundles.stale("quick", "multi")
    bundles.write_stamp("quick", "multi")
    assert not bundles.stale("quick", "multi")
    monkeypatch.setattr(bundles, "EXPORT_CODE", tmp_path)  # other export code → other digest
    assert bundles.stale("quick", "multi")


def test_the_load_average_counts_only_before_the_run_starts() -> None:
    """After the run's own exports or sections, the trailing load average is our own work: a section's
    start is judged by the idle window alone."""
    assert quiet.verdict(reading(load1=1.5), reading(), run_start=False) == quiet.QUIET
    assert quiet.verdict(reading(load1=1.5), reading()) != quiet.QUIET
    assert quiet.verdict(reading(util=0.5, load1=1.5), reading(), run_start=False) != quiet.QUIET
