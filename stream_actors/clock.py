"""The clock that stream reading waits on: the system's in production, a manual one in
tests, which step it instead of sleeping (as `reconnect.py` takes its clock)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Final, Protocol

# A threading.Event cannot wake a Condition: a manual sleeper interruptible by one looks
# at it this often (real time; it only bounds how soon a stopped reader notices).
_EVENT_POLL_S = 0.005


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds for intervals and deadlines (never goes back)."""

    def time(self) -> float:
        """Seconds since 1970, for timestamps."""

    def sleep(self, seconds: float) -> None:
        """Block this thread for `seconds`."""

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """`event.wait(timeout_s)` on this clock: True when the event is set."""


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(timeout_s)


SYSTEM_CLOCK: Final = SystemClock()


@dataclass(eq=False)
class _Sleeper:
    deadline: float
    due: bool = False


class ManualClock:
    """A clock that moves only when told, for tests. A thread that sleeps or waits on it
    blocks until `advance` (or `run_until`) brings the time to its deadline, so a reader
    thread runs its schedule deterministically and without real waiting.

    `run_until` jumps from one sleeper's deadline to the next, each time after the given
    number of threads are asleep on the clock again: between two steps those threads
    are parked, and the test may inspect or feed them. Every requested sleep is kept in
    `sleeps` (in order) for exact assertions."""

    def __init__(self, start: float = 0.0, epoch: float = 1_700_000_000.0) -> None:
        self._now = start
        self._epoch = epoch  # time() = epoch + monotonic()
        self._cond = threading.Condition()
        self._sleepers: list[_Sleeper] = []
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        with self._cond:
            return self._now

    def time(self) -> float:
        return self._epoch + self.monotonic()

    def sleep(self, seconds: float) -> None:
        self._block(seconds, None)

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return self._block(timeout_s, event)

    def _block(self, seconds: float, event: threading.Event | None) -> bool:
        with self._cond:
            self.sleeps.append(seconds)
            if seconds <= 0 or (event is not None and event.is_set()):
                return event is not None and event.is_set()
            sleeper = _Sleeper(self._now + seconds)
            self._sleepers.append(sleeper)
            self._cond.notify_all()  # wakes wait_for_sleepers
            while not sleeper.due:
                if event is not None and event.is_set():
                    self._sleepers.remove(sleeper)
                    return True
                self._cond.wait(_EVENT_POLL_S if event is not None else None)
            return event is not None and event.is_set()

    def _wake_due(self) -> None:
        due = [s for s in self._sleepers if s.deadline <= self._now]
        for sleeper in due:
            sleeper.due = True
            self._sleepers.remove(sleeper)
        self._cond.notify_all()

    def advance(self, seconds: float) -> None:
        """Move the time forward and wake the sleepers that are due."""
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        with self._cond:
            self._now += seconds
            self._wake_due()

    def asleep(self) -> int:
        """How many threads are blocked on this clock now."""
        with self._cond:
            return len(self._sleepers)

    def wait_for_sleepers(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Block (in real time, at most `timeout_s`) until `count` threads sleep on the
        clock; TimeoutError otherwise (a thread blocked elsewhere, or gone)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._sleepers) >= count, timeout_s):
                raise TimeoutError(
                    f"{len(self._sleepers)} of {count} threads asleep on the clock"
                    f" after {timeout_s:g}s"
                )

    def run_until(self, until: float, threads: int = 1, timeout_s: float = 10.0) -> None:
        """Step the time from deadline to deadline up to `until` (a deadline at `until`
        included), waiting for `threads` sleepers before each step; returns with them
        asleep and the time at `until`."""
        while True:
            self.wait_for_sleepers(threads, timeout_s)
            with self._cond:
                step = min(s.deadline for s in self._sleepers)
                if step > until:
                    self._now = max(self._now, until)
                    return
                self._now = max(self._now, step)
                self._wake_due()
