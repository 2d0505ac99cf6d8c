"""The jobs of one app: submit, get, list and cancel them (pure: no Ray)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from deployments.jobs.records import (
    MEDIA_ID_PATTERN,
    DuplicateJobError,
    JobFinishedError,
    JobRecord,
    JobRequest,
    JobStatus,
    finished_event,
    new_record,
)
from deployments.jobs.runner import Detect, JobRun, Publish
from deployments.jobs.settings import MediaJobSettings
from deployments.jobs.store import JobStore
from graph.common.errors import UnknownModelError
from graph.common.vision import DetectParams

logger = logging.getLogger("camgraph.jobs")


@dataclass
class _Active:
    task: asyncio.Task[None]
    cancelled: asyncio.Event
    run: JobRun | None = None


class JobManager:
    """Submit, get, list and cancel jobs over a `JobStore` (pure: `detector(model,
    params)` gives a job its detect function, `publish` takes its events). Call from one
    event loop: `submit` checks for a duplicate and registers without an await between."""

    def __init__(
        self,
        settings: MediaJobSettings,
        models: Collection[str],
        default_model: str,
        detector: Callable[[str, DetectParams], Detect],
        publish: Publish,
    ) -> None:
        self.settings, self._models, self._default = settings, models, default_model
        self._detector, self._publish = detector, publish
        self.store = JobStore(settings.jobs_dir, settings.keep_finished)
        self._active: dict[str, _Active] = {}
        self._slots = asyncio.Semaphore(settings.max_running_jobs)

    def open(self) -> list[JobRecord]:
        """Load the records; what was queued or running is now interrupted (and said so)."""
        interrupted = self.store.open()
        self._publish([finished_event(r) for r in interrupted])
        return interrupted

    async def submit(self, media_id: str, request: JobRequest) -> JobRecord:
        """Queue a job; DuplicateJobError while this media id has one queued or running."""
        if not re.fullmatch(MEDIA_ID_PATTERN, media_id):
            raise ValueError(f"media id must match {MEDIA_ID_PATTERN}")
        model = request.model or self._default
        if model not in self._models:
            raise UnknownModelError(model, tuple(self._models))
        existing = self.store.active_for(media_id)
        if existing is not None:
            raise DuplicateJobError(media_id, existing.job_id)
        record = new_record(media_id, request, model, self.settings)
        self.store.put(record)
        cancelled = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._job(record, request, cancelled))
        self._active[record.job_id] = _Active(task, cancelled)
        return record

    async def _persist(self, job_id: str) -> None:
        await asyncio.to_thread(self.store.persist, job_id)

    async def _job(self, record: JobRecord, request: JobRequest, cancelled: asyncio.Event) -> None:
        job_id = record.job_id
        active = self._active[job_id]
        try:
            await self._persist(job_id)
            async with self._slots:
                running = record.model_copy(update={"status": "running", "started_at": time.time()})
                detect = self._detector(record.model, record.config.params())
                active.run = JobRun(
                    running, request, detect, self._publish, self.settings, cancelled
                )
                self.store.put(running)
                await self._persist(job_id)
                final = await active.run.run()
        except asyncio.CancelledError:  # cancelled while queued, or shutting down
            final = self._ended(job_id, "cancelled", None)
        except Exception as exc:  # a bug here must not leave the job running forever
            logger.exception("media job %s failed", job_id)
            final = self._ended(job_id, "failed", f"{type(exc).__name__}: {str(exc)[:1000]}")
        self.store.put(final)
        self._active.pop(job_id, None)
        await self._persist(job_id)
        await asyncio.to_thread(self.store.prune)

    def _ended(self, job_id: str, status: JobStatus, error: str | None) -> JobRecord:
        """A job ended outside `JobRun.run` (which says so itself otherwise)."""
        current = self.record(job_id)
        update = {"status": status, "error": error, "finished_at": time.time()}
        final = current.model_copy(update=update)
        self._publish([finished_event(final)])
        return final

    def record(self, job_id: str) -> JobRecord:
        """The job now (JobNotFoundError when unknown or pruned)."""
        active = self._active.get(job_id)
        if active is not None and active.run is not None:
            return active.run.record
        return self.store.get(job_id)

    def newest(self, limit: int = 100) -> list[JobRecord]:
        return [self.record(r.job_id) for r in self.store.newest(limit)]

    async def cancel(self, job_id: str) -> JobRecord:
        """Stop a queued or running job and return its record: `cancelled` once it has
        stopped (within a frame). JobFinishedError if it had already finished."""
        active = self._active.get(job_id)
        if active is None:
            raise JobFinishedError(job_id, self.store.get(job_id).status)
        active.cancelled.set()
        if active.run is None:
            active.task.cancel()
        await asyncio.wait({active.task}, timeout=self.settings.cancel_wait_s)
        return self.record(job_id)

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobRecord:
        """The record once the job has finished (or after `timeout_s`)."""
        active = self._active.get(job_id)
        if active is not None:
            await asyncio.wait({active.task}, timeout=timeout_s)
        return self.record(job_id)

    async def shutdown(self) -> None:
        """Cancel every job; their records say `cancelled`."""
        for active in list(self._active.values()):
            active.cancelled.set()
            active.task.cancel()
        tasks = [a.task for a in self._active.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.cancel_wait_s)

    def stats(self) -> dict[str, int]:
        running = sum(a.run is not None for a in self._active.values())
        return {"queued": len(self._active) - running, "running": running}
