"""A seed-style `.mpta` loaded at subscribe time from its `modelUrl`, served by a real
local HTTP server: `.pt` detector and `.pt` classifier (exported to ONNX on load), the
seeds' `redis` section, `timeout_seconds`, `expectedClasses`, `cropClass`, a numeric
client `modelId`, and a branch that always fails. Records land in a PostgreSQL table
the test created with typed columns (the CMS's), crops in the Redis database the
archive's section names (the deployment opts in: `archive_connections: use`; the catalog
tells the Actions deployment the route). A second subscription
reuses the loaded pipeline (one download), a hostile archive and a URL off the
allow-list are refused without touching the running camera, and the pipeline is
unloaded from the catalog and the replicas once idle."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psycopg
import pytest
import redis
from ray import serve
from websockets.sync.client import connect

from demo.datasets import HELD_OUT_SEED_START, write_clip
from deployments.actions import Actions
from deployments.classifier import Classifier
from deployments.detector import Detector
from deployments.dynamic import PipelineClassifier, PipelineDetector
from deployments.ingress import Ingress
from graph.app import Deployments, build_graph
from graph.common.names import PIPELINE_DETECTOR
from graph.config import PROJECT_ROOT
from graph.pipeline.archive import pack_archive
from tests.integration.apps import app_config, deployed, wait_until
from tests.peers import http_server
from tests.unit.test_pt_safe_load import AUTOBACKEND, torch_zip

pytestmark = pytest.mark.integration
APP = "camgraph-url-pipelines-test"
PG = "host=127.0.0.1 port=5432 dbname=test user=postgres"
TABLE = "car_events"
DETECTOR_ID, BODY_ID, BROKEN_ID = "car_frontal_detection_v1", "car_bodytype_cls_v1", "car_color_v1"

SEED_PIPELINE = {
    # The seeds' connection section, used: this deployment opts in (archive_connections:
    # use), so the crops go to the archive's Redis database, not the deployment's.
    "redis": {"host": "127.0.0.1", "port": 6379, "db": 7},
    "pipeline": {
        "modelId": DETECTOR_ID,
        "modelFile": "car_frontal.pt",
        "expectedClasses": ["vehicle"],
        "triggerClasses": ["vehicle"],
        "minConfidence": 0.5,
        "actions": [
            {
                "type": "redis_save_image",
                "region": "vehicle",
                "key": "camgraph-urltest:{camera_id}:{track_id}.jpg",
                "expire_seconds": 600,
            },
            {
                "type": "postgresql_create_record",
                "table": TABLE,
                "fields": {"camera_id": "{camera_id}", "detected_at": "{timestamp}"},
            },
        ],
        "branches": [
            {
                "modelId": BODY_ID,
                "modelFile": "car_bodytype.pt",
                "crop": True,
                "cropClass": "vehicle",
                "triggerClasses": ["vehicle"],
                "minConfidence": 0.3,
                "parallel": True,
                "timeout_seconds": 20,
                "actions": [],
            },
            {
                # A detection model where a classifier is expected: fails on every object.
                "modelId": BROKEN_ID,
                "modelFile": "car_color.pt",
                "crop": True,
                "triggerClasses": ["vehicle"],
                "parallel": True,
                "timeout_seconds": 5,
                "actions": [],
            },
        ],
        "parallelActions": [
            {
                "type": "postgresql_update_combined",
                "table": TABLE,
                "key_field": "session_id",
                "waitForBranches": [BODY_ID, BROKEN_ID],
                "fields": {
                    "car_body_type": f"{{{BODY_ID}.label}}",
                    "color": f"{{{BROKEN_ID}.label}}",
                },
            }
        ],
    },
}


class Counting(http.server.SimpleHTTPRequestHandler):
    """Serves the test's archive directory and counts GETs per path."""

    gets: ClassVar[dict[str, int]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            self.gets[self.path] = self.gets.get(self.path, 0) + 1
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """served/ok/seed.mpta (the seed-style pipeline), served/ok/hostile.mpta (a .pt whose
    pickle would construct AutoBackend), and served/other/seed.mpta (off the allow-list)."""
    root = tmp_path_factory.mktemp("served")
    work = tmp_path_factory.mktemp("archive-src")
    models = work / "models"
    models.mkdir()
    shutil.copy(PROJECT_ROOT / "models" / "demo-detector.pt", models / "car_frontal.pt")
    shutil.copy(PROJECT_ROOT / "models" / "body-type.pt", models / "car_bodytype.pt")
    shutil.copy(PROJECT_ROOT / "models" / "demo-detector.pt", models / "car_color.pt")
    (work / "pipeline.json").write_text(json.dumps(SEED_PIPELINE))
    (root / "ok").mkdir()
    (root / "other").mkdir()
    good = pack_archive(work / "pipeline.json", root / "ok" / "seed.mpta", models)
    shutil.copy(good, root / "other" / "seed.mpta")
    torch_zip(models / "car_frontal.pt", AUTOBACKEND)  # the root model, now hostile
    pack_archive(work / "pipeline.json", root / "ok" / "hostile.mpta", models)
    return root


@pytest.fixture(scope="module")
def server(archives: Path) -> Iterator[str]:
    Counting.gets = {}
    with http_server(partial(Counting, directory=str(archives))) as base:  # type: ignore[arg-type]
        yield base


@pytest.fixture(scope="module")
def schema() -> Iterator[str]:
    """The CMS's own table, typed, created before camgraph runs."""
    name = f"camgraph_url_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
        conn.execute(
            f'CREATE TABLE "{name}".{TABLE} (session_id uuid PRIMARY KEY,'
            " camera_id text NOT NULL, detected_at timestamptz, car_body_type text,"
            " color text)"
        )
    yield name
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def table_shape(schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG, autocommit=True) as conn:
        columns = conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (schema, TABLE),
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            (schema, TABLE),
        ).fetchall()
    return [*columns, *indexes]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "scene.mp4"
    return write_clip(HELD_OUT_SEED_START + 31, n_frames=100, video_path=out, fps=10, scale=1.0)


@pytest.fixture(scope="module")
def app(
    cluster: dict[str, Any], server: str, schema: str, clip: Path, tmp_path_factory: Any
) -> Iterator[str]:
    data = tmp_path_factory.mktemp("url-app")
    config = app_config(
        data,
        models=[{"id": "demo", "path": str(PROJECT_ROOT / "models" / "demo-detector.onnx")}],
        pipelines={
            "allowed_urls": [f"{server}/ok/"],
            "idle_unload_s": 5,
            "touch_interval_s": 1,
            "retry_after_error_s": 0,
        },
        archive_cache_dir=str(data / "archives"),
        onnx_cache_dir=str(data / "onnx"),
        streams={"reconcile_s": 1.0, "file_dirs": [str(clip.parent)]},
        actions={
            "redis_url": "redis://127.0.0.1:6379/0",
            "postgres_dsn": PG,
            "postgres_schema": schema,
            "data_dir": str(data / "actions"),
            "archive_connections": "use",
        },
    )
    small = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}
    application = build_graph(
        config,
        Deployments(
            Detector.options(**small),
            Ingress.options(num_replicas=1),
            Classifier.options(**small),
            Actions.options(**small),
            PipelineDetector.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5}),
            PipelineClassifier.options(**small),
        ),
    )
    url = cluster["http_url"]
    ready = lambda: httpx.get(f"{url}/health", timeout=10).json()["pipelines"] == {}  # noqa: E731
    with deployed(APP, application, ready=ready, what="the app with modelUrl pipelines on"):
        yield url


def subscribe_ws(url: str, payload: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A WebSocket client's subscribe and its answer (ack or error), skipping reports."""
    ws = connect(url.replace("http://", "ws://") + "/ws", open_timeout=30, max_queue=None)
    ws.send(json.dumps({"type": "subscribe", "payload": payload}))
    while True:
        reply = json.loads(ws.recv(timeout=300))
        if reply["type"] in ("subscribeAck", "error"):
            return ws, reply


def subscription(url: str, sub_id: str) -> dict[str, Any] | None:
    for stream in httpx.get(f"{url}/streams", timeout=30).json()["streams"]:
        for sub in stream.get("subscriptions", []):
            if sub["subscription_id"] == sub_id:
                return {**sub, "stream_state": stream["state"], "read": stream["frames_read"]}
    return None


def finished(url: str, sub_id: str) -> dict[str, Any] | None:
    sub = subscription(url, sub_id)
    if sub is None or sub["stream_state"] != "ended" or sub["processed"] != sub["read"]:
        return None
    return sub if sub["pipeline"]["passes_in_flight"] == 0 else None


def rows(schema: str) -> list[dict[str, Any]]:
    with psycopg.connect(PG, autocommit=True) as conn:
        cur = conn.execute(f'SELECT * FROM "{schema}".{TABLE} ORDER BY detected_at')
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def test_a_seed_archive_from_its_url_runs_and_is_shared_refused_and_unloaded(
    app: str, server: str, schema: str, clip: Path
) -> None:
    for db in (0, 7):  # crops an earlier run left
        leftover = redis.Redis(port=6379, db=db).keys("camgraph-urltest:*")
        if leftover:
            redis.Redis(port=6379, db=db).delete(*leftover)
    shape = table_shape(schema)
    seed_url = f"{server}/ok/seed.mpta"
    camera = {
        "subscriptionIdentifier": "disp-url;cam-1",
        "fileUrl": str(clip),
        "fileLoop": False,
        "fileRealtime": False,  # every frame, as fast as the graph goes
        "modelId": 101,
        "modelUrl": seed_url,
        "modelName": "Car Frontal Detection",
    }
    ws, reply = subscribe_ws(app, camera)
    with ws:
        assert reply["type"] == "subscribeAck", reply
        listed = httpx.get(f"{app}/pipelines", timeout=30).json()
        entry = listed[seed_url]
        assert entry["state"] == "enabled" and entry["modelId"] == DETECTOR_ID, entry
        assert any(BROKEN_ID in w for w in entry["warnings"]), entry
        health = httpx.get(f"{app}/health", timeout=30).json()  # open: no URL in it
        assert health["pipelines"][entry["id"]]["state"] == "enabled", health["pipelines"]
        assert server not in json.dumps(health), health["pipelines"]
        # The client's numeric modelId comes back as a number in its detections.
        got = []
        while not any(m["type"] == "imageDetection" and m["payload"]["detections"] for m in got):
            got.append(json.loads(ws.recv(timeout=120)))
        detection = next(m for m in got if m["type"] == "imageDetection")
        info = detection["payload"]["modelInfo"]
        assert info["modelId"] == 101 and info["modelName"] == "Car Frontal Detection", info

        # A second subscription to the same URL (REST) shares the loaded pipeline.
        copy = shutil.copy(clip, clip.with_name("scene-2.mp4"))  # a stream of its own
        second = {**camera, "subscriptionIdentifier": "disp-url;cam-2", "fileUrl": str(copy)}
        second.update(fileLoop=True, fileRealtime=True)
        r = httpx.post(f"{app}/streams", json=second, timeout=300)
        assert r.status_code == 201, r.text
        # A hostile archive and a URL off the allow-list: refused, naming why.
        hostile = {**camera, "subscriptionIdentifier": "disp-url;cam-3"}
        hostile["modelUrl"] = f"{server}/ok/hostile.mpta"
        bad_ws, bad = subscribe_ws(app, hostile)
        bad_ws.close()
        assert bad["type"] == "error" and "AutoBackend" in bad["message"], bad
        assert bad["details"][0]["loc"] == ["payload", "modelUrl"], bad
        listed = httpx.get(f"{app}/pipelines", timeout=30).json()[hostile["modelUrl"]]
        assert listed["state"] == "error" and "AutoBackend" in listed["error"], listed
        assert server not in listed["error"]  # the problems, not the (maybe signed) URL
        hostile["modelUrl"] = f"{server}/other/seed.mpta"
        r = httpx.post(f"{app}/streams", json=hostile, timeout=60)
        assert r.status_code == 403 and "allowed_urls" in r.json()["detail"]["message"], r.text
        assert subscription(app, "disp-url;cam-3") is None

        done = wait_until(
            lambda: finished(app, "disp-url;cam-1"),
            600,
            lambda: f"the clip to be processed: {subscription(app, 'disp-url;cam-1')}",
        )
        assert sum(done["drops"].values()) == 0, done  # a lossless replay
        assert done["pipeline"]["actions_partial"].get(BROKEN_ID, 0) >= 1, done["pipeline"]
    # One download of the good archive, whatever the subscriptions and replicas.
    assert Counting.gets.get("/ok/seed.mpta") == 1, Counting.gets
    assert subscription(app, "disp-url;cam-2")["processed"] > 0

    # Records in the CMS's typed table: one per object, the body type from the .pt
    # classifier, the broken branch left NULL; the table itself untouched.
    found = wait_until(
        lambda: [r for r in rows(schema) if r["car_body_type"]] and rows(schema),
        120,
        "records with a body type",
    )
    assert table_shape(schema) == shape
    mine = [r for r in found if r["camera_id"] == "cam-1"]
    assert mine and all(r["color"] is None for r in found), found
    assert sum(r["car_body_type"] is not None for r in mine) >= len(mine) // 2, mine
    assert len({r["session_id"] for r in found}) == len(found)
    client = redis.Redis(port=6379, db=7)  # the archive's own Redis database
    assert not redis.Redis(port=6379).keys("camgraph-urltest:*")
    crops = client.keys("camgraph-urltest:cam-1:*.jpg")
    assert crops and all(0 < client.ttl(k) <= 600 for k in crops), crops
    client.delete(*crops, *client.keys("camgraph-urltest:*"))

    # Unsubscribed: the pipeline is unloaded from the catalog and from the replicas.
    for sub_id in ("disp-url;cam-1", "disp-url;cam-2"):
        assert httpx.delete(f"{app}/streams/{sub_id}", timeout=30).status_code in (204, 404)
    wait_until(
        lambda: seed_url not in httpx.get(f"{app}/pipelines", timeout=30).json(),
        60,
        "the idle pipeline to be unloaded",
    )
    handle = serve.get_deployment_handle(PIPELINE_DETECTOR, app_name=APP)
    wait_until(
        lambda: handle.stats.remote().result(timeout_s=30)["models"] == [],
        30,
        lambda: f"the replica to drop it: {handle.stats.remote().result(timeout_s=30)}",
    )
    # Asked again, it loads again (from the node's cache: still one download).
    ws, reply = subscribe_ws(app, {**camera, "subscriptionIdentifier": "disp-url;cam-4"})
    with ws:
        assert reply["type"] == "subscribeAck", reply
    assert Counting.gets.get("/ok/seed.mpta") == 2  # the catalog checks the URL's content
