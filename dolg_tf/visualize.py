"""Result grids: each query beside its top-k results, with scores (a PNG people can look at).

Pure Pillow + numpy; no model or TensorFlow import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from dolg_tf.errors import ConfigError
from dolg_tf.fileio import atomic_write

GREEN, RED, GREY, BLUE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (40, 90, 210)


@dataclass(frozen=True)
class Hit:
    """One result cell: the image, its score, an optional caption and whether it is correct (None: unknown)."""

    image: Image.Image | np.ndarray
    score: float
    caption: str = ""
    correct: bool | None = None


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ConfigError(f"grid images must be uint8 arrays or PIL images, got dtype {array.dtype}")
    return Image.fromarray(array).convert("RGB")


def _tile(image, cell: int, border, width: int) -> Image.Image:
    thumb = ImageOps.contain(_as_pil(image), (cell - 2 * width, cell - 2 * width))
    tile = Image.new("RGB", (cell, cell), border)
    inner = Image.new("RGB", (cell - 2 * width, cell - 2 * width), (255, 255, 255))
    inner.paste(thumb, ((inner.width - thumb.width) // 2, (inner.height - thumb.height) // 2))
    tile.paste(inner, (width, width))
    return tile


def results_grid(
    queries: Sequence[Image.Image | np.ndarray],
    hits: Sequence[Sequence[Hit]],
    *,
    cell: int = 128,
    query_captions: Sequence[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """One row per query: the query (blue frame), then its results left to right.

    A result's frame is green when ``correct`` is True, red when False and
    grey when unknown; under each cell: the score and the caption.

    Args:
        queries: query images.
        hits: per query, its ranked :class:`Hit` list.
        cell: side of one square cell in pixels.
        query_captions: text under each query.
        title: a line of text at the top.
    """
    if len(queries) != len(hits):
        raise ConfigError(f"{len(queries)} queries but {len(hits)} result lists")
    if not queries:
        raise ConfigError("nothing to draw: no queries")
    if cell < 32:
        raise ConfigError(f"cell must be at least 32 pixels, got {cell}")
    k = max((len(h) for h in hits), default=0)
    text_h, gap, frame = 26, 12, 4
    top = text_h if title else 0
    width = (k + 1) * cell + gap + 8
    height = top + len(queries) * (cell + text_h) + 8
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 6), title, fill=(0, 0, 0))
    for row, (query, row_hits) in enumerate(zip(queries, hits)):
        y = top + row * (cell + text_h) + 4
        canvas.paste(_tile(query, cell, BLUE, frame), (4, y))
        caption = query_captions[row] if query_captions else "query"
        draw.text((6, y + cell + 2), caption[: cell // 7], fill=BLUE)
        for col, hit in enumerate(row_hits):
            x = 4 + (col + 1) * cell + gap
            border = GREY if hit.correct is None else (GREEN if hit.correct else RED)
            canvas.paste(_tile(hit.image, cell, border, frame), (x, y))
            draw.text((x + 2, y + cell + 2), f"{hit.score:.3f} {hit.caption}"[: cell // 7], fill=border)
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> str:
    """Writes ``image`` as PNG atomically (temporary file + rename)."""
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
