"""`GET /health`: overall status, each model's availability, streams, sinks and events.

Open without a token, so the costly part is computed at most once a second per replica
(one fan-out to the models, the registry and the sinks, whoever asks how often) and the
hub's figures at most every 5 s; it never triggers a model load and never fails.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from deployments.api.detect import Detectors
from deployments.api.state import Cached, ReplicaState
from graph.common.redaction import redact_text
from graph.control import ControlPlane
from graph.events.fanout import EventFanout

logger = logging.getLogger("camgraph.ingress")


def failure(what: str, exc: BaseException) -> str:
    """What the open /health says of a failed call: the error's kind only. The full text
    goes to the log, redacted: a Ray error's text is the remote traceback (pid, address,
    paths, arguments), which an unauthenticated caller must not read."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    logger.warning("health: %s failed: %s", what, redact_text(f"{type(exc).__name__}: {exc}"))
    return type(cause).__name__


@dataclass(frozen=True)
class HealthDeps:
    """What /health asks."""

    detectors: Detectors
    classifiers: dict[str, DeploymentHandle]
    actions: DeploymentHandle | None
    control: ControlPlane
    fanout: EventFanout
    state: ReplicaState
    timeout_s: float


class Health:
    """The health report of one replica, cached."""

    def __init__(self, deps: HealthDeps) -> None:
        self._deps = deps
        self._report: Cached[dict[str, Any]] = Cached(self._fresh_report, 1.0, {})
        self._hub: Cached[dict[str, Any]] = Cached(self._hub_stats, 5.0, {})

    async def report(self) -> dict[str, Any]:
        # This replica's own clients are counted fresh (the hub's stats are cached apart).
        return {**await self._report.get(), "events": await self._events()}

    async def _model(self, model_id: str, handle: DeploymentHandle) -> dict[str, Any]:
        timeout_s = self._deps.timeout_s
        try:
            status: dict[str, Any] = await asyncio.wait_for(handle.health.remote(), timeout_s)
        except TimeoutError:
            return {
                "model": model_id,
                "state": "loading",
                "error": f"no replica answered within {timeout_s}s",
            }
        except Exception as exc:  # a replica that died reports as an error, not a 500
            return {"model": model_id, "state": "error", "error": failure(model_id, exc)}
        return status

    async def _fresh_report(self, _: dict[str, Any]) -> dict[str, Any]:
        deps = self._deps
        handles = {**deps.detectors.handles, **deps.classifiers}
        states = await asyncio.gather(*(self._model(m, h) for m, h in handles.items()))
        models = {s["model"]: {k: v for k, v in s.items() if k != "model"} for s in states}
        ready = all(s["state"] == "enabled" for s in states)
        report: dict[str, Any] = {
            "status": "ok" if ready else "degraded",
            "default_model": deps.detectors.default,
            "models": models,
            "streams": await self._streams(),
        }
        if deps.control.catalog is not None:
            report["pipelines"] = await self._pipelines()
        if deps.actions is not None:
            report["actions"] = await self._actions(deps.actions)
            if "error" in report["actions"]:
                report["status"] = "degraded"
        return report

    async def _events(self) -> dict[str, Any]:
        """The EventHub's rings and this replica's clients (WebSocket, SSE, gRPC streams),
        with capture → event latency as seen here."""
        replica = {**self._deps.fanout.status(), "websockets": self._deps.state.ws_clients}
        return {"hub": await self._hub.get(), "replica": replica}

    async def _hub_stats(self, _: dict[str, Any]) -> dict[str, Any]:
        try:
            stats: dict[str, Any] = await asyncio.wait_for(
                self._deps.control.hub.stats.remote(), self._deps.timeout_s
            )
        except Exception as exc:  # failures are cached too
            return {"error": failure("the event hub", exc)}
        return stats

    async def _actions(self, actions: DeploymentHandle) -> dict[str, Any]:
        """Sinks in use (Redis, PostgreSQL or the local store), outbox depth and lag."""
        try:
            result: dict[str, Any] = await asyncio.wait_for(
                actions.health.remote(), self._deps.timeout_s
            )
            return result
        except Exception as exc:
            return {"error": f"actions: {failure('actions', exc)}"}

    async def _pipelines(self) -> dict[str, Any]:
        """Pipelines loaded from a subscription's modelUrl, by content id (no URL here:
        `GET /pipelines`, behind the token, has them): the seed's state (downloading,
        converting, enabled, error, and loading) and the error text. A failed pipeline
        affects only its own subscriptions: the status stays ok."""
        try:
            return await self._deps.control.pipelines(public=True, timeout_s=self._deps.timeout_s)
        except Exception as exc:
            return {"error": f"pipeline catalog: {failure('the pipeline catalog', exc)}"}

    async def _streams(self) -> dict[str, Any]:
        """Streams counted by state (details: GET /streams)."""
        try:
            listing = await asyncio.wait_for(
                self._deps.control.registry.list_streams.remote(), self._deps.timeout_s
            )
        except Exception as exc:
            return {"error": f"stream registry: {failure('the stream registry', exc)}"}
        by_state: dict[str, int] = {}
        for stream in listing["streams"]:
            by_state[stream["state"]] = by_state.get(stream["state"], 0) + 1
        return {"total": len(listing["streams"]), "by_state": by_state}


def router(service: Health) -> APIRouter:
    """The /health route."""
    api = APIRouter()

    @api.get("/health")
    async def health() -> dict[str, Any]:
        """Overall status and each model's availability; never triggers a model load.
        Open without a token, so computed at most once a second per replica (one fan-out
        to the models, the registry and the sinks, whoever asks how often)."""
        return await service.report()

    return api
