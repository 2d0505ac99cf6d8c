"""A rate meter over a sliding window (frames read, frames processed)."""

from __future__ import annotations

from collections import deque

from stream_actors.clock import SYSTEM_CLOCK, Clock


class RateMeter:
    """Events per second over the last `window_s`; counts from the meter's creation
    while it is younger than the window, so a new stream does not read low."""

    def __init__(self, maxlen: int = 512, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._times: deque[float] = deque(maxlen=maxlen)
        self._started = clock.monotonic()

    def mark(self, now: float | None = None) -> None:
        self._times.append(self._clock.monotonic() if now is None else now)

    def rate(self, window_s: float = 5.0) -> float:
        now = self._clock.monotonic()
        recent = sum(1 for t in list(self._times) if now - t <= window_s)
        span = min(window_s, now - self._started)
        return recent / span if span > 0 else 0.0
