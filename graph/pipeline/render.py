"""What an action says about one tracked object, rendered from its context and its
branches' winning results (no Ray).

Each object has an `{object_id}`: a UUID derived from its record identity (pipeline,
version, camera, session, track), the same whoever computes it, so a redelivered create
inserts nothing twice. Without a display session (`setSessionId`) it is also the
object's `{session_id}`, as the detector-worker's create gave each object a session id.
Record actions become the seeds' `insert` (postgresql_create_record: a row whose
`key_field` holds the key) and `update` (postgresql_update_combined: `WHERE key_field =
key`, by default the `{session_id}`), applied by `deployments.delivery.tables`.

A column whose branch found nothing (no readable plate yet) is NULL, and a later pass
that finds it updates the record; a key, channel or message raises MissingFieldError
and so waits for a value. Each rendering comes with a digest of its content, so that
an action is sent again only when what it says changed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np

from deployments.delivery.outbox import OutboxEntry
from graph.pipeline.plan import ActionPlan
from graph.pipeline.spec import (
    PostgresCreateRecord,
    PostgresUpdateCombined,
    RedisPublish,
    RedisSaveImage,
)
from graph.pipeline.templates import MissingFieldError, idempotency_key, render


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def object_key(base: dict[str, Any], track_id: int) -> str:
    """The record identity of one tracked object (one row per object and table), within
    its `record_scope`: the display's session, else an id of its runner's own."""
    return idempotency_key(
        base["pipeline_id"],
        base["pipeline_version"],
        base["camera_id"],
        base.get("record_scope", base.get("session_id")),
        track_id,
    )


# The namespace of camgraph's object UUIDs (UUIDv5 of an object's record identity).
OBJECT_NAMESPACE = uuid.UUID("5d0f3c0e-8f0b-5c7e-9a53-6b2f7c3e1d42")


def object_uuid(obj_key: str) -> str:
    """The `{object_id}` of an object: deterministic, so every delivery agrees."""
    return str(uuid.uuid5(OBJECT_NAMESPACE, obj_key))


def record_context(context: dict[str, Any], obj_key: str) -> dict[str, Any]:
    """The context with `object_id`, and `session_id` defaulting to it (no display
    session: each object is its own session, as in the detector-worker)."""
    oid = object_uuid(obj_key)
    out = {**context, "object_id": oid}
    if out.get("session_id") is None:
        out["session_id"] = oid
    return out


def _column_value(
    template: str, context: dict[str, Any], results: dict[str, dict[str, Any]]
) -> str | None:
    """A column's value; NULL when a branch ran but found nothing (a later pass that
    finds something updates the record)."""
    try:
        return render(template, context, results)
    except MissingFieldError as exc:
        if "." in exc.name:
            return None
        raise


def render_entry(
    plan: ActionPlan,
    context: dict[str, Any],
    results: dict[str, dict[str, Any]],
    obj_key: str,
    images: Callable[[str | None, int], bytes],
) -> tuple[str, OutboxEntry]:
    """(digest of the rendered content, entry without its final key). Raises
    MissingFieldError when a template names a value that is not there."""
    a = plan.action
    blob: bytes | None = None
    context = record_context(context, obj_key)
    if isinstance(a, RedisSaveImage):
        sink, op = (
            "redis",
            {
                "type": "redis_save_image",
                "key": render(a.key, context, results),
                "ttl_s": a.expire_seconds,
            },
        )
        blob = images(a.region, a.quality)
    elif isinstance(a, RedisPublish):
        sink, op = (
            "redis",
            {
                "type": "redis_publish",
                "channel": render(a.channel, context, results),
                "message": render(a.message, context, results),
            },
        )
    elif isinstance(a, PostgresCreateRecord):
        fields = {col: _column_value(t, context, results) for col, t in a.fields.items()}
        key_field, key_value = plan.key_field, plan.key_value
        sink, op = (
            "postgres",
            {
                "type": "update" if isinstance(a, PostgresUpdateCombined) else "insert",
                "table": a.table,
                "object_key": obj_key,
                "key_field": key_field,
                # a key waits for its value: a row must be found again by it
                "key": None if key_field is None else render(key_value or "", context, results),
                "fields": fields,
            },
        )
    else:  # pragma: no cover - the pipeline schema admits no other action
        raise TypeError(f"unknown action {type(a).__name__}")
    digest_src = json.dumps(op, sort_keys=True).encode() + (
        hashlib.sha256(blob).digest() if blob else b""
    )
    return hashlib.sha256(digest_src).hexdigest(), OutboxEntry("", sink, op, blob)


def jpeg_images(
    crop: np.ndarray | None, frame: np.ndarray | None
) -> Callable[[str | None, int], bytes]:
    """What `render_entry` calls for an image action: the JPEG of the frame (region None)
    or of the object's crop, at the action's quality."""

    def images(region: str | None, quality: int) -> bytes:
        source = frame if region is None else crop
        if source is None:
            raise MissingFieldError("image", "crop")
        ok, buf = cv2.imencode(".jpg", source, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return buf.tobytes()

    return images
