"""The worker's messages of the detector-worker WebSocket protocol
(deployments.api.ws_protocol), without Ray or a network: `error`, acks, `eventsDropped`,
`imageDetection` from real EventHub events (`hub_event` through `EventLog.publish`), and
`stateReport`; the seeds' own messages (tests/unit/seed_messages.py) are the oracle of
the acks and `imageDetection`. Parsing client messages is in test_ws_protocol.py."""

import json
import re
from typing import Any

import pytest

from deployments.api import ws_protocol as wsp
from graph.events.model import StreamEvent, TrackedDetection, hub_event, result_event
from graph.events.ring import EventLog
from stream_actors.stability import ObjectEvent
from stream_actors.subscriptions import RegistryState, Subscription
from tests.unit.seed_messages import (
    assert_seed_keys_kept,
    seed_image_detection,
    seed_subscribe_ack,
    subscribe_example,
)

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
    assert wsp.ack("setSessionId", 0, sessionId=None) == {
        "type": "setSessionIdAck",
        "status": "success",
        "sessionId": None,
        "requestId": 0,  # falsy ids come back
    }
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
    assert set(rendered) == {"type", "payload"}  # extensions live inside payload
    assert rendered["type"] == "imageDetection"
    payload = rendered["payload"]
    assert payload["subscriptionId"] == SUB
    assert payload["timestamp"] == "2023-11-14T22:13:20.123Z"  # the capture time
    assert payload["modelInfo"] == {
        "modelId": "demo",
        "modelName": "Demo vehicles",
        "version": None,
    }
    assert payload["eventId"] == 2 and payload["frameSeq"] == 17 and payload["sessionId"] is None
    assert [d["class"] for d in payload["detections"]] == ["person", "car", "truck"]
    assert payload["detection"] == {
        "class": "car",
        "classId": 2,
        "confidence": 0.91,
        "bbox": [10.0, 20.0, 110.0, 90.0],
        "trackId": 3,
        "stable": True,
    }
    assert payload["detections"][0] == {
        "class": "person",
        "classId": 0,
        "confidence": 0.55,
        "bbox": [400.5, 30.0, 450.0, 160.0],
        "trackId": None,
        "stable": False,
    }
    assert list(payload)[:4] == ["subscriptionId", "detections", "timestamp", "modelInfo"]


def test_a_frame_without_detections_has_no_best_detection() -> None:
    (event,) = published(EventLog(), detection_event())
    payload = wsp.image_detection(event)["payload"]
    assert payload["detection"] is None and payload["detections"] == []
    assert payload["modelInfo"]["modelName"] is None


# ---- the seeds' messages as the oracle --------------------------------------------
def seed_subscription() -> Subscription:
    """001's example subscribe payload: rtspUrl and snapshotUrl, modelId 101, a crop."""
    return Subscription.model_validate(subscribe_example()["payload"])


def test_subscribe_and_unsubscribe_acks_are_the_seeds() -> None:
    sub = seed_subscription()
    ack = wsp.subscribe_ack(sub, "rtsp-6f1c0e2b9a7d4410", None, 1)
    json.dumps(ack)
    seed = seed_subscribe_ack("display-001;cam-001")
    assert_seed_keys_kept(ack, seed)
    assert list(ack)[:3] == ["type", "status", "subscriptionId"]
    extensions = {"subscriptionIdentifier", "modelId", "stream", "pendingError", "requestId"}
    assert set(ack) - set(seed) == extensions
    assert ack["modelId"] == 101 and type(ack["modelId"]) is int  # as the client sent it
    assert ack["subscriptionIdentifier"] == "display-001;cam-001"
    assert ack["stream"] == "rtsp-6f1c0e2b9a7d4410" and ack["pendingError"] is None
    assert ack["requestId"] == 1
    pending = wsp.subscribe_ack(sub, "rtsp-0", "OSError: refused")
    assert "requestId" not in pending and pending["pendingError"] == "OSError: refused"
    # The seed's unsubscribeAck is "likewise" (000 shows only its type): subscribeAck's keys.
    unsub = wsp.unsubscribe_ack("display-001;cam-001", 2)
    seed_unsub = {**seed, "type": "unsubscribeAck"}
    assert_seed_keys_kept(unsub, seed_unsub)
    assert set(unsub) - set(seed_unsub) == {"subscriptionIdentifier", "requestId"}
    assert "requestId" not in wsp.unsubscribe_ack("display-001;cam-001")


def seed_camera_event(sub: Subscription, model_id: str | None) -> dict[str, Any]:
    """The hub event the seed subscription's camera emits for one frame with a car (the
    camera actor runs the model by its text id)."""
    event = StreamEvent(
        "detection",
        subscription_id=sub.subscriptionIdentifier,
        camera_id=sub.camera_id,
        model_id=model_id or "demo",
        frame_seq=17,
        captured_at=1_700_000_000.1239,
        detected_at=1_700_000_000.3,
        detections=(CAR,),
        extra={"model_name": sub.modelName},
    )
    (published_event,) = published(EventLog(), event)
    return published_event


def test_image_detection_is_the_seeds_message_with_the_model_id_as_sent() -> None:
    sub = seed_subscription()
    event = seed_camera_event(sub, sub.modelId)
    assert event["model_id"] == "101"  # what routed to the detector
    rendered = wsp.image_detection(event, sub, {"101": "v7", "demo": None})
    json.dumps(rendered)
    expected = seed_image_detection(
        "display-001;cam-001",
        {
            "detections": [
                {
                    "class": "car",
                    "classId": 2,
                    "confidence": 0.91,
                    "bbox": [10.0, 20.0, 110.0, 90.0],
                    "trackId": 3,
                    "stable": True,
                }
            ],
            "timestamp": "2023-11-14T22:13:20.123Z",
            "model_info": {"modelId": 101, "modelName": "Vehicle Detection", "version": "v7"},
        },
    )
    assert set(rendered) == set(expected)  # nothing beside the seed's keys at the top
    assert_seed_keys_kept(rendered, expected)
    assert rendered["payload"]["modelInfo"] == expected["payload"]["modelInfo"]
    assert type(rendered["payload"]["modelInfo"]["modelId"]) is int
    extensions = {"detection", "eventId", "frameSeq", "sessionId"}
    assert set(rendered["payload"]) - set(expected["payload"]) == extensions


def test_model_info_without_the_connections_subscription_or_a_model_id() -> None:
    sub = seed_subscription()
    event = seed_camera_event(sub, sub.modelId)
    # An event that outran its unsubscribe: no subscription left to echo, the text id.
    assert wsp.image_detection(event)["payload"]["modelInfo"] == {
        "modelId": "101",
        "modelName": "Vehicle Detection",
        "version": None,
    }
    # The subscription named no model: the default model that ran, with its version.
    unnamed = Subscription.model_validate({**subscribe_example()["payload"], "modelId": None})
    default = seed_camera_event(unnamed, None)
    info = wsp.image_detection(default, unnamed, {"demo": "1.2"})["payload"]["modelInfo"]
    assert info == {"modelId": "demo", "modelName": "Vehicle Detection", "version": "1.2"}
    # Replaced by another connection with another model: the model that ran, as text.
    other = wsp.image_detection(seed_camera_event(sub, "demo"), sub)["payload"]["modelInfo"]
    assert other["modelId"] == "demo"


def test_state_report_and_the_registry_keep_the_model_id_as_sent() -> None:
    sub = seed_subscription()
    report = wsp.state_report({}, {sub.subscriptionIdentifier: sub}, [], 0)
    assert report["type"] == "stateReport"  # the one key the seeds give it
    (camera,) = report["cameraConnections"]
    assert camera["modelId"] == 101 and type(camera["modelId"]) is int
    assert camera["subscriptionIdentifier"] == "display-001;cam-001"
    assert camera["modelName"] == "Vehicle Detection"
    crop = (camera["cropX1"], camera["cropY1"], camera["cropX2"], camera["cropY2"])
    assert crop == (100, 200, 300, 400)
    # Persisted by the registry and read back after its restart: still 101.
    state = RegistryState(subscriptions={sub.subscriptionIdentifier: sub})
    restored = RegistryState.model_validate(json.loads(state.model_dump_json()))
    again = restored.subscriptions["display-001;cam-001"]
    assert again.modelId == "101" and again.model_id_sent == 101 and again == sub


def test_session_id_is_stamped_by_the_hub_after_set_session() -> None:
    log = EventLog()
    (before,) = published(log, detection_event(CAR))
    log.set_session("display-1", 4242)
    log.set_session("display-2", "other")
    (during,) = published(log, detection_event(CAR))
    log.set_session("display-1", None)  # null clears
    (after,) = published(log, detection_event(CAR))
    sessions = [wsp.image_detection(e)["payload"]["sessionId"] for e in (before, during, after)]
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
    assert wsp.image_detection(event)["payload"]["detection"] is None


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
        "modelId": 42,  # as the subscription sent it
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


# ---- branch results (camgraph extensions: the seeds have no message for them) -----
BODY, PLATE = "demo_bodytype_cls_v1", "demo_plate_ocr_v1"
RESULTS = {
    BODY: {"label": "van", "confidence": 1.0},
    PLATE: {"label": "AB123CD", "confidence": 0.67},
}


def test_a_detection_whose_track_has_results_carries_them_inside_its_item() -> None:
    sub = seed_subscription()
    van = TrackedDetection(3, 2, "car", 0.91, (10.0, 20.0, 110.0, 90.0), True, RESULTS)
    frame = StreamEvent(
        "detection",
        subscription_id=sub.subscriptionIdentifier,
        camera_id=sub.camera_id,
        model_id="101",
        frame_seq=17,
        captured_at=1_700_000_000.1239,
        detected_at=1_700_000_000.3,
        detections=(PERSON, van),
        extra={"model_name": sub.modelName},
    )
    (event,) = published(EventLog(), frame)
    rendered = wsp.image_detection(event, sub, {"101": "v7"})
    json.dumps(rendered)
    person, car = rendered["payload"]["detections"]
    assert car == {
        "class": "car",
        "classId": 2,
        "confidence": 0.91,
        "bbox": [10.0, 20.0, 110.0, 90.0],
        "trackId": 3,
        "stable": True,
        "results": RESULTS,  # ext: per branch model id, as the `result` event says
    }
    assert "results" not in person  # an item without results is as before
    assert rendered["payload"]["detection"] == car
    # The seed's message, keys and places unchanged: the results are inside the item.
    expected = seed_image_detection(
        "display-001;cam-001",
        {
            "detections": [person, car],
            "timestamp": "2023-11-14T22:13:20.123Z",
            "model_info": {"modelId": 101, "modelName": "Vehicle Detection", "version": "v7"},
        },
    )
    assert set(rendered) == set(expected)
    assert_seed_keys_kept(rendered, expected)
    extensions = {"detection", "eventId", "frameSeq", "sessionId"}
    assert set(rendered["payload"]) - set(expected["payload"]) == extensions


def test_a_result_event_is_an_object_result_message() -> None:
    sub = seed_subscription()
    log = EventLog()
    log.set_session("display-001", 4242)
    runner_results = {
        BODY: {"label": "van", "class": "van", "confidence": 1.0, "body_type": "van"},
        PLATE: {"label": "AB123CD", "class": "AB123CD", "confidence": 0.67},
    }
    told = result_event(
        sub.subscriptionIdentifier,
        sub.camera_id,
        "101",
        3,
        "car",
        runner_results,
        model_name=sub.modelName,
    )
    (event,) = published(log, told)
    assert event["type"] == "result"  # SSE and gRPC carry it as it is
    assert event["data"]["results"] == RESULTS and event["data"]["track_id"] == 3
    rendered = wsp.object_result(event, sub, {"101": "v7"})
    json.dumps(rendered)
    assert set(rendered) == {"type", "payload"}  # shaped as imageDetection
    assert rendered["type"] == "objectResult"
    payload = rendered["payload"]
    assert ISO.match(payload["timestamp"])
    assert payload == {
        "subscriptionId": "display-001;cam-001",
        "trackId": 3,
        "class": "car",
        "results": RESULTS,
        "timestamp": payload["timestamp"],  # when the result was found
        "modelInfo": {"modelId": 101, "modelName": "Vehicle Detection", "version": "v7"},
        "eventId": 1,
        "sessionId": 4242,
    }
    # The same modelInfo as the subscription's imageDetection, without a subscription too.
    frame = wsp.image_detection(seed_camera_event(sub, "101"), sub, {"101": "v7"})
    assert frame["payload"]["modelInfo"] == payload["modelInfo"]
    bare = wsp.object_result(event)["payload"]["modelInfo"]
    assert bare == {"modelId": "101", "modelName": "Vehicle Detection", "version": None}
    assert sorted(wsp.EVENT_TYPES) == ["detection", "result"]  # what a connection receives
