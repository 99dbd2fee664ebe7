"""``train_dataset``: batches of augmented training crops from a :class:`TrainSource`."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dolg_tf.data.base import TrainSource
from dolg_tf.data.base import no_autograph as _no_autograph
from dolg_tf.data.config import DataConfig
from dolg_tf.data.images import OK, decode_augment
from dolg_tf.data.images import augment as augment_image
from dolg_tf.data.skips import ALL_SOURCES
from dolg_tf.errors import ConfigError, DataError

# Status of the markers: end of epoch (neither kept nor counted), and decoding stuck.
END, STUCK = -1, -2


def _shard(ds: tf.data.Dataset, input_context: tf.distribute.InputContext, batch_size: int) -> tf.data.Dataset:
    """Keeps this input pipeline's chunks of the global element stream.

    Global batch j holds stream positions [j*B, (j+1)*B). With one pipeline, its
    consecutive per-replica batches go to replicas 0, 1, ...; so pipeline k of W, serving
    R = replicas/W replicas, takes the k-th chunk of R*b positions of every global
    batch. Each replica then sees the same elements whatever the number of workers.
    """
    pipelines, index = input_context.num_input_pipelines, input_context.input_pipeline_id
    chunk = batch_size * max(1, input_context.num_replicas_in_sync // pipelines)
    return ds.filter(_no_autograph(lambda position, handle: tf.equal((position // chunk) % pipelines, index)))


def train_dataset(
    source: TrainSource,
    *,
    batch_size: int,
    image_size: int,
    seed: int = 0,
    augment: bool = True,
    class_balanced: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    repeat: bool = True,
    shuffle: bool = True,
    config: DataConfig | None = None,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Batches of training crops.

    Every element is a pure function of ``seed`` and its position in the stream:
    the order comes from stateless seeded permutations, and each augmentation from
    stateless random ops seeded with (seed, position). So two pipelines with batch
    ``B/2`` produce, batch after batch, exactly the elements that one pipeline with
    batch ``B`` produces, and a replica sees the same data whatever the number of
    workers. (A skipped image shifts the elements after it within a pipeline.)

    Args:
        source: from :func:`dolg_tf.data.open_source`.
        batch_size: images per batch; with ``input_context``, the per-replica batch
            (``input_context.get_per_replica_batch_size(global_batch)``).
        image_size: side of the square crops.
        seed: seed of the order and of every augmentation.
        augment: random crop, flip and colour jitter; False: the centred largest square.
        class_balanced: every class equally often in expectation (repeat-factor sampling:
            each example is drawn ``(N / C) / count(class)`` times per epoch, stochastically
            rounded).
        input_context: from ``strategy.distribute_datasets_from_function``; shards by
            ``input_pipeline_id`` / ``num_input_pipelines`` (by element chunks, or by
            TFRecord file with ``config.shard_files``).
        repeat: loop over epochs forever (each with its own order); False: one epoch.
        shuffle: False keeps the source's order (evaluation, tests).
        start_batch: resume: begin as if this pipeline had already yielded ``start_batch``
            batches. The skipped elements are dropped from the index/record stream before
            anything is decoded, so resuming at step 100 000 costs seconds, not hours
            (``Dataset.skip`` on the result would decode every skipped image). Exact unless
            images were skipped as unreadable before that point.
        config: augmentation strengths and image bounds (default: ``source.config``, from
            :func:`open_source`); its ``image_size``, ``seed`` and ``class_balanced`` are
            ignored in favour of the arguments.

    Returns:
        A dataset of ``(images, labels)``: float32 ``(batch_size, image_size, image_size, 3)``
        RGB in [0, 255] and int32 ``(batch_size,)``; batches are always full
        (``drop_remainder``). Unreadable images are skipped and counted in
        ``source.skipped`` (see :func:`skipped_images`).

    Raises:
        ConfigError: a non-positive batch or image size.
        DataError: one epoch (``repeat=False``) holds less than one batch.
    """
    config = config or source.config
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not isinstance(start_batch, int) or start_batch < 0:
        raise ConfigError(f"start_batch must be a non-negative integer, got {start_batch!r}")
    pipelines = input_context.num_input_pipelines if input_context is not None else 1
    if not repeat and source.num_examples < batch_size * pipelines:
        raise DataError(
            f"{source.description}: one epoch has fewer images than one batch "
            f"({batch_size} x {pipelines} pipeline(s)); use repeat=True or a smaller batch"
        )

    by_file = pipelines > 1 and config.shard_files
    ds = source.ordered(
        epochs=None if repeat else 1,
        shuffle=shuffle,
        class_balanced=class_balanced,
        seed=seed,
        shuffle_buffer=config.shuffle_buffer,
        cycle_length=config.cycle_length,
        file_shard=(pipelines, input_context.input_pipeline_id) if by_file else None,
    ).enumerate()
    if by_file:
        # Interleave the pipelines' positions so that no two elements share augmentation seeds.
        ds = ds.map(_no_autograph(lambda p, handle: (p * pipelines + input_context.input_pipeline_id, handle)))
    elif pipelines > 1:
        ds = _shard(ds, input_context, batch_size)
    if start_batch:
        ds = ds.skip(start_batch * batch_size)  # handles only: nothing decoded yet

    if not repeat:
        # An end marker (position -1), so that images dropped at the very end of the
        # epoch leave a gap before it and are counted too.
        end = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)
        ds = ds.concatenate(tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), end[1])))

    @_no_autograph
    def load(sequence, element, stuck):
        position, handle = element

        def real():
            payload, label, key = source.load(handle)
            if source.encoded:
                status, image = decode_augment(payload, position, config, image_size, seed, augment)
            else:
                status, image = (
                    tf.constant(OK, tf.int32),
                    augment_image(payload, position, config, image_size, seed, augment),
                )
            return status, image, label, key

        def marker():
            status = tf.where(stuck, STUCK, END)
            return status, tf.zeros([image_size, image_size, 3]), tf.constant(0, tf.int32), tf.constant("")

        return (sequence, *tf.cond(tf.logical_and(position >= 0, tf.logical_not(stuck)), real, marker))

    # The decoder raises on truncated or corrupt files; ignore_errors drops those elements,
    # and the gap they leave in the sequence numbers counts them. If every element were
    # dropped, nothing would reach the counter and the pipeline would spin in silence (and
    # ignore_errors swallows any error raised upstream): so the counter publishes the last
    # sequence number it saw, and an element entering the decoder too far ahead of it
    # becomes a STUCK marker, which is not decoded, reaches the counter and stops the run.
    # It also keeps the keys of the elements in flight, so a dropped one is logged by name.
    # The tables are shared by every iterator of this dataset, so each iterator numbers its
    # elements from its own base: ident * _ITERATOR.
    progress = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=-1)
    in_flight = tf.lookup.experimental.MutableHashTable(tf.int64, tf.string, default_value="")
    iterators = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=-1)
    limit = config.max_consecutive_skips

    @_no_autograph
    def watchdog(ident, item):
        local, element = item

        def new_ident():
            fresh = iterators.lookup(tf.constant(0, tf.int64)) + 1
            with tf.control_dependencies([iterators.insert(tf.constant([0], tf.int64), tf.reshape(fresh, [1]))]):
                return tf.identity(fresh)

        ident = tf.cond(ident < 0, new_ident, lambda: ident)
        sequence = ident * _ITERATOR + local
        published = progress.lookup(ident)
        done = tf.where(published < 0, tf.constant(-1, tf.int64), published - ident * _ITERATOR)
        # The slack covers the elements the parallel decoder holds in flight.
        stuck = local - done > limit + _IN_FLIGHT
        position, handle = element
        keep = in_flight.insert(tf.reshape(sequence, [1]), tf.reshape(source.key(handle), [1]))
        with tf.control_dependencies([keep]):
            return ident, (tf.identity(sequence), element, stuck)

    ds = ds.enumerate().scan(tf.constant(-1, tf.int64), watchdog)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    initial = (tf.constant(-1, tf.int64), tf.constant(0, tf.int64))
    ds = ds.scan(initial, _skip_counter(source, config, progress, in_flight))
    ds = ds.filter(_is_ok).map(_drop_status)
    ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    if input_context is not None:
        # Sharded above; an automatic re-shard would drop data.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


@_no_autograph
def _is_ok(status, image, label):
    return tf.equal(status, OK)


@_no_autograph
def _drop_status(status, image, label):
    return image, label


# Elements the parallel decoder, ignore_errors and scan may hold between the watchdog and
# the counter (AUTOTUNE buffers stay far below this).
_IN_FLIGHT = 4096
_ITERATOR = 2**40


def _stuck(limit: int) -> str:
    return (
        f"{limit} images in a row were unreadable or out of bounds; the data looks broken "
        f"(see the 'skipped' warnings; DataConfig.max_consecutive_skips)"
    )


def _skip_counter(
    source: TrainSource,
    config: DataConfig,
    progress: tf.lookup.experimental.MutableHashTable,
    in_flight: tf.lookup.experimental.MutableHashTable,
):
    """The scan step that counts skips (python only on a skip) and stops on endless ones."""
    counter = source.skipped
    limit = config.max_consecutive_skips

    def record(status, key, lost):
        counter.record(
            int(status), key.numpy().decode("utf-8", "replace"), [k.decode("utf-8", "replace") for k in lost.numpy()]
        )
        return np.int64(0)

    @_no_autograph
    def step(state, element):
        last, run = state
        sequence, status, image, label, key = element
        last = tf.where(last < 0, sequence - sequence % _ITERATOR - 1, last)  # this iterator's first element
        gap = sequence - last - 1
        bad = gap + tf.cast(status > OK, tf.int64)  # the markers (END, STUCK) are negative
        lost = tf.range(last + 1, sequence)  # dropped by ignore_errors: read or decode errors
        noted = tf.cond(
            bad > 0,
            lambda: tf.py_function(record, [status, key, in_flight.lookup(lost)], tf.int64),
            lambda: tf.constant(0, tf.int64),
        )
        with tf.control_dependencies([noted]):
            forget = in_flight.remove(tf.range(last + 1, sequence + 1))
        run = tf.where(tf.equal(status, OK), tf.constant(0, tf.int64), run + bad) + noted
        check = tf.debugging.Assert(
            tf.logical_and(run < limit, tf.not_equal(status, STUCK)), [tf.constant(_stuck(limit))]
        )
        publish = progress.insert(tf.reshape(sequence // _ITERATOR, [1]), tf.reshape(sequence, [1]))
        with tf.control_dependencies([check, publish, forget]):
            status = tf.identity(status)
        return (sequence, run), (status, image, label)

    return step


def skipped_images(source: TrainSource | None = None) -> int:
    """Images skipped so far by every dataset made from ``source`` (all reasons); without a
    source, by every dataset of this process.

    ``source.skipped.by_reason()`` splits the count; ``source.skipped.summary()`` is a log line.
    """
    return (source.skipped if source is not None else ALL_SOURCES).count
