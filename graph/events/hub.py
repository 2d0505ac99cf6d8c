"""EventHub: the shared event log of one app as a Ray actor.

`EventLog` (graph.events.ring) is the pure log; `EventHubService` adds long-poll reads
and the restart numbering, and `EventHub` is that class as a Ray actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import ray

from graph.events.ring import EventFilter, EventLog, restart_safe_first_id


class EventHubService:
    """The shared event log of one app: an `EventLog` with long-poll reads. `EventHub`
    below is this class as a Ray actor (detached, named `camgraph-events-<app>`); tests
    drive this class itself. Restarts empty with a new `epoch`, numbering its events from
    `restart_safe_first_id()`: above every id the previous hub gave, so a client's
    Last-Event-ID never skips the new hub's events; readers see the epoch change, and a
    resume from before this hub's start is told that events were lost."""

    def __init__(self, capacity: int = 1024, max_topics: int = 10_000) -> None:
        self._log = EventLog(
            capacity=capacity, max_topics=max_topics, first_id=restart_safe_first_id()
        )
        self._new = asyncio.Event()
        self._started = time.time()

    def publish_now(
        self, events: list[dict[str, Any]], batch: tuple[str, int] | None = None
    ) -> int:
        """Store a batch and wake the waiting readers; returns the last id."""
        last = self._log.publish(events, batch=batch)
        self._new.set()
        self._new = asyncio.Event()
        return last

    async def publish(
        self, events: list[dict[str, Any]], batch: tuple[str, int] | None = None
    ) -> int:
        return self.publish_now(events, batch)

    async def read(
        self,
        after_id: int,
        flt: dict[str, Any] | None = None,
        limit: int = 1000,
        wait_s: float = 0.0,
    ) -> dict[str, Any]:
        """Long-poll: waits up to `wait_s` for a matching event above `after_id`."""
        event_filter = EventFilter.of(flt)
        deadline = time.monotonic() + wait_s
        while True:
            result = self._log.read(after_id, event_filter, limit)
            remaining = deadline - time.monotonic()
            if result.events or result.missed or remaining <= 0 or after_id > self._log.last_id:
                return result.to_dict()
            waiter = self._new
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), remaining)

    async def last_id(self) -> int:
        return self._log.last_id

    async def set_session(self, display_id: str, session_id: Any) -> None:
        self._log.set_session(display_id, session_id)

    async def stats(self) -> dict[str, Any]:
        return {**self._log.stats(), "started": self._started}


EventHub = ray.remote(max_restarts=-1, max_task_retries=-1)(EventHubService)
