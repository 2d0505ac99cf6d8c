"""One WebSocket connection of the detector-worker protocol (docs/protocol.md): its
subscriptions, the sender of its `imageDetection` and `objectResult` events and its
`stateReport`s. What it uses (registry, hub, fan-out, cached figures) comes in a
`WsDeps`; messages are parsed and rendered by `ws_protocol`, and errors answered as
`deployments.api.errors` says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import WebSocket, WebSocketDisconnect

from deployments.api import ws_protocol as wsp
from deployments.api.errors import ws_error
from graph.common.schemas import IngressSettings
from graph.events.fanout import EventFanout
from graph.events.ring import EventFilter
from stream_actors.sessions import SessionDataTooLarge
from stream_actors.subscriptions import Subscription, url_pipeline

logger = logging.getLogger(__name__)
T = TypeVar("T")
# A background task of the session failed: the client is told by this close code.
WS_INTERNAL_ERROR = 1011


@dataclass(frozen=True)
class WsDeps:
    """What a session uses of its replica: actor handles (their `.remote()` calls are
    awaited), the replica's fan-out and its cached stream listing and host load."""

    registry: Any  # subscribe, unsubscribe, renew, release, set_session, patch_session
    hub: Any  # set_session
    fanout: EventFanout
    models: Mapping[str, str | None]  # model ids a subscription may name → pipeline version
    settings: IngressSettings  # state_report_s, actor_call_timeout_s
    streams: Callable[[], Awaitable[list[dict[str, Any]]]]  # `GET /streams`' list
    system: Callable[[], Awaitable[dict[str, Any]]]  # host load
    # Loads a subscription's modelUrl pipeline (the catalog); None: modelUrl is off.
    load_pipeline: Callable[[str], Awaitable[Any]] | None = None


class WsSession:
    """One WebSocket connection: its subscriptions, event sender and state reports."""

    def __init__(self, deps: WsDeps, websocket: WebSocket) -> None:
        self.deps, self.ws = deps, websocket
        self.subs: dict[str, Subscription] = {}
        self.queue = deps.fanout.register(
            EventFilter(subscriptions=set(), types=set(wsp.EVENT_TYPES))
        )
        self.send_lock = asyncio.Lock()
        # The owner of this connection's subscriptions in the registry: they end one grace
        # after it stops renewing (closed, or this replica died). Known once a subscribe
        # answers with a lease (a `persistent` one has none).
        self.connection_id = uuid.uuid4().hex
        self.lease_grace_s: float | None = None
        self._leased = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(message))

    async def run(self) -> None:
        background = [
            asyncio.create_task(self._send_events(), name="ws-events"),
            asyncio.create_task(self._report_state(), name="ws-state"),
            asyncio.create_task(self._renew_lease(), name="ws-lease"),
        ]
        receiver = asyncio.create_task(self._receive(), name="ws-receive")
        try:
            # The receive loop ends the session when the client goes; a background task
            # never ends by itself, so one that does has failed: the client must not be
            # left on an open socket that no longer carries detections or reports.
            await asyncio.wait([receiver, *background], return_when=asyncio.FIRST_COMPLETED)
            if receiver.done():
                receiver.result()  # the client left, or a handler raised: Serve logs it
                return
            failed = next((t for t in background if t.done()), None)
            if failed is not None:
                exc = failed.exception() if not failed.cancelled() else None
                logger.error(
                    "WebSocket session: %s stopped (%r); closing the connection",
                    failed.get_name(),
                    exc,
                    exc_info=exc,
                )
                with contextlib.suppress(Exception):  # the client may be gone already
                    await self.ws.close(WS_INTERNAL_ERROR, f"{failed.get_name()} failed")
        finally:
            for task in (receiver, *background):
                task.cancel()
            self.deps.fanout.unregister(self.queue)
            await asyncio.gather(receiver, *background, return_exceptions=True)
            await self._release_lease()

    async def _receive(self) -> None:
        while True:
            try:
                text = await self.ws.receive_text()
            except WebSocketDisconnect:
                return
            except KeyError:  # a binary frame: receive_text finds no "text"
                await self.send(
                    wsp.error_message(wsp.ProtocolError("binary frames are not accepted"))
                )
                continue
            request_type, request_id = None, None
            try:
                request_type, payload, request_id = wsp.parse(text)
                await self._handle(request_type, payload, request_id)
            except Exception as exc:  # e.g. the registry or the hub away: the client retries
                error = ws_error(exc, request_type, request_id, "service unavailable, retry")
                if error is None:
                    raise
                await self.send(wsp.error_message(error))

    async def _call(self, call: Awaitable[T]) -> T:
        """A registry or hub call, bounded: both actors retry while they restart, and a
        client must get an answer (an error to retry) rather than a silent connection."""
        return await asyncio.wait_for(call, self.deps.settings.actor_call_timeout_s)

    async def _handle(self, kind: str, payload: Any, request_id: Any) -> None:
        deps = self.deps
        if kind == "subscribe":
            sub: Subscription = payload
            url = url_pipeline(sub, deps.models, deps.load_pipeline is not None)
            if url is not None and deps.load_pipeline is not None:
                try:  # its pipeline is loaded (or refused, naming why) before the ack
                    await deps.load_pipeline(url)
                except Exception as exc:
                    error = ws_error(exc, kind, request_id, "pipeline catalog unavailable")
                    if error is None:
                        raise
                    error.details = [
                        {"loc": ["payload", "modelUrl"], "msg": error.message, "type": "pipeline"}
                    ]
                    raise error from None
            elif sub.modelId is not None and sub.modelId not in deps.models:
                raise wsp.ProtocolError(
                    f"unknown modelId {sub.modelId!r}; known: {sorted(deps.models)}",
                    kind,
                    [
                        {
                            "loc": ["payload", "modelId"],
                            "msg": "unknown model",
                            "type": "unknown_model",
                        }
                    ],
                    request_id,
                )
            try:
                result = await self._call(
                    deps.registry.subscribe.remote(
                        sub.model_dump(mode="json"), owner=self.connection_id
                    )
                )
            except Exception as exc:  # refused by policy, or the registry away
                error = ws_error(exc, kind, request_id, "stream registry unavailable")
                if error is None:
                    raise
                raise error from None
            self.subs[sub.subscriptionIdentifier] = sub
            self._refilter()
            if result.get("lease") is not None:  # held by this connection: renew it
                self.lease_grace_s = float(result["lease"]["grace_s"])
                self._leased.set()
            await self.send(
                wsp.subscribe_ack(sub, result["stream"], result["pending_error"], request_id)
            )
        elif kind == "unsubscribe":
            sub_id = payload.subscriptionIdentifier
            # Forgotten here only once the registry has answered: a client told to retry
            # keeps its events and its stateReport entry meanwhile.
            known = await self._call(deps.registry.unsubscribe.remote(sub_id))
            self.subs.pop(sub_id, None)
            self._refilter()
            if not known:
                raise wsp.ProtocolError(f"no subscription {sub_id!r}", kind, None, request_id)
            await self.send(wsp.unsubscribe_ack(sub_id, request_id))
        elif kind == "requestState":
            report = await self._state_report()
            await self.send(report | ({"requestId": request_id} if request_id is not None else {}))
        elif kind == "setSessionId":
            # The registry's (persisted) session keys the display's records; the hub's
            # stamps its events. The registry first: an error leaves the events unstamped.
            display, session_id = payload.displayIdentifier, payload.sessionId
            await self._call(deps.registry.set_session.remote(display, session_id))
            await self._call(deps.hub.set_session.remote(display, session_id))
            await self.send(
                wsp.ack(
                    kind,
                    request_id,
                    displayIdentifier=payload.displayIdentifier,
                    sessionId=payload.sessionId,
                )
            )
        elif kind == "patchSession":
            try:
                call = deps.registry.patch_session.remote(payload.sessionId, payload.data)
                await self._call(call)
                ok, message = True, "session updated"
            except KeyError:
                ok, message = False, f"no display has session {payload.sessionId!r}"
            except SessionDataTooLarge as exc:
                ok, message = False, exc.message
            reply = {
                "type": "patchSessionResult",
                "sessionId": payload.sessionId,
                "success": ok,
                "message": message,
            }
            await self.send(reply | ({"requestId": request_id} if request_id is not None else {}))

    async def _renew_lease(self) -> None:
        """Every grace/3, one registry call renews all this connection's subscriptions. A
        failure is logged and retried at the next turn, never ending the session: the
        grace outlasts two missed renewals."""
        await self._leased.wait()
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            assert self.lease_grace_s is not None
            due += self.lease_grace_s / 3
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = loop.time()  # paced from each call's start: a slow one delays no other
            try:
                reply = await self._call(self.deps.registry.renew.remote(self.connection_id))
                self.lease_grace_s = float(reply["grace_s"])
            except Exception as exc:
                logger.warning("WebSocket session: renewing its subscriptions failed: %r", exc)

    async def _release_lease(self) -> None:
        """The connection closed: its subscriptions' grace starts now (best effort: if the
        registry does not hear it, they end one grace after the last renewal)."""
        if not self._leased.is_set():
            return
        try:
            await self._call(self.deps.registry.release.remote(self.connection_id))
        except Exception as exc:
            logger.warning("WebSocket session: releasing its subscriptions failed: %r", exc)

    def _refilter(self) -> None:
        self.queue.flt = EventFilter(subscriptions=set(self.subs), types=set(wsp.EVENT_TYPES))

    async def _send_events(self) -> None:
        stream = self.deps.fanout.follow(self.queue.flt, None, None, queue=self.queue)
        async for event in stream:
            if event is None:
                continue
            if event["type"] == "dropped":
                await self.send(wsp.events_dropped(event))
            else:
                sub = self.subs.get(event.get("subscription_id", ""))
                render = wsp.object_result if event["type"] == "result" else wsp.image_detection
                await self.send(render(event, sub, self.deps.models))

    async def _state_report(self) -> dict[str, Any]:
        streams = await self.deps.streams()
        system = await self.deps.system()
        return wsp.state_report(system, self.subs, streams, self.queue.dropped_total)

    async def _report_state(self) -> None:
        while True:
            await asyncio.sleep(self.deps.settings.state_report_s)
            await self.send(await self._state_report())
