"""The per-frame flow of one subscription (no Ray): newest frame → crop → letterbox →
detector (at most `max_in_flight` frames outstanding) → the pipeline's `expectedClasses`
→ tracker → stability → events.

The detector is injected. The camera actor passes its dispatcher's `admit`
(`dispatch.py`): the subscription says it is ready and its newest frame is taken only
when the dispatcher can send it, in one call with other subscriptions' frames. Tests may
pass a plain coroutine function instead (a real engine), called once per frame. Either
raises `DetectorBusy` for a frame the detector refused (queue full): a drop, not an
error. Results are handled strictly in frame order (the tracker needs that) even when
two frames are in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import numpy as np
from pydantic import Field

from graph.common.detection import DetectRequest, DetectResult
from graph.common.errors import DetectorBusy
from graph.common.schemas import StrictModel
from graph.common.vision import RECT_STRIDE, DetectParams, letterbox, unletterbox_boxes
from graph.events.model import (
    BranchResults,
    EventSink,
    StreamEvent,
    TrackedDetection,
    result_event,
)
from graph.pipeline.plan import PipelinePlan
from graph.pipeline.runner import PipelineRunner
from stream_actors.dispatch import AdmitFn, FrameTimingFn, TakeFn
from stream_actors.mailbox import DropReason, Frame, LatestFrameMailbox
from stream_actors.meter import RateMeter
from stream_actors.stability import StabilityRules, StabilityValidator
from stream_actors.subscriptions import Subscription
from stream_actors.tracking import Tracker, TrackerConfig

logger = logging.getLogger("camgraph.streams")

DetectFn = Callable[[str, DetectRequest], Coroutine[Any, Any, DetectResult]]


def _p50(values: Iterable[float]) -> float | None:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], 1) if ordered else None


def direct(detect: DetectFn, model_id: str) -> AdmitFn:
    """An admission that takes the frame at once and calls `detect` with it alone."""

    async def admit(take: TakeFn, live: bool, timing: FrameTimingFn | None) -> DetectResult | None:
        request = take()
        return None if request is None else await detect(model_id, request)

    return admit


class _Taken:
    """What a subscription's admission took: set by its take function, read by the
    consumer (None: nothing taken yet, so nothing to count as dropped)."""

    __slots__ = ("at", "claim_open", "failed", "frame", "lb", "offset")

    def __init__(self) -> None:
        self.frame: Frame | None = None
        self.at = 0.0  # wall clock when it was taken (sent to the detector)
        self.lb: Any = None
        self.offset = (0, 0)
        self.failed = False  # taken, but its preparation raised
        self.claim_open = True  # admitted or given up on: no longer blocks the next one


class ProcessingSettings(StrictModel):
    max_in_flight: int = Field(
        2,
        ge=1,
        le=2,
        description="frames per camera at the detector or waiting for admission: a second "
        "one is taken only when the dispatcher sends it, so it pipelines decode and "
        "detection without queueing stale frames at the replicas",
    )
    max_frame_age_s: float = Field(2.0, gt=0, le=60, description="older frames are dropped")
    conf: float = Field(0.1, gt=0, le=1, description="detector threshold (ByteTrack uses lows)")
    iou: float = Field(0.7, ge=0, le=1)
    max_det: int = Field(300, ge=1, le=3000)
    error_pause_s: float = Field(0.5, ge=0, le=30, description="pause after a detector error")
    detect_timeout_s: float = Field(
        30.0, gt=0, le=600, description="a detector call that takes longer is dropped"
    )
    # 0.8 s: at 1 frame/s (a tenth of a 10 fps camera: an overloaded detector), two
    # hits make a track stable, where min_hits took 3 s; at 2 frame/s and more,
    # min_hits comes first. Rules given in full (here or per subscription) leave it
    # out unless they name it.
    stability: StabilityRules = StabilityRules(min_stable_s=0.8)
    tracker: TrackerConfig = TrackerConfig()


class SubscriptionProcessor:
    def __init__(
        self,
        sub: Subscription,
        model_id: str,
        imgsz: int,
        detect: DetectFn | None,
        sink: EventSink,
        settings: ProcessingSettings,
        runner: PipelineRunner | None = None,
        *,
        admit: AdmitFn | None = None,
    ) -> None:
        self.sub, self.model_id, self.imgsz = sub, model_id, imgsz
        self.runner = runner  # the pipeline's branches and actions, if the model has one
        if admit is None:
            if detect is None:
                raise ValueError("a processor needs detect or admit")
            admit = direct(detect, model_id)
        self._admit, self._sink, self._settings = admit, sink, settings
        self._wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:  # called from the reader thread
            loop.call_soon_threadsafe(self._wakeup.set)

        # A lossless file replay keeps every frame, however long it waits for the detector.
        # Cameras and paced files: frames worth their freshness (`fileRealtime` means
        # nothing for a camera, whatever a client sends).
        self._live = sub.fileUrl is None or sub.fileRealtime
        max_age = settings.max_frame_age_s if self._live else None
        self.mailbox = LatestFrameMailbox(max_age, on_put=wake)
        # A live frame's age and interval: a free call may wait for the next frame.
        self._timing = self.mailbox.timing if self._live else None
        self._params = DetectParams(settings.conf, settings.iou, None, settings.max_det)
        self._tracker = Tracker(settings.tracker)
        self._stability = StabilityValidator(sub.stability or settings.stability)
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._pending: asyncio.Queue[tuple[_Taken, asyncio.Task[DetectResult | None]]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[Any]] = []
        # Admissions that have not taken their frame yet (0 or 1): a second one waits
        # for the next frame, so that frames are taken in order (the tracker needs it)
        # and never two admissions for one frame.
        self._open_claims = 0
        self._current: asyncio.Task[DetectResult | None] | None = None  # consumer's
        self.processed = 0
        self.last_error: str | None = None
        self.latencies_ms: deque[float] = deque(maxlen=512)  # capture → detection
        # capture → taken for the detector: the part of the latency that is the frame's
        # age when its turn came (the rest is the call: queue, inference, reply)
        self.take_ages_ms: deque[float] = deque(maxlen=512)
        self._done = RateMeter()
        self.stable_tracks = 0
        # Each live stable track's latest branch results, carried by its detections.
        self.track_results: dict[int, BranchResults] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._produce(), name=f"produce-{self.sub.subscriptionIdentifier}"),
            asyncio.create_task(self._consume(), name=f"consume-{self.sub.subscriptionIdentifier}"),
        ]

    async def stop(self) -> None:
        admissions = [task for _, task in self._pending_items()]
        if self._current is not None:
            admissions.append(self._current)
        for task in [*admissions, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *admissions, return_exceptions=True)
        if self.runner is not None:
            await self.runner.stop()

    def _pending_items(self) -> list[tuple[_Taken, asyncio.Task[DetectResult | None]]]:
        items = []
        while not self._pending.empty():
            items.append(self._pending.get_nowait())
        return items

    def _can_admit(self) -> bool:
        return self._open_claims == 0 and self.mailbox.ready()

    async def _frame_waiting(self) -> None:
        """Until the mailbox holds a frame that no admission is waiting for (the
        admission takes it when the dispatcher sends it)."""
        while not self._can_admit():
            self._wakeup.clear()
            if self._can_admit():  # a put may have landed between the check and clear
                return
            await self._wakeup.wait()

    def _close_claim(self, taken: _Taken) -> None:
        if taken.claim_open:
            taken.claim_open = False
            self._open_claims -= 1
            self._wakeup.set()  # a frame may already wait for the next admission

    def _claim_ended(self, taken: _Taken, _: object) -> None:
        self._close_claim(taken)  # the admission ended without taking (timeout, error)

    def _taker(self, taken: _Taken) -> TakeFn:
        def take() -> DetectRequest | None:
            self._close_claim(taken)
            frame = self.mailbox.take()
            if frame is None:
                return None  # too old by now (counted by the mailbox)
            taken.frame, taken.at = frame, time.time()
            try:
                boxed, taken.lb, taken.offset = self._prepare(frame)
            except Exception:
                taken.failed = True
                raise
            return DetectRequest(boxed, self._params)

        return take

    def _prepare(self, frame: Frame) -> tuple[np.ndarray, Any, tuple[int, int]]:
        image, offset = frame.image, (0, 0)
        crop = self.sub.crop
        if crop is not None:
            h, w = image.shape[:2]
            x1, y1, x2, y2 = (
                min(crop[0], w - 1),
                min(crop[1], h - 1),
                min(crop[2], w),
                min(crop[3], h),
            )
            image, offset = image[y1:y2, x1:x2], (x1, y1)
        boxed, lb = letterbox(image, self.imgsz, RECT_STRIDE)
        return boxed, lb, offset

    async def _produce(self) -> None:
        period = 1.0 / self.sub.targetFps if self.sub.targetFps else 0.0
        next_due = time.monotonic()
        while True:
            await self._slots.acquire()
            if period:
                delay = next_due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # frames arriving meanwhile are superseded
                next_due = max(next_due + period, time.monotonic())
            await self._frame_waiting()
            taken = _Taken()
            self._open_claims += 1
            # Bounded: a hung replica must not hold the subscription's only slot for ever.
            task = asyncio.ensure_future(
                asyncio.wait_for(
                    self._admit(self._taker(taken), self._live, self._timing),
                    self._settings.detect_timeout_s,
                )
            )
            task.add_done_callback(functools.partial(self._claim_ended, taken))
            await self._pending.put((taken, task))

    async def _consume(self) -> None:
        while True:
            taken, task = await self._pending.get()
            self._current = task
            # Waited on, not awaited: awaiting would pass a stop's cancellation into the
            # admission, whose wait_for can swallow it when the result is already in
            # (Python 3.11), and the subscription would never stop.
            await asyncio.wait({task})
            self._current = None
            try:
                result = task.result()
            except DetectorBusy:
                self.mailbox.record_drop(DropReason.BACK_PRESSURE)
                continue
            except asyncio.CancelledError:
                # The frame's call was stopped (this task's own stop raises in wait):
                # an error for the frame, not for the camera.
                self._failed(taken, RuntimeError("the detector call was cancelled"))
                await asyncio.sleep(self._settings.error_pause_s)
                continue
            except Exception as exc:
                self._failed(taken, exc)
                await asyncio.sleep(self._settings.error_pause_s)
                continue
            finally:
                self._slots.release()
            if result is None or taken.frame is None:
                continue  # its frame grew too old before its turn (counted)
            try:
                self._handle(taken.frame, taken.lb, taken.offset, result, taken.at)
            except Exception as exc:  # a bug must not kill the camera: report it
                self.mailbox.record_drop(DropReason.PROCESSING_ERROR)
                logger.exception("%s: processing failed", self.sub.subscriptionIdentifier)
                self.last_error = f"processing: {type(exc).__name__}: {exc}"

    def _failed(self, taken: _Taken, exc: BaseException) -> None:
        """A frame's admission or call failed: its frame (if it was taken) is counted
        dropped, and the error is said."""
        if taken.frame is not None:  # else its frame is still in the mailbox
            reason = DropReason.PROCESSING_ERROR if taken.failed else None
            self.mailbox.record_drop(reason or DropReason.DETECTOR_ERROR)
        timeout = self._settings.detect_timeout_s
        if isinstance(exc, TimeoutError):
            self.last_error = (
                f"detector: no answer within {timeout:g}s"
                if taken.frame is not None
                else f"detector: no capacity within {timeout:g}s"
            )
        else:
            where = "processing" if taken.failed else "detector"
            self.last_error = f"{where}: {type(exc).__name__}: {str(exc)[:300]}"
        logger.warning("%s: %s", self.sub.subscriptionIdentifier, self.last_error)

    def _handle(
        self,
        frame: Frame,
        lb: Any,
        offset: tuple[int, int],
        result: DetectResult,
        taken_at: float,
    ) -> None:
        detected_at = time.time()
        rows = np.array(result.rows, np.float32).reshape(-1, 6)  # replies are read-only
        rows[:, :4] = unletterbox_boxes(rows[:, :4], lb)
        rows[:, [0, 2]] += offset[0]
        rows[:, [1, 3]] += offset[1]
        names = result.names
        if self.runner is not None and self.runner.plan.expected_classes is not None:
            rows = rows[self._expected(rows, names, self.runner.plan)]
        tracked = self._tracker.update(rows, frame.captured_at)
        seen = (offset[0], offset[1], offset[0] + lb.orig_w, offset[1] + lb.orig_h)
        object_events = self._stability.update(
            [o for _, o in tracked], frame.seq, frame.captured_at, seen
        )
        stable = self._stability.stable_ids()
        self.stable_tracks = len(stable)
        lost = [e.track_id for e in object_events if e.kind == "lost"]
        known = self.track_results
        for track_id in lost:
            known.pop(track_id, None)
        track_of = {index: ob.track_id for index, ob in tracked}
        track_ids = [track_of.get(i) for i in range(len(rows))]
        detections = tuple(
            TrackedDetection(
                track_id,
                int(c),
                names.get(int(c), str(int(c))),
                round(float(s), 4),
                (round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)),
                track_id in stable,
                None if track_id is None else known.get(track_id),
            )
            for track_id, (x1, y1, x2, y2, s, c) in zip(track_ids, rows.tolist(), strict=True)
        )
        self.processed += 1
        self._done.mark()
        self.latencies_ms.append((detected_at - frame.captured_at) * 1000)
        self.take_ages_ms.append((taken_at - frame.captured_at) * 1000)
        self.last_error = None
        common = {
            "subscription_id": self.sub.subscriptionIdentifier,
            "camera_id": self.sub.camera_id,
            "model_id": self.model_id,
            "frame_seq": frame.seq,
            "captured_at": frame.captured_at,
            "detected_at": detected_at,
        }
        extra = {"model_name": self.sub.modelName} if self.sub.modelName else {}
        events = [StreamEvent("detection", detections=detections, extra=extra, **common)]  # type: ignore[arg-type]
        events += [StreamEvent(e.kind, obj=e, extra=extra, **common) for e in object_events]  # type: ignore[arg-type]
        self._sink.publish(events)
        if self.runner is not None:
            self.runner.observe(frame.image, frame.captured_at, frame.seq, detections, lost, seen)

    @staticmethod
    def _expected(rows: np.ndarray, names: dict[int, str], plan: PipelinePlan) -> np.ndarray:
        """Which rows the pipeline expects (the detector-worker's `expectedClasses`): the
        others are dropped before tracking, so they never become tracks, events' items
        or triggers."""
        return np.fromiter(
            (plan.keeps(names.get(int(c), str(int(c)))) for c in rows[:, 5]), bool, len(rows)
        )

    def on_result(self, track_id: int, class_name: str, results: dict[str, dict[str, Any]]) -> None:
        """The pipeline runner's hook, once per improvement of a stable object's branch
        results: clients get a `result` event, and the track's detections carry the
        results from the next frame on, until it is lost (a pass that ends after its
        track was lost still tells clients, and keeps nothing)."""
        event = result_event(
            self.sub.subscriptionIdentifier,
            self.sub.camera_id,
            self.model_id,
            track_id,
            class_name,
            results,
            self.sub.modelName,
        )
        if track_id in self._stability.stable_ids():
            self.track_results[track_id] = event.extra["results"]
        self._sink.publish([event])

    def fps(self, window_s: float = 5.0) -> float:
        return self._done.rate(window_s)

    def status(self) -> dict[str, Any]:
        return {
            "subscription_id": self.sub.subscriptionIdentifier,
            "camera_id": self.sub.camera_id,
            "model_id": self.model_id,
            "target_fps": self.sub.targetFps,
            "fps_processed": round(self.fps(), 2),
            "processed": self.processed,
            "stable_tracks": self.stable_tracks,
            "latency_ms_p50": _p50(self.latencies_ms),
            "take_age_ms_p50": _p50(self.take_ages_ms),
            "last_error": self.last_error,
            **{k: v for k, v in self.mailbox.stats().items() if k != "pending"},
            **({"pipeline": self.runner.status()} if self.runner is not None else {}),
        }
