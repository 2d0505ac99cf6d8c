"""Waiting helpers for the delivery tests (outbox, sinks, archive routes): each waits for
a condition by deadline, since a loaded CI machine makes any fixed count of polls short."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from deployments.delivery.service import ActionService


def subscribed(client: redis.Redis, channel: str) -> Any:
    """A pubsub on `channel`, once Redis confirmed the subscription (10 s at most)."""
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=1)
        if msg is not None and msg["type"] == "subscribe":
            return pubsub
    raise AssertionError(f"no subscribe confirmation for {channel} within 10 s")


def published(pubsub: Any, expected: int) -> list[bytes]:
    """The messages received: until `expected` came (10 s at most), then any more that
    arrive within half a second (a duplicate would)."""
    received: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(received) < expected and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.5)
        if msg is not None and msg["type"] == "message":
            received.append(msg["data"])
    while (msg := pubsub.get_message(timeout=0.5)) is not None:
        if msg["type"] == "message":
            received.append(msg["data"])
    return received


async def drained(service: ActionService, timeout_s: float = 60.0) -> dict[str, Any]:
    """The service's health once its outbox is empty (AssertionError after `timeout_s`:
    a retry backs off up to 10 s, so a loaded machine may need several)."""
    deadline = time.monotonic() + timeout_s
    while (health := await service.health())["outbox"][0]["depth"] > 0:
        assert time.monotonic() < deadline, f"outbox not drained in {timeout_s} s: {health}"
        await asyncio.sleep(0.05)
    return health
