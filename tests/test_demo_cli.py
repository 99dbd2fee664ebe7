"""Demo data, retrieval metrics and the `dolg` command."""

import json

import numpy as np
import pytest

from dolg_tf.demo_data import demo_photos, demo_views, synthetic_view
from dolg_tf.errors import ConfigError, InputShapeError
from dolg_tf.evaluate import label_retrieval_metrics, rank_by_similarity


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
