"""The distributed training loop: one custom step for every ``tf.distribute`` strategy.

Keras 3 ``Model.fit`` fails under ``MultiWorkerMirroredStrategy``
(keras-team/keras#20585), so training uses its own step, the same for every
strategy:

1. each replica computes the margin-head cross-entropy of its share of the
   batch, averaged over the GLOBAL batch (``tf.nn.compute_average_loss``),
   multiplied by the loss scale under float16;
2. the gradients are summed over replicas (one all-reduce), unscaled, checked
   for inf/NaN, given L2 weight decay (SGD) and clipped to a global norm, so
   clipping and decay see the whole batch's gradient;
3. the optimizer applies them (it is told not to all-reduce a second time,
   :class:`dolg_tf.training.optim.PreReducedSGD`); a float16 step with inf/NaN gradients is skipped
   and the loss scale halved.

Batch-norm layers are switched to synchronized statistics, so the result does
not depend on how many replicas share the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dolg_tf.errors import ConfigError, DataError
from dolg_tf.fileio import atomic_write_json
from dolg_tf.training.config import TrainConfig
from dolg_tf.training.optim import build_optimizer, build_schedule, exclude_from_decay, weight_decay_mask
from dolg_tf.training.strategy import is_chief, make_strategy, worker_id

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
LOG_SUBDIR = "logs"
CONFIG_FILE = "config.json"
LABEL_MAP_FILE = "label_map.json"
MODEL_FILE = "dolg.keras"


@dataclasses.dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        model_dir: where checkpoints, logs and config went.
        step: the global step reached.
        total_steps: the schedule's length.
        loss, accuracy: mean over the last epoch's steps run in this process.
        images_per_s: training throughput (after the first, compiling step).
        replicas: replicas in sync.
        learning_rate: the schedule's learning rate at the end.
        before, after: held-out demo retrieval metrics (demo data only).
        checkpoint: path of the last checkpoint written.
        export_dir: the SavedModel version directory, if exported.
        interrupted: the signal name if SIGTERM/SIGINT stopped the run.
        skipped_images: corrupt images the data pipeline skipped.
        weights_sha256: digest of every model and head weight (identical on all workers).
        seconds: wall time of the loop.
    """

    model_dir: str
    step: int
    total_steps: int
    loss: float
    accuracy: float
    images_per_s: float
    replicas: int
    learning_rate: float
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    checkpoint: str | None = None
    export_dir: str | None = None
    interrupted: str | None = None
    skipped_images: int = 0
    weights_sha256: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_model_dir(root: str = os.path.join("runs", "dolg")) -> str:
    """``runs/dolg/<YYYYmmdd-HHMMSS>``."""
    return os.path.join(root, time.strftime("%Y%m%d-%H%M%S"))


def latest_run_dir(root: str = os.path.join("runs", "dolg")) -> str | None:
    """The most recent run directory under ``root`` holding a checkpoint, or None."""
    if not os.path.isdir(root):
        return None
    runs = sorted(
        (os.path.join(root, d) for d in os.listdir(root)),
        key=os.path.getmtime,
        reverse=True,
    )
    for run in runs:
        if tf.train.latest_checkpoint(os.path.join(run, CHECKPOINT_SUBDIR)):
            return run
    return None


def enable_sync_batch_norm(model: keras.Model) -> int:
    """Makes every BatchNormalization layer of ``model`` all-reduce its batch statistics.

    keras-hub builds the backbone's BN layers without ``synchronized``; the flag
    is read at call time, so setting it on the built layers is enough.

    Returns:
        The number of layers switched.
    """
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            count += 1
    return count


def build_head(config: TrainConfig, num_classes: int, class_counts: np.ndarray | None) -> keras.layers.Layer:
    """The margin head named by ``config.head`` (float32 whatever the policy)."""
    from dolg_tf.layers import ArcFace, CurricularFace, SubCenterArcFace, dynamic_margins

    if config.head == "arcface":
        return ArcFace(num_classes, scale=config.head_scale, margin=config.head_margin, dtype="float32")
    if config.head == "curricularface":
        return CurricularFace(num_classes, scale=config.head_scale, margin=config.head_margin, dtype="float32")
    if config.head == "subcenter":
        if config.dynamic_margins and class_counts is not None and len(class_counts) == num_classes:
            margins = [float(m) for m in dynamic_margins(np.maximum(np.asarray(class_counts), 1))]
        else:
            margins = config.head_margin
        return SubCenterArcFace(num_classes, k=config.subcenter_k, margins=margins, scale=config.head_scale,
                                dtype="float32")
    raise ConfigError(f"unknown head {config.head!r}")


def write_scalars(writer: tf.summary.SummaryWriter, step: int, scalars: dict[str, float]) -> None:
    """Writes TensorBoard scalar summaries.

    ``tf.summary.scalar`` needs the ``tensorboard`` package at write time; the core
    ``tf.summary.write`` with the scalars plugin's metadata writes the same event
    records without it, so training does not depend on TensorBoard being installed.
    """
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=metadata)


def weights_digest(variables) -> str:
    """SHA-256 of the variables' float32 bytes, in order."""
    digest = hashlib.sha256()
    for v in variables:
        digest.update(np.ascontiguousarray(np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float32)).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _announce(what: str, chief: bool):
    """Logs ``what...`` before a slow step at the end of training and its duration after it."""
    if chief:
        log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    if chief:
        log.info("%s: done in %.1f s", what, time.perf_counter() - t0)


def demo_retrieval(model: keras.Model, image_size: int) -> dict[str, float]:
    """Held-out retrieval on the built-in demo photos: mAP and recall@1/5.

    The views (:func:`dolg_tf.data.demo_retrieval_split`, the same as ``dolg demo``'s)
    are made with numpy transforms unlike the tf.data training augmentation, so
    every query and gallery view is an image the model never trained on.
    """
    from dolg_tf.data import demo_retrieval_split, retrieval_metrics

    embed = tf.function(
        lambda x: tf.cast(model(x, training=False), tf.float32),
        input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)],
    )
    metrics = retrieval_metrics(lambda x: embed(tf.constant(x)).numpy(), demo_retrieval_split(image_size))
    return {k: round(float(v), 4) for k, v in metrics.items()}


class _StopFlag:
    """SIGTERM / SIGINT handlers that ask the loop to stop after the current step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping after the current step and saving a checkpoint", self.signal_name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    """Trains DOLG + a margin head under a ``tf.distribute`` strategy.

    Args:
        config: the training config.
        model_overrides: :class:`dolg_tf.config.ModelConfig` fields over the preset's.
        data_overrides: extra keyword arguments of :func:`dolg_tf.data.open_source`.
        strategy: an existing strategy (default: made from ``config.strategy``).

    Example:

    ```python
    from dolg_tf.training import Trainer, train_config
    result = Trainer(train_config("tiny", epochs=1, steps_per_epoch=5, export=False)).fit()
    ```
    """

    def __init__(
        self,
        config: TrainConfig,
        model_overrides: dict[str, Any] | None = None,
        data_overrides: dict[str, Any] | None = None,
        strategy: tf.distribute.Strategy | None = None,
    ):
        from dolg_tf import data as data_lib
        from dolg_tf.config import model_config

        self.config = config
        # The model records the crop size it is trained at; exports default to it.
        self.model_config = model_config(
            config.preset, **{"train_image_size": config.image_size, **(model_overrides or {})}
        )
        # The strategy first: splitting the CPU must precede any TensorFlow op.
        self.strategy = strategy or make_strategy(config.strategy, cpu_replicas=config.cpu_replicas, tpu=config.tpu)
        self.chief = is_chief(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % self.replicas:
            raise ConfigError(
                f"batch_size {config.batch_size} is not divisible by the {self.replicas} replicas in sync"
            )
        if config.jit and config.sync_batch_norm and self.replicas > 1:
            raise ConfigError(
                f"--jit cannot compile synchronized batch norm across {self.replicas} replicas (its all-reduce "
                "runs outside XLA); drop --jit or pass --set sync_batch_norm=false"
            )
        self._data = data_lib
        # The data config records the crop size, seed and sampling the run really uses.
        self.source = data_lib.open_source(
            None if config.is_demo else config.data, config.data_format,
            image_size=config.image_size, seed=config.seed, class_balanced=config.class_balanced,
            **(data_overrides or {}),
        )
        if self.source.num_classes < 2:
            raise DataError(f"training needs at least 2 classes, the data has {self.source.num_classes}")
        self.steps_per_epoch = config.steps_per_epoch or max(1, self.source.num_examples // config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.model_dir = self._resolve_model_dir()
        self._build()

    # ------------------------------------------------------------------ set-up

    def _resolve_model_dir(self) -> str:
        config = self.config
        if config.model_dir:
            model_dir = config.model_dir
        elif config.strategy == "multiworker":
            raise ConfigError("multiworker training needs an explicit --model-dir shared by every worker")
        elif config.resume:
            model_dir = latest_run_dir() or default_model_dir()
        else:
            model_dir = default_model_dir()
        has_ckpt = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR)) is not None
        if has_ckpt and not config.resume:
            raise ConfigError(
                f"{model_dir!r} already holds checkpoints: pass --resume to continue that run, "
                "or choose another --model-dir"
            )
        return model_dir

    def _build(self) -> None:
        config = self.config
        from dolg_tf.model import build_dolg

        policy = {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[
            config.mixed_precision
        ]
        previous_policy = keras.config.dtype_policy()
        keras.utils.set_random_seed(config.seed)
        keras.config.set_dtype_policy(policy)
        try:
            with self.strategy.scope():
                self.model = build_dolg(
                    config.preset, backbone_weights=config.backbone_weights, **self._model_overrides()
                )
                # One replica's statistics are the global batch's already; XLA (--jit) cannot
                # compile the cross-replica all-reduce, so sync only when there is more than one.
                sync = config.sync_batch_norm and self.replicas > 1
                self.sync_bn_layers = enable_sync_batch_norm(self.model) if sync else 0
                self.head = build_head(config, self.source.num_classes, self.source.class_counts)
                self.head.build([(None, self.model_config.embedding_dim), (None,)])
                self.variables = list(self.model.trainable_variables) + list(self.head.trainable_variables)
                self.decay_mask = weight_decay_mask(self.variables, config.weight_decay_norm_and_bias)
                self.schedule = build_schedule(config, self.steps_per_epoch)
                self.optimizer = build_optimizer(config, self.schedule)
                exclude_from_decay(self.optimizer, self.variables, self.decay_mask)
                self.optimizer.build(self.variables)
                first_only = tf.VariableAggregation.ONLY_FIRST_REPLICA
                self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step", aggregation=first_only)
                self.loss_scale = tf.Variable(
                    config.initial_loss_scale if config.mixed_precision == "float16" else 1.0,
                    dtype=tf.float32, trainable=False, name="loss_scale", aggregation=first_only,
                )
                self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps",
                                              aggregation=first_only)
        finally:
            keras.config.set_dtype_policy(previous_policy)
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, head=self.head, optimizer=self.optimizer, step=self.step,
            loss_scale=self.loss_scale, good_steps=self.good_steps,
        )
        self._checkpoint_dir = os.path.join(self.model_dir, CHECKPOINT_SUBDIR)
        if not self.chief:
            # Every worker must take part in saving (variables may need collectives), but
            # only the chief's files are kept; the others write to a scratch directory.
            self._checkpoint_dir = os.path.join(self.model_dir, f".worker-{worker_id(self.strategy)}-tmp")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self._checkpoint_dir, max_to_keep=self.config.keep_checkpoints
        )
        log.info(
            "DOLG %s + %s head (%d classes), %d trainable variables (%d with weight decay), %d sync BN layers, "
            "%d replica(s), policy %s",
            config.preset, config.head, self.source.num_classes, len(self.variables), sum(self.decay_mask),
            self.sync_bn_layers, self.replicas, policy,
        )

    def _model_overrides(self) -> dict[str, Any]:
        from dolg_tf.config import model_config

        base = model_config(self.config.preset).to_dict()
        return {k: v for k, v in self.model_config.to_dict().items() if base.get(k) != v}

    def resolved_config(self) -> dict[str, Any]:
        """``{"model", "data", "train", "run"}``: everything needed to reproduce the run."""
        return {
            "model": self.model_config.to_dict(),
            "data": self.source.config.to_dict(),
            "train": self.config.to_dict(),
            "run": {
                "num_classes": int(self.source.num_classes),
                "num_examples": int(self.source.num_examples),
                "data_description": str(getattr(self.source, "description", "")),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "replicas": self.replicas,
                "strategy": type(self.strategy).__name__,
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
            },
        }

    # ------------------------------------------------------------------ the step

    def make_dataset(self, start_step: int = 0) -> tf.distribute.DistributedDataset:
        """The distributed input, positioned at ``start_step``.

        The data module's stream is a pure function of (seed, position); a resumed run
        starts it after the per-replica batches already consumed (``exact_resume``,
        without decoding them) or starts a stream with another seed.
        """
        config = self.config
        seed = config.seed if (start_step == 0 or config.exact_resume) else config.seed + start_step

        def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            # Exact resume: start the stream where this pipeline stopped. The data
            # module skips indices / records before decoding, so this is cheap.
            per_pipeline = max(1, ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            start_batch = start_step * per_pipeline if (start_step and config.exact_resume) else 0
            return self._data.train_dataset(
                self.source,
                batch_size=ctx.get_per_replica_batch_size(config.batch_size),
                image_size=config.image_size,
                seed=seed,
                augment=config.augment,
                class_balanced=config.class_balanced,
                input_context=ctx,
                repeat=True,
                start_batch=start_batch,
            )

        if start_step and config.exact_resume:
            log.info("resuming the input stream after the %d batches already trained on", start_step)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def make_train_step(self) -> Callable:
        config = self.config
        strategy = self.strategy
        model, head, optimizer, variables = self.model, self.head, self.optimizer, self.variables
        global_batch = config.batch_size
        float16 = config.mixed_precision == "float16"
        sgd_decay = config.optimizer == "sgd" and config.weight_decay > 0
        mask = self.decay_mask

        def forward_backward(images, labels, scale):
            with tf.GradientTape() as tape:
                embeddings = model(images, training=True)
                logits = head([embeddings, labels], training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                scaled = loss * scale if float16 else loss
            grads = tape.gradient(scaled, variables)
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
            return loss, correct, grads

        if config.jit:
            forward_backward = tf.function(forward_backward, jit_compile=True)

        def apply_skipping_non_finite(distribution, grads, finite):
            # float16: skip the update when any gradient overflowed. The cond must run in
            # cross-replica context (the optimizer's update calls merge_call); every replica
            # holds the same all-reduced gradients, so the first one's verdict is everyone's.
            ok = distribution.experimental_local_results(finite)[0]

            def good():
                distribution.extended.call_for_each_replica(optimizer.apply, args=(grads, variables))
                grow = self.good_steps + 1 >= config.loss_scale_growth_steps
                self.loss_scale.assign(tf.where(grow, self.loss_scale * 2.0, self.loss_scale))
                self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), self.good_steps + 1))
                return tf.constant(True)

            def bad():
                self.loss_scale.assign(tf.maximum(self.loss_scale * 0.5, 1.0))
                self.good_steps.assign(0)
                return tf.constant(False)

            tf.cond(ok, good, bad)

        def replica_step(images, labels):
            labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
            images = tf.cast(images, tf.float32)
            scale = tf.identity(self.loss_scale)
            loss, correct, grads = forward_backward(images, labels, scale)
            ctx = tf.distribute.get_replica_context()
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [tf.cast(g, tf.float32) for g in grads])
            if float16:
                grads = [g / scale for g in grads]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            if sgd_decay:
                # L2 decay on the summed gradient, as PyTorch's SGD(weight_decay=...) in the official code.
                grads = [g + config.weight_decay * tf.cast(v, g.dtype) if m else g
                         for g, v, m in zip(grads, variables, mask)]
            if config.clip_norm > 0:
                grads, norm = tf.clip_by_global_norm(grads, config.clip_norm)
            else:
                norm = tf.linalg.global_norm(grads)
            if float16:
                ctx.merge_call(apply_skipping_non_finite, args=(grads, finite))
            else:
                optimizer.apply(grads, variables)
            return loss, correct, norm

        @tf.function
        def train_step(iterator):
            images, labels = next(iterator)
            loss, correct, norm = strategy.run(replica_step, args=(images, labels))
            self.step.assign_add(1)
            return (
                strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
                strategy.experimental_local_results(norm)[0],
            )

        return train_step

    # ------------------------------------------------------------------ the loop

    def restore(self) -> int:
        """Restores the latest checkpoint of ``model_dir`` (when resuming); returns the step."""
        if not self.config.resume:
            return 0
        path = tf.train.latest_checkpoint(os.path.join(self.model_dir, CHECKPOINT_SUBDIR))
        if path is None:
            log.info("--resume: no checkpoint in %s, starting from step 0", self.model_dir)
            return 0
        self.checkpoint.restore(path).assert_existing_objects_matched()
        step = int(self.step.numpy())
        log.info("resumed from %s at step %d (learning rate %.6g)", path, step, self.current_lr())
        return step

    def current_lr(self) -> float:
        return float(self.schedule(self.optimizer.iterations))

    def save(self) -> str:
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if not self.chief:
            shutil.rmtree(self._checkpoint_dir, ignore_errors=True)
        return path

    def _write_run_files(self) -> None:
        if not self.chief:
            return
        os.makedirs(self.model_dir, exist_ok=True)
        atomic_write_json(os.path.join(self.model_dir, CONFIG_FILE), self.resolved_config(), indent=2, sort_keys=True)
        self.source.save_label_map(os.path.join(self.model_dir, LABEL_MAP_FILE))

    def _skipped_images(self) -> int:
        return int(self._data.skipped_images(self.source))

    def fit(self) -> TrainResult:
        """Runs (or resumes) training, then evaluates and exports.

        Returns:
            A :class:`TrainResult`. If SIGTERM/SIGINT arrived, a checkpoint of the
            current step was saved and ``interrupted`` names the signal.
        """
        config = self.config
        start_step = self.restore()
        self._write_run_files()
        evaluate = config.is_demo and config.eval_demo and self.chief
        before = None
        if evaluate and start_step == 0:
            before = demo_retrieval(self.model, config.image_size)
            log.info("held-out demo retrieval before training: mAP %.3f, recall@1 %.3f",
                     before["mAP"], before["recall@1"])
        stop_at = min(self.total_steps, config.max_steps) if config.max_steps else self.total_steps
        writer = tf.summary.create_file_writer(os.path.join(self.model_dir, LOG_SUBDIR, "train")) if self.chief else None
        train_step = self.make_train_step()
        iterator = iter(self.make_dataset(start_step))
        step = start_step
        losses, correct_total, seen = [], 0.0, 0
        timed_images, timed_seconds = 0, 0.0
        last_path = None
        t_loop = time.perf_counter()
        progbar = None
        with _StopFlag() as stop:
            while step < stop_at and stop.signal_name is None:
                epoch, in_epoch = divmod(step, self.steps_per_epoch)
                if progbar is None or in_epoch == 0:
                    if config.progress and self.chief:
                        print(f"Epoch {epoch + 1}/{config.epochs}", flush=True)
                        # A terminal gets a live bar; a log file one summary line per epoch.
                        # Every value is given as this process's epoch average so far (stateful), the
                        # numbers the summary reports: Progbar's own averaging shows only the last step's
                        # value on an epoch's final line.
                        progbar = keras.utils.Progbar(self.steps_per_epoch,
                                                      stateful_metrics=["loss", "acc", "images/s", "lr"],
                                                      verbose=1 if sys.stdout.isatty() else 2)
                    else:
                        progbar = False
                    losses, correct_total, seen = [], 0.0, 0
                t0 = time.perf_counter()
                loss, correct, norm = train_step(iterator)
                loss = float(loss)
                dt = time.perf_counter() - t0
                step += 1
                if not math.isfinite(loss) and config.mixed_precision != "float16":
                    raise DataError(f"the loss became {loss} at step {step}; lower --lr or set clip_norm")
                if step > start_step + 1:  # the first step traces and compiles
                    timed_images += config.batch_size
                    timed_seconds += dt
                losses.append(loss)
                correct_total += float(correct)
                seen += config.batch_size
                ips = timed_images / timed_seconds if timed_seconds else config.batch_size / dt
                lr = self.current_lr()
                if progbar:
                    progbar.update(in_epoch + 1, [("loss", float(np.mean(losses))), ("acc", correct_total / seen),
                                                  ("images/s", ips), ("lr", lr)])
                if writer is not None and (step % config.log_every == 0 or step == stop_at):
                    scalars = {
                        "loss": loss,
                        "accuracy": float(correct) / config.batch_size,
                        "learning_rate": lr,
                        "images_per_second": ips,
                        "gradient_norm": float(norm),
                        "skipped_images": self._skipped_images(),
                    }
                    if config.mixed_precision == "float16":
                        scalars["loss_scale"] = float(self.loss_scale.numpy())
                    write_scalars(writer, step, scalars)
                end_of_epoch = step % self.steps_per_epoch == 0
                periodic = config.checkpoint_every and step % config.checkpoint_every == 0
                if end_of_epoch or periodic:
                    last_path = self.save()
        interrupted = stop.signal_name
        seconds = time.perf_counter() - t_loop
        if step > start_step or last_path is None:
            if last_path is None or not last_path.endswith(f"-{step}"):
                with _announce(f"saving the checkpoint of step {step}", self.chief):
                    last_path = self.save()
        if writer is not None:
            writer.flush()
        skipped = self._skipped_images()
        if skipped:
            log.warning("%s", self.source.skipped.summary())
        result = TrainResult(
            model_dir=os.path.abspath(self.model_dir),
            step=step,
            total_steps=self.total_steps,
            loss=float(np.mean(losses)) if losses else float("nan"),
            accuracy=correct_total / seen if seen else float("nan"),
            images_per_s=timed_images / timed_seconds if timed_seconds else 0.0,
            replicas=self.replicas,
            learning_rate=self.current_lr(),
            before=before,
            checkpoint=os.path.abspath(last_path) if self.chief and last_path else None,
            interrupted=interrupted,
            skipped_images=skipped,
            weights_sha256=weights_digest(self.model.weights + self.head.weights),
            seconds=round(seconds, 2),
        )
        if interrupted:
            log.warning("interrupted by %s at step %d; checkpoint %s", interrupted, step, last_path)
            return result
        if evaluate:
            with _announce("held-out demo retrieval after training", self.chief):
                result.after = demo_retrieval(self.model, config.image_size)
            log.info("held-out demo retrieval after training: mAP %.3f, recall@1 %.3f",
                     result.after["mAP"], result.after["recall@1"])
        if self.chief:
            model_file = os.path.abspath(os.path.join(self.model_dir, MODEL_FILE))
            with _announce(f"saving the trained model to {model_file}", True):
                export_model = self.float32_model()
                export_model.save(model_file)
            if config.export and step >= self.total_steps:
                where = os.path.abspath(self.config.export_dir)
                with _announce(f"exporting a SavedModel under {where} (tracing and saving take a while)", True):
                    result.export_dir = self._export(export_model)
            elif config.export:
                log.info("not exporting: the run stopped at step %d of %d", step, self.total_steps)
        return result

    def float32_model(self) -> keras.Model:
        """A float32 copy of the trained model outside any strategy (for saving and export)."""
        from dolg_tf.model import build_dolg

        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")
        try:
            clone = build_dolg(self.config.preset, **self._model_overrides())
        finally:
            keras.config.set_dtype_policy(previous)
        clone.set_weights([np.asarray(w) for w in self.model.get_weights()])
        return clone

    def _export(self, model: keras.Model) -> str:
        from dolg_tf.export import export_saved_model

        path = export_saved_model(
            model,
            self.config.export_dir,
            image_size=self.config.image_size,
            extra_metadata={"training": {"model_dir": os.path.abspath(self.model_dir), "step": int(self.step.numpy())}},
        )
        path = os.path.abspath(path)
        log.info("exported the trained model to %s", path)
        return path
