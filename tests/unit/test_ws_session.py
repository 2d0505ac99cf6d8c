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
from tests.peers import free_port

SUB = {"subscriptionIdentifier": "display-1;cam-1", "rtspUrl": "rtsp://127.0.0.1:8554/cam"}


def remote(fn: Callable[..., Awaitable[Any]]) -> SimpleNamespace:
    """An actor method as the session calls it: `.remote(...)` gives an awaitable."""
    return SimpleNamespace(remote=fn)


class Registry:
    """The stream registry actor's two calls; `mode` makes them answer, hang or fail."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.subs: set[str] = set()

    async def _behave(self) -> None:
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "fail":
            raise ray.exceptions.RayActorError()

    async def subscribe(self, body: dict[str, Any]) -> dict[str, Any]:
        await self._behave()
        self.subs.add(body["subscriptionIdentifier"])
        return {"stream": "rtsp-0", "pending_error": None}

    async def unsubscribe(self, sub_id: str) -> bool:
        await self._behave()
        known = sub_id in self.subs
        self.subs.discard(sub_id)
        return known


def session_deps(registry: Registry, system: Callable[[], dict[str, Any]]) -> WsDeps:
    """What a session uses of its Ingress replica: the hub's own class, a stand-in
    registry, and the replica's cached figures."""
    hub = EventHubService()

    async def streams() -> list[dict[str, Any]]:
        return []

    async def system_load() -> dict[str, Any]:
        return system()

    return WsDeps(
        registry=SimpleNamespace(
            subscribe=remote(registry.subscribe), unsubscribe=remote(registry.unsubscribe)
        ),
        hub=SimpleNamespace(
            set_session=remote(hub.set_session), patch_session=remote(hub.patch_session)
        ),
        fanout=EventFanout(hub.read, wait_s=0.1),
        models=frozenset({"demo"}),
        settings=IngressSettings(state_report_s=0.2, actor_call_timeout_s=0.5),
        streams=streams,
        system=system_load,
    )


@contextmanager
def session_socket(
    registry: Registry, system: Callable[[], dict[str, Any]] = lambda: {"cpuUsage": 1.0}
) -> Iterator[ClientConnection]:
    """A client connected to a real uvicorn server whose `/` runs one WsSession."""
    app = FastAPI()

    @app.websocket("/")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await WsSession(session_deps(registry, system), websocket).run()

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
        assert (
            receive(ws, "subscribeAck")["subscriptionIdentifier"] == SUB["subscriptionIdentifier"]
        )


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
