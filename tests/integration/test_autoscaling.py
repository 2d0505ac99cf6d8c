"""The detectors' autoscaling sees the frames that wait in the camera actors, not only
those that reach a replica: Serve's own controller runs the policy serve_config.yaml
names (`graph.scaling:frames_policy`) on what the replicas report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from deployments.detector import Detector
from graph.common.detection import DetectRequest
from tests.integration.apps import demo_model, deployed, wait_until

pytestmark = pytest.mark.integration
APP = "camgraph-autoscaling-test"
NAME = "Detector_autoscaling"


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[NAME]
    return int(deployment.replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def handle(cluster: dict[str, Any]) -> Iterator[Any]:
    from ray import serve

    detector = Detector.options(
        name=NAME,
        ray_actor_options={"num_cpus": 0.25},
        max_ongoing_requests=16,
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 4,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2.0,
            "upscale_delay_s": 1.0,
            "downscale_delay_s": 2.0,
            "policy": {"policy_function": "graph.scaling:frames_policy"},
        },
    )
    with deployed(APP, detector.bind(demo_model()), route_prefix="/autoscaling-test"):
        yield serve.get_app_handle(APP)


def test_replicas_follow_the_frames_waiting_in_the_callers(handle: Any) -> None:
    """One frame at a time reaches the replica (as a camera actor's live calls do),
    while the caller says 10 more wait behind it: about 11 frames of load for a
    target of 4 per replica, so 3 replicas. Without the report the replica holds at
    most one frame and 1 replica is enough. When the caller goes quiet, its report
    lapses and the deployment scales back down."""
    assert running_replicas() == 1
    frame = [DetectRequest(np.zeros((640, 640, 3), np.uint8))]
    deadline = time.monotonic() + 120
    while running_replicas() < 3:
        assert time.monotonic() < deadline, "no scale-up on the frames waiting in the caller"
        results = handle.detect_many.remote(frame, "camera-actor-a", 10).result(timeout_s=60)
        assert len(results) == 1 and not isinstance(results[0], Exception)
        assert results[0].backlog == 0  # one frame at a time: the replica held no other
    wait_until(lambda: running_replicas() == 1, 120, "the scale-down once the caller is quiet")
