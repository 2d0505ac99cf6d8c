"""The ingress's FastAPI app, built per replica from its dependencies (no module state).

`build_api(deps)` mounts the live view and one router per resource, in the order the
routes have always been matched, behind the bearer-token middleware.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field

from fastapi import FastAPI
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.api import detect, events, health, jobs, records, sessions, streams, ws
from deployments.api.auth import OPEN_PATHS, bearer, token_ok
from deployments.api.detect import Detectors
from deployments.api.errors import Unauthenticated, http_response
from deployments.api.state import ReplicaState
from deployments.api.ui import add_live_view
from deployments.api.ws_session import WsDeps
from graph.common.schemas import IngressSettings
from graph.control import ControlPlane
from graph.events.fanout import EventFanout

UNAUTHENTICATED = Unauthenticated("missing or wrong bearer token")


def refusal(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
    """The 401 answer, as the error table writes it for every route."""
    response = http_response(UNAUTHENTICATED)
    if response is None:  # the table names Unauthenticated: never
        raise RuntimeError("no HTTP answer for Unauthenticated")
    return response(scope, receive, send)


@dataclass(frozen=True)
class ApiDeps:
    """Everything the HTTP and WebSocket routes of one replica use."""

    settings: IngressSettings
    auth_token: str | None  # None: authentication off
    detectors: Detectors
    classifiers: dict[str, DeploymentHandle]
    actions: DeploymentHandle | None  # None: the app serves no pipeline
    control: ControlPlane
    fanout: EventFanout
    state: ReplicaState
    model_versions: dict[str, str] = field(default_factory=dict)  # pipeline root → version

    def ws(self) -> WsDeps:
        """What a WebSocket session uses of these."""
        return WsDeps(
            registry=self.control.registry,
            hub=self.control.hub,
            fanout=self.fanout,
            models={m: self.model_versions.get(m) for m in self.detectors.handles},
            settings=self.settings,
            streams=self.state.streams,
            system=self.state.system,
            load_pipeline=self.control.load_pipeline if self.control.catalog is not None else None,
        )


class TokenCheck:
    """Bearer token on every HTTP route but the open ones (when a token is configured).
    A plain ASGI middleware: Starlette's `@app.middleware("http")` costs a task group
    and two memory streams per request, on the path every /detect takes."""

    def __init__(self, app: ASGIApp, expected: str | None) -> None:
        self.app, self.expected = app, expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path not in OPEN_PATHS:
            presented = bearer(Headers(scope=scope).get("authorization"))
            if presented is None and path == "/events":  # EventSource sets no headers
                presented = QueryParams(scope.get("query_string", b"")).get("access_token")
            if not token_ok(presented, self.expected):
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_api(deps: ApiDeps) -> FastAPI:
    """One replica's app: every route, over `deps`."""
    app = FastAPI(
        title="camgraph",
        description="Camera-scale object detection on a Ray Serve deployment graph.",
        version="0.1.0",
    )
    app.add_middleware(TokenCheck, expected=deps.auth_token)
    add_live_view(app)
    service = health.Health(
        health.HealthDeps(
            detectors=deps.detectors,
            classifiers=deps.classifiers,
            actions=deps.actions,
            control=deps.control,
            fanout=deps.fanout,
            state=deps.state,
            timeout_s=deps.settings.health_timeout_s,
        )
    )
    for router in (
        health.router(service),
        detect.router(deps.detectors),
        jobs.router(deps.control, deps.detectors),
        streams.router(deps.control, deps.detectors, deps.settings.actor_call_timeout_s),
        sessions.router(deps.control),
        records.router(deps.actions, deps.settings.health_timeout_s),
        events.router(deps.fanout, deps.settings.sse_heartbeat_s),
        ws.router(deps.ws(), deps.auth_token, deps.state),
    ):
        app.include_router(router)
    return app
