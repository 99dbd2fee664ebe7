"""dolg-tf: DOLG image retrieval in Keras 3 on TensorFlow.

The model entry points (``build_dolg``, ``load_dolg``, ``multiscale_embed``,
``DOLG``) are imported lazily so that ``import dolg_tf.client`` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "DOLG": "dolg_tf.model",
    "build_dolg": "dolg_tf.model",
    "load_dolg": "dolg_tf.model",
    "multiscale_embed": "dolg_tf.model",
    "ModelConfig": "dolg_tf.config",
    "model_config": "dolg_tf.config",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dolg_tf' has no attribute {name!r}")


__all__ = sorted(_LAZY)
