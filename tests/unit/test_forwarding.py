"""The camera side's queue of rendered actions (no Ray): bounded, retried, never stuck."""

from __future__ import annotations

import asyncio

import pytest

from deployments.delivery.outbox import OutboxEntry
from stream_actors.forwarding import ActionForwarder, BacklogFull


def entry(key: str, blob: bytes | None = None) -> OutboxEntry:
    return OutboxEntry(key, "postgres", {"type": "upsert"}, blob)


def test_a_hand_over_that_never_returns_is_retried_and_nothing_is_lost() -> None:
    received: list[str] = []
    calls = 0

    async def send(entries: list[OutboxEntry]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(3600)  # a replica that went silent
        received.extend(e.key for e in entries)
        return len(entries)

    async def run() -> ActionForwarder:
        forwarder = ActionForwarder(send, timeout_s=0.2)
        await forwarder.submit([entry("a"), entry("b")])
        assert await forwarder.flush(10)
        await forwarder.stop()
        return forwarder

    forwarder = asyncio.run(run())
    assert received == ["a", "b"]
    status = forwarder.status()
    assert status["sent"] == 2 and status["pending"] == 0
    assert status["send_errors"] == 1 and "TimeoutError" in (status["last_error"] or "")


def test_the_backlog_is_bounded_by_bytes_and_refusals_are_counted() -> None:
    async def never(entries: list[OutboxEntry]) -> int:
        raise ConnectionError("the Actions deployment is away")

    async def run() -> ActionForwarder:
        forwarder = ActionForwarder(never, max_bytes=4096)
        await forwarder.submit([entry("a", b"x" * 2000)])
        with pytest.raises(BacklogFull):
            await forwarder.submit([entry("b", b"x" * 2000)])
        await forwarder.stop()
        return forwarder

    status = asyncio.run(run()).status()
    assert status["pending"] == 1 and status["refused"] == 1 and status["sent"] == 0
