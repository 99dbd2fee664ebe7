"""DOLG training: configs, optimizers, strategies and the distributed training loop.

``python training/train.py`` and ``dolg train`` are the command-line entry points.
TensorFlow-dependent names are imported on first use, so ``dolg --help`` stays fast.
"""

import importlib

from dolg_tf.training.config import TRAIN_PRESETS, TrainConfig, train_config

_LAZY = {
    "WarmupCosine": "dolg_tf.training.optim",
    "build_optimizer": "dolg_tf.training.optim",
    "build_schedule": "dolg_tf.training.optim",
    "make_strategy": "dolg_tf.training.strategy",
    "Trainer": "dolg_tf.training.trainer",
    "TrainResult": "dolg_tf.training.trainer",
    "demo_retrieval": "dolg_tf.training.trainer",
}

__all__ = ["TRAIN_PRESETS", "TrainConfig", "train_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
