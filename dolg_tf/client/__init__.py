"""Client for a DOLG model served by TF Serving (or ``dolg serve``): images in, embeddings out.

```python
import dolg_tf.client

emb = dolg_tf.client.embed(["a.jpg", b"<png bytes>", uint8_array, pil_image], target="localhost:8500")
# float32 (4, D), L2-normalised rows, input order kept

with dolg_tf.client.Client("localhost:8501", protocol="rest", batch_size=16, progress=True) as client:
    gallery = client.embed(paths)

options = dolg_tf.client.ClientOptions(timeout=30, retries=3, tls=True)  # frozen, checked once
with dolg_tf.client.Client("serving.example.com:8500", options=options) as client:
    ...
```

Importing this package loads numpy, Pillow, grpc and TF Serving's protobuf
modules, but neither TensorFlow's runtime nor Keras nor the model code, so a
client starts in a fraction of a second (see :mod:`dolg_tf.client._protos`).

Errors, all under :class:`dolg_tf.errors.ClientError`:
:class:`InvalidImageError` (``.index`` names the image, ``.reason`` says why),
:class:`ModelNotFoundError`, :class:`ServerUnavailableError`.
"""

from __future__ import annotations

from dolg_tf.client.core import Client, embed, pack_requests
from dolg_tf.client.inputs import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImageInput, prepare
from dolg_tf.client.options import DEFAULT_MAX_MESSAGE_BYTES, ClientOptions
from dolg_tf.client.transports import ModelInfo, VersionStatus
from dolg_tf.errors import ClientError, InvalidImageError, ModelNotFoundError, ServerUnavailableError

__all__ = [
    "Client",
    "ClientError",
    "ClientOptions",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ImageInput",
    "InvalidImageError",
    "ModelInfo",
    "ModelNotFoundError",
    "ServerUnavailableError",
    "VersionStatus",
    "embed",
    "pack_requests",
    "prepare",
]
