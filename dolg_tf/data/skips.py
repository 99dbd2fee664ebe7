"""Counting the images the input pipeline skips."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence

from dolg_tf.data.images import SKIP_REASONS, UNREADABLE

logger = logging.getLogger("dolg_tf.data")

# Each of the first skips is logged with its key; after that one line per this many.
_LOG_FIRST = 20
_LOG_EVERY = 100


class SkipCounter:
    """Thread-safe tally of skipped images, shared by every dataset made from one source.

    The tf.data pipeline calls :meth:`record` (through ``tf.py_function``, only when an
    element is dropped, so the common path stays in the graph). Counts are events: an image
    that is unreadable is counted once per epoch in which it is drawn.
    """

    def __init__(self, parent: SkipCounter | None = None):
        self._parent = parent
        self._lock = threading.Lock()
        self._total = 0
        self._by_reason: collections.Counter[str] = collections.Counter()

    @property
    def count(self) -> int:
        """Images skipped so far, all reasons together."""
        with self._lock:
            return self._total

    def by_reason(self) -> dict[str, int]:
        """``{reason: count}`` of the images skipped so far."""
        with self._lock:
            return dict(self._by_reason)

    def record(self, status: int, key: str, unreadable: Sequence[str] = (), log: bool = True) -> None:
        """Counts one element dropped with ``status`` (``OK``: none) and the ``unreadable``
        ones (their keys) that failed to read or decode just before it."""
        events = [(UNREADABLE, k or "(no key)") for k in unreadable]
        if status in SKIP_REASONS:
            events.append((status, key))
        if not events:
            return
        if self._parent is not None:
            self._parent.record(status, key, unreadable, log=False)
        with self._lock:
            for reason, where in events:
                self._total += 1
                self._by_reason[SKIP_REASONS[reason]] += 1
                if log and (self._total <= _LOG_FIRST or self._total % _LOG_EVERY == 0):
                    logger.warning("skipped %s: %s (%d skipped so far)", where, SKIP_REASONS[reason], self._total)

    def summary(self) -> str:
        """One line, e.g. ``"3 images skipped (2 read or decode error ..., 1 empty file)"``."""
        by_reason = self.by_reason()
        if not by_reason:
            return "0 images skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]))
        return f"{sum(by_reason.values())} images skipped ({parts})"


#: Every source's counter also adds to this one: the skips of the whole process.
ALL_SOURCES = SkipCounter()
