"""Fairness and occupancy through shared replicas, without Ray: real asyncio
dispatchers (stream_actors/dispatch.py) of several camera actors, with the registry's
shares (`admission_shares`), feeding "replicas" that serve calls first come first
served, as Serve's replicas do: the shares keep a lone camera to the packed ones'
pace, and `fill_free_replicas` fills replicas that answered with nothing else held."""

from __future__ import annotations

import asyncio
from collections import Counter

from graph.common.detection import DetectRequest, DetectResult, with_backlog
from stream_actors.dispatch import DetectDispatcher, DispatchSettings
from stream_actors.shares import admission_shares, water_level
from tests.unit.dispatch_fakes import make_request, make_result


class Replicas:
    """Detector replicas, each serving its calls one at a time in arrival order (the
    order Serve's replica queue gives them), `service_s` per frame; a call goes to the
    one holding the fewest frames (Serve's router compares the queues of two, which for
    two replicas is both). Each answer says the frames its replica still held for other
    calls, as `Detector.detect_many` does."""

    def __init__(self, count: int, service_s: float) -> None:
        self.service_s = service_s
        self.locks = [asyncio.Lock() for _ in range(count)]  # FIFO wake-ups
        self.held = [0] * count
        self.busy_s = 0.0

    async def send(self, requests: list[DetectRequest], waiting: int) -> list[DetectResult]:
        index = min(range(len(self.held)), key=self.held.__getitem__)
        self.held[index] += len(requests)
        try:
            async with self.locks[index]:
                await asyncio.sleep(self.service_s * len(requests))
                self.busy_s += self.service_s * len(requests)
            backlog = self.held[index] - len(requests)
        finally:
            self.held[index] -= len(requests)
        return with_backlog([make_result(r) for r in requests], backlog)


async def _camera(
    name: str, dispatcher: DetectDispatcher, counts: Counter[str], period_s: float = 0.0
) -> None:
    """One of a camera's `max_in_flight` slots (2 by default, so two of these run per
    camera): its newest frame is always waiting, and it asks again once served; with a
    `period_s` (a camera whose targetFps or source is slow), at most one frame that
    often."""
    while True:
        due = asyncio.get_running_loop().time() + period_s
        if await dispatcher.admit(lambda: make_request(0)) is not None:
            counts[name] += 1
        if period_s:
            await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))


async def _serve(
    layout: dict[int, int],
    seconds: float,
    *,
    fair: bool = True,
    fill: bool = False,
    replicas: int = 1,
    budget: float | None = None,
    service_s: float = 0.005,
    periods: dict[int, float] | None = None,
    weights: dict[int, float] | None = None,
    capacity: float | None = None,
) -> tuple[Counter[str], float]:
    """Actors (index → cameras) overloading `replicas` replicas, with the registry's
    shares of `budget` calls (None: 2 per actor) when `fair`: frames per camera, and
    the fraction of the replicas' time they were busy. `periods`: an actor's cameras
    offer a frame only that often (one slot each); `weights`: the frames/s each of an
    actor's cameras asks, as `subscription_weight` reports it (else 10 each);
    `capacity`: the frames/s the replicas detect, as the registry measures it."""
    served = Replicas(replicas, service_s)
    periods, weights = periods or {}, weights or {}
    demand = {
        index: {"model/m": [weights.get(index, 10.0)] * cams} for index, cams in layout.items()
    }
    budgets = None if budget is None else {"model/m": budget}
    asked = [w for targets in demand.values() for w in targets["model/m"]]
    levels = {"model/m": water_level(asked, capacity)}
    shares = admission_shares(demand, 2, budgets, levels)
    counts: Counter[str] = Counter()
    tasks = []
    for index, cams in layout.items():
        settings = DispatchSettings(calls_in_flight=2, fill_free_replicas=fill)
        dispatcher = DetectDispatcher(served.send, settings)
        if fair:
            dispatcher.set_share(shares[index]["model/m"])
        period = periods.get(index, 0.0)
        for cam in range(cams):
            for _slot in range(1 if period else 2):
                name = f"{index}.{cam}"
                task = _camera(name, dispatcher, counts, period)
                tasks.append(asyncio.create_task(task))
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return counts, served.busy_s / (replicas * seconds)


def _fairness(counts: Counter[str], cameras: int) -> float:
    assert len(counts) == cameras, counts
    return min(counts.values()) / max(counts.values())


# ---- a lone camera and packed ones ----------------------------------------------------


def test_a_camera_alone_on_its_actor_gets_no_more_than_the_packed_ones() -> None:
    """Four cameras on one actor and one on another, all overloading one replica.
    Without shares the lone camera gets its actor's 2 calls to itself, 4 times the
    frames of each packed camera; with them every camera gets about the same."""
    layout = {0: 4, 1: 1}
    unfair, _ = asyncio.run(_serve(layout, 1.0, fair=False, service_s=0.004))
    fair, _ = asyncio.run(_serve(layout, 1.0, service_s=0.004))
    assert _fairness(unfair, 5) < 0.45, unfair
    assert _fairness(fair, 5) >= 0.7, fair
    # the replica stays as busy: shares divide the calls, they do not withhold them
    assert sum(fair.values()) >= 0.8 * sum(unfair.values())


# ---- filling free replicas ------------------------------------------------------------


def test_actors_with_half_a_call_each_keep_the_replicas_busy() -> None:
    """Four actors of one camera with half a call each, against 2 replicas. Each idling
    its slot as long as its call took, on its own, leaves times when fewer than 2 calls
    run and others when 3 or 4 queue. Not idling after an answer from a replica that
    held nothing else keeps the replicas busier (medians of 3 interleaved pairs: the
    box is noisy), and every camera keeps its share."""
    layout = {index: 1 for index in range(4)}
    busy: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for fill in (False, True):
            counts, fraction = asyncio.run(_serve(layout, 1.0, fill=fill, replicas=2, budget=2.0))
            busy[fill].append(fraction)
            if fill:
                assert _fairness(counts, 4) >= 0.7, counts
    off, on = sorted(busy[False])[1], sorted(busy[True])[1]
    assert on >= 1.03 * off, busy


def test_filling_never_hands_a_lone_camera_the_calls_its_share_took() -> None:
    """Four cameras on one actor and one on another, on one replica's call (shares 0.8
    and 0.2), with filling off (the default) and on: the lone camera gets no more
    than the packed ones. Filling goes the other way (measured here: the larger
    share's calls find the replica free and go again, while the small share's call,
    queued behind one of them, idles 4 × that longer call), which is why it is off by
    default (README, "Fractional calls fill free replicas")."""
    assert DispatchSettings().fill_free_replicas is False
    for fill in (False, True):
        counts, _ = asyncio.run(_serve({0: 4, 1: 1}, 1.0, fill=fill, budget=1.0))
        packed = min(counts[f"0.{cam}"] for cam in range(4))
        assert counts["1.0"] <= 1.5 * packed, (fill, counts)


# ---- cameras that ask for fewer frames -------------------------------------------------


def test_shares_of_the_frames_asked_keep_the_replicas_busy_and_slow_cameras_whole() -> None:
    """Four slow cameras (a frame every 200 ms each: 20 frames/s, a fifth of the 100
    the two replicas detect) on one actor, four that always have a frame (asking 120
    frames/s each) on another, 1.5 calls per replica. Counting cameras gives each actor
    half the calls: the slow actor's stay mostly empty while the other's cap holds, and
    the replicas idle. In proportion to the frames asked, the slow cameras fall to a
    small part of theirs. Max-min fair against what the replicas detect, the busy actor
    gets the calls the slow one cannot fill and the slow ones keep most of their
    frames. Medians of 3 interleaved runs of each (the box is noisy)."""
    layout, periods = {0: 4, 1: 4}, {0: 0.2}
    variants = {
        "counted": {},
        "proportional": {"weights": {0: 5.0, 1: 120.0}},
        "fair": {"weights": {0: 5.0, 1: 120.0}, "capacity": 100.0},
    }
    busy: dict[str, list[float]] = {k: [] for k in variants}
    fast: dict[str, list[int]] = {k: [] for k in variants}
    slow: dict[str, list[int]] = {k: [] for k in variants}
    for _ in range(3):
        for kind, extra in variants.items():
            counts, fraction = asyncio.run(
                _serve(
                    layout,
                    1.0,
                    replicas=2,
                    budget=3.0,
                    service_s=0.02,
                    periods=periods,
                    **extra,  # type: ignore[arg-type]
                )
            )
            busy[kind].append(fraction)
            fast[kind].append(sum(counts[f"1.{cam}"] for cam in range(4)))
            slow[kind].append(sum(counts[f"0.{cam}"] for cam in range(4)))
    median = {
        name: {k: sorted(v)[1] for k, v in series.items()}
        for name, series in (("busy", busy), ("fast", fast), ("slow", slow))
    }
    assert median["busy"]["fair"] >= 1.1 * median["busy"]["counted"], median
    assert median["fast"]["fair"] >= 1.1 * median["fast"]["counted"], median
    assert median["slow"]["fair"] >= 2 * median["slow"]["proportional"], median
    assert median["slow"]["fair"] >= 0.6 * 4 * 5, median  # of the 20 frames offered
