"""Training sources: what :func:`open_source` finds at a path, validated before training.

A source knows its examples, labels (remapped to 0..N-1) and class counts, and
produces the *ordered stream* of one epoch (a pure function of seed and epoch)
and the *load* of one element; :mod:`dolg_tf.data.pipeline` turns those into
batches.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from dolg_tf.data.config import FORMATS, DataConfig
from dolg_tf.data.skips import ALL_SOURCES, SkipCounter
from dolg_tf.errors import DataError

logger = logging.getLogger("dolg_tf.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
#: Name of the JSON file written beside TFRecord shards (see :mod:`dolg_tf.data.tfrecord`).
TFRECORD_META = "dolg_data.json"
TFRECORD_PATTERNS = ("*.tfrecord", "*.tfrecords", "*.tfrec", "*.tfrecord-*", "*.tfrecord.gz")
#: The TFRecord feature spec (see the README): encoded bytes, int64 label, optional key.
FEATURE_IMAGE, FEATURE_LABEL, FEATURE_KEY = "image/encoded", "image/class/label", "image/key"

# These dataset functions have no Python control flow on tensors: skip AutoGraph's conversion.
_no_autograph = tf.autograph.experimental.do_not_convert

# Tags that keep the random streams of different purposes independent for one seed.
_TAG_SHUFFLE, _TAG_BALANCE, _TAG_FILES = 1, 2, 3


def epoch_seed(seed: int, tag: int, epoch: tf.Tensor) -> tf.Tensor:
    """A stateless seed for one (purpose, epoch) pair."""
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, tag], tf.int64), tf.cast(epoch, tf.int64))


def seeded_permutation(n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed)


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder, then renames."""
    folder = os.path.dirname(path) or "."
    tf.io.gfile.makedirs(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


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
        atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))

    def class_factors(self) -> np.ndarray:
        """Per-class repeat factor that makes every class equally frequent in expectation:
        ``(num_examples / num_classes) / class_count``."""
        counts = self.class_counts.astype(np.float64)
        # A class with no image (possible in TFRecords whose files were unreadable) is never drawn.
        return np.divide(self.num_examples / self.num_classes, counts, out=np.zeros_like(counts), where=counts > 0)

    # The two halves of the pipeline; see dolg_tf.data.pipeline.
    def ordered(self, *, epochs: int | None, shuffle: bool, class_balanced: bool, seed: int,
                shuffle_buffer: int, cycle_length: int, file_shard: tuple[int, int] | None = None) -> tf.data.Dataset:
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


class _IndexedSource(TrainSource):
    """A source whose examples can be addressed by index: globally shuffled every epoch."""

    def __init__(self, location, keys: Sequence[str], raw_labels: Sequence[str], description_prefix: str,
                 min_class_size: int = 1):
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
            logger.info("%s: left out %d classes with fewer than %d images", description_prefix, dropped, min_class_size)
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

        @tf.autograph.experimental.do_not_convert

        @_no_autograph
        def one_epoch(epoch):
            index = tf.range(n, dtype=tf.int64)
            if class_balanced:
                # Stochastic rounding: floor(f + u) with u ~ U[0, 1) has expectation f.
                u = tf.random.stateless_uniform([n], epoch_seed(seed, _TAG_BALANCE, epoch), dtype=tf.float64)
                index = tf.repeat(index, tf.cast(tf.floor(per_example + u), tf.int64))
            if shuffle:
                index = tf.gather(index, seeded_permutation(tf.size(index, tf.int64), epoch_seed(seed, _TAG_SHUFFLE, epoch)))
            return tf.data.Dataset.from_tensor_slices(index)

        return tf.data.Dataset.range(epochs if epochs is not None else np.iinfo(np.int64).max).flat_map(one_epoch)


class FileSource(_IndexedSource):
    """Images in files: GLDv2, path/label CSV or class folders."""

    def __init__(self, kind: str, location: str, paths: Sequence[str], raw_labels: Sequence[str],
                 keys: Sequence[str] | None = None, min_class_size: int = 1, check_files: int = 16):
        self.kind = kind
        super().__init__(location, list(keys if keys is not None else paths), list(raw_labels),
                         f"{kind} {location}", min_class_size)
        self._paths = [paths[i] for i in self._keep]
        _check_some_exist(self._paths, check_files, f"{kind} {location}")

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def key(self, handle):
        return tf.gather(self._tensor("paths", self._paths), handle)

    def load(self, handle):
        path = tf.gather(self._tensor("paths", self._paths), handle)
        return tf.io.read_file(path), tf.cast(tf.gather(self._tensor("labels", self._labels), handle), tf.int32), path

    def iter_encoded(self, max_bytes):
        def read(i):
            try:
                if tf.io.gfile.stat(self._paths[i]).length > max_bytes:
                    return None
                with tf.io.gfile.GFile(self._paths[i], "rb") as f:
                    return f.read()
            except (tf.errors.OpError, OSError):
                return None

        # Threads: reading is I/O bound, and GFile releases the GIL.
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for i, data in enumerate(pool.map(read, range(self.num_examples))):
                if data is None:
                    logger.warning("to-tfrecord: skipped unreadable or oversized %s", self._paths[i])
                    continue
                yield i, self._keys[i], data, int(self._labels[i])


class DemoSource(_IndexedSource):
    """The built-in photos (dolg_tf.demo_data), one instance class each, decoded and held in memory."""

    kind = "demo"

    def __init__(self):
        from dolg_tf.demo_data import demo_photos

        photos = demo_photos()
        names = list(photos)
        # Label i is photo i in demo_photos() order, like dolg_tf.demo_data.demo_views; the
        # label map keeps that order (names are not sorted).
        self._photos = [photos[n] for n in names]
        super().__init__(None, names, [str(i) for i in range(len(names))], "demo")
        self.label_map = {name: i for i, name in enumerate(names)}
        self.description = f"demo: {len(names)} photos (instance retrieval under synthetic views)"
        # One flat uint8 buffer + offsets: the photos differ in size, and a flat constant
        # avoids a py_function (and the GIL) in the input pipeline.
        sizes = np.asarray([p.size for p in self._photos], np.int64)
        self._flat = np.concatenate([p.reshape(-1) for p in self._photos])
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._sizes = sizes
        self._shapes = np.asarray([p.shape for p in self._photos], np.int64)

    @property
    def photos(self) -> list[np.ndarray]:
        return list(self._photos)

    encoded = False  # trusted photos, decoded once and held in memory

    def key(self, handle):
        return tf.gather(self._tensor("keys", self._keys), handle)

    def load(self, handle):
        start = tf.gather(self._tensor("offsets", self._offsets), handle)
        pixels = tf.slice(self._tensor("flat", self._flat), [start], [tf.gather(self._tensor("sizes", self._sizes), handle)])
        image = tf.reshape(pixels, tf.gather(self._tensor("shapes", self._shapes), handle))
        image.set_shape([None, None, 3])
        key = tf.gather(self._tensor("keys", self._keys), handle)
        label = tf.cast(tf.gather(self._tensor("labels", self._labels), handle), tf.int32)
        return image, label, key

    def iter_encoded(self, max_bytes):
        from PIL import Image

        for i, (key, photo, label) in enumerate(zip(self._keys, self._photos, self._labels)):
            buffer = io.BytesIO()
            Image.fromarray(photo).save(buffer, "PNG")  # lossless: the records decode to the same pixels
            yield i, key, buffer.getvalue(), int(label)


class TFRecordSource(TrainSource):
    """TFRecord shards with the dolg_tf feature spec (see :mod:`dolg_tf.data.tfrecord`)."""

    kind = "tfrecord"

    def __init__(self, location: str, files: list[str], label_map: dict[str, int], class_counts: np.ndarray,
                 remap: dict[int, int] | None = None):
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

        @tf.autograph.experimental.do_not_convert

        @_no_autograph
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
                raise DataError(f"{self.description}: shard_files needs at least one file per input pipeline "
                                f"({pipelines}); write more shards (dolg data to-tfrecord --shards N)")
            files = files[index::pipelines]
            # Each pipeline its own random streams: its files differ anyway.
            seed = int(np.random.SeedSequence([seed, pipelines, index]).generate_state(1)[0] >> 1)
        parse = self._parse()
        factors = self._tensor("factors", self.class_factors())
        cycle = min(cycle_length, int(files.shape[0]))

        @tf.autograph.experimental.do_not_convert

        @_no_autograph
        def one_epoch(epoch):
            order = files
            if shuffle:
                order = tf.gather(files, seeded_permutation(tf.size(files, tf.int64), epoch_seed(seed, _TAG_FILES, epoch)))
            ds = tf.data.Dataset.from_tensor_slices(order).interleave(
                tf.data.TFRecordDataset, cycle_length=cycle, block_length=1,
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
            ).map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            if class_balanced:
                balance_seed = epoch_seed(seed, _TAG_BALANCE, epoch)

                @tf.autograph.experimental.do_not_convert

                @_no_autograph
                def repeat(i, element):
                    u = tf.random.stateless_uniform(
                        [], tf.random.experimental.stateless_fold_in(balance_seed, i), dtype=tf.float64)
                    times = tf.cast(tf.floor(tf.gather(factors, element[1]) + u), tf.int64)
                    return tf.data.Dataset.from_tensors(element).repeat(times)

                ds = ds.enumerate().flat_map(repeat)
            if shuffle:
                # A windowed shuffle with a stateless permutation per window: unlike
                # Dataset.shuffle it does not depend on TF's global seed.
                window_seed = epoch_seed(seed, _TAG_SHUFFLE, epoch)

                @tf.autograph.experimental.do_not_convert

                @_no_autograph
                def permute(w, window):
                    perm = seeded_permutation(tf.shape(window[1], tf.int64)[0],
                                              tf.random.experimental.stateless_fold_in(window_seed, w))
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


# ---------------------------------------------------------------------------------------------
# Opening and validating a path.


def _check_some_exist(paths: Sequence[str], count: int, what: str) -> None:
    """Checks up to ``count`` evenly spaced files: all missing means a wrong root, an error."""
    if count <= 0:
        return
    sample = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))})
    missing = [paths[i] for i in sample if not tf.io.gfile.exists(paths[i])]
    if len(missing) == len(sample):
        raise DataError(f"{what}: none of {len(sample)} sampled images exist (e.g. {missing[0]!r}); wrong folder?")
    if missing:
        logger.warning("%s: %d of %d sampled images are missing (e.g. %s); they will be skipped",
                       what, len(missing), len(sample), missing[0])


def _read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            text = f.read()  # one read: GFile's line iterator is slow for millions of rows
        rows = list(csv.reader(io.StringIO(text)))
    except (tf.errors.OpError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read CSV {path!r}: {err}") from err
    if not rows:
        raise DataError(f"CSV {path!r} is empty (expected a header row)")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    if not body:
        raise DataError(f"CSV {path!r} has a header but no rows")
    return header, body


def _columns(path: str, header: list[str], rows: list[list[str]], names: Sequence[str]) -> list[list[str]]:
    """The named columns of every row, stripped; DataError names a missing column or a short/blank row."""
    if any(n not in header for n in names):
        raise DataError(f"CSV {path!r} has columns {header}; expected {','.join(names)}")
    where = [header.index(n) for n in names]
    out = []
    for line, row in enumerate(rows, start=2):
        if len(row) <= max(where):
            raise DataError(f"CSV {path!r} line {line}: {len(row)} fields, expected {len(header)}")
        cells = [row[i].strip() for i in where]
        if not all(cells):
            raise DataError(f"CSV {path!r} line {line}: empty {'/'.join(names)} value")
        out.append(cells)
    return out


def _open_csv(path: str, min_class_size: int, check_files: int) -> FileSource:
    header, rows = _read_csv(path)
    base = os.path.dirname(path)
    cells = _columns(path, header, rows, ("path", "label"))
    paths = [rel if os.path.isabs(rel) or "://" in rel else os.path.join(base, rel) for rel, _ in cells]
    return FileSource("csv", path, paths, [label for _, label in cells], keys=[rel for rel, _ in cells],
                      min_class_size=min_class_size, check_files=check_files)


_GLDV2_ID = re.compile(r"[0-9A-Za-z_-]{3,}")


def _open_gldv2(path: str, min_class_size: int, check_files: int, images_dir: str | None) -> FileSource:
    if tf.io.gfile.isdir(path):
        candidates = [os.path.join(path, n) for n in ("train_clean.csv", "train.csv")]
        found = [c for c in candidates if tf.io.gfile.exists(c)]
        if not found:
            raise DataError(f"GLDv2 folder {path!r} has no train.csv or train_clean.csv")
        csv_path = found[0]
    else:
        csv_path = path
    root = os.path.dirname(csv_path)
    images = images_dir or os.path.join(root, "train")
    header, rows = _read_csv(csv_path)
    if "images" in header and "landmark_id" in header and "id" not in header:
        # train_clean.csv: one row per landmark, its image ids space-separated.
        pairs = [(i, lm) for lm, ids in _columns(csv_path, header, rows, ("landmark_id", "images")) for i in ids.split()]
    else:
        pairs = [(i, lm) for i, lm in _columns(csv_path, header, rows, ("id", "landmark_id"))]
    bad = next((i for i, _ in pairs if not _GLDV2_ID.fullmatch(i)), None)
    if bad is not None:
        raise DataError(f"GLDv2 CSV {csv_path!r}: image id {bad!r} is not a GLDv2 id (3+ letters/digits)")
    images = images.rstrip("/")
    paths = [f"{images}/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i, _ in pairs]  # "/" also in gs:// URIs
    return FileSource("gldv2", csv_path, paths, [lm for _, lm in pairs], keys=[i for i, _ in pairs],
                      min_class_size=min_class_size, check_files=check_files)


def _open_folder(path: str, min_class_size: int, check_files: int) -> FileSource:
    paths, labels, keys = [], [], []
    for name in sorted(tf.io.gfile.listdir(path)):
        name = name.rstrip("/")
        folder = os.path.join(path, name)
        if name.startswith(".") or not tf.io.gfile.isdir(folder):
            continue
        files = sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            logger.warning("folder %s: class %r has no image files; left out", path, name)
        for f in files:
            paths.append(os.path.join(folder, f))
            labels.append(name)
            keys.append(f"{name}/{f}")
    if not paths:
        raise DataError(f"folder {path!r} has no class sub-folders with images ({', '.join(IMAGE_EXTENSIONS)})")
    return FileSource("folder", path, paths, labels, keys=keys, min_class_size=min_class_size, check_files=check_files)


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


def _open_tfrecord(path: str) -> TFRecordSource:
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
        raw = np.concatenate([
            b.numpy() for b in tf.data.TFRecordDataset(files).batch(4096).map(
                lambda r: tf.io.parse_example(r, spec)[FEATURE_LABEL], num_parallel_calls=tf.data.AUTOTUNE)
        ])
    except tf.errors.OpError as err:
        raise DataError(f"cannot read the labels of {path!r}: {err.message}") from err
    unique, counts = np.unique(raw, return_counts=True)
    remap = None if np.array_equal(unique, np.arange(len(unique))) else {int(u): i for i, u in enumerate(unique)}
    return TFRecordSource(path, files, {str(int(u)): i for i, u in enumerate(unique)}, counts, remap)


def detect_format(path: str) -> str:
    """The format of the data at ``path`` (a folder, CSV, TFRecord file or glob).

    Raises:
        DataError: the path does not exist or its format cannot be told.
    """
    if any(c in path for c in "*?[") and not tf.io.gfile.exists(path):
        if tf.io.gfile.glob(path):
            return "tfrecord"
        raise DataError(f"--data {path!r}: no file matches this pattern")
    if not tf.io.gfile.exists(path):
        raise DataError(f"--data {path!r} does not exist")
    if tf.io.gfile.isdir(path):
        names = set(n.rstrip("/") for n in tf.io.gfile.listdir(path))
        if names & {"train.csv", "train_clean.csv"}:
            return "gldv2"
        if TFRECORD_META in names or any(
                tf.io.gfile.glob(os.path.join(path, p)) for p in TFRECORD_PATTERNS):
            return "tfrecord"
        if any(tf.io.gfile.isdir(os.path.join(path, n)) for n in names if not n.startswith(".")):
            return "folder"
        raise DataError(f"cannot tell the format of folder {path!r}: no train.csv, TFRecords or class "
                        "sub-folders; pass --data-format")
    lower = path.lower()
    if lower.endswith(".csv"):
        header, _ = _read_csv(path)
        return "gldv2" if {"landmark_id"} <= set(header) else "csv"
    if ".tfrec" in lower:
        return "tfrecord"
    raise DataError(f"cannot tell the format of {path!r} from its name; pass --data-format {{{','.join(FORMATS[1:])}}}")


def open_source(data: str | None = None, data_format: str | None = None, *, check_files: int = 16,
                images_dir: str | None = None, config: DataConfig | None = None, **overrides) -> TrainSource:
    """Opens and validates training data, cheaply, before any training starts.

    Args:
        data: a path or URI (anything ``tf.io.gfile`` reads); ``None`` or ``"demo"``: the
            built-in demo photos.
        data_format: ``"gldv2"``, ``"csv"``, ``"folder"`` or ``"tfrecord"``; ``None`` detects
            it from the path (a folder with ``train.csv`` is GLDv2, one with ``*.tfrecord``
            shards TFRecord, one with sub-folders an image folder; a ``.csv`` with a
            ``landmark_id`` column GLDv2, else ``path,label``).
        check_files: how many evenly spaced image paths are checked for existence
            (all missing is an error: a wrong root; some missing, a warning).
        images_dir: GLDv2 only: the folder holding ``<a>/<b>/<c>/<id>.jpg``
            (default: ``train/`` beside the CSV).
        config: a :class:`DataConfig` (default: ``DataConfig()``).
        **overrides: :class:`DataConfig` fields to change (``min_class_size=5``,
            ``min_crop_area=0.3``, ...); ``min_class_size`` applies here, the others are
            kept in ``source.config`` for :func:`train_dataset`.

    Returns:
        A :class:`TrainSource`.

    Raises:
        DataError: missing path, unknown or undetectable format, empty data, bad CSV
            columns or rows, TFRecords without the expected features.
        ConfigError: an unknown or invalid DataConfig field.
    """
    resolved = (config or DataConfig()).replace(**overrides)
    source = _open(data, data_format, resolved.min_class_size, check_files, images_dir)
    source.config = resolved.replace(data=data if source.kind != "demo" else None, data_format=source.kind)
    logger.info("opened %s", source.description)
    return source


def _open(data, data_format, min_class_size, check_files, images_dir) -> TrainSource:
    if data is None or data == "demo":
        if data_format not in (None, "demo"):
            raise DataError(f"--data-format {data_format} needs --data PATH (without --data the demo photos are used)")
        return DemoSource()
    if data_format is not None and data_format not in FORMATS:
        raise DataError(f"unknown data format {data_format!r}; expected one of {list(FORMATS)}")
    if data_format in (None, "demo"):
        data_format = detect_format(data)
    elif not tf.io.gfile.exists(data) and not (data_format == "tfrecord" and tf.io.gfile.glob(data)):
        raise DataError(f"--data {data!r} does not exist")
    if data_format == "gldv2":
        source = _open_gldv2(data, min_class_size, check_files, images_dir)
    elif data_format == "csv":
        if tf.io.gfile.isdir(data):
            raise DataError(f"--data-format csv needs a CSV file, {data!r} is a folder")
        source = _open_csv(data, min_class_size, check_files)
    elif data_format == "folder":
        if not tf.io.gfile.isdir(data):
            raise DataError(f"--data-format folder needs a folder, {data!r} is a file")
        source = _open_folder(data, min_class_size, check_files)
    else:
        source = _open_tfrecord(data)
    return source
