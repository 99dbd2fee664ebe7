"""The built-in demo: photos and views, the held-out retrieval split and its metrics, the demo as a
training source, and `dolg demo` end to end (export -> dolg serve -> client -> index -> metrics -> grid)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dolg_tf import cli, data, demo
from dolg_tf.demo.photos import demo_photos, demo_views, synthetic_view
from dolg_tf.errors import ConfigError, InputShapeError
from dolg_tf.evaluate import label_retrieval_metrics, rank_by_similarity
from dolg_tf.visualize import Hit, results_grid


def test_demo_photos_are_real_rgb_images():
    photos = demo_photos()
    assert len(photos) >= 19
    for name, image in photos.items():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert image.std() > 5, f"{name} looks blank"


def test_views_keep_aspect_and_differ_between_seeds(rng):
    image = demo_photos()["coffee"]  # 400 x 600
    view = synthetic_view(image, rng, size=96)
    assert max(view.shape[:2]) == 96 and view.dtype == np.uint8
    a, labels, names = demo_views(1, seed=0, size=64)
    b, _, _ = demo_views(1, seed=1, size=64)
    assert len(a) == len(names) and list(labels) == list(range(len(names)))
    assert any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ConfigError, match=">= 16"):
        synthetic_view(image, rng, size=4)


def test_label_retrieval_metrics_hand_computed():
    # Query 0 (label 0): ranking labels [1, 0, 0] -> AP = (1/2 + 2/3) / 2; recall@1 = 0.
    # Query 1 (label 1): ranking labels [1, 0, 0] -> AP = 1; recall@1 = 1.
    # Query 2 (label 5): no positive -> left out.
    gallery_labels = np.array([1, 0, 0])
    ranks = np.array([[0, 1, 2], [0, 1, 2], [2, 1, 0]])
    m = label_retrieval_metrics(ranks, np.array([0, 1, 5]), gallery_labels, ks=(1, 2))
    assert m["num_queries"] == 2
    np.testing.assert_allclose(m["mAP"], ((0.5 + 2 / 3) / 2 + 1.0) / 2)
    assert m["recall@1"] == 0.5 and m["recall@2"] == 1.0


def test_rank_by_similarity_is_stable_and_checks_shapes():
    g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    assert rank_by_similarity(np.array([[1.0, 0.0]]), g).tolist() == [[0, 2, 1]]
    with pytest.raises(InputShapeError, match="gallery"):
        rank_by_similarity(np.zeros((1, 3)), g)


def test_demo_source_and_held_out_retrieval_split():
    source = data.open_source()
    assert source.kind == "demo" and source.num_classes == source.num_examples == 19
    assert "instance retrieval under synthetic views" in source.description
    split = demo.demo_retrieval_split(image_size=48, gallery_views=2)
    assert len(split.gallery) == 38 and len(split.queries) == 19 and split.names == list(source.label_map)
    assert max(split.queries[0].shape[:2]) == 48
    # The plumbing: an oracle embedding (one-hot of the true label) scores 1, a constant one does not.
    label_of = {
        id(im): lab
        for im, lab in zip(split.gallery + split.queries, np.concatenate([split.gallery_labels, split.query_labels]))
    }
    identity = {}

    def oracle(batch):
        return np.eye(19)[[identity[batch.tobytes()]]]

    for im in split.gallery + split.queries:
        identity[im[None].astype(np.float32).tobytes()] = label_of[id(im)]
    assert demo.retrieval_metrics(oracle, split)["mAP"] == pytest.approx(1.0)
    assert demo.retrieval_metrics(lambda batch: np.ones((1, 4)), split)["recall@1"] < 0.5


def test_results_grid_layout_and_frames():
    queries = [np.full((40, 60, 3), 10, np.uint8), np.full((50, 50, 3), 200, np.uint8)]
    hits = [
        [Hit(np.zeros((30, 30, 3), np.uint8), 0.9, "a", True), Hit(np.zeros((30, 30, 3), np.uint8), 0.5, "b", False)],
        [Hit(Image.new("RGB", (20, 80)), 0.7, "c", None)],
    ]
    grid = results_grid(queries, hits, cell=64, title="t")
    assert grid.size == (3 * 64 + 12 + 8, 26 + 2 * (64 + 26) + 8)
    px = np.asarray(grid)
    # Frames: the first result (correct) is green, the second (wrong) red.
    assert tuple(px[26 + 4 + 1, 4 + 64 + 12 + 1]) == (40, 170, 60)
    assert tuple(px[26 + 4 + 1, 4 + 128 + 12 + 1]) == (210, 40, 40)
    with pytest.raises(ConfigError, match="2 queries but 1 result lists"):
        results_grid(queries, hits[:1])


@pytest.mark.integration
def test_demo_end_to_end_through_a_served_export(tmp_path, capsys):
    base, work = tmp_path / "saved_models" / "dolg", tmp_path / "demo"
    assert cli.main(["export", "--preset", "tiny", "--out", str(base), "--image-size", "64", "--scales", "1"]) == 0
    capsys.readouterr()
    assert (
        cli.main(
            ["demo", "--no-train", "--export-base", str(base), "--workdir", str(work), "--gallery-views", "1", "-q"]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[0])
    assert summary["queries"] == summary["gallery"] >= 19
    assert 0.0 < summary["metrics"]["mAP"] <= 1.0 and summary["export_dir"].endswith(os.sep + "1")
    grid = Image.open(summary["grid_png"])
    assert grid.size[1] > summary["queries"] * 100  # one row per query
    results = json.load(open(summary["results_json"]))["results"]
    assert len(results) == summary["queries"] and len(results[0]["ids"]) == 5
    # The same results re-drawn with `dolg show` from the files the demo wrote.
    png = tmp_path / "again.png"
    assert (
        cli.main(
            [
                "show",
                "--results",
                summary["results_json"],
                "--query-root",
                str(work / "queries"),
                "--gallery-root",
                str(work / "gallery"),
                "--out",
                str(png),
                "--correct-by",
                "parent",
                "-k",
                "3",
            ]
        )
        == 0
    )
    assert Image.open(png).size[0] == 4 * 128 + 12 + 8
    # A wrong root is a one-line error, not a traceback.
    assert (
        cli.main(["show", "--results", summary["results_json"], "--query-root", str(tmp_path), "--out", str(png)]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    # No export at all: a clear error.
    assert cli.main(["demo", "--no-train", "--export-base", str(tmp_path / "none"), "--workdir", str(work)]) == 2
    assert "no exported model" in capsys.readouterr().err
