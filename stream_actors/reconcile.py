"""The stream registry's decisions, on plain data (pure: no Ray, no actor handles).

Streams are packed onto numbered camera actors, `streams_per_actor` each. Every round
the registry compares what each actor reports running with what it should run: it
stops what is no longer wanted, (re)sends what is missing or changed, and first gives
an actor that restarted with an old context today's. An actor Ray has not placed is
skipped with its problem, one that fails is named in the round's error, and neither
holds up the others. Between rounds it ends the WebSocket subscriptions whose
connections have left (`LeaseBook`), and it refuses a subscription that would open more
than `streams.max_streams` streams (`adds_stream_over_limit`). `registry.py` does the
calls; this module decides them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from graph.common.schemas import StrictModel
from stream_actors.placement import PlacementVerdict

# actor index → stream key → the sorted ids of the subscriptions on that stream
Desired = dict[int, dict[str, list[str]]]

# What /streams shows of each camera actor's status.
ACTOR_FIELDS = (
    "pid",
    "cpu_times_s",
    "rss_bytes",
    "threads",
    "error",
    "actions",
    "events",
    "dispatch",
    "branch_passes_pending",
    "branch_timeouts",
    "overloaded",
    "detector_overloaded",
)


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


# --- Connection leases: WebSocket subscriptions end when their connections have left ---


class Hold(StrictModel):
    """One WebSocket connection's hold on a subscription, on the registry's clock."""

    expires_at: float = Field(description="registry clock (monotonic s) when the hold ends")
    released: bool = Field(False, description="the connection closed: its grace runs")
    extended_s: float = Field(0.0, description="added for the registry's stalls, one grace at most")


# subscription id → connection id → its hold; a subscription absent is persistent
Holds = dict[str, dict[str, Hold]]


def iso_utc(epoch_s: float) -> str:
    """`epoch_s` as ISO 8601 in UTC, to the second ("2026-12-03T07:30:00Z")."""
    return datetime.fromtimestamp(round(epoch_s), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LeaseBook:
    """Which WebSocket connections hold which subscriptions, and until when (pure: every
    call takes the time). A subscription with no lease here is persistent (made over REST,
    or with `"persistent": true`) and ends only by an unsubscribe; one with a lease ends
    once every connection holding it is gone: a connection's hold lasts `grace_s` past
    its last renewal, or past its release (the connection closed), so a client that
    reconnects and subscribes again within the grace takes the subscription over and its
    stream never stops. Held subscriptions are persisted with the desired state; the
    clock does not survive a registry restart, so `restored` gives each a full grace."""

    def __init__(self, grace_s: float, holds: Holds | None = None) -> None:
        self.grace_s = grace_s
        self.holds: Holds = {s: dict(h) for s, h in (holds or {}).items() if h}

    @classmethod
    def restored(
        cls, grace_s: float, saved: Holds, subscriptions: Collection[str], now: float
    ) -> LeaseBook:
        """The book after a registry restart: the saved holds of the subscriptions that
        still exist, each for a full grace from `now` (the saved times were on the clock
        of the process that died)."""
        fresh = {
            sub_id: {
                owner: hold.model_copy(update={"expires_at": now + grace_s, "extended_s": 0.0})
                for owner, hold in held.items()
            }
            for sub_id, held in saved.items()
            if sub_id in subscriptions
        }
        return cls(grace_s, fresh)

    def subscribed(
        self, sub_id: str, owner: str | None, persistent: bool, known: bool, now: float
    ) -> bool:
        """A subscribe of `sub_id` by connection `owner` (None: over REST) with its
        payload's `persistent`; `known`: the subscription existed before. Returns whether
        it is held (False: persistent). Persistence sticks: a subscribe without it on a
        persistent subscription follows it without ending it at disconnect."""
        if owner is None or persistent or (known and sub_id not in self.holds):
            self.holds.pop(sub_id, None)
            return False
        self.holds.setdefault(sub_id, {})[owner] = Hold(expires_at=now + self.grace_s)
        return True

    def removed(self, sub_id: str) -> None:
        """The subscription was unsubscribed (or ended)."""
        self.holds.pop(sub_id, None)

    def renew(self, owner: str, now: float) -> int:
        """A live connection renews its holds for a grace from `now`; how many it holds.
        A released hold stays released: a renewal still on its way when the connection
        closed must not undo the release."""
        held = [h for h in self.holds.values() if owner in h and not h[owner].released]
        for h in held:
            h[owner] = Hold(expires_at=now + self.grace_s)
        return len(held)

    def extend(self, by_s: float) -> None:
        """Every hold lasts `by_s` longer: the registry could not run for that long (a
        starved process), so renewals and re-subscribes sent meanwhile are still queued
        and must not find their subscriptions ended. A grace counts only time in which
        the registry could hear them; a hold gains one grace at most this way, so even a
        registry that is always late ends the subscriptions of connections gone."""
        for held in self.holds.values():
            for owner, hold in held.items():
                add = min(by_s, self.grace_s - hold.extended_s)
                if add > 0:
                    held[owner] = hold.model_copy(
                        update={
                            "expires_at": hold.expires_at + add,
                            "extended_s": hold.extended_s + add,
                        }
                    )

    def release(self, owner: str, now: float) -> int:
        """A connection closed: its holds end one grace from `now`; how many it held."""
        return self._set(owner, Hold(expires_at=now + self.grace_s, released=True))

    def _set(self, owner: str, hold: Hold) -> int:
        held = [h for h in self.holds.values() if owner in h]
        for h in held:
            h[owner] = hold
        return len(held)

    def expire(self, now: float) -> list[str]:
        """Drops the holds that ended by `now`; returns the subscriptions no connection
        holds any more (sorted), forgotten here: the registry removes them."""
        ended = []
        for sub_id, held in list(self.holds.items()):
            for owner in [o for o, h in held.items() if h.expires_at <= now]:
                del held[owner]
            if not held:
                del self.holds[sub_id]
                ended.append(sub_id)
        return sorted(ended)

    def describe(self, sub_id: str, now: float, wall_now: float) -> dict[str, Any]:
        """What `GET /streams` shows of a subscription's owner: `persistent`, or
        `connection` with how many hold it and, once all have left, when it ends
        (`ends_at`, UTC, from `wall_now`, the wall clock at `now`)."""
        held = self.holds.get(sub_id)
        if not held:
            return {"owner": "persistent"}
        entry: dict[str, Any] = {"owner": "connection", "connections": len(held)}
        if all(h.released for h in held.values()):
            left_s = max(0.0, max(h.expires_at for h in held.values()) - now)
            entry["ends_in_s"] = round(left_s, 1)
            entry["ends_at"] = iso_utc(wall_now + left_s)
        return entry


def adds_stream_over_limit(
    streams: Mapping[str, str], sub_id: str, key: str, max_streams: int | None
) -> bool:
    """Whether subscription `sub_id` on stream `key` must be refused: it would open a
    stream beyond `max_streams` (`streams`: subscription id → its stream key now). A
    subscription on a stream that already runs, or one that only moves to another stream,
    opens nothing more and is always accepted (also over a limit lowered since)."""
    if max_streams is None:
        return False
    before = len(set(streams.values()))
    after = len(set({**streams, sub_id: key}.values()))
    return after > before and after > max_streams


def actor_payload(sub: BaseModel, default_fps: float | None) -> dict[str, Any]:
    """A subscription as its camera actor gets it: without what only the registry reads
    (`persistent`), with `streams.target_fps` where the payload asks for no fps."""
    data: dict[str, Any] = sub.model_dump(mode="json", exclude={"persistent"})
    if data.get("targetFps") is None and default_fps is not None:
        data["targetFps"] = default_fps
    return data


def stale_session_streams(
    wanted: Mapping[str, Sequence[str]],
    display_of: Mapping[str, str],
    expected: Mapping[str, str | None],
    reported: Mapping[str, str | None] | None,
) -> list[str]:
    """The streams to push again because their camera actor holds another session for
    one of their displays than the registry (a change it missed, an eviction, a
    restart): `wanted` stream key → subscription ids, `display_of` subscription id →
    display, `expected` / `reported` display → session digest (None: no session). An
    actor that reports no sessions (an older camgraph) is left alone."""
    if reported is None:
        return []
    return [
        key
        for key, subs in wanted.items()
        if any(reported.get(display_of[s]) != expected.get(display_of[s]) for s in subs)
    ]


class StallMeter:
    """How long a loop could not run: called every `probe_s` (a watcher) and before
    anything is judged by elapsed time (expiry), whichever comes first after a stall
    credits it, exactly once. A registry starved of CPU extends its holds by it."""

    def __init__(self, probe_s: float, tolerance_s: float, now: float) -> None:
        self.probe_s, self.tolerance_s = probe_s, tolerance_s
        self.heard_at = now  # when the loop was last seen running
        self.total_s = 0.0

    def credit(self, now: float) -> float:
        """The stall that ended by `now` (0 when the loop ran on time)."""
        late = now - self.heard_at - self.probe_s
        self.heard_at = now
        if late <= self.tolerance_s:
            return 0.0
        self.total_s += late
        return late
