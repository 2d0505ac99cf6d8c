"""The ingress's FastAPI app as one replica builds it (`build_api`), through a real client,
without Ray: the routes, the auth middleware and the error table are real; the actors and
deployments they call, outside this test's scope, are stand-ins that answer, refuse or
fail the way the real ones do."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError, RayTaskError
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from deployments.api.app import ApiDeps, build_api
from deployments.api.detect import Detectors
from deployments.api.state import ReplicaState
from deployments.jobs.records import DuplicateJobError, JobNotFoundError
from graph.common.detection import DetectResult, EncodedImage
from graph.common.errors import BadImageError, ModelNotReadyError
from graph.common.schemas import IngressSettings
from graph.common.vision import decode_letterboxed
from graph.control import ControlPlane
from graph.events.fanout import EventFanout
from graph.events.hub import EventHubService
from graph.wiring import IngressConfig
from stream_actors.sessions import MAX_SESSION_DATA_BYTES, SessionBook
from stream_actors.subscriptions import SubscriptionRefused
from tests.peers import free_port
from tests.unit.test_ingress_images import bomb_png

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SUB = {"subscriptionIdentifier": "display-1;cam-1", "rtspUrl": "rtsp://127.0.0.1:8554/cam"}
JOB = "a" * 32


def remote(fn: Callable[..., Awaitable[Any]]) -> SimpleNamespace:
    """An actor or deployment method as the routes call it: `.remote(...)` is awaited."""
    return SimpleNamespace(remote=fn)


class Response:
    """A DeploymentResponse: awaited for the result, cancelled when its caller gives up."""

    def __init__(self, result: Awaitable[Any]) -> None:
        self._result = result
        self.cancelled = False

    def __await__(self) -> Any:
        return self._result.__await__()

    def cancel(self) -> None:
        self.cancelled = True


class Detector:
    """A Detector deployment: decodes the image as the replica does (the real
    `decode_letterboxed`), then one box per image, or the failure it is told to raise."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.delay_s = 0.0
        self.responses: list[Response] = []
        self.detect_image = SimpleNamespace(remote=self._remote)
        self.health = remote(self._health)

    def _remote(self, request: EncodedImage) -> Response:
        self.responses.append(Response(self._detect_image(request)))
        return self.responses[-1]

    async def _detect_image(self, request: EncodedImage) -> DetectResult:
        if self.failure is not None:
            raise self.failure
        await asyncio.sleep(self.delay_s)
        _, lb = decode_letterboxed(request.data, 32, request.max_pixels)
        rows = np.array([[8, 8, 24, 24, 0.9, 0]], np.float32)
        return DetectResult(rows, {0: "car"}, lb)

    async def _health(self) -> dict[str, Any]:
        return {"model": "demo", "state": "enabled"}


class Registry:
    """The stream registry actor's calls; `mode` makes them fail like a dead actor."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.subs: set[str] = set()
        self.sessions = SessionBook()  # the registry's own book
        names = ("subscribe", "unsubscribe", "list_streams", "events", "latest_jpeg")
        for name in (*names, "set_session", "patch_session", "session_of"):
            setattr(self, name, remote(getattr(self, f"_{name}")))

    def _behave(self) -> None:
        if self.mode == "dead":
            raise ActorDiedError()

    async def _subscribe(self, body: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        self._behave()
        if body.get("rtspUrl", "").endswith("/forbidden"):
            raise SubscriptionRefused("this source is not allowed")
        self.subs.add(body["subscriptionIdentifier"])
        return {"stream": "rtsp-0", "pending_error": None}

    async def _unsubscribe(self, sub_id: str) -> bool:
        known = sub_id in self.subs
        self.subs.discard(sub_id)
        return known

    async def _list_streams(self) -> dict[str, Any]:
        self._behave()
        return {"streams": [{"state": "connected"}, {"state": "connecting"}]}

    async def _events(self, sub_id: str, after: int) -> list[Any]:
        if sub_id not in self.subs:
            raise KeyError(sub_id)
        return [{"id": after + 1}]

    async def _set_session(self, display_id: str, session_id: Any) -> bool:
        self._behave()
        return self.sessions.set(display_id, session_id)

    async def _patch_session(self, session_id: Any, data: dict[str, Any]) -> dict[str, Any]:
        return self.sessions.patch(session_id, data)[1]

    async def _session_of(self, display_id: str) -> dict[str, Any] | None:
        return self.sessions.of(display_id)

    async def _latest_jpeg(self, camera_id: str) -> bytes | None:
        if camera_id == "unknown":
            raise KeyError(camera_id)
        return None if camera_id == "dark" else b"\xff\xd8jpeg"


class Jobs:
    """The media jobs actor's calls."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.submitted: set[str] = set()
        for name in ("submit", "get", "cancel", "list"):
            setattr(self, name, remote(getattr(self, f"_{name}")))

    async def _submit(self, media_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if media_id in self.submitted:
            raise DuplicateJobError(media_id, JOB)
        self.submitted.add(media_id)
        return {"job_id": JOB, "status": "queued"}

    async def _get(self, job_id: str) -> dict[str, Any]:
        if job_id != JOB:
            raise JobNotFoundError(job_id)
        return {"job_id": JOB, "status": "running"}

    async def _cancel(self, job_id: str) -> dict[str, Any]:
        return await self._get(job_id)

    async def _list(self, limit: int) -> list[Any]:
        if self.mode == "dead":
            raise ActorDiedError()
        return []


class Actions:
    def __init__(self) -> None:
        self.recent = remote(self._recent)
        self.health = remote(self._health)

    async def _recent(self, limit: int) -> list[Any]:
        await asyncio.sleep(10)  # never answers within the health timeout
        return []

    async def _health(self) -> dict[str, Any]:
        return {"sinks": ["local"]}


class Fakes(SimpleNamespace):
    detector: Detector
    registry: Registry
    jobs: Jobs


def build(
    token: str | None = TOKEN, actions: Actions | None = None, **overrides: Any
) -> tuple[TestClient, Fakes]:
    """One replica's app over stand-ins, as the Ingress builds it."""
    settings = IngressSettings(max_upload_bytes=4096, health_timeout_s=0.2, **overrides)
    config = IngressConfig(detectors={"demo": "Detector_demo"}, model_sizes={"demo": 32})
    fakes = Fakes(detector=Detector(), registry=Registry(), jobs=Jobs())
    hub = EventHubService()
    control = ControlPlane(
        "test",
        config,
        fakes.registry,
        SimpleNamespace(stats=remote(hub.stats), set_session=remote(hub.set_session)),
    )
    control._jobs = fakes.jobs  # found already: no actor to start
    deps = ApiDeps(
        settings=settings,
        auth_token=token,
        detectors=Detectors({"demo": fakes.detector}, "demo", settings),  # type: ignore[dict-item]
        classifiers={},
        actions=actions,  # type: ignore[arg-type]
        control=control,
        fanout=EventFanout(hub.read, wait_s=0.1),
        state=ReplicaState(control, settings.health_timeout_s),
    )
    return TestClient(build_api(deps), raise_server_exceptions=False), fakes


@pytest.fixture
def api() -> Iterator[tuple[TestClient, Fakes]]:
    client, fakes = build()
    with client:
        yield client, fakes


def jpeg() -> bytes:
    ok, data = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))
    assert ok
    return data.tobytes()


def test_every_route_but_health_and_the_live_view_needs_the_token(
    api: tuple[TestClient, Fakes],
) -> None:
    client, _ = api
    assert client.get("/health").status_code == 200
    assert client.get("/ui").status_code == 200
    refused = client.get("/streams")
    assert refused.status_code == 401
    assert refused.json() == {"detail": {"message": "missing or wrong bearer token"}}
    assert refused.headers["www-authenticate"] == 'Bearer realm="camgraph"'
    assert client.get("/streams", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/streams", headers=AUTH).status_code == 200


OPEN_PATHS = {"/health", "/ui"}


def test_every_route_of_the_openapi_schema_is_refused_without_the_token(
    api: tuple[TestClient, Fakes],
) -> None:
    """Every HTTP route the app declares (read from its own schema, so a route added later
    is covered), each method, without a token and with a wrong one: 401 before any work."""
    client, fakes = api
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    tried = []
    for template, methods in paths.items():
        path = template.replace("{media_id}", "scene-1").replace("{job_id}", JOB)
        path = path.replace("{subscription_id}", "display-1;cam-1").replace("{camera_id}", "c")
        path = path.replace("{display_id}", "display-1").replace("{session_id}", "4242")
        assert "{" not in path, f"a path parameter this test does not fill: {template}"
        for method in methods:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = client.request(method.upper(), path, headers=headers)
                expected = 200 if template in OPEN_PATHS else 401
                assert response.status_code == expected, (method, path, headers)
            tried.append((method, template))
    assert len(tried) >= 11 and ("post", "/detect") in tried and ("get", "/events") in tried
    assert fakes.registry.subs == set() and fakes.jobs.submitted == set()  # nothing ran
    assert fakes.registry.sessions.displays == {}
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 401


def test_health_says_what_failed_but_never_the_failure_text() -> None:
    """/health is open: a failing replica or actor shows as its error's kind, never its
    text (a Ray error's text is the remote traceback, with paths, addresses, secrets)."""
    client, fakes = build()

    async def leaking_health() -> dict[str, Any]:
        raise ValueError("cannot reach postgres://camgraph:hunter2@db/prod from /opt/x.py")

    fakes.detector.health = remote(leaking_health)
    fakes.registry.mode = "dead"
    with client:
        response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["models"] == {"demo": {"state": "error", "error": "ValueError"}}
    assert body["streams"] == {"error": "stream registry: ActorDiedError"}
    assert "hunter2" not in response.text and "/opt/x.py" not in response.text


def test_without_a_token_the_api_is_open() -> None:
    client, _ = build(token=None)
    assert client.get("/streams").status_code == 200


def test_detect_answers_boxes_and_maps_failures(api: tuple[TestClient, Fakes]) -> None:
    client, fakes = api
    ok = client.post("/detect", files={"file": ("a.jpg", jpeg())}, headers=AUTH)
    assert ok.status_code == 200, ok.text
    assert [d["label"] for d in ok.json()] == ["car"]
    unknown = client.post("/detect?model=nosuch", files={"file": ("a.jpg", jpeg())}, headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == {
        "message": "unknown model 'nosuch'; configured: demo",
        "model": "nosuch",
        "known": ["demo"],
    }
    empty = client.post("/detect", files={"file": ("a.jpg", b"")}, headers=AUTH)
    assert empty.status_code == 400 and empty.json()["detail"]["message"] == "empty upload"
    big = client.post("/detect", files={"file": ("a.jpg", b"x" * 5000)}, headers=AUTH)
    assert big.status_code == 413 and big.json()["detail"]["limit_bytes"] == 4096
    garbage = client.post("/detect", files={"file": ("a.jpg", b"\x00garbage")}, headers=AUTH)
    assert garbage.status_code == 400 and "decodable" in garbage.json()["detail"]["message"]
    config = client.post(
        "/detect", files={"file": ("a.jpg", jpeg())}, data={"config": '{"iou": 2}'}, headers=AUTH
    )
    assert config.status_code == 422 and config.json()["detail"][0]["loc"] == [
        "body",
        "config",
        "iou",
    ]
    missing = client.post("/detect", data={"config": "{}"}, headers=AUTH)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "file"]
    fakes.detector.failure = ModelNotReadyError("demo", "loading")
    loading = client.post("/detect", files={"file": ("a.jpg", jpeg())}, headers=AUTH)
    assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
    assert loading.json()["detail"] == {
        "message": "model 'demo' is loading",
        "model": "demo",
        "state": "loading",
        "error": None,
    }
    fakes.detector.failure = RuntimeError("engine broke")
    failed = client.post("/detect", files={"file": ("a.jpg", jpeg())}, headers=AUTH)
    assert failed.status_code == 500
    assert failed.json()["detail"]["message"] == "inference failed"
    assert len(failed.json()["detail"]["error_id"]) == 12


def test_detect_boxes_are_in_the_uploaded_images_pixels(api: tuple[TestClient, Fakes]) -> None:
    client, _ = api
    _, wide = cv2.imencode(".png", np.zeros((16, 64, 3), np.uint8))  # 64x16 into 32x32
    r = client.post("/detect", files={"file": ("a.png", wide.tobytes())}, headers=AUTH)
    assert r.status_code == 200, r.text
    # Gain 0.5 and 12 px of padding on top: the model's (8, 8, 24, 24) is (16, 0, 48, 16).
    assert r.json()[0]["box"] == {"x1": 16.0, "y1": 0.0, "x2": 48.0, "y2": 16.0}


def remote_error(cause: Exception) -> Exception:
    """`cause` raised in a replica, as Ray hands it to the caller: a RayTaskError that is
    also an instance of the cause's class, whose str() is the remote traceback."""
    return RayTaskError(
        "detect_image", "Traceback (most recent call last): ...", cause
    ).as_instanceof_cause()


def test_replica_errors_keep_their_status_and_message(api: tuple[TestClient, Fakes]) -> None:
    client, fakes = api
    fakes.detector.failure = remote_error(BadImageError("the upload is not a decodable image"))
    bad = client.post("/detect", files={"file": ("a.jpg", jpeg())}, headers=AUTH)
    assert bad.status_code == 400
    assert bad.json()["detail"] == {"message": "the upload is not a decodable image"}
    fakes.detector.failure = remote_error(ModelNotReadyError("demo", "converting"))
    converting = client.post("/detect", files={"file": ("a.jpg", jpeg())}, headers=AUTH)
    assert converting.status_code == 503
    assert converting.json()["detail"]["message"] == "model 'demo' is converting"
    # A timeout inside the replica is its failure, not the client's deadline.
    fakes.detector.failure = remote_error(TimeoutError("engine lock"))
    failed = client.post("/detect", files={"file": ("a.jpg", jpeg())}, headers=AUTH)
    assert failed.status_code == 500 and len(failed.json()["detail"]["error_id"]) == 12
    assert not any(r.cancelled for r in fakes.detector.responses)


def test_an_upload_that_is_no_image_never_reaches_a_replica(api: tuple[TestClient, Fakes]) -> None:
    client, fakes = api
    garbage = client.post("/detect", files={"file": ("a.png", b"\x00garbage")}, headers=AUTH)
    assert garbage.status_code == 400
    assert garbage.json()["detail"]["message"] == "the upload is not a decodable image"
    bomb = client.post("/detect", files={"file": ("a.png", bomb_png(30_000, 30_000))}, headers=AUTH)
    assert bomb.status_code == 400
    assert "900000000 pixels, more than the limit" in bomb.json()["detail"]["message"]
    assert fakes.detector.responses == []


def test_a_detection_past_its_deadline_is_a_504_and_its_request_is_cancelled() -> None:
    client, fakes = build(detect_timeout_s=0.2)
    fakes.detector.delay_s = 5
    with client:
        r = client.post("/detect", files={"file": ("a.jpg", jpeg())}, headers=AUTH)
    assert r.status_code == 504, r.text
    assert r.json()["detail"]["message"] == "detection took longer than 0.2s"
    assert [x.cancelled for x in fakes.detector.responses] == [True]


def test_media_jobs(api: tuple[TestClient, Fakes]) -> None:
    client, fakes = api
    body = {"path": "/data/clip.mp4"}
    submitted = client.post("/detect/scene-1", json=body, headers=AUTH)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json() == {
        "job_id": JOB,
        "media_id": "scene-1",
        "status": "queued",
        "events_url": f"/events?job={JOB}&last_event_id=0",
    }
    again = client.post("/detect/scene-1", json=body, headers=AUTH)
    assert again.status_code == 409 and again.json()["detail"]["job_id"] == JOB
    unknown = client.post("/detect/scene-2", json={**body, "model": "nosuch"}, headers=AUTH)
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["type"] == "unknown_model"
    assert client.get(f"/jobs/{JOB}", headers=AUTH).json()["status"] == "running"
    gone = client.get(f"/jobs/{'0' * 32}", headers=AUTH)
    assert gone.status_code == 404 and gone.json()["detail"]["message"] == f"no job '{'0' * 32}'"
    assert client.delete(f"/jobs/{'0' * 32}", headers=AUTH).status_code == 404
    fakes.jobs.mode = "dead"
    away = client.get("/jobs", headers=AUTH)
    assert away.status_code == 503
    assert away.json()["detail"]["message"] == "media jobs unavailable: ActorDiedError"


def test_streams(api: tuple[TestClient, Fakes]) -> None:
    client, fakes = api
    assert client.post("/streams", json=SUB, headers=AUTH).status_code == 201
    refused = client.post(
        "/streams",
        json={**SUB, "rtspUrl": "rtsp://127.0.0.1:8554/forbidden"},
        headers=AUTH,
    )
    assert refused.status_code == 403
    assert refused.json()["detail"]["message"] == "this source is not allowed"
    unknown = client.post("/streams", json={**SUB, "modelId": "nosuch"}, headers=AUTH)
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == [
        "body",
        "modelId",
    ]
    events = client.get("/streams/display-1;cam-1/events?after=4", headers=AUTH)
    assert events.json() == [{"id": 5}]
    assert client.get("/streams/display-1;nope/events", headers=AUTH).status_code == 404
    assert client.delete("/streams/display-1;cam-1", headers=AUTH).status_code == 204
    assert client.delete("/streams/display-1;cam-1", headers=AUTH).status_code == 404
    # The seeds' `/camera/{camera_id}/image` and camgraph's `/cameras/...`: the same route.
    for prefix in ("/camera", "/cameras"):
        assert client.get(f"{prefix}/unknown/image", headers=AUTH).status_code == 404
        dark = client.get(f"{prefix}/dark/image", headers=AUTH)
        assert dark.status_code == 503 and dark.json()["detail"]["message"] == (
            "camera 'dark' has no frame yet"
        )
        image = client.get(f"{prefix}/cam-1/image", headers=AUTH)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.content == b"\xff\xd8jpeg" and image.headers["cache-control"] == "no-store"
        assert client.get(f"{prefix}/cam-1/image").status_code == 401
        assert client.get(f"{prefix}/a;b/image", headers=AUTH).status_code == 422
    # The seed's example payload gives rtspUrl and snapshotUrl: taken; fileUrl goes alone.
    both = {**SUB, "subscriptionIdentifier": "display-1;cam-2", "snapshotUrl": "http://h/s.jpg"}
    assert client.post("/streams", json=both, headers=AUTH).status_code == 201
    mixed = client.post("/streams", json={**SUB, "fileUrl": "/data/a.mp4"}, headers=AUTH)
    assert mixed.status_code == 422 and "fileUrl cannot be combined" in mixed.text
    fakes.registry.mode = "dead"
    away = client.post("/streams", json=SUB, headers=AUTH)
    assert away.status_code == 503
    assert away.json()["detail"]["message"] == "stream registry unavailable: ActorDiedError"
    listing = client.get("/streams", headers=AUTH)
    assert listing.status_code == 503
    assert listing.json()["detail"]["message"] == "stream registry unavailable: ActorDiedError"


def test_sessions_over_http(api: tuple[TestClient, Fakes]) -> None:
    """setSessionId and patchSession for REST backends: PUT a display's session, PATCH a
    session's data, GET both back; bad ids 422, unknown sessions 404, over the cap 413."""
    client, fakes = api
    put = client.put("/displays/display-7/session", json={"sessionId": 4242}, headers=AUTH)
    assert put.status_code == 200
    assert put.json() == {"displayIdentifier": "display-7", "sessionId": 4242, "changed": True}
    again = client.put("/displays/display-7/session", json={"sessionId": 4242}, headers=AUTH)
    assert again.json()["changed"] is False
    patched = client.patch("/sessions/4242", json={"data": {"lane": 2}}, headers=AUTH)
    assert patched.status_code == 200 and patched.json()["data"] == {"lane": 2}
    got = client.get("/displays/display-7/session", headers=AUTH).json()
    assert got == {"displayIdentifier": "display-7", "sessionId": 4242, "data": {"lane": 2}}
    assert client.patch("/sessions/99", json={"data": {}}, headers=AUTH).status_code == 404
    half = "x" * (MAX_SESSION_DATA_BYTES // 2 + 100)
    assert client.patch("/sessions/4242", json={"data": {"a": half}}, headers=AUTH).is_success
    over = client.patch("/sessions/4242", json={"data": {"b": half}}, headers=AUTH)
    assert over.status_code == 413 and "at most" in over.json()["detail"]["message"]
    for bad in (True, 2**64, "", "x" * 300, 1.5):
        refused = client.put("/displays/display-7/session", json={"sessionId": bad}, headers=AUTH)
        assert refused.status_code == 422, bad
    assert (
        client.put("/displays/a;b/session", json={"sessionId": 1}, headers=AUTH).status_code == 422
    )
    cleared = client.put("/displays/display-7/session", json={"sessionId": None}, headers=AUTH)
    assert cleared.json()["changed"] is True
    assert client.get("/displays/display-7/session", headers=AUTH).status_code == 404
    fakes.registry.mode = "dead"
    away = client.put("/displays/display-7/session", json={"sessionId": 1}, headers=AUTH)
    assert away.status_code == 503


def test_records_and_health_with_actions_that_do_not_answer() -> None:
    client, _ = build(actions=Actions())
    with client:
        records = client.get("/records", headers=AUTH)
        assert records.status_code == 503
        assert records.json()["detail"]["message"] == "actions unavailable: TimeoutError"
        health = client.get("/health").json()
    assert health["status"] == "ok" and health["default_model"] == "demo"
    assert health["models"] == {"demo": {"state": "enabled"}}
    assert health["streams"] == {"total": 2, "by_state": {"connected": 1, "connecting": 1}}
    assert health["actions"] == {"sinks": ["local"]}
    assert health["events"]["replica"]["websockets"] == 0


def test_records_without_a_pipeline_are_empty(api: tuple[TestClient, Fakes]) -> None:
    client, _ = api
    assert client.get("/records", headers=AUTH).json() == []


def test_sse_refuses_a_bad_last_event_id(api: tuple[TestClient, Fakes]) -> None:
    client, _ = api
    bad = client.get("/events", headers={**AUTH, "Last-Event-ID": "x"})
    assert bad.status_code == 400
    assert bad.json() == {"detail": {"message": "Last-Event-ID must be a non-negative integer"}}


@contextmanager
def served(client: TestClient) -> Iterator[str]:
    """The app on a real uvicorn server (WebSocket sessions run background tasks that
    the test client's portal does not wait for); yields its ws:// address."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_websocket_with_a_wrong_token_is_closed_4401() -> None:
    client, _ = build()
    with (
        served(client) as url,
        connect(f"{url}/ws?access_token=wrong", open_timeout=5) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


def test_websocket_subscribe_and_errors() -> None:
    client, fakes = build()
    with (
        served(client) as url,
        connect(f"{url}/", additional_headers=AUTH, open_timeout=5) as ws,
    ):
        ws.send(json.dumps({"type": "subscribe", "requestId": 1, "payload": SUB}))
        ack = json.loads(ws.recv(timeout=5))
        assert ack["type"] == "subscribeAck" and ack["requestId"] == 1
        assert ack["status"] == "success" and ack["subscriptionId"] == SUB["subscriptionIdentifier"]
        ws.send("not json")
        assert json.loads(ws.recv(timeout=5))["type"] == "error"
        fakes.registry.mode = "dead"
        ws.send(json.dumps({"type": "subscribe", "requestId": 2, "payload": SUB}))
        error = json.loads(ws.recv(timeout=5))
        assert error["message"] == "stream registry unavailable: ActorDiedError"
        assert (error["requestType"], error["requestId"]) == ("subscribe", 2)


def test_each_replica_builds_its_own_app() -> None:
    (first, _), (second, _) = build(token="one"), build(token="two")
    assert first.app is not second.app
    assert first.get("/streams", headers={"Authorization": "Bearer one"}).status_code == 200
    assert second.get("/streams", headers={"Authorization": "Bearer one"}).status_code == 401
