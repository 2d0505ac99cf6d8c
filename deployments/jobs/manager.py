"""Media jobs: detection over a whole video or image file, in the background.

`POST /detect/{media_id}` submits a job for an http(s) URL or a local file; the `MediaJobs`
actor runs it: it downloads the media if needed, reads it frame by frame, sends frames to
the detector deployment (a few in flight), publishes progress and detections to the
EventHub (topic `job:<job id>`) and persists each job record atomically. A restarted
actor cannot resume a job: what was queued or running becomes `interrupted`.

Everything but the actor is pure and tested without Ray: `JobStore` (records on disk),
`JobRun` (one job's reading, detection and events, with `detect` and `publish` injected),
and `download`. Events go to the hub through the camera actors' `HubPublisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import cv2
import httpx
import numpy as np
import ray
from pydantic import Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.exceptions import BackPressureError

from graph.common.detection import DetectRequest
from graph.common.errors import CamgraphError, ModelNotReadyError, UnknownModelError
from graph.common.files import atomic_write_text
from graph.common.names import STREAMS_NAMESPACE
from graph.common.netpolicy import DEFAULT_DENIED, denied, networks
from graph.common.schemas import (
    MODEL_ID_PATTERN,
    DetectConfig,
    Detection,
    StrictModel,
    image_detections,
)
from graph.common.vision import DetectParams, letterbox
from graph.events.model import HubPublisher

logger = logging.getLogger("camgraph.jobs")

MEDIA_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
MiB = 1024 * 1024
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
ACTIVE_STATUSES = frozenset({"queued", "running"})
EVENT_TYPES = ("job.progress", "job.detections", "job.finished")

Detect = Callable[[np.ndarray], Awaitable[list[dict[str, Any]]]]
Publish = Callable[[list[dict[str, Any]]], None]


# ---- errors -----------------------------------------------------------------------------
class MediaJobError(CamgraphError):
    """Base of the media job errors."""


class DuplicateJobError(MediaJobError):
    """A job for this media id is still queued or running (HTTP 409)."""

    def __init__(self, media_id: str, job_id: str) -> None:
        super().__init__(media_id, job_id)
        self.media_id, self.job_id = media_id, job_id

    def __str__(self) -> str:
        return f"media {self.media_id!r} already has a job in progress: {self.job_id}"


class JobNotFoundError(MediaJobError, KeyError):
    """No job with this id (never submitted, or pruned) (HTTP 404)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job {self.job_id!r}"


class JobFinishedError(MediaJobError):
    """The job already finished, so it cannot be cancelled (HTTP 409)."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(job_id, status)
        self.job_id, self.status = job_id, status

    def __str__(self) -> str:
        return f"job {self.job_id} already finished ({self.status})"


class MediaError(MediaJobError):
    """The media cannot be fetched or read; the job fails with this message."""


class _JobCancelled(Exception):
    """Raised inside a job when its `cancelled` event is seen."""


# ---- schemas ----------------------------------------------------------------------------
class MediaJobSettings(StrictModel):
    """`args.jobs`: where job records live and how jobs read media."""

    jobs_dir: Path = Field(Path("data/jobs"), description="records, downloads; relative: base_dir")
    max_download_bytes: int = Field(512 * MiB, ge=1, description="a larger download fails")
    denied_networks: tuple[str, ...] = Field(
        DEFAULT_DENIED, description="`url` media (and redirects) never from these networks"
    )

    @field_validator("denied_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        networks(value)  # a bad CIDR is a clear error at deploy time
        return value

    download_timeout_s: float = Field(300.0, gt=0, le=86_400, description="one whole download")
    frame_stride: int = Field(1, ge=1, le=10_000, description="process every Nth video frame")
    max_frames: int | None = Field(None, ge=1, description="most frames processed per job")
    max_image_pixels: int = Field(
        50_000_000, ge=1024, description="a larger image or video frame fails the job"
    )
    progress_every_s: float = Field(0.5, ge=0, le=60, description="job.progress at most this often")
    keep_finished: int = Field(1000, ge=0, le=1_000_000, description="finished jobs kept")
    detect_concurrency: int = Field(2, ge=1, le=64, description="frames in flight per job")
    max_running_jobs: int = Field(2, ge=1, le=256, description="jobs at once; others queue")
    model_wait_s: float = Field(120.0, ge=0, le=3600, description="wait for a loading model")
    cancel_wait_s: float = Field(10.0, ge=0, le=600, description="DELETE waits this for the stop")
    allowed_dirs: tuple[Path, ...] | None = Field(
        (Path("data"),),
        description="`path` media only from under these (relative: base_dir); null: any "
        "readable path (an explicit opt-out)",
    )

    def resolved(self, base_dir: Path) -> MediaJobSettings:
        """Relative directories made absolute against `base_dir`."""

        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else (base_dir / path).resolve()

        allowed = None if self.allowed_dirs is None else tuple(map(absolute, self.allowed_dirs))
        return self.model_copy(
            update={"jobs_dir": absolute(self.jobs_dir), "allowed_dirs": allowed}
        )


class JobRequest(StrictModel):
    """The body of `POST /detect/{media_id}`: exactly one of `url`, `path`."""

    url: str | None = Field(None, min_length=1, max_length=4096, description="http(s) URL")
    path: str | None = Field(
        None, min_length=1, max_length=4096, description="absolute path or file:// URL"
    )
    model: str | None = Field(None, pattern=MODEL_ID_PATTERN, description="default: the app's")
    config: DetectConfig | None = Field(None, description="conf, iou, classes, max_det")
    frame_stride: int | None = Field(None, ge=1, le=10_000, description="every Nth video frame")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("path")
    @classmethod
    def _local(cls, value: str | None) -> str | None:
        if value is not None:
            if "\x00" in value:
                raise ValueError("must not contain NUL characters")
            if value.startswith("file:"):
                parts = urlsplit(value)
                if parts.netloc not in ("", "localhost") or not parts.path:
                    raise ValueError("a file URL must name a local file: file:///path/to/media")
            elif not Path(value).is_absolute():
                raise ValueError("must be an absolute path or a file:// URL")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        if (self.url is None) == (self.path is None):
            raise ValueError("give exactly one of url (http/https) or path (local file)")
        return self

    def local_path(self) -> Path | None:
        if self.path is None:
            return None
        if self.path.startswith("file:"):
            return Path(unquote(urlsplit(self.path).path))
        return Path(self.path)


class Progress(StrictModel):
    processed_frames: int = 0
    total_frames: int | None = Field(None, description="frames to process; None: unknown")
    percent: float = 0.0


class FrameResult(StrictModel):
    frame_index: int = Field(description="index in the media (0 for an image)")
    timestamp_s: float
    detections: list[Detection]


class JobRecord(StrictModel):
    """One job as `GET /jobs/{id}` shows it and as it is persisted. `result` lists the
    processed frames that have at least one detection, in frame order."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    media_id: str = Field(pattern=MEDIA_ID_PATTERN)
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    source: str = Field(description="the URL (passwords redacted) or path")
    kind: Literal["image", "video"] | None = None
    model: str
    config: DetectConfig = Field(default_factory=DetectConfig)
    frame_stride: int = 1
    progress: Progress = Field(default_factory=Progress)
    error: str | None = None
    result: list[FrameResult] = Field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


def redact_url(url: str) -> str:
    """The URL without its password and secret-looking query values;
    `graph.common.redaction.redact`, the one definition."""
    from graph.common.redaction import redact

    return redact(url)


def new_record(
    media_id: str, request: JobRequest, model: str, settings: MediaJobSettings
) -> JobRecord:
    """A queued record for a submitted request (a fresh job id)."""
    return JobRecord(
        job_id=uuid.uuid4().hex,
        media_id=media_id,
        status="queued",
        created_at=time.time(),
        source=redact_url(request.url) if request.url is not None else str(request.path),
        model=model,
        config=request.config or DetectConfig(),
        frame_stride=request.frame_stride or settings.frame_stride,
    )


# ---- events -----------------------------------------------------------------------------
def job_event(record: JobRecord, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """An EventHub event of a job (the hub assigns `id`)."""
    return {
        "topic": f"job:{record.job_id}",
        "type": kind,
        "time": time.time(),
        "job_id": record.job_id,
        "camera_id": None,
        "subscription_id": None,
        "display_id": None,
        "model_id": record.model,
        "session_id": None,
        "data": {"media_id": record.media_id, **data},
    }


def progress_event(record: JobRecord) -> dict[str, Any]:
    return job_event(
        record, "job.progress", {"status": record.status, **record.progress.model_dump()}
    )


def finished_event(record: JobRecord) -> dict[str, Any]:
    data = {"status": record.status, "error": record.error, **record.progress.model_dump()}
    return job_event(record, "job.finished", data)


# ---- persistence --------------------------------------------------------------------------
class JobStore:
    """Job records in memory and one JSON file each under `directory`, written atomically
    (temp file + fsync + rename): a crash leaves the old or the new record, never half."""

    def __init__(self, directory: Path, keep_finished: int = 1000) -> None:
        self.directory = directory
        self.keep_finished = keep_finished
        self._records: dict[str, JobRecord] = {}
        self._lock = threading.Lock()  # the dict: `persist` runs in worker threads
        self._write_lock = threading.Lock()  # the files: one writer at a time

    def open(self) -> list[JobRecord]:
        """Load every record; jobs that were queued or running are now `interrupted`
        (persisted). Temp files of an interrupted write are removed. Returns those."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        downloads = self.directory / "downloads"
        if downloads.is_dir():
            for partial in downloads.iterdir():
                partial.unlink(missing_ok=True)
        interrupted: list[JobRecord] = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = JobRecord.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                logger.warning("ignoring unreadable job record %s: %s", path, exc)
                continue
            if record.active:
                record = record.model_copy(
                    update={
                        "status": "interrupted",
                        "finished_at": time.time(),
                        "error": f"the jobs actor restarted while the job was {record.status}",
                    }
                )
                interrupted.append(record)
            self._records[record.job_id] = record
        for record in interrupted:
            self.persist(record.job_id)
        self.prune()
        return interrupted

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            record = self._records.get(job_id)
        if record is None:
            raise JobNotFoundError(job_id)
        return record

    def put(self, record: JobRecord) -> None:
        """Memory only; `persist` writes it."""
        with self._lock:
            self._records[record.job_id] = record

    def active_for(self, media_id: str) -> JobRecord | None:
        with self._lock:
            return next(
                (r for r in self._records.values() if r.media_id == media_id and r.active), None
            )

    def newest(self, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.created_at, reverse=True)
        return records[:limit]

    def persist(self, job_id: str) -> None:
        """Write the job's current record: whatever `put` stored last, so writes that race
        still leave the newest state on disk. The dict stays free while the file syncs."""
        with self._write_lock:
            with self._lock:
                record = self._records.get(job_id)
            if record is None:  # pruned meanwhile
                return
            atomic_write_text(self.directory / f"{job_id}.json", record.model_dump_json())

    def prune(self) -> list[str]:
        """Forget the oldest finished jobs beyond `keep_finished` (memory and disk)."""
        with self._write_lock, self._lock:
            finished = [r for r in self._records.values() if not r.active]
            finished.sort(key=lambda r: r.created_at if r.finished_at is None else r.finished_at)
            excess = finished[: max(0, len(finished) - self.keep_finished)]
            for record in excess:
                del self._records[record.job_id]
                (self.directory / f"{record.job_id}.json").unlink(missing_ok=True)
        return [r.job_id for r in excess]


# ---- download -----------------------------------------------------------------------------
async def download(
    url: str,
    directory: Path,
    max_bytes: int,
    timeout_s: float,
    cancelled: asyncio.Event | None = None,
    denied_networks: Sequence[str] = DEFAULT_DENIED,
) -> Path:
    """Fetch `url` into a temp file under `directory`; MediaError when it fails, takes
    longer than `timeout_s` or is larger than `max_bytes` (checked as it streams), or
    when it (or a redirect) goes to a denied network."""
    shown = redact_url(url)
    deny = networks(denied_networks)
    if (refusal := await asyncio.to_thread(denied, url, deny)) is not None:
        raise MediaError(refusal)

    async def check_request(request: httpx.Request) -> None:
        """Every request, the redirects' too: http(s) only, never a denied network."""
        target = str(request.url)
        refusal = await asyncio.to_thread(denied, target, deny)
        if not target.startswith(("http://", "https://")) or refusal is not None:
            raise MediaError("refused by policy: redirect")

    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="media-", suffix=".part")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            async with (
                asyncio.timeout(timeout_s),
                httpx.AsyncClient(
                    follow_redirects=True,
                    timeout=min(timeout_s, 30.0),
                    event_hooks={"request": [check_request]},
                ) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise MediaError(f"download of {shown} failed: HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise MediaError(
                        f"the media at {shown} is {int(declared)} bytes, "
                        f"more than the limit of {max_bytes} bytes"
                    )
                size = 0
                async for chunk in response.aiter_bytes(256 * 1024):
                    if cancelled is not None and cancelled.is_set():
                        raise _JobCancelled
                    size += len(chunk)
                    if size > max_bytes:
                        raise MediaError(
                            f"the media at {shown} is larger than the limit of {max_bytes} bytes"
                        )
                    out.write(chunk)
        return path
    except TimeoutError:
        path.unlink(missing_ok=True)
        raise MediaError(f"download of {shown} took longer than {timeout_s}s") from None
    except httpx.HTTPError as exc:
        path.unlink(missing_ok=True)
        raise MediaError(f"download of {shown} failed: {type(exc).__name__}: {exc}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# ---- reading media ------------------------------------------------------------------------
@dataclass
class _Video:
    capture: Any  # cv2.VideoCapture
    frame_count: int | None
    fps: float | None


def _image_pixels(path: Path) -> int | None:
    """Width x height from the header alone, or None if PIL does not know the format."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return int(image.width) * int(image.height)
    except Image.DecompressionBombError:
        return 2**62
    except (UnidentifiedImageError, OSError, ValueError, ImportError):
        # ImportError: a PIL plugin registered by another library (ultralytics' HEIF
        # opener) whose module is missing; the format is simply unknown here.
        return None


def open_media(path: Path, max_pixels: int) -> np.ndarray | _Video:
    """A decoded image, or an opened video; MediaError when it is neither. Too many pixels
    are refused from the header, before decoding."""
    if not path.is_file():
        raise MediaError(f"no such file: {path}")
    pixels = _image_pixels(path)
    if pixels is not None and pixels > max_pixels:
        raise MediaError(f"the image has more than the limit of {max_pixels} pixels")
    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # reads the signature first
    except cv2.error:
        image = None
    if image is not None and image.size:
        if image.shape[0] * image.shape[1] > max_pixels:
            raise MediaError(f"the image has more than the limit of {max_pixels} pixels")
        return image
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise MediaError(f"{path.name} is not a readable image or video")
    w, h = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    if w * h > max_pixels:
        capture.release()
        raise MediaError(f"the video's frames have more than the limit of {max_pixels} pixels")
    count, fps = capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(cv2.CAP_PROP_FPS)
    return _Video(capture, int(count) if count > 0 else None, fps if fps > 0 else None)


def _read_frame(video: _Video, skip: int) -> tuple[np.ndarray, float] | None:
    """Skip `skip` frames (grab only), read the next: the frame and its time in seconds."""
    for _ in range(skip):
        if not video.capture.grab():
            return None
    ok, frame = video.capture.read()
    if not ok or frame is None:
        return None
    return frame, float(video.capture.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0


# ---- one job ------------------------------------------------------------------------------
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


# ---- events to the hub --------------------------------------------------------------------
# ---- the jobs of one app ------------------------------------------------------------------
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


# ---- the Ray actor ------------------------------------------------------------------------
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
        boxed, lb = await asyncio.to_thread(letterbox, image, self._sizes[model])
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
