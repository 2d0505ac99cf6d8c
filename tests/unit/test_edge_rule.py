"""The edge rule through a subscription's processor: a vehicle entering at an edge of
what the detector saw becomes a stable object at one detection a second."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from graph.common.detection import DetectRequest, DetectResult
from graph.common.vision import RECT_STRIDE, letterbox, letterbox_boxes
from graph.events.model import RingBufferSink
from stream_actors.processor import ProcessingSettings, SubscriptionProcessor
from stream_actors.subscriptions import Subscription


def sub(sid: str, **kw: object) -> Subscription:
    return Subscription.model_validate(
        {"subscriptionIdentifier": sid, "rtspUrl": "rtsp://127.0.0.1/cam", **kw}
    )


async def until(predicate: Callable[[], bool], polls: int = 2000) -> None:
    for _ in range(polls):
        if predicate():
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("crop", [None, (400, 0, 1100, 720)])
def test_a_vehicle_entering_at_the_edge_becomes_stable_at_one_frame_a_second(
    crop: tuple[int, int, int, int] | None,
) -> None:
    """At one detection a second, a vehicle driving in at the left edge of what the
    detector saw (the frame, or the subscription's crop) is 50, 80 and 128 px wide in
    three hits: its width is cut by the edge, so the growth is no size jitter and the
    track becomes stable (default rules: two hits 0.8 s apart). The same growth clear of
    the edge is a size jump and does not make it stable."""
    left = 0 if crop is None else crop[0]
    _, lb = letterbox(
        np.zeros((720, 1280 - left if crop is None else crop[2] - left, 3), np.uint8),
        640,
        RECT_STRIDE,
    )

    def run(x0: float) -> list[str]:
        boxes = [(x0, 300.0, x0 + w, 380.0) for w in (50, 80, 128)]
        calls = iter(boxes)

        async def detect(model_id: str, request: DetectRequest) -> DetectResult:
            x1, y1, x2, y2 = next(calls)  # frame pixels → the letterboxed image's
            box = letterbox_boxes(np.array([[x1 - left, y1, x2 - left, y2]]), lb)[0]
            return DetectResult(np.array([[*box, 0.9, 0]], np.float32), {0: "vehicle"})

        # a loaded machine must not age a frame out before its turn (2 s by default)
        settings = ProcessingSettings(max_frame_age_s=60)

        async def go() -> list[str]:
            sink = RingBufferSink(100)
            extra = (
                {}
                if crop is None
                else dict(zip(("cropX1", "cropY1", "cropX2", "cropY2"), crop, strict=True))
            )
            processor = SubscriptionProcessor(
                sub("d;c", **extra), "demo", 640, detect, sink, settings
            )
            processor.start()
            for i in range(len(boxes)):
                processor.mailbox.put(np.zeros((720, 1280, 3), np.uint8), 1e9 + i)

                def handled(n: int = i + 1) -> bool:
                    return processor.processed >= n

                await until(handled)
                assert processor.processed == i + 1, processor.status()
            await processor.stop()
            return [e.kind for e in sink.after("d;c", 0, 100) if e.kind != "detection"]

        return asyncio.run(go())

    assert run(left) == ["new"]
    assert run(left + 200) == []  # the same growth in the open: a size jump
