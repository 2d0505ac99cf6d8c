"""What the stream registry and camera actors run with (no Ray): `StreamSettings`
(`args.streams` in serve_config.yaml) and `StreamContext`, the app the actors serve.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from graph.common.schemas import StrictModel
from graph.pipeline.plan import PipelineRuntime
from graph.pipeline.runner import BranchSettings
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
    streams_per_actor: int = Field(4, ge=1, le=256, description="streams packed per actor")
    camera_actor_cpus: float = Field(
        0.0,
        ge=0,
        le=16,
        description="Ray CPUs reserved per camera actor: 0 so that the deployments' "
        "reservations never keep a camera from being placed (a budget, not a limit)",
    )
    reconcile_s: float = Field(2.0, gt=0, le=60, description="registry's repair interval")
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


def context_revision(ctx: StreamContext) -> str:
    """A digest of what a camera actor runs with (models, pipeline versions, deployment
    names): the registry compares it to find actors that restarted with an old one."""
    pipelines = {
        m: (r.plan.pipeline_id, r.plan.version, sorted(r.classifier_names.items()), r.actions_name)
        for m, r in ctx.pipelines.items()
    }
    key = [sorted(ctx.model_sizes.items()), sorted(ctx.detector_names.items()), ctx.default_model]
    key.append(sorted(pipelines.items()))
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]
