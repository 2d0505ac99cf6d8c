"""The seeds' own WebSocket messages, copied from the seed documents: the oracle of
test_ws_protocol.py and test_ws_messages.py (what a detector-worker client sends and
reads, taken from the seeds, not from camgraph's code). Issue 17: where a seed gives a
shape, camgraph sends and accepts exactly that; where it is silent, camgraph may add keys
inside the message, never renaming or moving a seed key."""

from __future__ import annotations

import json
import re
from typing import Any

# /work/shared/seeds/001_*.txt, "WebSocket Protocol" → "Subscription Format": the seed's
# example, token for token (the seed file holds the markdown on one line; this is its
# ```json block with the line breaks back). Its `// OR snapshotUrl` comment is the seed's
# own; `subscribe_example()` drops it, as any client must before sending.
SUBSCRIBE_EXAMPLE = """
{
  "type": "subscribe",
  "payload": {
    "subscriptionIdentifier": "display-001;cam-001",
    "rtspUrl": "rtsp://...", // OR snapshotUrl
    "snapshotUrl": "http://...",
    "snapshotInterval": 5000,
    "modelUrl": "http://...model.mpta",
    "modelId": 101,
    "modelName": "Vehicle Detection",
    "cropX1": 100,
    "cropY1": 200,
    "cropX2": 300,
    "cropY2": 400
  }
}
"""


def subscribe_example() -> dict[str, Any]:
    """The seed's subscribe message as JSON (its one `//` comment removed)."""
    return dict(json.loads(re.sub(r"(?<=,) // [^\n]*", "", SUBSCRIBE_EXAMPLE)))


# /work/shared/seeds/000_*.txt, "1. Subscribe Message Flow" (message_processor.py
# `_handle_subscribe`), its return statement as written there.
def seed_subscribe_ack(subscription_id: str) -> dict[str, Any]:
    return {"type": "subscribeAck", "status": "success", "subscriptionId": subscription_id}


# /work/shared/seeds/000_*.txt, "2. Detection Result Broadcasting"
# (websocket_handler.py `broadcast_detection_result`), the message as written there.
def seed_image_detection(subscription_id: str, detection_result: dict[str, Any]) -> dict[str, Any]:
    message = {
        "type": "imageDetection",
        "payload": {
            "subscriptionId": subscription_id,
            "detections": detection_result["detections"],
            "timestamp": detection_result["timestamp"],
            "modelInfo": detection_result["model_info"],
        },
    }
    return message


def assert_seed_keys_kept(rendered: dict[str, Any], seed: dict[str, Any], at: str = "") -> None:
    """Every key of the seed's message is in `rendered`, at the same place, with the same
    value (objects compared key by key: camgraph may add keys beside the seed's)."""
    for key, expected in seed.items():
        where = f"{at}.{key}" if at else key
        assert key in rendered, f"seed key {where!r} missing from {rendered}"
        if isinstance(expected, dict):
            assert isinstance(rendered[key], dict), (where, rendered[key])
            assert_seed_keys_kept(rendered[key], expected, where)
        else:
            assert rendered[key] == expected, (where, rendered[key], expected)
            assert type(rendered[key]) is type(expected), (where, rendered[key], expected)
