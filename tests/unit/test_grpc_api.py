"""The gRPC mixin's pure parts: auth metadata, config and event conversion (no Ray)."""

import json
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.api.grpc import (
    auth_failure,
    detect_config,
    event_filter,
    event_message,
    validation_details,
)
from protos import camgraph_pb2 as pb


class FakeContext:
    def __init__(self, metadata: list[tuple[str, Any]]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, Any]]:
        return self.metadata


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        ([("authorization", "Bearer s3cret")], True),
        ([("authorization", "bearer s3cret ")], True),
        ([], False),
        ([("authorization", "Bearer wrong")], False),
        ([("authorization", "Basic s3cret")], False),
        ([("authorization", "Bearer ")], False),
    ],
)
def test_auth_failure(metadata: list[tuple[str, Any]], ok: bool) -> None:
    reason = auth_failure(FakeContext(metadata), "s3cret")  # type: ignore[arg-type]
    assert (reason is None) == ok
    assert reason is None or "s3cret" not in reason


def test_without_a_configured_token_grpc_refuses_unless_the_operator_opts_out() -> None:
    # Serve's gRPC proxy listens on every interface: no token must not mean open.
    for metadata in ([], [("authorization", "Bearer anything")]):
        reason = auth_failure(FakeContext(metadata), None)  # type: ignore[arg-type]
        assert reason is not None and "every network interface" in reason
    assert auth_failure(FakeContext([]), None, without_token=True) is None  # type: ignore[arg-type]


def test_detect_config_leaves_unset_fields_to_defaults() -> None:
    assert detect_config(pb.DetectConfig()).model_dump() == {
        "conf": 0.25,
        "iou": 0.7,
        "classes": None,
        "max_det": 300,
    }
    config = detect_config(pb.DetectConfig(conf=0.5, iou=0.0, classes=[2, 0], max_det=7))
    assert (config.conf, config.iou, config.classes, config.max_det) == (0.5, 0.0, [2, 0], 7)
    with pytest.raises(ValidationError) as info:
        detect_config(pb.DetectConfig(conf=0.0, max_det=0))
    details = validation_details(info.value)
    assert "config.conf" in details and "config.max_det" in details


def test_event_messages() -> None:
    event = {
        "id": 7,
        "topic": "sub:s1",
        "type": "new",
        "time": 12.5,
        "camera_id": "cam",
        "subscription_id": "s1",
        "display_id": None,
        "model_id": "demo",
        "session_id": None,
        "job_id": None,
        "data": {"track_id": 3, "box": [1.0, 2.0, 3.0, 4.0]},
    }
    message = event_message(event)
    assert (message.id, message.topic, message.type, message.time) == (7, "sub:s1", "new", 12.5)
    assert (message.camera_id, message.display_id, message.model_id) == ("cam", "", "demo")
    assert json.loads(message.data_json) == event["data"]
    dropped = event_message({"type": "dropped", "count": 4, "reason": "slow_client"})
    assert (dropped.id, dropped.type, dropped.dropped_count) == (0, "dropped", 4)
    assert dropped.dropped_reason == "slow_client"


def test_event_filter_empty_fields_match_everything() -> None:
    request = pb.EventFilter(cameras=["a", "b"], types=["new"])
    assert event_filter(request) == {
        "cameras": ["a", "b"],
        "subscriptions": None,
        "types": ["new"],
        "jobs": None,
    }
    assert not pb.EventFilter().HasField("after_id")
    assert pb.EventFilter(after_id=0).HasField("after_id")
