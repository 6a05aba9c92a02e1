"""What CPU this process runs on: model name, the instruction-set flags execution plans depend on, cores.

Read once from ``/proc/cpuinfo`` (Linux); elsewhere the model is ``platform.processor()`` and no flag is
known, so plans that need one are not offered. :attr:`CpuInfo.key` names the box for the plan cache: two
boxes share it only when model, relevant flags and usable cores are the same.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

#: flags that decide which kernels the engines can use (recorded with every benchmark figure too)
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
         "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")

#: plan requirements → the flags that satisfy them (any one)
FEATURES: dict[str, tuple[str, ...]] = {
    "vnni": ("avx512_vnni", "avx_vnni", "amx_int8"),  # int8 dot products without saturation
    "bf16": ("avx512_bf16", "amx_bf16"),              # native bfloat16 arithmetic
    "amx": ("amx_tile",),
}


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    cores: int
    virtualised: bool = False

    def has(self, feature: str) -> bool:
        """Whether the CPU has ``feature`` (a key of :data:`FEATURES`, or a raw cpuinfo flag)."""
        return any(f in self.flags for f in FEATURES.get(feature, (feature,)))

    def features(self) -> tuple[str, ...]:
        return tuple(f for f in FEATURES if self.has(f))

    @property
    def key(self) -> str:
        relevant = ",".join(sorted(f for f in self.flags if f in FLAGS))
        return hashlib.sha256(f"{self.model}|{relevant}|{self.cores}".encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"model": self.model, "cores": self.cores, "features": list(self.features()),
                "flags": {f: f in self.flags for f in FLAGS}, "virtualised": self.virtualised}


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """The first processor's model name and flags from ``/proc/cpuinfo`` text."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip()
        if k == "model name" and not model:
            model = v.strip()
        elif k == "flags" and not flags:
            flags = frozenset(v.split())
    return CpuInfo(model or platform.processor() or "unknown", flags, cores, "hypervisor" in flags)


@functools.cache
def detect() -> CpuInfo:
    """This machine's CPU (cached for the process)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, usable_cores())
