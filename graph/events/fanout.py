"""Events from the EventHub to this ingress replica's clients (no Ray: the hub's `read` is
injected, so the logic is tested against the hub's own class, `EventHubService`).

One pump per replica long-polls the hub with its cursor and fans each event out to the
clients whose filter matches. Each client has a bounded queue: a client whose sender falls
behind loses its oldest events, counted, and is told with a `dropped` notice; it never
slows the pump, the hub or the cameras. (Serve's ASGI `send` in a replica never waits, so
a slow link shows here only as far as this replica's own sending; past it, the proxy
buffers, and drops a client that stops reading when it stops answering pings.)
`follow()` first replays what the hub still holds after a client's last event id (resume),
then continues live without gaps or repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from graph.events.ring import EventFilter

logger = logging.getLogger("ray.serve")
LATEST = 2**62  # a cursor above any id: the hub answers at once with its last id
ReadFn = Callable[[int, dict[str, Any] | None, int, float], Awaitable[dict[str, Any]]]


def dropped_notice(count: int, reason: str) -> dict[str, Any]:
    """What a client is told when events it wanted were dropped."""
    return {"type": "dropped", "count": count, "reason": reason}


# Queued to every client when the hub restarted; `follow` turns it into a notice.
HUB_RESTARTED: dict[str, Any] = {"type": "_hub_restarted"}


def sse_frame(event: dict[str, Any] | None) -> str:
    """One server-sent event: `id` (hub events only), `event` (the type), `data` (JSON);
    None is a heartbeat comment."""
    if event is None:
        return ": heartbeat\n\n"
    head = f"id: {event['id']}\n" if "id" in event else ""
    return f"{head}event: {event['type']}\ndata: {json.dumps(event)}\n\n"


class ClientQueue:
    """One client's bounded queue. `flt` may be changed while it runs (a WebSocket
    subscribing to more cameras)."""

    def __init__(self, flt: EventFilter, capacity: int) -> None:
        self.flt = flt
        self.capacity = capacity
        self._events: deque[dict[str, Any]] = deque()
        self._ready = asyncio.Event()
        self.dropped_slow = 0  # not yet told
        self.dropped_evicted = 0
        self.dropped_total = 0
        self.closed = False

    def put(self, event: dict[str, Any]) -> None:
        if len(self._events) >= self.capacity:
            self._events.popleft()
            self.dropped_slow += 1
            self.dropped_total += 1
        self._events.append(event)
        self._ready.set()

    def missed(self, count: int) -> None:
        self.dropped_evicted += count
        self.dropped_total += count
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def take(self, timeout_s: float | None) -> list[dict[str, Any]]:
        """Notices first, then the queued events; [] after `timeout_s` without any."""
        if not self._events and not self.dropped_slow and not self.dropped_evicted:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)
        out: list[dict[str, Any]] = []
        if self.dropped_slow:
            out.append(dropped_notice(self.dropped_slow, "slow_client"))
            self.dropped_slow = 0
        if self.dropped_evicted:
            out.append(dropped_notice(self.dropped_evicted, "evicted"))
            self.dropped_evicted = 0
        out += self._events
        self._events.clear()
        return out


class EventFanout:
    """The replica's pump over the hub and its clients' queues."""

    def __init__(
        self, read: ReadFn, client_capacity: int = 256, wait_s: float = 5.0, limit: int = 1000
    ) -> None:
        self._read = read
        self.client_capacity = client_capacity
        self.wait_s, self.limit = wait_s, limit
        self._clients: set[ClientQueue] = set()
        self._task: asyncio.Task[None] | None = None
        self.cursor: int | None = None  # the hub id the pump has read up to
        self.epoch: str | None = None  # the hub's, to notice its restarts
        self.hub_restarts = 0
        self.pump_errors = 0
        self.last_error: str | None = None
        self._started = asyncio.Event()
        self.latencies_ms: deque[float] = deque(maxlen=2000)  # capture → this replica

    def register(self, flt: EventFilter) -> ClientQueue:
        queue = ClientQueue(flt, self.client_capacity)
        self._clients.add(queue)
        if self._task is None or self._task.done():
            # A new pump starts from now; its older events are a resume's to read.
            self.cursor = None
            self._started.clear()
            # An empty context: the pump must not belong to the request that started it
            # (Serve cancels a request's calls when its client goes).
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._pump(), context=contextvars.Context())
        return queue

    def unregister(self, queue: ClientQueue) -> None:
        queue.close()
        self._clients.discard(queue)

    async def _pump(self) -> None:
        while self._clients:
            try:
                if self.cursor is None:  # start from now: older events are a resume's
                    first = await self._read(LATEST, None, 1, 0.0)
                    self.cursor, self.epoch = int(first["last_id"]), first["epoch"]
                    self._started.set()
                result = await self._read(self.cursor, None, self.limit, self.wait_s)
                self._fan_out(result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the hub restarting: retry, clients keep waiting
                # Also a malformed answer or event: the pump must outlive it, or every
                # client of this replica would go silent until a new one registers.
                self.pump_errors += 1
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                logger.warning("event pump: reading the hub failed: %s", self.last_error)
                await asyncio.sleep(1.0)

    def _fan_out(self, result: dict[str, Any]) -> None:
        """One answer of the hub to the clients whose filter matches; moves the cursor."""
        if result["epoch"] != self.epoch:  # the hub restarted: it numbers from 1 again
            logger.warning("event pump: the hub restarted; reading from its start")
            self.epoch, self.cursor = result["epoch"], 0
            self.hub_restarts += 1
            for client in list(self._clients):
                client.put(dict(HUB_RESTARTED))
            return
        now = time.time()
        self.cursor = int(result["cursor"])
        for event in result["events"]:
            try:
                data = event.get("data")
                captured = data.get("captured_at") if isinstance(data, dict) else None
                if isinstance(captured, int | float):
                    self.latencies_ms.append((now - captured) * 1000.0)
                for client in list(self._clients):
                    if client.flt.matches(event):
                        client.put(event)
            except Exception as exc:  # one malformed event is skipped, not the batch
                self.pump_errors += 1
                self.last_error = f"skipped event: {type(exc).__name__}: {str(exc)[:200]}"
                logger.warning("event pump: %s", self.last_error)
        for lost in result["missed_detail"]:  # the pump fell behind: tell whom it concerns
            for client in list(self._clients):
                if client.flt.matches(lost):
                    client.missed(int(lost["count"]))

    async def started(self) -> int:
        await self._started.wait()
        assert self.cursor is not None
        return self.cursor

    async def follow(
        self,
        flt: EventFilter,
        after_id: int | None = None,
        idle_s: float | None = None,
        queue: ClientQueue | None = None,
    ) -> AsyncIterator[dict[str, Any] | None]:
        """Events for one client: the hub's backlog after `after_id` (a resume), then
        live events; `dropped` notices where some were lost; None every `idle_s`
        without events (for heartbeats). Pass `queue` to keep a handle on the filter."""
        queue = queue or self.register(flt)
        try:
            last_sent = 0
            if after_id is not None:
                # While the hub cannot be read the pump has no live start yet: the client
                # gets heartbeats meanwhile, not a silent connection a proxy may close.
                started = asyncio.ensure_future(self.started())
                try:
                    while not started.done():
                        await asyncio.wait([started], timeout=idle_s)
                        if not started.done():
                            yield None
                finally:
                    started.cancel()
                live_from = started.result()
                cursor = after_id
                told_restart = False
                while cursor < live_from:
                    result = await self._read(cursor, flt.to_dict(), self.limit, 0.0)
                    # (after_id == first_id: the client saw this hub's start, nothing lost)
                    if 0 < after_id < int(result.get("first_id", 0)) and not told_restart:
                        # The client's last event came from a hub before this one: what
                        # was published between that and this hub's start is gone.
                        told_restart = True
                        yield dropped_notice(0, "hub_restarted")
                    if result["missed"]:
                        yield dropped_notice(int(result["missed"]), "evicted")
                    for event in result["events"]:
                        yield event
                        last_sent = int(event["id"])
                    if int(result["cursor"]) <= cursor:
                        break
                    cursor = int(result["cursor"])
            while not queue.closed:
                batch = await queue.take(idle_s)
                if not batch:
                    yield None
                for event in batch:
                    if event is HUB_RESTARTED or event.get("type") == HUB_RESTARTED["type"]:
                        last_sent = 0  # the new hub numbers afresh
                        yield dropped_notice(0, "hub_restarted")
                        continue
                    if "id" in event:
                        if int(event["id"]) <= last_sent or not queue.flt.matches(event):
                            continue  # already replayed, or unsubscribed meanwhile
                        last_sent = int(event["id"])
                    yield event
        finally:
            self.unregister(queue)

    def status(self) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

        return {
            "clients": len(self._clients),
            "capture_to_event_ms": {"p50": pct(0.5), "p95": pct(0.95), "n": len(latencies)},
            "cursor": self.cursor,
            "pump_errors": self.pump_errors,
            "hub_restarts": self.hub_restarts,
            "last_error": self.last_error,
            "dropped": sum(c.dropped_total for c in self._clients),
        }
