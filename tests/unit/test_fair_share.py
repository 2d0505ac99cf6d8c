"""Fair share of the detector calls across camera actors (stream_actors/shares.py's
`admission_shares`, the dispatcher's fractional `set_share`, the replica counts the
registry asks Serve for), without Ray. Several actors through shared replicas:
test_shared_replicas.py."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from graph.common.detection import DetectRequest, DetectResult, with_backlog
from graph.common.errors import InferenceError
from stream_actors.admission import TargetAdmission
from stream_actors.branch_clock import BranchClock
from stream_actors.dispatch import (
    DetectDispatcher,
    DispatchSettings,
    SendFn,
    target_label,
)
from stream_actors.serve_calls import ReplicaCounts, running_counts
from stream_actors.shares import (
    reported_shares,
    shares_differ,
    shares_to_send,
    target_budgets,
)
from tests.unit.dispatch_fakes import shares_of

# ---- the registry's arithmetic --------------------------------------------------------


def test_an_actor_of_four_cameras_and_one_of_one_get_calls_per_camera() -> None:
    shares = shares_of({0: {"model/m": 4}, 1: {"model/m": 1}}, calls_in_flight=2)
    assert shares == {0: {"model/m": 3.2}, 1: {"model/m": 0.8}}
    # the total is what the two actors had before: 2 calls each
    assert sum(s["model/m"] for s in shares.values()) == pytest.approx(4.0)


def test_full_actors_keep_calls_in_flight() -> None:
    """Packed actors of equal load see no change: 4 actors × 4 cameras, 2 calls each,
    and a single camera alone keeps both calls (it may use the whole cluster)."""
    demand = {i: {"model/m": 4} for i in range(4)}
    assert shares_of(demand, 2) == {i: {"model/m": 2.0} for i in range(4)}
    assert shares_of({0: {"model/m": 1}}, 2) == {0: {"model/m": 2.0}}


def test_shares_are_per_target_and_skip_actors_without_live_cameras() -> None:
    """Each detector's calls are divided among its own subscriptions only; an actor
    whose cameras are all down gets no share (its dispatchers keep their own
    calls_in_flight, and it sends nothing anyway)."""
    demand = {
        0: {"model/a": 3, "model/b": 1},
        1: {"model/a": 1},
        2: {"model/b": 0},
    }
    shares = shares_of(demand, calls_in_flight=2)
    assert shares[0] == {"model/a": 3.0, "model/b": 2.0}
    assert shares[1] == {"model/a": 1.0}
    assert shares[2] == {}
    assert shares_of({}, 2) == {}


def test_the_calls_follow_the_replicas_not_the_actors() -> None:
    """With calls per replica, 16 cameras on 4 actors share 2 × 2 replicas' calls (1
    each), not 2 per actor (8 calls: 4 frames waiting per CPU replica); 9 cameras
    (4 + 4 + 1) get 4 calls in proportion."""
    budgets = {"model/m": 4.0}
    sixteen = {i: {"model/m": 4} for i in range(4)}
    assert shares_of(sixteen, 2, budgets) == {i: {"model/m": 1.0} for i in range(4)}
    nine = shares_of({0: {"model/m": 4}, 1: {"model/m": 4}, 2: {"model/m": 1}}, 2, budgets)
    assert nine == {0: {"model/m": 1.778}, 1: {"model/m": 1.778}, 2: {"model/m": 0.444}}
    # a target without a budget keeps calls_in_flight per actor
    both = shares_of({0: {"model/m": 4, "model/n": 4}, 1: {"model/n": 4}}, 2, budgets)
    assert both == {0: {"model/m": 4.0, "model/n": 2.0}, 1: {"model/n": 2.0}}


def test_budgets_are_calls_per_replica_of_each_targets_deployment() -> None:
    names = {"m": "detector", "n": "detector_n"}
    running = {"detector": 2, "detector_n": 0, "PipelineDetector": 3, "Ingress": 1}
    totals = Counter(
        {
            "model/m": 5,
            "model/n": 2,
            "PipelineDetector/ab12": 3,  # two archives multiplexed on one deployment
            "PipelineDetector/cd34": 1,
            "model/unknown": 1,
            "gone/ef56": 1,
        }
    )
    assert target_budgets(totals, running, names, 2.0) == {
        "model/m": 4.0,
        "model/n": 2.0,  # no replica running yet (a redeploy): as one, not calls per actor
        "PipelineDetector/ab12": 4.5,  # the deployment's 6 calls, by live subscriptions
        "PipelineDetector/cd34": 1.5,
    }  # an unknown model or deployment: calls per actor
    assert target_budgets(totals, running, names, None) == {}
    assert target_budgets(totals, {}, names, 2.0) == {}  # Serve did not answer yet


def test_the_registry_sends_shares_of_the_replicas_calls() -> None:
    replies = {
        0: {"demand": {"model/m": 4}, "admission_shares": {"model/m": 2.0}},
        1: {"demand": {"model/m": 4}, "admission_shares": {"model/m": 2.0}},
        2: {"demand": {"model/m": 4}, "admission_shares": {"model/m": 1.0}},
    }
    per_replica = DispatchSettings(calls_per_replica=1.0)
    assert shares_to_send(replies, per_replica, {"det": 3}, {"m": "det"}) == {
        0: {"model/m": 1.0},
        1: {"model/m": 1.0},
    }  # actor 2 holds its share already
    # Serve not heard from, or calls per replica off: calls_in_flight (2) per actor
    assert shares_to_send(replies, per_replica, {}, {"m": "det"}) == {2: {"model/m": 2.0}}
    per_actor = DispatchSettings(calls_per_replica=None)
    assert shares_to_send(replies, per_actor, {"det": 3}, {"m": "det"}) == {2: {"model/m": 2.0}}


@pytest.mark.parametrize(
    ("held", "wanted", "differ"),
    [
        (None, {}, False),  # an actor that never had shares and needs none
        (None, {"model/m": 2.0}, True),  # restarted: it lost them
        ({"model/m": 2.0}, {"model/m": 2.004}, False),  # rounding noise
        ({"model/m": 2.0}, {"model/m": 1.5}, True),
        ({"model/m": 2.0}, {"model/m": 2.0, "model/n": 1.0}, True),
        ({"model/m": 2.0}, {}, True),  # the target went away: cleared
    ],
)
def test_shares_are_sent_only_when_they_changed(
    held: dict[str, float] | None, wanted: dict[str, float], differ: bool
) -> None:
    assert shares_differ(held, wanted) is differ


def test_a_malformed_shares_report_is_sent_again() -> None:
    assert reported_shares({"model/m": 2, "model/n": 0.5}) == {"model/m": 2.0, "model/n": 0.5}
    assert reported_shares(None) is None
    assert reported_shares({"model/m": "x"}) is None
    assert reported_shares([1.0]) is None


def test_a_tiny_share_never_rounds_to_nothing() -> None:
    demand = {0: {"model/m": 5000}, 1: {"model/m": 1}}
    assert shares_of(demand, 2)[1]["model/m"] == 0.05


def test_the_registry_sends_only_changed_shares_to_actors_that_answered() -> None:
    replies = {
        0: {"demand": {"model/m": 4}, "admission_shares": {"model/m": 3.2}},  # has it
        1: {"demand": {"model/m": 1}, "admission_shares": {}},  # restarted: lost it
        2: {"streams": {}},  # an actor of an older camgraph: no demand, no shares
    }
    on, off = DispatchSettings(calls_in_flight=2), DispatchSettings(fair_share=False)
    assert shares_to_send(replies, on) == {1: {"model/m": 0.8}}
    # fair_share switched off: shares still held are cleared, the others left alone
    assert shares_to_send(replies, off) == {0: {}}
    # an actor that did not answer (not in replies) neither counts nor is called
    assert shares_to_send({1: replies[1]}, on) == {1: {"model/m": 2.0}}


def test_target_labels_name_the_dispatchers_as_get_streams_does() -> None:
    assert target_label(("model", "demo")) == "model/demo"


# ---- the camera actor's side: demand and shares per target ---------------------------


def _sender_of(calls: list[str], name: str) -> Callable[[], SendFn]:
    def make() -> SendFn:
        calls.append(name)
        return Gated().send

    return make


def test_an_actor_reports_live_subscriptions_per_target_and_applies_its_shares() -> None:
    made: list[str] = []
    admission = TargetAdmission(DispatchSettings(calls_in_flight=2), BranchClock())
    admission.attach("a", ("model", "m"))
    admission.attach("b", ("model", "m"))
    admission.attach("c", ("PipelineDetector", "sha"))
    # "b" is on a stream that is down: the actor does not offer it
    assert admission.demand(["a", "c", "unknown"]) == {"model/m": 1, "PipelineDetector/sha": 1}
    asked = admission.demand_fps({"a": 2.5, "b": 1.0, "c": 10.0, "unknown": 7.0})
    assert asked == {"model/m": [1.0, 2.5], "PipelineDetector/sha": [10.0]}
    first = admission.dispatcher(("model", "m"), _sender_of(made, "m"))
    assert admission.dispatcher(("model", "m"), _sender_of(made, "m")) is first
    assert made == ["m"]  # one dispatcher (and one sender) per target
    assert first.share is None  # no share yet: its own calls_in_flight
    assert admission.set_shares({"model/m": 0.8, "PipelineDetector/sha": 3.2}) == 1
    assert first.share == 0.8
    later = admission.dispatcher(("PipelineDetector", "sha"), _sender_of(made, "sha"))
    assert later.share == 3.2  # a dispatcher made later gets its share at once
    admission.set_shares({})  # the registry names no target any more
    assert first.share is None and later.share is None
    admission.detach("a")
    assert admission.demand(["a", "c"]) == {"PipelineDetector/sha": 1}
    first.stats.answered, later.stats.answered = 5, 7
    assert admission.detected() == {"model/m": 5, "PipelineDetector/sha": 7}
    assert set(admission.status()) == {"model/m", "PipelineDetector/sha"}
    admission.renew()  # a redeploy: new dispatchers on first use
    assert admission.detected() == {"model/m": 5, "PipelineDetector/sha": 7}  # kept
    report = admission.report({"c": 2.0})
    assert report["demand_fps"] == {"PipelineDetector/sha": [2.0]}
    assert report["detected"] == {"model/m": 5, "PipelineDetector/sha": 7}
    assert admission.dispatcher(("model", "m"), _sender_of(made, "m")) is not first


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "2", True, None])
def test_a_bad_share_changes_nothing(bad: object) -> None:
    admission = TargetAdmission(DispatchSettings(), BranchClock())
    dispatcher = admission.dispatcher(("model", "m"), lambda: Gated().send)
    admission.set_shares({"model/m": 1.5})
    with pytest.raises(ValueError, match="share of 'model/x'"):
        admission.set_shares({"model/m": 0.5, "model/x": bad})
    assert admission.shares == {"model/m": 1.5} and dispatcher.share == 1.5


# ---- the dispatcher's fractional share -----------------------------------------------


def _request() -> DetectRequest:
    return DetectRequest(np.zeros((4, 4, 3), np.uint8))


class Gated:
    """A detector whose calls end when the test says, counting calls in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None
        self.backlog: int | None = None  # what the "replica" says it still holds
        self.error_last = False  # the call's last frame fails on its own

    async def send(self, requests: list[DetectRequest], waiting: int) -> list[DetectResult]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.starts.append(time.monotonic())
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
            self.ends.append(time.monotonic())
        if self.fail is not None:
            raise self.fail
        answers: list[Any] = [
            DetectResult(np.zeros((0, 6), np.float32), {}, backlog=self.backlog) for _ in requests
        ]
        if self.error_last:
            answers[-1] = InferenceError("this frame failed")
        return answers


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_share_sets_the_calls_in_flight() -> None:
    async def run() -> None:
        det = Gated()
        dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=2))
        dispatcher.set_share(3.2)  # 3 calls always, a 4th one fifth of the time
        tasks = [asyncio.create_task(dispatcher.admit(_request)) for _ in range(8)]
        await _settle()
        assert det.in_flight == 4 and dispatcher.waiting == 4
        dispatcher.set_share(None)  # back to its own calls_in_flight: no new call
        det.gate.set()
        await asyncio.gather(*tasks)
        assert dispatcher.status()["share"] is None

    asyncio.run(run())


def test_a_fractional_slot_idles_after_each_call_in_proportion() -> None:
    """Share 0.5: one call at a time, and after a call of d seconds the slot stays idle
    for d (duty 0.5), so on average half a call is in flight."""

    async def run() -> None:
        det = Gated()
        dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=2))
        dispatcher.set_share(0.5)
        first = asyncio.create_task(dispatcher.admit(_request))
        second = asyncio.create_task(dispatcher.admit(_request))
        await _settle()
        assert det.in_flight == 1
        await asyncio.sleep(0.3)  # the first call lasts about 0.3 s
        det.gate.set()
        await first
        det.gate.clear()
        await asyncio.sleep(0.05)
        assert len(det.starts) == 1, "the second call started inside the idle time"
        det.gate.set()
        await asyncio.wait_for(second, 5.0)
        call = det.ends[0] - det.starts[0]
        assert det.starts[1] - det.ends[0] >= 0.9 * call  # duty 0.5: idle as long

    asyncio.run(run())


def test_a_failed_call_leaves_no_idle_and_a_new_share_ends_one() -> None:
    """A call that failed (a timeout, a dead replica) says nothing of the pace: the
    slot is free at once. A share changed while the slot idles starts afresh."""

    async def run() -> None:
        det = Gated()
        dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=2))
        dispatcher.set_share(0.1)  # idle 9 × a call's time after each call
        det.fail = RuntimeError("replica died")
        first = asyncio.create_task(dispatcher.admit(_request))
        await asyncio.sleep(0.2)
        det.gate.set()
        with pytest.raises(RuntimeError):
            await first
        det.fail = None
        await asyncio.wait_for(dispatcher.admit(_request), 1.0)  # no 1.8 s idle
        assert len(det.starts) == 2
        # this one succeeded after ~0 s; make the next idle long, then change the share
        det.gate.clear()
        third = asyncio.create_task(dispatcher.admit(_request))
        await _settle()
        await asyncio.sleep(0.2)
        det.gate.set()
        await third  # now the slot idles about 1.8 s
        fourth = asyncio.create_task(dispatcher.admit(_request))
        await asyncio.sleep(0.05)
        assert len(det.starts) == 3  # idling
        dispatcher.set_share(2.0)  # the registry raised it: the idle ends
        await asyncio.wait_for(fourth, 1.0)

    asyncio.run(run())


def test_a_fractional_slot_does_not_idle_when_its_replica_had_no_other_frames() -> None:
    """Share 0.1 idles 9 × a call's time after it, unless the replica said it held no
    other frames when it answered (backlog 0): the cluster has room, and the share is a
    cap only under contention. A backlog, an unsaid one, or the setting off: it idles."""

    async def idles_after_a_call(det: Gated, settings: DispatchSettings) -> bool:
        dispatcher = DetectDispatcher(det.send, settings)
        dispatcher.set_share(0.1)
        det.gate.clear()
        first = asyncio.create_task(dispatcher.admit(_request))
        second = asyncio.create_task(dispatcher.admit(_request))
        await asyncio.sleep(0.1)  # the call lasts 0.1 s: the idle would be 0.9 s
        starts = len(det.starts)
        det.gate.set()
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(0.1)
        idled = len(det.starts) == starts
        await dispatcher.close()
        await asyncio.gather(second, return_exceptions=True)
        status = dispatcher.status()
        if idled:
            assert (status["slot_idles"], status["slot_idles_skipped"]) == (1, 0)
        else:  # the second call went at once, and may have ended as well
            assert status["slot_idles"] == 0 and status["slot_idles_skipped"] >= 1
        return idled

    async def run() -> None:
        on, off = DispatchSettings(fill_free_replicas=True), DispatchSettings()
        det = Gated()
        det.backlog = 0
        assert not await idles_after_a_call(det, on)
        assert await idles_after_a_call(det, off)  # the default
        det.backlog = 1  # another call's frame waits there
        assert await idles_after_a_call(det, on)
        det.backlog = None  # a replica that does not say
        assert await idles_after_a_call(det, on)
        det.backlog, det.error_last = 0, True  # a frame failed: says nothing of room
        assert await idles_after_a_call(det, on)

    asyncio.run(run())


def test_a_replica_answer_carries_the_frames_it_still_holds() -> None:
    ok = DetectResult(np.zeros((0, 6), np.float32), {})
    failed = InferenceError("bad frame")
    answers = with_backlog([ok, failed], 3)
    assert answers[0].backlog == 3 and answers[0].rows is ok.rows and ok.backlog is None
    assert answers[1] is failed
    assert with_backlog([ok], -2)[0].backlog == 0  # never below none


def test_a_share_must_be_a_number() -> None:
    dispatcher = DetectDispatcher(Gated().send)
    with pytest.raises(ValueError, match="finite"):
        dispatcher.set_share(math.nan)
    dispatcher.set_share(1000.0)
    assert dispatcher.share == 16.0  # clamped


# ---- the replica counts the registry asks Serve for ---------------------------------------


def test_running_counts_read_serve_status_per_deployment() -> None:
    app = SimpleNamespace(
        deployments={
            "Detector_m": SimpleNamespace(replica_states={"RUNNING": 2, "STARTING": 1}),
            "Ingress": SimpleNamespace(replica_states={"STARTING": 1}),
        }
    )
    status = SimpleNamespace(applications={"camgraph": app})
    assert running_counts(status, "camgraph") == {"Detector_m": 2, "Ingress": 0}
    assert running_counts(status, "other") == {}


def test_replica_counts_never_wait_for_serve_and_ask_one_at_a_time() -> None:
    """The registry's round reads the last answer at once; a controller that never
    answers holds one ask, no new ones start, and its old answer goes stale."""
    now = [0.0]
    release = threading.Event()
    asked = 0

    def ask() -> dict[str, int]:
        nonlocal asked
        asked += 1
        if asked == 3:  # the controller hangs
            release.wait(10)
            raise TimeoutError("controller hung")
        if asked == 2:
            raise RuntimeError("controller restarting")
        return {"det": 2}

    counts = ReplicaCounts(ask, refresh_s=10, stale_s=60, clock=lambda: now[0])
    assert counts.get() == {}  # nothing known yet: the ask starts in the background
    _settled(counts)
    assert counts.get() == {"det": 2} and asked == 1
    now[0] = 5.0
    assert counts.get() == {"det": 2} and asked == 1  # not due again yet
    now[0] = 11.0
    assert counts.get() == {"det": 2}
    _settled(counts)  # it failed: the last answer stands
    assert counts.get() == {"det": 2} and asked == 2
    now[0] = 22.0
    counts.get()  # the third ask hangs
    now[0] = 40.0
    assert counts.get() == {"det": 2} and counts.asking
    now[0] = 61.0  # a minute after the last answer: stale, no second ask meanwhile
    assert counts.get() == {} and counts.asking and asked == 3
    release.set()
    _settled(counts)  # the hung ask failed at last
    assert counts.get() == {}  # and the next one starts at once
    _settled(counts)
    assert asked == 4 and counts.get() == {"det": 2}  # the controller is back


def _settled(counts: ReplicaCounts, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while counts.asking:
        assert time.monotonic() < deadline, "the ask never ended"
        time.sleep(0.01)
