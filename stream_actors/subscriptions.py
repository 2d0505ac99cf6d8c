"""Subscriptions and the registry's desired state (pure, no Ray).

A subscription is the detector-worker `subscribe` payload: one camera URL, a crop region,
a target fps and a model. Subscriptions on the same URL share one stream (reference
counted); streams are packed onto camera actors, several per actor, so that the number
of processes (and Serve handle routers) stays small. The whole table round-trips through
JSON so the registry can persist it and restore it after its own restart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    field_serializer,
    field_validator,
    model_validator,
)

from graph.common.files import atomic_write_text
from graph.common.schemas import MODEL_ID_PATTERN, StrictModel
from stream_actors.reconcile import Hold, first_free_actor
from stream_actors.sessions import Sessions
from stream_actors.stability import StabilityRules

SUBSCRIPTION_ID_PATTERN = r"^[^;/\s]{1,128};[^;/\s]{1,128}$"
SourceKind = Literal["rtsp", "snapshot", "file"]


class SubscriptionRefused(ValueError):
    """A subscription the deployment's policy does not allow (e.g. a file outside
    streams.file_dirs): the API answers 403, the WebSocket an error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription(StrictModel):
    """The body of `POST /streams`, the same payload as the WebSocket `subscribe` message."""

    subscriptionIdentifier: str = Field(
        pattern=SUBSCRIPTION_ID_PATTERN, description='"displayId;cameraId"'
    )
    rtspUrl: str | None = Field(None, max_length=2048, description="rtsp:// or rtsps:// URL")
    snapshotUrl: str | None = Field(None, max_length=2048, description="http(s) JPEG URL")
    snapshotInterval: int = Field(
        1000, ge=50, le=3_600_000, description="snapshot polling interval in ms"
    )
    fileUrl: str | None = Field(
        None, max_length=2048, description="video file path or file:// URL (tests, replays)"
    )
    fileLoop: bool = Field(True, description="restart a file at its end")
    fileRealtime: bool = Field(
        True,
        description="play a file at its frame rate, dropping what the detector cannot take; "
        "false: every frame is processed, as fast as the graph takes them (replays, tests)",
    )
    modelId: str | None = Field(
        None,
        validation_alias=AliasChoices("modelId", "model_id"),
        description="detector model id; a number (as detector-worker sends it) routes as "
        "text and is echoed back as the number",
    )
    modelName: str | None = Field(None, max_length=256)
    modelUrl: str | None = Field(None, max_length=2048, description="pipeline archive (.mpta)")
    targetFps: float | None = Field(None, gt=0, le=120, description="most frames processed/s")
    cropX1: int | None = Field(None, ge=0)
    cropY1: int | None = Field(None, ge=0)
    cropX2: int | None = Field(None, ge=1)
    cropY2: int | None = Field(None, ge=1)
    stability: StabilityRules | None = Field(None, description="overrides the default rules")
    persistent: bool = Field(
        False,
        description="camgraph: a WebSocket subscription that outlives its connection (ends "
        "only by unsubscribe); REST subscriptions always do",
    )
    # A numeric modelId as the client sent it: `modelId` is its text (what routes and is
    # validated), and what echoes it back (acks, modelInfo, stateReport, this model's JSON)
    # gives the number again, so a detector-worker client reads back what it sent.
    _model_id_number: int | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_model_id_as_sent(
        cls, data: Any, handler: ModelWrapValidatorHandler[Subscription]
    ) -> Subscription:
        sub = handler(data)
        if isinstance(data, dict):
            sent = data.get("modelId", data.get("model_id"))
            if isinstance(sent, int) and not isinstance(sent, bool):
                sub._model_id_number = sent
        return sub

    @property
    def model_id_sent(self) -> int | str | None:
        """`modelId` as the client sent it: a number stays a number."""
        return self._model_id_number if self._model_id_number is not None else self.modelId

    @field_serializer("modelId")
    def _model_id_out(self, value: str | None) -> int | str | None:
        return self.model_id_sent

    @field_validator("modelId", mode="before")
    @classmethod
    def _model_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("modelId")
    @classmethod
    def _model_pattern(cls, value: str | None) -> str | None:
        import re

        if value is not None and not re.match(MODEL_ID_PATTERN, value):
            raise ValueError(f"must match {MODEL_ID_PATTERN}")
        return value

    @field_validator("rtspUrl")
    @classmethod
    def _rtsp(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("rtsp://", "rtsps://")):
            raise ValueError("must be an rtsp:// or rtsps:// URL")
        return value

    @field_validator("snapshotUrl")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def file_refusal(self, allowed_dirs: Sequence[Path]) -> str | None:
        """Why this subscription's file may not be read, or None (not a file camera, or
        the file, links resolved, lies under one of `allowed_dirs`)."""
        if self.fileUrl is None:
            return None
        path = Path(self.fileUrl).resolve()
        if any(path.is_relative_to(Path(d).resolve()) for d in allowed_dirs):
            return None
        return "refused by policy: file cameras read only from streams.file_dirs"

    @field_validator("fileUrl")
    @classmethod
    def _file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = value.removeprefix("file://")
        if "://" in path or not path.startswith("/"):
            raise ValueError("must be an absolute path or a file:// URL")
        return path

    @model_validator(mode="after")
    def _check(self) -> Subscription:
        # The seed's own payload (001, "Subscription Format") gives rtspUrl and snapshotUrl
        # together: the RTSP stream is read, the snapshot URL is kept and unused.
        given = [n for n in ("rtspUrl", "snapshotUrl", "fileUrl") if getattr(self, n)]
        if not given:
            raise ValueError("one of rtspUrl, snapshotUrl, fileUrl is required, got none")
        if self.fileUrl is not None and len(given) > 1:
            raise ValueError(f"fileUrl cannot be combined with another source, got {given}")
        crop = (self.cropX1, self.cropY1, self.cropX2, self.cropY2)
        if any(c is not None for c in crop):
            if any(c is None for c in crop):
                raise ValueError("cropX1, cropY1, cropX2, cropY2 go together")
            x1, y1, x2, y2 = crop
            assert x1 is not None and y1 is not None and x2 is not None and y2 is not None
            if x2 <= x1 or y2 <= y1:
                raise ValueError("the crop needs cropX2 > cropX1 and cropY2 > cropY1")
        return self

    @property
    def camera_id(self) -> str:
        return self.subscriptionIdentifier.split(";", 1)[1]

    @property
    def display_id(self) -> str:
        return self.subscriptionIdentifier.split(";", 1)[0]

    @property
    def kind(self) -> SourceKind:
        return "rtsp" if self.rtspUrl else "snapshot" if self.snapshotUrl else "file"

    @property
    def url(self) -> str:
        url = self.rtspUrl or self.snapshotUrl or self.fileUrl
        assert url is not None
        return url

    @property
    def crop(self) -> tuple[int, int, int, int] | None:
        if self.cropX1 is None:
            return None
        return (self.cropX1, self.cropY1, self.cropX2, self.cropY2)  # type: ignore[return-value]


class StreamSpec(StrictModel):
    """One shared stream: what a camera actor opens. Derived from its subscriptions."""

    key: str
    kind: SourceKind
    url: str
    snapshot_interval_s: float = 1.0
    loop: bool = True
    lossless: bool = False  # files only: the reader waits until each frame was taken


def url_pipeline(sub: Subscription, configured: Container[str], enabled: bool) -> str | None:
    """The `modelUrl` whose pipeline this subscription runs, or None: its `modelId` is a
    configured model (which wins: the URL is not fetched), or it names no URL, or
    modelUrl pipelines are off (`pipelines.allowed_urls` empty)."""
    if not enabled or sub.modelUrl is None:
        return None
    if sub.modelId is not None and sub.modelId in configured:
        return None
    return sub.modelUrl


def stream_key(sub: Subscription) -> str:
    """Subscriptions with the same key share a stream (same kind and URL)."""
    digest = hashlib.sha256(f"{sub.kind}\n{sub.url}".encode()).hexdigest()[:16]
    return f"{sub.kind}-{digest}"


class RegistryState(StrictModel):
    """The registry's desired state, persisted as JSON."""

    subscriptions: dict[str, Subscription] = Field(default_factory=dict)
    placement: dict[str, int] = Field(default_factory=dict, description="stream key → actor")
    leases: dict[str, dict[str, Hold]] = Field(
        default_factory=dict,
        description="subscription id → the WebSocket connections holding it (none: persistent)",
    )
    sessions: Sessions = Field(
        default_factory=Sessions, description="the displays' sessions (setSessionId)"
    )


class SubscriptionTable:
    """Reference-counted streams over subscriptions, packed onto numbered camera actors."""

    def __init__(self, streams_per_actor: int, state: RegistryState | None = None) -> None:
        if streams_per_actor < 1:
            raise ValueError("streams_per_actor must be >= 1")
        self.streams_per_actor = streams_per_actor
        self.subs: dict[str, Subscription] = dict(state.subscriptions) if state else {}
        self.placement: dict[str, int] = dict(state.placement) if state else {}
        for key in list(self.placement):  # drop placements without subscriptions
            if not self.subscribers(key):
                del self.placement[key]
        for key in self.stream_keys():
            if key not in self.placement:
                self.placement[key] = self._free_actor()

    def state(self) -> RegistryState:
        return RegistryState(subscriptions=dict(self.subs), placement=dict(self.placement))

    def stream_keys(self) -> list[str]:
        return sorted({stream_key(s) for s in self.subs.values()})

    def subscribers(self, key: str) -> list[Subscription]:
        return [s for _, s in sorted(self.subs.items()) if stream_key(s) == key]

    def spec(self, key: str) -> StreamSpec:
        subs = self.subscribers(key)
        if not subs:
            raise KeyError(key)
        first = subs[0]
        kind = first.kind
        # Only the fields the kind reads come from the subscribers, the others keep their
        # defaults: a subscriber that joins or leaves with, say, another `fileLoop` on an
        # RTSP stream must not change the spec, which would reopen the camera.
        return StreamSpec(
            key=key,
            kind=kind,
            url=first.url,
            # Shared snapshot URLs are polled as often as the most demanding subscriber.
            snapshot_interval_s=(
                min(s.snapshotInterval for s in subs) / 1000.0 if kind == "snapshot" else 1.0
            ),
            loop=any(s.fileLoop for s in subs) if kind == "file" else True,
            lossless=kind == "file" and any(not s.fileRealtime for s in subs),
        )

    def _free_actor(self) -> int:
        return first_free_actor(self.placement, self.streams_per_actor)

    def add(self, sub: Subscription) -> tuple[set[str], set[str]]:
        """Add or replace a subscription; returns (stream keys to (re)configure, to stop)."""
        changed: set[str] = set()
        stopped: set[str] = set()
        old = self.subs.get(sub.subscriptionIdentifier)
        if old is not None and stream_key(old) != stream_key(sub):
            changed_old, stopped = self.remove(sub.subscriptionIdentifier)
            changed |= changed_old
        self.subs[sub.subscriptionIdentifier] = sub
        key = stream_key(sub)
        if key not in self.placement:
            self.placement[key] = self._free_actor()
        changed.add(key)
        return changed, stopped

    def remove(self, subscription_id: str) -> tuple[set[str], set[str]]:
        """Remove a subscription; returns (streams still used to reconfigure, to stop)."""
        sub = self.subs.pop(subscription_id)
        key = stream_key(sub)
        if self.subscribers(key):
            return {key}, set()
        self.placement.pop(key, None)
        return set(), {key}

    def by_camera(self, camera_id: str) -> list[str]:
        """Stream keys that carry a camera id (a camera may be on several displays)."""
        return sorted({stream_key(s) for s in self.subs.values() if s.camera_id == camera_id})


def save_state(path: Path, state: RegistryState) -> None:
    """Atomic write (temp file + fsync + rename): a crash leaves the old or the new state."""
    atomic_write_text(path, state.model_dump_json(indent=1))


def load_state(path: Path) -> RegistryState:
    """The persisted state, or an empty one when none was saved yet."""
    if not path.exists():
        return RegistryState()
    return RegistryState.model_validate(json.loads(path.read_text()))
