"""Fair shares weighted by the frames/s each camera asks, max-min fair against what
the detectors answered lately (stream_actors/shares.py, `subscription_weight` in
stream_actors/admission.py), without Ray."""

from __future__ import annotations

import math
from typing import Any

import pytest

from graph.common.errors import InferenceError
from stream_actors.admission import DEFAULT_SOURCE_FPS, subscription_weight
from stream_actors.dispatch import DetectDispatcher, DispatchSettings
from stream_actors.shares import (
    FORGET_S,
    DetectedMeter,
    detected_rates,
    reported_demand,
    shares_to_send,
    target_budgets,
    water_level,
)
from tests.unit.dispatch_fakes import Recorder, make_request, shares_of, sync


def test_a_malformed_demand_report_counts_nothing() -> None:
    assert reported_demand({}) == {}
    assert reported_demand({"demand_fps": ["model/m"], "demand": None}) == {}
    fps = {"model/m": [12.5, -1, "2", True, math.nan, 3], "model/x": 4.0}
    assert reported_demand({"demand_fps": fps, "demand": {"model/m": 3}}) == {
        "model/m": [12.5, 3.0]
    }


def test_an_actor_without_frames_asked_counts_ten_per_live_subscription() -> None:
    """An actor of an older camgraph reports live subscriptions only: each counts as a
    10 fps camera (what every subscription weighed before), so its neighbours'
    weights stay comparable."""
    reply = {"demand": {"model/m": 3, "model/n": "2", "model/x": 10**9}}
    assert reported_demand(reply) == {"model/m": [DEFAULT_SOURCE_FPS] * 3}
    # a value past any camera's rate counts as the most a camera may ask
    assert reported_demand({"demand_fps": {"model/m": [1e308]}}) == {"model/m": [120.0]}


@pytest.mark.parametrize(
    ("target_fps", "source_fps", "weight"),
    [
        (None, None, 10.0),  # nothing known yet (just connected, a lossless replay)
        (None, 25.0, 25.0),  # as many as the detector takes: what the stream offers
        (2.0, 25.0, 2.0),  # a targetFps below the stream's rate
        (15.0, 1.0, 1.0),  # a 1 fps snapshot camera asks no more than 1
        (5.0, None, 5.0),
        (5.0, 0.0, 5.0),  # a rate of 0 is not known
        (None, 900.0, 120.0),  # capped as targetFps is
        (0.0001, 10.0, 0.001),  # a tiny targetFps still asks something
    ],
)
def test_a_subscription_weighs_the_frames_it_can_use(
    target_fps: float | None, source_fps: float | None, weight: float
) -> None:
    assert subscription_weight(target_fps, source_fps) == weight


SLOW_AND_FAST: dict[int, dict[str, Any]] = {
    0: {"model/m": [1.0] * 8},
    1: {"model/m": [10.0] * 8},
}


def test_shares_follow_the_frames_asked_not_the_cameras() -> None:
    """Eight 1 fps cameras on one actor and eight 10 fps ones on another, and no
    overload known: each actor's share follows the frames its cameras ask (a tenth
    for the slow one). Counted as cameras each would get half, and the slow actor's
    calls would idle while the other's cap holds."""
    shares = shares_of(SLOW_AND_FAST, 2, {"model/m": 3.0})
    assert shares == {0: {"model/m": 0.273}, 1: {"model/m": 2.727}}
    # modelUrl archives multiplexed on one deployment divide it by frames asked too
    totals = {"PipelineDetector/a": 30.0, "PipelineDetector/b": 10.0}
    budgets = target_budgets(totals, {"PipelineDetector": 2}, {}, 2.0)
    assert budgets == {"PipelineDetector/a": 3.0, "PipelineDetector/b": 1.0}


@pytest.mark.parametrize(
    ("asked", "capacity", "level"),
    [
        ([1.0] * 8 + [10.0] * 8, 26.0, 2.25),  # the 1 fps cameras keep theirs
        ([10.0] * 4, 20.0, 5.0),  # equal cameras: an equal part
        ([1.0, 4.0, 10.0], 9.0, 4.0),  # 1 + 4 + 4
        ([1.0, 4.0, 10.0], 15.0, None),  # no overload: everyone gets what it asks
        ([1.0, 4.0], None, None),  # capacity not measured yet
        ([2.0, 2.0], 0.0, None),  # nothing detected lately: in proportion
        ([2.0, 2.0], math.nan, None),
    ],
)
def test_the_water_level_divides_what_the_detectors_take(
    asked: list[float], capacity: float | None, level: float | None
) -> None:
    assert water_level(asked, capacity) == level


def test_under_overload_a_camera_that_asks_little_keeps_it() -> None:
    """The same site while the detectors take 26 frames/s of the 88 asked: max-min
    fair, the slow cameras keep 1 frame/s each (8 of the 26) and the fast ones divide
    the other 18 (2.25 each): the slow actor's share is 8/26 of the calls. In
    proportion to what they ask, the slow cameras would fall to 0.3 frames/s."""
    shares = shares_of(SLOW_AND_FAST, 2, {"model/m": 3.0}, {"model/m": 26.0})
    assert shares == {0: {"model/m": 0.923}, 1: {"model/m": 2.077}}
    # another target's capacity, or one above what is asked, keeps the proportion
    for capacity in ({"model/n": 5.0}, {"model/m": 100.0}):
        assert shares_of(SLOW_AND_FAST, 2, {"model/m": 3.0}, capacity)[0] == {"model/m": 0.273}
    replies = {
        0: {"demand": {"model/m": 8}, "demand_fps": {"model/m": [1.0] * 8}},
        1: {"demand": {"model/m": 8}, "demand_fps": {"model/m": [10.0] * 8}},
    }
    settings = DispatchSettings(calls_per_replica=1.5)
    sent = shares_to_send(replies, settings, {"det": 2}, {"m": "det"}, {"model/m": 26.0})
    assert sent == shares


def _reply(count: int, at: float | None = None, run: str = "r0", **extra: Any) -> dict[str, Any]:
    """A camera actor's `streams()` reply as the meter reads it: model/m's answered
    frames, its clock and run id, and what it asks."""
    reply: dict[str, Any] = {"detected": {"model/m": count}, "detected_run": run, **extra}
    if at is not None:
        reply["detected_at"] = at
    return reply


def test_the_detectors_rate_comes_from_the_actors_counts() -> None:
    """Frames/s answered per target, from each actor's cumulative counts two rounds
    apart, each timed by the actor's own clock (`detected_at`; the registry's where
    it gives none)."""
    first = {0: _reply(100, at=50.0), 1: _reply(50)}
    rates, before, incomplete = detected_rates({}, first, 10.0)
    assert rates is None and incomplete == {"model/m"}  # nothing to compare yet
    second = {
        0: {**_reply(140, at=54.0), "detected": {"model/m": 140, "model/n": 10}},  # 4 s
        1: {**_reply(60), "detected": {"model/m": 60, "model/x": -5}},  # the registry's 2 s
    }
    rates, before, incomplete = detected_rates(before, second, 12.0)
    assert rates == {"model/m": 15.0, "model/n": 2.5} and incomplete == set()


@pytest.mark.parametrize(
    ("later", "why"),
    [
        (_reply(160, at=52.0, run="r1"), "another run: restarted, whatever its counts"),
        (_reply(90, at=52.0), "counts went down: restarted"),
        (_reply(160, at=50.1), "too close in time to say anything"),
        ({"streams": {}, "demand": {"model/m": 1}}, "no counts"),
        (None, "did not answer this round"),
    ],
)
def test_an_actor_that_cannot_be_compared_leaves_its_targets_incomplete(
    later: dict[str, Any] | None, why: str
) -> None:
    """Actor 0 answered 100 frames at its 50 s; actor 1 keeps its 10 frames/s. When
    actor 0 cannot be compared, its frames are missing from this round's sum: model/m
    is incomplete (the meter keeps its rate before), and only actor 1 counts."""
    before = detected_rates({}, {0: _reply(100, at=50.0), 1: _reply(0, at=0.0)}, 10.0)[1]
    replies = {1: _reply(20, at=2.0)} | ({} if later is None else {0: later})
    rates, kept, incomplete = detected_rates(before, replies, 12.0)
    assert rates == {"model/m": 10.0} and incomplete == {"model/m"}, why
    assert 0 in kept  # compared against next round (an actor unseen is kept a while)
    # an actor unseen for FORGET_S is forgotten: its targets count as complete again
    _, kept, incomplete = detected_rates(before, {1: _reply(20, at=2.0)}, 10.0 + FORGET_S)
    assert 0 not in kept and incomplete == set()


def test_huge_or_malformed_counts_never_stop_the_shares() -> None:
    before = detected_rates({}, {0: _reply(100, at=0.0)}, 0.0)[1]
    bad = {0: {"detected": {"model/m": 10**400}, "detected_at": 10**400, "detected_run": "r0"}}
    rates, _, incomplete = detected_rates(before, bad, 2.0)
    assert rates is None and incomplete == {"model/m"}  # as if it had restarted


def test_the_meter_averages_rounds_and_keeps_what_it_cannot_measure() -> None:
    meter = DetectedMeter()
    assert meter.update({0: _reply(100, at=0.0)}, 0.0) is None
    assert meter.update({0: _reply(140, at=2.0)}, 2.0) == {"model/m": 20.0}
    # the next round's 40 frames/s count for half
    assert meter.update({0: _reply(220, at=4.0)}, 4.0) == {"model/m": 30.0}
    # a new actor's frames are missing from this round's sum: the value before stays
    both = {0: _reply(300, at=6.0), 1: _reply(7, demand_fps={"model/m": [10.0]})}
    assert meter.update(both, 6.0) == {"model/m": 30.0}
    # a round where no actor can be compared (all restarted) keeps it too
    restarted = {0: _reply(1, at=0.5, run="r1"), 1: _reply(1, at=0.5, run="r1")}
    assert meter.update(restarted, 8.0) == {"model/m": 30.0}


def test_no_frames_detected_lately_leaves_the_shares_in_proportion() -> None:
    """A cold or hung detector answers nothing for rounds: no water level (a capacity
    of 0 would give every camera nothing, and the shares no total to divide)."""
    assert shares_of(SLOW_AND_FAST, 2, {"model/m": 3.0}, {"model/m": 0.0}) == shares_of(
        SLOW_AND_FAST, 2, {"model/m": 3.0}
    )


def test_archives_sharing_a_deployment_share_one_water_level() -> None:
    """Two modelUrl archives on `PipelineDetector`: one subscription asking 120
    frames/s on one, eight at 10 on the other, while the deployment answered 40
    frames/s. Pooled, max-min gives each of the nine 40/9 frames/s, so the lone
    subscription's archive gets a ninth of the deployment's calls, not 120/200."""
    replies = {
        0: {"demand_fps": {"PipelineDetector/a": [120.0]}},
        1: {"demand_fps": {"PipelineDetector/b": [10.0] * 8}},
    }
    capacity = {"PipelineDetector/a": 15.0, "PipelineDetector/b": 25.0}
    settings = DispatchSettings(calls_per_replica=1.5)
    sent = shares_to_send(replies, settings, {"PipelineDetector": 2}, {}, capacity)
    assert sent == {0: {"PipelineDetector/a": 0.333}, 1: {"PipelineDetector/b": 2.667}}
    # without a measured rate for one of them: in proportion to what they ask
    sent = shares_to_send(replies, settings, {"PipelineDetector": 2}, {}, {"x/y": 1.0})
    assert sent == {0: {"PipelineDetector/a": 1.8}, 1: {"PipelineDetector/b": 1.2}}


@sync
async def test_only_answered_frames_count_as_detected() -> None:
    """The meter's capacity is what the detectors answered: frames of a failed call
    (a busy or dead replica) are not counted, those of a call that came back are."""
    detector = Recorder()
    dispatcher = DetectDispatcher(detector.send, DispatchSettings())
    assert await dispatcher.admit(lambda: make_request(1)) is not None
    assert (dispatcher.stats.frames, dispatcher.stats.answered) == (1, 1)
    detector.fail = InferenceError("replica gone")
    with pytest.raises(InferenceError):
        await dispatcher.admit(lambda: make_request(2))
    assert (dispatcher.stats.frames, dispatcher.stats.answered) == (2, 1)
