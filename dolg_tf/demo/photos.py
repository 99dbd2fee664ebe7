"""The built-in demo data: real photographs shipped inside installed packages, and their views.

Instance retrieval under synthetic views: each photograph is one instance;
gallery and query views are made from it with different random crops, flips
and colour changes. Nothing is downloaded: the photos ship inside
scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``).
:func:`demo_retrieval_split` + :func:`retrieval_metrics` evaluate a model on
held-out views. Imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

from dolg_tf.errors import ConfigError
from dolg_tf.evaluate import label_retrieval_metrics, rank_by_similarity

# skimage.data images that ship in the wheel (no pooch download).
_SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "stereo_motorcycle",
    "text",
)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def demo_photos() -> dict[str, np.ndarray]:
    """Returns ``{name: uint8 RGB array}`` of the built-in photographs.

    Raises:
        ConfigError: scikit-image / scikit-learn are not installed (``pip install dolg-tf[demo]``).
    """
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise ConfigError("the demo data needs scikit-image and scikit-learn: pip install 'dolg-tf[demo]'") from err
    photos = {}
    for name in _SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
        photos[name] = _to_rgb(image)
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images):
        photos[filename.rsplit("/", 1)[-1].split(".")[0]] = _to_rgb(image)
    return photos


def synthetic_view(image: np.ndarray, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One random view: resized crop (aspect kept near 1), flip, colour jitter.

    The output's longer side is ``size``; the aspect ratio of the crop is kept.
    """
    if size < 16:
        raise ConfigError(f"view size must be >= 16, got {size}")
    h, w = image.shape[:2]
    area = rng.uniform(0.35, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(8, round(np.sqrt(area / aspect)))))
    cw = int(min(w, max(8, round(np.sqrt(area * aspect)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    crop = image[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    scale = size / max(ch, cw)
    out_size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    view = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(out_size, Image.BILINEAR), np.float32)
    contrast = rng.uniform(0.7, 1.3)
    brightness = rng.uniform(-25, 25)
    colour = rng.uniform(0.9, 1.1, size=3)
    view = (view - view.mean()) * contrast + view.mean() + brightness
    return np.clip(view * colour, 0, 255).astype(np.uint8)


def demo_views(views_per_photo: int, seed: int, size: int = 128) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Views of every demo photo.

    Returns:
        ``(images, labels, names)``: uint8 RGB views, int labels (photo index)
        and the photo names indexed by label.
    """
    photos = demo_photos()
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, image in enumerate(photos.values()):
        for _ in range(views_per_photo):
            images.append(synthetic_view(image, rng, size))
            labels.append(label)
    return images, np.asarray(labels, np.int64), list(photos)


@dataclasses.dataclass(frozen=True)
class RetrievalSplit:
    """Gallery and query views (uint8 RGB, aspect kept, longer side ``image_size``) with photo labels."""

    gallery: list[np.ndarray]
    gallery_labels: np.ndarray
    queries: list[np.ndarray]
    query_labels: np.ndarray
    names: list[str]


def demo_retrieval_split(
    image_size: int = 224, gallery_views: int = 2, query_views: int = 1, seed: int = 0
) -> RetrievalSplit:
    """Views of the demo photos for evaluating a model trained on :class:`dolg_tf.demo.source.DemoSource`.

    The views are made with numpy (:func:`demo_views`: crop with aspect
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
