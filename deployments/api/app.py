"""The ingress's FastAPI app, built per replica from its dependencies (no module state).

`build_api(deps)` mounts the live view and one router per resource, in the order the
routes have always been matched, behind the bearer-token middleware.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from ray.serve.handle import DeploymentHandle

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


def add_token_check(app: FastAPI, expected: str | None) -> None:
    """Bearer token on every HTTP route but the open ones (when a token is configured)."""

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        path = request.scope["path"].removeprefix(request.scope.get("root_path", "")) or "/"
        if path in OPEN_PATHS:
            return await call_next(request)
        presented = bearer(request.headers.get("authorization"))
        if presented is None and path == "/events":  # EventSource sets no headers
            presented = request.query_params.get("access_token")
        if not token_ok(presented, expected):
            return http_response(UNAUTHENTICATED)
        return await call_next(request)


def build_api(deps: ApiDeps) -> FastAPI:
    """One replica's app: every route, over `deps`."""
    app = FastAPI(
        title="camgraph",
        description="Camera-scale object detection on a Ray Serve deployment graph.",
        version="0.1.0",
    )
    add_token_check(app, deps.auth_token)
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
