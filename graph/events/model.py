"""Events a camera produces, and the sink interface they are handed to.

Per processed frame a `DetectionEvent` (tracked detections in full-frame pixels, each
with its track's latest branch results once there are some) and, when the stability
validator says so, `ObjectEvent`s (new stable object, updated, lost); per improvement of a
stable object's branch results, a `result` event (`result_event`).
The camera actor hands them to an `EventSink`; the protocols (WebSocket, SSE, gRPC)
connect through the same interface: `HubPublisher` batches them to the EventHub without
blocking. `RingBufferSink` keeps the newest events per subscription in the camera actor,
so `GET /streams/{id}/events` can ask for what came after an id.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from stream_actors.stability import ObjectEvent

# Per branch model id, what clients are told of an object: {"label", "confidence"}.
BranchResults = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class TrackedDetection:
    track_id: int | None  # None: detected but not (yet) tracked
    class_id: int
    label: str
    confidence: float
    box: tuple[float, float, float, float]  # x1 y1 x2 y2, full-frame pixels
    stable: bool
    # The track's latest branch results, as its last `result` event told them (None: none).
    results: BranchResults | None = field(default=None, hash=False)


@dataclass(frozen=True)
class StreamEvent:
    """One event of one subscription. `kind` is "detection", an object lifecycle kind, or
    "result": a stable object's branch results (body type, plate, ...) appeared or changed,
    or "state": the subscription's stream changed state (`state_event`)."""

    kind: Literal["detection", "new", "updated", "lost", "result", "state"]
    subscription_id: str
    camera_id: str
    model_id: str
    frame_seq: int
    captured_at: float  # wall clock of the frame's capture
    detected_at: float  # wall clock when the detector answered
    detections: tuple[TrackedDetection, ...] = ()
    obj: ObjectEvent | None = None
    id: int = 0  # assigned by a sink that numbers events
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def branch_results(results: dict[str, dict[str, Any]]) -> BranchResults:
    """What clients are told of an object's branch results (the runner's winners, which
    also hold the class and aliases): per branch, the winning label and its vote share."""
    return {
        branch: {"label": r["label"], "confidence": r["confidence"]}
        for branch, r in results.items()
    }


def result_event(
    subscription_id: str,
    camera_id: str,
    model_id: str,
    track_id: int,
    class_name: str,
    results: dict[str, dict[str, Any]],
    model_name: str | None = None,
) -> StreamEvent:
    """A `result` event: the object's winning label and vote share per branch;
    `model_name` as on the subscription's other events (when it has one)."""
    extra: dict[str, Any] = {
        "track_id": track_id,
        "class": class_name,
        "results": branch_results(results),
    }
    if model_name:
        extra["model_name"] = model_name
    return _frameless("result", subscription_id, camera_id, model_id, extra)


def state_event(
    subscription_id: str, camera_id: str, model_id: str, state: str, last_error: str | None
) -> StreamEvent:
    """A `state` event: the subscription's stream went to `state` (today only `failed`:
    it gave up after `streams.max_retries`), with its last error."""
    extra = {"state": state, "last_error": last_error}
    return _frameless("state", subscription_id, camera_id, model_id, extra)


def _frameless(
    kind: Literal["result", "state"],
    subscription_id: str,
    camera_id: str,
    model_id: str,
    extra: dict[str, Any],
) -> StreamEvent:
    """An event of no particular frame (frame_seq -1), stamped now."""
    now = time.time()
    return StreamEvent(
        kind,
        subscription_id,
        camera_id,
        model_id,
        frame_seq=-1,
        captured_at=now,
        detected_at=now,
        extra=extra,
    )


class EventSink(Protocol):
    def publish(self, events: list[StreamEvent]) -> None:
        """Take a batch of events; must not block the camera (drop and count instead)."""


class RingBufferSink:
    """Keeps the newest `capacity` events per subscription, numbered upwards from
    `first_id` + 1."""

    def __init__(self, capacity: int = 512, first_id: int = 0) -> None:
        self.capacity = capacity
        # A camera actor passes a restart-safe base: polls with `after=` from before a
        # restart must not skip the new actor's events.
        self._ids = itertools.count(first_id + 1)
        self._rings: dict[str, deque[StreamEvent]] = {}
        self._lock = threading.Lock()
        self.dropped = 0

    def publish(self, events: list[StreamEvent]) -> None:
        with self._lock:
            for event in events:
                ring = self._rings.setdefault(event.subscription_id, deque())
                if len(ring) >= self.capacity:
                    ring.popleft()
                    self.dropped += 1
                ring.append(_with_id(event, next(self._ids)))

    def after(
        self, subscription_id: str, after_id: int = 0, limit: int = 1000
    ) -> list[StreamEvent]:
        with self._lock:
            ring = self._rings.get(subscription_id, deque())
            return [e for e in ring if e.id > after_id][:limit]

    def forget(self, subscription_id: str) -> None:
        with self._lock:
            self._rings.pop(subscription_id, None)


def _with_id(event: StreamEvent, event_id: int) -> StreamEvent:
    from dataclasses import replace

    return replace(event, id=event_id)


def _hub_detection(d: TrackedDetection) -> dict[str, Any]:
    item: dict[str, Any] = {
        "track_id": d.track_id,
        "class_id": d.class_id,
        "label": d.label,
        "confidence": d.confidence,
        "box": d.box,
        "stable": d.stable,
    }
    if d.results is not None:  # only a track with branch results: others are as before
        item["results"] = d.results
    return item


def hub_event(event: StreamEvent) -> dict[str, Any]:
    """A stream event as the EventHub's JSON dict (topic `sub:<subscription id>`)."""
    data: dict[str, Any] = {
        "frame_seq": event.frame_seq,
        "captured_at": event.captured_at,
        "detected_at": event.detected_at,
    }
    if event.kind == "detection":  # by hand: asdict() deep-copies, per frame per box
        data["detections"] = [_hub_detection(d) for d in event.detections]
    if event.obj is not None:
        data["object"] = asdict(event.obj)
    data.update(event.extra)
    return {
        "topic": f"sub:{event.subscription_id}",
        "type": event.kind,
        "time": event.detected_at,
        "camera_id": event.camera_id,
        "subscription_id": event.subscription_id,
        "display_id": event.subscription_id.split(";", 1)[0],
        "model_id": event.model_id,
        "data": data,
    }


class FanoutSink:
    """Hands every batch to several sinks (the local ring and the hub publisher)."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def publish(self, events: list[StreamEvent]) -> None:
        for sink in self.sinks:
            sink.publish(events)


class HubPublisher:
    """Batches events for the EventHub without ever blocking the camera: `publish` only
    appends to a bounded buffer (the oldest drop, counted, when the hub is slow or gone);
    `run` sends what accumulated every `interval_s`, one batch in flight at a time. A
    batch that failed (or timed out: it may still have arrived) is sent again as it was,
    under the same (publisher id, sequence) key, so the hub stores it once."""

    def __init__(
        self,
        send: Callable[[list[dict[str, Any]], tuple[str, int]], Awaitable[Any]],
        max_buffer: int = 4096,
        interval_s: float = 0.1,  # one hub call per camera actor per 100 ms at most
        batch: int = 500,
        timeout_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._send = send
        self._buffer: deque[dict[str, Any]] = deque()
        self.max_buffer, self.interval_s, self.batch = max_buffer, interval_s, batch
        self.timeout_s, self.max_backoff_s = timeout_s, max_backoff_s
        self._lock = threading.Lock()
        self.publisher_id = uuid.uuid4().hex
        self._seq = 0
        self._unsent: list[dict[str, Any]] | None = None  # the batch of sequence _seq
        self.sent = self.dropped = self.send_errors = 0
        self.failures_in_row = 0
        self.last_error: str | None = None

    def publish(self, events: list[StreamEvent]) -> None:
        self.publish_dicts([hub_event(e) for e in events])

    def publish_dicts(self, events: list[dict[str, Any]]) -> None:
        """Events already in the hub's JSON shape (media jobs publish these)."""
        with self._lock:
            for event in events:
                if len(self._buffer) >= self.max_buffer:
                    self._buffer.popleft()
                    self.dropped += 1
                self._buffer.append(event)

    def _next_batch(self) -> list[dict[str, Any]]:
        if self._unsent is None:
            with self._lock:
                n = min(self.batch, len(self._buffer))
                events = [self._buffer.popleft() for _ in range(n)]
            if not events:
                return []
            self._seq += 1
            self._unsent = events
        return self._unsent

    async def flush(self) -> int:
        """Send everything buffered now; returns how many were sent. A failed batch is
        kept and sent again next round."""
        total = 0
        while events := self._next_batch():
            try:
                key = (self.publisher_id, self._seq)
                await asyncio.wait_for(self._send(events, key), self.timeout_s)
            except Exception as exc:  # the hub restarting or gone: retry later
                self.send_errors += 1
                self.failures_in_row += 1
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                return total
            self._unsent = None
            self.sent += len(events)
            self.failures_in_row = 0
            self.last_error = None
            total += len(events)
        return total

    async def run(self) -> None:
        while True:
            backoff = self.interval_s * 2 ** min(self.failures_in_row, 10)
            await asyncio.sleep(min(backoff, max(self.max_backoff_s, self.interval_s)))
            await self.flush()

    def status(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._buffer) + len(self._unsent or ())
        return {
            "pending": pending,
            "sent": self.sent,
            "dropped": self.dropped,
            "send_errors": self.send_errors,
            "last_error": self.last_error,
        }
