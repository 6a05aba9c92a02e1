"""The bundles every benchmark runs on, exported once into a cache and reused.

``quick`` uses the ``tiny`` preset (exports in seconds), ``full`` the ``r101`` preset (63.1 M
parameters, a few minutes per export). Per mode, one bundle root holds:

=========  =================================================================================
role       what
=========  =================================================================================
multi      multi-human (CIHP) model; in full mode exactly the ``v3.0-r101`` spec of versions.toml
single     single-human (LIP) model of the same preset
heads-1/2  ``multi`` with every weight of the transformer decoder and heads
           (``sem_seg_head.predictor``) replaced; backbone and pixel decoder byte-identical
seed-1/2   ``multi`` with every weight tensor replaced (fully different weights)
=========  =================================================================================

``multi`` and ``single`` are real exports (``export_version``: ONNX export, parity gate, golden
sample). Next to each, a ModelScope model directory (``configuration.json`` + ``pytorch_model.pt``)
holds the very same weights for the ModelScope baseline; its state-dict hash is checked against the
bundle's ``config.json → source → sha256``.

The four memory variants are *derived* at the ONNX level instead of re-exported (an r101 export
takes tens of minutes on a busy 2-core box): the float initializers that the chosen part of the
graph consumes (found through each node's ``pkg.torch.onnx.name_scopes``) are replaced by a seeded
permutation of their own values, so the weights differ byte for byte exactly where a re-initialised
export would differ, with the same graph and value distribution. Their outputs differ from
``multi``'s, so they carry no golden sample; the memory benchmark loads them with ``Predictor.load``.

``multi`` also ships an int8 QDQ variant (``m2fp-export --int8``: calibrated at export, its golden
agreement in ``config.json → plans``) for the runtime's int8 execution plans.

A cached bundle is reused only while its stamp (``<mode>/stamps/<role>.json``) matches: the role's
spec plus a digest of the export code (``export/**``), which decides both the weights a ``random:``
source builds and the graph written; a derived role's stamp includes ``multi``'s. Hashing the export
code costs milliseconds, where the source's own sha256 needs the model built, and it is the stricter
key (a graph change with the same weights also rebuilds).

Run ``python -m benchmarks.bundles --mode full`` to build the cache ahead of time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
EXPORT_CODE = Path(__file__).resolve().parent.parent / "export"
from m2fpkit.runtime.bundle.store import MODEL  # noqa: E402 - the one definition


@dataclass(frozen=True)
class Variant:
    role: str
    version: str
    preset: str
    task: str
    seed: int
    #: derived from ``multi`` at the ONNX level: "heads" (predictor weights) or "all" weights replaced
    derive: str | None = None
    #: preprocessing overrides (quick mode shrinks the multi-human short side to keep runs short)
    preprocess: tuple[tuple[str, int], ...] = ()
    #: also ship the int8 QDQ variant (the int8 execution plans run it)
    int8: bool = False

    @property
    def source(self) -> str:
        return f"random:{self.preset}?seed={self.seed}&task={self.task}"


def variants(mode: str) -> dict[str, Variant]:
    if mode == "quick":
        p, v, s, pre = "tiny", "v0", 10, (("short_edge", 256), ("max_size", 448))
    else:
        p, v, s, pre = "r101", "v3", 101, ()
    out = [
        Variant("multi", f"{v}.0-{p}", p, "multi-human", s, preprocess=pre, int8=True),
        Variant("single", f"{v}.1-{p}", p, "single-human", s + 10),
        Variant("heads-1", f"{v}.2-{p}", p, "multi-human", s + 1000, derive="heads"),
        Variant("heads-2", f"{v}.3-{p}", p, "multi-human", s + 2000, derive="heads"),
        Variant("seed-1", f"{v}.4-{p}", p, "multi-human", s + 3, derive="all"),
        Variant("seed-2", f"{v}.5-{p}", p, "multi-human", s + 4, derive="all"),
    ]
    return {x.role: x for x in out}


def root(mode: str) -> Path:
    return CACHE / mode / "bundles"


def bundle_dir(mode: str, role: str) -> Path:
    return root(mode) / MODEL / variants(mode)[role].version


def modelscope_dir(mode: str, role: str) -> Path:
    return CACHE / mode / "modelscope" / variants(mode)[role].version


def export_code_digest() -> str:
    """sha256 over the export package's files (path and bytes), caches and bytecode excluded."""
    h = hashlib.sha256()
    for f in sorted(EXPORT_CODE.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
            h.update(f.relative_to(EXPORT_CODE).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def stamp_key(mode: str, role: str, code: str | None = None) -> str:
    """What a cached ``role`` bundle must have been built from (see the module docstring)."""
    code = code or export_code_digest()
    v = variants(mode)[role]
    parts = [repr(v), code]
    if v.derive:
        parts.append(stamp_key(mode, "multi", code))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _stamp(mode: str, role: str) -> Path:
    return CACHE / mode / "stamps" / f"{role}.json"


def write_stamp(mode: str, role: str) -> None:
    path = _stamp(mode, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": stamp_key(mode, role), "version": variants(mode)[role].version}))


def stale(mode: str, role: str, code: str | None = None) -> bool:
    try:
        return json.loads(_stamp(mode, role).read_text()).get("key") != stamp_key(mode, role, code)
    except (OSError, ValueError, AttributeError):
        return True


def missing(mode: str, roles: list[str] | None = None) -> list[str]:
    """Roles whose cached bundle is absent, incomplete or built from other export code or spec."""
    vs = variants(mode)
    roles = roles or list(vs)
    code = export_code_digest()
    return [r for r in roles if not (bundle_dir(mode, r) / "weights.json").is_file() or stale(mode, r, code)
            or (vs[r].derive is None and not (modelscope_dir(mode, r) / "pytorch_model.pt").is_file())]


def derive(mode: str, role: str) -> float:
    """Build a memory variant from ``multi`` by replacing initializers (see the module docstring)."""
    import dataclasses

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from m2fpkit.export.weights_index import external_tensors
    from m2fpkit.runtime.bundle import writer
    from m2fpkit.runtime.bundle.config import BundleConfig, Plans
    from m2fpkit.runtime.bundle.store import BundleStore

    t0 = time.perf_counter()
    v = variants(mode)[role]
    base = bundle_dir(mode, "multi")
    model = onnx.load(str(base / "model.onnx"))
    inits = {i.name for i in model.graph.initializer}
    owned: set[str] = set()
    if v.derive == "heads":
        for node in model.graph.node:
            scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
            if "sem_seg_head.predictor" in scopes:
                owned.update(i for i in node.input if i in inits)
    rng = np.random.default_rng(v.seed)
    replaced = total = 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        total += arr.size
        if arr.size < 64 or (v.derive == "heads" and init.name not in owned):
            continue
        init.CopyFrom(numpy_helper.from_array(rng.permutation(arr.ravel()).reshape(arr.shape), init.name))
        replaced += arr.size
    props = {p.key: p.value for p in model.metadata_props}
    props.update({"m2fp.version": v.version, "m2fp.semver": v.version.lstrip("v"),
                  "m2fp.source_sha256": f"derived-{v.derive}-{v.seed}"})
    del model.metadata_props[:]
    for k, val in props.items():
        model.metadata_props.add(key=k, value=val)
    cfg = BundleConfig.read(base)
    what = "decoder+heads weights" if v.derive == "heads" else "all weights"
    cfg = dataclasses.replace(cfg, version=v.version, golden=None, plans=Plans(),  # no variant graphs here
                              notes=f"benchmarks ({role}): {cfg.version} with {what} permuted (seed {v.seed})",
                              source={"kind": "derived", "uri": f"{cfg.version}:{v.derive}?seed={v.seed}",
                                      "sha256": "", "replaced_fraction": round(replaced / max(1, total), 4)})
    with writer.stage(BundleStore(root(mode), MODEL), v.version, force=True) as staged:
        onnx.save_model(model, str(staged.dir / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
        data_file, tensors = external_tensors(staged.dir / "model.onnx")
        staged.finish(cfg, tensors=tensors, data_file=data_file)
    write_stamp(mode, role)
    logging.getLogger("benchmarks").info("%s: %s derived, %.1f%% of weights replaced", role, v.version,
                                         100 * replaced / max(1, total))
    return time.perf_counter() - t0


def build_one(mode: str, role: str) -> float:
    """Export ``role`` (and write its ModelScope directory); returns seconds."""
    import dataclasses

    import torch

    from m2fpkit.export import sources
    from m2fpkit.export.build import export_version
    from m2fpkit.export.specs import VersionSpec, load
    from m2fpkit.runtime.bundle.config import BundleConfig

    v = variants(mode)[role]
    if v.derive:
        return derive(mode, role)
    t0 = time.perf_counter()
    ck = sources.resolve(v.source, task=v.task)
    model = ck.build_model()
    ms_dir = modelscope_dir(mode, role)
    tmp = ms_dir.with_name(ms_dir.name + ".tmp")
    sources.save_modelscope_dir(tmp, ck.config, model.state_dict())
    if ms_dir.exists():
        import shutil
        shutil.rmtree(ms_dir)
    tmp.rename(ms_dir)
    del model
    spec = VersionSpec(version=v.version, source=v.source, task=v.task, channel="experimental",
                       notes=f"benchmarks ({role})", preprocess=dict(v.preprocess), int8=v.int8)
    if mode == "full" and role == "multi":
        spec = load().get("v3.0-r101")  # exactly the spec named in versions.toml
        if sources.resolve(spec.source, task=spec.task).sha256 != ck.sha256:
            raise RuntimeError(f"versions.toml v3.0-r101 ({spec.source}) is not {v.source}")
        spec = dataclasses.replace(spec, int8=v.int8)
    # the gate's element-wise tolerance can trip on the full-size model through the documented
    # attention-mask threshold flip (m2fp.md §5) while label maps agree: benchmark bundles ask the
    # export to record a failure in config.json → parity instead of stopping (the bundle says so)
    res = export_version(spec, root(mode), force=True, enforce_parity=False)
    cfg = BundleConfig.read(res.bundle_dir)
    blob = torch.load(ms_dir / "pytorch_model.pt", map_location="cpu", weights_only=True)
    if sources.state_dict_sha256(blob["model"]) != cfg.source.get("sha256"):  # same weights in both places?
        raise RuntimeError(f"{role}: ModelScope dir weights differ from the bundle's checkpoint")
    (ms_dir / "bundle.json").write_text(json.dumps({"version": v.version, "source": cfg.source}, indent=2))
    write_stamp(mode, role)
    return time.perf_counter() - t0


def ensure(mode: str, roles: list[str] | None = None) -> dict[str, float]:
    """Export what is missing (in this process); returns export seconds per role built."""
    built = {}
    todo = missing(mode, roles)
    if any(variants(mode)[r].derive for r in todo) and "multi" not in todo and missing(mode, ["multi"]):
        todo.insert(0, "multi")
    if "multi" in todo:  # derived roles follow a rebuilt multi
        todo += [r for r, v in variants(mode).items() if v.derive and r not in todo and (bundle_dir(mode, r)).exists()]
    for role in sorted(todo, key=lambda r: variants(mode)[r].derive is not None):
        logging.getLogger("benchmarks").info("exporting %s bundle %s (%s)", mode, role, variants(mode)[role].version)
        built[role] = build_one(mode, role)
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--roles", default="", help="comma-separated roles (default: all)")
    ap.add_argument("--json", type=Path, help="write export seconds here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("m2fpkit.export").setLevel(logging.INFO)
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    for name in ("torch", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    built = ensure(a.mode, [r for r in a.roles.split(",") if r] or None)
    if a.json:
        a.json.write_text(json.dumps(built))
    print(json.dumps(built), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
