"""DOLG training: configs, the task (model, head, optimizer, replica step), the loop, post-run steps.

Layout, as in TensorFlow Model Garden:

- :mod:`dolg_tf.training.config`: :class:`TrainConfig`, presets, and :func:`run_config`,
  which resolves a run's configuration once into a frozen :class:`RunConfig`;
- :mod:`dolg_tf.training.task`: :class:`RetrievalTask` builds the model, margin head
  and optimizer and defines the replica step;
- :mod:`dolg_tf.training.loop`: :class:`TrainLoop` runs the steps, checkpoints,
  summaries, signals and progress;
- :mod:`dolg_tf.training.steps`: demo evaluation, ``.keras`` save and export after the
  loop; :func:`train` runs loop and steps as ``dolg train`` does.

``python training/train.py`` and ``dolg train`` are the command-line entry points.
TensorFlow-dependent names are imported on first use, so ``dolg --help`` stays fast.
"""

from dolg_tf._lazy import lazy_exports
from dolg_tf.training.config import TRAIN_PRESETS, RunConfig, TrainConfig, run_config, train_config

_LAZY = {
    "WarmupCosine": "dolg_tf.training.optim",
    "build_optimizer": "dolg_tf.training.optim",
    "build_schedule": "dolg_tf.training.optim",
    "make_strategy": "dolg_tf.training.strategy",
    "RetrievalTask": "dolg_tf.training.task",
    "TrainState": "dolg_tf.training.task",
    "TrainLoop": "dolg_tf.training.loop",
    "TrainResult": "dolg_tf.training.loop",
    "demo_retrieval": "dolg_tf.training.steps",
    "train": "dolg_tf.training.steps",
}

__all__ = ["TRAIN_PRESETS", "RunConfig", "TrainConfig", "run_config", "train_config", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
