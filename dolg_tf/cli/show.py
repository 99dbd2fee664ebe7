"""``dolg show``: a PNG grid of each query with its top-k results and scores.

Reads the JSON written by ``dolg index search``; ids are resolved as paths
relative to ``--query-root`` / ``--gallery-root`` (the ids ``dolg embed``
writes for a folder). With ``--correct-by parent`` a result is framed green
when it sits in the same sub-folder (class) as its query and red otherwise.
"""

from __future__ import annotations

import argparse
import json
import os

from dolg_tf.errors import DataError


def _open_image(root: str, item_id, what: str):
    from PIL import Image

    path = os.path.join(root, str(item_id))
    try:
        with Image.open(path) as image:  # Pillow refuses decompression bombs (MAX_IMAGE_PIXELS)
            image.thumbnail((512, 512))
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"{what} image {path!r} does not exist (is --{what}-root right?)") from err
    except (OSError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read {what} image {path!r}: {err}") from err


def _class_of(item_id) -> str:
    return os.path.dirname(str(item_id))


def _cmd_show(args: argparse.Namespace) -> int:
    from dolg_tf.visualize import Hit, results_grid, save_png

    try:
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)["results"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{args.results!r} is not a results file from `dolg index search`: {err}") from err
    if not results:
        raise DataError(f"{args.results!r} has no queries")
    results = results[: args.max_queries]
    queries, hits = [], []
    for row in results:
        queries.append(_open_image(args.query_root, row["query"], "query"))
        row_hits = []
        for item_id, score in list(zip(row["ids"], row["scores"]))[: args.k]:
            if item_id is None or item_id == -1:
                continue  # faiss pads short result lists
            correct = _class_of(item_id) == _class_of(row["query"]) if args.correct_by == "parent" else None
            caption = os.path.basename(os.path.dirname(str(item_id))) or str(item_id)
            row_hits.append(Hit(_open_image(args.gallery_root, item_id, "gallery"), float(score), caption, correct))
        hits.append(row_hits)
    grid = results_grid(
        queries,
        hits,
        cell=args.cell,
        query_captions=[_class_of(r["query"]) or str(r["query"]) for r in results],
        title=args.title,
    )
    out = os.path.abspath(args.out)
    save_png(grid, out)
    print(json.dumps({"out": out, "queries": len(queries), "k": args.k, "size": list(grid.size)}))
    return 0


def register(sub) -> None:
    p = sub.add_parser("show", help="draw each query with its top-k results and scores as a PNG grid")
    p.add_argument("--results", required=True, help="JSON from `dolg index search`")
    p.add_argument("--query-root", default=".", help="folder the query ids are relative to")
    p.add_argument("--gallery-root", default=".", help="folder the gallery ids are relative to")
    p.add_argument("--out", default="results.png", help="PNG to write (default: results.png)")
    p.add_argument("-k", type=int, default=5, help="results per query to draw (default: 5)")
    p.add_argument("--max-queries", type=int, default=20, help="rows to draw (default: 20)")
    p.add_argument("--cell", type=int, default=128, help="cell size in pixels (default: 128)")
    p.add_argument(
        "--correct-by",
        choices=["none", "parent"],
        default="none",
        help="'parent': a result is correct when it is in the query's sub-folder",
    )
    p.add_argument("--title", default=None, help="a line of text at the top")
    p.set_defaults(func=_cmd_show)
