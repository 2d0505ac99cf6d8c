"""Where camera actors stand in Ray's placement (pure: no Ray import).

Ray leaves an actor whose resources fit no node pending for ever, with no error; calls
to it only time out. The registry asks Ray for the actor's state when a call fails and
reports what it means, so `/streams` and `/health` say "pending: not enough CPU"
instead of a timeout, and the repair loop skips it instead of waiting on it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Ray's ActorTableData states (gcs.proto) that mean "not placed yet".
PENDING_STATES = frozenset({"DEPENDENCIES_UNREADY", "PENDING_CREATION"})


def placement_problem(ray_state: str | None, num_cpus: float) -> str | None:
    """Why an actor cannot answer, from Ray's state of it; None when it is (or may be)
    alive and a failed call was something else."""
    if ray_state in PENDING_STATES:
        if num_cpus > 0:
            return (
                f"pending: not enough CPU (a camera actor asks Ray for {num_cpus:g} CPU and "
                "no node has it free; lower streams.camera_actor_cpus or add a node; "
                "`ray status`)"
            )
        return "pending: Ray has not placed the camera actor (memory? no node? `ray status`)"
    if ray_state == "RESTARTING":
        return "restarting: Ray is restarting the camera actor"
    if ray_state == "DEAD":
        return "dead: the camera actor died and Ray will not restart it"
    return None


@dataclass(frozen=True)
class PlacementVerdict:
    """What Ray's state of a camera actor means for the registry."""

    problem: str | None  # why it cannot answer; None: alive, or Ray's state is unknown
    unplaced: bool  # not placed yet: calls to it are skipped until Ray places it
    dead: bool  # Ray will not restart it: its handle is dropped, a new actor is made


def placement_verdict(ray_state: str | None, num_cpus: float) -> PlacementVerdict:
    """The registry's reading of Ray's state of an actor (`placement_problem` and what
    the registry does about it)."""
    return PlacementVerdict(
        problem=placement_problem(ray_state, num_cpus),
        unplaced=ray_state in PENDING_STATES,
        dead=ray_state == "DEAD",
    )
