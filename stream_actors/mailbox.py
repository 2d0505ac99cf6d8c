"""Latest-frame mailbox: a reader thread overwrites one slot, the consumer takes the
newest frame; every frame that is never processed is counted with its reason."""

from __future__ import annotations

import enum
import statistics
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from stream_actors.clock import SYSTEM_CLOCK, Clock


class DropReason(enum.StrEnum):
    SUPERSEDED = "superseded"  # a newer frame arrived before this one was taken
    TOO_OLD = "too_old"  # taken, but older than the freshness limit
    BACK_PRESSURE = "back_pressure"  # the detector refused it (queue full)
    DETECTOR_ERROR = "detector_error"  # the detector failed or was unavailable
    PROCESSING_ERROR = "processing_error"  # tracking/events failed (a bug: logged)


class LazyImage(Protocol):
    @property
    def image(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Frame:
    payload: np.ndarray | LazyImage  # an array, or a captured frame converted on first use
    seq: int  # per source, increasing by one for every frame read
    captured_at: float  # wall clock (clock.time()) when the frame was read
    captured_mono: float  # clock.monotonic() at the same moment, for ages

    @property
    def image(self) -> np.ndarray:
        payload = self.payload
        return payload if isinstance(payload, np.ndarray) else payload.image


class FrameTiming(NamedTuple):
    age_s: float  # of the frame waiting in the mailbox
    interval_s: float  # between the source's recent frames
    seq: int  # the waiting frame's: a new one has another


class LatestFrameMailbox:
    """Thread-safe single slot. `put` never blocks; `take` waits up to `timeout_s`.

    Frame times and ages come from `clock`; the waits for a frame (or for it to be
    taken) are hand-overs between threads and stay in real time."""

    def __init__(
        self,
        max_age_s: float | None = None,
        on_put: Callable[[], None] | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._max_age_s = max_age_s
        self._clock = clock
        self._on_put = on_put  # e.g. wakes an asyncio consumer (called outside the lock)
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._seq = 0
        self._last_put: float | None = None
        self._intervals: deque[float] = deque(maxlen=15)  # between recent puts (s)
        self.received = 0
        self.delivered = 0
        self.drops: Counter[DropReason] = Counter()

    def put(self, image: np.ndarray | LazyImage, captured_at: float | None = None) -> Frame:
        now_mono = self._clock.monotonic()
        with self._cond:
            self._seq += 1
            at = captured_at if captured_at is not None else self._clock.time()
            frame = Frame(image, self._seq, at, now_mono)
            if self._last_put is not None:
                self._intervals.append(now_mono - self._last_put)
            self._last_put = now_mono
            if self._frame is not None:
                self.drops[DropReason.SUPERSEDED] += 1
            self._frame = frame
            self.received += 1
            self._cond.notify_all()
        if self._on_put is not None:
            self._on_put()
        return frame

    def take(self, timeout_s: float = 0.0) -> Frame | None:
        """The newest unseen frame, or None when none arrived in time or it is too old."""
        with self._cond:
            if self._frame is None and timeout_s > 0:
                self._cond.wait_for(lambda: self._frame is not None, timeout_s)
            frame, self._frame = self._frame, None
            if frame is None:
                return None
            self._cond.notify_all()  # wakes a lossless reader waiting in wait_taken
            if (
                self._max_age_s is not None
                and self._clock.monotonic() - frame.captured_mono > self._max_age_s
            ):
                self.drops[DropReason.TOO_OLD] += 1
                return None
            self.delivered += 1
            return frame

    def ready(self) -> bool:
        """Whether a frame waits to be taken (it may still be too old when taken)."""
        with self._cond:
            return self._frame is not None

    def timing(self) -> FrameTiming | None:
        """The waiting frame's age and sequence number and the source's frame interval
        (the median of its last 15, so one stall does not skew it): the next frame is
        due in about interval - age. None: no frame waits, or fewer than two arrived."""
        with self._cond:
            frame, intervals = self._frame, list(self._intervals)
        if frame is None or not intervals:
            return None
        age = self._clock.monotonic() - frame.captured_mono
        return FrameTiming(age, statistics.median(intervals), frame.seq)

    def wait_taken(self, timeout_s: float) -> bool:
        """Wait until the slot is empty (its frame was taken); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._frame is None, timeout_s)

    def record_drop(self, reason: DropReason) -> None:
        """Count a frame that was taken but could not be processed (e.g. back-pressure)."""
        with self._cond:
            self.drops[reason] += 1

    def stats(self) -> dict[str, object]:
        with self._cond:
            return {
                "received": self.received,
                "delivered": self.delivered,
                "pending": int(self._frame is not None),
                "drops": {r.value: self.drops[r] for r in DropReason},
            }
