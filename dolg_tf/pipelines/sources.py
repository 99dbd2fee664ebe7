"""Inputs of a batch run: folders, globs, ``id,path`` CSVs and TFRecords, read through Beam's file systems.

Every input becomes ``(id, path)`` references (folders, globs, CSV rows) or ``(id,
path, bytes)`` records (TFRecords). References with the same id are merged (the
same file matched twice is read once; one id given for two different files is a
dead letter), then read with a size bound checked before the bytes are held.
Every image is checked (size, header, pixel count, a full decode with
TensorFlow's decoder, the export's own) before it reaches the model, so an
unreadable image becomes a dead-letter row ``{"id", "path", "error"}`` instead of
failing its batch.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import posixpath
import re

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from dolg_tf.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
TFRECORD_NAME = re.compile(r".*\.(tfrecords?|tfrec)(-[0-9]+-of-[0-9]+)?(\.gz)?$", re.IGNORECASE)
_GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_CSV_LINE = 1 << 16
DEAD = "dead"  # tag of the dead-letter output


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One command-line input, classified.

    Attributes:
        kind: ``"folder"``, ``"glob"``, ``"csv"`` or ``"tfrecord"``.
        pattern: the Beam file pattern to match (a folder becomes ``folder/**``).
        base: folder that relative paths are taken from (folder inputs: the folder;
            CSV: the CSV's folder).
        id_prefix: prepended to the relative path of folder inputs when several
            inputs are given (as ``dolg embed`` does), else empty.
    """

    kind: str
    pattern: str
    base: str = ""
    id_prefix: str = ""


def _join(base: str, rel: str) -> str:
    return FileSystems.join(base, rel) if "://" in base else posixpath.join(base, rel)


def classify_inputs(inputs: list[str]) -> list[InputSpec]:
    """Decides what each input is: ``.csv`` -> CSV, a ``*.tfrecord*`` pattern -> TFRecords,
    a folder (local, or a remote path ending in ``/``) -> every image below it, else a glob.

    Raises:
        DataError: no input, a local input without wildcards that does not exist, or a
            folder / glob / TFRecord pattern that matches no file.
    """
    if not inputs:
        raise DataError("give at least one input (folder, glob, .csv of id,path, or TFRecord pattern)")
    specs = []
    for arg in inputs:
        remote = "://" in arg
        if not remote and not _GLOB_CHARS.search(arg) and not os.path.exists(arg):
            raise DataError(f"no such file or folder: {arg!r}")
        name = arg.rstrip("/").rsplit("/", 1)[-1]
        if name.lower().endswith(".csv"):
            base = posixpath.dirname(arg) if remote else os.path.dirname(os.path.abspath(arg))
            specs.append(InputSpec("csv", arg, base=base))
        elif TFRECORD_NAME.fullmatch(name):
            specs.append(InputSpec("tfrecord", arg))
        elif (not remote and os.path.isdir(arg)) or (remote and arg.endswith("/")):
            folder = arg.rstrip("/") or "/"
            prefix = f"{folder}/" if len(inputs) > 1 else ""
            specs.append(InputSpec("folder", _join(folder, "**"), base=folder, id_prefix=prefix))
        else:
            specs.append(InputSpec("glob", arg))
    for spec in specs:
        if spec.kind != "csv" and not _matches_something(spec.pattern):
            raise DataError(f"no file matches {spec.pattern!r}")
    return specs


def _matches_something(pattern: str) -> bool:
    try:
        return bool(FileSystems.match([pattern], [1])[0].metadata_list)
    except Exception as err:  # BeamIOError (or a file system's own error): unreadable, say why
        raise DataError(f"cannot list {pattern!r}: {err}") from None


def csv_has_header(path: str) -> bool:
    """Whether a CSV's first row is the header ``id,path`` (read from the first line only)."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            first = f.readline(_MAX_CSV_LINE).decode("utf-8-sig", errors="replace")
    except OSError as err:
        raise DataError(f"cannot read the CSV {path!r}: {err}") from None
    row = next(csv.reader([first]), [])
    return [c.strip().lower() for c in row] == ["id", "path"]


def tf_error_text(message: str) -> str:
    """The op's own words from a TensorFlow error (no "Graph execution error", stack or node names)."""
    skip = ("Graph execution error", "Detected at node", "File ", "[[")
    lines = [line.strip() for line in message.splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith(skip))
    return re.sub(r"\s*\[\[.*?\]\]|\s*\[Op:[^\]]*\]", "", text).strip() or message.strip()


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


class FolderRefs(beam.DoFn):
    """Matched file metadata of a folder -> ``(id, path)``; ids are paths relative to the folder."""

    def __init__(self, spec: InputSpec):
        self._spec = spec

    def process(self, meta):
        base = self._spec.base.rstrip("/") + "/"
        path = meta.path
        rel = path[len(base) :] if path.startswith(base) else path
        rel = rel.replace("\\", "/")
        if rel.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(rel):
            yield self._spec.id_prefix + rel, path


class GlobRefs(beam.DoFn):
    """Matched file metadata of a glob -> ``(id, path)``; the id is the matched path."""

    def process(self, meta):
        yield meta.path, meta.path


class CsvRefs(beam.DoFn):
    """One CSV line ``id,path`` -> ``(id, path)`` (relative paths from the CSV's folder); bad rows are dead letters."""

    def __init__(self, spec: InputSpec):
        self._spec = spec

    def process(self, line: str):
        if not line.strip():
            return
        try:
            rows = list(csv.reader([line]))
        except csv.Error as err:
            rows, problem = [], str(err)
        else:
            problem = ""
        if len(rows) != 1 or len(rows[0]) != 2 or not rows[0][0].strip() or not rows[0][1].strip():
            what = problem or f"expected 2 fields id,path, got {len(rows[0]) if rows else 0}"
            yield beam.pvalue.TaggedOutput(
                DEAD, {"id": "", "path": self._spec.pattern, "error": f"bad CSV row {line[:200]!r}: {what}"}
            )
            return
        key, path = rows[0][0].strip(), rows[0][1].strip()
        if "://" not in path:  # a local path, or relative to the CSV's folder (local or remote)
            base = self._spec.base
            path = _join(base, path) if "://" in base else posixpath.normpath(posixpath.join(base, path))
        yield key, path


class MergeRefs(beam.DoFn):
    """``(id, [paths])`` -> one ``(id, path)``.

    The same file twice is read once. An id given for different files keeps the
    smallest path (a rule that does not depend on the order workers see the rows);
    each other path is a dead letter naming the one kept.
    """

    def process(self, element):
        key, paths = element
        paths = sorted(set(paths))
        yield key, paths[0]
        for other in paths[1:]:
            yield beam.pvalue.TaggedOutput(
                DEAD, {"id": key, "path": other, "error": f"duplicate id: {key!r} is also given for {paths[0]!r}"}
            )


class ReadImage(beam.DoFn):
    """``(id, path)`` -> ``(id, path, bytes)``, reading at most ``max_bytes + 1`` bytes; failures are dead letters."""

    def __init__(self, max_bytes: int):
        self._max = max_bytes

    def process(self, element):
        key, path = element
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read(self._max + 1)
        except Exception as err:  # any file system's error: missing file, permission, network
            yield beam.pvalue.TaggedOutput(DEAD, {"id": key, "path": path, "error": f"cannot read: {err}"})
            return
        yield key, path, data


class ParseTFRecord(beam.DoFn):
    """``(filename, record)`` -> ``(id, path, bytes)`` from the ``tf.train.Example`` layout of
    :mod:`dolg_tf.data.tfrecord` (``image/encoded``, optional ``image/key``).

    The id is ``image/key``; a record without one gets ``<file>#<first 16 hex digits of the
    record's SHA-256>``, the same on every run.
    """

    def process(self, element):
        from tensorflow.core.example import example_pb2

        from dolg_tf.data.tfrecord import FEATURE_IMAGE, FEATURE_KEY

        filename, record = element
        fallback = f"{filename}#{hashlib.sha256(record).hexdigest()[:16]}"
        try:
            example = example_pb2.Example.FromString(record)
        except Exception as err:  # protobuf's DecodeError
            yield beam.pvalue.TaggedOutput(
                DEAD, {"id": fallback, "path": filename, "error": f"not a tf.train.Example: {err}"}
            )
            return
        feature = example.features.feature
        keys = feature[FEATURE_KEY].bytes_list.value if FEATURE_KEY in feature else []
        key = keys[0].decode("utf-8", errors="replace") if keys and keys[0] else fallback
        images = feature[FEATURE_IMAGE].bytes_list.value if FEATURE_IMAGE in feature else []
        if len(images) != 1:
            yield beam.pvalue.TaggedOutput(
                DEAD,
                {
                    "id": key,
                    "path": filename,
                    "error": f"the record has {len(images)} {FEATURE_IMAGE} values, expected 1",
                },
            )
            return
        yield key, filename, images[0]


class ValidateImage(beam.DoFn):
    """``(id, path, bytes)`` -> ``((id, path), bytes)`` if the export will accept it, else a dead letter.

    The same checks as the export's graph, in the same order: size bounds, a known
    header (JPEG/PNG/GIF/BMP/WebP), the pixel bound read from the header (so a
    decompression bomb is refused without decoding), then a full decode with
    TensorFlow's decoder (truncated and corrupt files fail here).
    """

    def __init__(self, max_bytes: int, max_pixels: int):
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._check = None

    def setup(self):
        import tensorflow as tf

        from dolg_tf.data import images as images_lib

        max_bytes, max_pixels = self._max_bytes, self._max_pixels

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
        def check(data):
            status, _, height, width = images_lib.check_encoded(data, max_bytes, max_pixels)

            def decode():
                image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
                return tf.shape(image, out_type=tf.int64)[:2]

            shape = tf.cond(tf.equal(status, images_lib.OK), decode, lambda: tf.zeros([2], tf.int64))
            return status, height, width, shape

        self._check = check
        self._tf = tf
        self._images = images_lib

    def _problem(self, data: bytes) -> str | None:
        images_lib, tf = self._images, self._tf
        if len(data) == 0:
            return "empty file"
        if len(data) > self._max_bytes:
            return f"over {self._max_bytes} bytes, the export's max_image_bytes"
        try:
            status, height, width, _ = self._check(tf.constant(data))
            status, height, width = int(status), int(height), int(width)
        except tf.errors.OpError as err:
            return f"cannot decode: {tf_error_text(err.message)}"
        if status == images_lib.OK:
            return None
        if status == images_lib.TOO_MANY_PIXELS:
            if height <= 0 or width <= 0:
                return f"the header gives an empty size {height}x{width} (truncated or corrupt image)"
            return f"{height}x{width} = {height * width} pixels, over the export's max_image_pixels {self._max_pixels}"
        return images_lib.SKIP_REASONS.get(status, f"rejected (status {status})")

    def process(self, element):
        key, path, data = element
        problem = self._problem(data)
        if problem is None:
            yield (key, path), data
        else:
            yield beam.pvalue.TaggedOutput(DEAD, {"id": key, "path": path, "error": problem})


def read_inputs(pipeline: beam.Pipeline, specs: list[InputSpec], max_bytes: int):
    """Applies the readers of ``specs`` -> ``(records, dead letters)``; records are ``(id, path, bytes)``."""
    from apache_beam.io import fileio
    from apache_beam.io.tfrecordio import ReadAllFromTFRecord

    refs, dead, records = [], [], []
    for i, spec in enumerate(specs):
        label = f"Input{i}"
        if spec.kind in ("folder", "glob"):
            matched = (
                pipeline
                | f"{label}Pattern" >> beam.Create([spec.pattern])
                | f"{label}Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)  # checked before
            )
            fn = FolderRefs(spec) if spec.kind == "folder" else GlobRefs()
            refs.append(matched | f"{label}Refs" >> beam.ParDo(fn))
        elif spec.kind == "csv":
            header = csv_has_header(spec.pattern)
            out = (
                pipeline
                | f"{label}ReadCsv" >> beam.io.ReadFromText(spec.pattern, skip_header_lines=1 if header else 0)
                | f"{label}CsvRefs" >> beam.ParDo(CsvRefs(spec)).with_outputs(DEAD, main="refs")
            )
            refs.append(out.refs)
            dead.append(out[DEAD])
        else:
            out = (
                pipeline
                | f"{label}Pattern" >> beam.Create([spec.pattern])
                | f"{label}ReadTFRecord" >> ReadAllFromTFRecord(with_filename=True)
                | f"{label}Parse" >> beam.ParDo(ParseTFRecord()).with_outputs(DEAD, main="records")
            )
            records.append(out.records)
            dead.append(out[DEAD])
    if refs:
        merged = (
            refs
            | "AllRefs" >> beam.Flatten()
            | "GroupById" >> beam.GroupByKey()  # also spreads the reads over workers
            | "MergeRefs" >> beam.ParDo(MergeRefs()).with_outputs(DEAD, main="refs")
        )
        dead.append(merged[DEAD])
        read = merged.refs | "ReadImages" >> beam.ParDo(ReadImage(max_bytes)).with_outputs(DEAD, main="records")
        records.append(read.records)
        dead.append(read[DEAD])
    return records, dead


def pcoll_list(pipeline: beam.Pipeline, items: list, label: str):
    """A list of PCollections flattened into one (an empty Create when the list is empty)."""
    if not items:
        return pipeline | label >> beam.Create([])
    return items | label >> beam.Flatten()


__all__ = ["InputSpec", "classify_inputs", "read_inputs", "ValidateImage", "DEAD"]
