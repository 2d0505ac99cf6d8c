"""Display sessions over HTTP, for backends that use REST rather than the WebSocket:
the same as `setSessionId` / `patchSession` (docs/protocol.md). The stream registry
keeps them (they key the display's records); the EventHub stamps its events."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path
from pydantic import Field

from deployments.api.errors import NotFound, PayloadTooLarge, with_route_exceptions
from graph.common.schemas import StrictModel
from graph.control import ControlPlane
from stream_actors.sessions import SessionDataTooLarge, SessionId

DISPLAY_ID_PATTERN = r"^[^;/\s]{1,128}$"
UNAVAILABLE = "stream registry unavailable"


class SessionBody(StrictModel):
    sessionId: SessionId | None = Field(description="null clears the display's session")


class SessionPatch(StrictModel):
    data: dict[str, Any] = Field(description="merged (shallow) into the session's data")


def router(control: ControlPlane) -> APIRouter:
    api = APIRouter()

    @api.put("/displays/{display_id}/session")
    @with_route_exceptions(UNAVAILABLE)
    async def set_session(
        body: SessionBody, display_id: str = Path(pattern=DISPLAY_ID_PATTERN)
    ) -> Any:
        """Set (null: clear) a display's session, as `setSessionId`: its records are
        keyed by it from now on (a new session starts new records)."""
        changed = await control.registry.set_session.remote(display_id, body.sessionId)
        await control.hub.set_session.remote(display_id, body.sessionId)
        return {"displayIdentifier": display_id, "sessionId": body.sessionId, "changed": changed}

    @api.get("/displays/{display_id}/session")
    @with_route_exceptions(UNAVAILABLE)
    async def get_session(display_id: str = Path(pattern=DISPLAY_ID_PATTERN)) -> Any:
        """A display's session and its data; 404 when it has none."""
        session = await control.registry.session_of.remote(display_id)
        if session is None:
            raise NotFound(f"display {display_id!r} has no session")
        return {
            "displayIdentifier": display_id,
            "sessionId": session["id"],
            "data": session["data"],
        }

    @api.patch("/sessions/{session_id}")
    @with_route_exceptions(UNAVAILABLE)
    async def patch_session(
        body: SessionPatch, session_id: str = Path(min_length=1, max_length=256)
    ) -> Any:
        """Merge data into a session, as `patchSession` (`{session.<field>}` in actions);
        the session id compares as text. 404 when no display has it."""
        try:
            data = await control.registry.patch_session.remote(session_id, body.data)
        except KeyError:
            raise NotFound(f"no display has session {session_id!r}") from None
        except SessionDataTooLarge as exc:
            raise PayloadTooLarge(exc.message) from None
        return {"sessionId": session_id, "data": data}

    return api
