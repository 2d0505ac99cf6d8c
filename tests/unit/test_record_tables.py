"""The seeds' record semantics on a CMS's own tables (no Ray), against real PostgreSQL
and the embedded SQLite store: a create INSERTs one row whose key column holds the
object's key, an update sets fields `WHERE key_field = key`, redeliveries and late older
revisions change nothing, and the user's table is never altered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import ValidationError

from deployments.delivery.outbox import OutboxEntry, SinkRejected
from deployments.delivery.sinks import LocalStoreSink, PostgresSink, checked_identifier
from deployments.delivery.tables import OURS, NoRowYet, record_write
from graph.pipeline.render import object_uuid
from graph.pipeline.spec import PipelineFile

PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
KEY = object_uuid("pipeline\x1fv1\x1fcam\x1fs\x1f3")


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"camgraph_rt_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
        # A CMS's table as a CMS makes it: typed columns, its own key and defaults.
        conn.execute(
            f'CREATE TABLE "{name}".car_frontal_info (id bigserial PRIMARY KEY,'
            " session_id uuid NOT NULL UNIQUE, camera_id text, detected_at timestamptz,"
            " car_brand text, car_body_type text, created timestamptz DEFAULT now())"
        )
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def insert(seq: int, table: str = "car_frontal_info", **fields: Any) -> dict[str, Any]:
    return {
        "type": "insert",
        "table": table,
        "object_key": "obj",
        "key_field": "session_id",
        "key": KEY,
        "fields": fields,
        "slot": "obj:0",
        "seq": seq,
    }


def update(seq: int, key: str = KEY, **fields: Any) -> dict[str, Any]:
    return {
        "type": "update",
        "table": "car_frontal_info",
        "object_key": "obj",
        "key_field": "session_id",
        "key": key,
        "fields": fields,
        "slot": "obj:1",
        "seq": seq,
    }


def shape(schema: str) -> tuple[list[Any], list[Any], Any]:
    """The table's columns, indexes and comment: what must never change."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        columns = conn.execute(
            "SELECT column_name, data_type, column_default, is_nullable FROM"
            " information_schema.columns WHERE table_schema = %s AND table_name ="
            " 'car_frontal_info' ORDER BY ordinal_position",
            (schema,),
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename ="
            " 'car_frontal_info' ORDER BY indexname",
            (schema,),
        ).fetchall()
        comment = conn.execute(
            "SELECT obj_description(%s::regclass, 'pg_class')",
            (f'"{schema}".car_frontal_info',),
        ).fetchone()
    return columns, indexes, comment


def table_rows(schema: str, table: str = "car_frontal_info") -> list[dict[str, Any]]:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.execute(f'SELECT * FROM "{schema}"."{table}" ORDER BY 1')
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def postgres_sink(schema: str, create_tables: bool) -> tuple[Any, PostgresSink]:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(
        PG_DSN, min_size=1, max_size=2, open=False, timeout=5, kwargs={"autocommit": True}
    )
    return pool, PostgresSink(pool, schema, create_tables=create_tables)


@pytest.mark.parametrize("create_tables", [False, True])
def test_a_cms_table_gets_one_row_per_object_updated_by_its_key_and_keeps_its_schema(
    schema: str, create_tables: bool
) -> None:
    before = shape(schema)

    async def run() -> None:
        pool, sink = postgres_sink(schema, create_tables)
        await pool.open()
        early = update(1, car_brand="Toyota", car_body_type=None)
        with pytest.raises(NoRowYet):  # its create is not delivered yet: retried later
            await sink.apply(OutboxEntry("u1", "postgres", early))
        create = insert(0, camera_id="cam-7", detected_at="2026-12-03T09:00:00.000Z")
        for _ in range(3):  # a redelivered create inserts nothing twice
            await sink.apply(OutboxEntry("c0", "postgres", create))
        await sink.apply(OutboxEntry("u1", "postgres", early))
        newer = update(2, car_brand="Toyota", car_body_type="Sedan")
        await sink.apply(OutboxEntry("u2", "postgres", newer))
        await sink.apply(OutboxEntry("u1", "postgres", early))  # older, late: nothing
        await pool.close()

    asyncio.run(run())
    (row,) = table_rows(schema)
    assert str(row["session_id"]) == KEY and row["camera_id"] == "cam-7"
    assert row["detected_at"].isoformat() == "2026-12-03T09:00:00+00:00"
    assert (row["car_brand"], row["car_body_type"]) == ("Toyota", "Sedan")
    assert shape(schema) == before  # no column, index or comment added
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        slots = conn.execute(
            f'SELECT slot, seq FROM "{schema}".camgraph_revisions ORDER BY slot'
        ).fetchall()
    assert slots == [("obj:0", 0), ("obj:1", 2)]  # the bookkeeping is camgraph's own table


def test_a_later_create_revision_updates_its_row_by_the_key(schema: str) -> None:
    async def run() -> None:
        pool, sink = postgres_sink(schema, False)
        await pool.open()
        await sink.apply(OutboxEntry("c0", "postgres", insert(0, camera_id="cam-7")))
        # The track came back (a new generation): the same row, its fields refreshed.
        await sink.apply(OutboxEntry("c1", "postgres", insert(1_000_000, camera_id="cam-8")))
        await pool.close()

    asyncio.run(run())
    (row,) = table_rows(schema)
    assert row["camera_id"] == "cam-8"


def test_what_a_users_table_cannot_take_is_rejected_and_tables_camgraph_made_grow(
    schema: str,
) -> None:
    async def run() -> None:
        pool, sink = postgres_sink(schema, True)
        await pool.open()
        with pytest.raises(SinkRejected, match="plate"):  # the CMS has no such column
            await sink.apply(OutboxEntry("x", "postgres", insert(0, plate="AB123CD")))
        with pytest.raises(SinkRejected, match="uuid"):  # a key its column cannot take
            bad = {**insert(0, camera_id="c"), "key": "not-a-uuid", "slot": "o2:0"}
            await sink.apply(OutboxEntry("y", "postgres", bad))
        # A table that does not exist: created, marked as camgraph's, and grown.
        first = {**insert(0, "visits", camera_id="c"), "slot": "v:0"}
        await sink.apply(OutboxEntry("v0", "postgres", first))
        later = {**insert(0, "visits", plate="AB123CD"), "slot": "v2:0", "key": str(uuid.uuid4())}
        await sink.apply(OutboxEntry("v1", "postgres", later))
        await pool.close()

    asyncio.run(run())
    assert table_rows(schema) == []
    visits = table_rows(schema, "visits")
    assert [(r["camera_id"], r["plate"]) for r in visits] == [("c", None), (None, "AB123CD")]
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        (comment,) = conn.execute(
            "SELECT obj_description(%s::regclass, 'pg_class')", (f'"{schema}".visits',)
        ).fetchone() or (None,)
    assert comment == OURS


def test_the_local_store_applies_the_same_semantics(tmp_path: Path) -> None:
    async def run() -> LocalStoreSink:
        sink = LocalStoreSink(tmp_path, "local")
        with pytest.raises(NoRowYet):
            await sink.apply(OutboxEntry("u1", "local", update(1, car_brand="Toyota")))
        for _ in range(2):
            await sink.apply(OutboxEntry("c0", "local", insert(0, camera_id="cam-7")))
        await sink.apply(OutboxEntry("u2", "local", update(2, car_brand="Kia")))
        await sink.apply(OutboxEntry("u1", "local", update(1, car_brand="Toyota")))  # late
        return sink

    sink = asyncio.run(run())
    (row,) = sink.rows("car_frontal_info")
    assert (row["session_id"], row["camera_id"], row["car_brand"]) == (KEY, "cam-7", "Kia")


def test_an_archive_may_not_reach_camgraphs_own_tables_nor_key_rows_by_anything_else() -> None:
    """A hostile archive: writing the outbox, the revisions or the local store's image
    index (whose paths the expiry deletes), or an update keyed by a constant, a branch
    result or session data (which would overwrite other objects' rows), is refused when
    the archive loads; the sinks refuse camgraph's tables again."""

    def archive(action: dict[str, Any]) -> dict[str, Any]:
        return {
            "pipeline": {
                "modelId": "det",
                "modelFile": "det.onnx",
                "branches": [{"modelId": "plate_ocr", "modelType": "ocr"}],
                "parallelActions": [action],
            }
        }

    base = {"type": "postgresql_update_combined", "key_field": "key", "fields": {"a": "1"}}
    for table in ("camgraph_outbox", "CAMGRAPH_revisions", "saved_images", "published_messages"):
        with pytest.raises(ValidationError, match="camgraph's own tables"):
            PipelineFile.model_validate(archive({**base, "table": table}))
    for key in ("active", "{plate_ocr.text}", "{session.row}", "{track_id}", "{object_id}{x}"):
        bad = {**base, "table": "cms_rows", "key_value": key}
        with pytest.raises(ValidationError, match="a record key may name only"):
            PipelineFile.model_validate(archive(bad))
    PipelineFile.model_validate(
        archive({**base, "table": "cms_rows", "key_value": "{camera_id}:{object_id}"})
    )
    for op in (
        {**insert(0, "saved_images", path="/etc/passwd"), "key_field": None},
        {**update(1, path="/etc/passwd"), "table": "camgraph_revisions"},
    ):
        with pytest.raises(SinkRejected, match="camgraph's own tables"):
            record_write(op, checked_identifier)


def test_tables_an_older_camgraph_made_or_extended_keep_working(
    schema: str, tmp_path: Path
) -> None:
    """An upgrade: `vehicle_events` made by an older camgraph (`camgraph_key` its primary
    key) is recognised as camgraph's (marked, grown) and its inserts fill `camgraph_key`;
    a user's table that an older camgraph gave a `camgraph_key` column gets it filled,
    and is still never altered."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{schema}".vehicle_events (camgraph_key text PRIMARY KEY,'
            " camgraph_created_at timestamptz NOT NULL DEFAULT now(),"
            " camgraph_updated_at timestamptz NOT NULL DEFAULT now(), camera_id text)"
        )
        conn.execute(f'ALTER TABLE "{schema}".car_frontal_info ADD COLUMN camgraph_key text')
    user_before = shape(schema)

    def legacy(seq: int, table: str, **fields: Any) -> dict[str, Any]:
        return {**insert(seq, table, **fields), "key_field": "object_id", "slot": f"{table}:0"}

    async def run() -> None:
        pool, sink = postgres_sink(schema, True)
        await pool.open()
        await sink.apply(OutboxEntry("a", "postgres", legacy(0, "vehicle_events", plate="X1")))
        grown = {**update(1, plate="X2"), "table": "vehicle_events", "key_field": "object_id"}
        await sink.apply(OutboxEntry("b", "postgres", grown))
        cms = {**insert(0, camera_id="c"), "slot": "cms:0"}
        await sink.apply(OutboxEntry("c", "postgres", cms))
        await pool.close()

    asyncio.run(run())
    (row,) = table_rows(schema, "vehicle_events")
    assert (row["camgraph_key"], row["object_id"], row["plate"]) == ("obj", KEY, "X2")
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        (comment,) = conn.execute(
            "SELECT obj_description(%s::regclass, 'pg_class')", (f'"{schema}".vehicle_events',)
        ).fetchone() or (None,)
    assert comment == OURS
    (cms_row,) = table_rows(schema)
    assert cms_row["camgraph_key"] == "obj" and str(cms_row["session_id"]) == KEY
    assert shape(schema) == user_before  # the user's table: still not altered

    async def local() -> LocalStoreSink:
        store = LocalStoreSink(tmp_path, "local")
        old = {"type": "upsert", "table": "visits", "object_key": "o1", "fields": {"a": "1"}}
        await store.apply(OutboxEntry("u", "local", old))  # as an older camgraph wrote it
        await store.apply(OutboxEntry("i", "local", legacy(0, "visits", a="2")))
        return store

    rows = sorted(asyncio.run(local()).rows("visits"), key=lambda r: r["a"])
    assert [(r["camgraph_key"], r["a"], r.get("object_id")) for r in rows] == [
        ("o1", "1", None),
        ("obj", "2", KEY),
    ]
