"""A GPU node's variant of a serve config (`camgraph gpu-config`; no Ray): the settings the
README's Configuration names for GPU detectors, applied to an operator's own file.

CPU defaults keep a detector's call to one live frame and its batches small, because a
CPU replica runs a batch's frames one after another. On a GPU a batch costs little more
than a frame, so the variant gives each detector replica a GPU share and larger batches
that wait a few milliseconds for partners, and lets each camera actor's calls carry
several cameras' frames and more calls run per replica, so that those batches fill.
The starting values are not measured on a GPU yet (README, Roadmap): tune them there.
Only camgraph's applications are changed, and in them only the detector deployments and
`args.streams.dispatch`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from graph.common.names import PIPELINE_DETECTOR, detector_name
from graph.common.schemas import StrictModel
from graph.config import AppConfig
from graph.pipeline.archive import ArchiveError, inspect_archive

CAMGRAPH_APPS = ("graph.app:build_app", "graph.app.build_app")


class GpuSettings(StrictModel):
    gpus_per_replica: float = Field(1.0, description="Ray GPUs per detector replica")
    replicas: int | None = Field(
        None, ge=1, le=64, description="detector replicas per model (unset: as configured)"
    )
    max_batch_size: int = Field(16, ge=1, le=32, description="frames per detector batch")
    batch_wait_timeout_s: float = Field(
        0.003, ge=0, le=0.1, description="how long a batch waits for partners"
    )
    frames_per_call: int = Field(
        8, ge=1, le=64, description="live frames a camera actor's call carries"
    )

    @field_validator("gpus_per_replica")
    @classmethod
    def _ray_gpu_share(cls, value: float) -> float:
        """What Ray accepts: a fraction from 0.0001 up to 1, or whole GPUs."""
        if not (0.0001 <= value <= 1 or (value > 1 and value == int(value) and value <= 8)):
            raise ValueError("a fraction from 0.0001 to 1, or a whole number up to 8")
        return value


def detector_deployments(
    config: AppConfig, inspect: Callable[[Path], str] | None = None
) -> tuple[list[str], list[str]]:
    """The detector deployments a camgraph application makes, and warnings for those
    that cannot be named here (a pipeline archive behind a URL, or unreadable).
    `inspect`: an archive's path → its root modelId (default: the archive's own check)."""
    names = [detector_name(m.id) for m in config.models]
    warnings: list[str] = []
    for ref in config.pipelines:
        if "://" in ref.archive:
            warnings.append(
                f"pipeline {ref.archive}: not read; add Detector_<its root modelId> "
                "under deployments and run this again"
            )
            continue
        path = config.absolute(Path(ref.archive))
        try:
            root = inspect(path) if inspect else _root_model_id(path, config)
        except ArchiveError as exc:
            warnings.append(f"pipeline {ref.archive}: cannot be read ({exc.problems[:1]})")
            continue
        names.append(detector_name(root))
    if config.url_pipelines.enabled:
        names.append(PIPELINE_DETECTOR)
    return names, warnings


def _root_model_id(path: Path, config: AppConfig) -> str:
    return inspect_archive(path, config.archive_limits).pipeline.modelId


def gpu_variant(
    config: dict[str, Any],
    settings: GpuSettings | None = None,
    inspect: Callable[[Path], str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """`config` (a parsed serve config) with its detectors on GPUs, and notes on what was
    skipped; the input is not changed. Applications other than camgraph's are left as
    they are. A detector the application makes without an entry under `deployments`
    gets one. ValueError: an application's args camgraph refuses, or no detector."""
    s = settings or GpuSettings()
    # A copy through JSON: YAML anchors shared with other deployments are not followed.
    out: dict[str, Any] = json.loads(json.dumps(config))
    notes: list[str] = []
    changed = 0
    for app in out.get("applications") or []:
        if not isinstance(app, dict) or app.get("import_path") not in CAMGRAPH_APPS:
            name = app.get("name") if isinstance(app, dict) else app
            notes.append(f"application {name!r}: not camgraph's, left as it is")
            continue
        args = app.get("args") or {}
        parsed = AppConfig.model_validate(args)
        names, warnings = detector_deployments(parsed, inspect)
        notes += warnings
        dispatch = args.setdefault("streams", {}).setdefault("dispatch", {})
        _dispatch(dispatch, s, parsed.streams.streams_per_actor)
        app["args"] = args
        deployments = app.get("deployments") or []
        listed = {d.get("name") for d in deployments}
        deployments += [{"name": n} for n in names if n not in listed]
        app["deployments"] = deployments
        for deployment in deployments:
            if deployment.get("name") in names:
                _on_gpu(deployment, s)
                changed += 1
                most = _most_replicas(deployment)
                notes.append(
                    f"{deployment['name']}: up to {most} replicas x {s.gpus_per_replica:g} "
                    f"GPU = {most * s.gpus_per_replica:g} GPUs (--replicas, "
                    "--gpus-per-replica); a replica that finds none stays pending"
                )
    if not changed:
        raise ValueError("no camgraph detector deployment to put on a GPU")
    return out, notes


def _dispatch(dispatch: dict[str, Any], s: GpuSettings, streams_per_actor: int) -> None:
    """A call carries at most one frame per subscription of its actor: with F frames a
    call, 2 × batch / F calls per replica keep the next batch filling while one runs."""
    frames = min(s.frames_per_call, streams_per_actor)
    dispatch["live_frames_per_call"] = frames
    dispatch["max_frames_per_call"] = max(
        int(dispatch.get("max_frames_per_call") or 0), frames, s.max_batch_size
    )
    if "calls_per_replica" not in dispatch or dispatch["calls_per_replica"] is not None:
        dispatch["calls_per_replica"] = max(2.0, math.ceil(2 * s.max_batch_size / frames))


def _most_replicas(deployment: dict[str, Any]) -> int:
    scaling = deployment.get("autoscaling_config")
    if isinstance(scaling, dict):
        return int(scaling.get("max_replicas") or 1)
    replicas = deployment.get("num_replicas")
    return replicas if isinstance(replicas, int) else 1


def _on_gpu(deployment: dict[str, Any], s: GpuSettings) -> None:
    options = deployment.get("ray_actor_options") or {}
    options["num_gpus"] = s.gpus_per_replica
    options["num_cpus"] = max(float(options.get("num_cpus") or 0), 1.0)  # host-side work
    deployment["ray_actor_options"] = options
    user = deployment.get("user_config") or {}
    user["max_batch_size"] = s.max_batch_size
    user["batch_wait_timeout_s"] = s.batch_wait_timeout_s
    deployment["user_config"] = user
    # Requests are calls (several frames each): two batches' worth of calls at least.
    deployment["max_ongoing_requests"] = max(
        int(deployment.get("max_ongoing_requests") or 0), 2 * s.max_batch_size
    )
    queued = deployment.get("max_queued_requests")
    if queued != -1:  # -1: unbounded, kept
        deployment["max_queued_requests"] = max(int(queued or 0), 4 * s.max_batch_size)
    scaling = deployment.get("autoscaling_config")
    if isinstance(scaling, dict):
        # The frames policy reads it as frames per replica: at least a batch on a GPU.
        scaling["target_ongoing_requests"] = max(
            float(scaling.get("target_ongoing_requests") or 0), float(s.max_batch_size)
        )
        if s.replicas is not None:
            for key in ("min_replicas", "initial_replicas", "max_replicas"):
                scaling[key] = s.replicas
    elif s.replicas is not None:
        deployment["num_replicas"] = s.replicas
