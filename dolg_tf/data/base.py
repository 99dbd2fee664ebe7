"""The training-source contract: :class:`TrainSource` and the shared random streams.

A source knows its examples, labels (remapped to 0..N-1) and class counts, and
produces the *ordered stream* of one epoch (a pure function of seed and epoch)
and the *load* of one element; :mod:`dolg_tf.data.pipeline` turns those into
batches. :mod:`dolg_tf.data.formats` opens files (GLDv2, CSV, folders),
:mod:`dolg_tf.data.tfrecord` TFRecord shards, and :mod:`dolg_tf.demo.source`
the built-in photos.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from dolg_tf.data.config import DataConfig
from dolg_tf.data.skips import ALL_SOURCES, SkipCounter
from dolg_tf.errors import DataError
from dolg_tf.fileio import atomic_write_json

logger = logging.getLogger("dolg_tf.data")

# These dataset functions have no Python control flow on tensors: skip AutoGraph's conversion.
no_autograph = tf.autograph.experimental.do_not_convert

# Tags that keep the random streams of different purposes independent for one seed.
TAG_SHUFFLE, TAG_BALANCE, TAG_FILES = 1, 2, 3


def epoch_seed(seed: int, tag: int, epoch: tf.Tensor) -> tf.Tensor:
    """A stateless seed for one (purpose, epoch) pair."""
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, tag], tf.int64), tf.cast(epoch, tf.int64))


def seeded_permutation(n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed)


def _sorted_labels(raw: Sequence[str]) -> list[str]:
    unique = set(raw)
    # Landmark ids and other integer labels sort by value ("2" before "10").
    if all(re.fullmatch(r"-?\d+", u) for u in unique):
        return sorted(unique, key=int)
    return sorted(unique)


class TrainSource:
    """A validated training set.

    Attributes:
        kind: its format, one of :data:`dolg_tf.data.FORMATS`.
        location: the path it was opened from (``None`` for the demo).
        num_classes: number of classes after remapping.
        num_examples: images per epoch (without class-balanced resampling).
        class_counts: int64 array ``(num_classes,)``: images per class.
        label_map: ``{original label: class index}``, indices 0..num_classes-1.
        description: one line for logs, e.g. ``"gldv2 /data: 1234 images, 10 classes"``.
        skipped: the :class:`SkipCounter` of every dataset made from this source.
        config: the resolved :class:`DataConfig` (``data``, ``data_format`` filled in);
            :func:`train_dataset` uses its augmentation and bounds unless given another.
    """

    kind: str = ""

    def __init__(self, location: str | None, label_map: dict[str, int], class_counts: np.ndarray, description: str):
        self.location = location
        self.label_map = dict(label_map)
        self.class_counts = np.asarray(class_counts, np.int64)
        self.num_classes = len(self.label_map)
        self.num_examples = int(self.class_counts.sum())
        self.description = description
        self.skipped = SkipCounter(parent=ALL_SOURCES)
        self.config = DataConfig()  # open_source sets the resolved one
        self._tensors: dict[str, tf.Tensor] = {}

    def _tensor(self, name: str, value) -> tf.Tensor:
        """``value`` as one eager tensor, made once and captured by every pipeline.

        A ``tf.constant`` made inside a tf.data function is a graph constant that costs a copy
        per call: for a million paths or the demo photos that dominates the input pipeline.
        """
        if name not in self._tensors:
            with tf.init_scope():
                self._tensors[name] = tf.constant(value)
        return self._tensors[name]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"

    @property
    def class_names(self) -> list[str]:
        """Original labels indexed by class index."""
        names = [""] * self.num_classes
        for name, index in self.label_map.items():
            names[index] = name
        return names

    def save_label_map(self, path: str) -> None:
        """Writes ``{"label_map": {original: index}, ...}`` as JSON, atomically."""
        payload = {
            "source": self.description,
            "format": self.kind,
            "num_classes": self.num_classes,
            "class_counts": self.class_counts.tolist(),
            "label_map": self.label_map,
        }
        atomic_write_json(path, payload, indent=1, sort_keys=True)

    def class_factors(self) -> np.ndarray:
        """Per-class repeat factor that makes every class equally frequent in expectation:
        ``(num_examples / num_classes) / class_count``."""
        counts = self.class_counts.astype(np.float64)
        # A class with no image (possible in TFRecords whose files were unreadable) is never drawn.
        return np.divide(self.num_examples / self.num_classes, counts, out=np.zeros_like(counts), where=counts > 0)

    # The two halves of the pipeline; see dolg_tf.data.pipeline.
    def ordered(
        self,
        *,
        epochs: int | None,
        shuffle: bool,
        class_balanced: bool,
        seed: int,
        shuffle_buffer: int,
        cycle_length: int,
        file_shard: tuple[int, int] | None = None,
    ) -> tf.data.Dataset:
        """Handles of the elements of ``epochs`` epochs (None: forever), a pure function of ``seed``.

        ``file_shard=(W, k)`` (TFRecords only): read only the files ``i`` with ``i % W == k``.
        """
        raise NotImplementedError

    #: Whether :meth:`load` gives encoded bytes (checked and decoded by the pipeline) or a
    #: decoded uint8 ``(H, W, 3)`` image.
    encoded: bool = True

    def load(self, handle) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(image bytes or uint8 image, int32 label, string key)`` of one handle (graph code)."""
        raise NotImplementedError

    def key(self, handle) -> tf.Tensor:
        """The string key of one handle, without reading anything (graph code; never fails)."""
        raise NotImplementedError

    def iter_encoded(self, max_bytes: int) -> Iterator[tuple[int, str, bytes, int]]:
        """``(example index, key, encoded image bytes, class index)`` of every readable example,
        in order (for TFRecord writing); unreadable or oversized files are left out with a warning."""
        raise NotImplementedError


class IndexedSource(TrainSource):
    """A source whose examples can be addressed by index: globally shuffled every epoch."""

    def __init__(
        self, location, keys: Sequence[str], raw_labels: Sequence[str], description_prefix: str, min_class_size: int = 1
    ):
        if not keys:
            raise DataError(f"{description_prefix}: no images")
        counts: dict[str, int] = {}
        for label in raw_labels:
            counts[label] = counts.get(label, 0) + 1
        kept = [label for label in _sorted_labels(raw_labels) if counts[label] >= min_class_size]
        if not kept:
            raise DataError(f"{description_prefix}: no class has at least min_class_size={min_class_size} images")
        label_map = {label: i for i, label in enumerate(kept)}
        keep = [i for i, label in enumerate(raw_labels) if label in label_map]
        dropped = len(counts) - len(kept)
        if dropped:
            logger.info(
                "%s: left out %d classes with fewer than %d images", description_prefix, dropped, min_class_size
            )
        self._keep = np.asarray(keep, np.int64)
        self._labels = np.asarray([label_map[raw_labels[i]] for i in keep], np.int64)
        self._keys = [keys[i] for i in keep]
        class_counts = np.bincount(self._labels, minlength=len(label_map))
        desc = f"{description_prefix}: {len(keep)} images, {len(label_map)} classes"
        super().__init__(location, label_map, class_counts, desc)

    @property
    def labels(self) -> np.ndarray:
        """Class index of every example, in example order."""
        return self._labels

    def ordered(self, *, epochs, shuffle, class_balanced, seed, shuffle_buffer, cycle_length, file_shard=None):
        del shuffle_buffer, cycle_length  # a global permutation needs neither
        if file_shard is not None:
            raise DataError(f"shard_files applies to TFRecord data, not to {self.kind}")
        n = self.num_examples
        per_example = self._tensor("factors", self.class_factors()[self._labels]) if class_balanced else None

        @no_autograph
        def one_epoch(epoch):
            index = tf.range(n, dtype=tf.int64)
            if class_balanced:
                # Stochastic rounding: floor(f + u) with u ~ U[0, 1) has expectation f.
                u = tf.random.stateless_uniform([n], epoch_seed(seed, TAG_BALANCE, epoch), dtype=tf.float64)
                index = tf.repeat(index, tf.cast(tf.floor(per_example + u), tf.int64))
            if shuffle:
                permutation = seeded_permutation(tf.size(index, tf.int64), epoch_seed(seed, TAG_SHUFFLE, epoch))
                index = tf.gather(index, permutation)
            return tf.data.Dataset.from_tensor_slices(index)

        return tf.data.Dataset.range(epochs if epochs is not None else np.iinfo(np.int64).max).flat_map(one_epoch)
