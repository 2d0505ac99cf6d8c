"""Sinks at an archive's own servers (`actions.archive_connections: use`; no Ray).

Entries of an opted-in pipeline name their sink by route (`redis@<digest>`,
`graph.pipeline.connections`). The first entry of a route builds its sink: a RedisSink or
a PostgresSink over its own small pool, at the URL the route resolves to (the config's
archives, else the catalog actor for modelUrl archives). A route that cannot be resolved
yet (the catalog restarting, the pipeline not loaded again) is a sink that is down: its
entries wait in the outbox and none is lost or reordered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from deployments.delivery.outbox import OutboxEntry, Sink, SinkUnavailable
from deployments.delivery.sinks import PostgresSink, RedisSink, postgres_pool
from graph.common.redaction import redact
from graph.common.schemas import ActionsSettings
from graph.pipeline.connections import ROUTE_NAME, Route

Resolver = Callable[[str], Awaitable[Route | None]]
RESOLVE_TIMEOUT_S = 5.0
logger = logging.getLogger("camgraph.actions")


class RouteSink:
    """One route's sink, built at its first entry."""

    def __init__(self, name: str, resolve: Resolver, settings: ActionsSettings) -> None:
        self.name = name
        self._resolve, self._settings = resolve, settings
        self._inner: Any = None
        self._pool: Any = None
        self.route: Route | None = None
        self._resolving: asyncio.Task[None] | None = None
        self._warned = False
        self.error: str | None = None

    def _sink(self) -> Any:
        """The built sink; else a resolution starts in the background and this entry
        waits (SinkUnavailable): a delivery round never blocks on a lookup."""
        if self._inner is not None:
            return self._inner
        if self._resolving is None or self._resolving.done():
            self._resolving = asyncio.get_running_loop().create_task(self._build())
        raise SinkUnavailable(f"{self.name}: {self.error or 'resolving its connection'}")

    async def _build(self) -> None:
        try:
            route = await asyncio.wait_for(self._resolve(self.name), RESOLVE_TIMEOUT_S)
        except Exception as exc:
            self.error = f"resolving its connection failed: {type(exc).__name__}"
            return
        if route is None:
            self.error = "its pipeline's connection is not known here (entries wait)"
            if not self._warned:  # once per route: its entries wait, visibly
                logger.warning("actions: route %s is not known: its entries wait", self.name)
                self._warned = True
            return
        settings = self._settings
        if route.sink == "redis":
            inner: Any = RedisSink(
                route.url,
                connect_timeout_s=settings.connect_timeout_s,
                timeout_s=settings.operation_timeout_s,
            )
        else:
            self._pool = postgres_pool(route.url, settings.connect_timeout_s, 0, 2)
            await self._pool.open(wait=False)
            inner = PostgresSink(
                self._pool,
                route.schema,
                settings.create_tables,
                timeout_s=settings.operation_timeout_s,
            )
        inner.name = self.name  # outages are tracked per route
        self._inner, self.route, self.error = inner, route, None
        logger.info("actions: route %s resolved", self.name)

    async def apply(self, entry: OutboxEntry) -> None:
        await self._sink().apply(entry)

    def describe(self) -> dict[str, Any]:
        """For /health: where the route goes (password masked), once known."""
        if self.route is None:
            return {"kind": "archive", "resolved": False, "error": self.error}
        return {
            "kind": f"archive {self.route.sink}",
            "url": redact(self.route.url),
            **({"schema": self.route.schema} if self.route.sink == "postgres" else {}),
        }

    async def close(self) -> None:
        if isinstance(self._inner, RedisSink):
            await self._inner.close()
        if self._pool is not None:
            await self._pool.close()


class RoutedSinks(dict[str, Sink]):
    """The deployment's sinks by role, and a route's sink made at its first lookup.
    Without `resolve` (archive_connections: ignore), a route's entries (written while
    it was `use`) go to the deployment's sink of their role, never to the dead list."""

    def __init__(
        self, base: dict[str, Sink], resolve: Resolver | None, settings: ActionsSettings
    ) -> None:
        super().__init__(base)
        self._resolve, self._settings = resolve, settings

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        sink = super().get(name)
        if sink is None and ROUTE_NAME.fullmatch(name):
            if self._resolve is None:
                return super().get(name.partition("@")[0], default)
            sink = self[name] = RouteSink(name, self._resolve, self._settings)
        return sink if sink is not None else default
