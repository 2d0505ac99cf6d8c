"""The detector-worker WebSocket protocol (deployments.api.ws_protocol), without Ray or a
network: parsing every client message (and every malformed kind), and rendering worker
messages from real EventHub events (`hub_event` through `EventLog.publish`)."""

import json
import re
from typing import Any

import pytest

from deployments.api import ws_protocol as wsp
from graph.events.hub import EventLog
from graph.events.model import StreamEvent, TrackedDetection, hub_event
from stream_actors.stability import ObjectEvent
from stream_actors.subscriptions import Subscription

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SUB = "display-1;cam-1"


def msg(kind: str, payload: Any = None, **extra: Any) -> str:
    message: dict[str, Any] = {"type": kind, **extra}
    if payload is not None:
        message["payload"] = payload
    return json.dumps(message)


def sub_payload(**fields: Any) -> dict[str, Any]:
    return {"subscriptionIdentifier": SUB, "rtspUrl": "rtsp://10.0.0.7/s1", **fields}


# ---- parse: valid messages ------------------------------------------------------------
def test_subscribe_rtsp_with_every_option() -> None:
    stability = {"min_hits": 2, "min_confidence": 0.6}
    kind, sub, request_id = wsp.parse(
        msg(
            "subscribe",
            sub_payload(
                modelId="demo",
                modelName="Demo vehicles",
                modelUrl="http://models/demo.mpta",
                targetFps=5,
                cropX1=10,
                cropY1=20,
                cropX2=330,
                cropY2=260,
                stability=stability,
            ),
            requestId="r-1",
        )
    )
    assert kind == "subscribe" and request_id == "r-1"
    assert isinstance(sub, Subscription)
    assert sub.subscriptionIdentifier == SUB
    assert (sub.display_id, sub.camera_id) == ("display-1", "cam-1")
    assert sub.kind == "rtsp" and sub.url == "rtsp://10.0.0.7/s1"
    assert sub.modelId == "demo" and sub.modelName == "Demo vehicles"
    assert sub.modelUrl == "http://models/demo.mpta" and sub.targetFps == 5.0
    assert sub.crop == (10, 20, 330, 260)
    assert sub.stability is not None and sub.stability.min_hits == 2


def test_subscribe_snapshot_and_file() -> None:
    payload = {"subscriptionIdentifier": SUB, "snapshotUrl": "http://cam/snap.jpg"}
    _, snap, _ = wsp.parse(msg("subscribe", {**payload, "snapshotInterval": 500}))
    assert snap.kind == "snapshot" and snap.snapshotInterval == 500
    _, default, _ = wsp.parse(msg("subscribe", payload))
    assert default.snapshotInterval == 1000
    file_payload = {"subscriptionIdentifier": SUB, "fileUrl": "file:///data/clip.mp4"}
    _, file, _ = wsp.parse(msg("subscribe", {**file_payload, "fileRealtime": False}))
    assert file.kind == "file" and file.fileUrl == "/data/clip.mp4"
    assert file.fileLoop is True and file.fileRealtime is False


@pytest.mark.parametrize(("given", "kept"), [(42, "42"), ("42", "42"), ("demo", "demo")])
def test_model_id_number_or_text_is_kept_as_text(given: Any, kept: str) -> None:
    _, sub, _ = wsp.parse(msg("subscribe", sub_payload(modelId=given)))
    assert sub.modelId == kept
    _, alias, _ = wsp.parse(msg("subscribe", sub_payload(model_id=given)))
    assert alias.modelId == kept


def test_model_id_is_optional() -> None:
    _, sub, request_id = wsp.parse(msg("subscribe", sub_payload()))
    assert sub.modelId is None and request_id is None


def test_unsubscribe() -> None:
    kind, payload, request_id = wsp.parse(
        msg("unsubscribe", {"subscriptionIdentifier": SUB}, requestId=5)
    )
    assert kind == "unsubscribe" and request_id == 5
    assert isinstance(payload, wsp.UnsubscribePayload)
    assert payload.subscriptionIdentifier == SUB


def test_request_state_has_no_payload_and_ignores_one() -> None:
    assert wsp.parse(msg("requestState")) == ("requestState", None, None)
    assert wsp.parse(msg("requestState", requestId="s")) == ("requestState", None, "s")
    assert wsp.parse(msg("requestState", {"x": 1})) == ("requestState", None, None)


@pytest.mark.parametrize("session", [4242, "abc-1", None])
def test_set_session_id(session: Any) -> None:
    kind, payload, request_id = wsp.parse(
        msg(
            "setSessionId",
            {"displayIdentifier": "display-1", "sessionId": session},
            requestId={"n": 1},
        )
    )
    assert kind == "setSessionId" and request_id == {"n": 1}  # any JSON value comes back
    assert isinstance(payload, wsp.SetSessionPayload)
    assert payload.displayIdentifier == "display-1" and payload.sessionId == session


def test_patch_session() -> None:
    kind, payload, request_id = wsp.parse(
        msg("patchSession", {"sessionId": 4242, "data": {"plate": "AB-123"}}, requestId=9)
    )
    assert kind == "patchSession" and request_id == 9
    assert isinstance(payload, wsp.PatchSessionPayload)
    assert payload.sessionId == 4242 and payload.data == {"plate": "AB-123"}


def test_bytes_are_parsed_as_utf8_json() -> None:
    assert wsp.parse(b'{"type": "requestState"}') == ("requestState", None, None)


def test_a_message_of_exactly_the_limit_is_taken() -> None:
    base = '{"type": "requestState"}'
    text = base + " " * (wsp.MAX_MESSAGE_BYTES - len(base))
    assert len(text.encode()) == wsp.MAX_MESSAGE_BYTES
    assert wsp.parse(text) == ("requestState", None, None)


# ---- parse: malformed messages ------------------------------------------------------
def bad_subscribe(**fields: Any) -> str:
    return msg("subscribe", sub_payload(**fields), requestId="bad")


# (raw message, request_type, request_id, words in the message, field of details[0])
MALFORMED: list[tuple[str | bytes, str | None, Any, str, list[Any] | None]] = [
    ("{not json", None, None, "invalid JSON: ", None),
    (b"\xff\xfe\x00", None, None, "invalid JSON: ", None),
    ("", None, None, "invalid JSON: ", None),
    ("[1, 2]", None, None, "a message must be a JSON object with a 'type'", None),
    ('"subscribe"', None, None, "a message must be a JSON object", None),
    ("null", None, None, "a message must be a JSON object", None),
    ('{"payload": {}, "requestId": 3}', None, 3, "missing 'type'", None),
    ('{"type": 5, "requestId": 3}', None, 3, "'type' must be a string", None),
    (
        '{"type": "launchRocket", "requestId": "x"}',
        "launchRocket",
        "x",
        "unknown message type 'launchRocket'; known: ['patchSession', 'requestState', "
        "'setSessionId', 'subscribe', 'unsubscribe']",
        None,
    ),
    ('{"type": "subscribe"}', "subscribe", None, "'subscribe' needs a 'payload' object", None),
    (
        '{"type": "unsubscribe", "payload": "d;c", "requestId": 1}',
        "unsubscribe",
        1,
        "'unsubscribe' needs a 'payload' object",
        None,
    ),
    (
        '{"type": "subscribe", "payload": {"rtspUrl": "rtsp://x/y"}}',
        "subscribe",
        None,
        "invalid 'subscribe' payload: payload.subscriptionIdentifier: Field required",
        ["payload", "subscriptionIdentifier"],
    ),
    (
        bad_subscribe(cropX1="left", cropY1=0, cropX2=10, cropY2=10),
        "subscribe",
        "bad",
        "payload.cropX1: Input should be a valid integer",
        ["payload", "cropX1"],
    ),
    (
        bad_subscribe(targetFps="fast"),
        "subscribe",
        "bad",
        "payload.targetFps: Input should be a valid number",
        ["payload", "targetFps"],
    ),
    (
        bad_subscribe(targetFps=0),
        "subscribe",
        "bad",
        "payload.targetFps: Input should be greater than 0",
        ["payload", "targetFps"],
    ),
    (
        bad_subscribe(snapshotUrl="http://h/s.jpg"),
        "subscribe",
        "bad",
        "exactly one of rtspUrl, snapshotUrl, fileUrl is required, got ['rtspUrl', 'snapshotUrl']",
        ["payload"],
    ),
    (
        msg("subscribe", {"subscriptionIdentifier": SUB}),
        "subscribe",
        None,
        "exactly one of rtspUrl, snapshotUrl, fileUrl is required, got none",
        ["payload"],
    ),
    (
        bad_subscribe(rtspUrl="http://h/s"),
        "subscribe",
        "bad",
        "payload.rtspUrl: Value error, must be an rtsp:// or rtsps:// URL",
        ["payload", "rtspUrl"],
    ),
    (
        bad_subscribe(cropX1=0),
        "subscribe",
        "bad",
        "cropX1, cropY1, cropX2, cropY2 go together",
        ["payload"],
    ),
    (
        bad_subscribe(cropX1=50, cropY1=0, cropX2=10, cropY2=10),
        "subscribe",
        "bad",
        "the crop needs cropX2 > cropX1 and cropY2 > cropY1",
        ["payload"],
    ),
    (
        bad_subscribe(modelId="no spaces"),
        "subscribe",
        "bad",
        "payload.modelId: Value error, must match",
        ["payload", "modelId"],
    ),
    (
        bad_subscribe(modelId=True),
        "subscribe",
        "bad",
        "payload.modelId: Input should be a valid string",
        ["payload", "modelId"],
    ),
    (
        bad_subscribe(color="red"),
        "subscribe",
        "bad",
        "payload.color: Extra inputs are not permitted",
        ["payload", "color"],
    ),
    (
        msg(
            "subscribe",
            {"subscriptionIdentifier": "no-semicolon", "rtspUrl": "rtsp://h/s"},
            requestId=2,
        ),
        "subscribe",
        2,
        "payload.subscriptionIdentifier: String should match pattern",
        ["payload", "subscriptionIdentifier"],
    ),
    (
        msg("unsubscribe", {"subscriptionIdentifier": "a;b;c"}),
        "unsubscribe",
        None,
        "invalid 'unsubscribe' payload: payload.subscriptionIdentifier",
        ["payload", "subscriptionIdentifier"],
    ),
    (
        msg("unsubscribe", {"subscriptionIdentifier": "d/x;c"}),
        "unsubscribe",
        None,
        "payload.subscriptionIdentifier: String should match pattern",
        ["payload", "subscriptionIdentifier"],
    ),
    (
        msg("setSessionId", {"sessionId": 1}),
        "setSessionId",
        None,
        "invalid 'setSessionId' payload: payload.displayIdentifier: Field required",
        ["payload", "displayIdentifier"],
    ),
    (
        msg("setSessionId", {"displayIdentifier": "display-1"}),
        "setSessionId",
        None,
        "payload.sessionId: Field required",
        ["payload", "sessionId"],
    ),
    (
        msg("setSessionId", {"displayIdentifier": "d;1", "sessionId": 1}),
        "setSessionId",
        None,
        "payload.displayIdentifier: String should match pattern",
        ["payload", "displayIdentifier"],
    ),
    (
        msg("patchSession", {"sessionId": 1, "data": "x"}),
        "patchSession",
        None,
        "invalid 'patchSession' payload: payload.data: Input should be a valid dictionary",
        ["payload", "data"],
    ),
    (
        msg("patchSession", {"data": {}}, requestId=0),
        "patchSession",
        0,
        "payload.sessionId: Field required",
        ["payload", "sessionId"],
    ),
    (
        "x" * (wsp.MAX_MESSAGE_BYTES + 1),
        None,
        None,
        f"message larger than {wsp.MAX_MESSAGE_BYTES} bytes",
        None,
    ),
    (
        b"{" + b" " * wsp.MAX_MESSAGE_BYTES + b"}",
        None,
        None,
        f"message larger than {wsp.MAX_MESSAGE_BYTES} bytes",
        None,
    ),
]


@pytest.mark.parametrize(
    ("raw", "request_type", "request_id", "words", "field"),
    MALFORMED,
    ids=[f"{i}-{str(m[0])[:40]}" for i, m in enumerate(MALFORMED)],
)
def test_malformed_messages_raise_a_protocol_error_naming_the_problem(
    raw: str | bytes, request_type: str | None, request_id: Any, words: str, field: list[Any] | None
) -> None:
    with pytest.raises(wsp.ProtocolError) as caught:
        wsp.parse(raw)
    exc = caught.value
    assert words in exc.message, exc.message
    assert str(exc) == exc.message
    assert exc.request_type == request_type
    assert exc.request_id == request_id
    if field is None:
        assert exc.details == []
    else:
        assert exc.details[0]["loc"] == field
        assert set(exc.details[0]) == {"loc", "msg", "type"}
        assert exc.details[0]["msg"] in exc.message


def test_every_field_problem_is_listed_in_details() -> None:
    with pytest.raises(wsp.ProtocolError) as caught:
        wsp.parse(msg("subscribe", {"rtspUrl": 5, "targetFps": -1}))
    exc = caught.value
    locs = [d["loc"] for d in exc.details]
    assert ["payload", "subscriptionIdentifier"] in locs
    assert ["payload", "rtspUrl"] in locs and ["payload", "targetFps"] in locs
    for loc in locs:
        assert ".".join(loc) in exc.message


def test_the_size_limit_counts_utf8_bytes_of_text() -> None:
    request_id = "é" * (wsp.MAX_MESSAGE_BYTES // 2)  # 2 bytes each in UTF-8
    text = json.dumps({"type": "requestState", "requestId": request_id}, ensure_ascii=False)
    assert len(text) <= wsp.MAX_MESSAGE_BYTES < len(text.encode())  # the setup, not the bug
    with pytest.raises(wsp.ProtocolError, match="larger than"):
        wsp.parse(text)


# ---- worker messages ------------------------------------------------------------------
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
