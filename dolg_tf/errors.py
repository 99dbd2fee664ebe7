"""Exception types of dolg_tf.

Every error the library raises on bad input derives from :class:`DolgError`,
so callers can catch one type and still tell problems apart.
"""

from __future__ import annotations


class DolgError(Exception):
    """Base class of every error raised by dolg_tf."""


class ConfigError(DolgError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class InputShapeError(DolgError, ValueError):
    """A tensor given to a layer or model has the wrong rank, size or dtype."""


class WeightsError(DolgError, ValueError):
    """Weights could not be loaded: missing file, wrong architecture or shape."""


class DataError(DolgError, ValueError):
    """Training or evaluation data is missing, unreadable or malformed."""


class ExportError(DolgError, ValueError):
    """A model could not be exported, or an export directory is not a valid DOLG export."""


class ServingError(DolgError):
    """The local TF-Serving-protocol server could not load or serve a model."""


class IndexFileError(DolgError, ValueError):
    """A nearest-neighbour index file is missing, truncated or inconsistent."""


class ClientError(DolgError):
    """Base class of every error raised by :mod:`dolg_tf.client`."""


class InvalidImageError(ClientError, ValueError):
    """One input image is unreadable or out of bounds; ``index`` names it (None: the whole request)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message if index is None else f"image {index}: {message}")
        self.index = index
        self.reason = message


class ModelNotFoundError(ClientError, LookupError):
    """The server has no such model, version, label or signature, or it is not a DOLG embedding model."""


class ServerUnavailableError(ClientError, ConnectionError):
    """The server could not be reached (or kept failing) within the deadline."""


class WrongProtocolError(ClientError, ConnectionError):
    """The server at the address speaks the other protocol (a gRPC client on a REST port, or the reverse)."""
