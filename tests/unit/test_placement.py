"""What a camera actor's state in Ray means for /streams and the repair loop (no Ray)."""

from __future__ import annotations

import pytest

from stream_actors.placement import placement_problem
from stream_actors.settings import StreamSettings


@pytest.mark.parametrize("state", ["PENDING_CREATION", "DEPENDENCIES_UNREADY"])
def test_an_unplaced_actor_is_pending_for_lack_of_cpu_never_a_timeout(state: str) -> None:
    problem = placement_problem(state, 0.5)
    assert problem is not None
    assert problem.startswith("pending: not enough CPU")
    assert "0.5 CPU" in problem and "Timeout" not in problem


def test_restarting_and_dead_actors_are_named_and_alive_ones_are_not_a_problem() -> None:
    assert placement_problem("RESTARTING", 0).startswith("restarting")  # type: ignore[union-attr]
    assert placement_problem("DEAD", 0).startswith("dead")  # type: ignore[union-attr]
    assert placement_problem("ALIVE", 0) is None
    assert placement_problem(None, 0) is None  # unknown: the call's own error is reported


def test_camera_actors_reserve_no_cpu_by_default() -> None:
    # make run's deployments reserve the 2 CPUs it starts Ray with: a camera actor that
    # asked for any would stay pending (cameras 5-8 never started).
    assert StreamSettings().camera_actor_cpus == 0
