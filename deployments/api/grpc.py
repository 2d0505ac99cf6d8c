"""gRPC methods of the Ingress (`protos/camgraph.proto`), served by Ray Serve's gRPC proxy.

The proxy (serve_config.yaml `grpc_options`) sends `/camgraph.v1.Camgraph/<Method>` to the
method of that name on the ingress deployment of the application named by the call's
`("application", ...)` metadata. A method with a `grpc_context` parameter receives a
`RayServegRPCContext`: the client's metadata, and the code and details to answer with.

The Ingress keeps `Detect` and `StreamEvents` as its own methods (the proxy finds them by
name) and delegates to `GrpcApi`, which gets what it uses in a `GrpcDeps`.

Errors: codes come from the one table in `deployments.api.errors`. A unary call sets the
code and details and returns an empty reply (the proxy copies the context's code onto the
call, so the client gets the error and no message); a streaming call sets them and
raises, because the context only travels with a yielded message or an exception.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from pydantic import ValidationError
from ray.serve.grpc_util import RayServegRPCContext

from deployments.api.auth import bearer, token_ok
from deployments.api.detect import Detectors
from deployments.api.errors import (
    ApiError,
    BadRequest,
    InvalidFields,
    PayloadTooLarge,
    Unauthenticated,
    grpc_status,
)
from deployments.api.events import follow_events
from graph.common.schemas import DetectConfig, IngressSettings
from graph.events.fanout import EventFanout
from graph.events.ring import EVENT_FIELDS
from protos import camgraph_pb2 as pb

logger = logging.getLogger("ray.serve")

MAX_DETAILS = 1000  # status details travel in HTTP/2 trailers: keep them short


class GrpcAbort(Exception):
    """Ends a streaming call with the code already set on its context."""


def set_status(grpc_context: RayServegRPCContext, code: grpc.StatusCode, details: str) -> None:
    grpc_context.set_code(code)
    grpc_context.set_details(details[:MAX_DETAILS])


def abort(grpc_context: RayServegRPCContext, exc: ApiError) -> NoReturn:
    """End a streaming call with the table's code for `exc`."""
    status = grpc_status(exc)
    assert status is not None  # every ApiError has a row
    set_status(grpc_context, *status)
    raise GrpcAbort(status[1][:MAX_DETAILS])


def metadata_value(grpc_context: RayServegRPCContext, key: str) -> str | None:
    """The last value of a metadata key (gRPC keys are lower case)."""
    found = None
    for k, v in grpc_context.invocation_metadata():
        if k.lower() == key:
            found = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return found


# Serve's gRPC proxy has no host option: it listens on every interface ([::]:port), not
# where http_options.host says. So gRPC answers only with a token, unless an operator
# says the network is private (ingress.grpc_without_token).
NO_TOKEN_REFUSED = (
    "gRPC is served on every network interface, so it needs a bearer token: set "
    "ingress.auth_token_env or ingress.auth_token_file (or ingress.grpc_without_token: "
    "true on a private network)"
)


def auth_failure(
    grpc_context: RayServegRPCContext, expected: str | None, without_token: bool = False
) -> str | None:
    """Why the call is not authenticated, or None when it is. With no token configured
    every call is refused, unless `without_token` (an operator's explicit choice)."""
    if expected is None:
        return None if without_token else NO_TOKEN_REFUSED
    presented = bearer(metadata_value(grpc_context, "authorization"))
    if presented is None:
        return "missing bearer token: send metadata ('authorization', 'Bearer <token>')"
    if not token_ok(presented, expected):
        return "invalid bearer token"
    return None


def detect_config(config: pb.DetectConfig) -> DetectConfig:
    """The request's config with unset fields left to DetectConfig's defaults; raises
    pydantic's ValidationError."""
    raw: dict[str, Any] = {
        name: getattr(config, name)
        for name in ("conf", "iou", "max_det")
        if config.HasField(name)  # type: ignore[arg-type]
    }
    if config.classes:
        raw["classes"] = list(config.classes)
    return DetectConfig.model_validate(raw)


def validation_details(exc: ValidationError) -> str:
    """`config.<field>: <problem>; ...` of a DetectConfig that did not validate."""
    return InvalidFields.of(exc, "config").message


def detect_reply(model_id: str, detections: list[dict[str, Any]]) -> pb.DetectReply:
    return pb.DetectReply(
        model=model_id,
        detections=[
            pb.Detection(
                class_id=d["class_id"],
                label=d["label"],
                confidence=d["confidence"],
                box=pb.Box(**d["box"]),
            )
            for d in detections
        ],
    )


def event_message(event: dict[str, Any]) -> pb.Event:
    """An event dict of the event stream (or its "dropped" notice, which has no id)."""
    if event.get("type") == "dropped" and "id" not in event:
        return pb.Event(
            type="dropped",
            time=float(event.get("time") or 0.0),
            dropped_count=int(event.get("count") or 0),
            dropped_reason=str(event.get("reason") or ""),
        )
    message = pb.Event(
        id=int(event["id"]),
        topic=str(event.get("topic") or ""),
        type=str(event.get("type") or ""),
        time=float(event.get("time") or 0.0),
        data_json=json.dumps(event.get("data") or {}, separators=(",", ":"), default=str),
    )
    for name in EVENT_FIELDS:
        if event.get(name) is not None:
            setattr(message, name, str(event[name]))
    return message


def event_filter(request: pb.EventFilter) -> dict[str, list[str] | None]:
    """An empty repeated field matches everything (None)."""
    return {
        "cameras": list(request.cameras) or None,
        "subscriptions": list(request.subscriptions) or None,
        "types": list(request.types) or None,
        "jobs": list(request.jobs) or None,
    }


@dataclass(frozen=True)
class GrpcDeps:
    """What the gRPC methods use of their replica."""

    settings: IngressSettings  # max_upload_bytes, grpc_without_token
    auth_token: str | None  # None: authentication off
    detectors: Detectors
    fanout: EventFanout


class GrpcApi:
    """`Detect` and `StreamEvents` of service camgraph.v1.Camgraph."""

    def __init__(self, deps: GrpcDeps) -> None:
        self.deps = deps

    def _refusal(self, grpc_context: RayServegRPCContext, method: str) -> Unauthenticated | None:
        settings = self.deps.settings
        reason = auth_failure(grpc_context, self.deps.auth_token, settings.grpc_without_token)
        if reason is None:
            return None
        logger.warning("gRPC %s refused: %s (peer %s)", method, reason, grpc_context.peer())
        return Unauthenticated(reason)

    async def detect(
        self, request: pb.DetectRequest, grpc_context: RayServegRPCContext
    ) -> pb.DetectReply:
        """Objects in one encoded image; boxes in the image's own pixels."""
        try:
            model_id, detections = await self._detect(request, grpc_context)
        except Exception as exc:
            status = grpc_status(exc)
            if status is None:
                raise
            set_status(grpc_context, *status)
            return pb.DetectReply()
        return detect_reply(model_id, detections)

    async def _detect(
        self, request: pb.DetectRequest, grpc_context: RayServegRPCContext
    ) -> tuple[str, list[dict[str, Any]]]:
        refused = self._refusal(grpc_context, "Detect")
        if refused is not None:
            raise refused
        detectors = self.deps.detectors
        model_id = detectors.resolve(request.model or None)
        limit = self.deps.settings.max_upload_bytes
        if not request.image:
            raise BadRequest("empty image")
        if len(request.image) > limit:
            raise PayloadTooLarge(
                f"image of {len(request.image)} bytes, larger than the limit of {limit}"
            )
        try:
            config = detect_config(request.config)
        except ValidationError as exc:
            raise InvalidFields.of(exc, "config") from None
        return model_id, await detectors.detect_bytes(request.image, config, model_id)

    async def stream_events(
        self, request: pb.EventFilter, grpc_context: RayServegRPCContext
    ) -> AsyncGenerator[pb.Event, None]:
        """Matching events after `after_id` (unset: from now on), until the client cancels."""
        refused = self._refusal(grpc_context, "StreamEvents")
        if refused is not None:
            abort(grpc_context, refused)
        after_id = request.after_id if request.HasField("after_id") else None
        if after_id is not None and after_id < 0:
            abort(grpc_context, BadRequest("after_id must be >= 0"))
        stream = follow_events(self.deps.fanout, event_filter(request), after_id)
        try:
            async for event in stream:
                if event is not None:  # None: idle (no heartbeats asked for)
                    yield event_message(event)
        finally:  # the client cancelled: stop following now, not at garbage collection
            await stream.aclose()  # type: ignore[attr-defined]
