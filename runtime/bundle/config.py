"""``config.json`` ⇄ :class:`BundleConfig`: everything needed to run and describe one version.

Parsing is pure (bytes or a decoded object in, a frozen config out) and refuses with
:class:`~m2fpkit.runtime.errors.MalformedFile` naming the key path, e.g.
``config.json → preprocess → mean: expected 3 numbers``. File names it mentions (``model_file``,
``weights_index``, golden files) must be plain paths inside the bundle and never the manifest's own
side files, which no hash covers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, MalformedFile
from . import jsonfile
from .manifest import check_rel_path
from .versions import SemVer, is_api_version, is_version_name

SCHEMA_VERSION = 1
CONFIG = "config.json"
TASKS = ("multi-human", "single-human")
CHANNELS = ("stable", "recommended", "experimental")
RESIZE_POLICIES = ("shortest-edge", "center-canvas")
#: longest resized side a config may ask for (the exported graphs take up to 8192 px a side)
MAX_SIDE = 16384
#: ``source.kind`` (and ``source.uri`` prefix) that export writes for seeded random-init weights
RANDOM_SOURCE = "random"
#: what every surface (``/api/versions``, ``/meta``, parse responses, WebUI) says about a random-weight version
RANDOM_WEIGHTS_NOTE = ("demo: random-init weights, not a trained M2FP checkpoint; the parsing means nothing. "
                       "Serve the real M2FP: m2fp-export VERSION --source DIR (a ModelScope model directory), "
                       "see the README section 'Serving the real M2FP'")
#: ``source.trained_on``: what a demo checkpoint was trained on (export copies it from the checkpoint's
#: ``configuration.json → m2fpkit → trained_on``); a note is made of it only when it is this short and printable
MAX_TRAINED_ON = 200


@dataclass(frozen=True)
class Preprocess:
    """How image pixels become the graph input (ModelScope's pipeline, see docs in README)."""

    resize: str = "shortest-edge"
    short_edge: int = 640
    max_size: int = 1333
    #: center-canvas only: ``[width, height]`` of the canvas, and the raw pixel value around the image
    canvas: tuple[int, int] | None = None
    canvas_fill: int = 128
    interpolation: str = "bilinear-antialias"
    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    #: value of the bottom/right padding, in normalised units (ModelScope pads after normalising)
    pad_value: float = 0.0


@dataclass(frozen=True)
class Postprocess:
    topk: int = 100
    human_score_threshold: float = 0.1
    part_score_threshold: float = 0.1
    #: ModelScope's ``parsing_ins_score_thr``: instances below it are not pasted into the semantic map
    instance_paste_threshold: float = 0.5


@dataclass(frozen=True)
class Variant:
    """Another graph of the same version (e.g. int8 QDQ) that an execution plan may serve.

    A variant is never served on trust: the runtime checks it against the golden sample first.
    """

    model_file: str
    precision: str
    #: bundle files the variant was calibrated on (kept so it can be re-made and audited on the box)
    calibration: tuple[str, ...] = ()
    #: golden-sample label-map agreement with the PyTorch fp32 reference, measured at export
    agreement: float | None = None


# The agreement floors: each the lowest share of pixels whose labels must agree (pixel agreement,
# ``runtime.agreement.pixel_agreement``) for a graph to count as computing what the PyTorch model computed.
#: the golden self-test of the reference graph at load (final label map vs PyTorch's), when
#: ``golden → min_agreement`` is absent; export writes this value there (``export.golden``)
GOLDEN_MIN_AGREEMENT = 0.99

# A non-reference execution plan (another engine, layout or precision) against ``ort-fp32`` on its evidence
# images, the golden sample and generated scenes (``runtime.plan_evidence``); each floor is overridden by the
# ``config.json → plans`` key of the same name in lower case (``PLAN_MIN_X`` → ``min_x``).
#: share of ort-fp32's decisive pixels (``runtime.agreement.decisive``) whose semantic label the plan matches
PLAN_MIN_DECISIVE_AGREEMENT = 0.999
#: the lowest per-class IoU of the plan's semantic label map with ort-fp32's, over the classes that hold
#: at least :data:`PLAN_MIN_CLASS_PIXELS` pixels of ort-fp32's map
PLAN_MIN_CLASS_IOU = 0.9
#: the least evidence: ort-fp32's decisive pixels over all evidence images (at the agreement floor's
#: default, ten disagreeing pixels then refuse a plan)
PLAN_MIN_DECISIVE_PIXELS = 10_000
#: a class counts (for the evidence and for the IoU floor) with at least this many of ort-fp32's pixels
PLAN_MIN_CLASS_PIXELS = 100
#: the least evidence: classes on ort-fp32's decisive pixels (a declared value may raise it, never lower it:
#: a one-class comparison proves nothing)
PLAN_MIN_CLASSES = 2
PRECISIONS = ("int8",)


@dataclass(frozen=True)
class Plans:
    """``config.json → plans``: the graph variants this bundle ships and the evidence a plan must show.

    ``decisive_margin`` None: ``runtime.agreement.DECISIVE_MARGIN``. A ``min_agreement`` (the floor of the
    whole-map golden agreement with PyTorch that this rule replaced) is still checked to be a fraction, then
    ignored: it measured another thing, and a low value written for it must not loosen this rule."""

    variants: dict[str, Variant] = field(default_factory=dict)
    min_decisive_agreement: float = PLAN_MIN_DECISIVE_AGREEMENT
    min_class_iou: float = PLAN_MIN_CLASS_IOU
    decisive_margin: float | None = None
    min_decisive_pixels: int = PLAN_MIN_DECISIVE_PIXELS
    min_class_pixels: int = PLAN_MIN_CLASS_PIXELS
    min_classes: int = PLAN_MIN_CLASSES


@dataclass(frozen=True)
class Golden:
    """``config.json → golden``: a sample the runtime re-parses at load, and what PyTorch made of it at export."""

    image: str
    #: the final label map PyTorch gave (PNG, uint8 class ids)
    label_map: str
    #: PyTorch's semantic argmax at mask resolution (``runtime.agreement.semantic_labels``); None in older bundles
    semantic: str | None = None
    #: the self-test floor of the reference graph (see :data:`GOLDEN_MIN_AGREEMENT`)
    min_agreement: float = GOLDEN_MIN_AGREEMENT
    #: names of the classes in ``label_map`` (descriptive)
    classes_present: tuple[str, ...] = ()
    #: why export found ``label_map`` degenerate (``bundle.golden_check.judge``), None when it was not or
    #: the bundle predates the field; descriptive: the runtime judges the label map itself
    degenerate: str | None = None

    def files(self) -> tuple[str, ...]:
        return (self.image, self.label_map, *((self.semantic,) if self.semantic else ()))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class BundleConfig:
    name: str
    version: str
    created_at: str
    task: str
    backbone: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    num_queries: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    compatible_api: tuple[str, ...]
    preprocess: Preprocess = field(default_factory=Preprocess)
    postprocess: Postprocess = field(default_factory=Postprocess)
    channel: str = "stable"
    notes: str = ""
    human_class: int | None = None
    model_file: str = "model.onnx"
    #: per-tensor index of the external weights (runtime/weights.py); lets versions share identical tensors
    weights_index: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)
    golden: Golden | None = None
    plans: Plans = field(default_factory=Plans)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def semver(self) -> SemVer:
        return SemVer.parse(self.version)

    @property
    def random_weights(self) -> bool:
        """True when the weights are random-init (export's ``random:`` sources), not a trained checkpoint.

        The one rule, read from ``source`` as export writes it (never from the version's name)."""
        kind, uri = self.source.get("kind"), self.source.get("uri")
        return kind == RANDOM_SOURCE or (isinstance(uri, str) and uri.startswith(RANDOM_SOURCE + ":"))

    @property
    def trained_on(self) -> str | None:
        """What a demo checkpoint says it was trained on (``source.trained_on``), None for any other checkpoint."""
        value = self.source.get("trained_on")
        if isinstance(value, str) and 0 < len(value) <= MAX_TRAINED_ON and value.isprintable():
            return value
        return None

    @property
    def weights_note(self) -> str | None:
        """What every surface says about demo weights: :data:`RANDOM_WEIGHTS_NOTE` for random-init weights, what a
        demo checkpoint was trained on, None for a checkpoint that claims neither (M2FP's own)."""
        if self.random_weights:
            return RANDOM_WEIGHTS_NOTE
        if self.trained_on is not None:
            return (f"demo: trained on {self.trained_on}, not M2FP's checkpoint; it parses drawn people, not photos. "
                    "Serve the real M2FP: see the README section 'Serving the real M2FP'")
        return None

    @property
    def input_size(self) -> list[int] | None:
        """``[height, width]`` of a fixed input, or None when the input size follows the image."""
        if self.preprocess.resize == "center-canvas" and self.preprocess.canvas:
            return [self.preprocess.canvas[1], self.preprocess.canvas[0]]
        return None

    def to_dict(self) -> dict[str, Any]:
        d = _jsonable(dataclasses.asdict(self))
        d["num_classes"] = self.num_classes
        d["semver"] = str(self.semver)
        d["input_size"] = self.input_size
        return d

    def to_json(self) -> str:
        return jsonfile.dumps(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, raw: Any) -> BundleConfig:
        return _parse_config(raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> BundleConfig:
        return _parse_config(jsonfile.loads(raw, CONFIG))

    @classmethod
    def read(cls, bundle_dir: Path) -> BundleConfig:
        """Parse ``config.json`` of a directory (unverified: :mod:`.reader` checks it against the manifest)."""
        try:
            return cls.from_dict(jsonfile.read(Path(bundle_dir) / CONFIG))
        except FileNotFoundError:
            raise IntegrityError(f"{CONFIG} is missing") from None
        except OSError as exc:
            raise IntegrityError(f"{CONFIG} is unreadable ({exc.strerror or exc})") from None

    def files(self) -> tuple[str, ...]:
        """Every bundle file this config names (model, weights index, golden sample)."""
        golden = self.golden.files() if self.golden else ()
        variants = [f for v in self.plans.variants.values() for f in (v.model_file, *v.calibration)]
        return (self.model_file, *((self.weights_index,) if self.weights_index else ()), *golden, *variants)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- parsing

def _err(path: str, msg: str) -> MalformedFile:
    return MalformedFile(f"{CONFIG} → {path}" if path else CONFIG, msg)


def _get(d: dict, key: str, path: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise _err(f"{path}{key}", "missing")
        return default
    v = d[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = _as_float(v, f"{path}{key}")
    ok = isinstance(v, kind) and not (isinstance(v, bool) and kind in (int, float, (int, str)))
    if not ok:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _err(f"{path}{key}", f"expected {name}, got {jsonfile.brief(v)}")
    return v


def _as_float(v: int | float, path: str) -> float:
    """A JSON number as a float; an integer beyond a double's range is refused, not an OverflowError."""
    try:
        return float(v)
    except OverflowError:
        raise _err(path, "number out of range") from None


def _numbers(d: dict, key: str, path: str, n: int, default: Any) -> tuple[float, ...]:
    v = d.get(key, default)
    if not isinstance(v, (list, tuple)) or len(v) != n or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise _err(f"{path}{key}", f"expected {n} numbers, got {jsonfile.brief(v)}")
    return tuple(_as_float(x, f"{path}{key}") for x in v)


def _at_least(value: int, low: int, path: str, high: int | None = None) -> int:
    """``value`` if ``low ≤ value (≤ high)``: an absurd count or pixel value is refused here, not at inference."""
    if value < low or (high is not None and value > high):
        bounds = f"≥ {low}" + (f" and ≤ {high}" if high is not None else "")
        raise _err(path, f"expected an integer {bounds}, got {jsonfile.brief(value)}")
    return value


def _parse_preprocess(d: Any) -> Preprocess:
    p = "preprocess → "
    if not isinstance(d, dict):
        raise _err("preprocess", "expected an object")
    dflt = Preprocess()
    resize = _get(d, "resize", p, str, dflt.resize)
    if resize not in RESIZE_POLICIES:
        raise _err(p + "resize", f"expected one of {', '.join(RESIZE_POLICIES)}, got {jsonfile.brief(resize)}")
    canvas = d.get("canvas")
    if resize == "center-canvas":
        if (not isinstance(canvas, (list, tuple)) or len(canvas) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and 32 <= x <= 8192 for x in canvas)):
            raise _err(p + "canvas", f"expected [width, height] in pixels, got {jsonfile.brief(canvas)}")
        canvas = (canvas[0], canvas[1])
    else:
        canvas = None
    order = _get(d, "channel_order", p, str, dflt.channel_order)
    if order not in ("RGB", "BGR"):
        raise _err(p + "channel_order", f"expected RGB or BGR, got {jsonfile.brief(order)}")
    std = _numbers(d, "std", p, 3, dflt.std)
    if any(s <= 0 for s in std):
        raise _err(p + "std", "must be positive")
    out = Preprocess(
        resize=resize,
        short_edge=_get(d, "short_edge", p, int, dflt.short_edge),
        max_size=_get(d, "max_size", p, int, dflt.max_size),
        canvas=canvas,
        canvas_fill=_at_least(_get(d, "canvas_fill", p, int, dflt.canvas_fill), 0, p + "canvas_fill", 255),
        interpolation=_get(d, "interpolation", p, str, dflt.interpolation),
        channel_order=order,
        mean=_numbers(d, "mean", p, 3, dflt.mean),  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        size_divisibility=_get(d, "size_divisibility", p, int, dflt.size_divisibility),
        pad_value=_get(d, "pad_value", p, float, dflt.pad_value),
    )
    if (not 1 <= out.size_divisibility <= 1024 or out.short_edge < 1 or out.max_size < out.short_edge
            or out.max_size > MAX_SIDE):
        raise _err("preprocess", f"size_divisibility must lie in 1..1024, short_edge ≤ max_size in 1..{MAX_SIDE}")
    return out


def _parse_postprocess(d: Any) -> Postprocess:
    p = "postprocess → "
    if not isinstance(d, dict):
        raise _err("postprocess", "expected an object")
    dflt = Postprocess()
    return Postprocess(
        topk=_at_least(_get(d, "topk", p, int, dflt.topk), 1, p + "topk"),
        human_score_threshold=_get(d, "human_score_threshold", p, float, dflt.human_score_threshold),
        part_score_threshold=_get(d, "part_score_threshold", p, float, dflt.part_score_threshold),
        instance_paste_threshold=_get(d, "instance_paste_threshold", p, float, dflt.instance_paste_threshold),
    )


def _parse_tensors(v: Any, key: str) -> tuple[TensorSpec, ...]:
    if not isinstance(v, list) or not v:
        raise _err(key, "expected a non-empty list of {name, dtype, shape}")
    out = []
    for i, t in enumerate(v):
        p = f"{key} → {i} → "
        if not isinstance(t, dict):
            raise _err(f"{key} → {i}", "expected an object")
        shape = _get(t, "shape", p, list)
        if not all((isinstance(s, int) and not isinstance(s, bool)) or isinstance(s, str) for s in shape):
            raise _err(p + "shape", "expected integers or symbolic names")
        out.append(TensorSpec(_get(t, "name", p, str), _get(t, "dtype", p, str), tuple(shape)))
    return tuple(out)


def _parse_config(raw: Any) -> BundleConfig:
    if not isinstance(raw, dict):
        raise MalformedFile(CONFIG, "expected a JSON object")
    schema = _get(raw, "schema_version", "", int)
    if schema != SCHEMA_VERSION:
        raise _err("schema_version",
                   f"this runtime reads schema {SCHEMA_VERSION}, the bundle has {jsonfile.brief(schema)}")
    version = _get(raw, "version", "", str)
    if not is_version_name(version):
        raise _err("version", f"{jsonfile.brief(version)} is not a version name like v1.2 or v2.0-beta")
    task = _get(raw, "task", "", str)
    if task not in TASKS:
        raise _err("task", f"expected one of {', '.join(TASKS)}, got {jsonfile.brief(task)}")
    channel = _get(raw, "channel", "", str, "stable")
    if channel not in CHANNELS:
        raise _err("channel", f"expected one of {', '.join(CHANNELS)}, got {jsonfile.brief(channel)}")
    classes = _get(raw, "classes", "", list)
    if not classes or not all(isinstance(c, str) and c for c in classes):
        raise _err("classes", "expected a non-empty list of class names")
    palette = _get(raw, "palette", "", list)
    if len(palette) != len(classes):
        raise _err("palette", f"{len(palette)} colours for {len(classes)} classes")
    for i, c in enumerate(palette):
        if (not isinstance(c, list) or len(c) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in c)):
            raise _err(f"palette → {i}", f"expected [r, g, b] in 0..255, got {jsonfile.brief(c)}")
    if "num_classes" in raw and raw["num_classes"] != len(classes):
        raise _err("num_classes", f"{jsonfile.brief(raw['num_classes'])} but classes has {len(classes)} names")
    human = raw.get("human_class")
    if task == "multi-human":
        if not isinstance(human, int) or isinstance(human, bool) or not 0 < human < len(classes):
            raise _err("human_class",
                       f"a multi-human bundle needs the index of its human class, got {jsonfile.brief(human)}")
    elif human is not None:
        raise _err("human_class", "must be null for a single-human bundle")
    api = _get(raw, "compatible_api", "", list)
    if not api or not all(is_api_version(a) for a in api):
        raise _err("compatible_api", "expected a non-empty list of API versions like \"1.0\"")
    model_file = _file_name(_get(raw, "model_file", "", str, "model.onnx"), "model_file")
    weights_index = raw.get("weights_index")
    if weights_index is not None:
        weights_index = _file_name(_get(raw, "weights_index", "", str), "weights_index")
    preprocess = _parse_preprocess(raw.get("preprocess", {}))
    if (task == "single-human") != (preprocess.resize == "center-canvas"):
        raise _err("preprocess → resize", f"{preprocess.resize!r} does not fit task {task!r}")
    golden = raw.get("golden")
    return BundleConfig(
        name=_get(raw, "name", "", str),
        version=version,
        created_at=_get(raw, "created_at", "", str),
        task=task,
        backbone=_get(raw, "backbone", "", str),
        classes=tuple(classes),
        palette=tuple(tuple(c) for c in palette),  # type: ignore[misc]
        num_queries=_at_least(_get(raw, "num_queries", "", int), 1, "num_queries"),
        inputs=_parse_tensors(raw.get("inputs"), "inputs"),
        outputs=_parse_tensors(raw.get("outputs"), "outputs"),
        compatible_api=tuple(api),
        preprocess=preprocess,
        postprocess=_parse_postprocess(raw.get("postprocess", {})),
        channel=channel,
        notes=_get(raw, "notes", "", str, ""),
        human_class=human,
        model_file=model_file,
        weights_index=weights_index,
        source=_get(raw, "source", "", dict, {}),
        tools=_get(raw, "tools", "", dict, {}),
        parity=_get(raw, "parity", "", dict, {}),
        architecture=_get(raw, "architecture", "", dict, {}),
        golden=None if golden is None else _parse_golden(golden),
        plans=_parse_plans(raw.get("plans", {})),
    )


def _file_name(name: object, path: str) -> str:
    return check_rel_path(name, f"{CONFIG} → {path}")


def _fraction(v: Any, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise _err(path, f"expected a number in (0, 1], got {jsonfile.brief(v)}")
    return float(v)


def _parse_plans(d: Any) -> Plans:
    p = "plans → "
    if not isinstance(d, dict):
        raise _err("plans", "expected an object")
    variants_raw = _get(d, "variants", p, dict, {})
    variants: dict[str, Variant] = {}
    for name, v in variants_raw.items():
        vp = f"{p}variants → {jsonfile.brief(name, 40)} → "
        if name not in PRECISIONS:
            raise _err(vp[:-3], f"unknown variant (known: {', '.join(PRECISIONS)})")
        if not isinstance(v, dict):
            raise _err(vp[:-3], "expected an object")
        precision = _get(v, "precision", vp, str)
        if precision != name:
            raise _err(vp + "precision", f"expected {name!r}, got {jsonfile.brief(precision)}")
        calibration = _get(v, "calibration", vp, list, [])
        if len(calibration) > 64:
            raise _err(vp + "calibration", f"at most 64 files, got {len(calibration)}")
        agreement = v.get("agreement")
        variants[name] = Variant(
            model_file=_file_name(_get(v, "model_file", vp, str), vp + "model_file"),
            precision=precision,
            calibration=tuple(_file_name(f, f"{vp}calibration → {i}") for i, f in enumerate(calibration)),
            agreement=None if agreement is None else _fraction(agreement, vp + "agreement"),
        )
    if "min_agreement" in d:  # the replaced floor (see Plans): still a fraction, no longer a rule
        _fraction(d["min_agreement"], p + "min_agreement")
    margin = d.get("decisive_margin")
    return Plans(
        variants=variants,
        min_decisive_agreement=_fraction(d.get("min_decisive_agreement", PLAN_MIN_DECISIVE_AGREEMENT),
                                         p + "min_decisive_agreement"),
        min_class_iou=_fraction(d.get("min_class_iou", PLAN_MIN_CLASS_IOU), p + "min_class_iou"),
        decisive_margin=None if margin is None else _fraction(margin, p + "decisive_margin"),
        min_decisive_pixels=_at_least(_get(d, "min_decisive_pixels", p, int, PLAN_MIN_DECISIVE_PIXELS), 1,
                                      p + "min_decisive_pixels"),
        min_class_pixels=_at_least(_get(d, "min_class_pixels", p, int, PLAN_MIN_CLASS_PIXELS), 1,
                                   p + "min_class_pixels"),
        min_classes=_at_least(_get(d, "min_classes", p, int, PLAN_MIN_CLASSES), PLAN_MIN_CLASSES,
                              p + "min_classes", 1024),
    )


def _parse_golden(d: Any) -> Golden:
    p = "golden → "
    if not isinstance(d, dict):
        raise _err("golden", "expected an object or null")
    semantic = d.get("semantic")
    classes = _get(d, "classes_present", p, list, [])
    if not all(isinstance(c, str) for c in classes):
        raise _err(p + "classes_present", "expected a list of class names")
    degenerate = d.get("degenerate")
    if degenerate is not None and (not isinstance(degenerate, str) or not degenerate.strip()):
        raise _err(p + "degenerate", f"expected null or the reason, got {jsonfile.brief(degenerate)}")
    return Golden(
        image=_file_name(d.get("image"), p + "image"),
        label_map=_file_name(d.get("label_map"), p + "label_map"),
        semantic=None if semantic is None else _file_name(semantic, p + "semantic"),
        min_agreement=_fraction(d.get("min_agreement", GOLDEN_MIN_AGREEMENT), p + "min_agreement"),
        classes_present=tuple(classes),
        degenerate=degenerate,
    )
