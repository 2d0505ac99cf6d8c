"""The seeds' record actions on tables a CMS owns (no Ray): how `postgresql_create_record`
(`insert`) and `postgresql_update_combined` (`update`) land in PostgreSQL and in the
embedded SQLite store.

As in the detector-worker (seed 000, "Database Operations Flow"): a create INSERTs a row
whose `key_field` holds the object's key (its `{session_id}`), and an update runs
`UPDATE <table> SET … WHERE <key_field> = <key>`. Nothing is added to the user's table:
no column, no index. Idempotency and order live in camgraph's own bookkeeping
(`camgraph_revisions`, one row per object and action, written in the same transaction):

- the first revision of a create INSERTs; a later one (new session data, a track that
  came back) UPDATEs the row by its key, and a redelivered one does nothing;
- an update applies only when newer than the one applied; one that finds no row yet
  (its create not delivered yet, or the row deleted) is rejected and retried with
  backoff, counted, never dropped silently.

`create_tables` creates a missing table (text columns, marked as camgraph's with a
comment) and adds columns only to tables so marked: a user's table is never altered. A
table an older camgraph created (`camgraph_key` its primary key) is marked on first
sight, and inserts fill `camgraph_key` wherever that column exists.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from deployments.delivery.outbox import SinkRejected
from graph.common.names import is_reserved_table

RECORD_OPS = frozenset({"insert", "update"})
# The key column of tables an older camgraph created (`camgraph_key text PRIMARY KEY`) or
# added to a user's table (unique): an INSERT fills it with the object's record identity.
LEGACY_KEY = "camgraph_key"
OURS = "created by camgraph (actions.create_tables)"


class NoRowYet(SinkRejected):
    """An update whose key matches no row: its create is not delivered yet (retried)."""


@dataclass(frozen=True)
class RecordWrite:
    kind: str  # insert | update
    table: str
    columns: list[str]  # what is written (an update leaves its key column alone)
    values: list[str | None]
    key_field: str | None
    key: str | None
    object_key: str = ""  # camgraph's record identity (for tables an older camgraph made)


def record_write(op: dict[str, Any], checked: Any) -> RecordWrite:
    """The write an `insert` / `update` op asks for, identifiers checked with `checked`
    (the sinks' identifier rule). SinkRejected when it cannot be applied."""
    kind = op["type"]
    table = checked(op["table"])
    if is_reserved_table(table):  # checked when the archive loaded; again where SQL is made
        raise SinkRejected(f"{table!r} is one of camgraph's own tables")
    fields: dict[str, str | None] = dict(op["fields"])
    key_field = op.get("key_field")
    key = op.get("key")
    if key_field is not None:
        key_field = checked(key_field)
        if key is None:
            raise SinkRejected(f"{table}: no value for its key {key_field}")
        if kind == "insert":
            fields[key_field] = key
        else:
            fields.pop(key_field, None)
    elif kind == "update":
        raise SinkRejected(f"{table}: an update needs key_field")
    columns = [checked(c) for c in fields]
    if kind == "update" and not columns:
        raise SinkRejected(f"{table}: an update with no field")
    object_key = str(op.get("object_key") or "")
    return RecordWrite(kind, table, columns, list(fields.values()), key_field, key, object_key)


# ---- PostgreSQL --------------------------------------------------------------------


async def ensure_pg_table(conn: Any, schema: str, write: RecordWrite) -> None:
    """(create_tables) The table, created with text columns when missing; the columns a
    write names, added when the table is camgraph's own. A user's table is left as it
    is: a column it lacks makes the write fail with the database's own error."""
    from psycopg import sql

    target = sql.Identifier(schema, write.table)
    async with conn.transaction():
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        # The comment, and whether `camgraph_key` is the primary key: a table an older
        # camgraph created (and so is camgraph's own), not a user's it only added to.
        cur = await conn.execute(
            "SELECT obj_description(c.oid, 'pg_class'), EXISTS (SELECT 1 FROM pg_index i"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = c.oid AND i.indisprimary AND a.attname = %s)"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s",
            (LEGACY_KEY, schema, write.table),
        )
        found = await cur.fetchone()
        if found is not None and found[0] is None and found[1]:
            await conn.execute(
                sql.SQL("COMMENT ON TABLE {} IS {}").format(target, sql.Literal(OURS))
            )
            found = (OURS, True)
        if found is None:
            columns = sql.SQL("").join(
                sql.SQL(", {} text").format(sql.Identifier(c)) for c in write.columns
            )
            # Not IF NOT EXISTS: a table someone made meanwhile must not get our mark
            # (DuplicateTable rolls this back; the next delivery round sees it as theirs).
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (camgraph_created_at timestamptz NOT NULL DEFAULT now(){})"
                ).format(target, columns)
            )
            await conn.execute(
                sql.SQL("COMMENT ON TABLE {} IS {}").format(target, sql.Literal(OURS))
            )
        elif found[0] == OURS:
            for column in write.columns:
                await conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} text").format(
                        target, sql.Identifier(column)
                    )
                )


async def apply_pg(conn: Any, schema: str, write: RecordWrite, first: bool) -> None:
    """The write in the caller's transaction. `first`: no revision of this object's
    action was applied before (a create INSERTs then, and UPDATEs by its key after)."""
    from psycopg import sql

    target = sql.Identifier(schema, write.table)
    if write.kind == "insert" and first:
        columns, values = list(write.columns), list(write.values)
        cur = await conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = %s AND"
            " table_name = %s AND column_name = %s",
            (schema, write.table, LEGACY_KEY),
        )
        if await cur.fetchone() is not None:  # made or extended by an older camgraph
            columns.append(LEGACY_KEY)
            values.append(write.object_key)
        await conn.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                target,
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            ),
            values,
        )
        return
    if write.key_field is None:
        return  # a create without a key: its row cannot be found again, written once
    pairs = [(c, v) for c, v in zip(write.columns, write.values, strict=True)]
    pairs = [(c, v) for c, v in pairs if c != write.key_field]
    if not pairs:
        return
    cur = await conn.execute(
        sql.SQL("UPDATE {} SET {} WHERE {} = %s").format(
            target,
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c, _ in pairs),
            sql.Identifier(write.key_field),
        ),
        [*(v for _, v in pairs), write.key],
    )
    if write.kind == "update" and cur.rowcount == 0:
        raise NoRowYet(f"{write.table}: no row with {write.key_field} = {write.key!r} yet")


# ---- SQLite (the embedded store) ---------------------------------------------------


def ensure_sqlite_table(db: sqlite3.Connection, write: RecordWrite, known: set[str]) -> None:
    """The store's table with the write's columns (all the store's tables are its own)."""
    if not known:
        db.execute(f'CREATE TABLE IF NOT EXISTS "{write.table}" (camgraph_created_at REAL)')
        known |= {r[1] for r in db.execute(f'PRAGMA table_info("{write.table}")')}
    for column in write.columns:
        if column not in known:
            db.execute(f'ALTER TABLE "{write.table}" ADD COLUMN "{column}" TEXT')
            known.add(column)


def apply_sqlite(
    db: sqlite3.Connection, write: RecordWrite, first: bool, now: float, legacy: bool = False
) -> None:
    """As `apply_pg`, on the store's connection inside the caller's transaction
    (`legacy`: the table has an older camgraph's `camgraph_key`, filled on insert)."""
    if write.kind == "insert" and first:
        columns, values = [*write.columns, "camgraph_created_at"], [*write.values, now]
        if legacy:
            columns.append(LEGACY_KEY)
            values.append(write.object_key)
        cols = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join("?" * len(columns))
        db.execute(f'INSERT INTO "{write.table}" ({cols}) VALUES ({marks})', values)
        return
    if write.key_field is None:
        return
    pairs = [(c, v) for c, v in zip(write.columns, write.values, strict=True)]
    pairs = [(c, v) for c, v in pairs if c != write.key_field]
    if not pairs:
        return
    sets = ", ".join(f'"{c}" = ?' for c, _ in pairs)
    cur = db.execute(
        f'UPDATE "{write.table}" SET {sets} WHERE "{write.key_field}" = ?',
        [*(v for _, v in pairs), write.key],
    )
    if write.kind == "update" and cur.rowcount == 0:
        raise NoRowYet(f"{write.table}: no row with {write.key_field} = {write.key!r} yet")
