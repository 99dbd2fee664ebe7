"""The DOLG retrieval training task: model, margin head, optimizer and the replica step.

As in TensorFlow Model Garden, the task says *what* is trained and how one replica
computes its update; the loop (:mod:`dolg_tf.training.loop`) says *when*: steps,
checkpoints, summaries, signals and progress.

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

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from dolg_tf.errors import ConfigError
from dolg_tf.layers import ArcFace, CurricularFace, SubCenterArcFace, dynamic_margins
from dolg_tf.model import DOLG, copy_backbone_weights, load_backbone_preset
from dolg_tf.training.config import RunConfig, TrainConfig
from dolg_tf.training.optim import (
    WarmupCosine,
    build_optimizer,
    build_schedule,
    exclude_from_decay,
    weight_decay_mask,
)
from dolg_tf.training.sync_bn import enable_sync_batch_norm


def build_margin_head(config: TrainConfig, num_classes: int, class_counts: np.ndarray | None) -> keras.layers.Layer:
    """The margin head named by ``config.head`` (float32 whatever the model's policy)."""
    if config.head == "arcface":
        return ArcFace(num_classes, scale=config.head_scale, margin=config.head_margin, dtype="float32")
    if config.head == "curricularface":
        return CurricularFace(num_classes, scale=config.head_scale, margin=config.head_margin, dtype="float32")
    if config.head == "subcenter":
        if config.dynamic_margins and class_counts is not None and len(class_counts) == num_classes:
            margins = [float(m) for m in dynamic_margins(np.maximum(np.asarray(class_counts), 1))]
        else:
            margins = config.head_margin
        return SubCenterArcFace(
            num_classes, k=config.subcenter_k, margins=margins, scale=config.head_scale, dtype="float32"
        )
    raise ConfigError(f"unknown head {config.head!r}")


@dataclasses.dataclass
class TrainState:
    """What a run trains and checkpoints, made by :meth:`RetrievalTask.create_state` in a strategy scope.

    Attributes:
        model: the DOLG model (built with the run's dtype policy).
        head: the float32 margin head.
        optimizer: the optimizer (built over ``variables``).
        schedule: its learning-rate schedule.
        variables: the model's then the head's trainable variables.
        decay_mask: one flag per variable, whether it gets weight decay.
        step: the global step.
        loss_scale: float16 dynamic loss scale (1 otherwise).
        good_steps: float16 steps since the loss scale last changed.
        sync_bn_layers: batch-norm layers switched to synchronized statistics.
    """

    model: DOLG
    head: keras.layers.Layer
    optimizer: keras.optimizers.Optimizer
    schedule: WarmupCosine
    variables: list
    decay_mask: list[bool]
    step: tf.Variable
    loss_scale: tf.Variable
    good_steps: tf.Variable
    sync_bn_layers: int

    def checkpoint(self) -> tf.train.Checkpoint:
        """A checkpoint of the whole state (its keys are the checkpoint format of a run)."""
        return tf.train.Checkpoint(
            model=self.model,
            head=self.head,
            optimizer=self.optimizer,
            step=self.step,
            loss_scale=self.loss_scale,
            good_steps=self.good_steps,
        )


class RetrievalTask:
    """DOLG + a margin head, trained with cross-entropy over the head's logits.

    Args:
        config: the run's resolved configuration.

    Example:

    ```python
    from dolg_tf.training import RetrievalTask, run_config
    task = RetrievalTask(run_config("tiny", mixed_precision="bfloat16"))
    model = task.build_model()  # mixed_bfloat16 layers; Keras' global policy is untouched
    ```
    """

    def __init__(self, config: RunConfig):
        self.config = config

    def build_model(self, dtype: str | None = None) -> DOLG:
        """The DOLG model of ``config.model``, with the run's dtype policy unless ``dtype`` is given."""
        return DOLG(**self.config.model.to_dict(), dtype=dtype or self.config.train.dtype_policy)

    def build_head(self, num_classes: int, class_counts: np.ndarray | None = None) -> keras.layers.Layer:
        """The margin head, built for the model's descriptor size."""
        head = build_margin_head(self.config.train, num_classes, class_counts)
        head.build([(None, self.config.model.embedding_dim), (None,)])
        return head

    def create_state(
        self,
        strategy: tf.distribute.Strategy,
        num_classes: int,
        class_counts: np.ndarray | None,
        steps_per_epoch: int,
    ) -> TrainState:
        """Builds the model, head, optimizer and step counters in ``strategy``'s scope."""
        config = self.config.train
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            model = self.build_model()
            if config.backbone_weights is not None:
                copy_backbone_weights(load_backbone_preset(config.backbone_weights), model.backbone)
            # One replica's statistics are the global batch's already; XLA (jit) cannot
            # compile the cross-replica all-reduce, so sync only when there is more than one.
            sync = config.sync_batch_norm and strategy.num_replicas_in_sync > 1
            sync_bn_layers = enable_sync_batch_norm(model) if sync else 0
            head = self.build_head(num_classes, class_counts)
            variables = list(model.trainable_variables) + list(head.trainable_variables)
            decay_mask = weight_decay_mask(variables, config.weight_decay_norm_and_bias)
            schedule = build_schedule(config, steps_per_epoch)
            optimizer = build_optimizer(config, schedule)
            exclude_from_decay(optimizer, variables, decay_mask)
            optimizer.build(variables)
            first_only = tf.VariableAggregation.ONLY_FIRST_REPLICA
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step", aggregation=first_only)
            loss_scale = tf.Variable(
                config.initial_loss_scale if config.mixed_precision == "float16" else 1.0,
                dtype=tf.float32,
                trainable=False,
                name="loss_scale",
                aggregation=first_only,
            )
            good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps", aggregation=first_only)
        return TrainState(
            model=model,
            head=head,
            optimizer=optimizer,
            schedule=schedule,
            variables=variables,
            decay_mask=decay_mask,
            step=step,
            loss_scale=loss_scale,
            good_steps=good_steps,
            sync_bn_layers=sync_bn_layers,
        )

    def make_replica_step(self, state: TrainState) -> Callable:
        """The per-replica step ``(images, labels) -> (loss, correct, gradient_norm)``, for ``strategy.run``.

        The loss is this replica's share of the global-batch mean; ``correct`` counts
        its top-1 hits; the norm is the all-reduced gradient's (inf/NaN when a float16
        step overflowed and was skipped).
        """
        config = self.config.train
        model, head, optimizer, variables = state.model, state.head, state.optimizer, state.variables
        global_batch = config.batch_size
        float16 = config.mixed_precision == "float16"
        sgd_decay = config.optimizer == "sgd" and config.weight_decay > 0
        mask = state.decay_mask

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
                grow = state.good_steps + 1 >= config.loss_scale_growth_steps
                state.loss_scale.assign(tf.where(grow, state.loss_scale * 2.0, state.loss_scale))
                state.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), state.good_steps + 1))
                return tf.constant(True)

            def bad():
                state.loss_scale.assign(tf.maximum(state.loss_scale * 0.5, 1.0))
                state.good_steps.assign(0)
                return tf.constant(False)

            tf.cond(ok, good, bad)

        def replica_step(images, labels):
            labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
            images = tf.cast(images, tf.float32)
            scale = tf.identity(state.loss_scale)
            loss, correct, grads = forward_backward(images, labels, scale)
            ctx = tf.distribute.get_replica_context()
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [tf.cast(g, tf.float32) for g in grads])
            if float16:
                grads = [g / scale for g in grads]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            if sgd_decay:
                # L2 decay on the summed gradient, as PyTorch's SGD(weight_decay=...) in the official code.
                grads = [
                    g + config.weight_decay * tf.cast(v, g.dtype) if m else g for g, v, m in zip(grads, variables, mask)
                ]
            if config.clip_norm > 0:
                grads, norm = tf.clip_by_global_norm(grads, config.clip_norm)
            else:
                norm = tf.linalg.global_norm(grads)
            if float16:
                ctx.merge_call(apply_skipping_non_finite, args=(grads, finite))
            else:
                optimizer.apply(grads, variables)
            return loss, correct, norm

        return replica_step
