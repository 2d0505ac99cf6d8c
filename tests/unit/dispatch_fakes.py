"""What the dispatcher tests share: a detector that records its calls, a camera's
newest frame as a mailbox holds it, loop-step waits, and the registry's fair shares of
a demand written short (no Ray, no sockets)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from graph.common.detection import DetectRequest, DetectResult
from stream_actors.mailbox import FrameTiming
from stream_actors.shares import admission_shares, pooled, water_levels
from stream_actors.subscriptions import Subscription


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def make_request(value: int) -> DetectRequest:
    return DetectRequest(np.full((4, 4, 3), value, np.uint8))


def make_result(request: DetectRequest) -> DetectResult:
    value = float(request.image[0, 0, 0])
    return DetectResult(np.array([[0, 0, 1, 1, value / 255, 0]], np.float32), {0: "x"})


class Recorder:
    """A detector whose calls end when the test says (gate), recording each call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.waiting: list[int] = []  # what each call said waits behind it
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def send(self, requests: list[DetectRequest], waiting: int) -> list[DetectResult]:
        self.calls.append([int(r.image[0, 0, 0]) for r in requests])
        self.waiting.append(waiting)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [make_result(r) for r in requests]


async def settle(steps: int = 100) -> None:
    """Let every ready task run (loop steps, not time: a loaded CI box cannot make it
    flaky)."""
    for _ in range(steps):
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool], polls: int = 300) -> None:
    for _ in range(polls):
        if predicate():
            return
        await settle()


def live_sub(sid: str) -> Subscription:
    return Subscription(
        subscriptionIdentifier=sid, rtspUrl="rtsp://cam.example/stream", modelId="demo"
    )


def replay_sub(sid: str) -> Subscription:
    return Subscription(
        subscriptionIdentifier=sid, fileUrl="/data/clip.mp4", fileRealtime=False, modelId="demo"
    )


class Camera:
    """One subscription's newest frame, as its mailbox holds it: `put` a frame (a value)
    now; `timing` and `take` are what the processor hands the dispatcher."""

    def __init__(
        self, interval_s: float, age_s: float, value: int = 1, frozen: bool = False
    ) -> None:
        self.interval_s = interval_s
        self.value: int | None = value
        self.seq = 1
        self.put_at = time.monotonic() - age_s
        self.frozen_age = age_s if frozen else None  # an age that does not grow

    def put(self, value: int) -> None:
        self.value, self.put_at, self.seq = value, time.monotonic(), self.seq + 1

    def timing(self) -> FrameTiming | None:
        if self.value is None:
            return None
        age = time.monotonic() - self.put_at if self.frozen_age is None else self.frozen_age
        return FrameTiming(age, self.interval_s, self.seq)

    def take(self) -> DetectRequest | None:
        value, self.value = self.value, None
        return None if value is None else make_request(value)


def shares_of(
    demand: dict[int, dict[str, Any]],
    calls_in_flight: int,
    budgets: dict[str, float] | None = None,
    capacity: dict[str, float] | None = None,
) -> dict[int, dict[str, float]]:
    """`admission_shares` of a demand given as cameras at 10 fps (a count) or as the
    frames/s each camera asks (a list)."""
    asked = {
        index: {t: [10.0] * v if isinstance(v, int) else v for t, v in targets.items()}
        for index, targets in demand.items()
    }
    levels = water_levels(pooled(asked), capacity or {}, {})
    return admission_shares(asked, calls_in_flight, budgets, levels)
