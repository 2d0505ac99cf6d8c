"""The Actions deployment's core (no Ray): accept rendered actions into the outbox, deliver
them in the background, report sinks, depth and lag.

Outbox choice: PostgreSQL when configured (shared by replicas), else a SQLite file. While
the PostgreSQL outbox cannot be written, entries go to the SQLite spill file for
`outbox_failover_s` at a time, so a submit never waits on a database that is down;
delivery drains both.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deployments.delivery.outbox import (
    DeliveryReport,
    Outbox,
    OutboxEntry,
    OutboxUnavailable,
    PostgresOutbox,
    Sink,
    SqliteOutbox,
    run_delivery,
)
from deployments.delivery.routes import Resolver, RoutedSinks, RouteSink
from deployments.delivery.sinks import LocalStoreSink, PostgresSink, RedisSink, postgres_pool
from graph.common.schemas import ActionsSettings
from graph.pipeline.connections import Route

logger = logging.getLogger("camgraph.actions")


def redact_dsn(dsn: str) -> str:
    """A DSN or URL without its password; `graph.common.redaction.redact`, the one
    definition."""
    from graph.common.redaction import redact

    return redact(dsn)


RECENT = 1000  # delivered entries kept in memory for GET /records (the live view)


def delivered_summary(entry: OutboxEntry, store: str, at: float) -> dict[str, Any]:
    """What a person wants to see of a delivered entry: its kind, where it went and, for
    a record, its fields; never the image bytes."""
    op = entry.op
    summary: dict[str, Any] = {"delivered_at": at, "store": store, "sink": entry.sink}
    summary["type"] = op.get("type")
    names = ("table", "object_key", "key_field", "fields", "key", "ttl_s", "channel", "message")
    for name in (*names, "slot"):
        if name in op:
            summary[name] = op[name]
    if "seq" in op:
        summary["revision"] = op["seq"]
    if entry.blob is not None:
        summary["bytes"] = len(entry.blob)
    return summary


class ActionService:
    def __init__(
        self,
        settings: ActionsSettings,
        base_dir: Path,
        environ: dict[str, str] | None = None,
        on_report: Callable[[str, DeliveryReport], None] | None = None,
        routes: dict[str, Route] | None = None,
        lookup: Resolver | None = None,
    ) -> None:
        """`routes` / `lookup`: the archives' own connections by route name (from the
        config's archives / asked of the catalog), used with archive_connections: use."""
        env = dict(os.environ if environ is None else environ)
        self.settings = settings
        data_dir = (
            settings.data_dir if settings.data_dir.is_absolute() else base_dir / settings.data_dir
        )
        self.data_dir = data_dir
        self._redis_url = settings.redis(env)
        self._pg_dsn = settings.postgres(env)
        self._pool: Any = None
        self._local: LocalStoreSink | None = None
        self.sinks: dict[str, Sink] = {}
        if self._redis_url:
            self.sinks["redis"] = RedisSink(
                self._redis_url,
                connect_timeout_s=settings.connect_timeout_s,
                timeout_s=settings.operation_timeout_s,
            )
        if self._pg_dsn:
            self._pool = postgres_pool(self._pg_dsn, settings.connect_timeout_s, 1, 4)
            self.sinks["postgres"] = PostgresSink(
                self._pool,
                settings.postgres_schema,
                settings.create_tables,
                timeout_s=settings.operation_timeout_s,
            )
        if not self._redis_url or not self._pg_dsn:
            self._local = LocalStoreSink(data_dir, "local")
            self.sinks.setdefault("redis", self._local)
            self.sinks.setdefault("postgres", self._local)
        known = dict(routes or {})

        async def resolve(name: str) -> Route | None:
            if name not in known and lookup is not None:
                found = await lookup(name)
                if found is not None:
                    known[name] = found
            return known.get(name)

        # Routes of archives' own servers (archive_connections: use); when ignored, the
        # entries a route still has go to the deployment's sink of their role.
        use = settings.archive_connections == "use"
        self.sinks = RoutedSinks(self.sinks, resolve if use else None, settings)
        self.spill = SqliteOutbox(data_dir / "outbox.sqlite")
        use_pg = settings.outbox == "postgres" or (settings.outbox == "auto" and self._pg_dsn)
        if settings.outbox == "postgres" and not self._pg_dsn:
            raise ValueError("actions.outbox is postgres but no PostgreSQL DSN is configured")
        self.primary: Outbox = (
            PostgresOutbox(
                self._pool, settings.postgres_schema, timeout_s=settings.operation_timeout_s
            )
            if use_pg
            else self.spill
        )
        self._spill_until = 0.0
        self._on_report = on_report
        self._task: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.counts: Counter[str] = Counter(
            dict.fromkeys(("accepted", "spilled", "delivered", "retried", "dead"), 0)
        )

    @property
    def outboxes(self) -> list[Outbox]:
        return [self.primary] if self.primary is self.spill else [self.primary, self.spill]

    async def start(self) -> None:
        """Open the pool (without waiting for the database) and start delivering."""
        if self._task is not None:
            return
        if self._pool is not None:
            await self._pool.open(wait=False)
        self._task = asyncio.get_running_loop().create_task(
            run_delivery(
                self.outboxes,
                self.sinks,
                self._report,
                max_attempts=self.settings.max_attempts,
            )
        )

        self._purger = asyncio.get_running_loop().create_task(self._purge_forever())

    async def _purge_forever(self, every_s: float = 60.0) -> None:
        """Delivered entries are kept `retention_s` (resubmits stay deduplicated)."""
        while True:
            await asyncio.sleep(every_s)
            for outbox in self.outboxes:
                try:
                    await outbox.purge(self.settings.retention_s)
                except Exception as exc:  # the next round tries again
                    logger.warning("purging %s failed: %s", outbox.name, exc)

    def _report(self, outbox: Outbox, report: DeliveryReport) -> None:
        now = time.time()
        self._recent.extend(delivered_summary(e, outbox.name, now) for e in report.applied)
        self.counts["delivered"] += report.delivered
        self.counts["retried"] += report.retried
        self.counts["dead"] += report.dead
        if self._on_report is not None:
            self._on_report(outbox.name, report)

    async def submit(self, entries: Sequence[OutboxEntry]) -> int:
        """Store entries durably (then they are delivered); returns how many were new."""
        await self.start()
        if not entries:
            return 0
        if self.primary is not self.spill and time.monotonic() >= self._spill_until:
            try:
                added = await self.primary.add(entries)
                self.counts["accepted"] += added
                return added
            except OutboxUnavailable as exc:
                logger.warning("outbox %s unavailable, spilling: %s", self.primary.name, exc)
                self._spill_until = time.monotonic() + self.settings.outbox_failover_s
        added = await self.spill.add(entries)
        self.counts["accepted"] += added
        self.counts["spilled"] += added * (self.primary is not self.spill)
        return added

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The last entries the sinks took on this replica, newest first (no images)."""
        return list(itertools.islice(reversed(self._recent), limit))

    async def outbox_stats(self) -> list[dict[str, Any]]:
        out = []
        for outbox in self.outboxes:
            try:
                out.append(await outbox.stats())
            except OutboxUnavailable as exc:
                out.append({"store": outbox.name, "error": str(exc)})
        return out

    def _pool_stats(self) -> dict[str, int]:
        """psycopg_pool's counters: size, idle, waiting clients, failed connects."""
        if self._pool is None:
            return {}
        keys = (
            "pool_size",
            "pool_available",
            "requests_waiting",
            "connections_errors",
            "connections_lost",
            "requests_errors",
        )
        stats = self._pool.get_stats()
        return {k: int(stats.get(k, 0)) for k in keys}

    async def health(self) -> dict[str, Any]:
        sinks: dict[str, Any] = {}
        for role, sink in list(self.sinks.items()):
            if isinstance(sink, RouteSink):
                sinks[role] = sink.describe()
            elif isinstance(sink, LocalStoreSink):
                sinks[role] = {"kind": "local", "path": str(sink.data_dir)}
            elif isinstance(sink, RedisSink):
                sinks[role] = {
                    "kind": "redis",
                    "url": redact_dsn(sink.url),
                    "up": await sink.ping(),
                }
            else:
                sinks[role] = {
                    "kind": "postgres",
                    "dsn": redact_dsn(self._pg_dsn or ""),
                    "schema": self.settings.postgres_schema,
                    "pool": self._pool_stats(),
                }
        return {
            "sinks": sinks,
            "outbox": await self.outbox_stats(),
            "delivering": self._task is not None and not self._task.done(),
            **self.counts,
        }

    async def close(self) -> None:
        tasks = [t for t in (self._task, self._purger) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        redis = self.sinks.get("redis")
        if isinstance(redis, RedisSink):
            await redis.close()
        for sink in list(self.sinks.values()):
            if isinstance(sink, RouteSink):
                await sink.close()
        if self._pool is not None:
            await self._pool.close()
        self.spill.close()
