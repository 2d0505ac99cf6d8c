"""Subscriptions, the reader thread, tracking, the per-frame flow and events — no Ray."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from demo.datasets import HELD_OUT_SEED_START, write_clip
from demo.metrics import id_switches
from deployments.inference.engines import EngineOptions, load_engine
from graph.common.detection import DetectRequest, DetectResult
from graph.common.errors import DetectorBusy
from graph.common.redaction import redact
from graph.config import PROJECT_ROOT
from graph.events.model import RingBufferSink, StreamEvent
from stream_actors.clock import SYSTEM_CLOCK, Clock, ManualClock
from stream_actors.mailbox import LatestFrameMailbox
from stream_actors.processor import ProcessingSettings, SubscriptionProcessor
from stream_actors.reader import ReaderPolicy, StreamReader, StreamState
from stream_actors.sources import CapturedFrame, SourceConnectionError
from stream_actors.subscriptions import (
    RegistryState,
    StreamSpec,
    Subscription,
    SubscriptionTable,
    load_state,
    save_state,
    stream_key,
)
from stream_actors.tracking import Tracker


def sub(sid: str, **kw: object) -> Subscription:
    body: dict[str, object] = {"subscriptionIdentifier": sid, **kw}
    if not any(k in kw for k in ("rtspUrl", "snapshotUrl", "fileUrl")):
        body["rtspUrl"] = "rtsp://127.0.0.1/cam"
    return Subscription.model_validate(body)


# ---- subscriptions -------------------------------------------------------------------
def test_the_detector_worker_payload_is_accepted_and_ids_are_split() -> None:
    s = Subscription.model_validate(
        {
            "subscriptionIdentifier": "display-001;cam-001",
            "snapshotUrl": "http://10.0.0.2/snap.jpg",
            "snapshotInterval": 5000,
            "modelUrl": "http://x/model.mpta",
            "modelId": 101,
            "modelName": "Vehicle Detection",
            "cropX1": 100,
            "cropY1": 200,
            "cropX2": 300,
            "cropY2": 400,
        }
    )
    assert (s.display_id, s.camera_id, s.kind, s.modelId) == (
        "display-001",
        "cam-001",
        "snapshot",
        "101",
    )
    assert s.crop == (100, 200, 300, 400)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"subscriptionIdentifier": "nocamera", "rtspUrl": "rtsp://h/"}, "subscriptionIdentifier"),
        ({"subscriptionIdentifier": "d;c"}, "one of rtspUrl, snapshotUrl, fileUrl is required"),
        (
            {"subscriptionIdentifier": "d;c", "rtspUrl": "rtsp://h/", "fileUrl": "/a.mp4"},
            "fileUrl cannot be combined",
        ),
        ({"subscriptionIdentifier": "d;c", "rtspUrl": "http://h/"}, "rtspUrl"),
        ({"subscriptionIdentifier": "d;c", "snapshotUrl": "ftp://h/"}, "snapshotUrl"),
        ({"subscriptionIdentifier": "d;c", "fileUrl": "../etc/passwd"}, "fileUrl"),
        ({"subscriptionIdentifier": "d;c", "rtspUrl": "rtsp://h/", "cropX1": 5}, "go together"),
        (
            {
                "subscriptionIdentifier": "d;c",
                "rtspUrl": "rtsp://h/",
                "cropX1": 9,
                "cropY1": 0,
                "cropX2": 5,
                "cropY2": 5,
            },
            "cropX2 > cropX1",
        ),
        ({"subscriptionIdentifier": "d;c", "rtspUrl": "rtsp://h/", "extra": 1}, "extra"),
    ],
)
def test_bad_payloads_are_refused_naming_the_problem(body: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Subscription.model_validate(body)
    assert field in str(info.value)


def test_shared_streams_are_reference_counted_and_packed_onto_actors() -> None:
    table = SubscriptionTable(streams_per_actor=2)
    changed, stopped = table.add(sub("d1;a", rtspUrl="rtsp://h/a"))
    key_a = stream_key(sub("x;y", rtspUrl="rtsp://h/a"))
    assert changed == {key_a} and not stopped
    table.add(sub("d2;a", rtspUrl="rtsp://h/a", snapshotInterval=200))
    assert len(table.stream_keys()) == 1 and len(table.subscribers(key_a)) == 2
    for i in range(3):
        table.add(sub(f"d;cam{i}", rtspUrl=f"rtsp://h/{i}"))
    load: dict[int, int] = {}
    for index in table.placement.values():
        load[index] = load.get(index, 0) + 1
    assert sorted(load.values()) == [2, 2] and len(load) == 2
    assert table.remove("d1;a") == ({key_a}, set())  # still used by d2;a
    assert table.remove("d2;a") == (set(), {key_a})  # the last one: stop it
    assert key_a not in table.placement
    # A freed slot is reused before a new actor is started.
    table.add(sub("d;new", rtspUrl="rtsp://h/new"))
    assert max(table.placement.values()) == 1


def test_moving_a_subscription_to_another_url_stops_its_old_stream() -> None:
    table = SubscriptionTable(4)
    table.add(sub("d;c", rtspUrl="rtsp://h/old"))
    changed, stopped = table.add(sub("d;c", rtspUrl="rtsp://h/new"))
    assert stopped == {stream_key(sub("x;y", rtspUrl="rtsp://h/old"))}
    assert changed == {stream_key(sub("x;y", rtspUrl="rtsp://h/new"))}


def test_a_shared_snapshot_is_polled_for_its_most_demanding_subscriber() -> None:
    table = SubscriptionTable(4)
    table.add(sub("d1;c", snapshotUrl="http://h/s.jpg", snapshotInterval=1000))
    table.add(sub("d2;c", snapshotUrl="http://h/s.jpg", snapshotInterval=250))
    (key,) = table.stream_keys()
    assert table.spec(key) == StreamSpec(
        key=key, kind="snapshot", url="http://h/s.jpg", snapshot_interval_s=0.25
    )


def test_state_round_trips_through_an_atomic_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "streams.json"
    assert load_state(path) == RegistryState()
    table = SubscriptionTable(4)
    table.add(sub("d;c", targetFps=5, cropX1=0, cropY1=0, cropX2=10, cropY2=10))
    save_state(path, table.state())
    restored = SubscriptionTable(4, load_state(path))
    assert restored.subs == table.subs and restored.placement == table.placement
    assert [p.name for p in path.parent.iterdir()] == ["streams.json"]  # no temp files left


def test_passwords_are_masked_in_urls() -> None:
    assert redact("rtsp://admin:s3cret@10.0.0.7:554/s1") == "rtsp://admin:***@10.0.0.7:554/s1"
    assert redact("rtsp://10.0.0.7/s1") == "rtsp://10.0.0.7/s1"


# ---- the reader thread ---------------------------------------------------------------
class ScriptedSource:
    """A source factory whose connections follow a script: "fail", an int (that many
    frames, then the stream ends with an error) or "hang" (one frame, then blocks until
    that connection's event in `hangs` is set). Frames are stamped by `clock`."""

    def __init__(self, script: list[object], clock: Clock = SYSTEM_CLOCK) -> None:
        self.script, self.opens, self.clock = list(script), 0, clock
        self.hangs: list[threading.Event] = []  # one per "hang" connection, in order

    def __call__(
        self, spec: StreamSpec, policy: ReaderPolicy, keyframes_only: object = None
    ) -> Iterator[CapturedFrame]:
        self.opens += 1
        step = self.script.pop(0) if self.script else "fail"
        if step == "fail":
            raise SourceConnectionError(spec.url, "refused")
        if step == "hang":
            self.hangs.append(threading.Event())
            return self._hang(self.hangs[-1])
        assert isinstance(step, int)
        return self._frames(step)

    def _hang(self, release: threading.Event) -> Iterator[CapturedFrame]:
        yield CapturedFrame(np.zeros((8, 8, 3), np.uint8), self.clock.time())
        release.wait(30)

    def _frames(self, count: int) -> Iterator[CapturedFrame]:
        for _ in range(count):
            yield CapturedFrame(np.zeros((8, 8, 3), np.uint8), self.clock.time())
        raise SourceConnectionError("x", "stream ended")


class NoJitter(random.Random):
    """Backoff without jitter: every delay is its ceiling, base × 2**attempt."""

    def random(self) -> float:
        return 0.0


SPEC = StreamSpec(key="k", kind="rtsp", url="rtsp://h/x")
# Binary fractions only: the manual clock adds them up exactly.
STEPPED = ReaderPolicy(
    backoff_base_s=0.5, backoff_cap_s=2.0, breaker_failures=3, breaker_open_s=8.0, watchdog_s=4.0
)


def wait_for(predicate: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def test_failures_reconnect_with_backoff_and_frames_reach_every_mailbox() -> None:
    """Given a camera that refuses, streams 5 frames, refuses again, then streams: each
    failure waits out its backoff (reset by the frames), and every frame reaches both
    subscribers."""
    clock = ManualClock()
    source = ScriptedSource(["fail", 5, "fail", "hang"], clock)
    reader = StreamReader(SPEC, STEPPED, source_factory=source, clock=clock, rng=NoJitter())
    a, b = LatestFrameMailbox(clock=clock), LatestFrameMailbox(clock=clock)
    reader.attach("a", a)
    reader.attach("b", b)
    reader.start()
    try:
        clock.run_until(1.0)
        # Refused at 0 s; 5 frames at 0.5 s, then the end; refused again at 1 s.
        assert (source.opens, reader.frames_read, reader.reconnects) == (3, 5, 2)
        assert clock.sleeps == [0.5, 0.5, 1.0]  # 0.5 s, reset by the frames: 0.5, 1 s
        assert reader.state is StreamState.RECONNECTING
        clock.advance(1.0)
        wait_for(lambda: reader.frames_read == 6)
        assert reader.state is StreamState.CONNECTED and reader.reconnects == 3
        assert a.received == b.received == 6
        assert list(reader.outages_s) == [0.5, 1.5]  # down 0 → 0.5 s and 0.5 → 2 s
        assert "refused" in (reader.last_error or "")
        status = reader.status()
        assert status["fps_in"] == 3.0 and status["last_frame_age_s"] == 0.0  # 6 in 2 s
        clock.advance(0.25)
        assert reader.status()["last_frame_age_s"] == 0.25
    finally:
        reader.stop()
        for hang in source.hangs:
            hang.set()
    assert reader.join(2)


def test_the_circuit_opens_after_repeated_failures_and_the_budget_is_asked() -> None:
    """Given a camera that always refuses (3 failures open the circuit for 8 s): no
    attempt while it is open, one trial when it ends, and every reconnect (not the
    first attempt) asks the cluster-wide budget."""
    clock = ManualClock()
    asked: list[float] = []

    def acquire() -> float:
        asked.append(clock.monotonic())
        return 0.0

    reader = StreamReader(
        SPEC,
        STEPPED,
        acquire_reconnect=acquire,
        source_factory=ScriptedSource([], clock),
        clock=clock,
        rng=NoJitter(),
    )
    reader.start()
    try:
        clock.run_until(1.5)  # failures at 0, 0.5 and 1.5 s: the third opens it
        status = reader.status()
        assert reader.state is StreamState.CIRCUIT_OPEN and status["circuit"] == "open"
        assert status["consecutive_failures"] == 3
        clock.run_until(9.0)  # still open (until 1.5 + 8 s): nothing tried
        assert reader.status()["consecutive_failures"] == 3 and reader.reconnects == 2
        clock.run_until(9.5)  # the cool-down is over: one trial, which fails
        status = reader.status()
        assert status["consecutive_failures"] == 4 and status["circuit"] == "open"
        assert asked == [0.5, 1.5, 9.5] and reader.reconnects == 3
        # Backoff 0.5, 1, 2 s; while open, a look every second (capped at the time left);
        # after the failed trial the backoff goes on at its cap.
        assert clock.sleeps == [0.5, 1.0, 2.0, *[1.0] * 6, 2.0]
    finally:
        reader.stop()
    assert reader.join(2)


def test_the_watchdog_replaces_a_frozen_reader_and_the_stuck_thread_exits() -> None:
    clock = ManualClock()
    source = ScriptedSource(["hang", "hang"], clock)
    reader = StreamReader(SPEC, STEPPED, source_factory=source, clock=clock)
    reader.start()
    try:
        wait_for(lambda: reader.frames_read == 1)
        assert reader.state is StreamState.CONNECTED
        clock.advance(4.0)
        assert not reader.check_watchdog()  # silent for exactly watchdog_s: not yet
        clock.advance(0.5)
        assert reader.check_watchdog()
        assert reader.last_error == "no frame for 4.5s (watchdog)"
        wait_for(lambda: reader.frames_read == 2)  # the replacement connected
        assert reader.threads_alive() == 2  # the stuck one and its replacement
        assert list(reader.outages_s) == [0.0]  # it connected at once
        source.hangs[0].set()  # the frozen read finally returns: that thread must exit
        wait_for(lambda: reader.threads_alive() == 1)
        assert reader.watchdog_restarts == 1 and reader.state is StreamState.CONNECTED
        assert reader.frames_read == 2 and source.opens == 2
        assert not reader.check_watchdog()
    finally:
        reader.stop()
        for hang in source.hangs:
            hang.set()
    assert reader.join(2)


# ---- tracking and the per-frame flow -----------------------------------------------------
def test_tracks_keep_their_ids_while_boxes_move() -> None:
    tracker = Tracker()
    ids = []
    for i in range(10):
        rows = np.array(
            [
                [10 + 5 * i, 10, 60 + 5 * i, 50, 0.9, 0],
                [400 - 6 * i, 200, 460 - 6 * i, 300, 0.8, 1],
            ],
            np.float32,
        )
        tracked = tracker.update(rows)
        ids.append(tuple(sorted((idx, ob.track_id) for idx, ob in tracked)))
    assert len(set(ids[1:])) == 1 and len(ids[-1]) == 2
    # Frames without detections (an empty scene) age the tracks and report nothing.
    assert tracker.update(np.zeros((0, 6), np.float32)) == []
    assert Tracker().update(np.zeros((0, 6), np.float32)) == []


def test_id_switch_counting() -> None:
    box = (0.0, 0.0, 10.0, 10.0)
    truth = [[(1, box)], [(1, box)], [(1, box)]]
    assert id_switches(truth, [[(7, box)], [(7, box)], [(7, box)]]) == (0, 1)
    assert id_switches(truth, [[(7, box)], [(8, box)], [(7, box)]]) == (2, 1)


def test_the_per_frame_flow_tracks_a_real_clip_against_its_ground_truth(tmp_path: Path) -> None:
    """Given a held-out scene clip, when its frames go through the processor with the
    demo detector in-process, then vehicles become stable objects with steady ids."""
    import json

    from stream_actors.sources import PyAVSource

    clip = write_clip(HELD_OUT_SEED_START + 20, 60, tmp_path / "c.mp4", fps=10, scale=0.5)
    truth = json.loads(clip.with_suffix(".json").read_text())
    engine = load_engine(PROJECT_ROOT / "models" / "demo-detector.onnx", EngineOptions(640, 2))

    async def detect(model_id: str, request: DetectRequest) -> DetectResult:
        rows = engine.detect(request.image[None], [request.params])[0]
        return DetectResult(rows, engine.names)

    async def run() -> list[StreamEvent]:
        sink = RingBufferSink(10_000)
        s = sub("d;c", fileUrl=str(clip))
        processor = SubscriptionProcessor(s, "demo", 640, detect, sink, ProcessingSettings())
        processor.start()
        for i, frame in enumerate(PyAVSource(str(clip)).frames()):
            # Capture times as a live 10 fps camera would stamp them (decoding is faster).
            processor.mailbox.put(frame.image, 1e9 + i / 10)
            while processor.processed < processor.mailbox.received:  # one at a time
                await asyncio.sleep(0.001)
        await processor.stop()
        assert processor.status()["drops"]["superseded"] == 0
        return sink.after("d;c", 0, 10_000)

    evts = asyncio.run(run())
    detections = [e for e in evts if e.kind == "detection"]
    assert len(detections) == 60
    truths = [
        [
            (o["object_id"], o["box"])
            for o in f["objects"]
            if o["cls"] == "vehicle" and o["visible_fraction"] >= 0.5 and not o["truncated"]
        ]
        for f in truth["frames"]
    ]
    tracks = [
        [
            (d.track_id, d.box)
            for d in e.detections
            if d.track_id is not None and d.label == "vehicle"
        ]
        for e in detections
    ]
    switches, objects = id_switches(truths, tracks)
    assert objects >= 5 and switches == 0
    new = [e for e in evts if e.kind == "new"]
    assert len(new) >= objects - 1  # almost every vehicle became a stable object
    assert all(e.obj is not None and e.obj.confidence >= 0.5 for e in new)


def test_the_ring_buffer_keeps_the_newest_events_with_increasing_ids() -> None:
    sink = RingBufferSink(capacity=3)
    base = dict(camera_id="c", model_id="m", captured_at=0.0, detected_at=0.0)
    sink.publish([StreamEvent("detection", "s", frame_seq=i, **base) for i in range(5)])  # type: ignore[arg-type]
    kept = sink.after("s")
    assert [e.frame_seq for e in kept] == [2, 3, 4] and [e.id for e in kept] == [3, 4, 5]
    assert sink.dropped == 2 and [e.id for e in sink.after("s", 4)] == [5]


def test_decoding_drops_to_key_frames_while_nobody_needs_more(tmp_path: Path) -> None:
    """Given a 10 fps file (3 s, looped) with a key frame every second, played on a
    manual clock: when its only subscriber takes nothing, the reader decodes key frames
    only; once the subscriber takes every frame it gets again, all frames are decoded."""
    clip = write_clip(HELD_OUT_SEED_START + 1, 30, tmp_path / "k.mp4", fps=10, scale=0.25)
    spec = StreamSpec(key="k", kind="file", url=str(clip), loop=True)
    clock = ManualClock()
    reader = StreamReader(spec, ReaderPolicy(decode_window_s=1.0), clock=clock)
    mailbox = LatestFrameMailbox(clock=clock)
    reader.attach("s", mailbox)

    def reads_per_second(seconds: int) -> list[int]:
        counts = []
        for _ in range(seconds):
            before = reader.frames_read
            clock.run_until(clock.monotonic() + 1.0)
            counts.append(reader.frames_read - before)
        return counts

    reader.start()
    try:
        clock.run_until(1.95)
        assert reader.frames_read == 20 and reader.fps(1.0) == 10.0
        assert not reader.keyframes_only
        clock.run_until(2.0)  # the second window in a row with nothing taken
        assert reader.keyframes_only and reader.decode_switches == 1
        clock.run_until(2.5)
        # One key frame a second, and the clip's first frame (a key frame) where it loops
        # at once: the skipped rest of the clip is not waited for.
        assert reads_per_second(4) == [1, 2, 1, 2]
        taken = []
        for _ in range(3):  # from 6.5 s the subscriber takes every frame it is given
            if (frame := mailbox.take()) is not None:
                taken.append(frame.seq)
            clock.run_until(clock.monotonic() + 0.5)
            assert reader.keyframes_only == (clock.monotonic() < 8.0)
        # Frame 27 was superseded by 28 (the loop's first, at the same instant); in the
        # window to 8 s every frame given was taken: all frames again.
        assert taken == [28, 29] and reader.decode_switches == 2
        clock.run_until(9.95)
        assert reader.fps(1.0) == 10.0 and reader.decode_switches == 2
    finally:
        reader.stop()
        clock.advance(60.0)  # wakes the paced read, which then sees the stop
    assert reader.join(5)


def test_a_spent_reconnect_budget_holds_reconnects_back() -> None:
    """Given the cluster-wide token bucket allowing 4 reconnects/s (burst 1), a camera
    that fails instantly reconnects exactly 8 times in 2 s: the burst, then one each
    time a token comes (every 0.25 s), not hundreds."""
    from stream_actors.reconnect import TokenBucket

    clock = ManualClock()
    bucket = TokenBucket(rate_per_s=4, burst=1, clock=clock.monotonic)
    granted: list[float] = []

    def acquire() -> float:
        wait_s = bucket.try_acquire()
        if wait_s == 0.0:
            granted.append(clock.monotonic())
        return wait_s

    policy = ReaderPolicy(backoff_base_s=1 / 64, backoff_cap_s=1 / 64, breaker_failures=1000)
    reader = StreamReader(
        SPEC,
        policy,
        acquire_reconnect=acquire,
        source_factory=ScriptedSource([], clock),
        clock=clock,
        rng=NoJitter(),
    )
    reader.start()
    try:
        clock.run_until(2.0)
        assert reader.reconnects == 8
        assert granted == [(1 + 16 * k) / 64 for k in range(8)]
        # After each failure the backoff (1/64 s), then the wait for the next token.
        assert clock.sleeps == [1 / 64, *[1 / 64, 15 / 64] * 8]
    finally:
        reader.stop()
    assert reader.join(2)


def test_a_lossless_file_replay_hands_over_every_frame_to_a_slow_consumer(
    tmp_path: Path,
) -> None:
    clip = write_clip(HELD_OUT_SEED_START + 21, 20, tmp_path / "c.mp4", fps=10, scale=0.25)
    table = SubscriptionTable(4)
    table.subs["d;c"] = Subscription(
        subscriptionIdentifier="d;c", fileUrl=str(clip), fileLoop=False, fileRealtime=False
    )
    (key,) = table.stream_keys()
    spec = table.spec(key)
    assert spec.lossless
    reader = StreamReader(spec, ReaderPolicy(), lambda: 0.0)
    mailbox = LatestFrameMailbox()
    reader.attach("d;c", mailbox)
    reader.start()
    seqs = []
    while len(seqs) < 20:
        frame = mailbox.take(timeout_s=10)
        assert frame is not None, f"frame {len(seqs) + 1} never came"
        seqs.append(frame.seq)
        time.sleep(0.03)  # slower than the file could be read
    assert reader.join(10)
    assert seqs == list(range(1, 21)) and sum(mailbox.drops.values()) == 0


async def until(predicate: Callable[[], bool], polls: int = 200) -> None:
    """Let the processor's tasks run until `predicate` holds (at most `polls` x 10 ms);
    the assertions after it say what was expected."""
    for _ in range(polls):
        if predicate():
            return
        await asyncio.sleep(0.01)


def test_a_detector_call_that_never_returns_frees_the_slot_after_its_timeout() -> None:
    """Given a replica that hangs on its first call, the subscription's only slot is
    freed after `detect_timeout_s` (a detector error, counted and said), and the next
    frame goes through."""
    calls = 0

    async def detect(model_id: str, request: DetectRequest) -> DetectResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # a hung replica: never answers
        return DetectResult(np.zeros((0, 6), np.float32), {0: "vehicle"})

    async def run() -> dict[str, object]:
        settings = ProcessingSettings(detect_timeout_s=0.2, error_pause_s=0)
        sink = RingBufferSink(100)
        processor = SubscriptionProcessor(sub("d;c"), "demo", 64, detect, sink, settings)
        processor.start()
        image = np.zeros((48, 64, 3), np.uint8)
        processor.mailbox.put(image, 1e9)
        await until(lambda: calls == 1 and processor.status()["drops"]["detector_error"] == 1)
        processor.mailbox.put(image, 1e9 + 1)
        await until(lambda: processor.processed == 1)
        await processor.stop()
        return processor.status()

    status = asyncio.run(run())
    assert status["drops"]["detector_error"] == 1  # type: ignore[index]
    assert status["processed"] == 1
    assert status["last_error"] is None  # cleared by the frame that went through


def test_a_busy_detector_drops_the_frame_as_back_pressure_not_as_an_error() -> None:
    """Given a detector that refuses the first frame (its queue full), that frame is
    counted a back-pressure drop with no error and no pause, and the next one is
    processed."""
    calls = 0

    async def detect(model_id: str, request: DetectRequest) -> DetectResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DetectorBusy(model_id, "num_queued_requests=4, max_queued_requests=4")
        return DetectResult(np.zeros((0, 6), np.float32), {0: "vehicle"})

    async def run() -> dict[str, object]:
        settings = ProcessingSettings(error_pause_s=30)  # after an error: no frame for 30 s
        processor = SubscriptionProcessor(
            sub("d;c"), "demo", 64, detect, RingBufferSink(100), settings
        )
        processor.start()
        image = np.zeros((48, 64, 3), np.uint8)
        processor.mailbox.put(image, 1e9)
        await until(lambda: processor.status()["drops"]["back_pressure"] == 1)
        processor.mailbox.put(image, 1e9 + 1)
        await until(lambda: processor.processed == 1)
        await processor.stop()
        return processor.status()

    status = asyncio.run(run())
    assert status["drops"]["back_pressure"] == 1  # type: ignore[index]
    assert status["drops"]["detector_error"] == 0  # type: ignore[index]
    assert status["processed"] == 1 and status["last_error"] is None
