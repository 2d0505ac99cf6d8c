"""One WebSocket connection of the detector-worker protocol (docs/protocol.md): its
subscriptions, the sender of its `imageDetection` events and its `stateReport`s. The
Ingress owns the registry, hub and fan-out it uses; messages are parsed and rendered by
`ws_protocol`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import ray
from fastapi import WebSocket, WebSocketDisconnect

from deployments import ws_protocol as wsp
from stream_actors.hub import EventFilter
from stream_actors.subscriptions import Subscription


class WsSession:
    """One WebSocket connection: its subscriptions, event sender and state reports."""

    def __init__(self, ingress: Any, websocket: WebSocket) -> None:
        self.ingress, self.ws = ingress, websocket
        self.subs: dict[str, Subscription] = {}
        self.queue = ingress._fanout.register(EventFilter(subscriptions=set(), types={"detection"}))
        self.send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(message))

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._send_events()),
            asyncio.create_task(self._report_state()),
        ]
        try:
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
                except wsp.ProtocolError as exc:
                    await self.send(wsp.error_message(exc))
                except ray.exceptions.RayError as exc:  # registry or hub restarting
                    unavailable = wsp.ProtocolError(
                        f"service unavailable, retry: {type(exc).__name__}",
                        request_type,
                        None,
                        request_id,
                    )
                    await self.send(wsp.error_message(unavailable))
        finally:
            for task in tasks:
                task.cancel()
            self.ingress._fanout.unregister(self.queue)
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, kind: str, payload: Any, request_id: Any) -> None:
        ingress = self.ingress
        if kind == "subscribe":
            sub: Subscription = payload
            if sub.modelId is not None and sub.modelId not in ingress._detectors:
                raise wsp.ProtocolError(
                    f"unknown modelId {sub.modelId!r}; known: {sorted(ingress._detectors)}",
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
                result = await ingress._registry.subscribe.remote(sub.model_dump(mode="json"))
            except ray.exceptions.RayError as exc:
                raise wsp.ProtocolError(
                    f"stream registry unavailable: {type(exc).__name__}", kind, None, request_id
                ) from None
            self.subs[sub.subscriptionIdentifier] = sub
            self._refilter()
            await self.send(
                wsp.ack(
                    kind,
                    request_id,
                    subscriptionIdentifier=sub.subscriptionIdentifier,
                    stream=result["stream"],
                    pendingError=result["pending_error"],
                )
            )
        elif kind == "unsubscribe":
            sub_id = payload.subscriptionIdentifier
            self.subs.pop(sub_id, None)
            self._refilter()
            if not await ingress._registry.unsubscribe.remote(sub_id):
                raise wsp.ProtocolError(f"no subscription {sub_id!r}", kind, None, request_id)
            await self.send(wsp.ack(kind, request_id, subscriptionIdentifier=sub_id))
        elif kind == "requestState":
            report = await self._state_report()
            await self.send(report | ({"requestId": request_id} if request_id is not None else {}))
        elif kind == "setSessionId":
            await ingress._hub.set_session.remote(payload.displayIdentifier, payload.sessionId)
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
                await ingress._hub.patch_session.remote(payload.sessionId, payload.data)
                ok, message = True, "session updated"
            except KeyError:
                ok, message = False, f"no display has session {payload.sessionId!r}"
            reply = {
                "type": "patchSessionResult",
                "sessionId": payload.sessionId,
                "success": ok,
                "message": message,
            }
            await self.send(reply | ({"requestId": request_id} if request_id is not None else {}))

    def _refilter(self) -> None:
        self.queue.flt = EventFilter(subscriptions=set(self.subs), types={"detection"})

    async def _send_events(self) -> None:
        stream = self.ingress._fanout.follow(self.queue.flt, None, None, queue=self.queue)
        async for event in stream:
            if event is None:
                continue
            if event["type"] == "dropped":
                await self.send(wsp.events_dropped(event))
            else:
                await self.send(wsp.image_detection(event))

    async def _state_report(self) -> dict[str, Any]:
        streams = await self.ingress._streams_cached()
        system = await self.ingress._system()
        return wsp.state_report(system, self.subs, streams, self.queue.dropped_total)

    async def _report_state(self) -> None:
        while True:
            await asyncio.sleep(self.ingress._settings.state_report_s)
            await self.send(await self._state_report())
