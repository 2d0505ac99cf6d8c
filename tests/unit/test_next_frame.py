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
from stream_actors.dispatch import DetectDispatcher, DispatchSettings
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


@sync
async def test_a_free_call_waits_for_a_frame_about_to_be_superseded() -> None:
    """The frame in turn is 0.8 s old and its successor is due in 0.2 s (a 1 fps
    camera): the call waits for the successor and sends it, not the old one."""
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(hold_for_next_s=0.5))
    cam = Camera(interval_s=1.0, age_s=0.8, value=1)
    sent = asyncio.create_task(dispatcher.admit(cam.take, True, cam.timing))
    await asyncio.sleep(0.01)
    assert det.calls == []  # held
    cam.put(2)
    await asyncio.wait_for(sent, 2.0)
    assert det.calls == [[2]]
    status = dispatcher.status()
    assert status["next_frame_holds"] == 1 and status["next_frame_held_s"] > 0


@sync
async def test_a_held_call_sends_the_old_frame_when_the_next_one_does_not_come() -> None:
    """A camera that stalls: the hold ends after hold_for_next_s plus the slack, and the
    frame there is goes."""
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(hold_for_next_s=0.15))
    cam = Camera(interval_s=1.0, age_s=0.9, value=1)
    started = time.monotonic()
    await asyncio.wait_for(dispatcher.admit(cam.take, True, cam.timing), 2.0)
    assert det.calls == [[1]]
    assert time.monotonic() - started >= 0.15
    assert dispatcher.status()["next_frame_held_s"] >= 0.15


@sync
@pytest.mark.parametrize(
    ("age_s", "live", "hold_s"),
    [(0.1, True, 0.03), (0.8, False, 0.5), (0.8, True, 0.0), (1.5, True, 0.5)],
    ids=["next-not-due-soon", "replay", "off", "overdue"],
)
async def test_a_free_call_sends_at_once_when_waiting_gains_nothing(
    age_s: float, live: bool, hold_s: float
) -> None:
    """No hold when the next frame is not due within hold_for_next_s, for a replay's
    frames (no freshness to lose), with holds off, or when the next frame is overdue."""
    det = Recorder()
    dispatcher = DetectDispatcher(det.send, DispatchSettings(hold_for_next_s=hold_s))
    cam = Camera(interval_s=1.0, age_s=age_s, value=1)
    sent = asyncio.create_task(dispatcher.admit(cam.take, live, cam.timing))
    await settle()
    assert det.calls == [[1]]
    await sent
    assert dispatcher.status()["next_frame_holds"] == 0


@sync
async def test_a_hold_keeps_the_order_of_turns() -> None:
    """While the first waiter's call waits for its next frame, a later waiter with a
    fresh frame does not jump the queue (taking fresh frames out of turn is unfair)."""
    det = Recorder()
    det.gate.clear()
    settings = DispatchSettings(calls_in_flight=1, hold_for_next_s=0.5)
    dispatcher = DetectDispatcher(det.send, settings)
    blocker = asyncio.create_task(dispatcher.admit(lambda: _request(1)))
    await settle()
    stale = Camera(interval_s=1.0, age_s=0.8, value=10)
    fresh = Camera(interval_s=1.0, age_s=0.0, value=20)
    first = asyncio.create_task(dispatcher.admit(stale.take, True, stale.timing))
    second = asyncio.create_task(dispatcher.admit(fresh.take, True, fresh.timing))
    await settle()
    stale.put_at = time.monotonic() - 0.8  # as old as that when the call frees
    det.gate.set()
    await asyncio.sleep(0.01)
    assert det.calls == [[1]]  # held for the first waiter, the second one waits
    stale.put(11)
    await asyncio.wait_for(asyncio.gather(blocker, first, second), 2.0)
    assert det.calls == [[1], [11], [20]]


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
