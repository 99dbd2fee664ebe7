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
