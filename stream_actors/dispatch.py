"""Admission of frames to a detector, across all the subscriptions of one camera actor
(no Ray: the call is injected).

Each subscription used to push its newest frame as soon as its own slot freed, one Serve
handle call per frame; under overload that frame then waited in the replicas' queue
behind the other cameras' frames, and every frame paid the router and an actor call.

Here a subscription that is ready (slot free, period due, a frame waiting) queues a
*take* function, not a frame. When one of the dispatcher's calls is free, it takes the
newest frame of the waiting subscriptions, longest waiting first, and sends them in one
call. Frames wait in their mailboxes, where newer ones supersede them, instead of in a
replica's queue.

How many frames one call carries depends on what they are for. A live camera's frame
(`live_frames_per_call`, default 1) is worth its freshness: a CPU replica runs a call's
frames one after another, so each extra frame of a call adds one inference to the wait
of all of them (measured at 1.8x overload, 4 cameras: p99 8.2x one inference with 8
frames per call, 5.2x with 2, 3.8x with 1). A lossless replay's frames
(`max_frames_per_call`) have no freshness to lose, so they fill a call: the handle call,
the router and the replica's per-request work are then paid once per call, not per
frame (saturation throughput 0.86 x raw with 8 per call against 0.65 with 1). On a GPU,
where a batch costs little more than one frame, raise `live_frames_per_call`. While
branch work is starved (below), calls go one at a time and every call carries up to
`max_frames_per_call` frames: the fewest detector CPU-ms per frame.

Branch work comes first. The actor's classification passes are starved when one has
waited longer than `branch_grace_s`, or one timed out in the last `branch_window_s`.
While they are, the dispatcher keeps one detector call outstanding at a time and
starts calls at least `branch_hold_s` apart: under overload the frames per camera go
down (to about 1 / branch_hold_s) before the classifiers starve, since an object
already stable is worth more than one more frame of it. Detection never stops for it.

A frame about to be superseded waits for its successor. When a call frees, the
longest-waiting subscription's newest frame is on average half a frame interval old (at
10 fps, 50 ms: more than one CPU inference) and up to a whole one. If that frame is at
least half an interval old and its successor is due within `hold_for_next_s` (the
mailbox knows the camera's frame interval), the call waits for the successor, at most
until `NEXT_FRAME_SLACK_S` after it is due, and sends it. Only the last free call
waits (with two free, the frame goes at once), only calls of one live frame
(`live_frames_per_call` 1: a batch does not wait for one camera), and never for a
replay's frames, which have no freshness to lose. The order of turns stays longest
waiting first: taking fresher frames out of turn instead gave the cameras whose frames
happened to arrive just before calls freed most of the frames (fairness 0.51-0.58 at
8-16 cameras, measured). What the hold gains and costs, measured: README, "A frame
about to be superseded waits for its successor".

Fair share across camera actors. Streams are packed `streams_per_actor` to an actor, so
an actor may hold one camera while another holds four; with the same calls per actor
the lone camera would get four times the frames of each of the others under overload
(the replicas serve calls in turn, so an actor's frames follow its calls in flight).
The registry therefore gives each actor a *share* of the cluster's calls, in
proportion to the frames/s its subscriptions whose cameras are up should get: each
asks its targetFps, at most its stream's rate (`subscription_weight` in
admission.py), and when the detectors took fewer frames/s lately than all ask, the
frames are divided max-min fair (`admission_shares` in shares.py): a 1 fps camera
keeps its frame a second and holds no calls it cannot fill, and the 10 fps cameras
divide the rest. The cluster's calls per detector are `calls_per_replica` per running
replica of it (Serve's controller says how many run): the frames in flight follow the
replicas that run them, not the actors that send them, so more cameras add no wait in
the replicas (with `calls_in_flight` per actor, 16 cameras on 4 actors kept 8 calls, 4
per CPU replica, in flight). Without a replica count (`calls_per_replica` null, or
Serve has not said yet) the total is `calls_in_flight` per actor. A share is
fractional: 0.8 is one call whose slot, once free, stays idle for a quarter
of the call's duration (at most `MAX_IDLE_S`; not after a failed call), so that on
average 0.8 calls are in flight. A share is a cap, not a weight: it holds also while
the replicas have room, so a camera whose actor's share is below one call is held to
that pace even on an idle cluster (0.8 calls of 50 ms: 16 frames/s), unless
`fill_free_replicas` is on.

Each replica's answer says how many frames it still held for other calls
(`DetectResult.backlog`; frames of other calls batched with it count until those calls
resume, calls on their way there do not). With `fill_free_replicas` (off by default),
a fractional slot whose call came back from a replica that held none does not idle:
the cluster has room now, and the share is a cap only under contention. Without it,
the actors' fractional slots idle each on its own clock, so at times fewer calls than
the budget run and a replica waits (16 cameras on 4 actors at 1 call per replica: 4-17 %
fewer frames than with it). It is off by default because it favours the larger shares: the
actor that answers onto a free replica goes again, while a small share's call, queued
behind it, idles in proportion to that longer call (4 + 1 cameras on one call:
fairness 0.60 against 0.75 without, in the unit model), and above 1 call per replica
it adds p99 for few frames. Measured: README, "Fractional calls fill free replicas".
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from graph.common.detection import DetectRequest, DetectResult
from graph.common.errors import CamgraphError
from graph.common.schemas import StrictModel
from stream_actors.branch_clock import BranchClock
from stream_actors.mailbox import FrameTiming

TakeFn = Callable[[], DetectRequest | None]
"""Takes the subscription's newest frame (prepared) at the moment it is admitted; None:
there is none any more (e.g. it grew too old)."""
FrameTimingFn = Callable[[], FrameTiming | None]
"""The subscription's waiting frame's age, sequence number and its camera's frame
interval (`LatestFrameMailbox.timing`); None: not known."""
AdmitFn = Callable[[TakeFn, bool, FrameTimingFn | None], Awaitable[DetectResult | None]]
"""`admit(take, live, timing)`: live frames (cameras) go `live_frames_per_call` to a
call, replay frames (lossless files) `max_frames_per_call`; with `timing`, a free call
may wait for the subscription's next frame (`hold_for_next_s`)."""
SendFn = Callable[[list[DetectRequest], int], Awaitable[Sequence[DetectResult | Exception]]]
"""`send(frames, waiting)`: one call for several frames, and how many more wait behind
it (the autoscaling signal: most waiting frames never reach a replica). Answers a
result, or the error of that frame alone, per frame."""


MIN_SHARE, MAX_SHARE = 0.05, 16.0  # a dispatcher's share of the cluster's calls
MAX_IDLE_S = 2.0  # the longest a fractional slot idles after one call
NEXT_FRAME_SLACK_S = 0.01  # how late a frame waited for may come (network jitter)
POLL_S = 0.002  # how often a hold looks for the frame once it is due
MIN_INTERVAL_S = 0.005  # shorter: a burst (e.g. a reconnect's buffer), not a frame rate


def target_label(target: tuple[str, str]) -> str:
    """A detector target as the registry and `GET /streams` name it: "model/<model id>",
    or "<deployment>/<archive sha256>" for modelUrl pipelines."""
    return "/".join(target)


class DispatcherClosed(CamgraphError):
    """The dispatcher stopped (a redeploy replaced it) before this frame's turn."""


class DispatchSettings(StrictModel):
    """`args.streams.dispatch`: how a camera actor's frames go to a detector."""

    calls_in_flight: int = Field(
        2,
        ge=1,
        le=16,
        description="detector calls one camera actor has outstanding per model; with "
        "fair_share, what the actors have on average (the registry divides them)",
    )
    max_frames_per_call: int = Field(
        8, ge=1, le=64, description="frames of lossless replays carried by one call"
    )
    live_frames_per_call: int = Field(
        1,
        ge=1,
        le=64,
        description="frames of live cameras carried by one call (a CPU replica runs them "
        "one after another, so each adds an inference to their wait; raise it on GPUs)",
    )
    call_timeout_s: float = Field(
        30.0, gt=0, le=600, description="a detector call longer than this fails its frames"
    )
    branch_grace_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="a classification pass waiting longer than this: branch work is starved",
    )
    branch_window_s: float = Field(
        3.0, ge=0, le=600, description="a pass timed out this recently: branch work is starved"
    )
    branch_hold_s: float = Field(
        0.1,
        ge=0,
        le=5,
        description="while branch work is starved: one detector call at a time, started "
        "at least this far apart (0: no priority for branch work)",
    )

    fair_share: bool = Field(
        True,
        description="the registry divides the cluster's calls (calls_per_replica per "
        "running detector replica) among the actors by the frames/s their live "
        "subscriptions ask (targetFps, at most the stream's rate), max-min fair under "
        "overload (a camera asking less than an equal part gets all it asks, the others "
        "divide the rest equally), wherever it was placed",
    )
    calls_per_replica: float | None = Field(
        1.5,
        gt=0,
        le=64,
        description="with fair_share, the cluster's detector calls per running replica of "
        "the target: frames in flight follow the replicas, not the camera actors (1.5 on "
        "CPU: p99 about 20 % below 2, same frames; 1: lower still, about 10 % fewer "
        "frames); null: calls_in_flight per camera actor, however many replicas run",
    )

    fill_free_replicas: bool = Field(
        False,
        description="with fair_share, a fractional call slot does not idle after a call "
        "whose replica held no other frames when it answered (with calls_per_replica 1 it "
        "keeps 16 cameras' frames; it favours the larger shares of unevenly packed actors)",
    )

    overloaded_wait_s: float = Field(
        0.5,
        ge=0,
        le=60,
        description="a live frame that waited longer than this for its detector call marks "
        "the camera actor's detector overloaded: its pipeline streams may then decode key "
        "frames only (reader.shed_decode); 0: never",
    )

    hold_for_next_s: float = Field(
        0.05,
        ge=0,
        le=1,
        description="the last free call, when the live frame in turn is at least half a "
        "frame interval old and the camera's next one is due within this, waits for "
        "that next frame and sends it fresh; 0: it sends the waiting frame, however old",
    )

    @model_validator(mode="after")
    def _live_within_max(self) -> DispatchSettings:
        if self.live_frames_per_call > self.max_frames_per_call:
            raise ValueError("live_frames_per_call must not exceed max_frames_per_call")
        return self


@dataclass
class _Waiter:
    since: float
    take: TakeFn
    future: asyncio.Future[DetectResult | None]
    live: bool
    timing: FrameTimingFn | None = None


@dataclass
class _Hold:
    waiter: _Waiter
    seq: int  # its frame when the hold began
    start: float
    until: float  # its next frame is due, plus the slack


@dataclass
class DispatchStats:
    calls: int = 0
    frames: int = 0
    answered: int = 0  # frames of calls that came back with results
    held_s: float = 0.0  # detector time given to branch work
    holds: int = 0
    next_frame_holds: int = 0  # free calls that waited for a waiter's next frame
    next_frame_held_s: float = 0.0
    idles: int = 0  # a fractional slot idled after its call (the replica was busy)
    idles_skipped: int = 0  # it did not: the replica had no other frames
    wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=512))


class DetectDispatcher:
    """One per (camera actor, detector target). `admit(take, live, timing)` resolves with the
    result of the frame `take` gave, or None when it gave none; it raises what the call raised
    (e.g. `DetectorBusy`). Cancelling `admit` (a timeout, a stopped subscription) before
    its turn means its frame is never taken."""

    def __init__(
        self,
        send: SendFn,
        settings: DispatchSettings | None = None,
        branches: BranchClock | None = None,
    ) -> None:
        self._send = send
        self._settings = settings or DispatchSettings()
        self._branches = branches  # the actor's pending and timed-out classifications
        self._last_start = 0.0
        # The registry's share of the cluster's calls for this dispatcher (None: its
        # own calls_in_flight), and when the fractional last slot is free again.
        self._share: float | None = None
        self._partial_ready = 0.0
        self._waiting: deque[_Waiter] = deque()
        self._hold: _Hold | None = None  # the last free call waits for a waiter's next frame
        self._last_hold: tuple[int, int] | None = None  # id(waiter) and frame, last held
        self._in_flight = 0
        self._changed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.stats = DispatchStats()

    async def admit(
        self, take: TakeFn, live: bool = True, timing: FrameTimingFn | None = None
    ) -> DetectResult | None:
        future: asyncio.Future[DetectResult | None] = asyncio.get_running_loop().create_future()
        # A cancelled waiter wakes the pump (it may be holding a call for it).
        future.add_done_callback(lambda _: self._changed.set())
        self._waiting.append(_Waiter(time.monotonic(), take, future, live, timing))
        self._changed.set()
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="detect-dispatch")
        return await future

    def set_share(self, share: float | None) -> None:
        """The calls this dispatcher may have in flight on average (None: its own
        `calls_in_flight`), from the registry's fair share; clamped to 0.05–16."""
        if share is not None and not math.isfinite(share):
            raise ValueError(f"share must be finite, got {share!r}")
        share = None if share is None else min(max(share, MIN_SHARE), MAX_SHARE)
        if share != self._share:
            self._partial_ready = 0.0  # an idle worked out for the old share ends
        self._share = share
        self._changed.set()

    @property
    def share(self) -> float | None:
        return self._share

    def _slots(self) -> tuple[int, float]:
        """How many calls may be in flight at once, and the duty of the last of them
        (1.0: always usable; 0.8: idle a quarter of its call's time after each call)."""
        if self._share is None:
            return self._settings.calls_in_flight, 1.0
        full = math.floor(self._share + 1e-9)
        duty = self._share - full
        if duty < 0.01:
            return max(full, 1), 1.0
        return full + 1, duty

    def _free_in(self, now: float, in_flight: int | None = None) -> float | None:
        """Seconds until a call may start (0: now) with `in_flight` calls (default: those
        in flight); None: when a call ends."""
        slots, duty = self._slots()
        in_flight = self._in_flight if in_flight is None else in_flight
        if in_flight >= slots:
            return None
        if in_flight == slots - 1 and duty < 1.0:
            return max(0.0, self._partial_ready - now)
        return 0.0

    @property
    def waiting(self) -> int:
        return sum(not w.future.done() for w in self._waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def close(self) -> None:
        """Stop sending; waiters not yet admitted fail with `DispatcherClosed` (their
        frames stay in their mailboxes), calls in flight end."""
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(DispatcherClosed("the detector dispatcher closed"))
        await asyncio.gather(*self._calls, return_exceptions=True)

    def _branch_starved(self) -> bool:
        s = self._settings
        if self._branches is None or s.branch_hold_s <= 0:
            return False
        return self._branches.starved(s.branch_grace_s, s.branch_window_s)

    def _held(self) -> bool:
        """Whether the next call waits for branch work: starved, and a call outstanding
        or the last one started less than branch_hold_s ago."""
        if not self._branch_starved():
            return False
        recent = time.monotonic() - self._last_start < self._settings.branch_hold_s
        return self._in_flight > 0 or recent

    async def _wait_change(self, timeout: float | None = None) -> None:
        self._changed.clear()
        if timeout is None:
            await self._changed.wait()
            return
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
        # cancellation (close() cancels this task) when the event is set meanwhile.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def _run(self) -> None:
        try:
            while True:
                while self._waiting and self._waiting[0].future.done():
                    self._waiting.popleft()  # cancelled before its turn
                if not self._waiting:
                    return
                free_in = self._free_in(time.monotonic())
                if free_in is None or free_in > 0:
                    self._end_hold()
                    await self._wait_change(free_in)  # a call ends, or the last slot frees
                    continue
                if self._held():
                    # Starved branch work: one detector call at a time, branch_hold_s
                    # apart, until it catches up (never none: detection never stops).
                    self._end_hold()
                    start = time.monotonic()
                    while self._held():
                        await asyncio.sleep(0.02)
                    self.stats.holds += 1
                    self.stats.held_s += time.monotonic() - start
                    continue  # waiters may have been cancelled meanwhile
                hold_s = self._hold_for_next(time.monotonic())
                if hold_s > 0:
                    # Until the frame is due (its arrival wakes nobody here), a call ends
                    # or a waiter is cancelled; then look again.
                    await self._wait_change(hold_s)
                    continue
                self._start_call()
        finally:
            self._end_hold()

    def _hold_for_next(self, now: float) -> float:
        """How long the last free call still waits for the first waiter's next frame (0:
        send now). It waits when that waiter's live frame is at least half its camera's
        frame interval old and the next one is due within `hold_for_next_s`, until the
        next one has come or is `NEXT_FRAME_SLACK_S` overdue."""
        waiter, hold = self._waiting[0], self._hold  # _run dropped the cancelled in front
        # Only a call that no other could start beside now waits (none idles with it).
        last_free = self._free_in(now, self._in_flight + 1) != 0.0
        if hold is not None and hold.waiter is waiter and last_free:
            timing = waiter.timing() if waiter.timing is not None else None
            if timing is None or timing.seq != hold.seq or now >= hold.until:
                return self._end_hold()  # its next frame came, or will not: send
            return min(hold.until - now, max(timing.interval_s - timing.age_s, 0.0) + POLL_S)
        self._end_hold()
        limit = self._settings.hold_for_next_s
        if (
            limit <= 0
            or not last_free
            or not waiter.live
            or waiter.timing is None
            or self._settings.live_frames_per_call != 1
            or self._branch_starved()  # its calls carry many frames: none waits for one
        ):
            return 0.0
        timing = waiter.timing()
        if (
            timing is None
            or timing.interval_s < MIN_INTERVAL_S
            or (id(waiter), timing.seq) == self._last_hold  # held once (then interrupted)
        ):
            return 0.0
        due = timing.interval_s - timing.age_s
        if not 0 < due <= min(limit, timing.interval_s / 2):
            return 0.0
        self._hold = _Hold(waiter, timing.seq, now, now + due + NEXT_FRAME_SLACK_S)
        self._last_hold = (id(waiter), timing.seq)
        self.stats.next_frame_holds += 1
        return due + POLL_S

    def _waited_long(self, now: float, waiter: _Waiter) -> bool:
        limit = self._settings.overloaded_wait_s
        return limit > 0 and now - waiter.since > limit

    def _end_hold(self) -> float:
        if self._hold is not None:
            self.stats.next_frame_held_s += time.monotonic() - self._hold.start
            self._hold = None
        return 0.0

    def _start_call(self) -> None:
        batch: list[tuple[DetectRequest, _Waiter]] = []
        now = time.monotonic()
        settings, live = self._settings, False
        # Starved branch work: calls go one at a time, so each carries what it can (the
        # least detector CPU per frame); a frame's wait is then the hold's, not the call's.
        short = settings.live_frames_per_call if not self._branch_starved() else None
        while self._waiting:
            waiter = self._waiting[0]
            if waiter.future.done():
                self._waiting.popleft()
                continue
            # A call that holds a live frame is as short as live calls are.
            limit = short if (live or waiter.live) and short is not None else None
            if len(batch) >= (limit or settings.max_frames_per_call):
                break  # it goes first in the next call
            self._waiting.popleft()
            try:
                request = waiter.take()
            except Exception as exc:  # a bad frame fails its own subscription only
                waiter.future.set_exception(exc)
                continue
            if request is None:
                waiter.future.set_result(None)
                continue
            self.stats.wait_ms.append((now - waiter.since) * 1000)
            if waiter.live and self._branches is not None and self._waited_long(now, waiter):
                self._branches.detector_waited()
            batch.append((request, waiter))
            live = live or waiter.live
        if not batch:
            return
        self._last_start = now
        self._in_flight += 1
        self.stats.calls += 1
        self.stats.frames += len(batch)
        task = asyncio.create_task(self._call(batch, self.waiting, now))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(
        self, batch: list[tuple[DetectRequest, _Waiter]], waiting: int, started: float
    ) -> None:
        answered = replica_free = False
        try:
            # Bounded: a hung replica must not hold one of the calls for ever.
            results = await asyncio.wait_for(
                self._send([request for request, _ in batch], waiting),
                self._settings.call_timeout_s,
            )
            if len(results) != len(batch):
                raise RuntimeError(f"detector answered {len(results)} of {len(batch)} frames")
        except asyncio.CancelledError:
            for _, waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(DispatcherClosed("the detector call was stopped"))
            raise
        except Exception as exc:
            for _, waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
        else:
            answered = True
            self.stats.answered += sum(not isinstance(r, Exception) for r in results)
            # Only read when it may skip the fractional slot's idle (below).
            replica_free = self._settings.fill_free_replicas and all(
                isinstance(r, DetectResult) and r.backlog == 0 for r in results
            )
            for (_, waiter), result in zip(batch, results, strict=True):
                if waiter.future.done():
                    continue
                if isinstance(result, Exception):
                    waiter.future.set_exception(result)
                else:
                    waiter.future.set_result(result)
        finally:
            slots, duty = self._slots()
            if answered and self._in_flight >= slots and duty < 1.0:
                # It frees the fractional slot: idle (1/duty - 1) × its call's time, at
                # most MAX_IDLE_S (a failed or timed-out call says nothing of the pace),
                # unless its replica had no other frames: the cluster has room now.
                now = time.monotonic()
                if replica_free:
                    self._partial_ready = now
                    self.stats.idles_skipped += 1
                else:
                    idle = (now - started) * (1.0 / duty - 1.0)
                    self._partial_ready = now + min(idle, MAX_IDLE_S)
                    self.stats.idles += 1
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
            "next_frame_holds": s.next_frame_holds,
            "next_frame_held_s": round(s.next_frame_held_s, 2),
            "waiting": self.waiting,
            "in_flight_calls": self._in_flight,
            "share": self._share,
            "slot_idles": s.idles,
            "slot_idles_skipped": s.idles_skipped,
            "branch_holds": s.holds,
            "branch_held_s": round(s.held_s, 2),
        }
