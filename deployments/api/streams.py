"""Camera streams: subscribe, unsubscribe, list, a subscription's events, a camera's
newest frame (`/camera/{id}/image`, as the seeds name it, and `/cameras/{id}/image`).
The stream registry actor owns them; these routes only ask it."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from deployments.api.detect import Detectors
from deployments.api.errors import NotFound, Unavailable, with_route_exceptions
from graph.control import ControlPlane
from stream_actors.subscriptions import SUBSCRIPTION_ID_PATTERN, Subscription, url_pipeline

CAMERA_ID_PATTERN = r"^[^;/\s]{1,128}$"
UNAVAILABLE = "stream registry unavailable"


def router(control: ControlPlane, detectors: Detectors, read_timeout_s: float) -> APIRouter:
    """The stream routes over the app's registry. Reads are bounded by `read_timeout_s` (a
    registry Ray is restarting would hold them for ever); a registry that is away, dead or
    too slow gives 503 with what failed."""
    api = APIRouter()

    @api.post("/streams", status_code=201)
    @with_route_exceptions(UNAVAILABLE)
    async def subscribe(sub: Subscription) -> Any:
        """Subscribe a camera (the detector-worker `subscribe` payload). Several
        subscriptions on one URL share one stream. An unreachable camera still makes a
        subscription: its state and last error show in `GET /streams`."""
        url = url_pipeline(sub, detectors.handles, control.catalog is not None)
        if url is not None:  # its pipeline is loaded (or refused, naming why) first
            await control.load_pipeline(url)
        else:
            detectors.check_body_model("modelId", sub.modelId)
        return await control.registry.subscribe.remote(sub.model_dump(mode="json"))

    @api.delete(
        "/streams/{subscription_id}", status_code=204, response_class=Response, response_model=None
    )
    @with_route_exceptions(UNAVAILABLE)
    async def unsubscribe(subscription_id: str = Path(pattern=SUBSCRIPTION_ID_PATTERN)) -> Any:
        """Remove a subscription; the last one on a URL stops its stream."""
        if not await control.registry.unsubscribe.remote(subscription_id):
            raise NotFound(f"no subscription {subscription_id!r}")
        return Response(status_code=204)

    @api.get("/pipelines")
    @with_route_exceptions("pipeline catalog unavailable")
    async def pipelines() -> Any:
        """Pipelines loaded from subscriptions' modelUrl, by URL (masked credentials):
        state, error, content (sha256, modelId, version), idle time, warnings. Behind
        the token when one is set (the open /health names them by content only)."""
        return await control.pipelines(public=False, timeout_s=read_timeout_s)

    @api.get("/streams")
    @with_route_exceptions(UNAVAILABLE)
    async def streams() -> Any:
        """Each stream: state, last error, fps in/processed, drops by reason, age of the
        last frame, reconnects; and each camera actor's pid, CPU time and memory."""
        return await asyncio.wait_for(control.registry.list_streams.remote(), read_timeout_s)

    @api.get("/streams/{subscription_id}/events")
    @with_route_exceptions(UNAVAILABLE)
    async def stream_events(
        subscription_id: str = Path(pattern=SUBSCRIPTION_ID_PATTERN),
        after: int = Query(0, ge=0, description="only events with a larger id"),
    ) -> Any:
        """The newest events of a subscription (detections per frame, object new /
        updated / lost), oldest first, with increasing ids to poll from."""
        try:
            return await asyncio.wait_for(
                control.registry.events.remote(subscription_id, after), read_timeout_s
            )
        except KeyError:
            raise NotFound(f"no subscription {subscription_id!r}") from None

    # `/camera/{camera_id}/image` is the seeds' path (000 "Route Registration", 001 "Core
    # Components"); `/cameras/...` is camgraph's, kept for its clients.
    @api.get("/camera/{camera_id}/image", response_class=Response)
    @api.get("/cameras/{camera_id}/image", response_class=Response)
    @with_route_exceptions(UNAVAILABLE)
    async def camera_image(camera_id: str = Path(pattern=CAMERA_ID_PATTERN)) -> Any:
        """The newest frame of a subscribed camera as JPEG."""
        try:
            data = await asyncio.wait_for(
                control.registry.latest_jpeg.remote(camera_id), read_timeout_s
            )
        except KeyError:
            raise NotFound(f"no subscribed camera {camera_id!r}") from None
        if data is None:
            raise Unavailable(f"camera {camera_id!r} has no frame yet")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    return api
