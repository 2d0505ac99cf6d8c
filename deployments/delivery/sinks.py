"""Where delivered actions land (no Ray). Every sink applies an outbox entry idempotently,
so delivering an entry twice changes nothing.

- `RedisSink` (redis.asyncio): `redis_save_image` is `SET key jpeg EX ttl`; `redis_publish`
  runs a Lua script that sets a guard key named after the entry and publishes only if the
  guard was new, so a redelivered entry is never published twice.
- `PostgresSink` (psycopg_pool async): the record actions as the seeds define them,
  `insert` and `update` by the action's key column on the user's own table
  (`tables.py`); `upsert` keyed by the object (`camgraph_key`) for entries queued by an
  older camgraph. Identifiers composed with `psycopg.sql.Identifier`, values bound as
  parameters.
- `LocalStoreSink`: the embedded default when no Redis or PostgreSQL is configured:
  records and published messages in a SQLite file, images as files with their expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

from deployments.delivery.outbox import (
    OutboxEntry,
    SinkRejected,
    SinkUnavailable,
    off_loop,
    sqlite_transaction,
)
from deployments.delivery.tables import (
    LEGACY_KEY,
    RECORD_OPS,
    RecordWrite,
    apply_pg,
    apply_sqlite,
    ensure_pg_table,
    ensure_sqlite_table,
    record_write,
)
from graph.common.names import is_reserved_table

OBJECT_KEY = "camgraph_key"
# Same rule as pipeline validation; checked again here because a sink composes SQL.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# A write carries its revision: `slot` (what it overwrites: one action of one object) and
# `seq` (generation × REVISIONS + revision). Each sink applies it only when `seq` is newer
# than the slot's, checked atomically with the write, so an older revision delivered
# late (after an outage, from the spill store) never overwrites a newer one.
REVISIONS_TABLE = "camgraph_revisions"
SAVE_IF_NEWER = """
local cur = redis.call('GET', KEYS[2])
if cur and tonumber(cur) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 1
"""
PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  return 1
end
return 0
"""


def checked_identifier(name: str) -> str:
    if not IDENTIFIER.match(name):
        raise SinkRejected(f"{name!r} is not a plain SQL identifier")
    return name


def revision(op: dict[str, Any]) -> tuple[str, int] | None:
    """(slot, seq) of a revisioned write, or None for an entry without one (older
    entries, tests' hand-made ops): those are applied as they come."""
    slot, seq = op.get("slot"), op.get("seq")
    if isinstance(slot, str) and isinstance(seq, int) and not isinstance(seq, bool):
        return slot, seq
    return None


def upsert_columns(op: dict[str, Any]) -> tuple[str, list[str], list[str | None]]:
    """(table, columns, values) of an upsert op, identifiers checked."""
    table = checked_identifier(op["table"])
    if is_reserved_table(table):
        raise SinkRejected(f"{table!r} is one of camgraph's own tables")
    fields: dict[str, str | None] = op["fields"]
    columns = [checked_identifier(c) for c in fields]
    if OBJECT_KEY in columns:
        raise SinkRejected(f"{OBJECT_KEY} is camgraph's own column")
    return table, columns, list(fields.values())


class RedisSink:
    def __init__(self, url: str, guard_prefix: str = "camgraph:published:", **options: Any) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.name = "redis"
        self.url = url
        # One immediate retry on a fresh connection: a pooled connection that a firewall
        # or a restarted server dropped while idle must not count as an outage.
        self._client = aioredis.from_url(
            url,
            socket_connect_timeout=options.pop("connect_timeout_s", 2.0),
            socket_timeout=options.pop("timeout_s", 5.0),
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
            **options,
        )
        self._publish_once = self._client.register_script(PUBLISH_ONCE)
        self._save_if_newer = self._client.register_script(SAVE_IF_NEWER)
        self._guard_prefix = guard_prefix
        self._revision_prefix = "camgraph:revision:"

    async def apply(self, entry: OutboxEntry) -> None:
        from redis import exceptions

        op = entry.op
        try:
            if op["type"] == "redis_save_image":
                if entry.blob is None:
                    raise SinkRejected(f"{entry.key}: an image action without an image")
                rev = revision(op)
                if rev is None:
                    await self._client.set(op["key"], entry.blob, ex=int(op["ttl_s"]))
                else:  # the image and its revision in one step (a newer one stays)
                    ttl = int(op["ttl_s"])
                    await self._save_if_newer(  # ordered per slot (object, action)
                        keys=[op["key"], self._revision_prefix + rev[0]],
                        args=[entry.blob, ttl, rev[1], max(ttl, 86400)],
                    )
            elif op["type"] == "redis_publish":
                await self._publish_once(
                    keys=[self._guard_prefix + entry.key],
                    args=[op["channel"], op["message"], int(op.get("guard_ttl_s", 86400))],
                )
            else:
                raise SinkRejected(f"redis cannot apply {op['type']!r}")
        except (exceptions.ConnectionError, exceptions.TimeoutError, OSError) as exc:
            raise SinkUnavailable(f"redis: {exc}") from exc
        except exceptions.RedisError as exc:
            raise SinkRejected(f"redis: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self._client.aclose()


def postgres_pool(dsn: str, connect_timeout_s: float, min_size: int, max_size: int) -> Any:
    """A psycopg pool as the sinks and the outbox use it: autocommit, checked
    connections, not opened yet (the caller opens it without waiting for the server)."""
    from psycopg_pool import AsyncConnectionPool

    return AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=connect_timeout_s,
        kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout_s))},
        check=AsyncConnectionPool.check_connection,
    )


class PostgresSink:
    """Upserts into `<schema>.<table>`; with `create_tables`, missing tables and columns
    are created (text columns) the first time a table is written."""

    def __init__(
        self, pool: Any, schema: str, create_tables: bool = True, timeout_s: float = 10.0
    ) -> None:
        self.name = "postgres"
        self._pool = pool
        self._timeout_s = timeout_s
        self._schema = checked_identifier(schema)
        self._create = create_tables
        self._ensured: set[tuple[str, frozenset[str]]] = set()
        self._revisions_ready = False

    async def _ensure(self, conn: Any, table: str, columns: list[str]) -> None:
        from psycopg import sql

        marker = (table, frozenset(columns))
        if not self._create or marker in self._ensured:
            return
        target = sql.Identifier(self._schema, table)
        async with conn.transaction():
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema))
            )
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ({} text PRIMARY KEY,"
                    " camgraph_created_at timestamptz NOT NULL DEFAULT now(),"
                    " camgraph_updated_at timestamptz NOT NULL DEFAULT now())"
                ).format(target, sql.Identifier(OBJECT_KEY))
            )
            # A table the user made: give it the key column and the unique index it needs.
            await conn.execute(
                sql.SQL(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} text,"
                    " ADD COLUMN IF NOT EXISTS camgraph_updated_at timestamptz DEFAULT now()"
                ).format(target, sql.Identifier(OBJECT_KEY))
            )
            await conn.execute(
                sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
                    sql.Identifier(f"{table[:40]}_camgraph_key_uq"),
                    target,
                    sql.Identifier(OBJECT_KEY),
                )
            )
            for column in columns:
                await conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} text").format(
                        target, sql.Identifier(column)
                    )
                )
        self._ensured.add(marker)

    async def _ensure_revisions(self, conn: Any) -> None:
        """camgraph's bookkeeping table, committed on its own (never rolled back with a
        rejected row); needs CREATE on the schema once."""
        from psycopg import sql

        async with conn.transaction():
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (slot text PRIMARY KEY, seq bigint NOT NULL,"
                    " updated_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(self._schema, REVISIONS_TABLE))
            )
        self._revisions_ready = True

    async def _newer(self, conn: Any, slot: str, seq: int) -> bool:
        """Record `seq` for `slot` if it is newer than the one held (in the caller's
        transaction; the row lock orders concurrent writers); True when it was."""
        return await self._claim(conn, slot, seq) is not None

    async def _claim(self, conn: Any, slot: str, seq: int) -> bool | None:
        """As `_newer`: None when not newer, else whether the slot is new (no revision
        of it was applied before: `xmax = 0` on the row an INSERT made)."""
        from psycopg import sql

        table = sql.Identifier(self._schema, REVISIONS_TABLE)
        cur = await conn.execute(
            sql.SQL(
                "INSERT INTO {t} AS r (slot, seq) VALUES (%s, %s) ON CONFLICT (slot) DO UPDATE"
                " SET seq = EXCLUDED.seq, updated_at = now() WHERE r.seq < EXCLUDED.seq"
                " RETURNING (xmax = 0)"
            ).format(t=table),
            (slot, seq),
        )
        row = await cur.fetchone()
        return None if row is None else bool(row[0])

    async def _apply_record(self, write: RecordWrite, rev: tuple[str, int] | None) -> None:
        async with asyncio.timeout(self._timeout_s), self._pool.connection() as conn:
            marker = (write.table, frozenset(write.columns))
            if self._create and marker not in self._ensured:
                await ensure_pg_table(conn, self._schema, write)
                self._ensured.add(marker)
            if rev is not None and not self._revisions_ready:
                await self._ensure_revisions(conn)
            async with conn.transaction():  # the revision and the row together
                first = True if rev is None else await self._claim(conn, *rev)
                if first is None:
                    return  # an older revision than the one applied: nothing to do
                await apply_pg(conn, self._schema, write, first)

    async def apply(self, entry: OutboxEntry) -> None:
        op = entry.op
        if op["type"] in RECORD_OPS:
            write = record_write(op, checked_identifier)
            await self._guarded(self._apply_record(write, revision(op)))
            return
        if op["type"] != "upsert":
            raise SinkRejected(f"postgres cannot apply {op['type']!r}")
        await self._guarded(self._upsert(op))

    async def _upsert(self, op: dict[str, Any]) -> None:
        """An `upsert` (entries of an older camgraph): keyed by `camgraph_key`."""
        from psycopg import sql

        table, columns, values = upsert_columns(op)
        names = [sql.Identifier(OBJECT_KEY), *(sql.Identifier(c) for c in columns)]
        sets: list[sql.Composable] = [
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in columns
        ]
        if self._create:  # tables camgraph made have this column; a user's may not
            sets.append(sql.SQL("camgraph_updated_at = now()"))
        statement = sql.SQL(
            "INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT ({key}) DO UPDATE SET {sets}"
        ).format(
            t=sql.Identifier(self._schema, table),
            cols=sql.SQL(", ").join(names),
            vals=sql.SQL(", ").join(sql.Placeholder() * len(names)),
            key=sql.Identifier(OBJECT_KEY),
            sets=sql.SQL(", ").join(sets),
        )
        rev = revision(op)
        async with asyncio.timeout(self._timeout_s), self._pool.connection() as conn:
            await self._ensure(conn, table, columns)
            if rev is not None and not self._revisions_ready:
                await self._ensure_revisions(conn)
            async with conn.transaction():  # the revision and the row together
                if rev is not None and not await self._newer(conn, *rev):
                    return  # an older revision than the one applied: nothing to do
                await conn.execute(statement, [op["object_key"], *values])

    async def _guarded(self, write: Awaitable[None]) -> None:
        """A write, bounded (a connection that went silent is an outage, not a hang),
        with the database's errors sorted into outages and rejections."""
        import psycopg

        try:
            await write
        except TimeoutError as exc:
            raise SinkUnavailable(f"postgres: no answer in {self._timeout_s:g}s") from exc
        except psycopg.OperationalError as exc:
            raise SinkUnavailable(f"postgres: {exc}") from exc
        except psycopg.errors.DuplicateTable as exc:  # made meanwhile: seen next round
            self._ensured.clear()
            raise SinkUnavailable(f"postgres: {exc}") from exc
        except psycopg.errors.UniqueViolation as exc:
            if (exc.diag.constraint_name or "").startswith("pg_"):
                # two replicas creating one table at once: the next round finds it
                raise SinkUnavailable(f"postgres: {exc}") from exc
            raise SinkRejected(f"postgres: {type(exc).__name__}: {exc}") from exc
        except psycopg.errors.UndefinedTable as exc:  # dropped since: create it again
            self._revisions_ready = False
            self._ensured.clear()
            if not self._create:  # a table the deployment says exists: a real error
                raise SinkRejected(f"postgres: {exc}") from exc
            raise SinkUnavailable(f"postgres: {exc}") from exc
        except psycopg.Error as exc:
            raise SinkRejected(f"postgres: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise SinkUnavailable(f"postgres: {exc}") from exc
            raise


class LocalStoreSink:
    """Both sinks of the embedded default, under one data directory: `records.sqlite`
    (one table per pipeline table, plus `published_messages`) and `images/`."""

    def __init__(self, data_dir: Path, name: str) -> None:
        self.name = name
        self.data_dir = data_dir
        (data_dir / "images").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            data_dir / "records.sqlite", timeout=30, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS published_messages (entry_key TEXT PRIMARY KEY,"
            " channel TEXT NOT NULL, message TEXT NOT NULL, published_at REAL NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS saved_images (key TEXT PRIMARY KEY, path TEXT NOT NULL,"
            " expires_at REAL NOT NULL)"
        )
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {REVISIONS_TABLE} (slot TEXT PRIMARY KEY,"
            " seq INTEGER NOT NULL)"
        )
        self._columns: dict[str, set[str]] = {}
        self._next_expiry_check = 0.0
        self._lock = threading.Lock()  # one thread at a time on the connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction; a failed one also forgets the column cache (an ALTER
        TABLE may have been rolled back)."""
        try:
            with sqlite_transaction(self._db):
                yield
        except BaseException:
            self._columns.clear()
            raise

    def _newer(self, rev: tuple[str, int] | None) -> bool:
        """Record the revision if it is newer than the slot's (inside a transaction)."""
        if rev is None:
            return True
        cur = self._db.execute(
            f"INSERT INTO {REVISIONS_TABLE} (slot, seq) VALUES (?, ?) ON CONFLICT (slot)"
            " DO UPDATE SET seq = excluded.seq WHERE seq < excluded.seq",
            rev,
        )
        return cur.rowcount > 0

    def _record(self, write: RecordWrite, rev: tuple[str, int] | None) -> None:
        with self._transaction():  # the revision and the row together
            first = True
            if rev is not None:
                held = self._db.execute(
                    f"SELECT seq FROM {REVISIONS_TABLE} WHERE slot = ?", (rev[0],)
                ).fetchone()
                if held is not None and held[0] >= rev[1]:
                    return  # an older revision than the one applied: nothing to do
                first = held is None
                self._newer(rev)
            known = self._columns.setdefault(write.table, set())
            ensure_sqlite_table(self._db, write, known)
            apply_sqlite(self._db, write, first, time.time(), LEGACY_KEY in known)

    def image_path(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:200]
        return self.data_dir / "images" / safe

    @off_loop
    def apply(self, entry: OutboxEntry) -> None:
        op = entry.op
        try:
            if op["type"] == "redis_save_image":
                with self._transaction():
                    if self._newer(revision(op)):
                        self._save_image(op, entry.blob)
            elif op["type"] == "redis_publish":
                self._db.execute(
                    "INSERT OR IGNORE INTO published_messages VALUES (?, ?, ?, ?)",
                    (entry.key, op["channel"], op["message"], time.time()),
                )
            elif op["type"] in RECORD_OPS:
                self._record(record_write(op, checked_identifier), revision(op))
            elif op["type"] == "upsert":
                with self._transaction():  # the revision and the row together
                    if self._newer(revision(op)):
                        self._upsert(op)
            else:
                raise SinkRejected(f"{self.name} cannot apply {op['type']!r}")
        except sqlite3.OperationalError as exc:  # locked, disk full: try again later
            raise SinkUnavailable(f"{self.name}: {exc}") from exc
        except sqlite3.Error as exc:
            raise SinkRejected(f"{self.name}: {exc}") from exc
        except OSError as exc:
            raise SinkUnavailable(f"{self.name}: {exc}") from exc

    def _save_image(self, op: dict[str, Any], blob: bytes | None) -> None:
        if blob is None:
            raise SinkRejected("an image action without an image")
        path = self.image_path(op["key"])
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        now = time.time()
        self._db.execute(
            "INSERT INTO saved_images VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
            " path = excluded.path, expires_at = excluded.expires_at",
            (op["key"], str(path), now + int(op["ttl_s"])),
        )
        if now >= self._next_expiry_check:  # the TTL, as Redis would apply it
            self._next_expiry_check = now + 10
            for key, old in self._db.execute(
                "SELECT key, path FROM saved_images WHERE expires_at < ?", (now,)
            ).fetchall():
                Path(old).unlink(missing_ok=True)
                self._db.execute("DELETE FROM saved_images WHERE key = ?", (key,))

    def _upsert(self, op: dict[str, Any]) -> None:
        table, columns, values = upsert_columns(op)
        known = self._columns.get(table)
        if known is None:
            self._db.execute(
                f'CREATE TABLE IF NOT EXISTS "{table}" ("{OBJECT_KEY}" TEXT PRIMARY KEY,'
                " camgraph_created_at REAL, camgraph_updated_at REAL)"
            )
            known = {r[1] for r in self._db.execute(f'PRAGMA table_info("{table}")')}
            self._columns[table] = known
        for column in columns:
            if column not in known:
                self._db.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" TEXT')
                known.add(column)
        now = time.time()
        cols = ", ".join(f'"{c}"' for c in [OBJECT_KEY, *columns, "camgraph_created_at"])
        marks = ", ".join("?" * (len(columns) + 2))
        sets = ", ".join(f'"{c}" = excluded."{c}"' for c in columns)
        self._db.execute(
            f'INSERT INTO "{table}" ({cols}, camgraph_updated_at) VALUES ({marks}, ?)'
            f' ON CONFLICT ("{OBJECT_KEY}") DO UPDATE SET {sets},'
            " camgraph_updated_at = excluded.camgraph_updated_at",
            [op["object_key"], *values, now, now],
        )

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every record of a table (for /health-style inspection and tests)."""
        cur = self._db.execute(f'SELECT * FROM "{checked_identifier(table)}"')
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
