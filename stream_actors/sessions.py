"""The displays' sessions (`setSessionId` / `patchSession` of the WebSocket protocol) as
the stream registry keeps, persists and sends them to the camera actors (pure).

A display has at most one session: an id the backend chose (a number stays a number)
and the data patched into it. The pipelines of the display's subscriptions key their
records by that id (a new session starts new records) and fill `{session.<field>}`
from the data.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field

from graph.common.schemas import StrictModel

MAX_SESSIONS = 10_000  # displays with a session; the oldest set goes first
MAX_SESSION_DATA_BYTES = 64 * 1024  # one session's data, as JSON
# A session id as a CMS sends it: a number (a 64-bit integer, never a boolean) or a text.
SessionId = (
    Annotated[int, Field(strict=True, ge=-(2**63), lt=2**63)]
    | Annotated[str, Field(min_length=1, max_length=256)]
)


class SessionDataTooLarge(ValueError):
    """A patch that would make a session's data larger than MAX_SESSION_DATA_BYTES."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message  # also read through Ray's re-raised class (its str is a traceback)


class DisplaySession(StrictModel):
    id: SessionId = Field(description="as the client sent it (setSessionId)")
    data: dict[str, Any] = Field(default_factory=dict, description="merged patchSession data")


def same_session(a: Any, b: Any) -> bool:
    """Whether two session ids name one session: 4242 and "4242" do (patchSession
    compares as text, as the EventHub does)."""
    return str(a) == str(b)


class SessionBook:
    def __init__(
        self, restored: dict[str, DisplaySession] | None = None, max_sessions: int = MAX_SESSIONS
    ) -> None:
        self.max_sessions = max_sessions
        self.sessions: dict[str, DisplaySession] = dict(restored or {})

    def set(self, display_id: str, session_id: Any) -> bool:
        """Set (None: clear) a display's session; whether it changed. The same id again
        keeps its data; another id starts with none."""
        old = self.sessions.get(display_id)
        if session_id is None:
            return self.sessions.pop(display_id, None) is not None
        if old is not None and old.id == session_id and type(old.id) is type(session_id):
            return False
        self.sessions.pop(display_id, None)
        self.sessions[display_id] = DisplaySession(id=session_id)  # newest last
        while len(self.sessions) > self.max_sessions:
            self.sessions.pop(next(iter(self.sessions)))
        return True

    def patch(self, session_id: Any, data: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """Merge `data` into a session (shallow, last write wins per key): the displays
        that have it and the merged data. KeyError: no display has it;
        SessionDataTooLarge: the merged data would exceed MAX_SESSION_DATA_BYTES (nothing
        changes)."""
        displays = [d for d, s in self.sessions.items() if same_session(s.id, session_id)]
        if not displays:
            raise KeyError(session_id)
        merged = {**self.sessions[displays[0]].data, **data}
        size = len(json.dumps(merged, default=str).encode())
        if size > MAX_SESSION_DATA_BYTES:
            raise SessionDataTooLarge(
                f"session {session_id!r}: data would be {size} bytes, at most "
                f"{MAX_SESSION_DATA_BYTES}"
            )
        for display in displays:
            self.sessions[display] = self.sessions[display].model_copy(update={"data": merged})
        return displays, merged

    def of(self, display_id: str) -> dict[str, Any] | None:
        """What a camera actor gets for a display: {"id", "data"}, or None."""
        session = self.sessions.get(display_id)
        return None if session is None else session.model_dump(mode="json")
