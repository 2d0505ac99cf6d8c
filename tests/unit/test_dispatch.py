"""The camera actor's frame admission (stream_actors/dispatch.py), without Ray: real
asyncio, a real mailbox and processor, and a detector that records what it was sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from graph.common.detection import DetectRequest, DetectResult
from graph.common.errors import DetectorBusy
from graph.events.model import RingBufferSink
from stream_actors.branch_clock import BranchClock
from stream_actors.dispatch import (
    DetectDispatcher,
    DispatcherClosed,
    DispatchSettings,
)
from stream_actors.processor import ProcessingSettings, SubscriptionProcessor
from stream_actors.subscriptions import Subscription
from tests.unit.dispatch_fakes import Recorder, sync
from tests.unit.dispatch_fakes import live_sub as _sub
from tests.unit.dispatch_fakes import make_request as _request
from tests.unit.dispatch_fakes import make_result as _result
from tests.unit.dispatch_fakes import replay_sub as _replay
from tests.unit.dispatch_fakes import settle as _settle
from tests.unit.dispatch_fakes import until as _until


@sync
async def test_one_waiter_is_sent_at_once_and_gets_its_own_result() -> None:
    det = Recorder()
    dispatcher = DetectDispatcher(det.send)
    result = await dispatcher.admit(lambda: _request(7))
    assert det.calls == [[7]]
    assert result is not None and round(float(result.rows[0, 4]) * 255) == 7


@sync
async def test_replay_waiters_share_one_call_longest_waiting_first() -> None:
    """While its calls are busy, ready subscriptions queue; the next free call carries
    the frames of all waiting lossless replays, oldest first, and each gets its own
    frame's result."""
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=1))
    first = asyncio.create_task(dispatcher.admit(lambda: _request(1), False))
    await _settle()
    assert det.calls == [[1]] and dispatcher.in_flight == 1
    later = [
        asyncio.create_task(dispatcher.admit(lambda v=v: _request(v), False)) for v in (5, 3, 9)
    ]
    await _settle()
    assert det.calls == [[1]] and dispatcher.waiting == 3  # nothing taken meanwhile
    det.gate.set()
    results = await asyncio.gather(first, *later)
    assert det.calls == [[1], [5, 3, 9]]
    assert [round(float(r.rows[0, 4]) * 255) for r in results] == [1, 5, 3, 9]
    assert dispatcher.status()["frames_per_call"] == 2.0


@sync
async def test_a_call_with_a_live_frame_carries_at_most_live_frames_per_call() -> None:
    """A live camera's frame rides in a call of at most live_frames_per_call frames: a
    CPU replica runs a call's frames one after another, so a bigger call adds
    inferences to its wait. Replay frames queued before it fill their own call."""
    det = Recorder()
    det.gate.clear()
    settings = DispatchSettings(calls_in_flight=1, max_frames_per_call=8, live_frames_per_call=2)
    dispatcher = DetectDispatcher(det.send, settings)
    blocker = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await _settle()
    waiting = [(20, False), (21, False), (30, True), (22, False), (31, True), (32, True)]
    tasks = [
        asyncio.create_task(dispatcher.admit(lambda v=v: _request(v), live)) for v, live in waiting
    ]
    await _settle()
    det.gate.set()
    await asyncio.gather(blocker, *tasks)
    # Two replays, then a live frame: the call stops at the live limit (2) with the
    # replays; the rest goes in order, two live frames at most per call.
    assert det.calls == [[1], [20, 21], [30, 22], [31, 32]]
    # Each call says how many frames still wait behind it: the autoscaling signal.
    assert det.waiting == [0, 4, 2, 0]


@sync
@pytest.mark.parametrize(
    ("first", "calls"),
    [(lambda: _request(30), [[1], [30], [20, 21]]), (lambda: None, [[1], [20, 21]])],
    ids=["live-frame", "live-without-frame"],
)
async def test_replays_behind_a_live_frame_wait_for_the_next_call(
    first: Callable[[], DetectRequest | None], calls: list[list[int]]
) -> None:
    """Once a call holds a live frame it stays as short as a live call, whatever follows;
    a live waiter whose frame is gone (too old) does not shorten the replays' call."""
    det = Recorder()
    det.gate.clear()
    settings = DispatchSettings(calls_in_flight=1, max_frames_per_call=8)
    dispatcher = DetectDispatcher(det.send, settings)
    blocker = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await _settle()
    waiting = [(first, True), (lambda: _request(20), False), (lambda: _request(21), False)]
    tasks = [asyncio.create_task(dispatcher.admit(take, live)) for take, live in waiting]
    await _settle()
    det.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert det.calls == calls


def test_live_frames_per_call_may_not_exceed_max_frames_per_call() -> None:
    with pytest.raises(ValueError, match="must not exceed"):
        DispatchSettings(max_frames_per_call=4, live_frames_per_call=8)


@sync
async def test_live_frames_go_one_per_call_by_default() -> None:
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=1))
    tasks = [asyncio.create_task(dispatcher.admit(lambda v=v: _request(v))) for v in (1, 2, 3)]
    await _settle()
    det.gate.set()
    await asyncio.gather(*tasks)
    assert det.calls == [[1], [2], [3]]


@sync
async def test_frames_are_taken_when_sent_not_when_queued() -> None:
    """A subscription's frame is taken at its turn: a newer frame arriving while it
    waits is the one sent (freshness), and the take function runs exactly once."""
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=1))
    blocker = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await _settle()
    newest = {"value": 10}
    takes = []

    def take() -> DetectRequest:
        takes.append(newest["value"])
        return _request(newest["value"])

    waiting = asyncio.create_task(dispatcher.admit(take))
    await _settle()
    newest["value"] = 11  # a newer frame superseded it in the mailbox meanwhile
    det.gate.set()
    await asyncio.gather(blocker, waiting)
    assert takes == [11] and det.calls[-1] == [11]


@sync
async def test_calls_carry_at_most_max_frames_and_keep_calls_in_flight_bounded() -> None:
    det = Recorder()
    det.gate.clear()
    settings = DispatchSettings(calls_in_flight=2, max_frames_per_call=3)
    dispatcher = DetectDispatcher(det.send, settings)
    tasks = [
        asyncio.create_task(dispatcher.admit(lambda v=v: _request(v), False)) for v in range(8)
    ]
    await _settle()
    assert dispatcher.in_flight == 2 and len(det.calls) == 2
    det.gate.set()
    await asyncio.gather(*tasks)
    assert max(len(c) for c in det.calls) == 3
    assert sorted(v for c in det.calls for v in c) == list(range(8))


@sync
async def test_a_cancelled_waiter_is_never_taken() -> None:
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=1))
    blocker = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await _settle()
    taken = []
    gone = asyncio.create_task(dispatcher.admit(lambda: taken.append(1) or _request(2)))
    await _settle()
    gone.cancel()
    det.gate.set()
    await blocker
    await _settle()
    assert taken == [] and det.calls == [[1]]


@sync
async def test_a_failed_call_fails_each_of_its_frames_and_none_other() -> None:
    det = Recorder()
    det.fail = DetectorBusy("m", "queue full")
    dispatcher = DetectDispatcher(det.send)
    with pytest.raises(DetectorBusy):
        await dispatcher.admit(lambda: _request(1))
    det.fail = None
    assert (await dispatcher.admit(lambda: _request(2))) is not None


@sync
async def test_no_frame_and_a_bad_frame_fail_only_their_own_subscription() -> None:
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=1))
    blocker = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await _settle()

    def bad() -> DetectRequest:
        raise ValueError("crop outside the image")

    none = asyncio.create_task(dispatcher.admit(lambda: None))
    broken = asyncio.create_task(dispatcher.admit(bad))
    good = asyncio.create_task(dispatcher.admit(lambda: _request(4)))
    await _settle()
    det.gate.set()
    assert await none is None
    with pytest.raises(ValueError, match="crop outside"):
        await broken
    assert (await good) is not None
    await blocker
    assert det.calls == [[1], [4]]


@sync
async def test_a_short_answer_is_an_error_not_a_shifted_result() -> None:
    async def short(requests: list[DetectRequest], waiting: int) -> list[DetectResult]:
        return [_result(r) for r in requests[:-1]]

    dispatcher = DetectDispatcher(short)
    with pytest.raises(RuntimeError, match="answered 0 of 1"):
        await dispatcher.admit(lambda: _request(3))


async def _wait_calls(det: Recorder, n: int, timeout_s: float = 10.0) -> None:
    """Until the detector saw `n` calls (the dispatcher polls branch work on a timer,
    so loop steps alone do not get there)."""
    deadline = time.monotonic() + timeout_s
    while len(det.calls) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@sync
async def test_starved_branch_work_limits_detection_to_one_call_at_a_time() -> None:
    """While a classification pass waits longer than the grace, a second detector call
    waits for the first to end: detection slows, it never stops."""
    det = Recorder()
    det.gate.clear()
    clock = BranchClock()
    token = clock.start()
    settings = DispatchSettings(
        calls_in_flight=2, max_frames_per_call=1, branch_grace_s=0.0, branch_hold_s=0.0001
    )
    dispatcher = DetectDispatcher(det.send, settings, clock)
    await _settle()
    tasks = [asyncio.create_task(dispatcher.admit(lambda v=v: _request(v))) for v in (1, 2)]
    await _wait_calls(det, 1)
    await asyncio.sleep(0.1)
    assert det.calls == [[1]]  # the first call went; the second waits for branch work
    clock.end(token)  # the pass finished
    await _wait_calls(det, 2)
    assert det.calls == [[1], [2]]
    det.gate.set()
    await asyncio.gather(*tasks)
    assert dispatcher.status()["branch_holds"] == 1


@sync
async def test_while_starved_a_call_carries_live_frames_up_to_max_frames() -> None:
    """Starved branch work: one call at a time, so it carries every waiting frame (the
    least detector CPU per frame) instead of one live frame."""
    det = Recorder()
    det.gate.clear()
    clock = BranchClock()
    clock.timed_out()
    settings = DispatchSettings(max_frames_per_call=3, branch_hold_s=0.0001, branch_window_s=60)
    dispatcher = DetectDispatcher(det.send, settings, clock)
    tasks = [asyncio.create_task(dispatcher.admit(lambda v=v: _request(v))) for v in range(5)]
    await _settle()
    det.gate.set()
    await asyncio.gather(*tasks)
    assert det.calls == [[0, 1, 2], [3, 4]]


@sync
async def test_while_starved_calls_start_at_least_the_hold_apart() -> None:
    """A recent branch timeout counts as starved: calls go one at a time and start at
    least branch_hold_s apart (the frames per camera go down), and back to normal once
    the window has passed."""
    det = Recorder()
    clock = BranchClock()
    clock.timed_out()
    settings = DispatchSettings(max_frames_per_call=1, branch_hold_s=0.3, branch_window_s=0.6)
    dispatcher = DetectDispatcher(det.send, settings, clock)
    start = asyncio.get_running_loop().time()
    await dispatcher.admit(lambda: _request(1))
    await dispatcher.admit(lambda: _request(2))
    assert asyncio.get_running_loop().time() - start >= 0.29
    await asyncio.sleep(0.6)  # the timeout is out of the window
    holds = dispatcher.status()["branch_holds"]
    assert holds >= 1
    await dispatcher.admit(lambda: _request(3))
    await dispatcher.admit(lambda: _request(4))
    assert dispatcher.status()["branch_holds"] == holds  # not held any more
    assert det.calls == [[1], [2], [3], [4]]


@sync
async def test_a_hung_classifier_never_stops_detection() -> None:
    det = Recorder()
    clock = BranchClock()
    clock.start()  # a pass that never ends
    settings = DispatchSettings(branch_grace_s=0.0, branch_hold_s=0.05, max_frames_per_call=1)
    dispatcher = DetectDispatcher(det.send, settings, clock)
    for v in range(4):
        await asyncio.wait_for(dispatcher.admit(lambda v=v: _request(v)), 1.0)
    assert det.calls == [[0], [1], [2], [3]]


@sync
async def test_a_hung_call_fails_its_frames_and_frees_its_slot() -> None:
    """A replica that never answers: after call_timeout_s the call's frames fail and
    the next frames get through (the dispatcher is not blocked for ever)."""
    det = Recorder()
    det.gate.clear()
    settings = DispatchSettings(calls_in_flight=1, call_timeout_s=0.1)
    dispatcher = DetectDispatcher(det.send, settings)
    with pytest.raises(TimeoutError):
        await dispatcher.admit(lambda: _request(1))
    det.gate.set()
    assert (await dispatcher.admit(lambda: _request(2))) is not None
    assert dispatcher.in_flight == 0


@sync
async def test_a_frame_that_failed_in_the_replica_fails_alone() -> None:
    async def send(requests: list[DetectRequest], waiting: int) -> list[DetectResult | Exception]:
        return [_result(requests[0]), RuntimeError("frame 2 failed")]

    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=1))
    blocker = asyncio.create_task(dispatcher.admit(lambda: _request(9)))
    await _settle()
    dispatcher._send = send  # the next call answers one result and one error
    ok = asyncio.create_task(dispatcher.admit(lambda: _request(1), False))
    bad = asyncio.create_task(dispatcher.admit(lambda: _request(2), False))
    await _settle()
    det.gate.set()
    await blocker
    assert (await ok) is not None
    with pytest.raises(RuntimeError, match="frame 2 failed"):
        await bad


@sync
async def test_close_fails_waiters_and_lets_calls_end() -> None:
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=1))
    sent = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await _settle()
    waiting = asyncio.create_task(dispatcher.admit(lambda: _request(2)))
    await _settle()
    closing = asyncio.create_task(dispatcher.close())
    await _settle()
    det.gate.set()
    await closing
    assert (await sent) is not None
    with pytest.raises(DispatcherClosed):
        await waiting


# ---- processors sharing one dispatcher -------------------------------------------------


@sync
@pytest.mark.parametrize(
    ("make_sub", "calls"),
    [(_sub, [[1], [13], [23], [33]]), (_replay, [[1], [13, 23, 33]])],
    ids=["live", "replay"],
)
async def test_subscriptions_of_an_actor_share_calls_and_account_for_every_frame(
    make_sub: Callable[[str], Subscription], calls: list[list[int]]
) -> None:
    """Three subscriptions on one dispatcher with one call at a time: while the detector
    is busy with the first one's frame, each subscription's frames supersede one another
    in its mailbox (a replay's too: its mailbox keeps one). Then the newest frame of all
    three goes, longest waiting first (the first one's second slot pipelines): one call
    each for live cameras, one call for all the replays. Every frame put is processed,
    superseded or pending."""
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=1))
    settings = ProcessingSettings(error_pause_s=0)
    sink = RingBufferSink(1000)
    procs = [
        SubscriptionProcessor(
            make_sub(f"d{i};c{i}"), "demo", 32, None, sink, settings, admit=dispatcher.admit
        )
        for i in range(3)
    ]
    for p in procs:
        p.start()
    image = np.zeros((32, 32, 3), np.uint8)  # the model's size: letterboxed as it is
    procs[0].mailbox.put(image + 1, 1e9)
    await _until(lambda: len(det.calls) == 1)
    for k in range(4):  # the detector is busy: these wait, newest kept
        for i, p in enumerate(procs):
            p.mailbox.put(image + 10 * (i + 1) + k, 1e9 + k)
    await asyncio.sleep(0.05)
    assert len(det.calls) == 1
    det.gate.set()
    await _until(lambda: sum(p.processed for p in procs) == 4)
    # The frames carry the pixel value put: the newest (k=3) of each went.
    assert det.calls == calls
    for p in procs:
        await p.stop()
        s = p.mailbox.stats()
        drops = s["drops"]
        assert isinstance(drops, dict)
        assert s["received"] == p.processed + sum(drops.values()) + s["pending"]
    assert [p.mailbox.stats()["drops"]["superseded"] for p in procs] == [3, 3, 3]


@sync
async def test_a_subscription_takes_its_frames_in_order_one_admission_per_frame() -> None:
    """A lossless replay through a dispatcher with two calls and two slots: every frame
    is detected exactly once and in order (the tracker's contract), though a second
    admission waits while the first one's frame is still in the mailbox."""
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(calls_in_flight=2))
    sub = Subscription(
        subscriptionIdentifier="d;c", fileUrl="/data/clip.mp4", fileRealtime=False, modelId="m"
    )
    processor = SubscriptionProcessor(
        sub, "m", 32, None, RingBufferSink(1000), ProcessingSettings(), admit=dispatcher.admit
    )
    processor.start()
    image = np.zeros((32, 32, 3), np.uint8)
    for k in range(40):
        processor.mailbox.put(image + k, 1e9 + k)
        await _until(lambda: not processor.mailbox.ready(), polls=500)
    await _until(lambda: processor.processed == 40)
    await processor.stop()
    sent = [v for call in det.calls for v in call]
    assert sent == list(range(40))
    drops = processor.mailbox.stats()["drops"]
    assert isinstance(drops, dict) and not any(drops.values())


@sync
async def test_a_stop_right_after_a_result_always_stops() -> None:
    """Python 3.11's wait_for can swallow a cancellation that lands just as its result
    is in: a processor stopped at any loop step after a detection must still stop."""
    for spins in range(8):
        for direct in (True, False):
            det = Recorder()
            det.gate.clear()
            dispatcher = DetectDispatcher(det.send)

            async def detect(
                model_id: str, request: DetectRequest, det: Recorder = det
            ) -> DetectResult:
                (result,) = await det.send([request])
                return result

            processor = SubscriptionProcessor(
                _sub("d;c"),
                "demo",
                32,
                detect if direct else None,
                RingBufferSink(100),
                ProcessingSettings(),
                admit=None if direct else dispatcher.admit,
            )
            processor.start()
            processor.mailbox.put(np.zeros((32, 32, 3), np.uint8), 1e9)
            await _until(lambda det=det: len(det.calls) == 1)
            det.gate.set()
            for _ in range(spins):
                await asyncio.sleep(0)
            await asyncio.wait_for(processor.stop(), 2.0)


def test_the_branch_clock_tells_reader_threads_when_it_was_last_starved() -> None:
    clock = BranchClock()
    assert not clock.starved_within(5.0)
    clock.timed_out()
    assert clock.starved(grace_s=2.0, window_s=3.0) and clock.starved_within(5.0)
    clock.last_timeout = -float("inf")  # the window passed: no longer starved...
    assert not clock.starved(grace_s=2.0, window_s=3.0)
    assert clock.starved_within(5.0)  # ...but the verdict holds for the decode window
    clock.last_starved -= 5.0
    assert not clock.starved_within(5.0)  # and then expires


def test_the_status_splits_the_latency_into_the_frames_age_when_taken_and_the_call() -> None:
    """A frame read 100 ms before its turn, and a detector call of 50 ms: the status says
    the frame was ≥ 100 ms old when taken, and the call added ≥ 50 ms after that."""

    async def detect(model_id: str, request: DetectRequest) -> DetectResult:
        await asyncio.sleep(0.05)
        return DetectResult(np.zeros((0, 6), np.float32), {0: "vehicle"})

    async def run() -> dict[str, object]:
        processor = SubscriptionProcessor(
            _sub("d;c"), "demo", 64, detect, RingBufferSink(100), ProcessingSettings()
        )
        processor.mailbox.put(np.zeros((48, 64, 3), np.uint8), time.time() - 0.1)
        processor.start()
        await _until(lambda: processor.processed == 1)
        await processor.stop()
        return processor.status()

    status = asyncio.run(run())
    age, latency = status["take_age_ms_p50"], status["latency_ms_p50"]
    assert isinstance(age, float) and isinstance(latency, float)
    assert age >= 100.0
    assert latency - age >= 49.5  # both rounded to 0.1 ms


@sync
@pytest.mark.parametrize(
    ("live", "limit", "marked"),
    [(True, 0.05, True), (False, 0.05, False), (True, 0.0, False), (True, 5.0, False)],
)
async def test_a_live_frame_that_waited_long_for_its_call_marks_the_detector_overloaded(
    live: bool, limit: float, marked: bool
) -> None:
    """The readers' decode shedding of pipeline streams reads this mark: only a live
    frame that waited past `overloaded_wait_s` (0: never) sets it."""
    det = Recorder()
    det.gate.clear()
    clock = BranchClock()
    settings = DispatchSettings(calls_in_flight=1, overloaded_wait_s=limit)
    dispatcher = DetectDispatcher(det.send, settings, clock)
    first = asyncio.create_task(dispatcher.admit(lambda: _request(1), live))
    await _settle()
    assert not clock.detector_overloaded_within(5.0)  # the first went at once
    second = asyncio.create_task(dispatcher.admit(lambda: _request(2), live))
    await asyncio.sleep(0.15)  # it waits behind the first call
    det.gate.set()
    await asyncio.gather(first, second)
    assert det.calls == [[1], [2]]
    assert clock.detector_overloaded_within(5.0) is marked
    if marked:
        clock.last_detector_wait -= 5.0
        assert not clock.detector_overloaded_within(5.0)  # the mark expires
