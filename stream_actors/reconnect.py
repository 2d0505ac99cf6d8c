"""Reconnect policy: jittered exponential backoff, a per-camera circuit breaker, the
limit on failed attempts in a row after which a stream gives up, and a token bucket that
caps reconnect attempts per second across all cameras (so a switch rebooting 100 cameras
does not become a reconnect storm). Clocks are injectable."""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delay before attempt n: min(cap, base * factor**n) scaled by a random jitter."""

    base_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 30.0
    jitter: float = 0.5  # delay is drawn from [d * (1 - jitter), d]
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.cap_s, self.base_s * self.factor**self.attempt)
        self.attempt += 1
        return ceiling * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class RetryLimit:
    """`streams.max_retries` (the seed's config.json key): a stream gives up once that
    many reconnect attempts failed in a row, i.e. at failed attempt max_retries + 1 (the
    first open, or the read that broke, then each retry) with no frame between; -1 never
    gives up. Waiting (backoff, an open circuit, the reconnect budget) is no attempt."""

    max_retries: int = -1
    failures: int = 0  # failed attempts since the last frame

    def record_failure(self) -> bool:
        """Count one failed attempt; True when the stream must give up now."""
        self.failures += 1
        return 0 <= self.max_retries < self.failures

    def reset(self) -> None:
        """A frame came, or the stream was started again: a fresh count."""
        self.failures = 0

    def gave_up(self, error: str) -> str:
        """The `last_error` of a stream that gave up, naming the limit and the last error."""
        attempts = "attempt" if self.failures == 1 else "attempts"
        return (
            f"gave up after {self.failures} failed {attempts} in a row "
            f"(streams.max_retries: {self.max_retries}): {error}"
        )


class BreakerState(enum.StrEnum):
    CLOSED = "closed"  # connecting normally
    OPEN = "open"  # too many failures: no attempts until the cool-down ends
    HALF_OPEN = "half_open"  # cool-down over: one trial attempt allowed


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        open_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold, self.open_s, self._clock = failure_threshold, open_s, clock
        self.failures = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.open_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        return self.state is not BreakerState.OPEN

    def record_success(self) -> None:
        self.failures, self._opened_at = 0, None

    def record_failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self._opened_at = self._clock()  # (re)open: the trial failed or threshold hit

    def retry_in_s(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.open_s - (self._clock() - self._opened_at))


class TokenBucket:
    """At most `rate_per_s` acquisitions per second on average, bursts up to `burst`."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate, self.burst, self._clock = rate_per_s, burst, clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def try_acquire(self) -> float:
        """0.0 when a token was taken, else the seconds until one will be available."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate
