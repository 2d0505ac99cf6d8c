"""The `MediaJobs` Ray actor: a thin shell over `JobManager`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.exceptions import BackPressureError

from deployments.jobs.manager import JobManager
from deployments.jobs.records import JobRequest, MediaError
from deployments.jobs.runner import Detect
from deployments.jobs.settings import MediaJobSettings
from graph.common.detection import DetectRequest
from graph.common.errors import ModelNotReadyError
from graph.common.names import STREAMS_NAMESPACE
from graph.common.schemas import image_detections
from graph.common.vision import RECT_STRIDE, DetectParams, letterbox
from graph.events.model import HubPublisher


def _discard(events: list[dict[str, Any]]) -> None:
    """The publish of a jobs actor without a hub (tests of the manager alone)."""


@ray.remote(max_restarts=-1, max_task_retries=0)
class MediaJobs:
    """The media jobs of one app (a thin shell over `JobManager`): detection through the
    app's Detector deployments, events to its EventHub. Restartable: jobs that were
    running when it died are `interrupted`."""

    def __init__(
        self,
        app_name: str,
        detector_names: dict[str, str],
        model_sizes: dict[str, int],
        default_model: str,
        settings: dict[str, Any],
        hub_name: str | None = None,
        namespace: str = STREAMS_NAMESPACE,
    ) -> None:
        self._app, self._names, self._sizes = app_name, detector_names, model_sizes
        self._hub_name, self._namespace = hub_name, namespace
        self._handles: dict[str, Any] = {}
        self._hub: Any = None
        self._publisher = HubPublisher(self._send, max_buffer=10_000)
        self._jobs = JobManager(
            MediaJobSettings.model_validate(settings),
            tuple(detector_names),
            default_model,
            self._detector,
            self._publisher.publish_dicts if hub_name is not None else _discard,
        )
        self._jobs.open()
        # Async actors run __init__ with their event loop set.
        self._pump = asyncio.get_event_loop().create_task(self._publisher.run())

    async def _send(self, events: list[dict[str, Any]], key: tuple[str, int]) -> None:
        try:
            if self._hub is None:
                assert self._hub_name is not None
                # A blocking GCS lookup: off the event loop.
                self._hub = await asyncio.to_thread(
                    ray.get_actor, self._hub_name, namespace=self._namespace
                )
            await self._hub.publish.remote(events, key)
        except Exception:
            self._hub = None  # found again next time (it may have restarted)
            raise

    def _detector(self, model: str, params: DetectParams) -> Detect:
        return functools.partial(self._detect, model, params)

    async def _detect(
        self, model: str, params: DetectParams, image: np.ndarray
    ) -> list[dict[str, Any]]:
        """Letterbox, detect (waiting out back-pressure and a loading model: no frame is
        lost), boxes back in the image's own pixels."""
        handle = self._handles.get(model)
        if handle is None:
            handle = serve.get_deployment_handle(self._names[model], app_name=self._app)
            self._handles[model] = handle
        boxed, lb = await asyncio.to_thread(letterbox, image, self._sizes[model], RECT_STRIDE)
        request = DetectRequest(boxed, params)
        waiting_since: float | None = None
        while True:
            try:
                result = await handle.detect.remote(request)
                break
            except BackPressureError:
                await asyncio.sleep(0.1)
            except ModelNotReadyError as exc:
                message = ModelNotReadyError.__str__(exc)  # str() is the remote traceback
                waiting_since = waiting_since or time.monotonic()
                waited_s = time.monotonic() - waiting_since
                if exc.state not in ("loading", "converting") or (
                    waited_s > self._jobs.settings.model_wait_s
                ):
                    raise MediaError(message) from None
                await asyncio.sleep(1.0)
        return image_detections(result.rows, result.names, lb)

    async def configure(
        self, detector_names: dict[str, str], model_sizes: dict[str, int], default_model: str
    ) -> None:
        """Called by every ingress replica at start: the served models after a redeploy
        (the job settings stay as this actor started with them)."""
        self._names, self._sizes = dict(detector_names), dict(model_sizes)
        self._handles.clear()  # deployments may have been replaced
        self._jobs._models, self._jobs._default = tuple(detector_names), default_model

    async def submit(self, media_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """Queue a job (DuplicateJobError, UnknownModelError, ValidationError)."""
        record = await self._jobs.submit(media_id, JobRequest.model_validate(request))
        return record.model_dump(mode="json")

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job's record, with its results so far (JobNotFoundError)."""
        return self._jobs.record(job_id).model_dump(mode="json")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel and return the record (JobNotFoundError, JobFinishedError)."""
        return (await self._jobs.cancel(job_id)).model_dump(mode="json")

    async def stats(self) -> dict[str, Any]:
        return {**self._jobs.stats(), "events": self._publisher.status()}

    async def shutdown(self) -> None:
        """Cancel every job (an app being deleted) and send the last events."""
        await self._jobs.shutdown()
        with contextlib.suppress(Exception):
            await self._publisher.flush()

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest jobs first, without their `result` lists."""
        records = self._jobs.newest(limit)
        return [r.model_dump(mode="json", exclude={"result"}) for r in records]
