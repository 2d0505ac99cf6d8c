"""What one ingress replica keeps between requests: short-lived caches of figures that
many clients ask for (host load, the stream listing), and its WebSocket count."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import psutil

from graph.control import ControlPlane

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


class Cached(Generic[T]):
    """A value fetched at most once per `ttl_s`, one fetch at a time whoever asks; the
    fetch gets the previous value (to keep it when the source fails)."""

    def __init__(self, fetch: Callable[[T], Awaitable[T]], ttl_s: float, initial: T) -> None:
        self._fetch, self._ttl_s = fetch, ttl_s
        self._at, self._value = float("-inf"), initial
        self._lock = asyncio.Lock()

    async def get(self) -> T:
        async with self._lock:
            if time.monotonic() - self._at >= self._ttl_s:
                self._value = await self._fetch(self._value)
                self._at = time.monotonic()
            return self._value


async def measure_system(_: dict[str, Any] | None = None) -> dict[str, Any]:
    """Host CPU, memory and (where nvidia-smi exists) GPU load."""
    report: dict[str, Any] = {
        "cpuUsage": psutil.cpu_percent(interval=None),
        "memoryUsage": psutil.virtual_memory().percent,
        "gpuUsage": None,
        "gpuMemoryUsage": None,
    }
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            out = await asyncio.to_thread(
                subprocess.run,
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used,memory.total",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=5,
            )
            rows = [list(map(float, r.split(","))) for r in out.stdout.strip().splitlines()]
            if rows:
                report["gpuUsage"] = round(sum(r[0] for r in rows) / len(rows), 1)
                used, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
                report["gpuMemoryUsage"] = round(100 * used / total, 1) if total else None
    return report


class ReplicaState:
    """The replica's cached host load and stream listing (every WebSocket's stateReport
    reads both), and how many WebSockets it holds open."""

    def __init__(self, control: ControlPlane, timeout_s: float) -> None:
        self._control, self._timeout_s = control, timeout_s
        psutil.cpu_percent(interval=None)  # primes it: its first answer is always 0.0
        self._system: Cached[dict[str, Any]] = Cached(measure_system, 1.0, {})
        self._streams: Cached[list[dict[str, Any]]] = Cached(self._list_streams, 1.0, [])
        self.ws_clients = 0

    async def system(self) -> dict[str, Any]:
        """Host load, measured at most once a second."""
        return await self._system.get()

    async def streams(self) -> list[dict[str, Any]]:
        """`GET /streams`' list, fetched at most once a second (the last one kept while
        the registry does not answer)."""
        return await self._streams.get()

    async def _list_streams(self, previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            listing = await asyncio.wait_for(
                self._control.registry.list_streams.remote(), self._timeout_s
            )
            streams: list[dict[str, Any]] = listing["streams"]
        except Exception as exc:
            logger.warning("stateReport: stream registry: %s", type(exc).__name__)
            return previous
        return streams
