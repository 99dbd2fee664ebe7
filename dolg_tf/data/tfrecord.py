"""TFRecord shards with the dolg_tf feature spec: reading them as a source, and writing any source as them.

Each record is a ``tf.train.Example`` with

* ``image/encoded`` (bytes): the image file's bytes, unchanged (JPEG, PNG, ...; the demo
  photos are written as PNG, losslessly);
* ``image/class/label`` (int64): the class index, 0..N-1;
* ``image/key`` (bytes, optional): where the image came from (GLDv2 id, relative path).

Shards are ``train-00000-of-00008.tfrecord`` ...; each is written to a temporary name and
renamed when complete. ``dolg_data.json`` beside them (written last, also atomically)
lists the shards and their counts, the label map and class counts, so opening the shards
needs no scan. Shards written elsewhere (without ``dolg_data.json``) are opened with one
pass over their labels.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

import numpy as np
import tensorflow as tf

from dolg_tf.data.base import (
    TAG_BALANCE,
    TAG_FILES,
    TAG_SHUFFLE,
    TrainSource,
    epoch_seed,
    no_autograph,
    seeded_permutation,
)
from dolg_tf.data.config import DataConfig
from dolg_tf.errors import DataError
from dolg_tf.fileio import atomic_write_json

logger = logging.getLogger("dolg_tf.data")

META_VERSION = 1
#: Name of the JSON file written beside the shards.
TFRECORD_META = "dolg_data.json"
TFRECORD_PATTERNS = ("*.tfrecord", "*.tfrecords", "*.tfrec", "*.tfrecord-*", "*.tfrecord.gz")
#: The feature spec: encoded bytes, int64 label, optional key.
FEATURE_IMAGE, FEATURE_LABEL, FEATURE_KEY = "image/encoded", "image/class/label", "image/key"


class TFRecordSource(TrainSource):
    """TFRecord shards with the dolg_tf feature spec (see :mod:`dolg_tf.data.tfrecord`)."""

    kind = "tfrecord"

    def __init__(
        self,
        location: str,
        files: list[str],
        label_map: dict[str, int],
        class_counts: np.ndarray,
        remap: dict[int, int] | None = None,
    ):
        self._files = files
        self._remap = remap
        desc = f"tfrecord {location}: {int(np.sum(class_counts))} images, {len(label_map)} classes, {len(files)} shards"
        super().__init__(location, label_map, class_counts, desc)

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def _parse(self):
        spec = {
            # A record without image bytes decodes as an empty file: skipped and counted.
            FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string, default_value=""),
            FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
            FEATURE_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        }
        table = None
        if self._remap is not None:
            keys, values = zip(*sorted(self._remap.items()))
            table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.int64), tf.constant(values, tf.int64)), -1
            )

        @no_autograph
        def parse(record):
            ex = tf.io.parse_single_example(record, spec)
            label = ex[FEATURE_LABEL] if table is None else table.lookup(ex[FEATURE_LABEL])
            return ex[FEATURE_IMAGE], label, ex[FEATURE_KEY]

        return parse

    def ordered(self, *, epochs, shuffle, class_balanced, seed, shuffle_buffer, cycle_length, file_shard=None):
        files = self._tensor("files", self._files)
        if file_shard is not None:
            pipelines, index = file_shard
            if len(self._files) < pipelines:
                raise DataError(
                    f"{self.description}: shard_files needs at least one file per input pipeline "
                    f"({pipelines}); write more shards (dolg data to-tfrecord --shards N)"
                )
            files = files[index::pipelines]
            # Each pipeline its own random streams: its files differ anyway.
            seed = int(np.random.SeedSequence([seed, pipelines, index]).generate_state(1)[0] >> 1)
        parse = self._parse()
        factors = self._tensor("factors", self.class_factors())
        cycle = min(cycle_length, int(files.shape[0]))

        @no_autograph
        def one_epoch(epoch):
            order = files
            if shuffle:
                permutation = seeded_permutation(tf.size(files, tf.int64), epoch_seed(seed, TAG_FILES, epoch))
                order = tf.gather(files, permutation)
            ds = (
                tf.data.Dataset.from_tensor_slices(order)
                .interleave(
                    tf.data.TFRecordDataset,
                    cycle_length=cycle,
                    block_length=1,
                    num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True,
                )
                .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            )
            if class_balanced:
                balance_seed = epoch_seed(seed, TAG_BALANCE, epoch)

                @no_autograph
                def repeat(i, element):
                    u = tf.random.stateless_uniform(
                        [], tf.random.experimental.stateless_fold_in(balance_seed, i), dtype=tf.float64
                    )
                    times = tf.cast(tf.floor(tf.gather(factors, element[1]) + u), tf.int64)
                    return tf.data.Dataset.from_tensors(element).repeat(times)

                ds = ds.enumerate().flat_map(repeat)
            if shuffle:
                # A windowed shuffle with a stateless permutation per window: unlike
                # Dataset.shuffle it does not depend on TF's global seed.
                window_seed = epoch_seed(seed, TAG_SHUFFLE, epoch)

                @no_autograph
                def permute(w, window):
                    perm = seeded_permutation(
                        tf.shape(window[1], tf.int64)[0], tf.random.experimental.stateless_fold_in(window_seed, w)
                    )
                    return tf.data.Dataset.from_tensor_slices(tuple(tf.gather(t, perm) for t in window))

                ds = ds.batch(shuffle_buffer).enumerate().flat_map(permute)
            return ds

        return tf.data.Dataset.range(epochs if epochs is not None else np.iinfo(np.int64).max).flat_map(one_epoch)

    def key(self, handle):
        return handle[2]

    def load(self, handle):
        data, label, key = handle
        return data, tf.cast(label, tf.int32), key

    def iter_encoded(self, max_bytes):
        parse = self._parse()
        for i, record in enumerate(tf.data.TFRecordDataset(self._files)):
            data, label, key = (t.numpy() for t in parse(record))
            if len(data) > max_bytes:
                logger.warning("to-tfrecord: skipped oversized record %d (%s)", i, key)
                continue
            yield i, key.decode("utf-8", "replace"), data, int(label)


def _tfrecord_files(path: str) -> tuple[list[str], dict | None]:
    if tf.io.gfile.isdir(path):
        meta_path = os.path.join(path, TFRECORD_META)
        if tf.io.gfile.exists(meta_path):
            try:
                with tf.io.gfile.GFile(meta_path, "r") as f:
                    meta = json.load(f)
                files = [os.path.join(path, s["file"]) for s in meta["shards"]]
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{meta_path!r} is not a valid dolg TFRecord index: {err}") from err
            missing = [f for f in files if not tf.io.gfile.exists(f)]
            if missing:
                raise DataError(f"{meta_path!r} lists {len(missing)} missing shard(s), e.g. {missing[0]!r}")
            return files, meta
        files = sorted({f for p in TFRECORD_PATTERNS for f in tf.io.gfile.glob(os.path.join(path, p))})
    elif any(c in path for c in "*?["):
        files = sorted(tf.io.gfile.glob(path))
    else:
        files = [path]
    if not files:
        raise DataError(f"no TFRecord files at {path!r} (looked for {', '.join(TFRECORD_PATTERNS)})")
    return files, None


def open_tfrecord(path: str) -> TFRecordSource:
    """Opens TFRecord shards (a file, a glob, or a folder with or without ``dolg_data.json``)."""
    files, meta = _tfrecord_files(path)
    try:
        first = next(iter(tf.data.TFRecordDataset(files[:1]).take(1)), None)
    except tf.errors.OpError as err:
        raise DataError(f"cannot read TFRecord {files[0]!r}: {err.message}") from err
    if first is None:
        raise DataError(f"TFRecord {files[0]!r} is empty")
    features = tf.train.Example.FromString(first.numpy()).features.feature
    for name in (FEATURE_IMAGE, FEATURE_LABEL):
        if name not in features:
            raise DataError(f"TFRecord {files[0]!r}: records lack the {name!r} feature (have {sorted(features)})")
    if meta is not None:
        try:
            label_map = {str(k): int(v) for k, v in meta["label_map"].items()}
            counts = np.asarray(meta["class_counts"], np.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path!r}: the TFRecord index lacks label_map/class_counts: {err}") from err
        if sorted(label_map.values()) != list(range(len(counts))):
            raise DataError(f"{path!r}: the TFRecord index's label_map does not cover 0..{len(counts) - 1}")
        return TFRecordSource(path, files, label_map, counts)
    # Foreign shards: one pass over the labels only (no image decoding) to count and remap them.
    spec = {FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64)}
    try:
        raw = np.concatenate(
            [
                b.numpy()
                for b in tf.data.TFRecordDataset(files)
                .batch(4096)
                .map(lambda r: tf.io.parse_example(r, spec)[FEATURE_LABEL], num_parallel_calls=tf.data.AUTOTUNE)
            ]
        )
    except tf.errors.OpError as err:
        raise DataError(f"cannot read the labels of {path!r}: {err.message}") from err
    unique, counts = np.unique(raw, return_counts=True)
    remap = None if np.array_equal(unique, np.arange(len(unique))) else {int(u): i for i, u in enumerate(unique)}
    return TFRecordSource(path, files, {str(int(u)): i for i, u in enumerate(unique)}, counts, remap)


def make_example(image: bytes, label: int, key: str = "") -> bytes:
    """One serialized record of the dolg_tf feature spec."""
    feature = {
        FEATURE_IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        FEATURE_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    if key:
        feature[FEATURE_KEY] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecords(
    source: TrainSource,
    out_dir: str,
    num_shards: int = 8,
    progress: bool = True,
    *,
    overwrite: bool = False,
    max_image_bytes: int = DataConfig.max_image_bytes,
) -> list[str]:
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
        raise DataError(f"{out_dir!r} already holds TFRecords ({TFRECORD_META}); pass overwrite=True to replace them")
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
    atomic_write_json(meta_path, meta, indent=1, sort_keys=True)
    logger.info("wrote %d images in %d shards to %s (%d skipped)", written, len(shards), out_dir, skipped)
    return [os.path.join(out_dir, name) for name in names]
