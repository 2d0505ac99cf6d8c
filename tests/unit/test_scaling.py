"""The detectors' autoscaling policy (graph/scaling.py), called the way Serve 2.60's
controller calls a custom policy: with Serve's own AutoscalingContext and config."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from graph.scaling import (
    FRAMES_IN_FLIGHT,
    FRAMES_WAITING,
    FRAMES_WAITING_SEQ,
    MAX_CALLERS,
    MAX_WAITING,
    WAITING_LINGER_S,
    WAITING_TTL_S,
    FramesInFlight,
    desired_replicas,
    frames_policy,
)


def _ctx(
    current: int,
    frames: dict[str, float] | None,
    requests: float = 0.0,
    waiting: dict[str, dict[str, float]] | None = None,
    seqs: dict[str, dict[str, float]] | None = None,
) -> Any:
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
    for caller, by_replica in (waiting or {}).items():
        assert metrics is not None
        metrics[FRAMES_WAITING + caller] = {replicas[n]: v for n, v in by_replica.items()}
    for caller, by_replica in (seqs or {}).items():
        assert metrics is not None
        metrics[FRAMES_WAITING_SEQ + caller] = {replicas[n]: v for n, v in by_replica.items()}
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


def test_frames_waiting_in_the_callers_count_once_per_caller() -> None:
    """16 cameras on 4 actors, 2 replicas: each actor has 2 single-frame calls in the
    replicas (8 frames) and 2 cameras waiting. Actor a's calls went to both replicas, so
    both report it; it counts once, by the replica that heard from it last (r2: its
    report 41 said 1 frame, r1's report 40 said 2). Load 8 + 1 + 2 + 1 + 2 = 14 frames
    for a target of 4 per replica."""
    waiting = {
        "a": {"r1": 2.0, "r2": 1.0},
        "b": {"r1": 2.0},
        "c": {"r2": 1.0},
        "d": {"r2": 2.0},
    }
    seqs = {"a": {"r1": 40.0, "r2": 41.0}, "b": {"r1": 7.0}, "c": {"r2": 3.0}, "d": {"r2": 9.0}}
    replicas, _ = frames_policy(_ctx(2, {"r1": 4.0, "r2": 4.0}, 8.0, waiting, seqs))
    assert replicas == pytest.approx(14 / 4)


def test_without_sequence_numbers_a_caller_counts_its_largest_report() -> None:
    waiting = {"a": {"r1": 2.0, "r2": 5.0}}
    replicas, _ = frames_policy(_ctx(2, {"r1": 0.0, "r2": 0.0}, 0.0, waiting))
    assert replicas == pytest.approx(5 / 4)


def test_a_replica_reports_its_callers_until_they_go_quiet_then_zero_then_nothing() -> None:
    now = [100.0]
    frames = FramesInFlight(clock=lambda: now[0])
    frames.note_waiting("actor-a", 3, 1)
    frames.note_waiting("actor-b", 1, 1)
    frames.note_waiting("actor-a", 5, 2)  # the latest report of a caller wins
    with frames.hold(2):
        assert frames.stats() == {
            FRAMES_IN_FLIGHT: 2.0,
            FRAMES_WAITING + "actor-a": 5.0,
            FRAMES_WAITING_SEQ + "actor-a": 2.0,
            FRAMES_WAITING + "actor-b": 1.0,
            FRAMES_WAITING_SEQ + "actor-b": 1.0,
        }
    now[0] += WAITING_TTL_S / 2
    frames.note_waiting("actor-b", 4, 2)
    # a has been silent for the TTL: it counts 0 (so Serve's look-back average decays
    # to 0 instead of carrying 5 forward) ...
    now[0] += WAITING_TTL_S / 2 + 0.1
    stats = frames.stats()
    assert stats[FRAMES_WAITING + "actor-a"] == 0.0 and stats[FRAMES_WAITING + "actor-b"] == 4.0
    # ... and after the linger it is no longer reported at all.
    now[0] += WAITING_LINGER_S
    assert FRAMES_WAITING + "actor-a" not in frames.stats()
    assert frames.stats()[FRAMES_WAITING + "actor-b"] == 0.0


@pytest.mark.parametrize(
    ("caller", "waiting", "seq"),
    [
        (None, 3, 1),
        ("", 3, 1),
        ("a b", 3, 1),
        ("x" * 65, 3, 1),
        ("ok", "3", 1),
        ("ok", 2.5, 1),
        ("ok", True, 1),
        ("ok", 3, "1"),
        ("ok", 3, None),
    ],
)
def test_malformed_waiting_reports_are_ignored(caller: Any, waiting: Any, seq: Any) -> None:
    frames = FramesInFlight()
    frames.note_waiting(caller, waiting, seq)
    assert frames.stats() == {FRAMES_IN_FLIGHT: 0.0}


def test_waiting_reports_are_bounded() -> None:
    frames = FramesInFlight()
    frames.note_waiting("huge", 10**9, 1)
    assert frames.stats()[FRAMES_WAITING + "huge"] == MAX_WAITING
    for i in range(MAX_CALLERS + 5):
        frames.note_waiting(f"c{i}", -4, -1)
    stats = frames.stats()
    assert len(stats) == 2 * MAX_CALLERS + 1  # the oldest callers went first ("huge" too)
    assert FRAMES_WAITING + "huge" not in stats and stats[FRAMES_WAITING + "c5"] == 0.0
    assert stats[FRAMES_WAITING_SEQ + "c5"] == 0.0


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


def test_a_call_is_told_the_frames_of_the_other_calls_only() -> None:
    """`others(mine)` is what a detector answer reports as the replica's backlog: the
    frames held besides the caller's own, while both calls are in."""
    frames = FramesInFlight()
    with frames.hold(2):
        assert frames.others(2) == 0  # alone
        with frames.hold(3):
            assert frames.others(3) == 2 and frames.others(2) == 3
        assert frames.others(2) == 0  # the other call left
    assert frames.value == 0 and frames.others(0) == 0
