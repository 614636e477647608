"""Training configuration: typed frozen dataclasses, the ``paper`` and ``tiny`` presets, overrides.

``shi-paper`` and ``shi-tiny`` train the other family, Shi et al. 2020 (``family = "shi2020"``, settings in
``shi1``/``shi2``, slab preprocessing; `dicom_node_training.shi`).

``paper`` holds the settings of Ma et al. 2022 (Implementation details): phase 1 Adam 4e-4,
batch 16, 20 epochs, random crop 192 of 224 and +-15 degree rotation on 10-slice windows;
phase 2 sequences of 40, TCN 2 levels kernel 3, 128 channels, dropout 0.2, Adam 5e-4 decayed by
0.9 every 20 steps, batch 64, 200 epochs. ``tiny`` is a narrow network on small input for CPU.

The phase-1 input geometry (resize, crop, window slices, HU windows) lives in ``preprocess``
(:class:`dicom_node.imaging.preprocess.PreprocessConfig`), the single source shared with the node.

Overrides: ``load_config("tiny", "run.toml")`` where the file (TOML or JSON) has sections named
like the fields, e.g.::

    seed = 7
    [phase1]
    epochs = 2
    [phase2]
    kind = "gru"
    [preprocess]
    resize = 96
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import tomllib

from dicom_node.imaging.preprocess import SHI2020_PREPROCESSING, PreprocessConfig

__all__ = [
    "Phase1Config",
    "Phase2Config",
    "ShiStage1Config",
    "ShiStage2Config",
    "TrainConfig",
    "ConfigError",
    "PRESETS",
    "PAPER_SPLIT",
    "load_config",
    "config_to_dict",
    "config_from_dict",
]

#: Study counts of the paper's split (train/validation/test). They sum to 7292 although the
#: paper reports 7279 studies; we keep the proportions.
PAPER_SPLIT: tuple[int, int, int] = (5292, 1000, 1000)


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class Phase1Config:
    """3D ResNet-18 window classifier."""

    width: int = 64  # r3d_18 planes of layer1 (64 -> 512-d features)
    pretrained: str | None = None  # local torchvision r3d_18 Kinetics-400 state_dict; never downloaded
    lr: float = 4e-4  # Adam
    batch_size: int = 16
    epochs: int = 20
    rotation_deg: float = 15.0  # training augmentation: random rotation in +-rotation_deg
    random_crop: bool = True  # training: random crop preprocess.crop of preprocess.resize; eval: resize to crop
    #: None = sample windows as they come (the paper); a fraction in (0, 1) = draw each epoch's
    #: windows with replacement so that this share is positive (rare positives on small data sets)
    positive_fraction: float | None = None
    #: None = every training window once per epoch (the paper); a number = draw this many windows
    #: per epoch (a fresh draw each epoch), so that more studies do not make an epoch longer
    windows_per_epoch: int | None = None
    #: share of the negative draws (with positive_fraction) taken at the heights where positive
    #: windows sit, so that a window's level alone does not predict its label; 0 = uniform (the paper)
    level_matched_negatives: float = 0.0
    #: "constant" (the paper) or "cosine": decay from `lr` to 0 over all epochs, step by step
    lr_schedule: Literal["constant", "cosine"] = "constant"
    #: 0 = the window label only (the paper). > 0 = also train a linear head on the window features to
    #: predict the window's study labels (the nine of the RSNA layout), its BCE times this weight added to
    #: the window BCE; the head is dropped after phase 1 (features, export and node do not see it)
    study_label_weight: float = 0.0
    #: which epoch's model phase 1 keeps for the features: "best" = the best validation window AUROC
    #: (the paper; validation loss when the validation windows hold one class), "last" = the last epoch
    keep: Literal["best", "last"] = "best"
    #: lambda of the attention loss (Shi et al. 2020, eq. 3): L = L_cls + lambda * continuous Dice between the
    #: window's CAM (normalised by its maximum) and the embolus mask pooled to the CAM's cells; needs masks
    #: (DATA/masks/<StudyInstanceUID>.npz, docs/training.md); windows without one are left out of it. 0 = off
    #: (the paper: RSNA has no masks)
    attention_loss_weight: float = 0.0
    #: also hold negative windows (all-zero mask) to an empty CAM, as Shi et al. do. Off by default: with the
    #: ReLU CAM of a randomly initialised 3D model, the many negative windows drive the map below zero
    #: everywhere, where its gradient is zero for good; measured on phantoms (docs/benchmarks.md, heatmap
    #: runs): attention loss flat at 0.23 for 8 epochs and every exported heatmap all zero
    attention_on_negatives: bool = False

    @property
    def feature_dim(self) -> int:
        return 8 * self.width


@dataclass(frozen=True)
class Phase2Config:
    """Sequence model over window features."""

    kind: Literal["tcn", "gru"] = "tcn"
    seq_len: int = 40
    levels: int = 2
    kernel_size: int = 3
    hidden: int = 128
    dropout: float = 0.2
    causal: bool = False  # TCN padding: False = symmetric 'same' padding, True = the paper's causal chomp
    lr: float = 5e-4  # Adam
    lr_decay: float = 0.9  # multiplicative factor ...
    lr_decay_every: int = 20  # ... every this many optimiser steps
    batch_size: int = 64
    epochs: int = 200
    loss_normalization: Literal["paper", "competition"] = "paper"  # see dicom_node_training.loss


@dataclass(frozen=True)
class ShiStage1Config:
    """Shi et al. 2020 stage I: slab ResNet-18 trained with L = CE + lambda * continuous Dice (attention loss)."""

    width: int = 64  # planes of layer1 (64 -> 512 feature maps, the published ResNet-18)
    #: 1 = 16 px cells (the paper's 24 x 24 map at 384 px); 2 = torchvision's 32 px cells
    layer4_stride: int = 1
    #: 2 = torchvision's; 1 halves the cells again (8 px with layer4_stride 1): small CPU crops need it
    layer3_stride: int = 2
    pretrained: str | None = None  # local torchvision resnet18 ImageNet state_dict; never downloaded
    lr: float = 1e-4  # Adam
    batch_size: int = 48
    epochs: int = 100
    #: lambda of eq. 3 (1.0 in the paper); 0 = classification loss only (the paper's "without AT" ablation)
    attention_loss_weight: float = 1.0
    #: negative slabs drawn per positive slab each epoch (the paper: an equal number)
    negatives_per_positive: float = 1.0


@dataclass(frozen=True)
class ShiStage2Config:
    """Shi et al. 2020 stage II: bidirectional Conv-LSTM over the frozen stage-I feature maps of the slabs."""

    filters: int = 96
    units: int = 2
    input_dropout: float = 0.2  # channel dropout on inputs and recurrent states
    dropout: float = 0.5  # before the output layer
    lr: float = 1e-4  # Adam
    batch_size: int = 32
    epochs: int = 50


@dataclass(frozen=True)
class TrainConfig:
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    #: which model family the run trains: "ma2022" (phase1/phase2 settings) or "shi2020" (shi1/shi2 settings,
    #: with slab preprocessing); the other family's settings are not used
    family: Literal["ma2022", "shi2020"] = "ma2022"
    shi1: ShiStage1Config = field(default_factory=ShiStage1Config)
    shi2: ShiStage2Config = field(default_factory=ShiStage2Config)
    seed: int = 0
    #: study-level split proportions (train, validation, test); normalised to sum 1
    split: tuple[float, float, float] = cast(tuple[float, float, float], tuple(n / sum(PAPER_SPLIT) for n in PAPER_SPLIT))
    num_workers: int = 4
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # mixed precision on CUDA only; ignored on CPU


PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),
    "tiny": TrainConfig(
        phase1=Phase1Config(width=16, lr=1e-3, lr_schedule="cosine", batch_size=8, epochs=30, positive_fraction=0.3,
                            windows_per_epoch=4000, level_matched_negatives=0.5, study_label_weight=0.5, keep="last",
                            attention_loss_weight=1.0),
        # 436 phantom training studies in batches of 16 are 28 steps an epoch: the paper's decay every
        # 20 steps would cut the learning rate 10x by epoch 16 and stall phase 2 (docs/benchmarks.md, run J)
        phase2=Phase2Config(hidden=64, batch_size=16, epochs=100, lr_decay_every=200),
        preprocess=replace(PreprocessConfig(), resize=96, crop=80, spacing_mm=2.5),
        num_workers=0,
        device="cpu",
        amp=False,
    ),
    # Shi et al. 2020 (section 3.2): 2.5 mm grid, 50 slabs of 5 slices, 384 px, -1024..500 HU; stage I Adam 1e-4,
    # batch 48, 100 epochs, lambda 1; stage II 2 units of 96 filters, Adam 1e-4, batch 32, 50 epochs
    "shi-paper": TrainConfig(family="shi2020", preprocess=SHI2020_PREPROCESSING),
    # narrow and small for this CPU: 80 px crops of 96 px slabs, width 16, 24 filters; layer3 at stride 1 gives
    # 10 x 10 cells of 8 px (5 x 5 of 16 px put a cell centre up to 22 mm from a clot on phantoms: run S2 of
    # docs/benchmarks.md, 27 % within 10 mm)
    "shi-tiny": TrainConfig(
        family="shi2020",
        preprocess=replace(SHI2020_PREPROCESSING, resize=96, crop=80),
        # 40 stage-I epochs of ~2,000 slabs are ~8 min here; stage II (~40 s an epoch on 600 phantoms) is at its
        # best validation accuracy within 25 epochs (docs/benchmarks.md, families run S4)
        shi1=ShiStage1Config(width=16, layer3_stride=1, lr=1e-3, batch_size=16, epochs=40),
        shi2=ShiStage2Config(filters=24, lr=1e-3, batch_size=8, epochs=25),
        num_workers=0,
        device="cpu",
        amp=False,
    ),
}


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain JSON-able dict (for checkpoints and reports)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(owner: str, name: str, tp: Any, value: Any) -> Any:
    where = f"{owner}.{name}"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config {where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(owner, name, inner[0], value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config {where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(owner, name, args[0], v) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"config {where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(owner, name, a, v) for a, v in zip(args, value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config {where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config {where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config {where}: expected a string, got {value!r}")
        return value
    return value


def _merge(obj: Any, overrides: dict[str, Any], owner: str) -> Any:
    if not isinstance(overrides, dict):
        raise ConfigError(f"config {owner}: expected a table of settings, got {overrides!r}")
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in known:
            where = f"config {owner}" if owner else "config"
            raise ConfigError(f"{where}: unknown setting {key!r}; valid settings: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, f"{owner}.{key}" if owner else key)
        else:
            changes[key] = _coerce(owner or "config", key, hints[key], value)
    try:
        return replace(obj, **changes)
    except (TypeError, ValueError) as exc:  # the dataclass's own validation (e.g. PreprocessConfig)
        raise ConfigError(f"config {owner or 'settings'}: {exc}") from exc


def _positive(where: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"config {where}: must be > 0, got {value!r}")


def validate(config: TrainConfig) -> TrainConfig:
    """Check ranges and cross-field rules; return ``config`` (normalised split) or raise :class:`ConfigError`."""
    p1, p2, pp = config.phase1, config.phase2, config.preprocess
    for where, v in (("phase1.width", p1.width), ("phase1.lr", p1.lr), ("phase1.batch_size", p1.batch_size),
                     ("phase1.epochs", p1.epochs), ("phase2.seq_len", p2.seq_len), ("phase2.levels", p2.levels),
                     ("phase2.kernel_size", p2.kernel_size), ("phase2.hidden", p2.hidden), ("phase2.lr", p2.lr),
                     ("phase2.lr_decay", p2.lr_decay), ("phase2.lr_decay_every", p2.lr_decay_every),
                     ("phase2.batch_size", p2.batch_size), ("phase2.epochs", p2.epochs),
                     ("preprocess.resize", pp.resize), ("preprocess.crop", pp.crop if pp.crop is not None else 1),
                     ("preprocess.window_slices", pp.window_slices)):
        _positive(where, v)
    if p1.windows_per_epoch is not None and p1.windows_per_epoch < p1.batch_size:
        raise ConfigError(f"config phase1.windows_per_epoch: {p1.windows_per_epoch} is fewer than one batch "
                          f"({p1.batch_size}); use a larger number, or leave it out to visit every window")
    if not 0.0 <= p1.level_matched_negatives <= 1.0:
        raise ConfigError(f"config phase1.level_matched_negatives: must be a share in [0, 1], got {p1.level_matched_negatives}")
    if p1.level_matched_negatives and p1.positive_fraction is None:
        raise ConfigError("config phase1.level_matched_negatives: needs phase1.positive_fraction (balanced draws); "
                          "set positive_fraction, or level_matched_negatives = 0")
    if not p1.study_label_weight >= 0.0:
        raise ConfigError(f"config phase1.study_label_weight: must be >= 0 (0 = window label only), got {p1.study_label_weight!r}")
    if not p1.attention_loss_weight >= 0.0:
        raise ConfigError(f"config phase1.attention_loss_weight: must be >= 0 (0 = off, 1 = Shi et al.'s lambda), "
                          f"got {p1.attention_loss_weight!r}")
    s1, s2 = config.shi1, config.shi2
    for where, v in (("shi1.width", s1.width), ("shi1.lr", s1.lr), ("shi1.batch_size", s1.batch_size),
                     ("shi1.epochs", s1.epochs), ("shi1.negatives_per_positive", s1.negatives_per_positive),
                     ("shi2.filters", s2.filters), ("shi2.units", s2.units), ("shi2.lr", s2.lr),
                     ("shi2.batch_size", s2.batch_size), ("shi2.epochs", s2.epochs)):
        _positive(where, v)
    if not s1.attention_loss_weight >= 0.0:
        raise ConfigError(f"config shi1.attention_loss_weight: must be >= 0 (0 = no attention loss, 1 = the paper), "
                          f"got {s1.attention_loss_weight!r}")
    if config.family == "shi2020" and not pp.slabs:
        raise ConfigError("config preprocess.slabs: the shi2020 family reads a fixed number of slabs per study; "
                          "set preprocess.slabs (50 in the paper) or start from the shi-paper / shi-tiny preset")
    if not 0.0 <= p1.rotation_deg <= 180.0:
        raise ConfigError(f"config phase1.rotation_deg: must be in [0, 180], got {p1.rotation_deg}")
    for where, v in (("phase2.dropout", p2.dropout),):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config {where}: must be in [0, 1), got {v}")
    if not p2.causal and p2.kind == "tcn" and p2.kernel_size % 2 == 0:
        raise ConfigError(f"config phase2.kernel_size: non-causal TCN needs an odd kernel, got {p2.kernel_size}; use 3 or set causal = true")
    if p2.kind == "gru" and p2.hidden % 2:
        raise ConfigError(f"config phase2.hidden: the bidirectional GRU needs an even hidden size, got {p2.hidden}")
    if pp.crop is not None and pp.crop > pp.resize:
        raise ConfigError(f"config preprocess.crop: crop {pp.crop} is larger than resize {pp.resize}; crop must be <= resize")
    if len(config.split) != 3 or any(s < 0 for s in config.split) or config.split[0] <= 0 or sum(config.split) <= 0:
        raise ConfigError(f"config split: expected three non-negative proportions (train, validation, test) with train > 0, got {config.split!r}")
    if config.num_workers < 0:
        raise ConfigError(f"config num_workers: must be >= 0, got {config.num_workers}")
    if not (config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:")):
        raise ConfigError(f"config device: {config.device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
    total = float(sum(config.split))
    return replace(config, split=cast(tuple[float, float, float], tuple(s / total for s in config.split)))  # length checked above


def config_from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply a (possibly partial) nested dict to ``base`` (default: the paper preset) and validate."""
    return validate(_merge(base or PRESETS["paper"], data, ""))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .toml or .json")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table at top level, got {type(data).__name__}")
    return data


def load_config(preset: str = "paper", file: Path | str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The named preset, then the settings in ``file`` (TOML/JSON), then ``overrides``; validated."""
    if preset not in PRESETS:
        raise ConfigError(f"config preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    if file is not None:
        config = _merge(config, _read_file(Path(file)), "")
    if overrides:
        config = _merge(config, overrides, "")
    return validate(config)
