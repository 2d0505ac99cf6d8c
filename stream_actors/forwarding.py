"""Hands rendered actions from a camera actor to the Actions deployment (no Ray).

`submit` never waits on the network: entries queue here (bounded by bytes) and a
background task sends them in batches, retrying with backoff while the Actions
deployment cannot be reached (a replica restarting, the app redeploying). What is
queued here lives in the camera actor's memory until the outbox has it; the queue's
depth and any refusals are reported in the camera's status.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from deployments.delivery.outbox import OutboxEntry, backoff_s
from graph.common.errors import CamgraphError

logger = logging.getLogger("camgraph.actions")
SendFn = Callable[[list[OutboxEntry]], Awaitable[int]]


class BacklogFull(CamgraphError):
    """The camera's queue of unsent actions is full (the Actions deployment is away)."""


def entry_bytes(entry: OutboxEntry) -> int:
    return len(entry.blob or b"") + 512


class ActionForwarder:
    def __init__(
        self,
        send: SendFn,
        max_bytes: int = 64 * 1024**2,
        batch: int = 64,
        timeout_s: float = 60.0,
    ) -> None:
        self._send, self._max_bytes, self._batch = send, max_bytes, batch
        self._timeout_s = timeout_s
        self._queue: deque[OutboxEntry] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.send_errors = 0
        self.refused = 0
        self.last_error: str | None = None

    async def submit(self, entries: Sequence[OutboxEntry]) -> None:
        size = sum(entry_bytes(e) for e in entries)
        if self._bytes + size > self._max_bytes:
            self.refused += len(entries)
            raise BacklogFull(f"{len(self._queue)} actions ({self._bytes} bytes) not yet sent")
        self._queue.extend(entries)
        self._bytes += size
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._queue[i] for i in range(min(self._batch, len(self._queue)))]
            try:
                # Bounded: a call that never returns must not hold the queue for ever;
                # sending again is safe, the outbox ignores keys it already has.
                await asyncio.wait_for(self._send(batch), self._timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.send_errors += 1
                self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                logger.warning("actions not accepted (try %d): %s", failures, self.last_error)
                await asyncio.sleep(backoff_s(failures, base_s=0.5, cap_s=5.0))
                continue
            failures = 0
            for _ in batch:
                self._bytes -= entry_bytes(self._queue.popleft())
            self.sent += len(batch)

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued was accepted (tests, shutdown)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._queue and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return not self._queue

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {
            "pending": len(self._queue),
            "pending_bytes": self._bytes,
            "sent": self.sent,
            "send_errors": self.send_errors,
            "refused": self.refused,
            "last_error": self.last_error,
        }


def rerouted(
    submit: Callable[[Sequence[OutboxEntry]], Awaitable[None]], routes: dict[str, str]
) -> Callable[[Sequence[OutboxEntry]], Awaitable[None]]:
    """`submit` with each entry's sink renamed by `routes` (sink → route name)."""

    async def send(entries: Sequence[OutboxEntry]) -> None:
        await submit([replace(e, sink=routes.get(e.sink, e.sink)) for e in entries])

    return send
