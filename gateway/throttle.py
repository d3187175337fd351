"""Log lines that can't flood: :class:`LogThrottle`. Imports nothing of credgate."""

from __future__ import annotations

import logging
import time


class LogThrottle:
    """At most one line per reason every ``seconds``: the first of a kind is written at
    once, the next ones within the period are counted, and the count rides on the next
    line written for that reason. For failures that repeat per request (the store away,
    an audit sink down), so an outage under load costs a few lines, not one a request."""

    def __init__(self, logger: logging.Logger, seconds: float = 10.0, *, level: int = logging.WARNING,
                 max_reasons: int = 100) -> None:
        self._log = logger
        self._level = level
        self._seconds = seconds
        self._max = max_reasons
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def emit(self, reason: str, message: str, *args: object) -> bool:
        """Log ``message % args`` (plus " (N more not logged)") unless ``reason`` was logged
        less than ``seconds`` ago; True when the line was written."""
        now = time.monotonic()
        if reason not in self._last and len(self._last) >= self._max:
            reason = "other"
        if now - self._last.get(reason, float("-inf")) < self._seconds:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return False
        self._last[reason] = now
        more = self._quiet.pop(reason, 0)
        self._log.log(self._level, message + (" (%d more not logged)" if more else ""), *args, *((more,) if more else ()))
        return True
