"""The detectors' autoscaling policy (graph/scaling.py), called the way Serve 2.60's
controller calls a custom policy: with Serve's own AutoscalingContext and config."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from graph.scaling import FRAMES_IN_FLIGHT, FramesInFlight, desired_replicas, frames_policy


def _ctx(current: int, frames: dict[str, float] | None, requests: float = 0.0) -> Any:
    config = AutoscalingConfig(
        min_replicas=1,
        max_replicas=8,
        target_ongoing_requests=4,
        policy={"policy_function": "graph.scaling:frames_policy"},
    )
    dep = DeploymentID(name="Detector_x", app_name="camgraph")
    replicas = {name: ReplicaID(unique_id=name, deployment_id=dep) for name in frames or {}}
    metrics = (
        None if frames is None else {FRAMES_IN_FLIGHT: {replicas[n]: v for n, v in frames.items()}}
    )
    return AutoscalingContext(
        deployment_id=dep,
        deployment_name="Detector_x",
        app_name="camgraph",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=list(replicas.values()),
        total_num_requests=requests,
        total_queued_requests=0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def test_frames_not_requests_decide() -> None:
    """Two replicas each hold one request of 8 frames: 2 requests (under the target of
    4 per replica) but 16 frames, so 4 replicas are wanted."""
    replicas, _ = frames_policy(_ctx(2, {"a": 8.0, "b": 8.0}, requests=2.0))
    assert replicas == pytest.approx(4.0)


def test_idle_replicas_scale_down() -> None:
    replicas, _ = frames_policy(_ctx(4, {"a": 0.5, "b": 0.5, "c": 0.0, "d": 0.0}, 1.0))
    assert replicas == pytest.approx(0.25)


def test_without_reports_it_falls_back_to_serves_request_count() -> None:
    replicas, _ = frames_policy(_ctx(2, None, requests=12.0))
    assert replicas == pytest.approx(3.0)


def test_cold_start_keeps_serves_target() -> None:
    replicas, _ = frames_policy(_ctx(0, None, requests=5.0))
    assert replicas == 0


def test_serve_resolves_the_policy_by_its_import_path() -> None:
    """The path in serve_config.yaml resolves to this function in Serve's own loader."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    config = AutoscalingConfig(policy={"policy_function": "graph.scaling:frames_policy"})
    resolved = _resolve_policy_callable(config.policy)  # a cloudpickled copy
    assert (resolved.__module__, resolved.__name__) == ("graph.scaling", "frames_policy")
    assert resolved(_ctx(2, {"a": 8.0, "b": 8.0}))[0] == pytest.approx(4.0)


def test_desired_replicas_guards() -> None:
    assert desired_replicas(0, 4, {"a": 9.0}, 0) == 0
    assert desired_replicas(3, 0, {"a": 9.0}, 0) == 3


def test_frames_in_flight_counts_what_is_held() -> None:
    frames = FramesInFlight()
    with frames.hold(3):
        assert frames.stats() == {FRAMES_IN_FLIGHT: 3.0}
        with pytest.raises(RuntimeError), frames.hold(2):
            raise RuntimeError("engine failed")
        assert frames.value == 3
    assert frames.value == 0


def test_per_frame_keeps_each_frames_error_in_its_place() -> None:
    from graph.common.detection import per_frame
    from graph.common.errors import InferenceError

    out = per_frame(["r1", KeyError("gone"), "r3"])
    assert out[0] == "r1" and out[2] == "r3"
    assert isinstance(out[1], InferenceError) and "KeyError" in str(out[1])
    with pytest.raises(asyncio.CancelledError):
        per_frame(["r1", asyncio.CancelledError()])
