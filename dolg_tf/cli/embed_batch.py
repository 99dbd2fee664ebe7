"""``dolg embed-batch``: embed a gallery as a Beam batch job (RunInference) -> Parquet shards.

Usage::

    dolg embed-batch INPUT... --saved-model PATH --out DIR [--runner NAME] [Beam options]

INPUT, mixed freely (local paths, or gs:// / s3:// with Beam's file system extras):

* a folder: every .jpg .jpeg .png .gif .bmp .webp file below it (hidden files and
  folders skipped); ids are the paths relative to the folder (prefixed with the
  folder when several inputs are given), as `dolg embed` does;
* a glob (quote it: 'photos/*/*.jpg'): ids are the matched paths;
* a .csv of id,path (an `id,path` header row is optional; relative paths are
  taken from the CSV's folder);
* TFRecords of encoded images ('shards/train-*.tfrecord', the layout of
  `dolg data to-tfrecord`: image/encoded, image/key); ids are image/key.

PATH is an export's base path (its newest version) or a version directory.
DIR must be new or empty: a run never overwrites or mixes with older output. It
receives embeddings-SSSSS-of-NNNNN.parquet (columns id: string, embedding:
list<float32>; the model name, version and SavedModel fingerprint in the file
metadata), errors-SSSSS-of-NNNNN.jsonl (one {"id", "path", "error"} per image
that could not be read, decoded or embedded; these never fail the run) and
dolg_embed_batch.json (the summary, written last). Rows are sharded by a hash of
the id and sorted by id: a re-run over the same input writes the same files.

With --milvus-uri URI --milvus-collection NAME the rows are also upserted into
that Milvus collection (created with string ids and a --milvus-kind index if it
does not exist; a re-run replaces the rows of the same ids), searchable with
`dolg index search --backend milvus`.

The runner defaults to Beam's in-process FnApiRunner. Every other flag goes to
Beam as a pipeline option, written --name=value, e.g. --runner DataflowRunner
--project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py, or
--direct_num_workers=4 --direct_running_mode=multi_processing locally.
"""

from __future__ import annotations

import argparse
import json
import sys

from dolg_tf.cli._common import positive_int


def _cmd_embed_batch(args: argparse.Namespace) -> int:
    try:
        from dolg_tf.pipelines import embed_batch
    except ImportError as err:
        from dolg_tf.errors import ConfigError

        raise ConfigError(f"dolg embed-batch needs Apache Beam: pip install 'dolg-tf[beam]' ({err})") from None

    summary = embed_batch(
        args.inputs,
        args.saved_model,
        args.out,
        runner=args.runner,
        beam_args=args.extra_args,
        model_name=args.model_name,
        batch_size=args.batch_size,
        rows_per_shard=args.rows_per_shard,
        milvus_uri=args.milvus_uri,
        milvus_collection=args.milvus_collection,
        milvus_kind=args.milvus_kind,
    )
    print(json.dumps(summary, sort_keys=True))
    seconds = summary["seconds"]
    done = summary["embedded"] + summary["errors"]
    dropped = summary["duplicate_ids_dropped"]
    print(
        f"embedded {summary['embedded']} images, {summary['errors']} errors"
        f"{f', {dropped} duplicate ids dropped' if dropped else ''}"
        f" ({summary['embedding_dim']}-d, {summary['model_name']} v{summary['model_version']}) with {args.runner}"
        f" in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} images/s) -> {args.out}: "
        f"{len(summary['embedding_files'])} embeddings-*.parquet, {len(summary['error_files'])} errors-*.jsonl"
        + (
            f"; {summary['milvus']['rows']} rows upserted into Milvus collection {summary['milvus']['collection']!r}"
            if "milvus" in summary
            else ""
        ),
        file=sys.stderr,
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "embed-batch",
        help="embed folders / globs / CSV / TFRecords as a Beam batch job (RunInference) -> Parquet shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="folders, globs, .csv files of id,path, TFRecord patterns"
    )
    p.add_argument(
        "--saved-model", required=True, metavar="PATH", help="export base path (newest version) or version dir"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--runner", default="FnApiRunner", help="Beam runner (default: FnApiRunner, in-process)")
    p.add_argument("--model-name", default=None, help="model name for the metadata (default: the base path's name)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per model call (default: the export's max_batch_size)",
    )
    p.add_argument(
        "--rows-per-shard", type=positive_int, default=100_000, help="rows per Parquet file (default: 100000)"
    )
    p.add_argument(
        "--milvus-uri",
        default=None,
        metavar="URI",
        help="also upsert the rows into Milvus: http://host:19530 or a Milvus Lite .db",
    )
    p.add_argument(
        "--milvus-collection",
        default=None,
        metavar="NAME",
        help="Milvus collection (created with string ids if missing)",
    )
    p.add_argument(
        "--milvus-kind", default="HNSW", help="index of a new collection: FLAT, IVF_FLAT, HNSW, IVF_PQ (default: HNSW)"
    )
    p.set_defaults(func=_cmd_embed_batch, pass_through=True)
