"""The stream registry's decisions, on plain data (pure: no Ray, no actor handles).

Streams are packed onto numbered camera actors, `streams_per_actor` each. Every round
the registry compares what each actor reports running with what it should run: it
stops what is no longer wanted, (re)sends what is missing or changed, and first gives
an actor that restarted with an old context today's. An actor Ray has not placed is
skipped with its problem, one that fails is named in the round's error, and neither
holds up the others. `registry.py` does the calls; this module decides them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stream_actors.placement import PlacementVerdict

# actor index → stream key → the sorted ids of the subscriptions on that stream
Desired = dict[int, dict[str, list[str]]]

# What /streams shows of each camera actor's status.
ACTOR_FIELDS = ("pid", "cpu_times_s", "rss_bytes", "threads", "error", "actions", "events")


def first_free_actor(placement: Mapping[str, int], streams_per_actor: int) -> int:
    """The lowest-numbered actor with room for one more stream (first fit): a new
    stream fills a slot that a removed one freed before it opens another actor."""
    load: dict[int, int] = {}
    for index in placement.values():
        load[index] = load.get(index, 0) + 1
    index = 0
    while load.get(index, 0) >= streams_per_actor:
        index += 1
    return index


def desired_by_actor(
    placement: Mapping[str, int], subscribers: Mapping[str, Sequence[str]]
) -> Desired:
    """What each actor should run: its streams (`placement`: stream key → actor), each
    with its subscription ids (`subscribers`: stream key → ids)."""
    desired: Desired = {}
    for key, index in placement.items():
        desired.setdefault(index, {})[key] = sorted(subscribers.get(key, ()))
    return desired


@dataclass(frozen=True)
class RoundPlan:
    """Which actors one repair round calls, in order, and which it skips."""

    visit: tuple[int, ...]
    skipped: dict[int, str]  # actor → why it is not called (Ray has not placed it)


def plan_round(
    desired: Desired, known: Collection[int], unplaced: Mapping[int, PlacementVerdict]
) -> RoundPlan:
    """Every actor with streams to run (one without a handle, e.g. a dead one that was
    forgotten, is created by calling it) and every actor the registry holds a handle to
    (to stop what it no longer should run); `unplaced`: Ray's verdict, read again now, on
    those Ray had not placed. One still not placed is skipped: a call would only time
    out."""
    order = sorted(set(desired) | set(known))
    skipped = {i: v.problem for i, v in unplaced.items() if v.problem is not None and i in order}
    return RoundPlan(tuple(i for i in order if i not in skipped), skipped)


@dataclass(frozen=True)
class ActorPlan:
    """What to do on one actor, from what it reports running."""

    update_context: bool  # it runs an old context (restarted): give it today's first
    stop: tuple[str, ...]  # streams it runs that are not wanted there
    push: tuple[str, ...]  # wanted streams it lacks or runs with other subscriptions


def plan_actor(
    wanted: Mapping[str, Sequence[str]], reply: Mapping[str, Any], revision: str
) -> ActorPlan:
    """The difference between `wanted` (stream key → subscription ids) and an actor's
    `streams()` reply ({"streams": key → ids, "context": revision}); `revision`: the
    context it should run."""
    # An actor of an older camgraph replies with its streams alone (no context).
    running: Mapping[str, Any] = reply.get("streams", reply)
    return ActorPlan(
        update_context=reply.get("context") != revision,
        stop=tuple(sorted(set(running) - set(wanted))),
        push=tuple(key for key, subs in wanted.items() if running.get(key) != list(subs)),
    )


def failure_text(problem: str | None, exc: BaseException) -> str:
    """Why a call to an actor failed: Ray's placement problem when it has one (pending,
    dead...), else the call's own error."""
    return problem or f"{type(exc).__name__}: {exc}"


def round_error(errors: Mapping[int, str]) -> str | None:
    """One line naming every actor a round could not bring to the wanted state."""
    return "; ".join(f"actor {i}: {e}" for i, e in sorted(errors.items())) or None


def unreachable_status(problem: str | None, exc: BaseException | None = None) -> dict[str, Any]:
    """The status of an actor that could not be asked for it: with Ray's placement
    problem its streams show as pending, else (the call failed) as starting."""
    if problem is not None:
        return {"error": problem, "unplaced": True, "streams": {}}
    return {"error": f"{type(exc).__name__}: {exc}", "streams": {}}


def stream_state(key: str, actor_status: Mapping[str, Any]) -> dict[str, Any]:
    """A stream's figures in /streams from its actor's status; when the actor does not
    run it (yet), its state with the actor's error."""
    running = actor_status.get("streams", {}).get(key)
    if running is None:
        state = "pending" if actor_status.get("unplaced") else "starting"
        return {"state": state, "last_error": actor_status.get("error")}
    return {k: v for k, v in running.items() if k != "spec"}


def actor_summary(status: Mapping[str, Any]) -> dict[str, Any]:
    """What /streams shows of one camera actor."""
    return {k: status.get(k) for k in ACTOR_FIELDS}
