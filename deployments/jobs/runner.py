"""Running one job: frames, the detector, then results and events."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from deployments.jobs.media import _read_frame, _Video, download, open_media
from deployments.jobs.records import (
    FrameResult,
    JobRecord,
    JobRequest,
    JobStatus,
    MediaError,
    Progress,
    _JobCancelled,
    finished_event,
    job_event,
    progress_event,
)
from deployments.jobs.settings import MediaJobSettings

Detect = Callable[[np.ndarray], Awaitable[list[dict[str, Any]]]]
Publish = Callable[[list[dict[str, Any]]], None]

_Pending = deque[tuple[int, float, "asyncio.Future[list[dict[str, Any]]]"]]


async def _cancel_all(pending: _Pending) -> None:
    for *_, task in pending:
        task.cancel()
    await asyncio.gather(*(task for *_, task in pending), return_exceptions=True)


class JobRun:
    """Runs one job: fetch, read, detect (`detect_concurrency` frames in flight, results
    in frame order), publish events, then return the final record. Never raises for a
    job's own failure (the record says `failed` and why). Setting `cancelled` stops it at
    once: no further frame is read, and frames still at the detector are dropped."""

    def __init__(
        self,
        record: JobRecord,
        request: JobRequest,
        detect: Detect,
        publish: Publish,
        settings: MediaJobSettings,
        cancelled: asyncio.Event,
    ) -> None:
        self._record = record
        self._request, self._detect, self._publish = request, detect, publish
        self._settings, self._cancelled = settings, cancelled
        self._results: list[FrameResult] = []
        self._progress = record.progress
        self._last_progress = -float("inf")
        self.frames_read = 0

    @property
    def record(self) -> JobRecord:
        """The job now: status, progress and the results so far."""
        return self._record.model_copy(
            update={"progress": self._progress, "result": list(self._results)}
        )

    def _set(self, **update: Any) -> None:
        self._record = self._record.model_copy(update=update)

    async def run(self) -> JobRecord:
        self._set(status="running", started_at=self._record.started_at or time.time())
        self._report_progress(force=True)
        downloaded: Path | None = None
        try:
            if self._cancelled.is_set():
                raise _JobCancelled
            path = self._request.local_path()
            if path is None:
                assert self._request.url is not None
                path = downloaded = await download(
                    self._request.url,
                    self._settings.jobs_dir / "downloads",
                    self._settings.max_download_bytes,
                    self._settings.download_timeout_s,
                    self._cancelled,
                    self._settings.denied_networks,
                )
            else:
                self._check_allowed(path)
            await self._process(path)
            status: JobStatus = "succeeded"
            error = None
        except _JobCancelled:
            status, error = "cancelled", None
        except MediaError as exc:
            status, error = "failed", str(exc)
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {str(exc)[:1000]}"
        finally:
            if downloaded is not None:
                downloaded.unlink(missing_ok=True)
        if status == "succeeded":
            done = self._progress.processed_frames
            self._progress = Progress(processed_frames=done, total_frames=done, percent=100.0)
        self._set(status=status, error=error, finished_at=time.time())
        final = self.record
        if status == "succeeded":
            self._publish([progress_event(final)])
        self._publish([finished_event(final)])
        return final

    def _check_allowed(self, path: Path) -> None:
        allowed = self._settings.allowed_dirs
        if allowed is not None and not any(
            path.resolve().is_relative_to(d.resolve()) for d in allowed
        ):
            raise MediaError("refused by policy: `path` media only from jobs.allowed_dirs")

    async def _process(self, path: Path) -> None:
        media = await asyncio.to_thread(open_media, path, self._settings.max_image_pixels)
        if isinstance(media, np.ndarray):
            self._set(kind="image")
            self._progress = Progress(total_frames=1)
            self.frames_read = 1
            pending: _Pending = deque([(0, 0.0, asyncio.ensure_future(self._detect(media)))])
            try:
                await self._finish_oldest(pending)
            finally:
                await _cancel_all(pending)
            return
        self._set(kind="video")
        try:
            await self._process_video(media, path.name)
        finally:
            await asyncio.to_thread(media.capture.release)

    async def _process_video(self, video: _Video, name: str) -> None:
        stride, limit = self._record.frame_stride, self._settings.max_frames
        total = None if video.frame_count is None else -(-video.frame_count // stride)
        if total is not None and limit is not None:
            total = min(total, limit)
        self._progress = Progress(total_frames=total)
        pending: _Pending = deque()
        index = -stride
        try:
            while limit is None or self.frames_read < limit:
                if self._cancelled.is_set():
                    raise _JobCancelled
                skip = 0 if index < 0 else stride - 1
                read = await asyncio.to_thread(_read_frame, video, skip)
                if read is None:
                    break
                index += stride
                frame, timestamp_s = read
                if timestamp_s <= 0 and index > 0 and video.fps:
                    timestamp_s = index / video.fps
                self.frames_read += 1
                pending.append((index, timestamp_s, asyncio.ensure_future(self._detect(frame))))
                if len(pending) >= self._settings.detect_concurrency:
                    await self._finish_oldest(pending)
            if self.frames_read == 0:
                raise MediaError(f"{name} is not a readable image or video: no frame decodes")
            while pending:
                await self._finish_oldest(pending)
        finally:
            await _cancel_all(pending)

    async def _finish_oldest(self, pending: _Pending) -> None:
        """Wait for the oldest frame's detections (or a cancel) and account for them."""
        index, timestamp_s, task = pending[0]
        if not task.done():
            stop = asyncio.ensure_future(self._cancelled.wait())
            either: set[asyncio.Future[Any]] = {task, stop}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
        if self._cancelled.is_set():
            raise _JobCancelled  # the frame is dropped: a cancel need not wait for it
        pending.popleft()
        try:
            detections = task.result()
        except MediaError:
            raise
        except Exception as exc:
            message = f"detection failed on frame {index}: {type(exc).__name__}: {str(exc)[:500]}"
            raise MediaError(message) from exc
        self._finish_frame(index, timestamp_s, detections)

    def _finish_frame(
        self, index: int, timestamp_s: float, detections: list[dict[str, Any]]
    ) -> None:
        if detections:
            self._results.append(
                FrameResult.model_validate(
                    {"frame_index": index, "timestamp_s": timestamp_s, "detections": detections}
                )
            )
            data = {"frame_index": index, "timestamp_s": timestamp_s, "detections": detections}
            self._publish([job_event(self._record, "job.detections", data)])
        done, total = self._progress.processed_frames + 1, self._progress.total_frames
        percent = 0.0 if not total else min(100.0, round(100.0 * done / total, 2))
        self._progress = Progress(processed_frames=done, total_frames=total, percent=percent)
        self._report_progress(force=False)

    def _report_progress(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._last_progress >= self._settings.progress_every_s:
            self._last_progress = now
            current = self._record.model_copy(update={"progress": self._progress})
            self._publish([progress_event(current)])


async def run_job(
    record: JobRecord,
    request: JobRequest,
    detect: Detect,
    publish: Publish,
    settings: MediaJobSettings,
    cancelled: asyncio.Event,
) -> JobRecord:
    """Run one job to its end (see `JobRun`); returns the final record."""
    return await JobRun(record, request, detect, publish, settings, cancelled).run()
