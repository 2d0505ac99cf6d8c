"""One WebSocket session of the detector-worker protocol over a real socket (uvicorn and
a `websockets` client), without Ray: the session, its fan-out and the EventHub's own class are
real; the stream registry actor, outside this test's scope, is a stand-in that can hang
or fail the way an actor that restarts does."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import uvicorn
from fastapi import FastAPI, WebSocket
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import ClientConnection, connect

from deployments.api.ws_session import WS_INTERNAL_ERROR, WsDeps, WsSession
from graph.common.schemas import IngressSettings
from graph.events.fanout import EventFanout
from graph.events.hub import EventHubService
from graph.events.model import StreamEvent, TrackedDetection, hub_event, result_event
from stream_actors.sessions import MAX_SESSION_DATA_BYTES, SessionBook
from tests.peers import free_port
from tests.unit.seed_messages import seed_subscribe_ack, subscribe_example

SUB = {"subscriptionIdentifier": "display-1;cam-1", "rtspUrl": "rtsp://127.0.0.1:8554/cam"}


def remote(fn: Callable[..., Awaitable[Any]]) -> SimpleNamespace:
    """An actor method as the session calls it: `.remote(...)` gives an awaitable."""
    return SimpleNamespace(remote=fn)


class Hub(EventHubService):
    """The EventHub's own class, and the server's loop it runs on (tests publish there)."""

    loop: asyncio.AbstractEventLoop | None = None

    def publish_from_test(self, events: list[dict[str, Any]]) -> None:
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(self.publish(events), self.loop).result(5)


class Registry:
    """The stream registry actor's calls (its sessions are the registry's own book);
    `mode` makes them answer, hang or fail."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.subs: set[str] = set()
        self.sessions = SessionBook()

    async def _behave(self) -> None:
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "fail":
            raise ray.exceptions.RayActorError()

    async def subscribe(self, body: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        await self._behave()
        self.subs.add(body["subscriptionIdentifier"])
        return {"stream": "rtsp-0", "pending_error": None}

    async def unsubscribe(self, sub_id: str) -> bool:
        await self._behave()
        known = sub_id in self.subs
        self.subs.discard(sub_id)
        return known

    async def set_session(self, display_id: str, session_id: Any) -> bool:
        await self._behave()
        return self.sessions.set(display_id, session_id)

    async def patch_session(self, session_id: Any, data: dict[str, Any]) -> dict[str, Any]:
        await self._behave()
        return self.sessions.patch(session_id, data)[1]


def session_deps(registry: Registry, system: Callable[[], dict[str, Any]], hub: Hub) -> WsDeps:
    """What a session uses of its Ingress replica: the hub's own class, a stand-in
    registry, and the replica's cached figures."""

    async def streams() -> list[dict[str, Any]]:
        return []

    async def system_load() -> dict[str, Any]:
        return system()

    return WsDeps(
        registry=SimpleNamespace(
            subscribe=remote(registry.subscribe),
            unsubscribe=remote(registry.unsubscribe),
            set_session=remote(registry.set_session),
            patch_session=remote(registry.patch_session),
        ),
        hub=SimpleNamespace(set_session=remote(hub.set_session)),
        fanout=EventFanout(hub.read, wait_s=0.1),
        models={"demo": None, "101": "v7"},  # model id → its pipeline's version
        settings=IngressSettings(state_report_s=0.2, actor_call_timeout_s=0.5),
        streams=streams,
        system=system_load,
    )


@contextmanager
def session_socket(
    registry: Registry,
    system: Callable[[], dict[str, Any]] = lambda: {"cpuUsage": 1.0},
    hub: Hub | None = None,
) -> Iterator[ClientConnection]:
    """A client connected to a real uvicorn server whose `/` runs one WsSession."""
    app = FastAPI()
    the_hub = hub or Hub()

    @app.websocket("/")
    async def ws(websocket: WebSocket) -> None:
        the_hub.loop = asyncio.get_running_loop()
        await websocket.accept()
        await WsSession(session_deps(registry, system, the_hub), websocket).run()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with connect(f"ws://127.0.0.1:{port}/", open_timeout=5) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    ws.send(json.dumps(message))


def receive(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next message of `kind` (stateReports come meanwhile)."""
    for _ in range(50):
        message = dict(json.loads(ws.recv(timeout=5)))
        if message["type"] == kind:
            return message
    raise AssertionError(f"no {kind} message")


def test_a_registry_that_does_not_answer_gets_an_error_and_the_connection_stays_open() -> None:
    registry = Registry()
    registry.mode = "hang"
    with session_socket(registry) as ws:
        send(ws, {"type": "subscribe", "requestId": 7, "payload": SUB})
        error = receive(ws, "error")
        assert error["requestType"] == "subscribe" and error["requestId"] == 7
        assert "stream registry unavailable: TimeoutError" in error["message"]
        registry.mode = "ok"
        send(ws, {"type": "subscribe", "payload": SUB})
        assert receive(ws, "subscribeAck")["subscriptionId"] == SUB["subscriptionIdentifier"]


def test_an_unsubscribe_the_registry_failed_keeps_the_subscription() -> None:
    registry = Registry()
    with session_socket(registry) as ws:
        send(ws, {"type": "subscribe", "payload": SUB})
        receive(ws, "subscribeAck")
        registry.mode = "fail"
        send(ws, {"type": "unsubscribe", "payload": {"subscriptionIdentifier": "display-1;cam-1"}})
        assert "service unavailable, retry: RayActorError" in receive(ws, "error")["message"]
        send(ws, {"type": "requestState"})
        cameras = receive(ws, "stateReport")["cameraConnections"]
        assert [c["subscriptionIdentifier"] for c in cameras] == ["display-1;cam-1"]
        registry.mode = "ok"
        send(ws, {"type": "unsubscribe", "payload": {"subscriptionIdentifier": "display-1;cam-1"}})
        receive(ws, "unsubscribeAck")
        send(ws, {"type": "requestState"})
        assert receive(ws, "stateReport")["cameraConnections"] == []


def test_a_failed_state_reporter_closes_the_connection_with_1011() -> None:
    calls = {"n": 0}

    def system() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("psutil went away")
        return {"cpuUsage": 1.0}

    with session_socket(Registry(), system) as ws:
        assert receive(ws, "stateReport")["cpuUsage"] == 1.0
        with pytest.raises(ConnectionClosedError) as closed:
            for _ in range(50):
                ws.recv(timeout=5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == WS_INTERNAL_ERROR
        assert "ws-state failed" in closed.value.rcvd.reason


def test_the_seeds_subscribe_gets_the_seeds_ack_and_image_detections() -> None:
    """001's example subscribe (modelId 101) over a real socket: the seed's subscribeAck,
    then the seed's imageDetection for its camera's frame, modelId 101 a number in both."""
    hub = Hub()
    with session_socket(Registry(), hub=hub) as ws:
        send(ws, {**subscribe_example(), "requestId": "s-1"})
        ack = receive(ws, "subscribeAck")
        assert {k: ack[k] for k in ("type", "status", "subscriptionId")} == seed_subscribe_ack(
            "display-001;cam-001"
        )
        assert ack["modelId"] == 101 and type(ack["modelId"]) is int
        assert ack["requestId"] == "s-1"
        car = TrackedDetection(3, 2, "car", 0.91, (10.0, 20.0, 110.0, 90.0), True)
        frame = StreamEvent(
            "detection",
            subscription_id="display-001;cam-001",
            camera_id="cam-001",
            model_id="101",  # the camera actor runs the model by its text id
            frame_seq=1,
            captured_at=1_700_000_000.0,
            detected_at=1_700_000_000.1,
            detections=(car,),
            extra={"model_name": "Vehicle Detection"},
        )
        hub.publish_from_test([hub_event(frame)])
        detection = receive(ws, "imageDetection")
        assert set(detection) == {"type", "payload"}
        payload = detection["payload"]
        assert payload["subscriptionId"] == "display-001;cam-001"
        assert payload["timestamp"] == "2023-11-14T22:13:20.000Z"
        assert payload["modelInfo"] == {
            "modelId": 101,
            "modelName": "Vehicle Detection",
            "version": "v7",
        }
        assert [d["class"] for d in payload["detections"]] == ["car"]
        send(ws, {"type": "requestState"})
        (camera,) = receive(ws, "stateReport")["cameraConnections"]
        assert camera["modelId"] == 101
        send(
            ws,
            {"type": "unsubscribe", "payload": {"subscriptionIdentifier": "display-001;cam-001"}},
        )
        unsub = receive(ws, "unsubscribeAck")
        assert unsub["status"] == "success" and unsub["subscriptionId"] == "display-001;cam-001"


def test_branch_results_reach_a_subscribed_connection() -> None:
    """A `result` event of the connection's subscription comes as one `objectResult`
    (another subscription's does not), and the frames after it carry the object's
    results inside its `imageDetection` item."""
    hub = Hub()
    with session_socket(Registry(), hub=hub) as ws:
        send(ws, {"type": "subscribe", "payload": SUB})
        receive(ws, "subscribeAck")
        van = {"demo_bodytype_cls_v1": {"label": "van", "class": "van", "confidence": 1.0}}
        told = result_event("display-1;cam-1", "cam-1", "demo", 3, "car", van)
        elsewhere = result_event("display-2;cam-1", "cam-1", "demo", 4, "car", van)
        car = TrackedDetection(
            3, 2, "car", 0.91, (10.0, 20.0, 110.0, 90.0), True, told.extra["results"]
        )
        frame = StreamEvent(
            "detection",
            subscription_id="display-1;cam-1",
            camera_id="cam-1",
            model_id="demo",
            frame_seq=2,
            captured_at=1_700_000_000.0,
            detected_at=1_700_000_000.1,
            detections=(car,),
        )
        hub.publish_from_test([hub_event(e) for e in (elsewhere, told, frame)])
        result = receive(ws, "objectResult")
        assert set(result) == {"type", "payload"}
        payload = result["payload"]
        assert payload["subscriptionId"] == "display-1;cam-1" and payload["trackId"] == 3
        assert payload["results"] == {"demo_bodytype_cls_v1": {"label": "van", "confidence": 1.0}}
        assert payload["class"] == "car" and payload["modelInfo"]["modelId"] == "demo"
        (item,) = receive(ws, "imageDetection")["payload"]["detections"]
        assert item["trackId"] == 3 and item["results"] == payload["results"]


def test_sessions_go_to_the_registry_and_patches_answer_from_its_book() -> None:
    """setSessionId is kept by the registry (it keys the display's records) and acked;
    patchSession merges into it, and answers success False for a session no display has
    or data over the cap, the connection staying open."""
    registry = Registry()
    with session_socket(registry) as ws:
        set_4242 = {"displayIdentifier": "display-1", "sessionId": 4242}
        send(ws, {"type": "setSessionId", "requestId": 1, "payload": set_4242})
        ack = receive(ws, "setSessionIdAck")
        assert ack["sessionId"] == 4242 and ack["displayIdentifier"] == "display-1"
        assert registry.sessions.of("display-1") == {"id": 4242, "data": {}}
        for data in ({"lane": 2}, {"driver": "Ann"}):
            send(ws, {"type": "patchSession", "payload": {"sessionId": 4242, "data": data}})
            assert receive(ws, "patchSessionResult")["success"] is True
        assert registry.sessions.of("display-1") == {
            "id": 4242,
            "data": {"lane": 2, "driver": "Ann"},
        }
        send(ws, {"type": "patchSession", "payload": {"sessionId": 7, "data": {"x": 1}}})
        unknown = receive(ws, "patchSessionResult")
        assert unknown["success"] is False and "no display has session 7" in unknown["message"]
        half = "x" * (MAX_SESSION_DATA_BYTES // 2 + 100)  # two halves: over the cap
        send(ws, {"type": "patchSession", "payload": {"sessionId": 4242, "data": {"a": half}}})
        assert receive(ws, "patchSessionResult")["success"] is True
        send(ws, {"type": "patchSession", "payload": {"sessionId": 4242, "data": {"b": half}}})
        refused = receive(ws, "patchSessionResult")
        assert refused["success"] is False and "at most" in refused["message"]
        assert "b" not in registry.sessions.of("display-1")["data"]
        registry.mode = "fail"
        send(ws, {"type": "setSessionId", "payload": {**set_4242, "sessionId": 5}})
        assert "RayActorError" in receive(ws, "error")["message"]
        assert registry.sessions.of("display-1")["id"] == 4242
