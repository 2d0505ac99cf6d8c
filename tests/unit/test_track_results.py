"""A stable object's branch results on the camera side, without Ray: the processor's hook
for the pipeline runner (`SubscriptionProcessor.on_result`, what the camera actor hands
the runner) publishes a `result` event per improvement, and the object's detections carry
its latest results from the next frame on, until its track is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from graph.common.detection import DetectRequest, DetectResult
from graph.events.model import RingBufferSink, StreamEvent, TrackedDetection, hub_event
from stream_actors.processor import ProcessingSettings, SubscriptionProcessor
from stream_actors.stability import StabilityRules
from stream_actors.subscriptions import Subscription

BODY, PLATE = "demo_bodytype_cls_v1", "demo_plate_ocr_v1"
# What the runner hands its hook: per branch the winner, with its class and aliases too.
VAN = {"label": "van", "class": "van", "confidence": 1.0, "body_type": "van"}
PLATE_READ = {"label": "AB123CD", "class": "AB123CD", "confidence": 0.67}
TOLD_VAN = {"label": "van", "confidence": 1.0}
TOLD_PLATE = {"label": "AB123CD", "confidence": 0.67}
# Two vehicles in letterboxed pixels (a 64 x 48 frame, letterboxed to 64).
VAN_ROW = [2.0, 12.0, 22.0, 30.0, 0.9, 0.0]
OTHER_ROW = [40.0, 30.0, 62.0, 52.0, 0.8, 0.0]


async def until(predicate: Callable[[], bool], polls: int = 300) -> None:
    """Let the processor's tasks run until `predicate` holds (at most `polls` x 10 ms)."""
    for _ in range(polls):
        if predicate():
            return
        await asyncio.sleep(0.01)


def test_detections_carry_their_tracks_latest_results_until_the_track_is_lost() -> None:
    rows = [VAN_ROW, OTHER_ROW]

    async def detect(model_id: str, request: DetectRequest) -> DetectResult:
        return DetectResult(np.array(rows, np.float32).reshape(-1, 6), {0: "vehicle"})

    async def run() -> tuple[list[StreamEvent], int]:
        sink = RingBufferSink(1000)
        settings = ProcessingSettings(stability=StabilityRules(min_hits=1, max_misses=2))
        sub = Subscription(
            subscriptionIdentifier="d;c", rtspUrl="rtsp://127.0.0.1/cam", modelName="Vehicles"
        )
        processor = SubscriptionProcessor(sub, "demo", 64, detect, sink, settings)
        processor.start()
        image = np.zeros((48, 64, 3), np.uint8)

        async def frame() -> dict[int | None, TrackedDetection]:
            """One frame through the processor: its detections by track id."""
            done = processor.processed
            processor.mailbox.put(image, time.time())
            await until(lambda: processor.processed > done)
            last = [e for e in sink.after("d;c") if e.kind == "detection"][-1]
            return {d.track_id: d for d in last.detections}

        for _ in range(3):
            seen = await frame()
        assert len(seen) == 2 and None not in seen and all(d.stable for d in seen.values())
        assert all(d.results is None for d in seen.values())
        van = next(t for t, d in seen.items() if t is not None and d.box[0] < 30)
        processor.on_result(van, "vehicle", {BODY: VAN})  # the runner's hook
        seen = await frame()
        assert seen[van].results == {BODY: TOLD_VAN}
        assert [d.results for t, d in seen.items() if t != van] == [None]  # its own only
        processor.on_result(van, "vehicle", {BODY: VAN, PLATE: PLATE_READ})
        for _ in range(2):  # every frame, not once: the latest results
            assert (await frame())[van].results == {BODY: TOLD_VAN, PLATE: TOLD_PLATE}
        rows.remove(VAN_ROW)  # the van leaves, the other vehicle stays
        for _ in range(3):
            seen = await frame()
        assert van not in seen and len(seen) == 1
        lost = [e.obj.track_id for e in sink.after("d;c") if e.kind == "lost" and e.obj]
        assert lost == [van]
        assert processor.track_results == {}  # forgotten with its track
        # A pass that ends after its track was lost still tells clients, and keeps nothing.
        processor.on_result(van, "vehicle", {BODY: VAN})
        assert processor.track_results == {}
        await processor.stop()
        return sink.after("d;c"), van

    events, van = asyncio.run(run())
    told = [e for e in events if e.kind == "result"]
    assert len(told) == 3  # one per improvement, none per frame
    assert [e.extra["results"] for e in told] == [
        {BODY: TOLD_VAN},
        {BODY: TOLD_VAN, PLATE: TOLD_PLATE},
        {BODY: TOLD_VAN},
    ]
    first = told[0]
    assert (first.subscription_id, first.camera_id, first.model_id) == ("d;c", "c", "demo")
    assert first.extra["track_id"] == van and first.extra["class"] == "vehicle"
    assert first.extra["model_name"] == "Vehicles"  # as on the subscription's other events
    # In the hub's shape (SSE, gRPC, the WebSocket), only a track with results has them.
    frames = [hub_event(e)["data"]["detections"] for e in events if e.kind == "detection"]
    assert all("results" not in d for d in frames[0])
    by_track = {d["track_id"]: d for d in frames[3]}
    assert by_track[van]["results"] == {BODY: TOLD_VAN}
    assert [d for t, d in by_track.items() if t != van and "results" in d] == []
