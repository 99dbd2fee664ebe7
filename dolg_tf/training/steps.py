"""What ``dolg train`` does around the loop: demo evaluation, the ``.keras`` save and the export.

:func:`train` is the whole run as the command line runs it; each post-run step is
also a function of its own.
"""

from __future__ import annotations

import logging
import os

import keras
import numpy as np
import tensorflow as tf

from dolg_tf.config import ModelConfig
from dolg_tf.demo.photos import demo_retrieval_split, retrieval_metrics
from dolg_tf.export import export_saved_model
from dolg_tf.model import DOLG
from dolg_tf.training.loop import MODEL_FILE, TrainLoop, TrainResult, announce

log = logging.getLogger(__name__)


def demo_retrieval(model: keras.Model, image_size: int) -> dict[str, float]:
    """Held-out retrieval on the built-in demo photos: mAP and recall@1/5.

    The views (:func:`dolg_tf.demo.demo_retrieval_split`, the same as ``dolg demo``'s)
    are made with numpy transforms unlike the tf.data training augmentation, so
    every query and gallery view is an image the model never trained on.
    """
    embed = tf.function(
        lambda x: tf.cast(model(x, training=False), tf.float32),
        input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)],
    )
    metrics = retrieval_metrics(lambda x: embed(tf.constant(x)).numpy(), demo_retrieval_split(image_size))
    return {k: round(float(v), 4) for k, v in metrics.items()}


def inference_model(model: keras.Model, config: ModelConfig) -> DOLG:
    """A float32 DOLG of ``config`` holding ``model``'s weights, outside any strategy.

    The trained model's variables belong to the training strategy (mirrored copies, or
    collectives of several workers) and, under a mixed policy, its layers compute in
    16 bits. The saved and exported model is float32 throughout, with plain variables,
    so it is built again from the same config with ``dtype="float32"`` (Keras' global
    policy is not touched) and given the trained weights, which are float32 already.
    """
    clone = DOLG(**config.to_dict(), dtype="float32")
    clone.set_weights([np.asarray(w) for w in model.get_weights()])
    return clone


def save_keras(model: keras.Model, path: str) -> str:
    """Saves ``model`` as a ``.keras`` file; returns the absolute path."""
    path = os.path.abspath(path)
    with announce(f"saving the trained model to {path}"):
        model.save(path)
    return path


def export(model: keras.Model, base_dir: str, image_size: int, model_dir: str, step: int) -> str:
    """Exports ``model`` as the next SavedModel version under ``base_dir``; returns its absolute path.

    The export records the run it came from (``training.model_dir``, ``training.step``).
    """
    where = os.path.abspath(base_dir)
    with announce(f"exporting a SavedModel under {where} (tracing and saving take a while)"):
        path = export_saved_model(
            model,
            base_dir,
            image_size=image_size,
            extra_metadata={"training": {"model_dir": os.path.abspath(model_dir), "step": int(step)}},
        )
    path = os.path.abspath(path)
    log.info("exported the trained model to %s", path)
    return path


def train(loop: TrainLoop) -> TrainResult:
    """Runs ``loop`` with the post-run steps, as ``dolg train`` does.

    On demo data (``eval_demo``), held-out retrieval is measured before a fresh run and
    after training. The chief then saves ``<model_dir>/dolg.keras`` and, when the
    schedule is complete and ``export`` is set, exports a SavedModel under
    ``export_dir``. An interrupted run stops after its checkpoint.

    Returns:
        The loop's :class:`TrainResult` with ``before``, ``after`` and ``export_dir`` filled.
    """
    train_cfg = loop.config.train
    evaluate = train_cfg.is_demo and train_cfg.eval_demo and loop.chief
    before = None
    if evaluate and loop.restore() == 0:
        before = demo_retrieval(loop.state.model, train_cfg.image_size)
        log.info("held-out demo retrieval before training: mAP %.3f, recall@1 %.3f", before["mAP"], before["recall@1"])
    result = loop.run()
    result.before = before
    if result.interrupted:
        return result
    if evaluate:
        with announce("held-out demo retrieval after training"):
            result.after = demo_retrieval(loop.state.model, train_cfg.image_size)
        log.info(
            "held-out demo retrieval after training: mAP %.3f, recall@1 %.3f",
            result.after["mAP"],
            result.after["recall@1"],
        )
    if not loop.chief:
        return result
    model = inference_model(loop.state.model, loop.config.model)
    save_keras(model, os.path.join(loop.model_dir, MODEL_FILE))
    if train_cfg.export and result.step >= result.total_steps:
        result.export_dir = export(model, train_cfg.export_dir, train_cfg.image_size, loop.model_dir, result.step)
    elif train_cfg.export:
        log.info("not exporting: the run stopped at step %d of %d", result.step, result.total_steps)
    return result
