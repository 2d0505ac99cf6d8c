"""Ingress deployment (FastAPI): validates, routes to detectors, maps errors to HTTP.

It holds no per-camera state. Images are decoded and letterboxed here, so the detector
receives only the model-sized input.
"""

import asyncio
import contextlib
import logging
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import cv2
import numpy as np
import psutil
import ray
from fastapi import FastAPI, Path, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from deployments.api.auth import OPEN_PATHS, WS_UNAUTHORIZED, bearer, load_token, token_ok
from deployments.api.grpc import GrpcMethods
from deployments.api.ui import add_live_view
from deployments.api.ws_session import WsSession
from deployments.jobs.manager import (
    JOB_ID_PATTERN,
    MEDIA_ID_PATTERN,
    DuplicateJobError,
    JobFinishedError,
    JobNotFoundError,
    JobRequest,
    MediaJobs,
)
from graph.common.detection import DetectRequest
from graph.common.errors import InferenceError, ModelNotReadyError, UnknownModelError
from graph.common.names import ACTIONS, STREAMS_NAMESPACE, hub_name, jobs_actor_name, registry_name
from graph.common.schemas import (
    MODEL_ID_PATTERN,
    DetectConfig,
    IngressSettings,
    image_detections,
)
from graph.common.vision import Letterbox, header_pixels, letterbox
from graph.events.fanout import EventFanout, sse_frame
from graph.events.hub import EventFilter, EventHub
from graph.pipeline.runner import PipelineRuntime
from graph.pipeline.spec import PipelineFile
from stream_actors.actors import StreamContext, StreamRegistry, StreamSettings
from stream_actors.subscriptions import (
    SUBSCRIPTION_ID_PATTERN,
    Subscription,
    SubscriptionRefused,
)

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="camgraph",
    description="Camera-scale object detection on a Ray Serve deployment graph.",
    version="0.1.0",
)
add_live_view(app)
_AUTH_UNSET = object()


@app.middleware("http")
async def require_token(request: Request, call_next: Any) -> Any:
    """Bearer token on every HTTP route but /health (when a token is configured). Fails
    closed: a replica whose token was never loaded answers 503, never opens up."""
    expected = getattr(request.app.state, "auth_token", _AUTH_UNSET)
    path = request.scope["path"].removeprefix(request.scope.get("root_path", "")) or "/"
    if path in OPEN_PATHS:
        return await call_next(request)
    if expected is _AUTH_UNSET:
        return error(503, "the ingress is starting (authentication not configured yet)")
    presented = bearer(request.headers.get("authorization"))
    if presented is None and path == "/events":  # EventSource sets no headers
        presented = request.query_params.get("access_token")
    if not token_ok(presented, expected):  # type: ignore[arg-type]
        return JSONResponse(
            {"detail": {"message": "missing or wrong bearer token"}},
            401,
            headers={"WWW-Authenticate": 'Bearer realm="camgraph"'},
        )
    return await call_next(request)


_DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG/PNG/...",
                        },
                        "config": {
                            "type": "string",
                            "description": 'JSON, e.g. {"conf": 0.4, "iou": 0.5, '
                            '"classes": [0], "max_det": 100}',
                        },
                    },
                }
            }
        },
    }
}


def error(status: int, message: str, **fields: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"detail": {"message": message, **fields}}, status, headers=headers)


def decode_image(data: bytes) -> np.ndarray | None:
    """BGR image from encoded bytes, or None when OpenCV cannot decode them."""
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # e.g. over OpenCV's own pixel limit
        return None
    return image if image is not None and image.size else None


def prepare(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, Letterbox] | str:
    """Decode and letterbox in one worker-thread hop, or say why not. A small file that
    would decode to gigapixels is refused from its header, before any decoding."""
    pixels = header_pixels(data)
    if pixels is None:  # a format whose size cannot be read before decoding (e.g. HDR)
        return "the upload is not a decodable image"
    if pixels > max_pixels:
        return f"the image has {pixels} pixels, more than the limit of {max_pixels}"
    image = decode_image(data)
    if image is None:
        return "the upload is not a decodable image"
    if image.shape[0] * image.shape[1] > max_pixels:
        return f"the image has more pixels than the limit of {max_pixels}"
    return letterbox(image, size)


class DetectFailure(Exception):
    """A detection that cannot be answered: its HTTP status, message and fields (gRPC
    maps the status to its own codes)."""

    def __init__(self, status: int, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.fields = status, message, fields


# Every open WebSocket, SSE and gRPC stream holds one of max_ongoing_requests.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
@serve.ingress(app)
class Ingress(GrpcMethods):
    def __init__(
        self,
        detectors: dict[str, DeploymentHandle],
        model_sizes: dict[str, int],
        settings: dict[str, Any],
        streams: dict[str, Any] | None = None,
        pipelines: dict[str, Any] | None = None,
        classifiers: dict[str, DeploymentHandle] | None = None,
        actions: DeploymentHandle | None = None,
        events: dict[str, Any] | None = None,
        jobs: dict[str, Any] | None = None,
    ) -> None:
        self._detectors = detectors
        self._sizes = model_sizes
        self._settings = IngressSettings.model_validate(settings)
        self._default = self._settings.default_model or next(iter(detectors))
        self._classifiers = classifiers or {}
        self._actions = actions
        app_name = serve.get_replica_context().app_name
        runtimes = {
            model_id: PipelineRuntime.of(
                PipelineFile.model_validate(p["pipeline"]),
                p["version"],
                p["classifiers"],
                actions.deployment_name if actions is not None else ACTIONS,
            )
            for model_id, p in (pipelines or {}).items()
        }
        context = StreamContext(
            app_name=app_name,
            namespace=STREAMS_NAMESPACE,
            default_model=self._default,
            model_sizes=dict(model_sizes),
            detector_names={m: h.deployment_name for m, h in detectors.items()},
            settings=StreamSettings.model_validate(streams or {}),
            pipelines=runtimes,
        )
        # The registry outlives ingress replicas (detached, restartable): streams keep
        # running through an ingress restart or a redeploy of the app.
        self._registry = StreamRegistry.options(  # type: ignore[attr-defined]
            name=registry_name(app_name),
            namespace=STREAMS_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=256,
        ).remote(context)
        self._registry.configure.remote(context)  # an existing registry learns the models
        events = events or {}
        self._hub: Any = EventHub.options(  # type: ignore[attr-defined]
            name=hub_name(app_name),
            namespace=STREAMS_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=1000,
        ).remote(events.get("capacity_per_topic", 1024), events.get("max_topics", 10_000))
        self._fanout = EventFanout(self._hub_read, self._settings.client_queue)
        self._jobs_args = (
            app_name,
            {m: h.deployment_name for m, h in detectors.items()},
            dict(model_sizes),
            self._default,
            jobs or {},
            hub_name(app_name),
            STREAMS_NAMESPACE,
        )
        self._jobs_handle: Any = None
        self._streams_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._streams_lock = asyncio.Lock()
        self._system_cache: tuple[float, dict[str, Any]] = (0.0, {})
        psutil.cpu_percent(interval=None)  # primes it: its first answer is always 0.0
        self._system_lock = asyncio.Lock()
        self._hub_stats: tuple[float, dict[str, Any]] = (0.0, {})
        self._health_cache: tuple[float, dict[str, Any]] = (0.0, {})
        self._health_lock = asyncio.Lock()
        self._hub_stats_lock = asyncio.Lock()
        self._ws_clients = 0
        # Loaded last: a replica that cannot read its token fails to start (never open).
        self._auth_token = load_token(self._settings.auth_token_env, self._settings.auth_token_file)
        app.state.auth_token = self._auth_token

    async def _hub_read(
        self, after_id: int, flt: dict[str, Any] | None, limit: int, wait_s: float
    ) -> dict[str, Any]:
        result: dict[str, Any] = await asyncio.wait_for(
            self._hub.read.remote(after_id, flt, limit, wait_s), wait_s + 10.0
        )
        return result

    async def _model_health(self, model_id: str, handle: DeploymentHandle) -> dict[str, Any]:
        try:
            status = await asyncio.wait_for(handle.health.remote(), self._settings.health_timeout_s)
        except TimeoutError:
            return {
                "model": model_id,
                "state": "loading",
                "error": f"no replica answered within {self._settings.health_timeout_s}s",
            }
        except Exception as exc:  # a replica that died reports as an error, not a 500
            return {"model": model_id, "state": "error", "error": f"{type(exc).__name__}: {exc}"}
        return status

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        """Overall status and each model's availability; never triggers a model load.
        Open without a token, so computed at most once a second per replica (one fan-out
        to the models, the registry and the sinks, whoever asks how often)."""
        async with self._health_lock:
            at, report = self._health_cache
            if time.monotonic() - at >= 1.0:
                report = await self._health_report()
                self._health_cache = (time.monotonic(), report)
        # This replica's own clients are counted fresh (the hub's stats are cached apart).
        return {**report, "events": await self._events_health()}

    async def _health_report(self) -> dict[str, Any]:
        handles = {**self._detectors, **self._classifiers}
        states = await asyncio.gather(*(self._model_health(m, h) for m, h in handles.items()))
        models = {s["model"]: {k: v for k, v in s.items() if k != "model"} for s in states}
        ready = all(s["state"] == "enabled" for s in states)
        report: dict[str, Any] = {
            "status": "ok" if ready else "degraded",
            "default_model": self._default,
            "models": models,
            "streams": await self._streams_summary(),
        }
        if self._actions is not None:
            report["actions"] = await self._actions_health()
            if "error" in report["actions"]:
                report["status"] = "degraded"
        return report

    async def _events_health(self) -> dict[str, Any]:
        """The EventHub's rings and this replica's clients (WebSocket, SSE, gRPC streams),
        with capture → event latency as seen here; never fails /health."""
        replica = {**self._fanout.status(), "websockets": self._ws_clients}
        async with self._hub_stats_lock:  # one fetch at a time, failures cached too
            at, hub = self._hub_stats
            if time.monotonic() - at > 5.0:  # /health is open: the hub at most every 5 s
                try:
                    hub = await asyncio.wait_for(
                        self._hub.stats.remote(), self._settings.health_timeout_s
                    )
                except Exception as exc:
                    hub = {"error": f"{type(exc).__name__}"}
                self._hub_stats = (time.monotonic(), hub)
        return {"hub": hub, "replica": replica}

    async def _actions_health(self) -> dict[str, Any]:
        """Sinks in use (Redis, PostgreSQL or the local store), outbox depth and lag."""
        assert self._actions is not None
        try:
            result: dict[str, Any] = await asyncio.wait_for(
                self._actions.health.remote(), self._settings.health_timeout_s
            )
            return result
        except Exception as exc:
            return {"error": f"actions: {type(exc).__name__}: {str(exc)[:300]}"}

    async def _streams_summary(self) -> dict[str, Any]:
        """Streams counted by state (details: GET /streams); never fails /health."""
        try:
            listing = await asyncio.wait_for(
                self._registry.list_streams.remote(), self._settings.health_timeout_s
            )
        except Exception as exc:
            return {"error": f"stream registry: {type(exc).__name__}"}
        by_state: dict[str, int] = {}
        for stream in listing["streams"]:
            by_state[stream["state"]] = by_state.get(stream["state"], 0) + 1
        return {"total": len(listing["streams"]), "by_state": by_state}

    def _unknown_model(self, field: str, model: str | None) -> JSONResponse | None:
        """A 422 in FastAPI's validation shape when a body names a model not served."""
        if model is None or model in self._detectors:
            return None
        detail = [
            {
                "loc": ["body", field],
                "type": "unknown_model",
                "msg": f"unknown model {model!r}; known: {sorted(self._detectors)}",
            }
        ]
        return JSONResponse({"detail": detail}, 422)

    def _resolve(self, model: str | None) -> str:
        model_id = model or self._default
        if model_id not in self._detectors:
            raise UnknownModelError(model_id, tuple(self._detectors))
        return model_id

    @app.post("/detect", openapi_extra=_DETECT_BODY)
    async def detect(
        self, request: Request, model: str | None = Query(None, pattern=MODEL_ID_PATTERN)
    ) -> Any:
        """Detect objects in one uploaded image; boxes in the image's own pixels."""
        try:
            model_id = self._resolve(model)
        except UnknownModelError as exc:
            return error(404, str(exc), model=exc.model_id, known=list(exc.known))
        limit = self._settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
            return error(413, f"upload larger than {limit} bytes", limit_bytes=limit)
        if declared is None:  # chunked: the form parser would spool any size to disk
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit + 64 * 1024:
                    return error(413, f"upload larger than {limit} bytes", limit_bytes=limit)
            request._body = bytes(body)  # what request.form() then parses
        try:
            async with request.form(max_files=1, max_fields=4) as form:
                upload, raw_config = form.get("file"), form.get("config")
                if not isinstance(upload, UploadFile):
                    return JSONResponse(
                        {
                            "detail": [
                                {
                                    "loc": ["body", "file"],
                                    "type": "missing",
                                    "msg": "a multipart file field is required",
                                }
                            ]
                        },
                        422,
                    )
                data = await upload.read(limit + 1)
        except MultiPartException as exc:
            return error(400, f"malformed multipart body: {exc.message}")
        except StarletteHTTPException as exc:  # Starlette maps multipart errors itself
            return error(400, f"malformed multipart body: {exc.detail}")
        if not data:
            return error(400, "empty upload")
        if len(data) > limit:
            return error(413, f"upload larger than {limit} bytes", limit_bytes=limit)
        try:
            config = (
                DetectConfig.model_validate_json(raw_config)
                if isinstance(raw_config, str) and raw_config.strip()
                else DetectConfig()
            )
        except ValidationError as exc:
            details = [
                {"loc": ["body", "config", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            return JSONResponse({"detail": details}, 422)
        try:
            return await self._detect_bytes(data, config, model_id)
        except DetectFailure as exc:
            return error(exc.status, exc.message, **exc.fields)

    async def _detect_bytes(
        self, data: bytes, config: DetectConfig, model_id: str
    ) -> list[dict[str, Any]]:
        """Decode, letterbox, detect: boxes in the image's own pixels. Shared by HTTP
        `/detect` and gRPC `Detect`; failures raise DetectFailure with an HTTP status."""
        prepared = await asyncio.to_thread(
            prepare, data, self._sizes[model_id], self._settings.max_image_pixels
        )
        if isinstance(prepared, str):
            raise DetectFailure(400, prepared)
        boxed, lb = prepared
        try:
            result = await asyncio.wait_for(
                self._detectors[model_id].detect.remote(DetectRequest(boxed, config.params())),
                self._settings.detect_timeout_s,
            )
        except ModelNotReadyError as exc:
            # Ray re-raises it as a subclass whose str() is the remote traceback.
            message = ModelNotReadyError.__str__(exc)
            raise DetectFailure(
                503, message, model=exc.model_id, state=exc.state, error=exc.message
            ) from None
        except BackPressureError as exc:
            raise DetectFailure(
                503,
                "detector overloaded, retry shortly",
                model=model_id,
                state="overloaded",
                queued=getattr(exc, "num_queued_requests", None),
            ) from None
        except TimeoutError:
            raise DetectFailure(
                504,
                f"detection took longer than {self._settings.detect_timeout_s}s",
                model=model_id,
            ) from None
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            kind = "inference" if isinstance(exc, InferenceError) else type(exc).__name__
            logger.exception("detect failed error_id=%s model=%s kind=%s", error_id, model_id, kind)
            raise DetectFailure(
                500, "inference failed", error_id=error_id, model=model_id
            ) from None
        return image_detections(result.rows, result.names, lb)

    # ---- media jobs ----------------------------------------------------------------
    async def _jobs(self) -> Any:
        """The app's MediaJobs actor, started at the first job request (detached: jobs
        outlive an ingress restart). Found or created off the event loop: it is a
        synchronous lookup in Ray's control store."""
        if self._jobs_handle is None:
            handle = await asyncio.to_thread(self._find_or_start_jobs)
            if self._jobs_handle is None:  # two first requests: one handle is kept
                self._jobs_handle = handle
        return self._jobs_handle

    def _find_or_start_jobs(self) -> Any:
        handle = MediaJobs.options(  # type: ignore[attr-defined]
            name=jobs_actor_name(self._jobs_args[0]),
            namespace=STREAMS_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=256,
        ).remote(*self._jobs_args)
        # An actor started by an earlier deploy learns today's models.
        _, names, sizes, default, *_ = self._jobs_args
        handle.configure.remote(names, sizes, default)
        return handle

    @app.post("/detect/{media_id}", status_code=202)
    async def submit_job(
        self, body: JobRequest, media_id: str = Path(pattern=MEDIA_ID_PATTERN)
    ) -> Any:
        """Detect over a video or image (`path` on the server, or an http(s) `url`) as a
        job: 202 with its id at once; progress and detections arrive as events
        (`GET /events?job=<id>`); 409 while a job of the same `media_id` runs."""
        if (refused := self._unknown_model("model", body.model)) is not None:
            return refused
        try:
            record = await (await self._jobs()).submit.remote(
                media_id, body.model_dump(mode="json")
            )
        except DuplicateJobError as exc:
            return error(409, DuplicateJobError.__str__(exc), job_id=exc.job_id)
        except UnknownModelError as exc:
            return error(422, UnknownModelError.__str__(exc), model=exc.model_id)
        except ray.exceptions.RayError as exc:
            return error(503, f"media jobs unavailable: {type(exc).__name__}")
        return JSONResponse(
            {
                "job_id": record["job_id"],
                "media_id": media_id,
                "status": record["status"],
                "events_url": f"/events?job={record['job_id']}&last_event_id=0",
            },
            202,
        )

    @app.get("/jobs/{job_id}")
    async def get_job(self, job_id: str = Path(pattern=JOB_ID_PATTERN)) -> Any:
        """A job's status, progress and detections so far (all of them once finished)."""
        try:
            return await (await self._jobs()).get.remote(job_id)
        except JobNotFoundError:
            return error(404, f"no job {job_id!r}")
        except ray.exceptions.RayError as exc:
            return error(503, f"media jobs unavailable: {type(exc).__name__}")

    @app.delete("/jobs/{job_id}")
    async def cancel_job(self, job_id: str = Path(pattern=JOB_ID_PATTERN)) -> Any:
        """Cancel a queued or running job; 409 when it has already finished."""
        try:
            return await (await self._jobs()).cancel.remote(job_id)
        except JobNotFoundError:
            return error(404, f"no job {job_id!r}")
        except JobFinishedError as exc:
            return error(409, JobFinishedError.__str__(exc), job_status=exc.status)
        except ray.exceptions.RayError as exc:
            return error(503, f"media jobs unavailable: {type(exc).__name__}")

    @app.get("/jobs")
    async def list_jobs(self, limit: int = Query(100, ge=1, le=1000)) -> Any:
        """The newest jobs first (without their detections)."""
        try:
            return await (await self._jobs()).list.remote(limit)
        except ray.exceptions.RayError as exc:
            return error(503, f"media jobs unavailable: {type(exc).__name__}")

    # ---- camera streams -------------------------------------------------------------
    @app.post("/streams", status_code=201)
    async def subscribe(self, sub: Subscription) -> Any:
        """Subscribe a camera (the detector-worker `subscribe` payload). Several
        subscriptions on one URL share one stream. An unreachable camera still makes a
        subscription: its state and last error show in `GET /streams`."""
        if (refused := self._unknown_model("modelId", sub.modelId)) is not None:
            return refused
        try:
            return await self._registry.subscribe.remote(sub.model_dump(mode="json"))
        except SubscriptionRefused as exc:
            return error(403, exc.reason)
        except ray.exceptions.RayError as exc:
            return error(503, f"stream registry unavailable: {type(exc).__name__}")

    @app.delete(
        "/streams/{subscription_id}", status_code=204, response_class=Response, response_model=None
    )
    async def unsubscribe(
        self, subscription_id: str = Path(pattern=SUBSCRIPTION_ID_PATTERN)
    ) -> Any:
        """Remove a subscription; the last one on a URL stops its stream."""
        if not await self._registry.unsubscribe.remote(subscription_id):
            return error(404, f"no subscription {subscription_id!r}")
        return Response(status_code=204)

    @app.get("/streams")
    async def streams(self) -> Any:
        """Each stream: state, last error, fps in/processed, drops by reason, age of the
        last frame, reconnects; and each camera actor's pid, CPU time and memory."""
        return await self._registry.list_streams.remote()

    @app.get("/streams/{subscription_id}/events")
    async def stream_events(
        self,
        subscription_id: str = Path(pattern=SUBSCRIPTION_ID_PATTERN),
        after: int = Query(0, ge=0, description="only events with a larger id"),
    ) -> Any:
        """The newest events of a subscription (detections per frame, object new /
        updated / lost), oldest first, with increasing ids to poll from."""
        try:
            return await self._registry.events.remote(subscription_id, after)
        except KeyError:
            return error(404, f"no subscription {subscription_id!r}")

    @app.get("/records")
    async def records(self, limit: int = Query(20, ge=1, le=1000)) -> Any:
        """The last records, images and messages the actions delivered (newest first, as
        the Actions replica that answers saw them; never image bytes): the live view's
        list. Empty when the application has no pipeline."""
        if self._actions is None:
            return []
        try:
            return await asyncio.wait_for(
                self._actions.recent.remote(limit), self._settings.health_timeout_s
            )
        except (TimeoutError, ray.exceptions.RayError) as exc:
            return error(503, f"actions unavailable: {type(exc).__name__}")

    @app.get("/cameras/{camera_id}/image", response_class=Response)
    async def camera_image(self, camera_id: str = Path(pattern=r"^[^;/\s]{1,128}$")) -> Any:
        """The newest frame of a subscribed camera as JPEG."""
        try:
            data = await self._registry.latest_jpeg.remote(camera_id)
        except KeyError:
            return error(404, f"no subscribed camera {camera_id!r}")
        if data is None:
            return error(503, f"camera {camera_id!r} has no frame yet")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    # ---- events: SSE, WebSocket, gRPC ------------------------------------------------
    def _follow_events(
        self, flt: dict[str, Any], after_id: int | None, idle_s: float | None = None
    ) -> AsyncIterator[dict[str, Any] | None]:
        """Events matching `flt` (cameras / subscriptions / types / jobs) for one client:
        resumed after `after_id` if given, then live; `dropped` notices; None when idle."""
        return self._fanout.follow(EventFilter.of(flt), after_id, idle_s)

    @app.get("/events", response_class=StreamingResponse)
    async def events(
        self,
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
                return error(400, "Last-Event-ID must be a non-negative integer")
            last_event_id = int(header.strip())
        flt = {"cameras": camera, "subscriptions": subscription, "types": type, "jobs": job}
        stream = self._follow_events(flt, last_event_id, self._settings.sse_heartbeat_s)

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

    async def _system(self) -> dict[str, Any]:
        """Host CPU, memory and (where nvidia-smi exists) GPU load, cached for a second."""
        async with self._system_lock:  # one refresh at a time, whoever asks
            at, cached = self._system_cache
            if time.monotonic() - at < 1.0:
                return cached
            report = await self._measure_system()
            self._system_cache = (time.monotonic(), report)
            return report

    async def _measure_system(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "cpuUsage": psutil.cpu_percent(interval=None),
            "memoryUsage": psutil.virtual_memory().percent,
            "gpuUsage": None,
            "gpuMemoryUsage": None,
        }
        if shutil.which("nvidia-smi"):
            with contextlib.suppress(Exception):
                out = await asyncio.to_thread(
                    subprocess.run,
                    [
                        "nvidia-smi",
                        "--query-gpu=utilization.gpu,memory.used,memory.total",
                        "--format=csv,noheader,nounits",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                rows = [list(map(float, r.split(","))) for r in out.stdout.strip().splitlines()]
                if rows:
                    report["gpuUsage"] = round(sum(r[0] for r in rows) / len(rows), 1)
                    used, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
                    report["gpuMemoryUsage"] = round(100 * used / total, 1) if total else None
        return report

    async def _streams_cached(self) -> list[dict[str, Any]]:
        """`GET /streams`' list, fetched at most once a second per replica (every
        WebSocket's stateReport reads it)."""
        async with self._streams_lock:
            at, cached = self._streams_cache
            if time.monotonic() - at >= 1.0:
                try:
                    listing = await asyncio.wait_for(
                        self._registry.list_streams.remote(), self._settings.health_timeout_s
                    )
                    cached = listing["streams"]
                except Exception as exc:
                    logger.warning("stateReport: stream registry: %s", type(exc).__name__)
                self._streams_cache = (time.monotonic(), cached)
            return cached

    @app.websocket("/")
    async def websocket_root(self, websocket: WebSocket) -> None:
        """The detector-worker protocol (docs/protocol.md)."""
        await self._websocket(websocket)

    @app.websocket("/ws")
    async def websocket_ws(self, websocket: WebSocket) -> None:
        """The same protocol at /ws."""
        await self._websocket(websocket)

    async def _websocket(self, websocket: WebSocket) -> None:
        presented = bearer(websocket.headers.get("authorization"))
        presented = presented or websocket.query_params.get("access_token")
        await websocket.accept()
        if not token_ok(presented, self._auth_token):
            await websocket.close(WS_UNAUTHORIZED, "missing or wrong bearer token")
            return
        session = WsSession(self, websocket)
        self._ws_clients += 1
        try:
            await session.run()
        finally:
            self._ws_clients -= 1
