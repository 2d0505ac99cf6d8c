"""Events a camera produces, and the sink interface they are handed to.

Per processed frame a `DetectionEvent` (tracked detections in full-frame pixels) and,
when the stability validator says so, `ObjectEvent`s (new stable object, updated, lost).
The camera actor hands them to an `EventSink`; the protocols (WebSocket, SSE, gRPC)
connect their hub through the same interface. `RingBufferSink` keeps the newest events
per subscription with increasing ids, so a poller can ask for what came after an id.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from stream_actors.stability import ObjectEvent


@dataclass(frozen=True)
class TrackedDetection:
    track_id: int | None  # None: detected but not (yet) tracked
    class_id: int
    label: str
    confidence: float
    box: tuple[float, float, float, float]  # x1 y1 x2 y2, full-frame pixels
    stable: bool


@dataclass(frozen=True)
class StreamEvent:
    """One event of one subscription. `kind` is "detection" or an object lifecycle kind."""

    kind: Literal["detection", "new", "updated", "lost"]
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


class EventSink(Protocol):
    def publish(self, events: list[StreamEvent]) -> None:
        """Take a batch of events; must not block the camera (drop and count instead)."""


class RingBufferSink:
    """Keeps the newest `capacity` events per subscription, numbered from 1 upwards."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._ids = itertools.count(1)
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
