"""Retrieval metrics, pure numpy (no TensorFlow import)."""

from __future__ import annotations

import numpy as np

from dolg_tf.errors import InputShapeError


def rank_by_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Gallery indices sorted by descending inner product, shape (num_queries, num_gallery)."""
    queries, gallery = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise InputShapeError(f"need (Q, D) queries and (N, D) gallery, got {queries.shape} and {gallery.shape}")
    # A stable sort keeps ties in gallery order, so results are reproducible.
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")


def label_retrieval_metrics(
    ranks: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, ks=(1, 5)
) -> dict[str, float]:
    """mAP (non-interpolated, over all positives) and recall@k for label-defined relevance.

    Queries with no positive in the gallery are left out of every mean.
    """
    ranks = np.asarray(ranks)
    relevant = np.asarray(gallery_labels)[ranks] == np.asarray(query_labels)[:, None]
    has_pos = relevant.any(axis=1)
    if not has_pos.any():
        raise InputShapeError("no query has a positive in the gallery")
    relevant = relevant[has_pos]
    hits = np.cumsum(relevant, axis=1)
    positions = np.arange(1, relevant.shape[1] + 1)
    ap = (relevant * hits / positions).sum(axis=1) / relevant.sum(axis=1)
    out = {"mAP": float(ap.mean()), "num_queries": int(has_pos.sum())}
    for k in ks:
        out[f"recall@{k}"] = float(relevant[:, :k].any(axis=1).mean())
    return out
