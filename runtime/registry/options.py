"""The one settings object of the runtime: :class:`RegistryOptions`.

Invariant: every runtime default is defined once, here or in the dataclass a field nests
(:class:`~m2fpkit.runtime.session.RuntimeSettings`, :class:`~m2fpkit.runtime.predictor.ImageLimits`).
The library (:class:`~m2fpkit.runtime.registry.Registry`, :class:`~m2fpkit.runtime.api.Runtime`), the
server (``ServerConfig.runtime``) and ``m2fp-serve`` (whose option defaults are read from these classes)
all take this object; nothing copies its fields under other names. Frozen: a registry's options never
change while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..bundle.signature import NO_KEYS, TrustPolicy
from ..plans import default_mode, normalise_mode
from ..predictor import ImageLimits
from ..session import RuntimeSettings


@dataclass(frozen=True)
class RegistryOptions:
    #: how onnxruntime sessions use the machine (threads, arena, graph optimisation, weight sharing)
    settings: RuntimeSettings = field(default_factory=RuntimeSettings)
    #: guards applied to every image before it is decoded
    limits: ImageLimits = field(default_factory=ImageLimits)
    #: unload a version nothing pins after this many idle seconds (0: never)
    idle_ttl: float = 600.0
    #: evict least recently used unpinned versions while the loaded ones take more bytes (None: no budget)
    memory_budget: int | None = None
    #: versions loaded at start and kept loaded (latest, aliases and routed versions always are)
    preload: tuple[str, ...] = ()
    #: rescan the store when files change under the bundle root (inotify, or polling)
    watch: bool = True
    watch_polling: bool = False
    #: one run on a synthetic image before a version becomes ready
    warmup: bool = True
    #: which signatures a bundle needs before anything of it is listed or loaded (keys: required)
    trust: TrustPolicy = NO_KEYS
    #: writable directory for the last-known-good record and the plan cache; None: the store directory when writable
    state_dir: Path | None = None
    #: execution plan: "auto" (fastest plan verified on the golden sample, ties within runtime.plans.margin
    #: to the earlier plan), "fp32" or a plan name (runtime/plans.py);
    #: default ``$M2FP_PLAN``, else auto
    plan: str = field(default_factory=default_mode)

    def __post_init__(self) -> None:
        if self.idle_ttl < 0:
            raise ValueError(f"idle_ttl: expected seconds ≥ 0, got {self.idle_ttl!r}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget: expected bytes > 0 or None, got {self.memory_budget!r}")
        if not isinstance(self.preload, tuple):
            object.__setattr__(self, "preload", tuple(self.preload))
        object.__setattr__(self, "plan", normalise_mode(self.plan))
        if self.state_dir is not None and not isinstance(self.state_dir, Path):
            object.__setattr__(self, "state_dir", Path(self.state_dir))
