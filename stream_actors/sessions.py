"""The displays' sessions (`setSessionId` / `patchSession` of the WebSocket protocol) as
the stream registry keeps, persists and sends them to the camera actors (pure).

A display has at most one session: an id the backend chose (a number stays a number).
A session has data, merged from patches; displays that share a session id share its
data. The pipelines of a display's subscriptions key their records by its session (a
new session starts new records) and fill `{session.<field>}` from the data.

Session data comes from clients, so it is checked before anything changes: JSON only
(no NaN or infinity), at most MAX_SESSION_DATA_BYTES and MAX_DEPTH levels, so that the
registry's state file can always be written and reads back the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Annotated, Any

from pydantic import Field

from graph.common.schemas import StrictModel

MAX_SESSIONS = 4096  # displays with a session; beyond, the oldest set goes first
MAX_SESSION_DATA_BYTES = 16 * 1024  # one session's data, as JSON
MAX_DEPTH = 8  # nesting levels of a session's data
# A session id as a CMS sends it: a number (a 64-bit integer, never a boolean) or a text.
SessionId = (
    Annotated[int, Field(strict=True, ge=-(2**63), lt=2**63)]
    | Annotated[str, Field(min_length=1, max_length=256)]
)


class SessionDataTooLarge(ValueError):
    """Session data refused: over MAX_SESSION_DATA_BYTES or MAX_DEPTH, or not plain JSON."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message  # also read through Ray's re-raised class (its str is a traceback)


class Sessions(StrictModel):
    """What the registry persists: each display's session id and each session's data."""

    displays: dict[str, SessionId] = Field(
        default_factory=dict, description="display id → its session id, oldest set first"
    )
    data: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="session id (as text) → its merged data"
    )


def same_session(a: Any, b: Any) -> bool:
    """Whether two session ids name one session's data: 4242 and "4242" do (a patch
    names its session as text)."""
    return str(a) == str(b)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (iterative: any depth is safe)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def checked_data(session_id: Any, data: dict[str, Any]) -> dict[str, Any]:
    """`data` if it can be a session's data, else SessionDataTooLarge saying why."""
    if any(_deeper_than(v, MAX_DEPTH - 1) for v in data.values()):
        raise SessionDataTooLarge(
            f"session {session_id!r}: data nested deeper than {MAX_DEPTH} levels"
        )
    try:
        text = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SessionDataTooLarge(
            f"session {session_id!r}: data is not plain JSON: {exc}"
        ) from None
    if len(text.encode()) > MAX_SESSION_DATA_BYTES:
        raise SessionDataTooLarge(
            f"session {session_id!r}: data would be {len(text.encode())} bytes, at most "
            f"{MAX_SESSION_DATA_BYTES}"
        )
    return data


def session_digest(session: dict[str, Any] | None) -> str | None:
    """A short digest of what a camera actor holds for a display (None: no session), so
    the registry's repair loop sees an actor that missed a change."""
    if session is None:
        return None
    text = json.dumps(
        [type(session["id"]).__name__, session["id"], session["data"]], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SessionBook:
    def __init__(self, restored: Sessions | None = None, max_sessions: int = MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        state = restored or Sessions()
        self.displays: dict[str, Any] = dict(state.displays)
        self.data: dict[str, dict[str, Any]] = dict(state.data)

    def state(self) -> Sessions:
        return Sessions(displays=dict(self.displays), data=dict(self.data))

    def set(self, display_id: str, session_id: Any, subscribed: Collection[str] = ()) -> bool:
        """Set (None: clear) a display's session; whether it changed. The same id again
        changes nothing. Beyond `max_sessions` the oldest display without a subscription
        (`subscribed`: displays that have one) loses its session, else the oldest."""
        old = self.displays.get(display_id, None)
        if session_id is None:
            if display_id not in self.displays:
                return False
            del self.displays[display_id]
        elif old is not None and old == session_id and type(old) is type(session_id):
            return False
        else:
            self.displays.pop(display_id, None)
            self.displays[display_id] = session_id  # newest last
            while len(self.displays) > self.max_sessions:
                others = [d for d in self.displays if d != display_id]
                idle = [d for d in others if d not in subscribed]
                del self.displays[(idle or others)[0]]
        live = {str(s) for s in self.displays.values()}
        for key in [k for k in self.data if k not in live]:
            del self.data[key]  # data of a session no display has any more
        return True

    def patch(self, session_id: Any, data: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """Merge `data` into a session (shallow, last write wins per key): the displays
        that have it and the merged data. KeyError: no display has it;
        SessionDataTooLarge: refused, nothing changes."""
        displays = [d for d, s in self.displays.items() if same_session(s, session_id)]
        if not displays:
            raise KeyError(session_id)
        merged = checked_data(session_id, {**self.data.get(str(session_id), {}), **data})
        self.data[str(session_id)] = merged
        return displays, merged

    def of(self, display_id: str) -> dict[str, Any] | None:
        """What a camera actor gets for a display: {"id", "data"}, or None."""
        if display_id not in self.displays:
            return None
        session_id = self.displays[display_id]
        return {"id": session_id, "data": dict(self.data.get(str(session_id), {}))}
