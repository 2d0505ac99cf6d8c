"""The worker's messages of the detector-worker WebSocket protocol
(deployments.api.ws_protocol), without Ray or a network: `error`, acks, `eventsDropped`,
`imageDetection` from real EventHub events (`hub_event` through `EventLog.publish`), and
`stateReport`. Parsing client messages is in test_ws_protocol.py."""

import json
import re
from typing import Any

import pytest

from deployments.api import ws_protocol as wsp
from graph.events.model import StreamEvent, TrackedDetection, hub_event
from graph.events.ring import EventLog
from stream_actors.stability import ObjectEvent
from stream_actors.subscriptions import Subscription

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SUB = "display-1;cam-1"


def msg(kind: str, payload: Any = None, **extra: Any) -> str:
    message: dict[str, Any] = {"type": kind, **extra}
    if payload is not None:
        message["payload"] = payload
    return json.dumps(message)


def test_error_message_renders_the_protocol_error() -> None:
    with pytest.raises(wsp.ProtocolError) as caught:
        wsp.parse(msg("patchSession", {"sessionId": 1, "data": "x"}, requestId="p1"))
    rendered = wsp.error_message(caught.value)
    assert rendered["type"] == "error" and rendered["requestType"] == "patchSession"
    assert rendered["message"] == caught.value.message
    assert rendered["details"] == caught.value.details and rendered["requestId"] == "p1"
    assert ISO.match(rendered["timestamp"])
    json.dumps(rendered)
    plain = wsp.error_message(wsp.ProtocolError("binary frames are not accepted"))
    assert "requestId" not in plain
    assert plain["requestType"] is None and plain["details"] == []


def test_ack_and_events_dropped() -> None:
    assert wsp.ack("subscribe", None, subscriptionIdentifier=SUB) == {
        "type": "subscribeAck",
        "status": "success",
        "subscriptionIdentifier": SUB,
    }
    assert wsp.ack("setSessionId", 0, sessionId=None)["requestId"] == 0  # falsy ids come back
    dropped = wsp.events_dropped({"type": "dropped", "count": 7, "reason": "slow_client"})
    assert dropped["type"] == "eventsDropped" and dropped["count"] == 7
    assert dropped["reason"] == "slow_client" and ISO.match(dropped["timestamp"])


def detection_event(*detections: TrackedDetection, **extra: Any) -> StreamEvent:
    return StreamEvent(
        "detection",
        subscription_id=SUB,
        camera_id="cam-1",
        model_id="demo",
        frame_seq=17,
        captured_at=1_700_000_000.1239,
        detected_at=1_700_000_000.3,
        detections=detections,
        extra=extra,
    )


CAR = TrackedDetection(3, 2, "car", 0.91, (10.0, 20.0, 110.0, 90.0), True)
PERSON = TrackedDetection(None, 0, "person", 0.55, (400.5, 30.0, 450.0, 160.0), False)
TRUCK = TrackedDetection(8, 7, "truck", 0.62, (600.0, 200.0, 900.0, 420.0), False)


def published(log: EventLog, *events: StreamEvent) -> list[dict[str, Any]]:
    before = log.last_id
    log.publish([hub_event(e) for e in events])
    return log.read(before).events


def test_image_detection_from_a_real_hub_event() -> None:
    log = EventLog()
    log.publish([hub_event(detection_event(CAR))])  # id 1: ids are the hub's
    (event,) = published(log, detection_event(PERSON, CAR, TRUCK, model_name="Demo vehicles"))
    rendered = wsp.image_detection(event)
    json.dumps(rendered)
    assert rendered["type"] == "imageDetection"
    assert rendered["subscriptionIdentifier"] == SUB
    assert rendered["eventId"] == 2
    assert rendered["timestamp"] == "2023-11-14T22:13:20.123Z"  # the capture time
    data = rendered["data"]
    assert data["frameSeq"] == 17 and data["modelId"] == "demo"
    assert data["modelName"] == "Demo vehicles" and data["sessionId"] is None
    assert [d["class"] for d in data["detections"]] == ["person", "car", "truck"]
    assert data["detection"] == {
        "class": "car",
        "classId": 2,
        "confidence": 0.91,
        "bbox": [10.0, 20.0, 110.0, 90.0],
        "trackId": 3,
        "stable": True,
    }
    assert data["detections"][0] == {
        "class": "person",
        "classId": 0,
        "confidence": 0.55,
        "bbox": [400.5, 30.0, 450.0, 160.0],
        "trackId": None,
        "stable": False,
    }


def test_a_frame_without_detections_has_no_best_detection() -> None:
    (event,) = published(EventLog(), detection_event())
    data = wsp.image_detection(event)["data"]
    assert data["detection"] is None and data["detections"] == []
    assert data["modelName"] is None


def test_session_id_is_stamped_by_the_hub_after_set_session() -> None:
    log = EventLog()
    (before,) = published(log, detection_event(CAR))
    log.set_session("display-1", 4242)
    log.set_session("display-2", "other")
    (during,) = published(log, detection_event(CAR))
    log.set_session("display-1", None)  # null clears
    (after,) = published(log, detection_event(CAR))
    sessions = [wsp.image_detection(e)["data"]["sessionId"] for e in (before, during, after)]
    assert sessions == [None, 4242, None]
    assert during["session_id"] == 4242 and during["display_id"] == "display-1"


def test_only_detection_events_carry_detections() -> None:
    lifecycle = StreamEvent(
        "new",
        subscription_id=SUB,
        camera_id="cam-1",
        model_id="demo",
        frame_seq=17,
        captured_at=1.0,
        detected_at=2.0,
        obj=ObjectEvent("new", 3, 2, (10.0, 20.0, 110.0, 90.0), 0.91, 17),
    )
    (event,) = published(EventLog(), lifecycle)
    assert event["type"] == "new" and "detections" not in event["data"]
    assert event["data"]["object"]["track_id"] == 3
    assert wsp.image_detection(event)["data"]["detection"] is None


def stream_listing() -> dict[str, Any]:
    """`GET /streams` as the registry lists it (the fields stateReport reads)."""
    return {
        "streams": [
            {
                "key": "rtsp-6f1c0e2b9a7d4410",
                "subscription_ids": ["display-1;cam-1", "display-2;cam-1"],
                "state": "connected",
                "fps_in": 10.0,
                "last_error": None,
                "subscriptions": [
                    {
                        "subscription_id": "display-1;cam-1",
                        "fps_processed": 5.0,
                        "processed": 2601,
                        "drops": {"superseded": 2620, "back_pressure": 9},
                        "latency_ms_p50": 180.2,
                    },
                    {
                        "subscription_id": "display-2;cam-1",
                        "fps_processed": 2.0,
                        "processed": 100,
                        "drops": {},
                        "latency_ms_p50": 90.0,
                    },
                ],
            },
            {
                "key": "rtsp-0000000000000000",
                "subscription_ids": ["display-1;cam-2"],
                "state": "reconnecting",
                "fps_in": 0.0,
                "last_error": "ConnectionRefusedError: [Errno 111]",
                "subscriptions": [],
            },
        ]
    }


def sub(sub_id: str, **fields: Any) -> Subscription:
    return Subscription.model_validate(
        {"subscriptionIdentifier": sub_id, "rtspUrl": "rtsp://10.0.0.7/s1", **fields}
    )


def test_camera_connection_of_a_connected_stream_with_a_crop() -> None:
    stream = stream_listing()["streams"][0]
    s = sub("display-1;cam-1", modelId=42, modelName="Demo", cropX1=0, cropY1=0, cropX2=8, cropY2=9)
    assert wsp.camera_connection(s, stream) == {
        "subscriptionIdentifier": "display-1;cam-1",
        "modelId": "42",
        "modelName": "Demo",
        "online": True,
        "state": "connected",
        "lastError": None,
        "fpsIn": 10.0,
        "fpsProcessed": 5.0,
        "processed": 2601,
        "drops": {"superseded": 2620, "back_pressure": 9},
        "latencyMsP50": 180.2,
        "cropX1": 0,
        "cropY1": 0,
        "cropX2": 8,
        "cropY2": 9,
    }


def test_camera_connection_without_figures_or_stream() -> None:
    failing = stream_listing()["streams"][1]
    down = wsp.camera_connection(sub("display-1;cam-2"), failing)
    assert down["online"] is False and down["state"] == "reconnecting"
    assert down["lastError"] == "ConnectionRefusedError: [Errno 111]" and down["fpsIn"] == 0.0
    assert down["fpsProcessed"] is None and down["processed"] is None
    assert down["drops"] == {} and down["latencyMsP50"] is None
    assert "cropX1" not in down
    unknown = wsp.camera_connection(sub("display-9;cam-9"), None)
    assert unknown["state"] == "unknown" and unknown["online"] is False
    assert unknown["lastError"] is None and unknown["fpsIn"] is None
    assert wsp.camera_connection(sub("d;c"), {})["state"] == "starting"


def test_state_report_lists_this_connections_subscriptions() -> None:
    system = {"cpuUsage": 12.5, "memoryUsage": 40.1, "gpuUsage": None, "gpuMemoryUsage": None}
    subs = {
        s.subscriptionIdentifier: s
        for s in (sub("display-1;cam-2"), sub("display-1;cam-1"), sub("display-3;cam-3"))
    }
    report = wsp.state_report(system, subs, stream_listing()["streams"], 11)
    json.dumps(report)
    assert report["type"] == "stateReport" and ISO.match(report["timestamp"])
    assert report["cpuUsage"] == 12.5 and report["memoryUsage"] == 40.1
    assert report["gpuUsage"] is None and report["gpuMemoryUsage"] is None
    assert report["eventsDropped"] == 11
    connections = report["cameraConnections"]
    assert [c["subscriptionIdentifier"] for c in connections] == [
        "display-1;cam-1",
        "display-1;cam-2",
        "display-3;cam-3",
    ]
    assert [c["state"] for c in connections] == ["connected", "reconnecting", "unknown"]
    assert connections[0]["processed"] == 2601  # its own figures, not display-2's
    assert "display-2;cam-1" not in {c["subscriptionIdentifier"] for c in connections}
    empty = wsp.state_report({}, {}, [], 0)
    assert empty["cameraConnections"] == [] and empty["cpuUsage"] is None


def test_iso_is_utc_with_milliseconds() -> None:
    assert wsp.iso(0) == "1970-01-01T00:00:00.000Z"
    assert wsp.iso(1_700_000_000.1239) == "2023-11-14T22:13:20.123Z"  # truncated
    assert wsp.iso(1_700_000_000.9999) == "2023-11-14T22:13:20.999Z"
    assert ISO.match(wsp.iso())
