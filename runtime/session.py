"""onnxruntime session construction: thread pools, spinning and memory settings in one place.

Invariants: per-session intra-op pools with spinning off (an idle session does not burn the cores the
active one needs), ``concurrent_runs × intra_op_threads ≤ cores``, sessions created one at a time. The
defaults are measured by ``benchmarks/options.py`` and ``benchmarks/threads.py``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import onnxruntime as ort

from .bundle.reader import BundleContent
from .cpu import usable_cores
from .errors import BundleError, engine_reason
from .priority import run_in_background
from .weights import POOL, SharedTensor, WeightPool

log = logging.getLogger(__name__)

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeSettings:
    """How sessions use the machine. ``0`` threads means "all cores / concurrent_runs"."""

    concurrent_runs: int = 1
    intra_op_threads: int = 0
    #: "per-session" pools (spinning controllable) or one process-wide "global" pool
    thread_pool: str = "per-session"
    allow_spinning: bool = False
    optimization: str = "extended"
    #: one arena shared by all sessions instead of one per session
    shared_arena: bool = False
    disable_prepacking: bool = False
    enable_mem_pattern: bool = True
    #: map tensors identical across loaded versions once (bundles with a weights index, weights.py)
    share_weights: bool = True

    def threads(self) -> int:
        if self.intra_op_threads > 0:
            return self.intra_op_threads
        return max(1, usable_cores() // max(1, self.concurrent_runs))

    def validate(self) -> RuntimeSettings:
        if self.concurrent_runs < 1:
            raise ValueError("concurrent_runs must be ≥ 1")
        if self.thread_pool not in ("per-session", "global"):
            raise ValueError("thread_pool must be 'per-session' or 'global'")
        if self.optimization not in _LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(_LEVELS)}")
        if self.concurrent_runs * self.threads() > usable_cores():
            log.warning("concurrent_runs × intra_op_threads = %d exceeds %d cores: runs will contend",
                        self.concurrent_runs * self.threads(), usable_cores())
        return self


class SessionFactory:
    """Creates sessions one at a time (construction is not thread-safe and holds the GIL)."""

    _process_lock = threading.Lock()
    _global_pool: int | None = None
    _shared_arena = False

    def __init__(self, settings: RuntimeSettings | None = None, pool: WeightPool = POOL) -> None:
        self.settings = (settings or RuntimeSettings()).validate()
        self.pool = pool
        self._setup_process()

    def _setup_process(self) -> None:
        s = self.settings
        with SessionFactory._process_lock:
            if s.thread_pool == "global":
                if SessionFactory._global_pool is None:
                    ort.set_global_thread_pool_sizes(s.threads(), 1)
                    SessionFactory._global_pool = s.threads()
                elif SessionFactory._global_pool != s.threads():
                    log.warning("global thread pool already sized %d; keeping it", SessionFactory._global_pool)
            if s.shared_arena and not SessionFactory._shared_arena:
                mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                cfg = ort.OrtArenaCfg(0, 1, -1, -1)  # max_mem unlimited, kSameAsRequested extension
                ort.create_and_register_allocator(mem, cfg)
                SessionFactory._shared_arena = True

    def options(self, optimization: str | None = None) -> ort.SessionOptions:
        """Session options from the settings; ``optimization`` overrides the graph optimisation level."""
        s = self.settings
        o = ort.SessionOptions()
        o.graph_optimization_level = _LEVELS[optimization or s.optimization]
        o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        o.enable_mem_pattern = s.enable_mem_pattern
        o.log_severity_level = 3
        if s.thread_pool == "global":
            o.use_per_session_threads = False
        else:
            o.intra_op_num_threads = s.threads()
            o.inter_op_num_threads = 1
            o.add_session_config_entry("session.intra_op.allow_spinning", "1" if s.allow_spinning else "0")
        if s.shared_arena:
            o.add_session_config_entry("session.use_env_allocators", "1")
        if s.disable_prepacking:
            o.add_session_config_entry("session.disable_prepacking", "1")
        return o

    def create(self, content: BundleContent, model_file: str | None = None,
               optimization: str | None = None) -> Session:
        """A CPU session built only from the verified bytes in ``content`` (never from the files).

        ``model_file``: another graph of the bundle (a plan's variant, weights inside); by default the
        main graph, whose indexed external weights come from the pool (shared across versions when
        ``share_weights``). ``optimization`` overrides the settings' level (an execution plan's option).
        Raises BundleError for a graph onnxruntime cannot load, IntegrityError for
        changed weights.
        """
        name = model_file or content.config.model_file
        with SessionFactory._process_lock:
            options = self.options(optimization)
            # streaming and hashing the weights yields the cores to served forwards; the session (whose
            # threads inherit the priority of the thread that builds it) is built at normal priority
            tensors = [] if name != content.config.model_file else run_in_background(
                self.pool.tensors, content, share=self.settings.share_weights)
            if tensors:
                # the graph's optimisers read these (not the data file); the session runs on them in place
                options.add_external_initializers([n for n, _ in tensors], [t.value for _, t in tensors])
                for tensor_name, tensor in tensors:
                    options.add_initializer(tensor_name, tensor.value)
            try:
                return Session(content.files[name], options, tensors)
            except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
                raise BundleError(f"onnxruntime cannot load {name}: {engine_reason(exc)}") from None


class Session(ort.InferenceSession):
    """An ``InferenceSession`` that keeps the shared weight buffers it runs on alive as long as it lives.

    onnxruntime reads those buffers in place, so they must outlive every ``run``, including one still
    in flight when its version is closed: tying them to the session object guarantees that.
    """

    def __init__(self, model: bytes, options: ort.SessionOptions, shared: list[tuple[str, SharedTensor]]) -> None:
        self.shared_weights = shared
        super().__init__(model, options, providers=["CPUExecutionProvider"])

    @property
    def shared_bytes(self) -> int:
        return sum(t.nbytes for _, t in self.shared_weights)


def cap_library_threads(n: int = 1) -> None:
    """Keep OpenCV's pool small in a server process; onnxruntime owns the cores."""
    import cv2

    cv2.setNumThreads(n)
