"""The demo pipeline through the deployed graph (detector, two Classifier deployments,
Actions) into real Redis and PostgreSQL, reached through TCP proxies that the outage
test cuts for real. Records are checked against the scene's ground truth."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import psycopg
import pytest
import redis
from ray import serve
from ray.serve import Application
from websockets.sync.client import connect

from demo.datasets import HELD_OUT_SEED_START, write_clip
from deployments.actions import Actions
from deployments.classifier import Classifier
from deployments.detector import Detector
from deployments.ingress import Ingress
from graph.app import Deployments, build_graph
from graph.config import PROJECT_ROOT
from graph.pipeline.archive import pack_archive
from tests.integration.apps import app_config, deployed, healthy, wait_until
from tests.peers import TcpProxy
from tests.unit.test_pipeline_run import assert_body_types, recordable_vehicles

pytestmark = pytest.mark.integration
APP = "camgraph-pipeline-test"
PG = "host=127.0.0.1 port={port} dbname=test user=postgres"
TABLE = "vehicle_events"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "scene.mp4"
    return write_clip(HELD_OUT_SEED_START + 30, n_frames=200, video_path=out, fps=10, scale=1.0)


@pytest.fixture(scope="module")
def proxies() -> Iterator[dict[str, TcpProxy]]:
    out = {"redis": TcpProxy(6379), "postgres": TcpProxy(5432)}
    yield out
    for proxy in out.values():
        proxy.close()


@pytest.fixture(scope="module")
def schema() -> Iterator[str]:
    name = f"camgraph_it_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(PG.format(port=5432), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def pipeline_graph(
    data: Path, archive: Path, proxies: dict[str, TcpProxy], schema: str
) -> Application:
    config = app_config(
        data,
        models=[],
        pipelines=[{"archive": str(archive)}],
        streams={
            "reconcile_s": 1.0,
            "file_dirs": [str(data.parent)],  # the tests' temporary directories
        },
        actions={
            "redis_url": f"redis://127.0.0.1:{proxies['redis'].port}/0",
            "postgres_dsn": PG.format(port=proxies["postgres"].port),
            "postgres_schema": schema,
            "data_dir": str(data / "actions"),
            "connect_timeout_s": 1.0,
        },
    )
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    return build_graph(
        config,
        Deployments(
            Detector.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5}),
            Ingress.options(num_replicas=1),
            Classifier.options(num_replicas=1, **small),
            Actions.options(num_replicas=1, **small),
        ),
    )


def deploy(data: Path, archive: Path, proxies: dict[str, TcpProxy], schema: str) -> None:
    serve.run(pipeline_graph(data, archive, proxies, schema), name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline-app")


@pytest.fixture(scope="module")
def app(
    cluster: dict[str, Any], proxies: dict[str, TcpProxy], schema: str, data: Path
) -> Iterator[str]:
    url = cluster["http_url"]
    application = pipeline_graph(data, PROJECT_ROOT / "models" / "demo.mpta", proxies, schema)
    with deployed(
        APP, application, ready=healthy(url), what="detector, classifiers and actions to be ready"
    ):
        yield url


def camera_body(clip: Path, display: str, replay: bool = True) -> dict[str, Any]:
    return {
        "subscriptionIdentifier": f"{display};cam",
        "fileUrl": str(clip),
        "fileLoop": not replay,
        "fileRealtime": not replay,  # replay: every frame, as fast as the graph goes
        "modelId": "demo_vehicle_det_v1",
    }


def run_camera(url: str, clip: Path, display: str, replay: bool = True) -> None:
    r = httpx.post(f"{url}/streams", json=camera_body(clip, display, replay), timeout=30)
    assert r.status_code == 201, r.text


@contextlib.contextmanager
def ws_camera(
    url: str, clip: Path, display: str, session_id: int
) -> Iterator[list[dict[str, Any]]]:
    """The display's session set (the seeds' setSessionId), then the camera subscribed
    over a WebSocket (persistent), collecting what it receives."""
    got: list[dict[str, Any]] = []
    payload = {**camera_body(clip, display), "persistent": True}
    with connect(url.replace("http://", "ws://") + "/ws", open_timeout=30) as ws:
        session = {"displayIdentifier": display, "sessionId": session_id}
        ws.send(json.dumps({"type": "setSessionId", "payload": session}))
        ack = json.loads(ws.recv(timeout=60))
        while ack["type"] == "stateReport":
            ack = json.loads(ws.recv(timeout=60))
        assert ack["type"] == "setSessionIdAck" and ack["sessionId"] == session_id, ack
        ws.send(json.dumps({"type": "subscribe", "payload": payload}))
        while not got or got[-1]["type"] not in ("subscribeAck", "error"):
            got.append(json.loads(ws.recv(timeout=60)))
        assert got[-1]["type"] == "subscribeAck", got[-1]
        # Until the client closes (a normal close ends the iteration).
        reader = threading.Thread(target=lambda: got.extend(map(json.loads, ws)), daemon=True)
        reader.start()
        yield got
    reader.join(10)


def unsubscribe(url: str, display: str) -> None:
    r = httpx.delete(f"{url}/streams/{display};cam", timeout=30)
    assert r.status_code == 204, r.text


_last_sent: dict[str, int] = {}


def camera_done(url: str, display: str) -> dict[str, Any] | None:
    """The subscription's status once its file ended, no pass is in flight, every camera
    actor's actions were accepted by the outbox (none pending) and no action was handed
    over since the previous poll (the ones rendered as the clip's tracks ended included)."""
    listing = httpx.get(f"{url}/streams", timeout=30).json()
    forwarders = [f for a in listing["actors"].values() for f in (a.get("actions") or {}).values()]
    if any(f["pending"] for f in forwarders):
        return None
    sent = sum(f["sent"] for f in forwarders)
    settled = _last_sent.get(display) == sent
    _last_sent[display] = sent
    for stream in listing["streams"]:
        for sub in stream.get("subscriptions", []):
            if sub["subscription_id"] == f"{display};cam" and stream["state"] == "ended":
                done = sub["processed"] == stream["frames_read"]
                if done and sub["pipeline"]["passes_in_flight"] == 0 and settled:
                    return dict(sub)
    return None


def outbox_empty(url: str) -> bool:
    actions = httpx.get(f"{url}/health", timeout=30).json()["actions"]
    return all(o.get("depth") == 0 for o in actions["outbox"])


def undrained(url: str, schema: str) -> str:
    """What the outbox still holds (for a drain timeout's message)."""
    try:
        actions = httpx.get(f"{url}/health", timeout=30).json()["actions"]
    except Exception as exc:
        actions = f"/health failed: {exc!r}"
    with psycopg.connect(PG.format(port=5432), autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT key, sink, attempts, last_error, next_at - extract(epoch from now()),"
            f' lease_until - extract(epoch from now()), dead FROM "{schema}".camgraph_outbox'
            " WHERE delivered_at IS NULL ORDER BY id LIMIT 20"
        ).fetchall()
    return f"the outbox to drain after the outages; health: {actions}; pending: {rows}"


def records(schema: str, display: str, column: str = "display_id") -> list[dict[str, Any]]:
    with psycopg.connect(PG.format(port=5432), autocommit=True) as conn:
        cur = conn.execute(f'SELECT * FROM "{schema}"."{TABLE}" WHERE {column} = %s', (display,))
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def check_records(rows: list[dict[str, Any]], truth: dict[str, Any], display: str) -> None:
    vehicles = recordable_vehicles(truth)
    assert len(rows) == len(vehicles), [(r["track_id"], r["body_type"]) for r in rows]
    assert len({r["track_id"] for r in rows}) == len(rows)
    assert_body_types(rows, truth)
    plates = [r["plate"] for r in rows if r["plate"]]
    assert len(set(plates)) == len(plates)
    assert sum(p in {v["plate"] for v in vehicles} for p in plates) >= 0.4 * len(vehicles)
    client = redis.Redis(port=6379)
    for row in rows:
        key = f"camgraph:{display}:cam:{row['track_id']}:{demo_version()}.jpg"
        crop = client.get(key)
        assert crop is not None, f"no crop at {key}"
        image = cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[0] > 20
        assert 0 < client.ttl(key) <= 600
        client.delete(key)


def check_last_revisions(url: str, display: str, rows: list[dict[str, Any]]) -> None:
    """After the outages, every row and crop is its object's last revision delivered (an
    older one delivered late, say from the spill store, changed nothing)."""
    delivered = httpx.get(f"{url}/records", params={"limit": 1000}, timeout=30).json()
    client = redis.Redis(port=6379)
    checked = 0
    for row in rows:
        newest: dict[str, dict[str, Any]] = {}  # slot → its newest delivered revision
        for entry in delivered:
            record = entry.get("type") in ("insert", "update")
            if record and entry.get("key") == row["object_id"] and "revision" in entry:
                slot = newest.get(entry["slot"])
                if slot is None or entry["revision"] > slot["revision"]:
                    newest[entry["slot"]] = entry
        for entry in newest.values():
            for column, value in entry["fields"].items():
                assert row[column] == value, (column, row, entry)
                checked += 1
        key = f"camgraph:{display}:cam:{row['track_id']}:{demo_version()}.jpg"
        images = [e for e in delivered if e.get("key") == key and "revision" in e]
        if images:
            last = max(images, key=lambda e: e["revision"])
            assert len(client.get(key) or b"") == last["bytes"], (key, last)
    assert checked >= len(rows)  # the records were really compared


def check_results_reached_clients(url: str, display: str, rows: list[dict[str, Any]]) -> None:
    """Each record's body type and plate were told to clients as `result` events (the
    last one per object says what the record says), and `/records` lists the records."""
    events = httpx.get(f"{url}/streams/{display};cam/events", params={"after": 0}, timeout=30)
    told = {
        e["extra"]["track_id"]: e["extra"]["results"]
        for e in events.json()
        if e["kind"] == "result"
    }
    for row in rows:
        results = told.get(int(row["track_id"]), {})
        if row["body_type"] is not None:
            assert results["demo_bodytype_cls_v1"]["label"] == row["body_type"], row
        if row["plate"] is not None:
            assert results["demo_plate_ocr_v1"]["label"] == row["plate"], row
    assert sum(r["body_type"] is not None for r in rows) >= len(rows) // 2
    recent = httpx.get(f"{url}/records", params={"limit": 200}, timeout=30).json()
    listed = [
        r for r in recent if r["type"] in ("insert", "update") and r["table"] == "vehicle_events"
    ]
    assert listed and all("fields" in r for r in listed)


def check_results_reached_ws(got: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """`objectResult`s (the last per object as its record) and items with `results`."""
    results = [m["payload"] for m in got if m["type"] == "objectResult"]
    told = {p["trackId"]: p["results"] for p in results}
    items = [d for m in got if m["type"] == "imageDetection" for d in m["payload"]["detections"]]
    assert told and any("results" in d for d in items), [m["type"] for m in got[-20:]]
    complete = not any(m["type"] == "eventsDropped" for m in got)  # else a slow reader lost some
    for row in rows:
        if row["body_type"] is not None and complete:
            assert told[int(row["track_id"])]["demo_bodytype_cls_v1"]["label"] == row["body_type"]


def demo_version() -> str:
    """The demo pipeline's version (it names none): its archive's sha256, 12 digits."""
    import hashlib

    return hashlib.sha256((PROJECT_ROOT / "models" / "demo.mpta").read_bytes()).hexdigest()[:12]


def actions_health(app: str, seen: Any) -> dict[str, Any] | None:
    """`/health`'s actions section when `seen(it)` holds, else None (polled)."""
    actions = httpx.get(f"{app}/health", timeout=30).json()["actions"]
    return actions if seen(actions) else None


def test_a_scene_yields_one_record_per_vehicle_with_branch_fields_and_crops(
    app: str, clip: Path, schema: str
) -> None:
    truth = json.loads(clip.with_suffix(".json").read_text())
    display = f"d{uuid.uuid4().hex[:8]}"
    session_id = uuid.uuid4().int % 10**9  # a number, as a CMS sends it
    with ws_camera(app, clip, display, session_id) as messages:  # subscribed over the WebSocket
        status = wait_until(lambda: camera_done(app, display), 600, "the clip to be processed")
    assert status["pipeline"]["branch_errors"] == {}, status
    assert status["pipeline"]["session_id"] == session_id
    wait_until(lambda: outbox_empty(app), 120, "every action to be delivered")
    rows = records(schema, display)
    check_records(rows, truth, display)
    # The backend finds its display's records by the session it set.
    by_session = records(schema, str(session_id), column="session_id")
    assert sorted(by_session, key=lambda r: r["object_id"]) == sorted(
        rows, key=lambda r: r["object_id"]
    )
    check_results_reached_clients(app, display, rows)
    check_results_reached_ws(messages, rows)
    unsubscribe(app, display)
    health = httpx.get(f"{app}/health", timeout=30).json()
    assert health["actions"]["sinks"]["postgres"]["kind"] == "postgres"
    assert health["actions"]["sinks"]["redis"]["up"] is True
    assert {"demo_bodytype_cls_v1", "demo_plate_ocr_v1"} <= set(health["models"])


def test_redis_then_postgres_down_for_20_s_loses_and_duplicates_nothing(
    app: str, clip: Path, schema: str, proxies: dict[str, TcpProxy], tmp_path: Path
) -> None:
    truth = json.loads(clip.with_suffix(".json").read_text())
    display = f"o{uuid.uuid4().hex[:8]}"
    replay = tmp_path / "replay.mp4"  # its own file: a stream of its own, from frame 0
    shutil.copy(clip, replay)
    run_camera(app, replay, display)
    wait_until(lambda: records(schema, display), 300, "the first record")
    proxies["redis"].cut()
    time.sleep(20)
    # Health as Actions answers it (a late answer on a loaded box is only an error line).
    cut_health = wait_until(
        lambda: actions_health(app, lambda a: a["sinks"]["redis"]["up"] is False),
        60,
        "Redis reported down",
    )
    proxies["redis"].restore()
    proxies["postgres"].cut()
    time.sleep(20)
    spilled = wait_until(
        lambda: actions_health(app, lambda a: any("error" in o for o in a["outbox"])),
        60,
        "the PostgreSQL outbox reported unreachable",
    )
    proxies["postgres"].restore()
    status = wait_until(lambda: camera_done(app, display), 600, "the clip to be processed")
    wait_until(lambda: outbox_empty(app), 180, lambda: undrained(app, schema))
    # The outages were seen, not hidden: Redis reported down, the PostgreSQL outbox
    # reported unreachable (what arrived meanwhile went to the SQLite spill file).
    assert cut_health["sinks"]["redis"]["up"] is False
    assert any("error" in o for o in spilled["outbox"]), spilled
    rows = records(schema, display)
    check_last_revisions(app, display, rows)  # before check_records removes the crops
    try:
        check_records(rows, truth, display)
    except AssertionError as exc:
        health = httpx.get(f"{app}/health", timeout=30).json()["actions"]
        raise AssertionError(f"{exc}\nsubscription: {status}\nactions: {health}") from exc
    unsubscribe(app, display)


def subscription(url: str, display: str) -> tuple[dict[str, Any], dict[str, Any]]:
    for stream in httpx.get(f"{url}/streams", timeout=30).json()["streams"]:
        for sub in stream.get("subscriptions", []):
            if sub["subscription_id"] == f"{display};cam":
                return stream, sub
    raise KeyError(display)


def restart_and_check_version(url: str, display: str, app_name: str, version: str) -> None:
    """Kill the registry, then the camera actor (Ray restarts both); the subscription
    runs `version` again on a new camera actor process."""
    import ray

    from graph.common.names import STREAMS_NAMESPACE, registry_name

    ray.kill(ray.get_actor(registry_name(app_name), STREAMS_NAMESPACE), no_restart=False)
    stream, _ = wait_until(lambda: subscription(url, display), 120, "the registry back")
    pid = httpx.get(f"{url}/streams", timeout=30).json()["actors"][stream["actor"]]["pid"]
    ray.kill(ray.get_actor(stream["actor"], STREAMS_NAMESPACE), no_restart=False)

    def back_on_version() -> bool:
        listing = httpx.get(f"{url}/streams", timeout=30).json()
        stream, sub = subscription(url, display)
        return bool(
            listing["actors"][stream["actor"]]["pid"] != pid
            and sub["processed"] > 3
            and sub["pipeline"]["pipeline_version"] == version
        )

    wait_until(back_on_version, 180, f"the restarted camera actor to run {version}")


def test_a_new_pipeline_version_is_swapped_in_without_dropping_the_stream(
    app: str, clip: Path, data: Path, schema: str, proxies: dict[str, TcpProxy], tmp_path: Path
) -> None:
    camera = tmp_path / "camera.mp4"  # a looping camera of its own
    shutil.copy(clip, camera)
    display = f"h{uuid.uuid4().hex[:8]}"
    run_camera(app, camera, display, replay=False)
    wait_until(lambda: subscription(app, display)[1]["processed"] > 5, 120, "frames")
    stream, sub = subscription(app, display)
    assert sub["pipeline"]["pipeline_version"] == demo_version()
    # Version 2 of the same pipeline, packed into a new archive and deployed over it.
    spec = json.loads((PROJECT_ROOT / "models" / "demo-pipeline.json").read_text())
    spec["version"] = "v2"
    (tmp_path / "pipeline.json").write_text(json.dumps(spec))
    archive = pack_archive(
        tmp_path / "pipeline.json", tmp_path / "v2.mpta", PROJECT_ROOT / "models"
    )
    deploy(data, archive, proxies, schema)
    wait_until(
        lambda: subscription(app, display)[1]["pipeline"]["pipeline_version"] == "v2",
        180,
        "the new version to reach the camera",
    )
    processed = subscription(app, display)[1]["processed"]
    wait_until(lambda: subscription(app, display)[1]["processed"] > processed + 10, 120, "frames")
    after, _ = subscription(app, display)
    # The same stream went on: never reconnected, never reopened.
    assert after["reconnects"] == stream["reconnects"] == 0
    assert after["frames_read"] > stream["frames_read"] and after["state"] == "connected"
    client = redis.Redis(port=6379)
    wait_until(lambda: list(client.scan_iter(f"camgraph:{display}:cam:*:v2.jpg")), 120, "v2 crops")
    # Ray restarts a crashed actor with the arguments of its first creation (version 1):
    # the registry and the camera actor must come back on v2 all the same.
    restart_and_check_version(app, display, APP, "v2")
    unsubscribe(app, display)
    for key in client.scan_iter(f"camgraph:{display}:*"):
        client.delete(key)
