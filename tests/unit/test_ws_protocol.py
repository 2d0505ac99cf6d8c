"""The detector-worker WebSocket protocol (deployments.api.ws_protocol), without Ray or a
network: parsing every client message, and every malformed kind. Rendering the worker's
messages is in test_ws_messages.py."""

import json
from typing import Any

import pytest

from deployments.api import ws_protocol as wsp
from stream_actors.subscriptions import Subscription, stream_key
from tests.unit.seed_messages import subscribe_example

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


def test_the_seeds_subscribe_example_is_taken_as_it_is() -> None:
    """001's example carries rtspUrl and snapshotUrl, a numeric modelId, a crop."""
    example = subscribe_example()
    kind, sub, request_id = wsp.parse(json.dumps(example))
    assert kind == "subscribe" and request_id is None and isinstance(sub, Subscription)
    payload = example["payload"]
    assert sub.subscriptionIdentifier == payload["subscriptionIdentifier"] == "display-001;cam-001"
    assert (sub.display_id, sub.camera_id) == ("display-001", "cam-001")
    assert sub.kind == "rtsp" and sub.url == payload["rtspUrl"]  # the RTSP stream is read
    assert sub.snapshotUrl == payload["snapshotUrl"] and sub.snapshotInterval == 5000
    assert sub.modelUrl == payload["modelUrl"] and sub.modelName == "Vehicle Detection"
    assert sub.modelId == "101" and sub.model_id_sent == 101  # routes as text, echoes 101
    assert sub.crop == (100, 200, 300, 400)
    # Every key the client sent comes back unchanged where camgraph echoes the payload.
    assert sub.model_dump(mode="json", exclude_unset=True) == payload


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
def test_model_id_routes_as_text_and_is_kept_as_sent(given: Any, kept: str) -> None:
    _, sub, _ = wsp.parse(msg("subscribe", sub_payload(modelId=given)))
    assert sub.modelId == kept  # what routes to Detector_<id>
    assert sub.model_id_sent == given and type(sub.model_id_sent) is type(given)
    assert sub.model_dump(mode="json")["modelId"] == given  # what the registry stores
    again = Subscription.model_validate(sub.model_dump(mode="json"))  # a registry restart
    assert again.modelId == kept and again.model_id_sent == given and again == sub
    _, alias, _ = wsp.parse(msg("subscribe", sub_payload(model_id=given)))
    assert alias.modelId == kept and alias.model_id_sent == given


def test_rtsp_and_snapshot_together_read_the_rtsp_stream() -> None:
    _, sub, _ = wsp.parse(msg("subscribe", sub_payload(snapshotUrl="http://cam/snap.jpg")))
    assert sub.kind == "rtsp" and sub.url == "rtsp://10.0.0.7/s1"
    _, alone, _ = wsp.parse(msg("subscribe", sub_payload()))
    assert stream_key(sub) == stream_key(alone)  # the snapshot URL is unused


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
    # Under the size limit, but beyond what json.loads takes: an integer of 5000 digits
    # (ValueError) and deep nesting (RecursionError) are errors, not a dead session.
    ('{"type": "subscribe", "requestId": ' + "9" * 5000 + "}", None, None, "ValueError", None),
    ("[" * 20000 + "]" * 20000, None, None, "invalid JSON: RecursionError", None),
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
        bad_subscribe(fileUrl="/data/clip.mp4"),
        "subscribe",
        "bad",
        "fileUrl cannot be combined with another source, got ['rtspUrl', 'fileUrl']",
        ["payload"],
    ),
    (
        msg(
            "subscribe",
            {
                "subscriptionIdentifier": SUB,
                "snapshotUrl": "http://h/s.jpg",
                "fileUrl": "/data/clip.mp4",
            },
        ),
        "subscribe",
        None,
        "fileUrl cannot be combined with another source, got ['snapshotUrl', 'fileUrl']",
        ["payload"],
    ),
    (
        msg("subscribe", {"subscriptionIdentifier": SUB}),
        "subscribe",
        None,
        "one of rtspUrl, snapshotUrl, fileUrl is required, got none",
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
