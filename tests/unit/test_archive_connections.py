"""An archive's own `redis` / `postgresql` sections with `actions.archive_connections:
use`: parsed into routes (names without secrets), bound for the config's archives, and
delivered by the Actions core to the archive's servers: real Redis (another database
number) and real PostgreSQL (another schema), while the deployment's own sinks keep the
other pipelines' entries."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from deployments.delivery.outbox import OutboxEntry
from deployments.delivery.service import ActionService
from graph.app import Deployments, build_graph
from graph.common.schemas import ActionsSettings
from graph.config import PROJECT_ROOT, AppConfig
from graph.pipeline.archive import pack_archive
from graph.pipeline.connections import (
    ROUTE_NAME,
    ConnectionSectionError,
    Route,
    archive_routes,
    route_names,
)
from stream_actors.forwarding import rerouted
from tests.unit.delivery_waits import drained
from tests.unit.test_graph import RecordingDeployment

PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
ARCHIVE_DB = 7  # the archive's Redis database: not the deployment's (0)


def test_sections_become_routes_whose_names_hold_no_secret() -> None:
    redis_route, pg_route = archive_routes(
        {"host": "10.0.0.1", "port": 6380, "password": "p@ss/w", "db": 2},
        {"host": "db", "database": "cms", "user": "u", "password": "x y", "schema": "cms"},
    )
    assert redis_route.url == "redis://:p%40ss%2Fw@10.0.0.1:6380/2"
    assert pg_route.url == "postgresql://u:x%20y@db:5432/cms" and pg_route.schema == "cms"
    for route in (redis_route, pg_route):
        assert ROUTE_NAME.fullmatch(route.name) and "p@ss" not in repr(route)
    assert route_names([redis_route, pg_route]) == {
        "redis": redis_route.name,
        "postgres": pg_route.name,
    }
    # The name digests the connection without its password: no guess can be tested
    # against it, and a new password keeps the route (its waiting entries go on).
    same = {"host": "10.0.0.1", "port": 6380, "password": "rotated", "db": 2}
    assert archive_routes(same, None)[0].name == redis_route.name
    other_db = {"host": "10.0.0.1", "port": 6380, "password": "p@ss/w", "db": 3}
    assert archive_routes(other_db, None)[0].name != redis_route.name
    assert archive_routes(None, None) == []


@pytest.mark.parametrize(
    ("redis_section", "pg_section", "problem"),
    [
        ({"host": "h", "pasword": "secret-value"}, None, "redis.pasword: Extra inputs"),
        ({"host": "h", "port": 70000}, None, "redis.port"),
        ({"host": "h x"}, None, "redis.host"),
        (None, {"host": "h"}, "postgresql.database: Field required"),
        (None, {"host": "h", "database": "d", "schema": "a;drop"}, "postgresql.schema"),
        (None, {"host": "/var/run/postgresql", "database": "d"}, "postgresql.host"),
    ],
)
def test_a_bad_section_is_named_by_its_fields_never_its_values(
    redis_section: Any, pg_section: Any, problem: str
) -> None:
    with pytest.raises(ConnectionSectionError) as caught:
        archive_routes(redis_section, pg_section)
    assert problem in str(caught.value) and "secret-value" not in str(caught.value)


def seed_archive(tmp_path: Path, sections: dict[str, Any]) -> Path:
    pipeline = json.loads((PROJECT_ROOT / "models" / "demo-pipeline.json").read_text())
    (tmp_path / "pipeline.json").write_text(json.dumps({**pipeline, **sections}))
    models = tmp_path / "models"
    models.mkdir()
    for name in ("demo-detector.onnx", "body-type.onnx"):
        shutil.copy(PROJECT_ROOT / "models" / name, models / name)
    return pack_archive(tmp_path / "pipeline.json", tmp_path / "seed.mpta", models)


def bound_app(tmp_path: Path, archive: Path, use: str) -> tuple[Any, Any, Any]:
    parts = {n: RecordingDeployment(n) for n in ("Detector", "Ingress", "Classifier", "Actions")}
    config = AppConfig.model_validate(
        {
            "pipelines": [{"archive": str(archive)}],
            "archive_cache_dir": str(tmp_path / "cache"),
            "actions": {"archive_connections": use},
        }
    )
    app = build_graph(
        config,
        Deployments(parts["Detector"], parts["Ingress"], parts["Classifier"], parts["Actions"]),  # type: ignore[arg-type]
    )
    return app, parts["Actions"].bound, parts["Detector"].bound


def test_opted_in_archives_route_their_entries_and_only_actions_get_the_password(
    tmp_path: Path,
) -> None:
    sections = {"redis": {"host": "10.1.1.1", "password": "archive-secret"}}
    archive = seed_archive(tmp_path, sections)
    app, actions, detector = bound_app(tmp_path, archive, "use")
    wiring = app[1][0]
    ((_, (_, _, routes)),) = actions
    (route,) = routes.values()
    assert route["url"] == "redis://:archive-secret@10.1.1.1:6379/0"
    pipeline = wiring.pipelines["demo_vehicle_det_v1"]
    assert pipeline.sink_routes == {"redis": route["name"]}
    assert "archive-secret" not in repr(wiring)  # what the ingress and cameras get
    assert detector[0][1][0]["warnings"] == []  # used, so not "ignored"
    # Off (the default): no route, and /health warns that the section is ignored.
    app, actions, detector = bound_app(tmp_path / "off", archive, "ignore")
    assert actions[0][1][2] == {} and app[1][0].pipelines["demo_vehicle_det_v1"].sink_routes == {}
    assert "is ignored" in detector[0][1][0]["warnings"][0]


def test_a_bad_section_of_an_opted_in_archive_fails_the_deploy_naming_it(tmp_path: Path) -> None:
    archive = seed_archive(tmp_path, {"postgresql": {"host": "db", "password": "pw"}})
    with pytest.raises(ValueError, match=r"postgresql.database: Field required"):
        bound_app(tmp_path, archive, "use")


@pytest.fixture
def targets() -> Iterator[dict[str, str]]:
    """The archive's servers: Redis database 7 and a schema of its own on PostgreSQL."""
    schema, prefix = f"camgraph_arch_{uuid.uuid4().hex[:8]}", f"camgraph-arch:{uuid.uuid4().hex}"
    yield {"schema": schema, "prefix": prefix}
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    for db in (0, ARCHIVE_DB):
        client = redis.Redis(port=6379, db=db)
        for key in client.scan_iter(f"*{prefix}*"):
            client.delete(key)


def test_routed_entries_reach_the_archives_servers_and_unknown_routes_wait(
    tmp_path: Path, targets: dict[str, str]
) -> None:
    schema, prefix = targets["schema"], targets["prefix"]
    redis_route, pg_route = archive_routes(
        {"host": "127.0.0.1", "db": ARCHIVE_DB},
        {"host": "127.0.0.1", "database": "test", "user": "postgres", "schema": schema},
    )
    late = archive_routes({"host": "127.0.0.1", "db": ARCHIVE_DB, "username": "default"}, None)[0]
    catalog: dict[str, Route] = {}  # what the catalog knows (the late route: not yet)
    lookups: list[str] = []

    async def lookup(name: str) -> Route | None:
        lookups.append(name)
        return catalog.get(name)

    image = {"type": "redis_save_image", "key": f"{prefix}:crop.jpg", "ttl_s": 600}
    record = {"type": "upsert", "table": "car_events", "object_key": "o1", "fields": {"a": "1"}}

    async def run() -> dict[str, Any]:
        settings = ActionsSettings(
            redis_url="redis://127.0.0.1:6379/0",
            data_dir=Path("actions"),
            archive_connections="use",
        )
        service = ActionService(
            settings,
            tmp_path,
            environ={},
            routes={redis_route.name: redis_route, pg_route.name: pg_route},
            lookup=lookup,
        )
        submit = rerouted(
            service.submit,  # type: ignore[arg-type]
            {"redis": redis_route.name, "postgres": pg_route.name},
        )
        await submit([OutboxEntry("i1", "redis", image, b"jpeg")])
        await submit([OutboxEntry("r1", "postgres", record)])
        await service.submit([OutboxEntry("d1", "redis", {**image, "key": f"{prefix}:own"}, b"x")])
        await service.submit(
            [OutboxEntry("l1", late.name, {**image, "key": f"{prefix}:late"}, b"y")]
        )
        deadline = time.monotonic() + 60  # until the known routes delivered; the late one waits
        while (health := await service.health())["delivered"] < 3:
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.05)
        assert health["outbox"][0]["depth"] == 1 and health["dead"] == 0, health
        catalog[late.name] = late  # the catalog learns it (e.g. the pipeline loaded again)
        health = await drained(service)
        await service.close()
        return health

    health = asyncio.run(run())
    archive_db, own_db = redis.Redis(port=6379, db=ARCHIVE_DB), redis.Redis(port=6379, db=0)
    assert (
        archive_db.get(f"{prefix}:crop.jpg") == b"jpeg" and own_db.get(f"{prefix}:crop.jpg") is None
    )
    assert own_db.get(f"{prefix}:own") == b"x" and archive_db.get(f"{prefix}:own") is None
    assert archive_db.get(f"{prefix}:late") == b"y"
    assert health["delivered"] == 4 and health["dead"] == 0
    assert late.name in lookups and redis_route.name not in lookups  # configured: no lookup
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        (count,) = conn.execute(f'SELECT count(*) FROM "{schema}".car_events').fetchone()  # type: ignore[misc]
    assert count == 1
    described = health["sinks"][redis_route.name]
    assert described == {"kind": "archive redis", "url": f"redis://127.0.0.1:6379/{ARCHIVE_DB}"}


def test_with_connections_ignored_a_routes_waiting_entries_go_to_the_deployments_sink(
    tmp_path: Path, targets: dict[str, str]
) -> None:
    """A deployment switched back to `ignore` delivers what a route still has in the
    outbox to its own sink of that role: nothing dead, nothing at the archive's server."""
    prefix = targets["prefix"]
    route = archive_routes({"host": "127.0.0.1", "db": ARCHIVE_DB}, None)[0]
    image = {"type": "redis_save_image", "key": f"{prefix}:late.jpg", "ttl_s": 600}

    async def run() -> dict[str, Any]:
        settings = ActionsSettings(redis_url="redis://127.0.0.1:6379/0", data_dir=Path("a"))
        service = ActionService(settings, tmp_path, environ={})
        await service.submit([OutboxEntry("r1", route.name, image, b"jpeg")])
        health = await drained(service)
        await service.close()
        return health

    health = asyncio.run(run())
    assert health["delivered"] == 1 and health["dead"] == 0
    assert redis.Redis(port=6379, db=0).get(f"{prefix}:late.jpg") == b"jpeg"
    assert redis.Redis(port=6379, db=ARCHIVE_DB).get(f"{prefix}:late.jpg") is None
