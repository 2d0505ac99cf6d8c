"""Admission of frames to a detector, across all the subscriptions of one camera actor
(no Ray: the call is injected).

Each subscription used to push its newest frame as soon as its own slot freed, one Serve
handle call per frame; under overload that frame then waited in the replicas' queue
behind the other cameras' frames, and every frame paid the router and an actor call.

Here a subscription that is ready (slot free, period due, a frame waiting) queues a
*take* function, not a frame. When one of the dispatcher's calls is free, it takes the
newest frame of every waiting subscription, longest waiting first and at most
`max_frames` of them, and sends them all in one call. Frames wait in their mailboxes,
where newer ones supersede them, instead of in a replica's queue; the handle call, the
router and the replica's per-request work are paid once per call instead of per frame.

Branch work comes first: while a classification pass of this actor has waited longer
than `branch_grace_s`, the dispatcher keeps at most one detector call outstanding (a
second waits up to `branch_hold_s`), so that under overload the frames per camera go
down before the classifiers starve (an object already stable is worth more than one
more frame). Detection itself never stops for branch work.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from graph.common.detection import DetectRequest, DetectResult
from graph.common.schemas import StrictModel

TakeFn = Callable[[], DetectRequest | None]
"""Takes the subscription's newest frame (prepared) at the moment it is admitted; None:
there is none any more (e.g. it grew too old)."""
AdmitFn = Callable[[TakeFn], Awaitable[DetectResult | None]]
SendFn = Callable[[list[DetectRequest]], Awaitable[Sequence[DetectResult]]]


class DispatchSettings(StrictModel):
    """`args.streams.dispatch`: how a camera actor's frames go to a detector."""

    calls_in_flight: int = Field(
        2, ge=1, le=16, description="detector calls one camera actor has outstanding per model"
    )
    max_frames_per_call: int = Field(
        8, ge=1, le=64, description="frames of several subscriptions carried by one call"
    )
    branch_grace_s: float = Field(
        0.15,
        ge=0,
        le=10,
        description="a classification pass waiting longer than this holds detector calls",
    )
    branch_hold_s: float = Field(
        0.25,
        ge=0,
        le=5,
        description="the longest a detector call is held back for branch work (0: never)",
    )


@dataclass
class _Waiter:
    since: float
    take: TakeFn
    future: asyncio.Future[DetectResult | None]


@dataclass
class DispatchStats:
    calls: int = 0
    frames: int = 0
    held_s: float = 0.0  # detector time given to branch work
    holds: int = 0
    frames_per_call: Counter[int] = field(default_factory=Counter)
    wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=512))


class DetectDispatcher:
    """One per (camera actor, detector target). `admit(take)` resolves with the result
    of the frame `take` gave, or None when it gave none; it raises what the call raised
    (e.g. `DetectorBusy`). Cancelling `admit` (a timeout, a stopped subscription) before
    its turn means its frame is never taken."""

    def __init__(
        self,
        send: SendFn,
        settings: DispatchSettings | None = None,
        branch_age: Callable[[], float] | None = None,
    ) -> None:
        self._send = send
        self._settings = settings or DispatchSettings()
        self._branch_age = branch_age  # seconds the oldest pending branch pass has waited
        self._waiting: deque[_Waiter] = deque()
        self._in_flight = 0
        self._changed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.stats = DispatchStats()

    async def admit(self, take: TakeFn) -> DetectResult | None:
        future: asyncio.Future[DetectResult | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiter(time.monotonic(), take, future))
        self._changed.set()
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="detect-dispatch")
        return await future

    @property
    def waiting(self) -> int:
        return sum(not w.future.done() for w in self._waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def close(self) -> None:
        """Stop sending; waiters not yet admitted are cancelled, calls in flight end."""
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.future.done():
                waiter.future.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    def _branch_waiting(self) -> bool:
        if self._branch_age is None or self._settings.branch_hold_s <= 0:
            return False
        return self._branch_age() > self._settings.branch_grace_s

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def _run(self) -> None:
        settings = self._settings
        while True:
            while self._waiting and self._waiting[0].future.done():
                self._waiting.popleft()  # cancelled before its turn
            if not self._waiting:
                return
            if self._in_flight >= settings.calls_in_flight:
                await self._wait_change()
                continue
            if self._in_flight and self._branch_waiting():
                # Overloaded branch work: one detector call at a time, until it catches
                # up or the hold ends (never none: detection never stops).
                start = time.monotonic()
                deadline = start + settings.branch_hold_s
                while (
                    self._in_flight
                    and self._branch_waiting()
                    and (left := deadline - time.monotonic()) > 0
                ):
                    await asyncio.sleep(min(0.02, left))
                self.stats.holds += 1
                self.stats.held_s += time.monotonic() - start
            self._start_call()

    def _start_call(self) -> None:
        batch: list[tuple[DetectRequest, _Waiter]] = []
        now = time.monotonic()
        while self._waiting and len(batch) < self._settings.max_frames_per_call:
            waiter = self._waiting.popleft()
            if waiter.future.done():
                continue
            try:
                request = waiter.take()
            except Exception as exc:  # a bad frame fails its own subscription only
                waiter.future.set_exception(exc)
                continue
            if request is None:
                waiter.future.set_result(None)
                continue
            self.stats.wait_ms.append((now - waiter.since) * 1000)
            batch.append((request, waiter))
        if not batch:
            return
        self._in_flight += 1
        self.stats.calls += 1
        self.stats.frames += len(batch)
        self.stats.frames_per_call[len(batch)] += 1
        task = asyncio.create_task(self._call(batch))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[tuple[DetectRequest, _Waiter]]) -> None:
        try:
            results = await self._send([request for request, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"detector answered {len(results)} of {len(batch)} frames")
        except asyncio.CancelledError:
            for _, waiter in batch:
                if not waiter.future.done():
                    waiter.future.cancel()
            raise
        except Exception as exc:
            for _, waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
        else:
            for (_, waiter), result in zip(batch, results, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(result)
        finally:
            self._in_flight -= 1
            self._changed.set()

    def status(self) -> dict[str, Any]:
        s = self.stats
        wait = sorted(s.wait_ms)
        return {
            "calls": s.calls,
            "frames": s.frames,
            "frames_per_call": round(s.frames / s.calls, 2) if s.calls else None,
            "admission_wait_ms_p50": round(wait[len(wait) // 2], 1) if wait else None,
            "waiting": self.waiting,
            "in_flight_calls": self._in_flight,
            "branch_holds": s.holds,
            "branch_held_s": round(s.held_s, 2),
        }


class BranchClock:
    """When each pending classification pass of a camera actor started: the age of the
    oldest is what the dispatchers yield to."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._next = 0

    def start(self) -> int:
        self._next += 1
        self._started[self._next] = time.monotonic()
        return self._next

    def end(self, token: int) -> None:
        self._started.pop(token, None)

    def oldest_age(self) -> float:
        if not self._started:
            return 0.0
        return time.monotonic() - min(self._started.values())

    @property
    def pending(self) -> int:
        return len(self._started)
