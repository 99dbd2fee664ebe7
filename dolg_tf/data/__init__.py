"""Training data: sources (GLDv2, CSV, folder, TFRecord, the demo photos) and tf.data pipelines.

Modules: :mod:`~dolg_tf.data.base` (the :class:`TrainSource` contract),
:mod:`~dolg_tf.data.formats` (:func:`open_source`, :func:`detect_format`, image files),
:mod:`~dolg_tf.data.tfrecord` (TFRecord shards, read and written),
:mod:`~dolg_tf.data.pipeline` (:func:`train_dataset`).

Typical use (what ``training/train.py`` does)::

    from dolg_tf import data

    source = data.open_source(args.data, args.data_format)    # validates now; DataError if bad
    source.save_label_map(os.path.join(model_dir, "label_map.json"))
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: data.train_dataset(
            source, batch_size=ctx.get_per_replica_batch_size(global_batch), image_size=224,
            seed=seed, class_balanced=False, input_context=ctx, config=data_config))
    ...
    logging.info("%s", source.skipped.summary())             # or data.skipped_images(source)

**Skipped images.** A corrupt or unreadable image (truncated JPEG, a text file named
``.jpg``, zero bytes, a missing file, a header announcing more than
``max_image_pixels`` pixels or a file over ``max_image_bytes``) never stops a run: it
is dropped from the stream and counted in ``source.skipped`` (a :class:`SkipCounter`
shared by every dataset made from that source, thread-safe). Read it at any time:
``skipped_images(source)`` -> int, ``source.skipped.by_reason()`` -> ``{reason: n}``,
``source.skipped.summary()`` -> a log line. The first skips are also logged one by
one (logger ``dolg_tf.data``). Counts run ahead of training by the prefetch depth,
and an image is counted again each epoch it is drawn. ``max_consecutive_skips``
unreadable images in a row stop the pipeline with an error rather than spin.

**Determinism.** Order and augmentation are pure functions of ``(seed, position)``
(stateless random ops, seeded permutations; nothing depends on TF's global seed), so
two replicas with batch ``B/2`` see exactly what one replica with batch ``B`` sees.

**Demo.** ``open_source(None)`` is the built-in photos (one instance class each,
:class:`dolg_tf.demo.source.DemoSource`); :func:`dolg_tf.demo.demo_retrieval_split` +
:func:`dolg_tf.demo.retrieval_metrics` evaluate a trained model on held-out numpy-made
views: instance retrieval under synthetic views.
"""

from dolg_tf._lazy import lazy_exports

# Public name -> submodule. Resolved on first use, so importing dolg_tf.data.config (for
# DataConfig, FORMATS) or `dolg --help` does not load TensorFlow.
_EXPORTS = {
    "FORMATS": ".config",
    "DataConfig": ".config",
    "skipped_images": ".pipeline",
    "train_dataset": ".pipeline",
    "SkipCounter": ".skips",
    "FEATURE_IMAGE": ".tfrecord",
    "FEATURE_KEY": ".tfrecord",
    "FEATURE_LABEL": ".tfrecord",
    "TFRECORD_META": ".tfrecord",
    "FileSource": ".formats",
    "TFRecordSource": ".tfrecord",
    "TrainSource": ".base",
    "detect_format": ".formats",
    "open_source": ".formats",
    "make_example": ".tfrecord",
    "write_tfrecords": ".tfrecord",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "FORMATS",
    "DataConfig",
    "TrainSource",
    "FileSource",
    "TFRecordSource",
    "SkipCounter",
    "open_source",
    "detect_format",
    "train_dataset",
    "skipped_images",
    "write_tfrecords",
    "make_example",
    "FEATURE_IMAGE",
    "FEATURE_LABEL",
    "FEATURE_KEY",
    "TFRECORD_META",
]
