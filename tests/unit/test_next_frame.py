"""A free detector call that waits for a live frame's successor (`hold_for_next_s` in
stream_actors/dispatch.py), without Ray: real asyncio and time, a camera whose frames
the test puts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from graph.common.detection import DetectResult
from graph.events.model import RingBufferSink
from stream_actors.branch_clock import BranchClock
from stream_actors.dispatch import (
    DetectDispatcher,
    DispatcherClosed,
    DispatchSettings,
)
from stream_actors.processor import ProcessingSettings, SubscriptionProcessor
from tests.unit.dispatch_fakes import (
    Camera,
    Recorder,
    live_sub,
    replay_sub,
    settle,
    sync,
    until,
)
from tests.unit.dispatch_fakes import make_request as _request
from tests.unit.dispatch_fakes import make_result as _result


def _held(hold_s: float, **settings: Any) -> DispatchSettings:
    """Settings with a hold of `hold_s`, which may exceed the configuration's 1 s bound:
    the tests' cameras run at one frame per seconds, so that what must not end a hold
    (or must not begin one) is seconds away, beyond a loaded machine's stalls."""
    return DispatchSettings(**settings).model_copy(update={"hold_for_next_s": hold_s})


def test_the_configured_hold_is_bounded() -> None:
    """What the tests use beyond it is not a setting an operator can choose."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="hold_for_next_s"):
        DispatchSettings(hold_for_next_s=1.5)


def _one_call(hold_s: float, **settings: Any) -> DispatchSettings:
    return _held(hold_s, calls_in_flight=1, **settings)


@sync
async def test_a_free_call_waits_for_a_frame_about_to_be_superseded() -> None:
    """The frame in turn is 1.5 s old and its successor is due in 0.5 s (a camera at
    one frame per 2 s): the call waits for the successor and sends it, not the old one.
    The hold looks for it when it is due (its arrival wakes nobody)."""
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, _one_call(1.0))
    cam = Camera(interval_s=2.0, age_s=1.5, value=1)
    sent = asyncio.create_task(dispatcher.admit(cam.take, True, cam.timing))
    await asyncio.sleep(0.01)
    assert det.calls == []  # held
    cam.put(2)
    await asyncio.wait_for(sent, 2.0)
    assert det.calls == [[2]]
    status = dispatcher.status()
    assert status["next_frame_holds"] == 1 and 0 < status["next_frame_held_s"] < 1.0


@sync
async def test_a_held_call_sends_the_old_frame_when_the_next_one_does_not_come() -> None:
    """A camera that stalls: the hold ends once its next frame is NEXT_FRAME_SLACK_S
    overdue (not after the whole hold_for_next_s), and the frame there is goes."""
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, _one_call(1.9))
    cam = Camera(interval_s=4.0, age_s=2.8, value=1)  # the next one due in 1.2 s
    await asyncio.wait_for(dispatcher.admit(cam.take, True, cam.timing), 2.0)
    sent_at = time.monotonic()
    assert det.calls == [[1]]
    assert sent_at >= cam.put_at + cam.interval_s  # not before the next one was due
    assert 1.0 <= dispatcher.status()["next_frame_held_s"] < 1.8  # not the whole 1.9 s


@sync
async def test_a_new_frame_number_ends_the_hold() -> None:
    """The frame came: told by its number, not its age (the mailbox's clock is not the
    dispatcher's)."""
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, _one_call(5.0))
    cam = Camera(interval_s=10.0, age_s=6.0, value=1, frozen=True)  # due in 4 s
    sent = asyncio.create_task(dispatcher.admit(cam.take, True, cam.timing))
    await asyncio.sleep(0.01)
    assert det.calls == []
    cam.seq, cam.value = 2, 2  # a new frame, and an age that says nothing
    cam.frozen_age = 9.99  # a call that frees looks again at once
    dispatcher._changed.set()
    await asyncio.wait_for(sent, 2.0)  # not the 4 s until the frame was due
    assert det.calls == [[2]]


@sync
async def test_with_one_of_two_calls_in_flight_the_other_waits() -> None:
    """Two calls: while one is in flight, the free one is the last and may wait; with
    both free, none waits (the frame goes at once)."""
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, _held(5.0))
    busy = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await settle()
    cam = Camera(interval_s=10.0, age_s=8.0, value=10)
    held = asyncio.create_task(dispatcher.admit(cam.take, True, cam.timing))
    await asyncio.sleep(0.01)
    assert det.calls == [[1]]  # the second call waits for the camera's next frame
    cam.put(11)
    await asyncio.wait_for(until(lambda: len(det.calls) == 2, polls=100_000), 2.0)
    assert det.calls == [[1], [11]]
    det.gate.set()
    await asyncio.gather(busy, held)


@sync
async def test_a_frame_is_held_once() -> None:
    """A hold that something else interrupts (here the registry lowering the share, so
    no call is free until the busy one ends) is not begun again for the same frame: it
    goes as soon as a call frees."""
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, _held(5.0))
    dispatcher.set_share(2.0)
    busy = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await settle()
    cam = Camera(interval_s=10.0, age_s=6.0, value=10, frozen=True)  # next due in 4 s
    second = asyncio.create_task(dispatcher.admit(cam.take, True, cam.timing))
    await asyncio.sleep(0.01)
    assert det.calls == [[1]] and dispatcher.status()["next_frame_holds"] == 1
    dispatcher.set_share(1.0)  # one call: none free now, the hold ends
    await settle()
    det.gate.set()  # the call ends: frame 10 goes at once, not after a second hold
    await asyncio.wait_for(asyncio.gather(busy, second), 2.0)  # a second hold: 4 s
    assert det.calls == [[1], [10]]
    assert dispatcher.status()["next_frame_holds"] == 1


@sync
async def test_starved_branch_work_never_holds_a_call() -> None:
    det = Recorder()
    branches = BranchClock()
    branches.start()  # a pass that has waited longer than branch_grace_s (0)
    settings = _one_call(5.0, branch_grace_s=0.0, branch_hold_s=0.05)
    dispatcher = DetectDispatcher(det.send, settings, branches)
    cam = Camera(interval_s=10.0, age_s=6.0, value=1)  # a hold would be 4 s
    await asyncio.wait_for(dispatcher.admit(cam.take, True, cam.timing), 2.0)
    assert det.calls == [[1]] and dispatcher.status()["next_frame_holds"] == 0


@sync
@pytest.mark.parametrize(
    ("age_s", "interval_s", "live", "hold_s", "calls"),
    [
        (0.1, 1.0, True, 0.03, 1),  # the next frame is not due within the hold
        (0.3, 1.0, True, 1.0, 1),  # the frame is under half an interval old
        (0.8, 1.0, False, 0.5, 1),  # a replay's frame
        (0.8, 1.0, True, 0.0, 1),  # holds off
        (1.5, 1.0, True, 0.5, 1),  # its next frame is overdue
        (0.0008, 0.001, True, 0.5, 1),  # a burst, not a frame rate (age frozen below)
        (0.8, 1.0, True, 0.5, 2),  # another call is free too
    ],
    ids=["not-due-soon", "fresh-enough", "replay", "off", "overdue", "burst", "two-free"],
)
async def test_a_free_call_sends_at_once_when_waiting_gains_nothing(
    age_s: float, interval_s: float, live: bool, hold_s: float, calls: int
) -> None:
    det = Recorder()
    settings = DispatchSettings(calls_in_flight=calls, hold_for_next_s=hold_s)
    dispatcher = DetectDispatcher(det.send, settings)
    cam = Camera(interval_s=interval_s, age_s=age_s, value=1, frozen=True)
    sent = asyncio.create_task(dispatcher.admit(cam.take, live, cam.timing))
    await settle()
    assert det.calls == [[1]]
    await sent
    assert dispatcher.status()["next_frame_holds"] == 0


@sync
async def test_a_batch_of_live_frames_does_not_wait_for_one_camera() -> None:
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, _one_call(5.0, live_frames_per_call=2))
    cam = Camera(interval_s=10.0, age_s=6.0, value=1)  # a hold would be 4 s
    await asyncio.wait_for(dispatcher.admit(cam.take, True, cam.timing), 2.0)
    assert det.calls == [[1]] and dispatcher.status()["next_frame_holds"] == 0


@sync
async def test_a_hold_keeps_the_order_of_turns() -> None:
    """While the first waiter's call waits for its next frame, a later waiter with a
    fresh frame does not jump the queue (taking fresh frames out of turn is unfair)."""
    det = Recorder()
    det.gate.clear()
    dispatcher = DetectDispatcher(det.send, _one_call(5.0))
    blocker = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await settle()
    stale = Camera(interval_s=10.0, age_s=8.0, value=10)
    fresh = Camera(interval_s=10.0, age_s=0.0, value=20)
    first = asyncio.create_task(dispatcher.admit(stale.take, True, stale.timing))
    second = asyncio.create_task(dispatcher.admit(fresh.take, True, fresh.timing))
    await settle()
    stale.put_at = time.monotonic() - 8.0  # as old as that when the call frees
    det.gate.set()
    await asyncio.sleep(0.01)
    assert det.calls == [[1]]  # held for the first waiter, the second one waits
    stale.put(11)
    await asyncio.wait_for(asyncio.gather(blocker, first, second), 2.0)
    assert det.calls == [[1], [11], [20]]


@sync
async def test_a_waiter_cancelled_during_its_hold_frees_the_call_at_once() -> None:
    """A subscription stops while the call waits for its next frame: the next waiter
    goes now, not when the cancelled one's frame would have come."""
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, _one_call(9.0))
    stale = Camera(interval_s=20.0, age_s=12.0, value=10)  # its next one due in 8 s
    held = asyncio.create_task(dispatcher.admit(stale.take, True, stale.timing))
    await asyncio.sleep(0.01)
    other = Camera(interval_s=20.0, age_s=0.0, value=20)
    second = asyncio.create_task(dispatcher.admit(other.take, True, other.timing))
    await settle()
    assert det.calls == []
    started = time.monotonic()
    held.cancel()
    await asyncio.wait_for(second, 2.0)
    assert det.calls == [[20]]
    assert time.monotonic() - started < 3.0
    assert dispatcher.status()["next_frame_held_s"] < 3.0


@sync
async def test_close_during_a_hold_fails_the_held_waiter_at_once() -> None:
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, _one_call(9.0))
    cam = Camera(interval_s=20.0, age_s=12.0, value=1)  # its next one due in 8 s
    held = asyncio.create_task(dispatcher.admit(cam.take, True, cam.timing))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(dispatcher.close(), 3.0)
    with pytest.raises(DispatcherClosed):
        await held
    assert det.calls == []
    assert cam.value == 1  # its frame stays in the mailbox
    assert 0 < dispatcher.status()["next_frame_held_s"] < 3.0


@sync
async def test_a_processor_offers_its_frames_timing_only_when_live() -> None:
    """A live camera's admission carries its mailbox's frame timing; a lossless
    replay's carries none, so its frames are never held."""
    offered: dict[str, Any] = {}

    def admit_for(sid: str) -> Any:
        async def admit(take: Any, live: bool, timing: Any) -> DetectResult | None:
            offered[sid] = timing
            request = take()
            return None if request is None else _result(request)

        return admit

    settings = ProcessingSettings(error_pause_s=0)
    sink = RingBufferSink(100)
    procs = [
        SubscriptionProcessor(make(sid), "demo", 32, None, sink, settings, admit=admit_for(sid))
        for make, sid in ((live_sub, "d1;live"), (replay_sub, "d2;replay"))
    ]
    image = np.zeros((32, 32, 3), np.uint8)
    for p in procs:
        p.start()
        p.mailbox.put(image, 1e9)
    await until(lambda: all(p.processed == 1 for p in procs))
    for p in procs:
        await p.stop()
    assert offered["d1;live"] == procs[0].mailbox.timing
    assert offered["d2;replay"] is None
