"""Opening training data: GLDv2, path/label CSV and class folders, and telling formats apart.

:func:`open_source` validates a path cheaply, before any training starts, and
returns a :class:`~dolg_tf.data.base.TrainSource`: a :class:`FileSource` for
image files, a :class:`~dolg_tf.data.tfrecord.TFRecordSource` for TFRecord
shards, or the built-in photos (:class:`dolg_tf.demo.source.DemoSource`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from dolg_tf.data.base import IndexedSource, TrainSource, logger
from dolg_tf.data.config import FORMATS, DataConfig
from dolg_tf.data.tfrecord import TFRECORD_META, TFRECORD_PATTERNS, open_tfrecord
from dolg_tf.demo.source import DemoSource
from dolg_tf.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


class FileSource(IndexedSource):
    """Images in files: GLDv2, path/label CSV or class folders."""

    def __init__(
        self,
        kind: str,
        location: str,
        paths: Sequence[str],
        raw_labels: Sequence[str],
        keys: Sequence[str] | None = None,
        min_class_size: int = 1,
        check_files: int = 16,
    ):
        self.kind = kind
        super().__init__(
            location, list(keys if keys is not None else paths), list(raw_labels), f"{kind} {location}", min_class_size
        )
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


def _check_some_exist(paths: Sequence[str], count: int, what: str) -> None:
    """Checks up to ``count`` evenly spaced files: all missing means a wrong root, an error."""
    if count <= 0:
        return
    sample = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))})
    missing = [paths[i] for i in sample if not tf.io.gfile.exists(paths[i])]
    if len(missing) == len(sample):
        raise DataError(f"{what}: none of {len(sample)} sampled images exist (e.g. {missing[0]!r}); wrong folder?")
    if missing:
        logger.warning(
            "%s: %d of %d sampled images are missing (e.g. %s); they will be skipped",
            what,
            len(missing),
            len(sample),
            missing[0],
        )


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
    return FileSource(
        "csv",
        path,
        paths,
        [label for _, label in cells],
        keys=[rel for rel, _ in cells],
        min_class_size=min_class_size,
        check_files=check_files,
    )


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
        landmarks = _columns(csv_path, header, rows, ("landmark_id", "images"))
        pairs = [(i, lm) for lm, ids in landmarks for i in ids.split()]
    else:
        pairs = [(i, lm) for i, lm in _columns(csv_path, header, rows, ("id", "landmark_id"))]
    bad = next((i for i, _ in pairs if not _GLDV2_ID.fullmatch(i)), None)
    if bad is not None:
        raise DataError(f"GLDv2 CSV {csv_path!r}: image id {bad!r} is not a GLDv2 id (3+ letters/digits)")
    images = images.rstrip("/")
    paths = [f"{images}/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i, _ in pairs]  # "/" also in gs:// URIs
    return FileSource(
        "gldv2",
        csv_path,
        paths,
        [lm for _, lm in pairs],
        keys=[i for i, _ in pairs],
        min_class_size=min_class_size,
        check_files=check_files,
    )


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


def detect_format(path: str) -> str:
    """The format of the data at ``path`` (a folder, CSV, TFRecord file or glob).

    Raises:
        DataError: the path does not exist or its format cannot be told.
    """
    if any(c in path for c in "*?[") and not tf.io.gfile.exists(path):
        if tf.io.gfile.glob(path):
            return "tfrecord"
        raise DataError(f"data path {path!r}: no file matches this pattern")
    if not tf.io.gfile.exists(path):
        raise DataError(f"data path {path!r} does not exist")
    if tf.io.gfile.isdir(path):
        names = set(n.rstrip("/") for n in tf.io.gfile.listdir(path))
        if names & {"train.csv", "train_clean.csv"}:
            return "gldv2"
        if TFRECORD_META in names or any(tf.io.gfile.glob(os.path.join(path, p)) for p in TFRECORD_PATTERNS):
            return "tfrecord"
        if any(tf.io.gfile.isdir(os.path.join(path, n)) for n in names if not n.startswith(".")):
            return "folder"
        raise DataError(
            f"cannot tell the format of folder {path!r}: no train.csv, TFRecords or class sub-folders; pass data_format"
        )
    lower = path.lower()
    if lower.endswith(".csv"):
        header, _ = _read_csv(path)
        return "gldv2" if {"landmark_id"} <= set(header) else "csv"
    if ".tfrec" in lower:
        return "tfrecord"
    raise DataError(f"cannot tell the format of {path!r} from its name; pass data_format, one of {list(FORMATS[1:])}")


def open_source(
    data: str | None = None,
    data_format: str | None = None,
    *,
    check_files: int = 16,
    images_dir: str | None = None,
    config: DataConfig | None = None,
    **overrides,
) -> TrainSource:
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
            raise DataError(f"data_format={data_format!r} needs a data path (without one, the demo photos are used)")
        return DemoSource()
    if data_format is not None and data_format not in FORMATS:
        raise DataError(f"unknown data format {data_format!r}; expected one of {list(FORMATS)}")
    if data_format in (None, "demo"):
        data_format = detect_format(data)
    elif not tf.io.gfile.exists(data) and not (data_format == "tfrecord" and tf.io.gfile.glob(data)):
        raise DataError(f"data path {data!r} does not exist")
    if data_format == "gldv2":
        source = _open_gldv2(data, min_class_size, check_files, images_dir)
    elif data_format == "csv":
        if tf.io.gfile.isdir(data):
            raise DataError(f"data_format='csv' needs a CSV file, {data!r} is a folder")
        source = _open_csv(data, min_class_size, check_files)
    elif data_format == "folder":
        if not tf.io.gfile.isdir(data):
            raise DataError(f"data_format='folder' needs a folder, {data!r} is a file")
        source = _open_folder(data, min_class_size, check_files)
    else:
        source = open_tfrecord(data)
    return source
