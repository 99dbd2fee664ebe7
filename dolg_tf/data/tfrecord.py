"""Writing a source as TFRecord shards with the dolg_tf feature spec.

Each record is a ``tf.train.Example`` with

* ``image/encoded`` (bytes): the image file's bytes, unchanged (JPEG, PNG, ...; the demo
  photos are written as PNG, losslessly);
* ``image/class/label`` (int64): the class index, 0..N-1;
* ``image/key`` (bytes, optional): where the image came from (GLDv2 id, relative path).

Shards are ``train-00000-of-00008.tfrecord`` ...; each is written to a temporary name and
renamed when complete. ``dolg_data.json`` beside them (written last, also atomically)
lists the shards and their counts, the label map and class counts, so opening the shards
needs no scan.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

import numpy as np
import tensorflow as tf

from dolg_tf.data.config import DataConfig
from dolg_tf.data.sources import (
    FEATURE_IMAGE, FEATURE_KEY, FEATURE_LABEL, TFRECORD_META, TrainSource, atomic_write_text,
)
from dolg_tf.errors import DataError

logger = logging.getLogger("dolg_tf.data")

META_VERSION = 1


def make_example(image: bytes, label: int, key: str = "") -> bytes:
    """One serialized record of the dolg_tf feature spec."""
    feature = {
        FEATURE_IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        FEATURE_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    if key:
        feature[FEATURE_KEY] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecords(source: TrainSource, out_dir: str, num_shards: int = 8, progress: bool = True, *,
                    overwrite: bool = False, max_image_bytes: int = DataConfig.max_image_bytes) -> list[str]:
    """Writes every example of ``source`` into ``num_shards`` TFRecord files.

    Examples go to the shards in source order, split into contiguous runs (training
    shuffles shard order and interleaves shards, then shuffles within a window). Files
    that cannot be read or exceed ``max_image_bytes`` are left out with a warning
    (their count is in ``dolg_data.json``; the class counts there are those written).

    Args:
        source: from :func:`dolg_tf.data.open_source`.
        out_dir: output folder (created).
        num_shards: number of files (at most one per example).
        progress: show a progress bar.
        overwrite: replace an existing ``dolg_data.json`` (otherwise an error).

    Returns:
        The shard paths.

    Raises:
        DataError: ``out_dir`` already holds shards (without ``overwrite``), bad ``num_shards``,
            or no example could be read.
    """
    import keras  # the progress bar; keras is already a dependency

    if not isinstance(num_shards, int) or num_shards < 1:
        raise DataError(f"num_shards must be a positive integer, got {num_shards!r}")
    meta_path = os.path.join(out_dir, TFRECORD_META)
    if tf.io.gfile.exists(meta_path) and not overwrite:
        raise DataError(f"{out_dir!r} already holds TFRecords ({TFRECORD_META}); pass overwrite=True / --overwrite")
    tf.io.gfile.makedirs(out_dir)
    num_shards = min(num_shards, source.num_examples)
    bounds = np.linspace(0, source.num_examples, num_shards + 1).astype(int)
    names = [f"train-{s:05d}-of-{num_shards:05d}.tfrecord" for s in range(num_shards)]
    bar = keras.utils.Progbar(source.num_examples, unit_name="image") if progress else None

    counts = np.zeros(source.num_classes, np.int64)
    per_shard = np.zeros(num_shards, np.int64)
    tag = uuid.uuid4().hex[:8]
    tmp_names = [os.path.join(out_dir, f".{name}.tmp-{tag}") for name in names]
    shard, writer = 0, tf.io.TFRecordWriter(tmp_names[0])
    written = 0
    try:
        for index, key, data, label in source.iter_encoded(max_image_bytes):
            while index >= bounds[shard + 1]:  # this shard's run is done: publish it
                writer.close()
                tf.io.gfile.rename(tmp_names[shard], os.path.join(out_dir, names[shard]), overwrite=True)
                shard += 1
                writer = tf.io.TFRecordWriter(tmp_names[shard])
            writer.write(make_example(data, label, key))
            counts[label] += 1
            per_shard[shard] += 1
            written += 1
            if bar is not None and written % 16 == 0:
                bar.update(index + 1)
        writer.close()
        for s in range(shard, num_shards):
            if s > shard:  # trailing shards whose every file was unreadable: empty but present
                tf.io.TFRecordWriter(tmp_names[s]).close()
            tf.io.gfile.rename(tmp_names[s], os.path.join(out_dir, names[s]), overwrite=True)
    finally:
        for tmp in tmp_names:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
    shards = [{"file": name, "num_examples": int(n)} for name, n in zip(names, per_shard)]
    if bar is not None:
        bar.update(source.num_examples, finalize=True)
    if written == 0:
        raise DataError(f"{source.description}: no image could be read")
    skipped = source.num_examples - written
    meta = {
        "format": "dolg-tfrecord",
        "version": META_VERSION,
        "source": source.description,
        "num_examples": written,
        "num_classes": source.num_classes,
        "skipped": skipped,
        "class_counts": counts.tolist(),
        "label_map": source.label_map,
        "shards": shards,
        "features": {
            FEATURE_IMAGE: "bytes: the encoded image file",
            FEATURE_LABEL: "int64: class index 0..num_classes-1",
            FEATURE_KEY: "bytes, optional: source id or relative path",
        },
    }
    if (counts == 0).any():
        logger.warning("to-tfrecord: %d classes have no readable image", int((counts == 0).sum()))
    atomic_write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True))
    logger.info("wrote %d images in %d shards to %s (%d skipped)", written, len(shards), out_dir, skipped)
    return [os.path.join(out_dir, name) for name in names]
