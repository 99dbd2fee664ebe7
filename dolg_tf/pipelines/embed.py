"""``embed_batch``: images -> the export's ``serving_default`` through Beam RunInference -> Parquet shards.

The pipeline::

    inputs (folders, globs, CSV, TFRecords)
      -> (id, path) references, merged by id -> read (bounded) ---\\
      -> TFRecord records ------------------------------------------> validate (size, header,
                                                                       pixels, full decode)
      -> RunInference(KeyedModelHandler(SavedModelHandler))          -> dead letters
      -> rows hashed into shards, sorted by id -> embeddings-*.parquet    -> errors-*.jsonl
      -> dolg_embed_batch.json (the summary, written last)

It runs on any Beam runner. The default is Beam's in-process ``FnApiRunner``, named
explicitly: Beam's ``DirectRunner`` first tries the Prism runner, which downloads a
binary (and so fails offline).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from dolg_tf.errors import ConfigError, DataError
from dolg_tf.pipelines import sinks, sources
from dolg_tf.pipelines.model import ExportInfo, ImageRejected, SavedModelHandler, describe_export

log = logging.getLogger(__name__)

DEFAULT_RUNNER = "FnApiRunner"
ROWS_PER_SHARD = 100_000
ERROR_ROWS_PER_SHARD = 1_000_000


class ToRows(beam.DoFn):
    """``((id, path), PredictionResult)`` -> ``(id, float32 bytes)``.

    Or a dead letter if the model refused the image.
    """

    def __init__(self, dim: int):
        self._dim = dim

    def process(self, element):
        (key, path), result = element
        if isinstance(result.inference, ImageRejected):
            yield beam.pvalue.TaggedOutput(
                sources.DEAD, {"id": key, "path": path, "error": f"the model refused it: {result.inference}"}
            )
            return
        vector = np.asarray(result.inference, dtype=np.float32)
        if vector.shape != (self._dim,):
            raise DataError(f"the model returned an embedding of shape {vector.shape}, expected ({self._dim},)")
        yield key, vector.tobytes()


def pipeline_options(runner: str, beam_args: Sequence[str]) -> PipelineOptions:
    """Beam options from ``--runner`` and the pass-through flags.

    Raises:
        ConfigError: a flag no Beam options class knows (a typo would otherwise be
            dropped silently by Beam).
    """
    flags = [f"--runner={runner}", *beam_args]
    options = PipelineOptions(flags)
    known = options.get_all_options(drop_default=False, retain_unknown_options=False)
    everything = options.get_all_options(drop_default=False, retain_unknown_options=True)
    unknown = sorted(set(everything) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown Beam pipeline option(s) {', '.join('--' + u for u in unknown)}: not an option of "
            "dolg embed-batch nor of any Beam PipelineOptions class (apache_beam.options.pipeline_options); "
            "check the spelling, and write Beam options as --name=value"
        )
    return options


def prepare_milvus(uri: str, collection: str, dim: int, kind: str = "HNSW") -> str:
    """Opens the Milvus collection, or creates it (string ids, ``kind`` index) when it does not exist.

    Returns:
        ``"created"`` or ``"opened"``.

    Raises:
        ConfigError: the collection exists with another dimension or integer ids.
        DataError: Milvus cannot be reached (from :mod:`dolg_tf.index.milvus`).
    """
    from dolg_tf.errors import IndexFileError
    from dolg_tf.index.milvus import MilvusIndex

    try:
        index, what = MilvusIndex.open(uri, collection), "opened"
    except IndexFileError:
        index, what = MilvusIndex.create(uri, collection, dim, kind, id_type="str"), "created"
    try:
        if index.dim != dim or index.id_type != "str":
            raise ConfigError(
                f"Milvus collection {collection!r} at {uri!r} holds {index.dim}-d vectors with {index.id_type} ids; "
                f"dolg embed-batch writes {dim}-d vectors with string ids: give another milvus_collection"
            )
    finally:
        index.close()  # Milvus Lite: unlocks the .db file for the pipeline's writer
    return what


def check_out_dir(out: str) -> None:
    """Refuses an output folder that already holds files, and creates a missing local one.

    Raises:
        DataError: ``out`` exists and is not empty, or is a file.
    """
    if "://" in out:
        existing = FileSystems.match([sinks.join(out.rstrip("/"), "*")])[0].metadata_list
        if existing:
            raise DataError(f"out {out!r} already holds files; give a new folder (runs never overwrite or mix outputs)")
        return
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise DataError(f"out {out!r} is a file; give a folder")
        if os.listdir(out):
            raise DataError(
                f"out {out!r} is not empty; give a new folder or remove this one (runs never overwrite or mix outputs)"
            )
    os.makedirs(out, exist_ok=True)


def build_pipeline(
    pipeline: beam.Pipeline,
    specs: list[sources.InputSpec],
    info: ExportInfo,
    out: str,
    *,
    batch_size: int,
    rows_per_shard: int = ROWS_PER_SHARD,
    facts: dict | None = None,
    milvus: dict | None = None,
):
    """Adds the whole batch job to ``pipeline``; returns the summary PCollection (one dict).

    ``milvus``: ``{"uri", "collection"}`` of an existing collection (see :func:`prepare_milvus`)
    that the rows are also upserted into.
    """
    records, dead = sources.read_inputs(pipeline, specs, info.max_image_bytes)
    checked = sources.pcoll_list(pipeline, records, "AllRecords") | "Validate" >> beam.ParDo(
        sources.ValidateImage(info.max_image_bytes, info.max_image_pixels)
    ).with_outputs(sources.DEAD, main="ok")
    dead.append(checked[sources.DEAD])
    handler = KeyedModelHandler(SavedModelHandler(info.directory, info.signature_name, batch_size))
    rows = (
        checked.ok
        | "RunInference" >> RunInference(handler)
        | "ToRows" >> beam.ParDo(ToRows(info.embedding_dim)).with_outputs(sources.DEAD, main="rows")
    )
    dead.append(rows[sources.DEAD])
    embeddings = rows.rows
    errors = sources.pcoll_list(pipeline, dead, "AllDeadLetters")

    metadata = info.parquet_metadata()
    n_rows = beam.pvalue.AsSingleton(embeddings | "CountRows" >> beam.combiners.Count.Globally())
    n_errors = beam.pvalue.AsSingleton(errors | "CountErrors" >> beam.combiners.Count.Globally())
    grouped = (
        embeddings
        | "ShardRows" >> beam.ParDo(sinks.KeyByShard(rows_per_shard), n_rows)
        | "GroupRows" >> beam.GroupByKey()
    )
    written = [
        grouped
        | "WriteParquet"
        >> beam.ParDo(sinks.WriteEmbeddingShard(out, info.embedding_dim, metadata, rows_per_shard), n_rows)
    ]
    if milvus is not None:
        written.append(
            grouped | "WriteMilvus" >> beam.ParDo(sinks.WriteMilvusShard(milvus["uri"], milvus["collection"]))
        )
    written_errors = (
        errors
        | "ShardErrors" >> beam.ParDo(sinks.KeyByShard(ERROR_ROWS_PER_SHARD), n_errors)
        | "GroupErrors" >> beam.GroupByKey()
        | "WriteErrors" >> beam.ParDo(sinks.WriteErrorShard(out, ERROR_ROWS_PER_SHARD), n_errors)
    )
    return (
        (*written, written_errors)
        | "AllWritten" >> beam.Flatten()
        | "ListWritten" >> beam.combiners.ToList()
        | "Finalize" >> beam.ParDo(sinks.Finalize(out, info.embedding_dim, metadata, facts or {}))
    )


def embed_batch(
    inputs: Sequence[str],
    saved_model: str,
    out: str,
    *,
    runner: str = DEFAULT_RUNNER,
    beam_args: Sequence[str] = (),
    model_name: str | None = None,
    batch_size: int | None = None,
    rows_per_shard: int = ROWS_PER_SHARD,
    milvus_uri: str | None = None,
    milvus_collection: str | None = None,
    milvus_kind: str = "HNSW",
) -> dict:
    """Embeds every input image with an export and writes Parquet shards + dead letters to ``out``.

    Args:
        inputs: folders, globs, ``.csv`` files of ``id,path`` and TFRecord patterns
            (local or any Beam file system: ``gs://``, ``s3://`` with Beam's extras).
        saved_model: an export's base path (the newest version is used) or a version
            directory. On a distributed runner, a path the workers can read (``gs://``).
        out: the output folder; must be new or empty.
        runner: a Beam runner name (default: the in-process ``FnApiRunner``).
        beam_args: more Beam pipeline flags (``--num_workers=8``, ``--project=...``).
        model_name: the name recorded in the metadata (default: the base path's name).
        batch_size: images per model call (default and maximum: the export's
            ``max_batch_size``).
        rows_per_shard: rows per Parquet file (the shard count follows from the total).
        milvus_uri: also upsert the rows into a Milvus collection here: ``http://host:19530``
            or a Milvus Lite ``.db`` path (in-process runner only: the file is locked by one process).
        milvus_collection: that collection's name (created with string ids and a
            ``milvus_kind`` index if missing).

    Returns:
        The run summary (also written to ``out/dolg_embed_batch.json``) plus ``seconds``.

    Raises:
        DataError: bad inputs, or a non-empty ``out``.
        ExportError: ``saved_model`` is not a dolg_tf export.
        ConfigError: a bad batch size / shard size, or an unknown Beam flag.
    """
    options = pipeline_options(runner, beam_args)
    try:
        pipeline = beam.Pipeline(options=options)
    except ValueError as err:  # Beam's answer to an unknown runner name
        raise ConfigError(f"runner {runner!r}: {err}") from None
    info = describe_export(saved_model, model_name)
    if batch_size is None:
        batch_size = info.max_batch_size
    if not 1 <= batch_size <= info.max_batch_size:
        raise ConfigError(
            f"batch_size must be in [1, {info.max_batch_size}] (the export's max_batch_size), got {batch_size}"
        )
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be a positive integer, got {rows_per_shard}")
    try:
        specs = sources.classify_inputs(list(inputs))
    except DataError as err:
        hint = " (Beam options take the form --name=value)" if beam_args else ""
        raise DataError(f"{err}{hint}") from None
    if (milvus_uri is None) != (milvus_collection is None):
        raise ConfigError("give both milvus_uri and milvus_collection, or neither")
    out = out.rstrip("/") or "/"
    check_out_dir(out)
    milvus = None
    if milvus_uri is not None:
        state = prepare_milvus(milvus_uri, milvus_collection, info.embedding_dim, milvus_kind)
        milvus = {"uri": milvus_uri, "collection": milvus_collection}
        log.info("Milvus collection %r at %s %s", milvus_collection, milvus_uri, state)
    facts = {
        "model_name": info.model_name,
        "model_version": info.version,
        "fingerprint": info.fingerprint,
        "embedding_dim": info.embedding_dim,
        "saved_model": info.directory,
        "inputs": list(inputs),
        "batch_size": batch_size,
    }
    if milvus is not None:
        facts["milvus"] = milvus
    t0 = time.perf_counter()
    build_pipeline(
        pipeline, specs, info, out, batch_size=batch_size, rows_per_shard=rows_per_shard, facts=facts, milvus=milvus
    )
    try:
        state = pipeline.run().wait_until_finish()
    except Exception as err:  # a worker's exception, re-raised by the runner with Beam's context
        log.debug("the Beam pipeline failed", exc_info=True)
        raise DataError(f"the Beam pipeline failed: {str(err).strip().splitlines()[-1][:2000]}") from err
    seconds = time.perf_counter() - t0
    if state != beam.runners.runner.PipelineState.DONE:
        raise DataError(f"the Beam pipeline ended in state {state}")
    with FileSystems.open(sinks.join(out, sinks.SUMMARY_FILE)) as f:
        summary = json.loads(f.read().decode("utf-8"))
    summary["seconds"] = round(seconds, 3)
    return summary
