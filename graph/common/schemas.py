"""Pydantic models at camgraph's boundaries: HTTP bodies, deployment config, health."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from graph.common.vision import DetectParams, Letterbox, unletterbox_boxes

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DetectConfig(StrictModel):
    """Optional per-request settings of `/detect` (JSON in the `config` form field)."""

    conf: float = Field(0.25, gt=0.0, le=1.0, description="minimum confidence")
    iou: float = Field(0.7, ge=0.0, le=1.0, description="NMS IoU threshold")
    classes: list[int] | None = Field(
        None, max_length=1000, description="keep only these class ids"
    )
    max_det: int = Field(300, ge=1, le=3000, description="most detections returned")

    @field_validator("classes")
    @classmethod
    def _non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(c < 0 for c in value):
            raise ValueError("class ids must be >= 0")
        return value

    def params(self) -> DetectParams:
        classes = tuple(sorted(set(self.classes))) if self.classes is not None else None
        return DetectParams(self.conf, self.iou, classes, self.max_det)


class Box(StrictModel):
    x1: float
    y1: float
    x2: float
    y2: float


class Detection(StrictModel):
    class_id: int
    label: str
    confidence: float
    box: Box


class ModelSpec(StrictModel):
    """One detector model; each gets its own Detector deployment `Detector_<id>`."""

    id: str = Field(pattern=MODEL_ID_PATTERN, description="model id used by /detect?model=")
    path: Path = Field(description=".onnx or .pt file; relative paths resolve against base_dir")
    imgsz: int = Field(640, ge=32, le=4096, multiple_of=32, description="square input size px")
    intra_op_threads: int | Literal["auto"] = Field(
        "auto", description="ONNX Runtime threads; auto = the replica's CPU share (>= 1)"
    )
    trt_cache_dir: Path | None = Field(
        None, description="TensorRT engine cache; TensorRT is used only when this is set"
    )
    fp16: bool = Field(True, description="TensorRT FP16 kernels")
    onnx_cache_dir: Path | None = Field(
        None, description="where a .pt is exported to ONNX once (default: the app's)"
    )
    warnings: list[str] = Field(
        default_factory=list, description="what /health says of it (e.g. ignored sections)"
    )


class DetectorUserConfig(StrictModel):
    """`user_config` of a Detector deployment; applied by `reconfigure` without restart."""

    max_batch_size: int = Field(4, ge=1, le=256)
    # 0: a batch is what is queued when the engine frees (frames that arrived during
    # the last inference), and a frame never waits for partners. On a CPU replica a
    # batch costs its frames' sum anyway, and waiting the 5 ms it used to left the
    # replicas idle about 7 % more of the time at 4 cameras realtime (README, "Batches
    # take what is queued"). A GPU node with sparse arrivals may set 0.002-0.005.
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)


class IngressSettings(StrictModel):
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="413 above this")
    max_image_pixels: int = Field(
        50_000_000, ge=1024, description="decoded images above this are refused (400)"
    )
    health_timeout_s: float = Field(2.0, gt=0, le=60)
    detect_timeout_s: float = Field(30.0, gt=0, le=600)
    default_model: str | None = Field(
        None, pattern=MODEL_ID_PATTERN, description="model of /detect without ?model="
    )
    auth_token_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="environment variable holding the bearer token (unset: no auth)",
    )
    auth_token_file: Path | None = Field(None, description="or a file holding the token")
    grpc_without_token: bool = Field(
        False,
        description="answer gRPC without a token (Serve's gRPC proxy listens on every "
        "interface: only for a private network)",
    )
    state_report_s: float = Field(2.0, gt=0, le=3600, description="WebSocket stateReport")
    actor_call_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="registry and hub calls of a WebSocket message and of the stream reads "
        "(GET /streams, a subscription's events, a camera's image)",
    )
    sse_heartbeat_s: float = Field(15.0, gt=0, le=300, description="SSE comment interval")
    client_queue: int = Field(
        256, ge=8, le=100_000, description="events queued per client; a slow one drops oldest"
    )

    @model_validator(mode="after")
    def _one_token_source(self) -> IngressSettings:
        if self.auth_token_env is not None and self.auth_token_file is not None:
            raise ValueError("set at most one of auth_token_env, auth_token_file")
        return self


class EventHubSettings(StrictModel):
    """`args.events`: the EventHub's ring buffers (SSE, WebSocket and gRPC read them)."""

    capacity_per_topic: int = Field(
        1024, ge=16, le=1_000_000, description="events kept per subscription or job"
    )
    max_topics: int = Field(10_000, ge=16, le=1_000_000, description="least recent drop")


class BranchModelSpec(StrictModel):
    """One branch model of a pipeline; each gets its own deployment `Classifier_<id>`."""

    id: str = Field(pattern=MODEL_ID_PATTERN)
    kind: Literal["classifier", "ocr"]
    path: Path | None = Field(None, description="the .onnx or .pt classifier (None for OCR)")
    intra_op_threads: int = Field(1, ge=1, le=64)
    onnx_cache_dir: Path | None = Field(None, description="where a .pt is exported to ONNX")


class BatchUserConfig(StrictModel):
    """`user_config` of a Classifier deployment (applied without restart)."""

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=1.0)


class ActionsSettings(StrictModel):
    """`args.actions`: where actions go. Without Redis or PostgreSQL they go to a local
    store under `data_dir` (the embedded default)."""

    redis_url: str | None = Field(None, max_length=2048, description="e.g. redis://host:6379/0")
    redis_url_env: str | None = Field(
        None, max_length=128, description="environment variable holding the Redis URL"
    )
    postgres_dsn: str | None = Field(None, max_length=2048, description="libpq conninfo / URL")
    postgres_dsn_env: str | None = Field(
        None, max_length=128, description="environment variable holding the DSN (secrets)"
    )
    postgres_schema: str = Field("public", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    create_tables: bool = Field(True, description="create missing tables and columns (text)")
    archive_connections: Literal["ignore", "use"] = Field(
        "ignore",
        description="an archive's redis/postgresql sections: ignored, or where its actions go",
    )
    outbox: Literal["auto", "postgres", "sqlite"] = Field(
        "auto", description="auto: PostgreSQL when configured, else SQLite under data_dir"
    )
    data_dir: Path = Field(Path("data/actions"), description="local store, SQLite outbox")
    max_attempts: int = Field(10, ge=1, le=1000, description="for entries a sink rejects")
    retention_s: float = Field(3600, ge=0, description="delivered entries kept for dedupe")
    connect_timeout_s: float = Field(2.0, gt=0, le=60)
    operation_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="longest wait for one outbox or sink operation: a connection that went "
        "silent (a partition, a dropped route) counts as down after it, not never",
    )
    outbox_failover_s: float = Field(
        5.0, ge=0, le=600, description="after a PostgreSQL outbox failure, spill this long"
    )

    def redis(self, environ: dict[str, str]) -> str | None:
        return self.redis_url or (environ.get(self.redis_url_env) if self.redis_url_env else None)

    def postgres(self, environ: dict[str, str]) -> str | None:
        if self.postgres_dsn:
            return self.postgres_dsn
        return environ.get(self.postgres_dsn_env) if self.postgres_dsn_env else None


def to_detections(rows: np.ndarray, names: dict[int, str]) -> list[dict[str, Any]]:
    """Detector rows (x1 y1 x2 y2 score class) as `Detection` dicts."""
    return [
        Detection(
            class_id=int(c),
            label=names.get(int(c), str(int(c))),
            confidence=float(s),
            box={"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)},
        ).model_dump()
        for x1, y1, x2, y2, s, c in rows.tolist()
    ]


def image_detections(rows: Any, names: dict[int, str], lb: Letterbox) -> list[dict[str, Any]]:
    """A letterboxed image's detector rows as detections in the image's own pixels."""
    out = np.array(rows, np.float32).reshape(-1, 6)  # replies are read-only views: a copy
    out[:, :4] = unletterbox_boxes(out[:, :4], lb)
    return to_detections(out, names)
