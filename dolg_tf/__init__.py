"""dolg-tf: DOLG image retrieval in Keras 3 on TensorFlow.

The model entry points (``build_dolg``, ``load_dolg``, ``multiscale_embed``,
``DOLG``) are imported lazily so that ``import dolg_tf.client`` stays light.
"""

from __future__ import annotations

from dolg_tf._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "DOLG": "dolg_tf.model",
    "build_dolg": "dolg_tf.model",
    "load_dolg": "dolg_tf.model",
    "multiscale_embed": "dolg_tf.model",
    "ModelConfig": "dolg_tf.config",
    "model_config": "dolg_tf.config",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = sorted(_LAZY)
