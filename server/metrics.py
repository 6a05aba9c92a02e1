"""Prometheus metrics of one app (own registry, so tests and several apps never collide)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class RoutesRefusals(Collector):
    """``m2fp_routes_refused_total{source}``: refused routes changes, read from the live routes state's
    counts at every scrape (the counts are owned by ``RoutesState``; this only exposes them)."""

    def __init__(self) -> None:
        self.counts: Mapping[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("m2fp_routes_refused", "Routes changes refused (file, admin API, "
                                     "last-known-good record); the routes in force stayed", labels=["source"])
        for source, n in sorted(self.counts.items()):
            family.add_metric([source], n)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("m2fp_requests_total", "Parse requests answered", ["version", "rule", "status"],
                                registry=r)
        self.errors = Counter("m2fp_errors_total", "Requests answered with an error", ["error", "status"],
                              registry=r)
        self.latency = Histogram("m2fp_request_seconds", "Parse latency, admission to response", ["version", "rule"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("m2fp_inference_seconds", "onnxruntime run time", ["version"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("m2fp_in_flight", "Parse requests being processed", registry=r)
        self.queue_depth = Gauge("m2fp_queue_depth", "Parse requests waiting for a worker", registry=r)
        self.reply_bytes = Gauge("m2fp_reply_bytes_in_flight", "Bytes of parse replies built and not yet taken by "
                                 "their clients (--replies-in-flight-mb)", registry=r)
        self.replies_cut = Counter("m2fp_replies_cut_total", "Parse replies not taken whole: 'write_timeout' (cut "
                                   "after --write-timeout) or 'client_gone'", ["reason"], registry=r)
        self.queue_limit = Gauge("m2fp_queue_limit", "Parse requests allowed to wait (--max-queue); more get 503",
                                 registry=r)
        self.lifecycle = Gauge("m2fp_version_events", "Registry events since start (loads, unloads, swaps, …)",
                               ["event"], registry=r)
        self.loaded = Gauge("m2fp_version_loaded", "1 if the version is loaded", ["version", "state"], registry=r)
        self.failed = Gauge("m2fp_version_failed", "1 while a version failed to verify or load: scope 'version' "
                            "(it cannot serve) or 'update' (newer content refused, the loaded one serves)",
                            ["version", "scope"], registry=r)
        self.load_seconds = Gauge("m2fp_version_load_seconds", "Load time of the content a version serves "
                                  "(verify, session, warm-up, self-test)", ["version"], registry=r)
        self.plan = Gauge("m2fp_version_plan_info", "1 for the execution plan a loaded version serves with",
                          ["version", "plan", "engine", "precision"], registry=r)
        self.golden_degenerate = Gauge("m2fp_golden_degenerate", "1 if the version's golden sample is degenerate "
                                       "(one class, or no person pixel, in its golden label map: its self-test "
                                       "proves little), 0 if not; absent without a golden sample",
                                       ["version"], registry=r)
        self.plan_agreement = Gauge("m2fp_version_plan_agreement", "Agreement of the served plan (0..1): ort-fp32's "
                                    "golden label map with PyTorch's; another plan's labels with ort-fp32's on its "
                                    "decisive pixels of the evidence images", ["version"], registry=r)
        self.quality = Gauge("m2fp_version_quality", "The version's grade on a labeled dataset (0..1; m2fp-eval "
                             "--state-dir): the most recent per dataset, metric miou, pixel_accuracy or "
                             "mean_class_accuracy", ["version", "dataset", "metric"], registry=r)
        self.weights = Gauge("m2fp_weight_bytes", "Weights of the loaded versions: 'used' by their sessions, "
                             "'mapped' once for all (identical tensors are shared)", ["kind"], registry=r)
        self.shadow_runs = Counter("m2fp_shadow_runs_total", "Shadow comparisons", ["primary", "candidate", "outcome"],
                                   registry=r)
        self.shadow_agreement = Histogram("m2fp_shadow_label_agreement", "Label-map pixel agreement of shadow runs",
                                          ["primary", "candidate"],
                                          buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0), registry=r)
        self.routes_refused = RoutesRefusals()
        r.register(self.routes_refused)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, … (Linux)
