"""What a media job is and says: its request, record, status, events and errors."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator, model_validator

from deployments.jobs.settings import MediaJobSettings
from graph.common.errors import CamgraphError
from graph.common.schemas import MODEL_ID_PATTERN, DetectConfig, Detection, StrictModel

MEDIA_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
ACTIVE_STATUSES = frozenset({"queued", "running"})
EVENT_TYPES = ("job.progress", "job.detections", "job.finished")


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
