"""Export one version: source → PyTorch → ONNX → parity gate → config + manifest → published bundle."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime
import onnxscript
import torch

import m2fpkit
from m2fpkit.runtime.bundle import writer
from m2fpkit.runtime.bundle.config import BundleConfig, Plans, Postprocess, Preprocess, TensorSpec
from m2fpkit.runtime.bundle.store import MODEL, BundleStore
from m2fpkit.runtime.errors import ExportError
from m2fpkit.runtime.palette import palette_for

from . import golden, onnx_export, parity, quantize, sources, weights_index
from .model.config import M2FPConfig
from .model.m2fp import SIZE_DIVISIBILITY, count_parameters
from .progress import Progress
from .specs import VersionSpec

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    bundle_dir: Path
    config: BundleConfig
    seconds: float


def _pad(n: int) -> int:
    return -(-n // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY


def preprocess_for(cfg: M2FPConfig, overrides: dict) -> Preprocess:
    if cfg.single_human:
        w, h = cfg.single_human_size
        base = Preprocess(resize="center-canvas", canvas=(int(w), int(h)))
    else:
        base = Preprocess(resize="shortest-edge")  # ModelScope's pipeline: the defaults are its values
    base = dataclasses.replace(base, size_divisibility=SIZE_DIVISIBILITY)
    allowed = {"short_edge", "max_size"}
    unknown = set(overrides) - allowed
    if unknown:
        raise ExportError(f"preprocess: cannot override {', '.join(sorted(unknown))} (allowed: short_edge, max_size)")
    return dataclasses.replace(base, **overrides)


def parity_sizes(pre: Preprocess) -> list[tuple[int, int]]:
    """Three padded input sizes the runtime will really see for this policy."""
    if pre.resize == "center-canvas":
        w, h = pre.canvas  # type: ignore[misc]
        return [(_pad(h), _pad(w)), (_pad(h // 2), _pad(w)), (_pad(h), _pad(w * 3 // 4))]
    s = pre.short_edge
    return [(_pad(s), _pad(s)), (_pad(s), _pad(s * 4 // 3)), (_pad(s * 3 // 2), _pad(s))]


def make_config(spec: VersionSpec, ck: sources.Checkpoint, pre: Preprocess, report: dict, created_at: str,
                n_params: int) -> BundleConfig:
    cfg = ck.config
    classes = tuple(cfg.classes)
    q = cfg.decoder.num_queries
    return BundleConfig(
        name=MODEL, version=spec.version, created_at=created_at, task=cfg.task,
        backbone=f"resnet{cfg.backbone.depth}", classes=classes, palette=tuple(palette_for(classes)),
        num_queries=q,
        inputs=(TensorSpec(onnx_export.INPUT, "float32", (1, 3, "height", "width")),),
        outputs=(TensorSpec("pred_logits", "float32", (1, q, len(classes) + 1)),
                 TensorSpec("pred_masks", "float32", (1, q, "height/4", "width/4"))),
        compatible_api=spec.compatible_api, preprocess=pre,
        postprocess=Postprocess(instance_paste_threshold=cfg.parsing_ins_score_thr),
        channel=spec.channel, notes=spec.notes,
        human_class=None if cfg.single_human else cfg.num_parsing,
        source={**ck.lineage, "kind": ck.kind, "uri": ck.uri, "sha256": ck.sha256},
        tools={"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
               "onnxruntime": onnxruntime.__version__, "opset": spec.opset, "m2fpkit": m2fpkit.__version__,
               "exporter": "torch.onnx dynamo"},
        parity=report,
        architecture={"parameters": n_params, **cfg.to_modelscope()},
    )


def export_version(spec: VersionSpec, bundles: Path, *, force: bool = False,
                   enforce_parity: bool = True, calibration: Path | None = None,
                   golden_image: Path | None = None, strict_golden: bool = False) -> ExportResult:
    """Build ``spec`` into ``bundles/m2fp/<version>``; nothing is published unless parity passes.

    With ``spec.int8`` the bundle also ships an int8 QDQ variant calibrated on the images of
    ``calibration`` (default: synthetic scenes), its golden agreement recorded (``config.json → plans``).
    ``enforce_parity=False`` is for benchmark bundles only: a parity failure is recorded in
    ``config.json → parity`` (``gate: "recorded, not enforced"``) instead of stopping the export.
    The golden sample is ``golden_image`` (a photo, decoded before anything is staged) or a drawn scene of
    people (``export.golden``); ``strict_golden`` refuses the export when its label map is degenerate
    (``runtime.bundle.golden_check``) instead of recording it in ``config.json → golden → degenerate``.
    """
    store = BundleStore(bundles, MODEL)
    progress = Progress(8 if spec.int8 else 7, f"{spec.version}:")
    created_at = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    writer.check_new(store, spec.version, force=force)
    # what can fail without a stage fails before one: a bad source or spec leaves the store untouched
    images = quantize.calibration_images(calibration) if spec.int8 else []
    golden_rgb = golden.read_image(golden_image) if golden_image is not None else None
    with progress(f"load source {spec.source}"):
        ck = sources.resolve(spec.source, task=spec.task)
        if spec.task and ck.config.task != spec.task:
            raise sources.SourceError(f"{spec.version}: spec says task {spec.task!r} but the checkpoint is "
                                      f"{ck.config.task!r}")
    with progress("build PyTorch model"):
        model = ck.build_model()
        n_params = count_parameters(model)
        log.info("%s: %s, %.2f M parameters", spec.version, f"resnet{ck.config.backbone.depth}", n_params / 1e6)
    pre = preprocess_for(ck.config, spec.preprocess)
    with writer.stage(store, spec.version, force=force) as staged:
        stage = staged.dir
        onnx_path = stage / "model.onnx"
        with progress(f"export ONNX (opset {spec.opset})"):
            onnx_export.export_onnx(model, onnx_path, opset=spec.opset)
        with progress("parity gate: onnxruntime vs PyTorch"):
            report = parity.check(model, onnx_path, parity_sizes(pre), enforce=enforce_parity)
        with progress("write config.json and metadata"):
            config = make_config(spec, ck, pre, report, created_at, n_params)
            metadata = {
                "m2fp.name": config.name, "m2fp.version": config.version, "m2fp.semver": str(config.semver),
                "m2fp.schema_version": str(config.schema_version), "m2fp.task": config.task,
                "m2fp.num_classes": str(config.num_classes), "m2fp.created_at": created_at,
                "m2fp.source_sha256": ck.sha256,
            }
            onnx_export.set_metadata(onnx_path, metadata)
        with progress("golden sample (PyTorch label map, checked by the runtime at load)"):
            sample = golden.write_golden(model, config, stage, golden_rgb)
            if strict_golden and sample.degenerate:
                raise ExportError(f"{spec.version}: golden sample degenerate ({sample.degenerate}); "
                                  "--strict-golden refuses it (pass --golden IMAGE with a photo of people)")
            config = dataclasses.replace(config, golden=sample)
        if spec.int8:
            with progress("int8 variant (static QDQ, calibrated) and its golden agreement"):
                variant = quantize.write_int8(stage, config, images)
                onnx_export.set_metadata(stage / variant.model_file, metadata)
                config = dataclasses.replace(config, plans=Plans(variants={variant.precision: variant}))
        with progress("weights index, config, manifest; verify and publish"):
            data_file, tensors = weights_index.external_tensors(onnx_path)
            config = staged.finish(config, tensors=tensors, data_file=data_file)
    log.info("%s: published %s in %.1f s", spec.version, store.path(spec.version), progress.elapsed)
    return ExportResult(store.path(spec.version), config, progress.elapsed)


def update_aliases(bundles: Path, spec_aliases: dict[str, str], *, apply: bool = False,
                   named: dict[str, str] | None = None) -> dict[str, str]:
    """Point aliases at published versions; return what changed (alias → version).

    Aliases belong to the store's operator (``m2fp-bundle promote``): the spec file's ``[aliases]`` only
    create those that do not exist yet, unless ``apply``; ``named`` (``m2fp-export --alias``) are set as
    given. An alias whose version is not published is left out.
    """
    store = BundleStore(bundles, MODEL)
    present = set(store.versions())
    spec = {a: v for a, v in spec_aliases.items() if v in present}
    named = {a: v for a, v in (named or {}).items() if v in present}
    changed: dict[str, str] = {}

    def change(current: dict[str, str]) -> dict[str, str]:
        wanted = {**current, **{a: v for a, v in spec.items() if apply or a not in current}, **named}
        changed.update({a: v for a, v in wanted.items() if current.get(a) != v})
        kept = [f"{a} → {wanted[a]}" for a, v in spec.items() if wanted[a] != v]
        if kept:
            log.info("aliases kept as the store's operator set them (--apply-aliases resets them): %s",
                     ", ".join(kept))
        return wanted

    store.update_aliases(change)
    return changed
