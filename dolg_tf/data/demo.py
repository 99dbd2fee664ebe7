"""Held-out retrieval evaluation on the built-in demo photos."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from dolg_tf.demo_data import demo_views
from dolg_tf.evaluate import label_retrieval_metrics, rank_by_similarity


@dataclasses.dataclass(frozen=True)
class RetrievalSplit:
    """Gallery and query views (uint8 RGB, aspect kept, longer side ``image_size``) with photo labels."""

    gallery: list[np.ndarray]
    gallery_labels: np.ndarray
    queries: list[np.ndarray]
    query_labels: np.ndarray
    names: list[str]


def demo_retrieval_split(image_size: int = 224, gallery_views: int = 2, query_views: int = 1,
                         seed: int = 0) -> RetrievalSplit:
    """Views of the demo photos for evaluating a model trained on :class:`DemoSource`.

    The views are made with numpy (:func:`dolg_tf.demo_data.demo_views`: crop with aspect
    near 1, flip, contrast/brightness/colour changes), a different family of transforms
    and random stream than the tf.data training augmentation. Gallery views use ``seed``
    and queries ``seed + 1``; the defaults match ``dolg demo``, so the figures compare.
    """
    gallery, gallery_labels, names = demo_views(gallery_views, seed=seed, size=image_size)
    queries, query_labels, _ = demo_views(query_views, seed=seed + 1, size=image_size)
    return RetrievalSplit(gallery, gallery_labels, queries, query_labels, names)


def retrieval_metrics(embed: Callable[[np.ndarray], np.ndarray], split: RetrievalSplit) -> dict[str, float]:
    """mAP and recall@1/5 of queries against the gallery.

    Args:
        embed: maps a float32 ``(1, H, W, 3)`` RGB [0, 255] batch to ``(1, D)`` embeddings
            (e.g. ``lambda x: model(x)``); views differ in shape, so they go one at a time.
        split: from :func:`demo_retrieval_split`.
    """

    def embed_all(images):
        return np.concatenate([np.asarray(embed(im[None].astype(np.float32))) for im in images])

    ranks = rank_by_similarity(embed_all(split.queries), embed_all(split.gallery))
    return label_retrieval_metrics(ranks, split.query_labels, split.gallery_labels)
