"""`GET /events`: server-sent events from the EventHub, through this replica's fan-out."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from deployments.api.errors import BadRequest, with_route_exceptions
from graph.events.fanout import EventFanout, sse_frame
from graph.events.ring import EventFilter


def follow_events(
    fanout: EventFanout, flt: dict[str, Any], after_id: int | None, idle_s: float | None = None
) -> AsyncIterator[dict[str, Any] | None]:
    """Events matching `flt` (cameras / subscriptions / types / jobs) for one client:
    resumed after `after_id` if given, then live; `dropped` notices; None when idle."""
    return fanout.follow(EventFilter.of(flt), after_id, idle_s)


def router(fanout: EventFanout, heartbeat_s: float) -> APIRouter:
    """The SSE route."""
    api = APIRouter()

    @api.get("/events", response_class=StreamingResponse)
    @with_route_exceptions()
    async def events(
        request: Request,
        camera: Annotated[list[str] | None, Query(description="camera ids (repeatable)")] = None,
        subscription: Annotated[list[str] | None, Query(description="subscription ids")] = None,
        type: Annotated[
            list[str] | None,
            Query(description="detection, new, updated, lost, job.progress, job.detections, …"),
        ] = None,
        job: Annotated[list[str] | None, Query(description="media job ids")] = None,
        last_event_id: int | None = Query(
            None, ge=0, description="resume after this id (the Last-Event-ID header wins)"
        ),
    ) -> Any:
        """Server-sent events: `id:` is the hub's event id, `event:` its type, `data:` the
        event as JSON. Reconnect with `Last-Event-ID` to get what the hub still holds;
        `event: dropped` says how many were lost; `: heartbeat` comments keep it open."""
        header = request.headers.get("last-event-id")
        if header is not None:
            if not re.fullmatch(r"[0-9]{1,18}", header.strip()):
                raise BadRequest("Last-Event-ID must be a non-negative integer")
            last_event_id = int(header.strip())
        flt = {"cameras": camera, "subscriptions": subscription, "types": type, "jobs": job}
        stream = follow_events(fanout, flt, last_event_id, heartbeat_s)

        async def body() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            try:
                async for event in stream:
                    yield sse_frame(event)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return api
