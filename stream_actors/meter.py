"""A rate meter over a sliding window (frames read, frames processed)."""

from __future__ import annotations

import time
from collections import deque


class RateMeter:
    """Events per second over the last `window_s`; counts from the meter's creation
    while it is younger than the window, so a new stream does not read low."""

    def __init__(self, maxlen: int = 512) -> None:
        self._times: deque[float] = deque(maxlen=maxlen)
        self._started = time.monotonic()

    def mark(self, now: float | None = None) -> None:
        self._times.append(time.monotonic() if now is None else now)

    def rate(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        recent = sum(1 for t in list(self._times) if now - t <= window_s)
        span = min(window_s, now - self._started)
        return recent / span if span > 0 else 0.0
