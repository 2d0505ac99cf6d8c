"""What the stream registry and camera actors run with (no Ray): `StreamSettings`
(`args.streams` in serve_config.yaml) and `StreamContext`, the app the actors serve.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from graph.common.schemas import StrictModel
from graph.pipeline.plan import PipelineRuntime
from graph.pipeline.runner import BranchSettings
from stream_actors.dispatch import DispatchSettings
from stream_actors.processor import ProcessingSettings
from stream_actors.reader import ReaderPolicy


class StreamSettings(StrictModel):
    """`args.streams` in serve_config.yaml: camera actors, readers and per-frame flow."""

    state_path: Path = Field(
        Path("data/streams.json"), description="persisted subscriptions (relative: base_dir)"
    )
    file_dirs: tuple[Path, ...] = Field(
        (Path("data"),),
        description="file cameras read only from these directories (relative: base_dir)",
    )
    streams_per_actor: int = Field(
        8,
        ge=1,
        le=256,
        description="streams packed per camera actor (8: measured against 4, more frames, "
        "the pipeline's records as good, less memory; README, 'Streams per actor')",
    )
    camera_actor_cpus: float = Field(
        0.0,
        ge=0,
        le=16,
        description="Ray CPUs reserved per camera actor: 0 so that the deployments' "
        "reservations never keep a camera from being placed (a budget, not a limit)",
    )
    reconcile_s: float = Field(2.0, gt=0, le=60, description="registry's repair interval")
    disconnect_grace_s: float = Field(
        30.0,
        ge=1,
        le=86_400,
        description="a WebSocket subscription ends this long after its last connection "
        "left (closed, or stopped renewing: a crashed ingress); `persistent` ones never",
    )
    max_streams: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="the seed's config.json limit: camera streams (distinct sources) open "
        "at once; a subscribe that would open one more is refused; None: no limit",
    )
    target_fps: float | None = Field(
        None,
        gt=0,
        le=120,
        description="the seed's name: frames processed/s of a subscription whose payload "
        "gives no targetFps; None: as many as the detector takes",
    )
    reconnect_interval_sec: float | None = Field(
        None,
        gt=0,
        le=60,
        description="the seed's name for reader.backoff_base_s (the first reconnect delay, "
        "doubled per failure up to reader.backoff_cap_s); None: reader.backoff_base_s",
    )
    max_retries: int = Field(
        -1,
        ge=-1,
        le=1_000_000,
        description="the seed's config.json limit: a stream gives up (state `failed`, no "
        "more attempts) once this many reconnects failed in a row, no frame between; a new "
        "subscribe on its URL starts it again; -1: never gives up",
    )
    reconnects_per_s: float = Field(5.0, gt=0, le=1000, description="cluster-wide cap")
    reconnect_burst: int = Field(10, ge=1, le=10_000)
    events_per_subscription: int = Field(512, ge=16, le=100_000)
    actions_backlog_bytes: int = Field(
        64 * 1024**2, ge=1024, description="unsent actions a camera actor holds, at most"
    )
    actions_send_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="one hand-over to the Actions deployment, at most"
    )
    branches: BranchSettings = BranchSettings()
    reader: ReaderPolicy = ReaderPolicy()
    processing: ProcessingSettings = ProcessingSettings()
    dispatch: DispatchSettings = DispatchSettings()

    @model_validator(mode="before")
    @classmethod
    def _seed_reconnect_interval(cls, data: Any) -> Any:
        """`reconnect_interval_sec` is `reader.backoff_base_s` under the seed's name:
        given, it sets it (both given and different: an error, not a silent choice)."""
        if not isinstance(data, dict) or data.get("reconnect_interval_sec") is None:
            return data
        interval = data["reconnect_interval_sec"]
        reader = data.get("reader") or {}
        if isinstance(reader, BaseModel):
            reader = reader.model_dump(exclude_unset=True)
        given = reader.get("backoff_base_s")
        if given is not None and given != interval:
            raise ValueError(
                f"reconnect_interval_sec ({interval}) and reader.backoff_base_s ({given}) "
                "name the same setting: give one"
            )
        return {**data, "reader": {**reader, "backoff_base_s": interval}}

    @model_validator(mode="after")
    def _check(self) -> StreamSettings:
        base, cap = self.reader.backoff_base_s, self.reader.backoff_cap_s
        if base > cap:
            raise ValueError(
                f"the first reconnect delay ({base} s: reconnect_interval_sec or "
                f"reader.backoff_base_s) exceeds reader.backoff_cap_s ({cap} s): raise the cap"
            )
        wait, timeout = self.dispatch.overloaded_wait_s, self.processing.detect_timeout_s
        if wait >= timeout:
            raise ValueError(
                f"dispatch.overloaded_wait_s ({wait} s) must be below "
                f"processing.detect_timeout_s ({timeout} s): no frame waits that long"
            )
        return self


@dataclass(frozen=True)
class StreamContext:
    """What the registry and camera actors know of the app that owns them."""

    app_name: str
    namespace: str  # the Ray namespace of the registry and camera actors
    default_model: str  # for subscriptions without modelId
    model_sizes: dict[str, int]  # model id → detector input size
    detector_names: dict[str, str]  # model id → Serve deployment name
    settings: StreamSettings
    pipelines: dict[str, PipelineRuntime] = field(default_factory=dict)  # by root model id
    # modelUrl pipelines (the catalog actor): how often camera actors say which they use;
    # None: off (a subscription's modelUrl is never fetched)
    url_touch_s: float | None = None


def context_revision(ctx: StreamContext) -> str:
    """A digest of what a camera actor runs with (models, pipeline versions, deployment
    names): the registry compares it to find actors that restarted with an old one."""
    pipelines = {
        m: (
            r.plan.pipeline_id,
            r.plan.version,
            sorted(r.classifier_names.items()),
            r.actions_name,
            sorted(r.sink_routes.items()),
        )
        for m, r in ctx.pipelines.items()
    }
    key = [sorted(ctx.model_sizes.items()), sorted(ctx.detector_names.items()), ctx.default_model]
    key.append(sorted(pipelines.items()))
    key.append(ctx.url_touch_s)
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]
