"""The end-to-end demo (export -> dolg serve -> client -> index -> metrics -> grid) and `dolg show`."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dolg_tf import cli
from dolg_tf.errors import ConfigError
from dolg_tf.visualize import Hit, results_grid


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
    assert cli.main(["demo", "--no-train", "--export-base", str(base), "--workdir", str(work), "--gallery-views", "1", "-q"]) == 0
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
    assert cli.main([
        "show", "--results", summary["results_json"], "--query-root", str(work / "queries"),
        "--gallery-root", str(work / "gallery"), "--out", str(png), "--correct-by", "parent", "-k", "3",
    ]) == 0
    assert Image.open(png).size[0] == 4 * 128 + 12 + 8
    # A wrong root is a one-line error, not a traceback.
    assert cli.main(["show", "--results", summary["results_json"], "--query-root", str(tmp_path), "--out", str(png)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # No export at all: a clear error.
    assert cli.main(["demo", "--no-train", "--export-base", str(tmp_path / "none"), "--workdir", str(work)]) == 2
    assert "no exported model" in capsys.readouterr().err
