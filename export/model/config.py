"""M2FP hyper-parameters: parsed from ``configuration.json["model"]`` or taken from a preset.

Field names are ModelScope's own keyword arguments, so a ModelScope ``configuration.json`` maps onto
these dataclasses one to one and a preset can be written back out as a ModelScope model directory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from m2fpkit.runtime.figures import CIHP_PARSING, LIP_PARSING

log = logging.getLogger(__name__)

#: Class names of the CIHP multi-human model (20 parsing classes + the "Human" instance class).
CIHP_CLASSES: tuple[str, ...] = (*CIHP_PARSING, "Human")
#: Class names of the LIP single-human model.
LIP_CLASSES: tuple[str, ...] = LIP_PARSING


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key path."""


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 101
    out_features: tuple[str, ...] = ("res2", "res3", "res4", "res5")
    num_groups: int = 1
    width_per_group: int = 64
    norm: str = "BN"
    stem_out_channels: int = 128
    res2_out_channels: int = 256
    stride_in_1x1: bool = False
    res4_dilation: int = 1
    res5_dilation: int = 1
    res5_multi_grid: tuple[int, ...] = (1, 1, 1)


@dataclass(frozen=True)
class EncoderConfig:
    in_features: tuple[str, ...] = ("res2", "res3", "res4", "res5")
    transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5")
    transformer_dropout: float = 0.0
    transformer_nheads: int = 8
    transformer_dim_feedforward: int = 1024
    transformer_enc_layers: int = 6
    conv_dim: int = 256
    mask_dim: int = 256
    common_stride: int = 4


@dataclass(frozen=True)
class DecoderConfig:
    num_classes: int = 21
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9
    pre_norm: bool = False
    mask_dim: int = 256
    enforce_input_project: bool = False


@dataclass(frozen=True)
class M2FPConfig:
    """Everything needed to build the network and describe its outputs."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    classes: tuple[str, ...] = CIHP_CLASSES
    single_human: bool = False
    num_parsing: int = 20
    #: Single-human canvas as ModelScope writes it: ``[width, height]``.
    single_human_size: tuple[int, int] = (384, 512)
    parsing_ins_score_thr: float = 0.5

    @property
    def task(self) -> str:
        return "single-human" if self.single_human else "multi-human"

    def to_modelscope(self) -> dict[str, Any]:
        """The ``configuration.json["model"]`` dict ModelScope's ``M2FP`` takes as kwargs."""
        multi = not self.single_human
        return {
            "type": "m2fp",
            "backbone": _plain(dataclasses.asdict(self.backbone)),
            "encoder": _plain(dataclasses.asdict(self.encoder)),
            "decoder": _plain(dataclasses.asdict(self.decoder)),
            "pretrained": True,
            "input_single_human": {"sizes": [list(self.single_human_size)]},
            "classes": list(self.classes),
            "num_parsing": self.num_parsing,
            "single_human": self.single_human,
            "parsing_ins_score_thr": self.parsing_ins_score_thr,
            "parsing_on": multi,
            "semantic_on": not multi,
            "sem_seg_postprocess_before_inference": multi,
        }


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _section(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object, got {type(raw).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            log.warning("%s.%s: unknown key, ignored", path, key)
            continue
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{path}.{key}: expected a list, got {value!r}")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}.{key}: expected true/false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{path}.{key}: expected an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{path}.{key}: expected a number, got {value!r}")
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def from_modelscope(model_cfg: dict[str, Any], path: str = "configuration.json → model") -> M2FPConfig:
    """Parse ModelScope's ``configuration.json["model"]``; errors name the key path."""
    cfg = copy.deepcopy(model_cfg)
    for key in ("backbone", "encoder", "decoder", "classes"):
        if key not in cfg:
            raise ConfigError(f"{path}.{key}: missing")
    classes = cfg["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise ConfigError(f"{path}.classes: expected a non-empty list of class names")
    decoder = _section(DecoderConfig, cfg["decoder"], f"{path}.decoder")
    if decoder.num_classes != len(classes):
        raise ConfigError(
            f"{path}.decoder.num_classes: {decoder.num_classes} but {path}.classes has {len(classes)} names"
        )
    single = bool(cfg.get("single_human", True))  # ModelScope's default is True
    sizes = (cfg.get("input_single_human") or {}).get("sizes") or [[384, 512]]
    try:
        canvas = (int(sizes[0][0]), int(sizes[0][1]))
    except (TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{path}.input_single_human.sizes: expected [[width, height]], got {sizes!r}") from exc
    num_parsing = cfg.get("num_parsing")
    if num_parsing is None:
        num_parsing = len(classes) if single else len(classes) - 1
    return M2FPConfig(
        backbone=_section(BackboneConfig, cfg["backbone"], f"{path}.backbone"),
        encoder=_section(EncoderConfig, cfg["encoder"], f"{path}.encoder"),
        decoder=decoder,
        classes=tuple(classes),
        single_human=single,
        num_parsing=int(num_parsing),
        single_human_size=canvas,
        parsing_ins_score_thr=float(cfg.get("parsing_ins_score_thr", 0.5)),
    )


def _tiny_parts() -> tuple[BackboneConfig, EncoderConfig, DecoderConfig]:
    """Thin and shallow, yet every operator kind of ``r101`` (``tests/test_model.py`` compares the graphs).

    ResNet-50 (the shallowest depth ModelScope's backbone knows) and three decoder layers (one per
    feature level the decoder attends to round-robin) are the least that takes every path. The encoder
    keeps two layers although one would do: the seeded "lively" weights of the fidelity and postprocess
    tests are tuned to this architecture, and one layer saves only ~1 s of a ~30 s export.
    """
    backbone = BackboneConfig(depth=50, width_per_group=8, stem_out_channels=32, res2_out_channels=32)
    encoder = EncoderConfig(transformer_nheads=4, transformer_dim_feedforward=64, transformer_enc_layers=2,
                            conv_dim=32, mask_dim=32)
    decoder = DecoderConfig(hidden_dim=32, num_queries=20, nheads=4, dim_feedforward=64, dec_layers=3,
                            mask_dim=32)
    return backbone, encoder, decoder


def preset(name: str, task: str = "multi-human") -> M2FPConfig:
    """A named architecture: ``r101`` (full size, 63.1 M params) or ``tiny`` (same operator kinds, small)."""
    if task not in ("multi-human", "single-human"):
        raise ConfigError(f"task: expected 'multi-human' or 'single-human', got {task!r}")
    single = task == "single-human"
    classes = LIP_CLASSES if single else CIHP_CLASSES
    if name == "r101":
        backbone, encoder, decoder = BackboneConfig(), EncoderConfig(), DecoderConfig()
    elif name == "tiny":
        backbone, encoder, decoder = _tiny_parts()
    else:
        raise ConfigError(f"preset: unknown {name!r} (known: r101, tiny)")
    decoder = dataclasses.replace(decoder, num_classes=len(classes))
    return M2FPConfig(backbone=backbone, encoder=encoder, decoder=decoder, classes=classes,
                      single_human=single, num_parsing=20)
