"""A WebSocket session's lease on its subscriptions, over a real socket (uvicorn and a
`websockets` client), without Ray: the session subscribes as its connection, renews all
its subscriptions with one registry call every grace/3 while open, releases them when the
client leaves, and a registry that fails a renewal ends nothing. The registry, outside
this test's scope, is a stand-in that records its calls."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import ray
import uvicorn
from fastapi import FastAPI, WebSocket
from websockets.sync.client import ClientConnection, connect

from deployments.api.ws_session import WsDeps, WsSession
from graph.common.schemas import IngressSettings
from graph.events.fanout import EventFanout
from graph.events.hub import EventHubService
from tests.peers import free_port

GRACE_S = 0.6  # the stand-in registry's grace: the session renews every 0.2 s


def payload(sub_id: str = "display-1;cam-1", **extra: Any) -> dict[str, Any]:
    return {"subscriptionIdentifier": sub_id, "rtspUrl": "rtsp://127.0.0.1:8554/cam", **extra}


def remote(fn: Callable[..., Awaitable[Any]]) -> SimpleNamespace:
    """An actor method as the session calls it: `.remote(...)` gives an awaitable."""
    return SimpleNamespace(remote=fn)


class Registry:
    """The registry's subscribe / renew / release, as the real one answers them (a
    lease unless the payload is persistent), recording every call."""

    def __init__(self) -> None:
        self.subscribed: list[tuple[str, str | None]] = []  # (subscription id, owner)
        self.renewed: list[str] = []
        self.released: list[str] = []
        self.fail_renewals = False

    async def subscribe(self, body: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        self.subscribed.append((body["subscriptionIdentifier"], owner))
        held = owner is not None and not body.get("persistent", False)
        lease = {"owner": owner, "grace_s": GRACE_S} if held else None
        return {"stream": "rtsp-0", "pending_error": None, "lease": lease}

    async def unsubscribe(self, sub_id: str) -> bool:
        return True

    async def renew(self, owner: str) -> dict[str, Any]:
        self.renewed.append(owner)
        if self.fail_renewals:
            raise ray.exceptions.RayActorError()
        return {"held": 1, "grace_s": GRACE_S}

    async def release(self, owner: str) -> int:
        self.released.append(owner)
        return 1


def deps(registry: Registry) -> WsDeps:
    hub = EventHubService()

    async def streams() -> list[dict[str, Any]]:
        return []

    async def system() -> dict[str, Any]:
        return {"cpuUsage": 1.0}

    return WsDeps(
        registry=SimpleNamespace(
            subscribe=remote(registry.subscribe),
            unsubscribe=remote(registry.unsubscribe),
            renew=remote(registry.renew),
            release=remote(registry.release),
        ),
        hub=SimpleNamespace(set_session=remote(hub.set_session)),
        fanout=EventFanout(hub.read, wait_s=0.1),
        models={"demo": None},
        settings=IngressSettings(state_report_s=60, actor_call_timeout_s=0.5),
        streams=streams,
        system=system,
    )


@contextmanager
def server(registry: Registry) -> Iterator[Callable[[], ClientConnection]]:
    """A real uvicorn server whose `/` runs one WsSession per connection; yields a
    function that connects a client (closed by the caller)."""
    app = FastAPI()

    @app.websocket("/")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await WsSession(deps(registry), websocket).run()

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield lambda: connect(f"ws://127.0.0.1:{port}/", open_timeout=5)
    finally:
        uv.should_exit = True
        thread.join(10)


def request(ws: ClientConnection, message: dict[str, Any], answer: str) -> dict[str, Any]:
    ws.send(json.dumps(message))
    for _ in range(50):
        reply = dict(json.loads(ws.recv(timeout=5)))
        if reply["type"] in (answer, "error"):
            assert reply["type"] == answer, reply
            return reply
    raise AssertionError(f"no {answer}")


def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_session_renews_all_its_subscriptions_in_one_call_and_releases_them_at_close() -> None:
    """Given a connection that subscribed two cameras, then while it is open the registry
    hears one renewal per grace/3 for the connection (not per subscription), and once the
    client leaves, one release for that same connection and no renewal after it."""
    registry = Registry()
    with server(registry) as connect_client:
        with connect_client() as ws:
            request(ws, {"type": "subscribe", "payload": payload()}, "subscribeAck")
            request(ws, {"type": "subscribe", "payload": payload("d-2;cam-2")}, "subscribeAck")
            (owner,) = {o for _, o in registry.subscribed}
            assert owner is not None
            time.sleep(GRACE_S * 1.5)  # about four renewal periods
            assert 2 <= len(registry.renewed) <= 6, registry.renewed
            assert set(registry.renewed) == {owner}
            assert registry.released == []
        eventually(lambda: registry.released == [owner])
        renewals = len(registry.renewed)
        time.sleep(GRACE_S)
        assert len(registry.renewed) == renewals  # the session ended: no renewal


def test_each_connection_is_its_own_owner_and_a_persistent_one_needs_no_lease() -> None:
    """Two connections subscribe as two owners; a connection whose only subscription is
    `persistent` renews and releases nothing."""
    registry = Registry()
    with server(registry) as connect_client:
        with connect_client() as first, connect_client() as second:
            request(first, {"type": "subscribe", "payload": payload()}, "subscribeAck")
            request(second, {"type": "subscribe", "payload": payload()}, "subscribeAck")
            owners = [o for _, o in registry.subscribed]
            assert len(set(owners)) == 2 and None not in owners
        eventually(lambda: sorted(registry.released) == sorted(owners))

        registry.released.clear()
        registry.renewed.clear()
        with connect_client() as ws:
            persistent = payload("d-9;cam-9", persistent=True)
            request(ws, {"type": "subscribe", "payload": persistent}, "subscribeAck")
            time.sleep(GRACE_S)
        time.sleep(0.3)
        assert registry.renewed == [] and registry.released == []


def test_a_registry_that_fails_renewals_ends_nothing_and_renewals_go_on() -> None:
    registry = Registry()
    registry.fail_renewals = True
    with server(registry) as connect_client, connect_client() as ws:
        request(ws, {"type": "subscribe", "payload": payload()}, "subscribeAck")
        eventually(lambda: len(registry.renewed) >= 3)
        report = request(ws, {"type": "requestState"}, "stateReport")  # still served
        assert [c["subscriptionIdentifier"] for c in report["cameraConnections"]] == [
            "display-1;cam-1"
        ]
        registry.fail_renewals = False
        renewed = len(registry.renewed)
        eventually(lambda: len(registry.renewed) > renewed)
