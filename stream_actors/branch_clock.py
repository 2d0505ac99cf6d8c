"""A camera actor's load, as its dispatchers and readers see it: pending classification
passes, their timeouts, and frames that waited long for a detector call. No Ray."""

from __future__ import annotations

import time


class BranchClock:
    """A camera actor's classification calls: when each pending one started, and when
    one last timed out. The dispatchers yield to them when they are starved (on a
    shared CPU every detector competes with every classifier). It also keeps when a
    live frame of the actor last waited long for its detector call (overloaded
    detectors), for the readers' decode shedding."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._next = 0
        self.last_timeout = -float("inf")
        self.timeouts = 0
        # When `starved()` last found branch work starved, for the actor's reader
        # threads (a float is read atomically; the dict above is the event loop's alone).
        self.last_starved = -float("inf")
        self.last_detector_wait = -float("inf")

    def start(self) -> int:
        self._next += 1
        self._started[self._next] = time.monotonic()
        return self._next

    def end(self, token: int) -> None:
        self._started.pop(token, None)

    def timed_out(self) -> None:
        """A pass of the actor gave up on a classifier (the runner's branch timeout)."""
        self.timeouts += 1
        self.last_timeout = time.monotonic()

    def oldest_age(self) -> float:
        if not self._started:
            return 0.0
        return time.monotonic() - min(self._started.values())

    def starved(self, grace_s: float, window_s: float) -> bool:
        """A call has waited longer than `grace_s`, or one timed out in `window_s`."""
        now = time.monotonic()
        starved = now - self.last_timeout < window_s or self.oldest_age() > grace_s
        if starved:
            self.last_starved = now
        return starved

    def starved_within(self, seconds: float) -> bool:
        """Found starved in the last `seconds` (any thread): a verdict that expires, and
        does not flap with the hold that switches starvation on and off."""
        return time.monotonic() - self.last_starved < seconds

    def detector_waited(self) -> None:
        """A live frame waited longer than `overloaded_wait_s` for its detector call."""
        self.last_detector_wait = time.monotonic()

    def detector_overloaded_within(self, seconds: float) -> bool:
        """A live frame waited long for its detector in the last `seconds` (any thread)."""
        return time.monotonic() - self.last_detector_wait < seconds

    @property
    def pending(self) -> int:
        return len(self._started)
