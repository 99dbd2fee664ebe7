"""``dolg demo`` (``make demo``): the whole product end to end on the built-in photos.

train (``dolg train``, tiny preset, demo photos) -> export (SavedModel under
``saved_models/dolg/<version>/``) -> ``dolg serve`` in the background ->
``dolg_tf.client`` embeds the gallery over gRPC and the held-out queries over
REST -> faiss index -> search -> mAP / recall@1 -> a PNG grid of results ->
the server is stopped.

Each stage runs the same code a user runs: training and the server are
separate processes started with ``python -m dolg_tf.cli``; embedding goes
through TF Serving's public protocol. The gallery and query images are
written as PNG files under ``<workdir>/gallery/<photo>/`` and
``<workdir>/queries/<photo>/``, so the ids are paths and the result files
can be re-drawn with ``dolg show``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dolg_tf.client import Client
from dolg_tf.demo.photos import demo_retrieval_split
from dolg_tf.errors import DolgError
from dolg_tf.evaluate import label_retrieval_metrics
from dolg_tf.export import list_versions, read_export_metadata
from dolg_tf.index import Index, write_search_results
from dolg_tf.server.process import ServerProcess, cli_command
from dolg_tf.visualize import Hit, results_grid, save_png

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What the end-to-end demo measured and wrote."""

    export_dir: str
    gallery: int
    queries: int
    metrics: dict[str, float]
    untrained_metrics: dict[str, float] | None
    results_json: str
    grid_png: str
    seconds: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] | None = None


def _stream(proc: subprocess.Popen, prefix: str, sink: list[str], echo: bool) -> None:
    for line in proc.stdout:
        sink.append(line)
        if echo:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()


def run_training(train_args: Sequence[str], echo: bool = True) -> dict[str, Any]:
    """Runs ``dolg train`` in a subprocess; returns its JSON summary (the TrainResult)."""
    proc = subprocess.Popen(
        cli_command("train", *train_args), stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1
    )
    lines: list[str] = []
    _stream(proc, "[train] ", lines, echo)
    code = proc.wait()
    if code != 0:
        raise DolgError(f"training failed (exit {code}); its output is above")
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    raise DolgError("training printed no JSON summary")


def write_views(split, root: str) -> tuple[list[str], list[str]]:
    """Writes the demo gallery / query views as PNGs; returns their ids (paths relative to the roots)."""

    def write(images, labels, folder):
        ids, counters = [], {}
        for image, label in zip(images, labels):
            name = split.names[int(label)]
            k = counters.get(name, 0)
            counters[name] = k + 1
            rel = f"{name}/{k}.png"
            os.makedirs(os.path.join(root, folder, name), exist_ok=True)
            Image.fromarray(image).save(os.path.join(root, folder, rel))
            ids.append(rel)
        return ids

    return write(split.gallery, split.gallery_labels, "gallery"), write(split.queries, split.query_labels, "queries")


def run_demo(
    workdir: str = os.path.join("runs", "demo"),
    export_base: str = os.path.join("saved_models", "dolg"),
    train: bool = True,
    train_args: Sequence[str] = (),
    gallery_views: int = 2,
    view_size: int | None = None,
    k: int = 5,
    echo: bool = True,
) -> DemoResult:
    """Runs the end-to-end demo (see the module docstring) and returns what it measured."""
    seconds: dict[str, float] = {}
    os.makedirs(workdir, exist_ok=True)
    training = None
    t0 = time.perf_counter()
    if train:
        training = run_training(
            [
                "--strategy",
                "mirrored",
                "--model-dir",
                os.path.join(workdir, "train"),
                "--set",
                f"export_dir={export_base}",
                *train_args,
            ],
            echo=echo,
        )
        export_dir = training.get("export_dir")
        if not export_dir:
            raise DolgError("training did not export a model (was --no-export given?)")
    else:
        versions = list_versions(export_base)
        if not versions:
            raise DolgError(f"no exported model under {export_base!r}; run `dolg export` or train first")
        export_dir = os.path.join(export_base, str(versions[-1]))
    seconds["train"] = round(time.perf_counter() - t0, 1)
    export_config = read_export_metadata(export_dir)["export_config"]

    split = demo_retrieval_split(image_size=view_size or export_config["image_size"], gallery_views=gallery_views)
    gallery_ids, query_ids = write_views(split, workdir)
    gallery_paths = [os.path.join(workdir, "gallery", i) for i in gallery_ids]
    query_paths = [os.path.join(workdir, "queries", i) for i in query_ids]

    t0 = time.perf_counter()
    with ServerProcess(export_base) as server:
        seconds["serve_start"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        with Client(server.grpc_target, protocol="grpc", timeout=120, deadline=600) as client:
            gallery_emb = client.embed(gallery_paths)
        with Client(server.rest_target, protocol="rest", timeout=120, deadline=600) as client:
            query_emb = client.embed(query_paths)
        seconds["embed"] = round(time.perf_counter() - t0, 1)
    index = Index(gallery_emb.shape[1], kind="flat")
    index.add(gallery_emb, gallery_ids)
    index_path = os.path.join(workdir, "gallery.index")
    index.save(index_path)
    scores, ids = index.search(query_emb, len(gallery_ids))
    position = {g: i for i, g in enumerate(gallery_ids)}
    ranks = np.array([[position[str(x)] for x in row] for row in ids])
    metrics = label_retrieval_metrics(ranks, split.query_labels, split.gallery_labels)
    results_json = write_search_results(
        os.path.join(workdir, "results.json"), query_ids, ids[:, :k], scores[:, :k], index=index_path
    )
    hits = [
        [
            Hit(
                split.gallery[position[str(x)]],
                float(s),
                str(x).split("/")[0],
                split.gallery_labels[position[str(x)]] == split.query_labels[q],
            )
            for x, s in zip(row[:k], srow[:k])
        ]
        for q, (row, srow) in enumerate(zip(ids, scores))
    ]
    title = (
        f"dolg demo: model version {os.path.basename(export_dir)}, "
        f"mAP {metrics['mAP']:.3f}, recall@1 {metrics['recall@1']:.3f} (green: same photo)"
    )
    grid_png = save_png(
        results_grid(split.queries, hits, cell=112, query_captions=[q.split("/")[0] for q in query_ids], title=title),
        os.path.join(workdir, "results.png"),
    )
    return DemoResult(
        export_dir=export_dir,
        gallery=len(gallery_ids),
        queries=len(query_ids),
        metrics={key: round(float(v), 4) for key, v in metrics.items()},
        untrained_metrics=(training or {}).get("before"),
        results_json=results_json,
        grid_png=grid_png,
        seconds=seconds,
        training=(
            {key: training[key] for key in ("step", "loss", "accuracy", "images_per_s", "model_dir")}
            if training
            else None
        ),
    )
