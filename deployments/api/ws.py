"""The WebSocket routes `/` and `/ws`: the detector-worker protocol (docs/protocol.md)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from deployments.api.auth import bearer, token_ok
from deployments.api.errors import Unauthenticated, rule_for
from deployments.api.state import ReplicaState
from deployments.api.ws_session import WsDeps, WsSession

UNAUTHENTICATED = Unauthenticated("missing or wrong bearer token")


def router(deps: WsDeps, auth_token: str | None, state: ReplicaState) -> APIRouter:
    """Both WebSocket routes; each connection is one `WsSession`."""
    api = APIRouter()

    async def serve_session(websocket: WebSocket) -> None:
        # Browsers cannot set headers on a WebSocket: `?access_token=` is accepted too.
        presented = bearer(websocket.headers.get("authorization"))
        presented = presented or websocket.query_params.get("access_token")
        await websocket.accept()
        if not token_ok(presented, auth_token):
            rule = rule_for(UNAUTHENTICATED)
            assert rule is not None and rule.ws_close is not None
            await websocket.close(rule.ws_close, UNAUTHENTICATED.message)
            return
        session = WsSession(deps, websocket)
        state.ws_clients += 1
        try:
            await session.run()
        finally:
            state.ws_clients -= 1

    @api.websocket("/")
    async def websocket_root(websocket: WebSocket) -> None:
        """The detector-worker protocol (docs/protocol.md)."""
        await serve_session(websocket)

    @api.websocket("/ws")
    async def websocket_ws(websocket: WebSocket) -> None:
        """The same protocol at /ws."""
        await serve_session(websocket)

    return api
