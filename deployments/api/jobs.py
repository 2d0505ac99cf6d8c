"""Media jobs: `POST /detect/{media_id}`, `GET /jobs`, `GET` and `DELETE /jobs/{job_id}`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from deployments.api.detect import Detectors
from deployments.api.errors import Unprocessable, with_route_exceptions
from deployments.jobs.records import JOB_ID_PATTERN, MEDIA_ID_PATTERN, JobRequest
from graph.common.errors import UnknownModelError
from graph.control import ControlPlane

UNAVAILABLE = "media jobs unavailable"


def router(control: ControlPlane, detectors: Detectors) -> APIRouter:
    """The media job routes over the app's MediaJobs actor."""
    api = APIRouter()

    @api.post("/detect/{media_id}", status_code=202)
    @with_route_exceptions(UNAVAILABLE)
    async def submit_job(body: JobRequest, media_id: str = Path(pattern=MEDIA_ID_PATTERN)) -> Any:
        """Detect over a video or image (`path` on the server, or an http(s) `url`) as a
        job: 202 with its id at once; progress and detections arrive as events
        (`GET /events?job=<id>`); 409 while a job of the same `media_id` runs."""
        detectors.check_body_model("model", body.model)
        try:
            record = await (await control.jobs()).submit.remote(
                media_id, body.model_dump(mode="json")
            )
        except UnknownModelError as exc:  # models changed under the actor: the body's fault
            raise Unprocessable(UnknownModelError.__str__(exc), model=exc.model_id) from None
        return JSONResponse(
            {
                "job_id": record["job_id"],
                "media_id": media_id,
                "status": record["status"],
                "events_url": f"/events?job={record['job_id']}&last_event_id=0",
            },
            202,
        )

    @api.get("/jobs/{job_id}")
    @with_route_exceptions(UNAVAILABLE)
    async def get_job(job_id: str = Path(pattern=JOB_ID_PATTERN)) -> Any:
        """A job's status, progress and detections so far (all of them once finished)."""
        return await (await control.jobs()).get.remote(job_id)

    @api.delete("/jobs/{job_id}")
    @with_route_exceptions(UNAVAILABLE)
    async def cancel_job(job_id: str = Path(pattern=JOB_ID_PATTERN)) -> Any:
        """Cancel a queued or running job; 409 when it has already finished."""
        return await (await control.jobs()).cancel.remote(job_id)

    @api.get("/jobs")
    @with_route_exceptions(UNAVAILABLE)
    async def list_jobs(limit: int = Query(100, ge=1, le=1000)) -> Any:
        """The newest jobs first (without their detections)."""
        return await (await control.jobs()).list.remote(limit)

    return api
