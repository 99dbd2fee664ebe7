"""Training configuration: a frozen :class:`TrainConfig`, presets, ``key=value`` overrides,
and the :class:`RunConfig` that a run is made from.

Config flows one way: training preset -> command-line flags -> ``--set key=value``
overrides -> validation -> one frozen :class:`RunConfig` (train + model + data),
resolved once by :func:`run_config` and handed down to the task and the loop. The
resolved config is written as ``config.json`` beside the checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from dolg_tf.config import MODEL_PRESETS, FrozenConfig, ModelConfig, model_config
from dolg_tf.data.config import DataConfig
from dolg_tf.errors import ConfigError

STRATEGIES = ("mirrored", "multiworker", "tpu", "one_device")
OPTIMIZERS = ("sgd", "adamw")
HEADS = ("arcface", "curricularface", "subcenter")
MIXED_PRECISION = ("off", "float16", "bfloat16")
DATA_FORMATS = ("gldv2", "csv", "folder", "tfrecord")
# DataConfig fields that TrainConfig owns (the data section takes them from the train section).
SHARED_DATA_FIELDS = ("data", "data_format", "image_size", "class_balanced", "seed")
# TrainConfig.mixed_precision -> the model's Keras dtype policy.
DTYPE_POLICIES = {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


@dataclasses.dataclass(frozen=True)
class TrainConfig(FrozenConfig):
    """Everything a training run needs besides the model architecture.

    Attributes:
        preset: model preset (``tiny``, ``resnet50``, ``resnet101``).
        strategy: ``mirrored``, ``multiworker`` (``TF_CONFIG``), ``tpu`` or ``one_device``.
        data: dataset path or URI; ``"demo"`` is the built-in demo data.
        data_format: ``gldv2``, ``csv``, ``folder``, ``tfrecord``, or ``None`` (auto-detect).
        image_size: side of the square training crops.
        batch_size: GLOBAL batch size (split over replicas).
        epochs: number of epochs.
        steps_per_epoch: steps per epoch; 0 means ``num_examples // batch_size``.
        max_steps: stop after this many steps in total (the schedule still spans every
            epoch; a later ``--resume`` continues); 0 means no early stop.
        lr: peak learning rate (reached at the end of the warm-up).
        warmup_epochs: linear warm-up length, in epochs (may be fractional; capped at the
            schedule's length, so ``--epochs 1`` with the paper preset still runs).
        end_lr: learning rate at the end of the cosine decay.
        optimizer: ``sgd`` (momentum, Nesterov) or ``adamw``.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        adam_beta_1, adam_beta_2, adam_epsilon: AdamW moments.
        weight_decay: SGD: L2 added to the gradient (as in PyTorch/pycls); AdamW:
            decoupled decay. Never applied to BN, biases or scalars unless
            ``weight_decay_norm_and_bias``.
        weight_decay_norm_and_bias: also decay 0-d/1-d variables (BN, biases, GeM p).
        clip_norm: clip the all-reduced gradient to this global norm; 0 = off.
        head: margin head: ``arcface``, ``curricularface`` or ``subcenter``.
        head_scale, head_margin: the head's ``s`` and ``m``.
        subcenter_k: sub-centres per class for ``subcenter``.
        dynamic_margins: per-class margins 0.05..0.5 from class frequency (``subcenter`` only).
        mixed_precision: ``off``, ``float16`` (dynamic loss scaling) or ``bfloat16``.
        initial_loss_scale, loss_scale_growth_steps: float16 dynamic loss scaling.
        jit: compile the training step with XLA.
        sync_batch_norm: all-reduce batch-norm statistics over replicas.
        backbone_weights: optional keras-hub ResNet preset (name or local directory).
        augment: random resized crop, flip and colour jitter.
        class_balanced: sample classes uniformly.
        seed: random seed (weights, data order, augmentation).
        model_dir: checkpoints, logs and config; empty = ``runs/dolg/<timestamp>``.
        resume: continue from the latest checkpoint in ``model_dir``.
        exact_resume: on resume, fast-forward the input pipeline past the batches already
            trained on (they are decoded again: costly after many epochs of a large dataset),
            so a resumed run equals an uninterrupted one; False restarts the stream with a
            new seed instead (cheap, different order).
        keep_checkpoints: how many checkpoints to keep.
        checkpoint_every: save every this many steps (and at every epoch end); 0 = epoch ends only.
        log_every: write TensorBoard scalars every this many steps.
        progress: show a progress bar.
        eval_demo: report held-out demo retrieval before/after training (demo data only).
        export: export a SavedModel after training.
        export_dir: base directory of the exports (``<export_dir>/<version>/``).
        cpu_replicas: with no GPU, split the CPU into this many logical devices and
            mirror over them (to exercise distribution on a CPU-only machine).
        tpu: TPU name or address for the ``tpu`` strategy (empty: the local TPU).
    """

    preset: str = "tiny"
    strategy: str = "mirrored"
    data: str = "demo"
    data_format: str | None = None
    image_size: int = 96
    batch_size: int = 32
    epochs: int = 8
    steps_per_epoch: int = 40
    max_steps: int = 0
    lr: float = 0.1
    warmup_epochs: float = 1.0
    end_lr: float = 0.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    adam_beta_1: float = 0.9
    adam_beta_2: float = 0.999
    adam_epsilon: float = 1e-7
    weight_decay: float = 1e-4
    weight_decay_norm_and_bias: bool = False
    clip_norm: float = 0.0
    head: str = "arcface"
    head_scale: float = 30.0
    head_margin: float = 0.15
    subcenter_k: int = 3
    dynamic_margins: bool = True
    mixed_precision: str = "off"
    initial_loss_scale: float = 32768.0
    loss_scale_growth_steps: int = 2000
    jit: bool = False
    sync_batch_norm: bool = True
    backbone_weights: str | None = None
    augment: bool = True
    class_balanced: bool = False
    seed: int = 0
    model_dir: str = ""
    resume: bool = False
    exact_resume: bool = True
    keep_checkpoints: int = 3
    checkpoint_every: int = 100
    log_every: int = 10
    progress: bool = True
    eval_demo: bool = True
    export: bool = True
    export_dir: str = "saved_models/dolg"
    cpu_replicas: int = 1
    tpu: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the first invalid field."""
        choices = {
            "strategy": STRATEGIES,
            "optimizer": OPTIMIZERS,
            "head": HEADS,
            "mixed_precision": MIXED_PRECISION,
            "preset": tuple(sorted(MODEL_PRESETS)),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.data_format is not None and self.data_format not in DATA_FORMATS:
            raise ConfigError(f"data_format must be one of {list(DATA_FORMATS)} or None, got {self.data_format!r}")
        positive_ints = (
            "image_size",
            "batch_size",
            "epochs",
            "keep_checkpoints",
            "log_every",
            "subcenter_k",
            "cpu_replicas",
            "loss_scale_growth_steps",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("steps_per_epoch", "max_steps", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32 (the backbone's stride), got {self.image_size}")
        for name in ("lr", "head_scale", "initial_loss_scale", "adam_epsilon"):
            value = getattr(self, name)
            if not _is_finite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("end_lr", "weight_decay", "clip_norm", "warmup_epochs"):
            value = getattr(self, name)
            if not _is_finite(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if self.end_lr > self.lr:
            raise ConfigError(f"end_lr ({self.end_lr}) must not exceed lr ({self.lr})")
        for name in ("momentum", "adam_beta_1", "adam_beta_2"):
            value = getattr(self, name)
            if not _is_finite(value) or not 0 <= value < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not _is_finite(self.head_margin) or not 0 <= self.head_margin < math.pi / 2:
            raise ConfigError(f"head_margin must be in [0, pi/2), got {self.head_margin!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"data must be a path, a URI or 'demo', got {self.data!r}")

    @property
    def is_demo(self) -> bool:
        return self.data in ("demo", "")

    @property
    def dtype_policy(self) -> str:
        """The model's Keras dtype policy for ``mixed_precision``."""
        return DTYPE_POLICIES[self.mixed_precision]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The paper's recipe: SGD 0.9 Nesterov, LR 0.01, cosine with 5 warm-up epochs,
# weight decay 1e-4, 100 epochs, 512x512 crops. The global batch is not in our notes; 64 is what
# 8 GPUs x 8 images give and fits a 16 GB GPU per 8 images at 512x512.
_PAPER = dict(
    data="demo",
    image_size=512,
    batch_size=64,
    epochs=100,
    steps_per_epoch=0,
    lr=0.01,
    warmup_epochs=5.0,
    mixed_precision="off",
    checkpoint_every=1000,
    log_every=50,
)

TRAIN_PRESETS: dict[str, TrainConfig] = {
    # A few minutes on a 2-core CPU: the tiny network on the built-in demo photos. A higher LR than the
    # paper's because the network is trained from scratch for a few hundred steps.
    "tiny": TrainConfig(preset="tiny"),
    "resnet50": TrainConfig(preset="resnet50", **_PAPER),
    "resnet101": TrainConfig(preset="resnet101", **_PAPER),
}


def train_config(preset: str = "tiny", **overrides: Any) -> TrainConfig:
    """The training preset's :class:`TrainConfig` with ``overrides`` applied.

    Raises:
        ConfigError: unknown preset or field, or an invalid value.
    """
    if preset not in TRAIN_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[preset].replace(**overrides)


def parse_value(text: str) -> Any:
    """Parses the value of ``--set key=value``: JSON when it parses, else the bare string.

    ``true``/``false``/``null``, numbers, lists (``[6,12,18]``) and quoted strings are JSON;
    anything else (``runs/x``) stays a string. ``none`` is accepted for ``null``.
    """
    if text.strip().lower() == "none":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _did_you_mean(name: str, known: Iterable[str], section: str | None = None) -> str:
    """``"; did you mean lr?"`` for the closest known names (difflib), or ``""``."""
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    if not close:
        return ""
    close = [f"{section}.{c}" if section else c for c in close]
    return "; did you mean " + " or ".join(close) + "?"


def split_overrides(pairs: Iterable[str], sections: Mapping[str, Iterable[str]]) -> dict[str, dict[str, Any]]:
    """Sorts ``key=value`` strings into config sections.

    A key is ``section.field`` (``model.multi_atrous=false``) or a bare field name that
    exactly one section has (``lr=0.05``).

    Args:
        pairs: the ``--set`` arguments.
        sections: section name -> its field names (for example ``train``, ``model``, ``data``).

    Returns:
        ``{section: {field: parsed value}}`` for every section (possibly empty).

    Raises:
        ConfigError: a malformed pair, an unknown or ambiguous key.
    """
    fields = {name: set(names) for name, names in sections.items()}
    out: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        if "." in key:
            section, _, name = key.partition(".")
            if section not in fields:
                raise ConfigError(f"--set {key}: unknown section {section!r}; expected one of {sorted(fields)}")
            if name not in fields[section]:
                raise ConfigError(
                    f"--set {key}: {section} has no field {name!r}{_did_you_mean(name, fields[section], section)}"
                    f"; its fields: {', '.join(sorted(fields[section]))}"
                )
        else:
            owners = [section for section, names in fields.items() if key in names]
            if not owners:
                every = {n for names in fields.values() for n in names}
                raise ConfigError(
                    f"--set {key}: no config field of that name{_did_you_mean(key, every)}"
                    " (--help lists every field; section.field names one section's)"
                )
            if len(owners) > 1:
                raise ConfigError(f"--set {key}: ambiguous, it is a field of {owners}; write e.g. {owners[0]}.{key}")
            section, name = owners[0], key
        out[section][name] = parse_value(value)
    return out


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run is made from, resolved once (see :func:`run_config`).

    Attributes:
        train: the recipe, strategy, schedule and output paths.
        model: the architecture (``train_image_size`` records ``train.image_size``
            unless overridden).
        data: sampling and augmentation (``image_size``, ``seed`` and ``class_balanced``
            come from ``train``); where the data lives is ``train.data``.
    """

    train: TrainConfig
    model: ModelConfig
    data: DataConfig

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(), "model": self.model.to_dict(), "data": self.data.to_dict()}


def run_config(
    preset: str = "tiny",
    *,
    model_overrides: Mapping[str, Any] | None = None,
    data_overrides: Mapping[str, Any] | None = None,
    **train: Any,
) -> RunConfig:
    """Resolves a run's configuration once: presets, then overrides, then one frozen :class:`RunConfig`.

    Args:
        preset: the training preset (it names the model preset too).
        model_overrides: :class:`dolg_tf.config.ModelConfig` fields over the model preset's.
        data_overrides: :class:`dolg_tf.data.DataConfig` fields (not those of
            :data:`SHARED_DATA_FIELDS`, which are the train section's).
        **train: :class:`TrainConfig` fields over the training preset's.

    Returns:
        A frozen :class:`RunConfig`.

    Raises:
        ConfigError: an unknown preset or field, or an invalid value in any section.

    Example:

    ```python
    config = run_config("tiny", epochs=1, model_overrides={"gem_p": 4.0}, data_overrides={"min_crop_area": 0.3})
    config.model.train_image_size == config.train.image_size == config.data.image_size  # True
    ```
    """
    train_cfg = train_config(preset, **train)
    # The model records the crop size it is trained at; exports default to it.
    model_cfg = model_config(
        train_cfg.preset, **{"train_image_size": train_cfg.image_size, **dict(model_overrides or {})}
    )
    owned = sorted(set(data_overrides or {}) & set(SHARED_DATA_FIELDS))
    if owned:
        raise ConfigError(f"data fields {owned} are set through the train section's fields of the same names")
    data_cfg = DataConfig().replace(
        image_size=train_cfg.image_size,
        seed=train_cfg.seed,
        class_balanced=train_cfg.class_balanced,
        **dict(data_overrides or {}),
    )
    return RunConfig(train=train_cfg, model=model_cfg, data=data_cfg)
