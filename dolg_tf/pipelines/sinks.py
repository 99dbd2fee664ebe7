"""Outputs of a batch run: Parquet shards of embeddings, JSONL shards of dead letters, a summary.

Rows go to shards by a hash of their id, and each shard is sorted by id, so the
same input gives byte-identical shards on every run and runner, whatever order
the workers finished in. The number of shards follows from the row count
(``rows_per_shard``). Each file is written under a temporary name and renamed
when complete; the summary ``dolg_embed_batch.json`` is written last, so its
presence means the run finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

EMBEDDINGS = "embeddings"
ERRORS = "errors"
MILVUS = "milvus"
SUMMARY_FILE = "dolg_embed_batch.json"
SUMMARY_FORMAT = "dolg_tf.embed_batch/1"


def join(folder: str, name: str) -> str:
    return FileSystems.join(folder, name) if "://" in folder else posixpath.join(folder, name)


def num_shards(rows: int, rows_per_shard: int) -> int:
    return max(1, math.ceil(rows / rows_per_shard))


def shard_of(key: str, shards: int) -> int:
    """A shard index that depends on the id only (not on Python's per-process string hash)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def shard_name(kind: str, shard: int, shards: int) -> str:
    ext = "parquet" if kind == EMBEDDINGS else "jsonl"
    return f"{kind}-{shard:05d}-of-{shards:05d}.{ext}"


def write_file(path: str, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, then renames it to ``path``."""
    folder, name = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = join(folder, f".{name}.tmp-{uuid.uuid4().hex[:12]}") if folder else f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            write(f)
        FileSystems.rename([tmp], [path])
    except BaseException:
        try:
            FileSystems.delete([tmp])
        except Exception:  # already renamed or never created
            pass
        raise


def parquet_schema(dim: int, metadata: dict[str, str]):
    import pyarrow as pa

    return pa.schema(
        [pa.field("id", pa.string(), nullable=False), pa.field("embedding", pa.list_(pa.float32()), nullable=False)],
        metadata=metadata,
    )


def write_parquet(path: str, ids: list[str], vectors: list[bytes], dim: int, metadata: dict[str, str]) -> None:
    """Writes ``id`` (string) and ``embedding`` (list<float32>) columns with ``metadata`` in the file's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = np.frombuffer(b"".join(vectors), dtype=np.float32) if vectors else np.zeros(0, np.float32)
    offsets = pa.array(np.arange(len(ids) + 1, dtype=np.int32) * dim, pa.int32())
    embedding = pa.ListArray.from_arrays(offsets, pa.array(flat, pa.float32()))
    table = pa.Table.from_arrays([pa.array(ids, pa.string()), embedding], schema=parquet_schema(dim, metadata))
    write_file(path, lambda f: pq.write_table(table, f))


def write_jsonl(path: str, rows: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    write_file(path, lambda f: f.write(data))


class KeyByShard(beam.DoFn):
    """``row`` -> ``(shard, row)``; ``row[0]`` (embeddings) or ``row["id"]`` (dead letters) is the id."""

    def __init__(self, rows_per_shard: int):
        self._rows_per_shard = rows_per_shard

    def process(self, row, total: int):
        key = row["id"] if isinstance(row, dict) else row[0]
        yield shard_of(key, num_shards(total, self._rows_per_shard)), row


def unique_sorted(rows) -> tuple[list[str], list[bytes], int]:
    """``[(id, vector bytes)]`` -> sorted ids, their vectors, and how many repeated ids were dropped.

    An id seen twice (the same TFRecord key in two records) keeps the row whose vector
    bytes sort first, so the choice is the same on every run.
    """
    ids, vectors, last, duplicates = [], [], None, 0
    for key, vec in sorted(rows):
        if key == last:
            duplicates += 1
            continue
        ids.append(key)
        vectors.append(vec)
        last = key
    return ids, vectors, duplicates


class WriteEmbeddingShard(beam.DoFn):
    """``(shard, [(id, float32 bytes)])`` -> one sorted Parquet file; yields ``(kind, file, rows, duplicates)``."""

    def __init__(self, out_dir: str, dim: int, metadata: dict[str, str], rows_per_shard: int):
        self._out, self._dim, self._meta, self._rows_per_shard = out_dir, dim, metadata, rows_per_shard

    def process(self, element, total: int):
        shard, rows = element
        ids, vectors, duplicates = unique_sorted(rows)
        name = shard_name(EMBEDDINGS, shard, num_shards(total, self._rows_per_shard))
        write_parquet(join(self._out, name), ids, vectors, self._dim, self._meta)
        yield EMBEDDINGS, name, len(ids), duplicates


class WriteMilvusShard(beam.DoFn):
    """``(shard, [(id, float32 bytes)])`` -> the rows upserted into a Milvus collection
    (:class:`dolg_tf.index.milvus.MilvusIndex`, string ids): the shard's ids are deleted,
    then added, so a re-run (or a retried bundle) leaves one row per id. Yields
    ``("milvus", collection, rows, 0)``.
    """

    def __init__(self, uri: str, collection: str):
        self._uri, self._collection = uri, collection
        self._index = None

    def setup(self):
        from dolg_tf.index.milvus import MilvusIndex

        self._index = MilvusIndex.open(self._uri, self._collection)

    def process(self, element):
        _, rows = element
        ids, vectors, _ = unique_sorted(rows)
        if ids:
            matrix = np.frombuffer(b"".join(vectors), dtype=np.float32).reshape(len(ids), -1)
            self._index.delete(ids)
            self._index.add(matrix, ids)
        yield MILVUS, self._collection, len(ids), 0

    def teardown(self):
        if self._index is not None:
            self._index.close()  # Milvus Lite: unlocks the .db file
            self._index = None


class WriteErrorShard(beam.DoFn):
    """``(shard, [dead-letter dicts])`` -> one JSONL file sorted by (id, path, error)."""

    def __init__(self, out_dir: str, rows_per_shard: int):
        self._out, self._rows_per_shard = out_dir, rows_per_shard

    def process(self, element, total: int):
        shard, rows = element
        rows = sorted(rows, key=lambda r: (r["id"], r["path"], r["error"]))
        name = shard_name(ERRORS, shard, num_shards(total, self._rows_per_shard))
        write_jsonl(join(self._out, name), rows)
        yield ERRORS, name, len(rows), 0


class Finalize(beam.DoFn):
    """Runs once after every shard is written: writes an empty shard for an empty output
    (so ``embeddings-*.parquet`` always carries the schema and metadata), then the summary."""

    def __init__(self, out_dir: str, dim: int, metadata: dict[str, str], facts: dict):
        self._out, self._dim, self._meta, self._facts = out_dir, dim, metadata, facts

    def process(self, written: list):
        files = {EMBEDDINGS: [], ERRORS: []}
        rows = {EMBEDDINGS: 0, ERRORS: 0, MILVUS: 0}
        duplicates = 0
        for kind, name, count, dups in written:
            rows[kind] += count
            if kind in files:
                files[kind].append(name)
                duplicates += dups
        if not files[EMBEDDINGS]:
            name = shard_name(EMBEDDINGS, 0, 1)
            write_parquet(join(self._out, name), [], [], self._dim, self._meta)
            files[EMBEDDINGS].append(name)
        if not files[ERRORS]:
            name = shard_name(ERRORS, 0, 1)
            write_jsonl(join(self._out, name), [])
            files[ERRORS].append(name)
        summary = {
            "format": SUMMARY_FORMAT,
            **self._facts,
            "embedded": rows[EMBEDDINGS],
            "errors": rows[ERRORS],
            "duplicate_ids_dropped": duplicates,
            "embedding_files": sorted(files[EMBEDDINGS]),
            "error_files": sorted(files[ERRORS]),
        }
        if "milvus" in self._facts:
            summary["milvus"] = {**self._facts["milvus"], "rows": rows[MILVUS]}
        data = (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode("utf-8")
        write_file(join(self._out, SUMMARY_FILE), lambda f: f.write(data))
        yield summary
