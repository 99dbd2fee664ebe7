"""``dolg evaluate``: Revisited Oxford / Paris (or your own revisitop-format dataset) mAP (E / M / H) and mP@k.

The embeddings come from one source: a ``.keras`` model run in-process
(``--model``), an exported SavedModel run in-process (``--saved-model``) or a
TF Serving server (``--server``), both through :mod:`dolg_tf.client`, or
embeddings saved by an earlier run (``--embeddings``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from dolg_tf.cli._common import (
    add_client_arguments,
    import_tensorflow_quietly,
    non_negative_float,
    parse_kappas,
    parse_scales,
    positive_int,
)
from dolg_tf.errors import DataError
from dolg_tf.fileio import atomic_write_json


def _keras_embed_fn(path: str, scales):
    """In-process embedding with a ``.keras`` DOLG model, one image per call (sizes differ)."""
    import numpy as np
    import tensorflow as tf

    from dolg_tf.model import load_dolg, multiscale_embed

    model = load_dolg(path)
    embed = tf.function(
        lambda x: multiscale_embed(model, x, scales),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
        reduce_retracing=True,
    )
    return lambda images: np.concatenate([embed(tf.constant(im[None], tf.float32)).numpy() for im in images])


def _client(args: argparse.Namespace):
    """A :class:`dolg_tf.client.Client` for ``--server`` or ``--saved-model`` (imported only here)."""
    from dolg_tf.cli._common import client_from_args

    return client_from_args(args, saved_model=args.saved_model, batch_size=args.batch_size)


def _rank(query_emb, db_emb, args: argparse.Namespace):
    """revisitop-layout ranks (db, queries), with optional DBA and alpha-QE on an exact index."""
    import numpy as np

    from dolg_tf.evaluate import ranks_from_embeddings

    if args.qe is None and args.dba is None:
        return ranks_from_embeddings(query_emb, db_emb)
    from dolg_tf.index import Index

    index = Index(db_emb.shape[1], "flat")
    index.add(db_emb)  # ids 0..N-1 = database positions
    if args.dba is not None:
        index = index.augmented(args.dba, args.dba_alpha)
    _, positions = index.search(query_emb, index.ntotal, qe_alpha=args.qe, qe_neighbours=args.qe_n)
    return np.ascontiguousarray(positions.T)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dolg_tf import embeddings
    from dolg_tf.evaluate import embed_revisited, load_revisited, revisited_map

    data = load_revisited(args.data, args.dataset)
    if args.model or args.saved_model:
        import_tensorflow_quietly()
    t0 = time.perf_counter()
    if args.embeddings:
        query_emb = embeddings.read_embeddings(os.path.join(args.embeddings, "queries.npy"), name="--embeddings")
        db_emb = embeddings.read_embeddings(os.path.join(args.embeddings, "db.npy"), name="--embeddings")
        if query_emb.shape[0] != len(data.qimlist) or db_emb.shape[0] != len(data.imlist):
            raise DataError(
                f"{args.embeddings}: {query_emb.shape[0]} query and {db_emb.shape[0]} database embeddings, "
                f"but {data.name} has {len(data.qimlist)} queries and {len(data.imlist)} images"
            )
        source = f"embeddings {os.path.abspath(args.embeddings)}"
    else:
        options = dict(batch_size=args.batch_size, max_side=args.max_side, progress=not args.no_progress)
        if args.model:
            source = f"model {os.path.abspath(args.model)}"
            query_emb, db_emb = embed_revisited(data, _keras_embed_fn(args.model, args.scales), **options)
        else:
            client = _client(args)
            source = (
                f"saved_model {os.path.abspath(args.saved_model)}"
                if args.saved_model
                else f"server {client.target} ({args.protocol})"
            )
            with client:
                client.check()
                query_emb, db_emb = embed_revisited(
                    data, lambda images: client.embed(images, progress=False), **options
                )
        if args.save_embeddings:
            for name, emb in (("queries.npy", query_emb), ("db.npy", db_emb)):
                embeddings.save(os.path.join(args.save_embeddings, name), emb)
    embed_s = time.perf_counter() - t0
    metrics = revisited_map(_rank(query_emb, db_emb, args), data.gnd, args.kappas)
    summary = {
        "dataset": data.name,
        "source": source,
        "num_queries": len(data.qimlist),
        "num_images": len(data.imlist),
        "query_expansion": None if args.qe is None else {"alpha": args.qe, "neighbours": args.qe_n},
        "dba": None if args.dba is None else {"neighbours": args.dba, "alpha": args.dba_alpha},
        "embed_s": round(embed_s, 2),
        **{setup: {k: round(v, 6) for k, v in m.items()} for setup, m in metrics.items()},
    }
    if args.out:
        summary["out"] = os.path.abspath(args.out)
        atomic_write_json(args.out, summary, indent=2)
    print(json.dumps(summary))
    ks = ", ".join(f"mP@{k}" for k in args.kappas)
    print(
        f"{data.name} ({source}): mAP E {100 * metrics['easy']['mAP']:.2f}, M {100 * metrics['medium']['mAP']:.2f}, "
        f"H {100 * metrics['hard']['mAP']:.2f}; {ks} M "
        + "/".join(f"{100 * metrics['medium'][f'mP@{k}']:.2f}" for k in args.kappas)
    )
    return 0


def register(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="Revisited Oxford/Paris (or your own revisitop-format dataset) mAP (E/M/H) and mP@k",
        description="Evaluates on ROxford5k / RParis6k laid out as the revisitop download: "
        "ROOT/<dataset>/jpg/*.jpg and ROOT/<dataset>/gnd_<dataset>.pkl (read with a restricted unpickler) "
        "or gnd_<dataset>.json (preferred). Any other dataset name is a dataset of your own in the same "
        "layout (docs/evaluation.md gives the JSON ground-truth schema). Queries are cropped "
        "to their bounding box.",
    )
    ev.add_argument(
        "--data", required=True, metavar="ROOT", help="folder holding <dataset>/jpg and <dataset>/gnd_<dataset>.pkl"
    )
    ev.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help="roxford5k, rparis6k, or the folder name of your own revisitop-format dataset",
    )
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a .keras DOLG model, run in-process")
    source.add_argument(
        "--saved-model", metavar="DIR", help="an exported SavedModel (version or base dir), run in-process"
    )
    source.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="a TF Serving / dolg serve address, e.g. localhost:8500 (gRPC) or, with --protocol rest, localhost:8501",
    )
    source.add_argument("--embeddings", metavar="DIR", help="DIR/queries.npy and DIR/db.npy from --save-embeddings")
    add_client_arguments(ev, server_flag=False)
    ev.add_argument("--scales", type=parse_scales, default=(0.7071, 1.0, 1.4142), help="with --model: inference scales")
    ev.add_argument("--batch-size", type=positive_int, default=8, help="images per embedding call (default: 8)")
    ev.add_argument(
        "--max-side", type=positive_int, default=None, help="shrink images to this longer side (default: as is)"
    )
    ev.add_argument("--kappas", type=parse_kappas, default=(1, 5, 10), help="k of mP@k (default: 1,5,10)")
    ev.add_argument("--qe", type=non_negative_float, default=None, metavar="ALPHA", help="alpha query expansion")
    ev.add_argument("--qe-n", type=positive_int, default=2, help="neighbours for query expansion (default: 2)")
    ev.add_argument(
        "--dba", type=positive_int, default=None, metavar="N", help="database-side augmentation, N neighbours"
    )
    ev.add_argument("--dba-alpha", type=non_negative_float, default=3.0, help="DBA weight exponent (default: 3)")
    ev.add_argument("--save-embeddings", metavar="DIR", help="write DIR/queries.npy and DIR/db.npy for later runs")
    ev.add_argument("--out", help="write the metrics as JSON here")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_evaluate)
