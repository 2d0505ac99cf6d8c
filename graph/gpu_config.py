"""A GPU node's variant of a serve config (`camgraph gpu-config`; no Ray): the settings the
README's Configuration names for GPU detectors, applied to an operator's own file.

CPU defaults keep a detector's call to one live frame and its batches small, because a
CPU replica runs a batch's frames one after another. On a GPU a batch costs little more
than a frame, so the variant gives each detector replica a GPU share and larger batches
that wait a few milliseconds for partners, and lets each camera actor's calls carry
several cameras' frames and more calls run per replica, so that those batches fill.
The starting values are not measured on a GPU yet (README, Roadmap): tune them there.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field

from graph.common.schemas import StrictModel

DETECTOR_PREFIXES = ("Detector_", "PipelineDetector")


class GpuSettings(StrictModel):
    gpus_per_replica: float = Field(1.0, gt=0, le=8, description="Ray GPUs per detector replica")
    replicas: int = Field(1, ge=1, le=64, description="detector replicas per model")
    max_batch_size: int = Field(16, ge=1, le=32, description="frames per detector batch")
    batch_wait_timeout_s: float = Field(
        0.003, ge=0, le=0.1, description="how long a batch waits for partners"
    )
    frames_per_call: int = Field(
        8, ge=1, le=64, description="live frames a camera actor's call carries"
    )


def gpu_variant(config: dict[str, Any], settings: GpuSettings | None = None) -> dict[str, Any]:
    """`config` (a parsed serve config) with its detectors on GPUs; the input is not
    changed. Detector deployments are those named `Detector_<model>` or
    `PipelineDetector`; every application's `args.streams.dispatch` is set to match."""
    s = settings or GpuSettings()
    out = copy.deepcopy(config)
    calls_per_replica = max(2.0, s.max_batch_size / s.frames_per_call)
    for app in out.get("applications", []):
        dispatch = app.setdefault("args", {}).setdefault("streams", {}).setdefault("dispatch", {})
        dispatch["live_frames_per_call"] = s.frames_per_call
        dispatch["max_frames_per_call"] = max(s.frames_per_call, s.max_batch_size)
        dispatch["calls_per_replica"] = calls_per_replica
        for deployment in app.get("deployments", []):
            if not str(deployment.get("name", "")).startswith(DETECTOR_PREFIXES):
                continue
            options = deployment.setdefault("ray_actor_options", {})
            options["num_gpus"] = s.gpus_per_replica
            options["num_cpus"] = max(float(options.get("num_cpus", 1.0)), 1.0)  # host side
            user = deployment.setdefault("user_config", {})
            user["max_batch_size"] = s.max_batch_size
            user["batch_wait_timeout_s"] = s.batch_wait_timeout_s
            # Calls carry frames_per_call frames; a replica holds its batch's worth of them.
            deployment["max_ongoing_requests"] = max(
                int(deployment.get("max_ongoing_requests", 0)), 2 * s.max_batch_size
            )
            deployment["max_queued_requests"] = max(
                int(deployment.get("max_queued_requests", 0)), 4 * s.max_batch_size
            )
            scaling = deployment.get("autoscaling_config")
            if scaling is not None:
                for key in ("min_replicas", "initial_replicas", "max_replicas"):
                    scaling[key] = s.replicas
            else:
                deployment["num_replicas"] = s.replicas
    return out
