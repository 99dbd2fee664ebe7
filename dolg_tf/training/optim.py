"""Learning-rate schedule, optimizers and weight-decay selection for DOLG training."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import keras
from keras import ops

from dolg_tf.errors import ConfigError
from dolg_tf.training.config import TrainConfig


@keras.saving.register_keras_serializable(package="dolg_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak_lr``, then cosine decay to ``end_lr``.

    ``lr(step) = peak_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``,
    then ``end_lr + (peak_lr - end_lr) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)``, clamped at 1.
    The schedule is a pure function of the optimizer's iteration counter, so a
    restored counter restores the learning rate exactly.

    Args:
        peak_lr: float. Learning rate at the end of the warm-up.
        total_steps: int. Length of the whole schedule.
        warmup_steps: int. Length of the linear warm-up (0: none).
        end_lr: float. Final learning rate.
    """

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0):
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ConfigError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.end_lr = float(end_lr)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 1))
        warm = self.peak_lr * ops.minimum(step + 1.0, warmup) / warmup
        decay_len = float(max(self.total_steps - self.warmup_steps, 1))
        t = ops.clip((step - float(self.warmup_steps)) / decay_len, 0.0, 1.0)
        cosine = self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (1.0 + ops.cos(math.pi * t))
        if self.warmup_steps == 0:
            return cosine
        return ops.where(step < float(self.warmup_steps), warm, cosine)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "end_lr": self.end_lr,
        }


def decays(variable) -> bool:
    """Whether the default rule applies weight decay to ``variable``.

    Kernels (2-d and up) decay; 0-d and 1-d variables (batch-norm gamma/beta,
    biases, GeM's ``p``) do not, as in the usual ResNet recipe.
    """
    return len(variable.shape) >= 2


def weight_decay_mask(variables: Sequence, include_norm_and_bias: bool = False) -> list[bool]:
    """One flag per variable: whether it receives weight decay."""
    return [include_norm_and_bias or decays(v) for v in variables]


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> WarmupCosine:
    """The config's warm-up + cosine schedule over ``epochs * steps_per_epoch`` steps."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup > total:
        logging.getLogger(__name__).warning(
            "warm-up of %s epochs is longer than the %d-epoch schedule: the whole run warms up",
            config.warmup_epochs,
            config.epochs,
        )
        warmup = total
    return WarmupCosine(config.lr, total_steps=total, warmup_steps=warmup, end_lr=config.end_lr)


class _PreReduced:
    """Mixin for optimizers that receive gradients already summed over replicas.

    Keras' TensorFlow optimizer all-reduces the gradients it is given when called
    in a replica context; the training step has already done that (so it can clip
    and decay the whole batch's gradient), and a second sum would multiply the
    update by the replica count.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


class PreReducedSGD(_PreReduced, keras.optimizers.SGD):
    """:class:`keras.optimizers.SGD` taking gradients already summed over replicas."""


class PreReducedAdamW(_PreReduced, keras.optimizers.AdamW):
    """:class:`keras.optimizers.AdamW` taking gradients already summed over replicas."""


def build_optimizer(config: TrainConfig, schedule: WarmupCosine) -> keras.optimizers.Optimizer:
    """SGD (momentum, Nesterov) or AdamW with the schedule.

    Gradient clipping and SGD's (coupled, L2) weight decay are applied by the
    training step to the all-reduced gradient, not by the optimizer: Keras clips
    before its own cross-replica sum, which would clip each replica's partial
    gradient. The returned optimizers expect gradients already summed over
    replicas (see :class:`PreReducedSGD`). AdamW's decoupled decay is the optimizer's, restricted to the
    variables :func:`weight_decay_mask` selects (see :func:`exclude_from_decay`).
    """
    if config.optimizer == "sgd":
        return PreReducedSGD(learning_rate=schedule, momentum=config.momentum, nesterov=config.nesterov)
    if config.optimizer == "adamw":
        return PreReducedAdamW(
            learning_rate=schedule,
            weight_decay=config.weight_decay,
            beta_1=config.adam_beta_1,
            beta_2=config.adam_beta_2,
            epsilon=config.adam_epsilon,
        )
    raise ConfigError(f"unknown optimizer {config.optimizer!r}")


def exclude_from_decay(optimizer: keras.optimizers.Optimizer, variables: Sequence, mask: Sequence[bool]) -> None:
    """Tells a decoupled-decay optimizer (AdamW) to skip the variables whose mask is False."""
    if getattr(optimizer, "weight_decay", None):
        optimizer.exclude_from_weight_decay(var_list=[v for v, m in zip(variables, mask) if not m])
