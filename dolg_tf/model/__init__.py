"""DOLG model, backbones and multi-scale embedding."""

from dolg_tf.model.backbone import build_backbone, copy_backbone_weights, feature_taps, load_backbone_preset
from dolg_tf.model.dolg import DOLG, build_dolg, load_dolg
from dolg_tf.model.multiscale import multiscale_embed

__all__ = [
    "DOLG",
    "build_backbone",
    "build_dolg",
    "copy_backbone_weights",
    "feature_taps",
    "load_backbone_preset",
    "load_dolg",
    "multiscale_embed",
]
