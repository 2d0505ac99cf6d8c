"""The detector-worker WebSocket protocol: parsing client messages and rendering worker
messages (pure; the Ingress runs the connection). docs/protocol.md has every message.

The seeds' message shapes are the contract (000 "Subscribe Message Flow" and "Detection
Result Broadcasting", 001 "WebSocket Protocol"): where a seed gives a key, it is sent
under that name and at that place; camgraph's own keys are extensions beside them (in
`imageDetection`, inside `payload` and its detection items), and its own messages have
types of their own (`objectResult`, `eventsDropped`, ...), so a client that reads only
the seed's keys and types works.

A malformed message (not JSON, not an object, unknown `type`, a missing or wrong field)
raises `ProtocolError`; the connection answers with an `error` message and stays open.
A client may add a `requestId` to any message; the answer carries it back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, ValidationError

from graph.common.schemas import StrictModel
from stream_actors.sessions import SessionId
from stream_actors.subscriptions import SUBSCRIPTION_ID_PATTERN, Subscription

MAX_MESSAGE_BYTES = 64 * 1024
# The EventHub event types a connection receives: each frame's detections
# (`imageDetection`) and a stable object's branch results per improvement (`objectResult`).
EVENT_TYPES = frozenset({"detection", "result"})


class ProtocolError(Exception):
    """A client message that cannot be taken; `details` lists field problems."""

    def __init__(
        self,
        message: str,
        request_type: str | None = None,
        details: list[dict[str, Any]] | None = None,
        request_id: Any = None,
    ) -> None:
        super().__init__(message)
        self.message, self.request_type = message, request_type
        self.details, self.request_id = details or [], request_id


class UnsubscribePayload(StrictModel):
    subscriptionIdentifier: str = Field(pattern=SUBSCRIPTION_ID_PATTERN)


class SetSessionPayload(StrictModel):
    displayIdentifier: str = Field(pattern=r"^[^;/\s]{1,128}$")
    sessionId: SessionId | None = Field(description="null clears the display's session")


class PatchSessionPayload(StrictModel):
    sessionId: SessionId
    data: dict[str, Any]


PAYLOADS: dict[str, type[StrictModel] | None] = {
    "subscribe": Subscription,
    "unsubscribe": UnsubscribePayload,
    "requestState": None,
    "setSessionId": SetSessionPayload,
    "patchSession": PatchSessionPayload,
}
MessageType = Literal["subscribe", "unsubscribe", "requestState", "setSessionId", "patchSession"]


def parse(text: str | bytes) -> tuple[str, Any, Any]:
    """(type, validated payload or None, requestId) of one client message."""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, nesting
        raise ProtocolError(f"invalid JSON: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object with a 'type'")
    request_id = message.get("requestId")
    kind = message.get("type")
    if kind is None:
        raise ProtocolError("missing 'type'", request_id=request_id)
    if not isinstance(kind, str):
        raise ProtocolError("'type' must be a string", request_id=request_id)
    if kind not in PAYLOADS:
        raise ProtocolError(
            f"unknown message type {kind!r}; known: {sorted(PAYLOADS)}",
            request_type=kind,
            request_id=request_id,
        )
    model = PAYLOADS[kind]
    if model is None:
        return kind, None, request_id
    payload = message.get("payload")
    if not isinstance(payload, dict):
        raise ProtocolError(
            f"'{kind}' needs a 'payload' object", request_type=kind, request_id=request_id
        )
    try:
        return kind, model.model_validate(payload), request_id
    except ValidationError as exc:
        details = [
            {"loc": ["payload", *e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        where = ", ".join(".".join(map(str, d["loc"])) for d in details)
        raise ProtocolError(
            f"invalid '{kind}' payload: {where}: {details[0]['msg']}",
            request_type=kind,
            details=details,
            request_id=request_id,
        ) from None


def iso(ts: float | None = None) -> str:
    """UTC ISO 8601 with milliseconds, as the detector worker writes timestamps."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _with_request(message: dict[str, Any], request_id: Any) -> dict[str, Any]:
    if request_id is not None:
        message["requestId"] = request_id
    return message


def error_message(exc: ProtocolError) -> dict[str, Any]:
    return _with_request(
        {
            "type": "error",
            "requestType": exc.request_type,
            "message": exc.message,
            "details": exc.details,
            "timestamp": iso(),
        },
        exc.request_id,
    )


def ack(kind: str, request_id: Any = None, **fields: Any) -> dict[str, Any]:
    return _with_request({"type": f"{kind}Ack", "status": "success", **fields}, request_id)


def subscribe_ack(
    sub: Subscription, stream: str, pending_error: str | None, request_id: Any = None
) -> dict[str, Any]:
    """`subscribeAck`: the seed's `type`, `status`, `subscriptionId` (000, "Subscribe
    Message Flow"), then camgraph's extensions."""
    return ack(
        "subscribe",
        request_id,
        subscriptionId=sub.subscriptionIdentifier,
        subscriptionIdentifier=sub.subscriptionIdentifier,
        modelId=sub.model_id_sent,
        stream=stream,
        pendingError=pending_error,
    )


def unsubscribe_ack(subscription_id: str, request_id: Any = None) -> dict[str, Any]:
    """`unsubscribeAck`, shaped as the seed's `subscribeAck`, then camgraph's extensions."""
    return ack(
        "unsubscribe",
        request_id,
        subscriptionId=subscription_id,
        subscriptionIdentifier=subscription_id,
    )


def _model_info(
    event: dict[str, Any], sub: Subscription | None, versions: Mapping[str, str | None] | None
) -> dict[str, Any]:
    """`modelInfo`: the model that ran, its `modelId` as the connection's subscription
    sent it (a number stays a number), its pipeline version."""
    model_id = event.get("model_id")
    sent = sub.model_id_sent if sub is not None and sub.modelId == model_id else model_id
    return {
        "modelId": sent,
        "modelName": (event.get("data") or {}).get("model_name"),
        "version": (versions or {}).get(model_id) if model_id is not None else None,
    }


def _detection(d: dict[str, Any]) -> dict[str, Any]:
    item = {
        "class": d["label"],
        "classId": d["class_id"],
        "confidence": d["confidence"],
        "bbox": list(d["box"]),
        "trackId": d.get("track_id"),
        "stable": d.get("stable", False),
    }
    if d.get("results"):  # ext: the track's branch results, as its last objectResult
        item["results"] = d["results"]
    return item


def image_detection(
    event: dict[str, Any],
    sub: Subscription | None = None,
    versions: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """An EventHub `detection` event as the seed's `imageDetection` (000, "Detection
    Result Broadcasting"): `payload` with `subscriptionId`, `detections`, `timestamp` and
    `modelInfo`, then camgraph's extensions inside `payload` (`detection`, the most
    confident one; the event id, frame number and session id) and inside an item whose
    track has branch results (`results`). `sub` is the connection's subscription, whose
    `modelId` is echoed as it was sent (a number stays a number); `versions` gives a
    model's pipeline version."""
    data = event.get("data") or {}
    detections = [_detection(d) for d in data.get("detections", [])]
    best = max(detections, key=lambda d: d["confidence"]) if detections else None
    return {
        "type": "imageDetection",
        "payload": {
            "subscriptionId": event["subscription_id"],
            "detections": detections,
            "timestamp": iso(data.get("captured_at", event.get("time"))),
            "modelInfo": _model_info(event, sub, versions),
            # camgraph extensions
            "detection": best,
            "eventId": event.get("id"),
            "frameSeq": data.get("frame_seq"),
            "sessionId": event.get("session_id"),
        },
    }


def object_result(
    event: dict[str, Any],
    sub: Subscription | None = None,
    versions: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """An EventHub `result` event as camgraph's `objectResult` (ext: the seeds have no
    message for branch results), sent once per improvement of a stable object's results:
    `payload` with `subscriptionId`, `trackId`, `class`, `results` (per branch model id,
    `label` and `confidence`), `timestamp` and `modelInfo` as `imageDetection` has them,
    the event id and session id."""
    data = event.get("data") or {}
    return {
        "type": "objectResult",
        "payload": {
            "subscriptionId": event["subscription_id"],
            "trackId": data.get("track_id"),
            "class": data.get("class"),
            "results": data.get("results") or {},
            "timestamp": iso(data.get("captured_at", event.get("time"))),
            "modelInfo": _model_info(event, sub, versions),
            "eventId": event.get("id"),
            "sessionId": event.get("session_id"),
        },
    }


def events_dropped(notice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "eventsDropped",
        "count": notice["count"],
        "reason": notice["reason"],
        "timestamp": iso(),
    }


def camera_connection(sub: Subscription, stream: dict[str, Any] | None) -> dict[str, Any]:
    """One entry of `stateReport.cameraConnections`, from `GET /streams`' view of it."""
    figures: dict[str, Any] = {}
    if stream is not None:
        figures = next(
            (
                s
                for s in stream.get("subscriptions", [])
                if s.get("subscription_id") == sub.subscriptionIdentifier
            ),
            {},
        )
    state = stream.get("state", "starting") if stream is not None else "unknown"
    return {
        "subscriptionIdentifier": sub.subscriptionIdentifier,
        "modelId": sub.model_id_sent,
        "modelName": sub.modelName,
        "online": state == "connected",
        "state": state,
        "lastError": stream.get("last_error") if stream is not None else None,
        "fpsIn": stream.get("fps_in") if stream is not None else None,
        "fpsProcessed": figures.get("fps_processed"),
        "processed": figures.get("processed"),
        "drops": figures.get("drops", {}),
        "latencyMsP50": figures.get("latency_ms_p50"),
        **(
            {"cropX1": sub.cropX1, "cropY1": sub.cropY1, "cropX2": sub.cropX2, "cropY2": sub.cropY2}
            if sub.crop
            else {}
        ),
    }


def state_report(
    system: dict[str, Any],
    subs: dict[str, Subscription],
    streams: list[dict[str, Any]],
    events_dropped_total: int,
) -> dict[str, Any]:
    """`stateReport`: the seed's "periodic heartbeat with system metrics" (001, "Message
    Types"; it names no keys): host load, and each camera this connection subscribed."""
    by_sub = {sid: s for s in streams for sid in s.get("subscription_ids", [])}
    return {
        "type": "stateReport",
        "timestamp": iso(),
        "cpuUsage": system.get("cpuUsage"),
        "memoryUsage": system.get("memoryUsage"),
        "gpuUsage": system.get("gpuUsage"),
        "gpuMemoryUsage": system.get("gpuMemoryUsage"),
        "cameraConnections": [
            camera_connection(sub, by_sub.get(sid)) for sid, sub in sorted(subs.items())
        ],
        "eventsDropped": events_dropped_total,
    }
