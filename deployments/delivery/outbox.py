"""The durable outbox of actions (no Ray): every rendered action is stored before any
delivery is tried, then delivered to its sink with retries and backoff.

Two stores with one behaviour: `PostgresOutbox` (a table; several Actions replicas share
it, claiming rows with `FOR UPDATE SKIP LOCKED`) and `SqliteOutbox` (a local file, the
embedded default and the spill store while PostgreSQL is unreachable). Each entry has a
unique idempotency key, so a submit that is retried after a lost reply stores nothing
twice, and every sink applies an entry idempotently, so an entry delivered twice (a crash
between the sink's write and `done`) changes nothing.

An entry is claimed with a lease: a replica that dies mid-delivery leaves rows that come
due again when the lease runs out. Connection failures are retried for ever (a sink
outage delays data, it never loses it, and rounds in which the sink was down do not
count); an entry the sink rejects (say, a column type that does not take the value) is
retried until it was rejected `max_attempts` times, then kept as dead for an operator,
never deleted. While a sink is down, every entry of it gets the same delay each round,
so they come due again in their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from graph.common.errors import CamgraphError

logger = logging.getLogger("camgraph.actions")
T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")
TABLE = "camgraph_outbox"


class SinkUnavailable(CamgraphError):
    """The sink cannot be reached now (connection refused, timeout): retry later."""


class SinkRejected(CamgraphError):
    """The sink refused this entry (bad value, missing column): retrying may not help."""


class OutboxUnavailable(CamgraphError):
    """The outbox store cannot be written (its database is down)."""


@dataclass(frozen=True)
class OutboxEntry:
    """One rendered action, ready for its sink (`op` is JSON; `blob` e.g. a JPEG)."""

    key: str  # idempotency key, unique
    sink: str  # "redis" or "postgres"
    op: dict[str, Any]
    blob: bytes | None = None
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Claimed:
    id: int
    entry: OutboxEntry
    rejections: int  # times a sink rejected it so far (outage rounds do not count)


class Outbox(Protocol):
    name: str

    async def add(self, entries: Sequence[OutboxEntry]) -> int:
        """Store entries durably; returns how many were new (known keys are skipped)."""

    async def claim(self, limit: int, lease_s: float) -> list[Claimed]:
        """Due, undelivered, unleased entries, oldest first, leased to the caller."""

    async def done(self, ids: Sequence[int]) -> None: ...

    async def retry(
        self, item: Claimed, error: str, delay_s: float, dead: bool, rejected: bool = False
    ) -> None: ...

    async def stats(self) -> dict[str, Any]:
        """depth (undelivered, not dead), dead, oldest_age_s (delivery lag)."""

    async def purge(self, older_than_s: float) -> int:
        """Forget entries delivered longer ago than this."""


def backoff_s(attempts: int, base_s: float = 0.5, cap_s: float = 10.0) -> float:
    """Exponential backoff with full jitter in its upper half."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempts - 1))
    return ceiling * (0.5 + random.random() / 2)


def _row_entry(key: str, sink: str, op: str, blob: Any, created_at: float) -> OutboxEntry:
    return OutboxEntry(
        key, sink, json.loads(op), bytes(blob) if blob is not None else None, created_at
    )


def off_loop(
    method: Callable[Concatenate[S, P], T],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """A blocking SQLite method as a coroutine run in a worker thread, one at a time per
    object (`self._lock`): fsync-ing writes never block the Actions event loop."""

    @functools.wraps(method)
    async def run(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        def locked() -> T:
            with self._lock:  # type: ignore[attr-defined]
                return method(self, *args, **kwargs)

        return await asyncio.to_thread(locked)

    return run


@contextlib.contextmanager
def sqlite_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A real transaction on a connection in autocommit mode (where `with db:` alone
    starts none): committed whole, or rolled back on any failure, COMMIT's included."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SqliteOutbox:
    """Outbox in a local SQLite file (WAL, synchronous=FULL: a row is on disk once `add`
    returns). Safe for several processes on one machine (leases, one writer at a time)."""

    def __init__(self, path: Path) -> None:
        self.name = f"sqlite:{path}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # one thread at a time on the connection
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            f"""CREATE TABLE IF NOT EXISTS {TABLE} (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                key TEXT NOT NULL UNIQUE,
                sink TEXT NOT NULL,
                op TEXT NOT NULL,
                blob BLOB,
                created_at REAL NOT NULL,
                next_at REAL NOT NULL DEFAULT 0,
                lease_until REAL NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                dead INTEGER NOT NULL DEFAULT 0,
                delivered_at REAL)"""
        )
        self._db.execute(
            f"CREATE INDEX IF NOT EXISTS {TABLE}_due ON {TABLE} (delivered_at, dead, next_at)"
        )

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return sqlite_transaction(self._db)

    @off_loop
    def add(self, entries: Sequence[OutboxEntry]) -> int:
        rows = [
            (e.key, e.sink, json.dumps(e.op), e.blob, e.created_at, e.created_at) for e in entries
        ]
        with self._transaction():  # one transaction: all rows or none, one fsync
            before = self._db.total_changes
            self._db.executemany(
                f"INSERT OR IGNORE INTO {TABLE} (key, sink, op, blob, created_at, next_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            return self._db.total_changes - before

    @off_loop
    def claim(self, limit: int, lease_s: float) -> list[Claimed]:
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._db.execute(
                f"""UPDATE {TABLE} SET lease_until = ?
                WHERE id IN (SELECT id FROM {TABLE} WHERE delivered_at IS NULL AND dead = 0
                    AND next_at <= ? AND lease_until <= ? ORDER BY id LIMIT ?)
                RETURNING id, key, sink, op, blob, created_at, attempts""",
                (now + lease_s, now, now, limit),
            ).fetchall()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return sorted((Claimed(r[0], _row_entry(*r[1:6]), r[6]) for r in rows), key=lambda c: c.id)

    @off_loop
    def done(self, ids: Sequence[int]) -> None:
        with self._transaction():
            self._db.executemany(
                f"UPDATE {TABLE} SET delivered_at = ?, blob = NULL, lease_until = 0 WHERE id = ?",
                [(time.time(), i) for i in ids],
            )

    @off_loop
    def retry(
        self, item: Claimed, error: str, delay_s: float, dead: bool, rejected: bool = False
    ) -> None:
        with self._transaction():
            self._db.execute(
                f"UPDATE {TABLE} SET next_at = ?, lease_until = 0, last_error = ?, dead = ?,"
                " attempts = attempts + ? WHERE id = ?",
                (time.time() + delay_s, error[:1000], int(dead), int(rejected), item.id),
            )

    @off_loop
    def purge(self, older_than_s: float) -> int:
        """Forget delivered entries (their keys stop deduplicating resubmits)."""
        with self._transaction():
            cur = self._db.execute(
                f"DELETE FROM {TABLE} WHERE delivered_at < ?", (time.time() - older_than_s,)
            )
            return cur.rowcount

    @off_loop
    def stats(self) -> dict[str, Any]:
        depth, dead, oldest = self._db.execute(
            f"""SELECT coalesce(sum(dead = 0), 0), coalesce(sum(dead), 0),
                min(CASE WHEN dead = 0 THEN created_at END)
            FROM {TABLE} WHERE delivered_at IS NULL"""
        ).fetchone()
        return _stats(self.name, depth, dead, oldest)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _stats(name: str, depth: int, dead: int, oldest: float | None) -> dict[str, Any]:
    lag = max(0.0, time.time() - oldest) if oldest is not None else 0.0
    return {"store": name, "depth": int(depth), "dead": int(dead), "oldest_age_s": round(lag, 3)}


class PostgresOutbox:
    """Outbox table in PostgreSQL, shared by every Actions replica (psycopg_pool async)."""

    def __init__(self, pool: Any, schema: str, timeout_s: float = 10.0) -> None:
        from psycopg import sql

        self.name = f"postgres:{schema}.{TABLE}"
        self._pool = pool
        self._timeout_s = timeout_s
        self._table = sql.Identifier(schema, TABLE)
        self._schema = sql.Identifier(schema)
        self._ready = False
        self._lock = asyncio.Lock()

    async def _ensure(self, conn: Any) -> None:
        if self._ready:
            return
        import psycopg
        from psycopg import sql

        async with self._lock:
            if self._ready:
                return
            # UniqueViolation / DuplicateObject: another replica created it at that moment.
            with contextlib.suppress(
                psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject
            ):
                await self._create(conn, sql)
            self._ready = True

    async def _create(self, conn: Any, sql: Any) -> None:
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self._schema))
        await conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                id BIGSERIAL PRIMARY KEY,
                key TEXT NOT NULL UNIQUE,
                sink TEXT NOT NULL,
                op JSONB NOT NULL,
                blob BYTEA,
                created_at DOUBLE PRECISION NOT NULL,
                next_at DOUBLE PRECISION NOT NULL DEFAULT 0,
                lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                dead BOOLEAN NOT NULL DEFAULT false,
                delivered_at DOUBLE PRECISION)"""
            ).format(self._table)
        )

    async def _run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        import psycopg

        try:
            # A silent connection (no reset, no answer) is down after timeout_s; the
            # cancelled connection goes back to the pool mid-query, and the pool drops it.
            async with asyncio.timeout(self._timeout_s), self._pool.connection() as conn:
                await self._ensure(conn)
                return await fn(conn)
        except TimeoutError as exc:
            raise OutboxUnavailable(f"{self.name}: no answer in {self._timeout_s:g}s") from exc
        except psycopg.OperationalError as exc:
            raise OutboxUnavailable(f"{self.name}: {exc}") from exc
        except Exception as exc:  # psycopg_pool.PoolTimeout is not an OperationalError
            if type(exc).__name__ == "PoolTimeout":
                raise OutboxUnavailable(f"{self.name}: {exc}") from exc
            raise

    async def add(self, entries: Sequence[OutboxEntry]) -> int:
        from psycopg import sql
        from psycopg.types.json import Jsonb

        async def run(conn: Any) -> int:
            added = 0
            async with conn.transaction():
                cur = conn.cursor()
                for e in entries:
                    await cur.execute(
                        sql.SQL(
                            "INSERT INTO {} (key, sink, op, blob, created_at, next_at)"
                            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING"
                        ).format(self._table),
                        (e.key, e.sink, Jsonb(e.op), e.blob, e.created_at, e.created_at),
                    )
                    added += cur.rowcount
            return added

        return int(await self._run(run))

    async def claim(self, limit: int, lease_s: float) -> list[Claimed]:
        from psycopg import sql

        now = time.time()

        async def run(conn: Any) -> list[Claimed]:
            cur = await conn.execute(
                sql.SQL(
                    """UPDATE {t} SET lease_until = %s
                    WHERE id IN (SELECT id FROM {t} WHERE delivered_at IS NULL AND NOT dead
                        AND next_at <= %s AND lease_until <= %s ORDER BY id LIMIT %s
                        FOR UPDATE SKIP LOCKED)
                    RETURNING id, key, sink, op::text, blob, created_at, attempts"""
                ).format(t=self._table),
                (now + lease_s, now, now, limit),
            )
            rows = await cur.fetchall()
            return sorted(
                (Claimed(r[0], _row_entry(*r[1:6]), r[6]) for r in rows), key=lambda c: c.id
            )

        result: list[Claimed] = await self._run(run)
        return result

    async def done(self, ids: Sequence[int]) -> None:
        from psycopg import sql

        async def run(conn: Any) -> None:
            await conn.execute(
                sql.SQL(
                    "UPDATE {} SET delivered_at = %s, blob = NULL, lease_until = 0"
                    " WHERE id = ANY(%s)"
                ).format(self._table),
                (time.time(), list(ids)),
            )

        await self._run(run)

    async def retry(
        self, item: Claimed, error: str, delay_s: float, dead: bool, rejected: bool = False
    ) -> None:
        from psycopg import sql

        async def run(conn: Any) -> None:
            await conn.execute(
                sql.SQL(
                    "UPDATE {} SET next_at = %s, lease_until = 0, last_error = %s, dead = %s,"
                    " attempts = attempts + %s WHERE id = %s"
                ).format(self._table),
                (time.time() + delay_s, error[:1000], dead, int(rejected), item.id),
            )

        await self._run(run)

    async def purge(self, older_than_s: float) -> int:
        from psycopg import sql

        async def run(conn: Any) -> int:
            cur = await conn.execute(
                sql.SQL("DELETE FROM {} WHERE delivered_at < %s").format(self._table),
                (time.time() - older_than_s,),
            )
            return int(cur.rowcount)

        return int(await self._run(run))

    async def stats(self) -> dict[str, Any]:
        from psycopg import sql

        async def run(conn: Any) -> dict[str, Any]:
            cur = await conn.execute(
                sql.SQL(
                    """SELECT count(*) FILTER (WHERE NOT dead), count(*) FILTER (WHERE dead),
                        min(created_at) FILTER (WHERE NOT dead)
                    FROM {} WHERE delivered_at IS NULL"""
                ).format(self._table)
            )
            depth, dead, oldest = await cur.fetchone()
            return _stats(self.name, depth, dead, oldest)

        result: dict[str, Any] = await self._run(run)
        return result


class Sink(Protocol):
    name: str

    async def apply(self, entry: OutboxEntry) -> None:
        """Apply one entry idempotently; raise SinkUnavailable or SinkRejected."""


@dataclass
class DeliveryReport:
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    unavailable: set[str] = field(default_factory=set)  # sinks that were down this round
    applied: list[OutboxEntry] = field(default_factory=list)  # what the sinks took


async def deliver(
    outbox: Outbox,
    sinks: dict[str, Sink],
    *,
    limit: int = 64,
    lease_s: float = 60.0,
    max_attempts: int = 10,
    down_rounds: dict[str, int] | None = None,
) -> DeliveryReport:
    """One round: claim due entries and hand each to its sink. After the first
    connection failure of a sink its other entries this round are put back untried, so an
    outage costs one timeout per round, not one per entry. Every entry of a down sink gets
    the same delay (growing with `down_rounds`, the rounds it has been down in a row), so
    none overtakes another when the sink is back. Only rejections count toward
    `max_attempts`."""
    report = DeliveryReport()
    down_rounds = down_rounds if down_rounds is not None else {}
    claimed = await outbox.claim(limit, lease_s)
    delivered: list[int] = []
    outage_delays: dict[str, float] = {}  # one (jittered) delay per down sink and round
    for item in claimed:
        sink = sinks.get(item.entry.sink)
        if sink is None:
            await outbox.retry(item, f"no sink {item.entry.sink!r} configured", 0, dead=True)
            report.dead += 1
            continue
        outage_delay = outage_delays.setdefault(
            sink.name, backoff_s(down_rounds.get(sink.name, 0) + 1)
        )
        if sink.name in report.unavailable:
            await outbox.retry(item, "sink down (not tried this round)", outage_delay, False)
            report.retried += 1
            continue
        try:
            await sink.apply(item.entry)
        except SinkUnavailable as exc:
            report.unavailable.add(sink.name)
            await outbox.retry(item, str(exc), outage_delay, dead=False)
            report.retried += 1
        except SinkRejected as exc:
            rejections = item.rejections + 1
            dead = rejections >= max_attempts
            if dead:
                logger.error(
                    "outbox entry %s is dead after %d rejections: %s",
                    item.entry.key,
                    rejections,
                    exc,
                )
            await outbox.retry(item, str(exc), backoff_s(rejections), dead=dead, rejected=True)
            report.dead += dead
            report.retried += not dead
        else:
            delivered.append(item.id)
            report.applied.append(item.entry)
    if delivered:
        await outbox.done(delivered)
        report.delivered = len(delivered)
    return report


async def run_delivery(
    outboxes: Sequence[Outbox],
    sinks: dict[str, Sink],
    on_report: Callable[[Outbox, DeliveryReport], None],
    *,
    idle_s: float = 0.2,
    max_attempts: int = 10,
) -> None:
    """Deliver from every outbox for ever (the Actions replica's background task)."""
    down_rounds: dict[str, int] = {}  # sink → rounds it has been down in a row
    while True:
        busy = False
        for outbox in outboxes:
            try:
                report = await deliver(
                    outbox, sinks, max_attempts=max_attempts, down_rounds=down_rounds
                )
            except OutboxUnavailable as exc:
                logger.warning("outbox unavailable: %s", exc)
                continue
            except Exception:
                logger.exception("delivery round failed on %s", outbox.name)
                continue
            on_report(outbox, report)
            took = {e.sink for e in report.applied}  # roles whose sink took an entry
            for role, sink in sinks.items():
                if sink.name in report.unavailable:
                    down_rounds[sink.name] = down_rounds.get(sink.name, 0) + 1
                elif role in took:
                    down_rounds.pop(sink.name, None)
            busy |= report.delivered > 0
        if not busy:
            await asyncio.sleep(idle_s)
