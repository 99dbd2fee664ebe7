"""The training loop: steps, checkpoints, summaries, signals and progress.

:class:`TrainLoop` opens the data, asks the task (:class:`dolg_tf.training.task.RetrievalTask`)
for the model, head, optimizer and replica step under a ``tf.distribute`` strategy,
and runs the steps. What happens after the loop (demo evaluation, ``.keras`` save,
export) is in :mod:`dolg_tf.training.steps`.
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
from tensorflow.core.framework import summary_pb2

from dolg_tf import data as data_lib
from dolg_tf.errors import ConfigError, DataError
from dolg_tf.fileio import atomic_write_json
from dolg_tf.training.config import RunConfig
from dolg_tf.training.strategy import is_chief, make_strategy, worker_id
from dolg_tf.training.task import RetrievalTask

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


def write_scalars(writer: tf.summary.SummaryWriter, step: int, scalars: dict[str, float]) -> None:
    """Writes TensorBoard scalar summaries.

    ``tf.summary.scalar`` needs the ``tensorboard`` package at write time; the core
    ``tf.summary.write`` with the scalars plugin's metadata writes the same event
    records without it, so training does not depend on TensorBoard being installed.
    """
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
def announce(what: str, chief: bool = True):
    """Logs ``what...`` before a slow step at the end of training and its duration after it."""
    if chief:
        log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    if chief:
        log.info("%s: done in %.1f s", what, time.perf_counter() - t0)


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


class TrainLoop:
    """Runs a :class:`RetrievalTask` under a ``tf.distribute`` strategy.

    Args:
        config: the run's resolved configuration (:func:`dolg_tf.training.run_config`).
        strategy: an existing strategy (default: made from ``config.train.strategy``).
        task: the task (default: :class:`RetrievalTask` of ``config``).

    Attributes:
        state: the :class:`dolg_tf.training.task.TrainState` (model, head, optimizer, step).
        source: the opened training data.

    Example:

    ```python
    from dolg_tf.training import TrainLoop, run_config
    result = TrainLoop(run_config("tiny", epochs=1, steps_per_epoch=5)).run()
    ```
    """

    def __init__(
        self, config: RunConfig, strategy: tf.distribute.Strategy | None = None, task: RetrievalTask | None = None
    ):
        train = config.train
        self.config = config
        self.task = task or RetrievalTask(config)
        # The strategy first: splitting the CPU must precede any TensorFlow op.
        self.strategy = strategy or make_strategy(train.strategy, cpu_replicas=train.cpu_replicas, tpu=train.tpu)
        self.chief = is_chief(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        if train.batch_size % self.replicas:
            raise ConfigError(f"batch_size {train.batch_size} is not divisible by the {self.replicas} replicas in sync")
        if train.jit and train.sync_batch_norm and self.replicas > 1:
            raise ConfigError(
                f"jit=True cannot compile synchronized batch norm across {self.replicas} replicas (its all-reduce "
                "runs outside XLA); set jit=False or sync_batch_norm=False"
            )
        self.source = data_lib.open_source(None if train.is_demo else train.data, train.data_format, config=config.data)
        if self.source.num_classes < 2:
            raise DataError(f"training needs at least 2 classes, the data has {self.source.num_classes}")
        self.steps_per_epoch = train.steps_per_epoch or max(1, self.source.num_examples // train.batch_size)
        self.total_steps = train.epochs * self.steps_per_epoch
        self.model_dir = self._resolve_model_dir()
        self.state = self.task.create_state(
            self.strategy, self.source.num_classes, self.source.class_counts, self.steps_per_epoch
        )
        self.checkpoint = self.state.checkpoint()
        self._checkpoint_dir = os.path.join(self.model_dir, CHECKPOINT_SUBDIR)
        if not self.chief:
            # Every worker must take part in saving (variables may need collectives), but
            # only the chief's files are kept; the others write to a scratch directory.
            self._checkpoint_dir = os.path.join(self.model_dir, f".worker-{worker_id(self.strategy)}-tmp")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self._checkpoint_dir, max_to_keep=train.keep_checkpoints
        )
        self._start_step: int | None = None
        log.info(
            "DOLG %s + %s head (%d classes), %d trainable variables (%d with weight decay), %d sync BN layers, "
            "%d replica(s), policy %s",
            train.preset,
            train.head,
            self.source.num_classes,
            len(self.state.variables),
            sum(self.state.decay_mask),
            self.state.sync_bn_layers,
            self.replicas,
            self.state.model.dtype_policy.name,
        )

    # ------------------------------------------------------------------ set-up

    def _resolve_model_dir(self) -> str:
        train = self.config.train
        if train.model_dir:
            model_dir = train.model_dir
        elif train.strategy == "multiworker":
            raise ConfigError("multiworker training needs an explicit model_dir shared by every worker")
        elif train.resume:
            model_dir = latest_run_dir() or default_model_dir()
        else:
            model_dir = default_model_dir()
        has_ckpt = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR)) is not None
        if has_ckpt and not train.resume:
            raise ConfigError(
                f"{model_dir!r} already holds checkpoints: pass resume=True to continue that run, "
                "or choose another model_dir"
            )
        return model_dir

    def resolved_config(self) -> dict[str, Any]:
        """``{"model", "data", "train", "run"}``: everything needed to reproduce the run."""
        return {
            "model": self.config.model.to_dict(),
            "data": self.source.config.to_dict(),
            "train": self.config.train.to_dict(),
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

    # ------------------------------------------------------------------ input and step

    def make_dataset(self, start_step: int = 0) -> tf.distribute.DistributedDataset:
        """The distributed input, positioned at ``start_step``.

        The data module's stream is a pure function of (seed, position); a resumed run
        starts it after the per-replica batches already consumed (``exact_resume``,
        without decoding them) or starts a stream with another seed.
        """
        train = self.config.train
        seed = train.seed if (start_step == 0 or train.exact_resume) else train.seed + start_step

        def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            # Exact resume: start the stream where this pipeline stopped. The data
            # module skips indices / records before decoding, so this is cheap.
            per_pipeline = max(1, ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            start_batch = start_step * per_pipeline if (start_step and train.exact_resume) else 0
            return data_lib.train_dataset(
                self.source,
                batch_size=ctx.get_per_replica_batch_size(train.batch_size),
                image_size=train.image_size,
                seed=seed,
                augment=train.augment,
                class_balanced=train.class_balanced,
                input_context=ctx,
                repeat=True,
                start_batch=start_batch,
            )

        if start_step and train.exact_resume:
            log.info("resuming the input stream after the %d batches already trained on", start_step)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def make_train_step(self) -> Callable:
        """One global step ``iterator -> (loss, correct, gradient_norm)`` as a ``tf.function``."""
        strategy = self.strategy
        replica_step = self.task.make_replica_step(self.state)
        step_counter = self.state.step

        # No autograph: the step has no Python control flow on tensors, and converting every call
        # under it (the model, the head, the optimizer, in each replica's thread) slows tracing.
        @tf.function(autograph=False)
        def train_step(iterator):
            images, labels = next(iterator)
            loss, correct, norm = strategy.run(replica_step, args=(images, labels))
            step_counter.assign_add(1)
            return (
                strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
                strategy.experimental_local_results(norm)[0],
            )

        return train_step

    # ------------------------------------------------------------------ checkpoints

    def restore(self) -> int:
        """Restores the latest checkpoint of ``model_dir`` (when resuming), once; returns the start step."""
        if self._start_step is not None:
            return self._start_step
        self._start_step = 0
        if not self.config.train.resume:
            return 0
        path = tf.train.latest_checkpoint(os.path.join(self.model_dir, CHECKPOINT_SUBDIR))
        if path is None:
            log.info("resume: no checkpoint in %s, starting from step 0", self.model_dir)
            return 0
        self.checkpoint.restore(path).assert_existing_objects_matched()
        self._start_step = int(self.state.step.numpy())
        log.info("resumed from %s at step %d (learning rate %.6g)", path, self._start_step, self.current_lr())
        return self._start_step

    def current_lr(self) -> float:
        return float(self.state.schedule(self.state.optimizer.iterations))

    def save(self) -> str:
        path = self.manager.save(checkpoint_number=int(self.state.step.numpy()))
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
        return int(data_lib.skipped_images(self.source))

    # ------------------------------------------------------------------ the loop

    def _progress_bar(self, epoch: int) -> keras.utils.Progbar | None:
        train = self.config.train
        if not (train.progress and self.chief):
            return None
        print(f"Epoch {epoch + 1}/{train.epochs}", flush=True)
        # A terminal gets a live bar; a log file one summary line per epoch. Every value is
        # given as this process's epoch average so far (stateful), the numbers the summary
        # reports: Progbar's own averaging shows only the last step's value on an epoch's final line.
        return keras.utils.Progbar(
            self.steps_per_epoch,
            stateful_metrics=["loss", "acc", "images/s", "lr"],
            verbose=1 if sys.stdout.isatty() else 2,
        )

    def run(self) -> TrainResult:
        """Runs (or resumes) the steps up to the end of the schedule or ``max_steps``.

        Returns:
            A :class:`TrainResult` (without ``before``, ``after`` and ``export_dir``,
            which the post-run steps fill). If SIGTERM/SIGINT arrived, a checkpoint of
            the current step was saved and ``interrupted`` names the signal.

        Raises:
            DataError: the loss became inf/NaN outside float16 (where a step is skipped instead).
        """
        train = self.config.train
        start_step = self.restore()
        self._write_run_files()
        stop_at = min(self.total_steps, train.max_steps) if train.max_steps else self.total_steps
        writer = None
        if self.chief:
            writer = tf.summary.create_file_writer(os.path.join(self.model_dir, LOG_SUBDIR, "train"))
        train_step = self.make_train_step()
        iterator = iter(self.make_dataset(start_step))
        step = start_step
        losses, correct_total, seen = [], 0.0, 0
        timed_images, timed_seconds = 0, 0.0
        last_path = None
        t_loop = time.perf_counter()
        progbar = None
        epoch_started = False
        with _StopFlag() as stop:
            while step < stop_at and stop.signal_name is None:
                epoch, in_epoch = divmod(step, self.steps_per_epoch)
                if not epoch_started or in_epoch == 0:
                    progbar = self._progress_bar(epoch)
                    epoch_started = True
                    losses, correct_total, seen = [], 0.0, 0
                t0 = time.perf_counter()
                loss, correct, norm = train_step(iterator)
                loss = float(loss)
                dt = time.perf_counter() - t0
                step += 1
                if not math.isfinite(loss) and train.mixed_precision != "float16":
                    raise DataError(f"the loss became {loss} at step {step}; lower lr or set clip_norm")
                if step > start_step + 1:  # the first step traces and compiles
                    timed_images += train.batch_size
                    timed_seconds += dt
                losses.append(loss)
                correct_total += float(correct)
                seen += train.batch_size
                ips = timed_images / timed_seconds if timed_seconds else train.batch_size / dt
                lr = self.current_lr()
                if progbar is not None:
                    progbar.update(
                        in_epoch + 1,
                        [
                            ("loss", float(np.mean(losses))),
                            ("acc", correct_total / seen),
                            ("images/s", ips),
                            ("lr", lr),
                        ],
                    )
                if writer is not None and (step % train.log_every == 0 or step == stop_at):
                    scalars = {
                        "loss": loss,
                        "accuracy": float(correct) / train.batch_size,
                        "learning_rate": lr,
                        "images_per_second": ips,
                        "gradient_norm": float(norm),
                        "skipped_images": self._skipped_images(),
                    }
                    if train.mixed_precision == "float16":
                        scalars["loss_scale"] = float(self.state.loss_scale.numpy())
                    write_scalars(writer, step, scalars)
                end_of_epoch = step % self.steps_per_epoch == 0
                periodic = train.checkpoint_every and step % train.checkpoint_every == 0
                if end_of_epoch or periodic:
                    last_path = self.save()
        interrupted = stop.signal_name
        seconds = time.perf_counter() - t_loop
        if step > start_step or last_path is None:
            if last_path is None or not last_path.endswith(f"-{step}"):
                with announce(f"saving the checkpoint of step {step}", self.chief):
                    last_path = self.save()
        if writer is not None:
            writer.flush()
        skipped = self._skipped_images()
        if skipped:
            log.warning("%s", self.source.skipped.summary())
        if interrupted:
            log.warning("interrupted by %s at step %d; checkpoint %s", interrupted, step, last_path)
        return TrainResult(
            model_dir=os.path.abspath(self.model_dir),
            step=step,
            total_steps=self.total_steps,
            loss=float(np.mean(losses)) if losses else float("nan"),
            accuracy=correct_total / seen if seen else float("nan"),
            images_per_s=timed_images / timed_seconds if timed_seconds else 0.0,
            replicas=self.replicas,
            learning_rate=self.current_lr(),
            checkpoint=os.path.abspath(last_path) if self.chief and last_path else None,
            interrupted=interrupted,
            skipped_images=skipped,
            weights_sha256=weights_digest(self.state.model.weights + self.state.head.weights),
            seconds=round(seconds, 2),
        )
