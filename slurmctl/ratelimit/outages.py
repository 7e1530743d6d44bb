"""Logging an operation that keeps failing (a signal poll, a heartbeat write) without flooding the log.

A background loop that retries every second or two would otherwise write a warning per attempt for the whole length
of an outage. ``OutageLog`` writes one warning when the operation starts failing, then at most one reminder every
``every_s`` while it keeps failing, and one info line when it works again, saying how long it failed and how often.
It also counts failures, so callers can put them in their metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Callable


class OutageLog:
    """Failures of one repeated operation (``what``), logged once per outage and counted."""

    def __init__(self, logger: logging.Logger, what: str, *, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.what, self.every_s, self.clock = logger, what, every_s, clock
        self.failures = 0  # in total
        self.consecutive = 0  # in the current outage
        self.since: float | None = None  # when the current outage began
        self.logged_at = 0.0

    @property
    def failing(self) -> bool:
        return self.consecutive > 0

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.failures += 1
        self.consecutive += 1
        if self.since is None:
            self.since, self.logged_at = now, now
            self.logger.warning("%s failed: %s: %s (retrying)", self.what, type(exc).__name__, exc)
        elif now - self.logged_at >= self.every_s:
            self.logged_at = now
            self.logger.warning("%s still failing after %.0f s (%d failures); last error %s: %s", self.what,
                                now - self.since, self.consecutive, type(exc).__name__, exc)

    def succeeded(self) -> None:
        if self.since is not None:
            self.logger.info("%s works again after %.1f s (%d failures)", self.what, self.clock() - self.since,
                             self.consecutive)
        self.since, self.consecutive = None, 0
