"""The outbox and the sinks against real SQLite, PostgreSQL and Redis (no Ray).

Each test has its own PostgreSQL schema and Redis key prefix and drops them after.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from deployments.delivery.outbox import (
    TABLE,
    DeliveryReport,
    OutboxEntry,
    OutboxUnavailable,
    PostgresOutbox,
    SinkRejected,
    SinkUnavailable,
    SqliteOutbox,
    deliver,
)
from deployments.delivery.service import ActionService, redact_dsn
from deployments.delivery.sinks import LocalStoreSink, PostgresSink, RedisSink
from graph.common.schemas import ActionsSettings
from tests.unit.delivery_waits import drained, published, subscribed

PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"camgraph_t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"camgraph-test:{uuid.uuid4().hex[:10]}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (f"{value}*", f"camgraph:revision:{value}*"):  # keys, revision guards
        for key in client.scan_iter(pattern):
            client.delete(key)
    for key in client.scan_iter("camgraph:published:*"):
        client.delete(key)


def pool() -> Any:
    from psycopg_pool import AsyncConnectionPool

    return AsyncConnectionPool(
        PG_DSN, min_size=1, max_size=2, open=False, timeout=5, kwargs={"autocommit": True}
    )


def upsert(table: str, key: str, **fields: str | None) -> dict[str, Any]:
    return {"type": "upsert", "table": table, "object_key": key, "fields": fields}


def rows(schema: str, table: str, order_by: str = "camgraph_key") -> list[dict[str, Any]]:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.execute(f'SELECT * FROM "{schema}"."{table}" ORDER BY "{order_by}"')
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def make_due(outbox: SqliteOutbox) -> None:
    """Every undelivered entry due now: a test skips the backoff waits, not the rounds."""
    with outbox._lock:
        outbox._db.execute(f"UPDATE {TABLE} SET next_at = 0 WHERE delivered_at IS NULL")


async def deliver_until_drained(
    outbox: SqliteOutbox,
    sinks: dict[str, Any],
    *,
    max_rounds: int,
    after_round: Callable[[DeliveryReport], None] | None = None,
    **options: Any,
) -> list[DeliveryReport]:
    """Delivery rounds (each with every entry due) until the outbox holds nothing left to
    deliver (delivered or dead); fails the test if that takes more than `max_rounds`."""
    reports: list[DeliveryReport] = []
    while (depth := (await outbox.stats())["depth"]) > 0:
        if len(reports) == max_rounds:
            pytest.fail(f"{depth} entries still undelivered after {max_rounds} rounds")
        make_due(outbox)
        reports.append(await deliver(outbox, sinks, **options))
        if after_round is not None:
            after_round(reports[-1])
    return reports


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_outbox_dedupes_by_key_leases_claims_and_counts_depth_and_lag(
    store: str, tmp_path: Path, schema: str
) -> None:
    async def run() -> None:
        p = pool()
        await p.open()
        outbox: Any = (
            SqliteOutbox(tmp_path / "o.sqlite") if store == "sqlite" else PostgresOutbox(p, schema)
        )
        a, b = (
            OutboxEntry("k1", "redis", {"n": 1}, b"\xff\x00"),
            OutboxEntry("k2", "postgres", {"n": 2}),
        )
        assert await outbox.add([a, b]) == 2
        assert await outbox.add([a]) == 0  # a resubmit after a lost reply stores nothing
        first = await outbox.claim(10, lease_s=30)
        assert [c.entry.key for c in first] == ["k1", "k2"] and first[0].entry.blob == b"\xff\x00"
        assert first[0].entry.op == {"n": 1} and first[0].rejections == 0
        assert await outbox.claim(10, lease_s=30) == []  # leased to the first claimer
        stats = await outbox.stats()
        assert stats["depth"] == 2 and stats["oldest_age_s"] >= 0
        await outbox.done([first[0].id])
        await outbox.retry(first[1], "down", delay_s=0, dead=False)
        (again,) = await outbox.claim(10, lease_s=30)
        assert again.entry.key == "k2" and again.rejections == 0  # an outage round: not one
        await outbox.retry(again, "rejected", delay_s=0, dead=False, rejected=True)
        (third,) = await outbox.claim(10, lease_s=30)
        assert third.rejections == 1
        await outbox.retry(third, "rejected", delay_s=0, dead=True, rejected=True)
        assert await outbox.claim(10, lease_s=30) == []
        stats = await outbox.stats()
        assert (stats["depth"], stats["dead"]) == (0, 1)
        assert await outbox.purge(older_than_s=0) == 1  # the delivered one
        await p.close()

    asyncio.run(run())


def test_an_expired_lease_makes_an_entry_due_again(tmp_path: Path) -> None:
    async def run() -> None:
        outbox = SqliteOutbox(tmp_path / "o.sqlite")
        await outbox.add([OutboxEntry("k", "redis", {})])
        assert len(await outbox.claim(1, lease_s=0.05)) == 1  # a replica died holding it
        await asyncio.sleep(0.1)
        assert len(await outbox.claim(1, lease_s=30)) == 1

    asyncio.run(run())


def test_redis_sink_saves_images_with_ttl_and_publishes_each_entry_once(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = subscribed(client, f"{prefix}events")

    async def run() -> None:
        sink = RedisSink(REDIS_URL)
        image = OutboxEntry(
            "i1",
            "redis",
            {"type": "redis_save_image", "key": f"{prefix}img", "ttl_s": 600},
            b"jpeg",
        )
        message = OutboxEntry(
            "m1", "redis", {"type": "redis_publish", "channel": f"{prefix}events", "message": "hi"}
        )
        for _ in range(2):  # delivered twice (a crash before `done`): same effect
            await sink.apply(image)
            await sink.apply(message)
        with pytest.raises(SinkRejected):
            await sink.apply(OutboxEntry("x", "redis", {"type": "upsert"}))
        await sink.close()

    asyncio.run(run())
    assert client.get(f"{prefix}img") == b"jpeg" and 590 <= client.ttl(f"{prefix}img") <= 600
    assert published(pubsub, 1) == [b"hi"]


def test_postgres_sink_upserts_one_row_per_object_and_composes_identifiers(schema: str) -> None:
    async def run() -> None:
        p = pool()
        await p.open()
        sink = PostgresSink(p, schema)
        create = upsert("vehicle_events", "obj1", camera_id="cam", confidence="0.9")
        update = upsert("vehicle_events", "obj1", body_type="van", plate=None, track_id="7")
        for entry in (update, create, create, update):  # any order, any repetition
            await sink.apply(OutboxEntry(uuid.uuid4().hex, "postgres", entry))
        await sink.apply(
            OutboxEntry("k", "postgres", upsert("vehicle_events", "obj2", camera_id="c2"))
        )
        for hostile in ('x"; DROP TABLE vehicle_events; --', "täble", "a;b"):
            with pytest.raises(SinkRejected, match="identifier"):
                await sink.apply(OutboxEntry("h", "postgres", upsert(hostile, "o", a="1")))
            with pytest.raises(SinkRejected, match="identifier"):
                await sink.apply(
                    OutboxEntry("h", "postgres", upsert("vehicle_events", "o", **{hostile: "1"}))
                )
        # A value that the column's type cannot take is rejected, not retried for ever.
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE TABLE "{schema}".typed (n integer)')
        with pytest.raises(SinkRejected):
            await sink.apply(OutboxEntry("t", "postgres", upsert("typed", "o", n="not a number")))
        await sink.apply(OutboxEntry("t2", "postgres", upsert("typed", "o", n="42")))
        await p.close()

    asyncio.run(run())
    got = rows(schema, "vehicle_events")
    assert [(r["camgraph_key"], r["camera_id"], r["body_type"], r["plate"]) for r in got] == [
        ("obj1", "cam", "van", None),
        ("obj2", "c2", None, None),
    ]
    assert rows(schema, "typed")[0]["n"] == 42  # text bound to an integer column
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
    assert sorted(t[0] for t in tables) == ["typed", "vehicle_events"]


def test_local_store_applies_the_same_operations(tmp_path: Path) -> None:
    async def run() -> LocalStoreSink:
        sink = LocalStoreSink(tmp_path, "local")
        for _ in range(2):
            await sink.apply(OutboxEntry("c", "postgres", upsert("events", "o1", camera_id="cam")))
            await sink.apply(OutboxEntry("u", "postgres", upsert("events", "o1", plate="AB123CD")))
            await sink.apply(
                OutboxEntry(
                    "i",
                    "redis",
                    {"type": "redis_save_image", "key": "a/b:1.jpg", "ttl_s": 60},
                    b"jpg",
                )
            )
            await sink.apply(
                OutboxEntry(
                    "m", "redis", {"type": "redis_publish", "channel": "ch", "message": "hi"}
                )
            )
        with pytest.raises(SinkRejected):
            await sink.apply(OutboxEntry("h", "postgres", upsert('t"x', "o", a="1")))
        return sink

    sink = asyncio.run(run())
    (row,) = sink.rows("events")
    assert (row["camgraph_key"], row["camera_id"], row["plate"]) == ("o1", "cam", "AB123CD")
    assert sink.image_path("a/b:1.jpg").read_bytes() == b"jpg"
    assert len(sink.rows("published_messages")) == 1


def test_delivery_retries_a_sink_that_is_down_without_losing_or_duplicating(
    tmp_path: Path, schema: str, prefix: str
) -> None:
    """Given 5 records and 3 messages, Redis down in the first round, and then a replica
    that applies the 3 messages but dies before marking them done: when delivery goes on
    until the outbox is drained, every record and message is there exactly once."""
    channel = f"{prefix}events"
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = subscribed(client, channel)
    messages = [f"{prefix}m{i}" for i in range(3)]

    async def run() -> tuple[list[DeliveryReport], dict[str, Any]]:
        outbox = SqliteOutbox(tmp_path / "o.sqlite")
        p = pool()
        await p.open()
        good = PostgresSink(p, schema)
        down = RedisSink("redis://127.0.0.1:1/0", connect_timeout_s=0.2)
        entries = [
            OutboxEntry(f"r{i}", "postgres", upsert("t", f"o{i}", v=str(i))) for i in range(5)
        ] + [
            OutboxEntry(key, "redis", {"type": "redis_publish", "channel": channel, "message": key})
            for key in messages
        ]
        await outbox.add(entries)
        report = await deliver(outbox, {"postgres": good, "redis": down})
        # One connection attempt for the whole round, the other redis entries put back.
        assert report.delivered == 5 and report.retried == 3 and report.unavailable == {"redis"}
        assert (await outbox.stats())["depth"] == 3
        up = RedisSink(REDIS_URL)
        make_due(outbox)
        crashed = await outbox.claim(10, lease_s=0)  # its lease ends at once
        assert [c.entry.key for c in crashed] == messages
        for item in crashed:
            await up.apply(item.entry)
        reports = await deliver_until_drained(outbox, {"postgres": good, "redis": up}, max_rounds=3)
        stats = await outbox.stats()
        await up.close()
        await p.close()
        return reports, stats

    reports, stats = asyncio.run(run())
    assert [r.delivered for r in reports] == [3]  # delivered again: no effect
    assert (stats["depth"], stats["dead"]) == (0, 0)
    assert [(r["camgraph_key"], r["v"]) for r in rows(schema, "t")] == [
        (f"o{i}", str(i)) for i in range(5)
    ]
    received = [m.decode() for m in published(pubsub, len(messages))]
    assert received == messages  # each once, in order, though applied twice
    assert client.exists(*(f"camgraph:published:{key}" for key in messages)) == 3


def test_a_silent_connection_is_an_outage_after_the_timeout_not_a_hang(
    schema: str, prefix: str
) -> None:
    """A partition (the connection stays open, nothing answers) must not hang the outbox
    or a sink: each operation gives up after its timeout as unavailable, and the pool
    replaces the silent connection once the network is back."""
    from psycopg_pool import AsyncConnectionPool

    from tests.peers import TcpProxy

    pg, rd = TcpProxy(5432), TcpProxy(6379)

    async def run() -> None:
        p = AsyncConnectionPool(
            f"host=127.0.0.1 port={pg.port} dbname=test user=postgres",
            min_size=1,
            max_size=1,
            open=False,
            timeout=2,
            kwargs={"autocommit": True, "connect_timeout": 1},  # as ActionService sets it
        )
        await p.open()
        # Short timeouts only for the calls made during the partition; before and after
        # it, the same pool and proxies with the default timeouts, so that a loaded
        # machine (first connection, DDL) is not mistaken for an outage.
        outbox = PostgresOutbox(p, schema, timeout_s=1.0)
        sink = PostgresSink(p, schema, timeout_s=1.0)
        redis_sink = RedisSink(f"redis://127.0.0.1:{rd.port}/0", timeout_s=1.0)
        patient_outbox, patient_sink = PostgresOutbox(p, schema), PostgresSink(p, schema)
        patient_redis = RedisSink(f"redis://127.0.0.1:{rd.port}/0")
        image = {"type": "redis_save_image", "key": f"{prefix}img", "ttl_s": 60}
        entry_a = OutboxEntry("a", "postgres", upsert("t", "o1", v="1"))
        assert await patient_outbox.add([entry_a]) == 1
        await patient_sink.apply(entry_a)
        await patient_redis.apply(OutboxEntry("i", "redis", image, b"jpeg"))
        pg.silence()
        rd.silence()
        started = time.monotonic()
        with pytest.raises(OutboxUnavailable, match="no answer"):
            await outbox.add([OutboxEntry("b", "postgres", upsert("t", "o2", v="2"))])
        with pytest.raises(SinkUnavailable):
            await sink.apply(OutboxEntry("b", "postgres", upsert("t", "o2", v="2")))
        with pytest.raises(SinkUnavailable):
            await redis_sink.apply(OutboxEntry("j", "redis", image, b"jpeg"))
        # Bounded by the timeouts (psycopg adds up to 10 s trying to cancel the query
        # in the server), not by TCP's retransmissions (minutes).
        assert time.monotonic() - started < 40
        pg.restore()
        rd.restore()
        # New connections are fine again: the silent ones were dropped, nothing was lost.
        # A try that timed out on a loaded machine may still have committed: the retry
        # then adds nothing (0), as a caller retrying after "no answer" must see.
        added: int | None = None
        failed = 0
        deadline = time.monotonic() + 60
        while added is None and time.monotonic() < deadline:  # the pool reconnects meanwhile
            try:
                added = await outbox.add([OutboxEntry("b", "postgres", upsert("t", "o2"))])
            except OutboxUnavailable:
                failed += 1
                await asyncio.sleep(0.5)
        # 0 only where a try after the restore failed (and may have committed).
        assert added == 1 or (added == 0 and failed > 0), (added, failed)
        await patient_sink.apply(OutboxEntry("b", "postgres", upsert("t", "o2", v="2")))
        await patient_redis.apply(OutboxEntry("j", "redis", image, b"jpeg"))
        assert (await patient_outbox.stats())["depth"] == 2
        await redis_sink.close()
        await patient_redis.close()
        await p.close()

    try:
        asyncio.run(run())
    finally:
        pg.close()
        rd.close()
    assert [r["v"] for r in rows(schema, "t")] == ["1", "2"]


def test_action_service_reports_sinks_without_secrets_and_uses_the_local_store(
    tmp_path: Path,
) -> None:
    assert redact_dsn("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    assert redact_dsn("host=h password=s3cret dbname=x") == "host=h password=*** dbname=x"

    async def run() -> dict[str, Any]:
        service = ActionService(ActionsSettings(data_dir=Path("actions")), tmp_path, environ={})
        await service.submit([OutboxEntry("k", "postgres", upsert("t", "o", a="1"))])
        health = await drained(service)
        await service.close()
        return health

    health = asyncio.run(run())
    assert health["sinks"]["postgres"]["kind"] == "local" and health["delivered"] == 1
    assert (tmp_path / "actions" / "records.sqlite").is_file()
    settings = ActionsSettings(postgres_dsn_env="CG_DSN")
    assert settings.postgres({"CG_DSN": PG_DSN}) == PG_DSN and settings.postgres({}) is None


def test_the_last_delivered_entries_are_listed_newest_first_without_images(
    tmp_path: Path,
) -> None:
    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        service = ActionService(ActionsSettings(data_dir=Path("actions")), tmp_path, environ={})
        before = service.recent()
        await service.submit([OutboxEntry("k1", "postgres", upsert("cars", "o1", plate="AB1"))])
        image = {"type": "redis_save_image", "key": "cam:1.jpg", "ttl_s": 60}
        await service.submit([OutboxEntry("k2", "redis", image, b"\xff\xd8jpeg")])
        deadline = time.monotonic() + 60
        while len(service.recent()) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await service.close()
        return before, service.recent()

    before, recent = asyncio.run(run())
    assert before == []
    assert [r["type"] for r in recent] == ["redis_save_image", "upsert"]
    assert recent[0]["key"] == "cam:1.jpg" and recent[0]["bytes"] == 6
    assert recent[1]["table"] == "cars" and recent[1]["fields"] == {"plate": "AB1"}
    assert all("blob" not in r for r in recent)


class _FlakySink:
    """A sink outside the test's scope: down for `down` calls, then rejects once; keeps
    the key of every entry it took, in order."""

    name = "postgres"

    def __init__(self, down: int) -> None:
        self.down, self.calls = down, 0
        self.applied: list[str] = []

    async def apply(self, entry: OutboxEntry) -> None:
        self.calls += 1
        if self.calls <= self.down:
            raise SinkUnavailable("connection refused")
        if self.calls == self.down + 1:
            raise SinkRejected("READONLY You can't write against a read only replica")
        self.applied.append(entry.key)


def test_rounds_with_the_sink_down_are_not_rejections(tmp_path: Path) -> None:
    sink = _FlakySink(down=12)  # 12 rounds of outage, then one rejection

    async def run() -> tuple[list[DeliveryReport], list[list[float]], dict[str, Any]]:
        outbox = SqliteOutbox(tmp_path / "o.sqlite")
        await outbox.add([OutboxEntry(f"k{i}", "postgres", {"n": i}) for i in range(3)])
        down_rounds: dict[str, int] = {}
        delays = []

        def after_round(report: DeliveryReport) -> None:
            if report.unavailable:
                down_rounds["postgres"] = down_rounds.get("postgres", 0) + 1
                rows = outbox._db.execute(f"SELECT next_at FROM {TABLE} ORDER BY id").fetchall()
                delays.append([r[0] for r in rows])

        reports = await deliver_until_drained(
            outbox,
            {"postgres": sink},
            max_rounds=20,
            after_round=after_round,
            max_attempts=2,
            down_rounds=down_rounds,
        )
        return reports, delays, await outbox.stats()

    reports, delays, stats = asyncio.run(run())
    # 12 rounds down; then k0 rejected once (k1, k2 taken); then k0 taken.
    assert [r.delivered for r in reports] == [0] * 12 + [2, 1]
    assert len(delays) == 12
    for next_at in delays:  # all of a down sink's entries come due in their order
        assert next_at == sorted(next_at) and next_at[-1] - next_at[0] < 0.5
    # One rejection after 12 rounds of outage (max_attempts 2): nothing is dead.
    assert stats["dead"] == 0 and stats["depth"] == 0
    assert sink.applied == ["k1", "k2", "k0"]  # each entry exactly once


def test_an_older_revision_delivered_late_never_overwrites_a_newer_one(
    tmp_path: Path, schema: str, prefix: str
) -> None:
    """Revision 0 (no plate yet, first crop) waits in the spill store while revision 1
    (plate read, better crop) is delivered from the primary outbox; the spill is drained
    afterwards. PostgreSQL, Redis and the local store each keep revision 1."""
    image_key = f"{prefix}cam:7.jpg"

    def revisions(seq: int, plate: str | None, jpeg: bytes) -> list[OutboxEntry]:
        record = {**upsert("cars", "obj-7", plate=plate), "slot": f"{prefix}obj-7:1", "seq": seq}
        image = {"type": "redis_save_image", "key": image_key, "ttl_s": 600}
        image |= {"slot": f"{prefix}obj-7:0", "seq": seq}
        return [
            OutboxEntry(f"rec-{seq}", "postgres", record),
            OutboxEntry(f"img-{seq}", "redis", image, jpeg),
        ]

    async def run() -> None:
        p = pool()
        await p.open()
        local = LocalStoreSink(tmp_path / "local", "local")
        real = {"postgres": PostgresSink(p, schema), "redis": RedisSink(REDIS_URL)}
        for name, sinks in (("real", real), ("local", {"postgres": local, "redis": local})):
            spill = SqliteOutbox(tmp_path / f"{name}-spill.sqlite")
            primary = SqliteOutbox(tmp_path / f"{name}-primary.sqlite")
            await spill.add(revisions(0, None, b"first crop"))
            await primary.add(revisions(1, "AB123CD", b"better crop"))
            for outbox in (primary, spill):  # the newer first, the older late
                reports = await deliver_until_drained(outbox, sinks, max_rounds=3)
                # In one round, the late one a no-op, not an error.
                assert [r.delivered for r in reports] == [2]
        await real["redis"].close()  # type: ignore[attr-defined]
        await p.close()

    asyncio.run(run())
    record_slot, image_slot = f"{prefix}obj-7:1", f"{prefix}obj-7:0"
    assert [(r["camgraph_key"], r["plate"]) for r in rows(schema, "cars")] == [("obj-7", "AB123CD")]
    assert [(r["slot"], r["seq"]) for r in rows(schema, "camgraph_revisions", "slot")] == [
        (record_slot, 1)
    ]
    client = redis.Redis.from_url(REDIS_URL)
    assert client.get(image_key) == b"better crop"
    assert client.get(f"camgraph:revision:{image_slot}") == b"1"
    local = LocalStoreSink(tmp_path / "local", "local")
    assert [(r["camgraph_key"], r["plate"]) for r in local.rows("cars")] == [("obj-7", "AB123CD")]
    assert local.image_path(image_key).read_bytes() == b"better crop"
    assert sorted((r["slot"], r["seq"]) for r in local.rows("camgraph_revisions")) == [
        (image_slot, 1),
        (record_slot, 1),
    ]


def test_a_new_object_writing_the_same_image_key_is_not_held_back_by_an_old_revision(
    prefix: str,
) -> None:
    """Revisions order writes of one slot (object, action); a key template shared across
    objects or sessions (no session in it) must still take the newer object's crop."""
    key = f"{prefix}latest.jpg"

    def image(slot: str, seq: int, jpeg: bytes) -> OutboxEntry:
        op = {"type": "redis_save_image", "key": key, "ttl_s": 60, "slot": slot, "seq": seq}
        return OutboxEntry(f"{slot}-{seq}", "redis", op, jpeg)

    async def run() -> None:
        sink = RedisSink(REDIS_URL)
        await sink.apply(image(f"{prefix}old-session:0", 2, b"old object, revision 2"))
        await sink.apply(image(f"{prefix}new-session:0", 0, b"new object, revision 0"))
        await sink.apply(image(f"{prefix}old-session:0", 1, b"old object, revision 1, late"))
        await sink.close()

    asyncio.run(run())
    # The late revision 1 of the old object is older than its revision 2: skipped.
    assert redis.Redis.from_url(REDIS_URL).get(key) == b"new object, revision 0"


def test_a_batch_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    """One add is one transaction: a batch whose last row fails leaves none of it."""

    async def run() -> int:
        outbox = SqliteOutbox(tmp_path / "o.sqlite")
        good = OutboxEntry("k1", "postgres", {"n": 1})
        bad = OutboxEntry("k2", "postgres", {"n": 2}, object())  # type: ignore[arg-type]
        with pytest.raises(sqlite3.Error):  # SQLite cannot bind it: fails at the 2nd row
            await outbox.add([good, bad])
        return (await outbox.stats())["depth"]

    assert asyncio.run(run()) == 0
