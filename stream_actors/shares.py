"""The fair shares of the cluster's detector calls across camera actors (pure: no Ray).

Every round the registry asks each camera actor for its *demand* (per detector target,
the frames/s each live subscription asks: `subscription_weight` in admission.py) and
its cumulative frames answered (`detected`), and gives it back its *share* of the target's
calls (`shares_to_send`): the cluster's calls per target (`target_budgets`: calls per
running replica) divided in proportion to what each actor's subscriptions should get,
max-min fair against the frames/s the detectors answered lately (`DetectedMeter`). See
dispatch.py for what a share does to a dispatcher.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from stream_actors.admission import DEFAULT_SOURCE_FPS, MAX_WEIGHT_FPS
from stream_actors.dispatch import MIN_SHARE, DispatchSettings

# actor index → target label → the frames/s each of its live subscriptions asks
Demand = Mapping[int, Mapping[str, Sequence[float]]]


def pooled(demand: Demand) -> dict[str, list[float]]:
    """The frames/s every live subscription asks, per target, over all actors."""
    asked: dict[str, list[float]] = {}
    for targets in demand.values():
        for target, values in targets.items():
            asked.setdefault(target, []).extend(values)
    return asked


def water_level(asked: Sequence[float], capacity: float | None) -> float | None:
    """Max-min fairness: the frames/s level L at which the subscriptions' min(asked, L)
    add up to `capacity` (frames/s the target's replicas detect), so that a camera that
    asks less than an equal part gets all it asks and the others divide the rest
    equally. None when `capacity` is not known or covers all that is asked (no
    overload: each gets what it asks), and when nothing was detected lately."""
    if capacity is None or not math.isfinite(capacity) or capacity <= 0:
        return None  # nothing measured (a cold or hung detector): in proportion
    if capacity >= sum(asked):
        return None
    left, ordered = capacity, sorted(asked)
    for index, value in enumerate(ordered):
        equal = left / (len(ordered) - index)  # an equal part of what is left
        if value >= equal:
            return equal
        left -= value
    return None  # not reached: the sum exceeds the capacity


def water_levels(
    asked: Mapping[str, Sequence[float]],
    capacity: Mapping[str, float],
    detector_names: Mapping[str, str],
) -> dict[str, float | None]:
    """Each target's water level (`water_level`) against the frames/s detected lately.
    Targets of one deployment (modelUrl archives multiplexed on `PipelineDetector`)
    share its replicas, so they share one level: their subscriptions pooled against
    their capacities summed (None unless each of them has one)."""
    groups: dict[str, list[str]] = {}
    for label in asked:
        groups.setdefault(deployment_of(label, detector_names) or label, []).append(label)
    levels: dict[str, float | None] = {}
    for labels in groups.values():
        pooled = [v for label in labels for v in asked[label]]
        known = all(label in capacity for label in labels)
        level = water_level(pooled, sum(capacity[t] for t in labels) if known else None)
        levels.update(dict.fromkeys(labels, level))
    return levels


def deployment_of(label: str, detector_names: Mapping[str, str]) -> str | None:
    """The deployment a target label's frames go to: "model/<model id>" through
    `detector_names`, "<deployment>/<archive sha256>" its own."""
    kind, _, name = label.partition("/")
    return detector_names.get(name) if kind == "model" else kind


def admission_shares(
    demand: Demand,
    calls_in_flight: int,
    budgets: Mapping[str, float] | None = None,
    levels: Mapping[str, float | None] | None = None,
) -> dict[int, dict[str, float]]:
    """Each actor's share of the cluster's detector calls, per target, in proportion to
    the frames/s its live subscriptions should get, wherever they were packed. Each
    asks its `subscription_weight` (targetFps, at most the stream's rate); where the
    target has a water level (`water_levels`: the detectors took fewer frames/s lately
    than all ask), each gets at most that level, max-min fair: a 1 fps camera keeps its
    frame a second and the 10 fps ones divide the rest, so no actor holds calls it
    cannot fill while another's cap holds. The calls of a target are its `budgets`
    entry (from the replicas that run it, see `target_budgets`) or, without one,
    `calls_in_flight` per actor that has live subscriptions of the target (what the
    actors had before shares): an actor of 4 cameras and one of 1, all at 10 fps, get
    3.2 and 0.8 of 4 calls instead of 2 and 2."""
    levels, budgets = levels or {}, budgets or {}
    actors: Counter[str] = Counter()  # actors with live subscriptions per target
    given: dict[int, dict[str, float]] = {}
    for index, targets in demand.items():
        given[index] = {
            target: _given(values, levels.get(target))
            for target, values in targets.items()
            if sum(values) > 0
        }
        actors.update(given[index].keys())  # one per actor, whatever its frames
    totals: dict[str, float] = {}
    for mine in given.values():
        for target, fps in mine.items():
            totals[target] = totals.get(target, 0.0) + fps
    calls = {t: budgets.get(t) or calls_in_flight * actors[t] for t in totals}
    return {
        index: {
            target: max(MIN_SHARE, round(calls[target] * fps / totals[target], 3))
            for target, fps in sorted(mine.items())
        }
        for index, mine in given.items()
    }


def _given(asked: Sequence[float], level: float | None) -> float:
    """The frames/s an actor's subscriptions should get, at the target's water level."""
    return sum(asked) if level is None else sum(min(v, level) for v in asked)


class Counted(NamedTuple):
    """An actor's cumulative answered frames as the registry last saw them."""

    run: Any  # the actor's run id: a restart begins its counts again
    at: float  # the actor's clock (`detected_at`)
    counts: dict[str, int]
    targets: frozenset[str]  # what it asked for or counted: incomplete while unseen
    seen_at: float  # the registry's clock


MIN_SPAN_S = 0.25  # counts closer in time than this say nothing of a rate
FORGET_S = 30.0  # an actor unseen this long is forgotten (its cameras went elsewhere)


def detected_rates(
    before: Mapping[int, Counted], replies: Mapping[int, Mapping[str, Any]], now: float
) -> tuple[dict[str, float] | None, dict[int, Counted], set[str]]:
    """The frames/s the detectors answered per target since the last round, from the
    actors' cumulative `detected` counts, each actor's timed by its own clock
    (`detected_at`; the registry's `now` where it gives none). `before`: what each
    actor reported last. Returns the rates (None when no actor could be compared),
    what to keep for the next round, and the targets whose rate is incomplete: an
    actor that asks for or counted them is new, restarted (another `detected_run`, or
    counts that went down), reports no counts, or did not answer this round (kept
    `FORGET_S`), so its frames are missing from the sum."""
    current = {i: c for i, c in before.items() if i not in replies and now - c.seen_at < FORGET_S}
    incomplete = {t for c in current.values() for t in c.targets}
    rates: dict[str, float] = {}
    compared = False
    for index, reply in replies.items():
        counts = _counts(reply.get("detected"))
        targets = frozenset(reported_demand(reply)) | frozenset(counts or ())
        if counts is None:
            incomplete |= targets
            if index in before:  # compared when it counts again
                current[index] = before[index]
            continue
        at = _clock(reply.get("detected_at"), now)
        seen = current[index] = Counted(reply.get("detected_run"), at, counts, targets, now)
        old = before.get(index)
        if (
            old is None
            or old.run != seen.run
            or at - old.at < MIN_SPAN_S
            or any(counts.get(t, 0) < n for t, n in old.counts.items())
        ):
            incomplete |= targets | (old.targets if old is not None else frozenset())
            continue
        compared = True
        for target, n in counts.items():
            rates[target] = rates.get(target, 0.0) + (n - old.counts.get(target, 0)) / (at - old.at)
    return (rates if compared else None), current, incomplete


def _counts(raw: Any) -> dict[str, int] | None:
    """An actor's `detected` counts (None: it reports none, or not as counts)."""
    if not isinstance(raw, Mapping):
        return None
    return {
        str(t): n
        for t, n in raw.items()
        if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**53
    }


def _number(raw: Any, limit: float = 1e12) -> float | None:
    """`raw` as a finite number of magnitude below `limit`, else None (an actor's reply
    is data: a bool, a string or a huge integer is not a number here)."""
    if not isinstance(raw, int | float) or isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except OverflowError:  # an integer past any float
        return None
    return value if math.isfinite(value) and abs(value) < limit else None


def _clock(raw: Any, default: float) -> float:
    """An actor's `detected_at` (a monotonic clock's seconds), else `default`."""
    value = _number(raw)
    return default if value is None else value


def target_budgets(
    totals: Mapping[str, float],
    running: Mapping[str, int],
    detector_names: Mapping[str, str],
    calls_per_replica: float | None,
) -> dict[str, float]:
    """The cluster's detector calls per target label: `calls_per_replica` × the running
    replicas of its deployment (`running`: deployment → replicas, as Serve says), so
    that the frames in flight follow the replicas that run them, not the camera actors
    that send them (with calls per actor, 16 cameras on 4 actors kept 8 calls, 4 frames
    per CPU replica, in flight: their wait, not the inference, was the latency).

    Targets of one deployment (modelUrl archives multiplexed on `PipelineDetector`)
    divide its calls by the frames/s their live subscriptions should get (`totals`). A
    deployment Serve names with no replica running yet (a redeploy, scale from zero)
    counts as one: fewer calls, not more, while it has the least room. A target whose
    deployment Serve does not name (no answer yet, `calls_per_replica` None) gets no
    budget: `calls_in_flight` per actor then. Labels: "model/<model id>" (its
    deployment from `detector_names`) or "<deployment>/<archive sha256>"."""
    if calls_per_replica is None:
        return {}
    by_deployment: dict[str, list[str]] = {}
    for label, live in totals.items():
        if live <= 0:
            continue
        deployment = deployment_of(label, detector_names)
        if deployment is not None and deployment in running:
            by_deployment.setdefault(deployment, []).append(label)
    budgets: dict[str, float] = {}
    for deployment, labels in by_deployment.items():
        calls = calls_per_replica * max(running[deployment], 1)
        live = sum(totals[label] for label in labels)
        for label in labels:
            budgets[label] = calls * totals[label] / live
    return budgets


class DetectedMeter:
    """The frames/s the detectors answered per target lately (the max-min levels'
    capacity), from the actors' cumulative counts round after round
    (`detected_rates`): each round's rate counts for half, the value before for the
    other half, so that one round's noise does not move every share. A target whose
    rate is incomplete this round, or a round where no actor could be compared, keeps
    the value before; none until two rounds compared."""

    def __init__(self) -> None:
        self._before: dict[int, Counted] = {}
        self.rates: dict[str, float] | None = None

    def update(
        self, replies: Mapping[int, Mapping[str, Any]], now: float
    ) -> dict[str, float] | None:
        rates, self._before, incomplete = detected_rates(self._before, replies, now)
        if rates is None:
            return self.rates
        old = self.rates or {}
        fresh = {t: r for t, r in rates.items() if t not in incomplete}
        kept = {t: old[t] for t in incomplete if t in old}
        self.rates = {t: r if t not in old else (old[t] + r) / 2 for t, r in fresh.items()}
        self.rates.update(kept)
        return self.rates


def reported_demand(reply: Mapping[str, Any]) -> dict[str, list[float]]:
    """The frames/s each of an actor's live subscriptions asks, per target, from its
    `streams()` reply: its `demand_fps`; from an actor of an older version, which
    reports only `demand` (live subscriptions per target), `DEFAULT_SOURCE_FPS` each;
    {} when it reports neither. Values that are not a finite number ≥ 0 are ignored, and
    none counts for more than `MAX_WEIGHT_FPS`."""

    raw = reply.get("demand_fps")
    if isinstance(raw, Mapping):
        return {
            str(target): [
                min(v, MAX_WEIGHT_FPS)
                for v in (_number(value, math.inf) for value in values)
                if v is not None and v >= 0
            ]
            for target, values in raw.items()
            if isinstance(values, list | tuple)
        }
    counts = reply.get("demand")
    if not isinstance(counts, Mapping):
        return {}
    return {
        str(target): [DEFAULT_SOURCE_FPS] * live
        for target, live in counts.items()
        if isinstance(live, int) and not isinstance(live, bool) and 0 <= live <= 100_000
    }


def reported_shares(raw: Any) -> dict[str, float] | None:
    """The shares an actor's `streams()` reply says it holds (None when absent or not a
    mapping of names to numbers: sent again)."""
    if not isinstance(raw, Mapping):
        return None
    try:
        return {str(t): float(v) for t, v in raw.items()}
    except (TypeError, ValueError):
        return None


def shares_to_send(
    replies: Mapping[int, Mapping[str, Any]],
    dispatch: DispatchSettings,
    running: Mapping[str, int] | None = None,
    detector_names: Mapping[str, str] | None = None,
    capacity: Mapping[str, float] | None = None,
) -> dict[int, dict[str, float]]:
    """The shares to send this round, from the `streams()` replies of the actors that
    answered it: only to those whose held shares differ (with `fair_share` off, those
    holding any are cleared). `running`: replicas per deployment (`target_budgets`);
    `capacity`: frames/s detected per target lately (`DetectedMeter`).

    An actor that did not answer keeps the share it holds, and the ones that answered
    divide the whole budget: until it answers again the calls in flight can exceed the
    budget by its share."""
    if dispatch.fair_share:
        names = detector_names or {}
        demand = {i: reported_demand(r) for i, r in replies.items()}
        asked = pooled(demand)
        levels = water_levels(asked, capacity or {}, names)
        totals = {t: _given(v, levels[t]) for t, v in asked.items()}
        budgets = target_budgets(totals, running or {}, names, dispatch.calls_per_replica)
        shares = admission_shares(demand, dispatch.calls_in_flight, budgets, levels)
    else:
        shares = {i: {} for i in replies}
    return {
        index: wanted
        for index, wanted in shares.items()
        if shares_differ(reported_shares(replies[index].get("admission_shares")), wanted)
    }


def shares_differ(
    held: Mapping[str, float] | None, wanted: Mapping[str, float], tolerance: float = 0.01
) -> bool:
    """Whether an actor's shares (as it reports them; None: it reports none, e.g. just
    restarted) must be sent again."""
    held = held or {}
    if set(held) != set(wanted):
        return True
    return any(abs(float(held[t]) - wanted[t]) > tolerance for t in wanted)
