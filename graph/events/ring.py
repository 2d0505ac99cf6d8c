"""The event log of the EventHub (no Ray): per-topic bounded ring buffers of events with
one increasing id sequence across topics, the reader's filter, and the restart-safe
first id.

Producers publish batches of JSON-ready event dicts; a reader reads with a cursor (the
last id it saw) and a filter, so a client can resume from its `Last-Event-ID` on any
ingress replica. Topics are `sub:<subscription>` and `job:<job id>`; each keeps its
newest `capacity` events, so a busy camera never evicts a quiet one's. A reader that fell
behind is told how many of its events were evicted. The displays' session ids
(`setSessionId` of the WebSocket protocol) are kept here too, so every replica stamps the
same `session_id` on a display's events; sessions' data and the records they key live in
the stream registry (`stream_actors.sessions`).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

EVENT_FIELDS = (
    "camera_id",
    "subscription_id",
    "display_id",
    "model_id",
    "session_id",
    "job_id",
)


@dataclass
class EventFilter:
    """Which events a reader wants; None means any. Matching is exact per field."""

    cameras: set[str] | None = None
    subscriptions: set[str] | None = None
    types: set[str] | None = None
    jobs: set[str] | None = None

    @classmethod
    def of(cls, raw: dict[str, Any] | None) -> EventFilter:
        raw = raw or {}

        def values(name: str) -> set[str] | None:
            v = raw.get(name)
            return None if v is None else {str(x) for x in v}

        return cls(values("cameras"), values("subscriptions"), values("types"), values("jobs"))

    def to_dict(self) -> dict[str, list[str] | None]:
        def out(v: set[str] | None) -> list[str] | None:
            return None if v is None else sorted(v)

        return {
            "cameras": out(self.cameras),
            "subscriptions": out(self.subscriptions),
            "types": out(self.types),
            "jobs": out(self.jobs),
        }

    def matches(self, event: dict[str, Any]) -> bool:
        checks = (
            (self.cameras, "camera_id"),
            (self.subscriptions, "subscription_id"),
            (self.types, "type"),
            (self.jobs, "job_id"),
        )
        return all(want is None or event.get(key) in want for want, key in checks)

    def could_match_topic(self, topic: str) -> bool:
        """A cheap pre-check on the topic name (sub:<id> / job:<id>)."""
        kind, _, name = topic.partition(":")
        if kind == "sub":
            if self.jobs is not None:
                return False
            return self.subscriptions is None or name in self.subscriptions
        if kind == "job":
            if self.subscriptions is not None or self.cameras is not None:
                return False
            return self.jobs is None or name in self.jobs
        return True


@dataclass
class _Topic:
    events: deque[dict[str, Any]]
    evicted: deque[tuple[int, str]]  # newest evicted (id, type): what a reader missed
    fields: dict[str, Any]  # camera / subscription / job of the topic's events
    evicted_total: int = 0
    published: int = 0


@dataclass
class ReadResult:
    events: list[dict[str, Any]]
    cursor: int  # the id to read after next time
    missed: int  # matching events evicted between the old cursor and the new one
    last_id: int = 0
    epoch: str = ""  # changes when the hub restarts (and numbers from 1 again)
    # What was missed, by camera / subscription / job / type, so a reader serving several
    # clients can tell each only of its own: [{camera_id, subscription_id, job_id, type,
    # count}].
    missed_detail: list[dict[str, Any]] = field(default_factory=list)
    first_id: int = 0  # ids of this hub are above it: a resume from below it is older

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "cursor": self.cursor,
            "missed": self.missed,
            "last_id": self.last_id,
            "epoch": self.epoch,
            "missed_detail": self.missed_detail,
            "first_id": self.first_id,
        }


def _event_id(event: dict[str, Any]) -> int:
    return int(event["id"])


def restart_safe_first_id(now: float | None = None) -> int:
    """Milliseconds since 1970 × 1000: a restarted numbering starts above the previous
    one's ids as long as it gave fewer than 1000 ids per millisecond on average, and stays
    below 2**53 (exact in JavaScript) until the year 2255."""
    return int((time.time() if now is None else now) * 1000) * 1000


@dataclass
class EventLog:
    """Bounded per-topic rings; ids increase across all topics (1, 2, ...)."""

    capacity: int = 1024
    max_topics: int = 10_000
    first_id: int = 0  # ids start above it (a restarted hub's, above the old one's)
    last_id: int = 0
    _topics: OrderedDict[str, _Topic] = field(default_factory=OrderedDict)
    sessions: dict[str, Any] = field(default_factory=dict)  # display id → session id
    topics_dropped: int = 0
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    max_sessions: int = 100_000
    max_publishers: int = 100_000
    duplicates: int = 0
    # Publisher id → the last batch sequence stored: a batch sent again (its first send
    # timed out but arrived, or Ray retried it) is stored once.
    _batches: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.last_id = max(self.last_id, self.first_id)

    def publish(
        self,
        events: list[dict[str, Any]],
        now: float | None = None,
        batch: tuple[str, int] | None = None,
    ) -> int:
        """Number each event, stamp its display's session, append it to its topic.
        `batch` = (publisher id, sequence): a sequence already stored is ignored."""
        if batch is not None:
            publisher, seq = batch
            if seq <= self._batches.get(publisher, -1):
                self.duplicates += 1
                return self.last_id
            self._batches[publisher] = seq
            self._batches.move_to_end(publisher)
            while len(self._batches) > self.max_publishers:
                self._batches.popitem(last=False)
        stamp = time.time() if now is None else now
        for raw in events:
            topic_name = str(raw.get("topic") or "misc")
            event = {k: raw.get(k) for k in EVENT_FIELDS}
            event.update(raw)
            self.last_id += 1
            event["id"] = self.last_id
            event["topic"] = topic_name
            event.setdefault("time", stamp)
            event.setdefault("data", {})
            display = event.get("display_id")
            if event.get("session_id") is None and display in self.sessions:
                event["session_id"] = self.sessions[display]
            topic = self._topics.get(topic_name)
            if topic is None:
                fields = {k: event.get(k) for k in ("camera_id", "subscription_id", "job_id")}
                topic = self._topics[topic_name] = _Topic(
                    deque(), deque(maxlen=4 * self.capacity), fields
                )
                while len(self._topics) > self.max_topics:  # the least recently used goes
                    self._topics.popitem(last=False)
                    self.topics_dropped += 1
            else:
                self._topics.move_to_end(topic_name)
            if len(topic.events) >= self.capacity:
                old = topic.events.popleft()
                topic.evicted.append((int(old["id"]), str(old.get("type"))))
                topic.evicted_total += 1
            topic.events.append(event)
            topic.published += 1
        return self.last_id

    def read(self, after_id: int, flt: EventFilter | None = None, limit: int = 1000) -> ReadResult:
        """Matching events with ids above `after_id`, oldest first, at most `limit`.
        `missed` counts matching events evicted in (after_id, cursor]: the reader was too
        slow (or resumed too late) for them. Counted exactly for the newest 4 × capacity
        evictions per topic, as a lower bound beyond."""
        flt = flt or EventFilter()
        streams = []
        evicted: list[tuple[int, dict[str, Any], str]] = []
        for name, topic in self._topics.items():
            newest = topic.events[-1]["id"] if topic.events else 0
            if newest <= after_id and not (topic.evicted and topic.evicted[-1][0] > after_id):
                continue  # nothing new here: most topics, for a reader that keeps up
            if not flt.could_match_topic(name):
                continue
            start = bisect.bisect_right(topic.events, after_id, key=_event_id)
            streams.append(e for e in itertools.islice(topic.events, start, None) if flt.matches(e))
            for i, kind in reversed(topic.evicted):
                if i <= after_id:
                    break
                if flt.matches({**topic.fields, "type": kind}):
                    evicted.append((i, topic.fields, kind))
        found = list(itertools.islice(heapq.merge(*streams, key=_event_id), limit + 1))
        if len(found) > limit:
            found = found[:limit]
            cursor = int(found[-1]["id"])
        else:
            cursor = max(after_id, self.last_id)
        detail: dict[tuple[Any, ...], int] = {}
        for i, fields, kind in evicted:
            if i <= cursor:
                key = (fields["camera_id"], fields["subscription_id"], fields["job_id"], kind)
                detail[key] = detail.get(key, 0) + 1
        missed_detail = [
            {"camera_id": c, "subscription_id": s, "job_id": j, "type": t, "count": n}
            for (c, s, j, t), n in detail.items()
        ]
        missed = sum(d["count"] for d in missed_detail)
        return ReadResult(
            found, cursor, missed, self.last_id, self.epoch, missed_detail, self.first_id
        )

    def set_session(self, display_id: str, session_id: Any) -> None:
        """Set (or with None clear) a display's session, stamped on its later events. At
        most `max_sessions` displays (oldest go). Its data (patchSession) and what it
        keys (records) live in the stream registry."""
        self.sessions.pop(display_id, None)
        if session_id is not None:
            self.sessions[display_id] = session_id  # newest last
            while len(self.sessions) > self.max_sessions:
                self.sessions.pop(next(iter(self.sessions)))

    def stats(self) -> dict[str, Any]:
        return {
            "last_id": self.last_id,
            "topics": len(self._topics),
            "events": sum(len(t.events) for t in self._topics.values()),
            "evicted": sum(t.evicted_total for t in self._topics.values()),
            "topics_dropped": self.topics_dropped,
            "capacity_per_topic": self.capacity,
            "sessions": len(self.sessions),
            "duplicate_batches": self.duplicates,
            "epoch": self.epoch,
        }
