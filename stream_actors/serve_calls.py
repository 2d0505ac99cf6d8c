"""How a camera actor reaches the app's Serve deployments: cached deployment handles
(one router per deployment for the whole actor) and the detector call a dispatcher
sends through."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

from ray.serve.exceptions import BackPressureError

from graph.common.detection import DetectRequest, DetectResult
from graph.common.errors import DetectorBusy
from stream_actors.dispatch import SendFn


class ServeHandles:
    """Deployment handles of one app, made once each (a redeploy `clear`s them)."""

    def __init__(self, app_name: str) -> None:
        self._app = app_name
        self._plain: dict[str, Any] = {}
        self._mux: dict[tuple[str, str], Any] = {}  # (deployment, multiplexed id) → handle

    def get(self, name: str) -> Any:
        handle = self._plain.get(name)
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(name, app_name=self._app)
            self._plain[name] = handle
        return handle

    def mux(self, name: str, model_id: str) -> Any:
        """A handle on a multiplexed deployment for one model (routed to the replicas
        that hold it); all share the deployment's router."""
        handle = self._mux.get((name, model_id))
        if handle is None:
            handle = self.get(name).options(multiplexed_model_id=model_id)
            self._mux[(name, model_id)] = handle
        return handle

    def clear(self) -> None:
        """Deployments may have been replaced (a redeploy): handles are made anew."""
        self._plain.clear()
        self._mux.clear()


def detector_sender(handle: Any, model_id: str) -> SendFn:
    """A dispatcher's calls to a detector deployment (`detect_many`): Serve's back
    pressure becomes camgraph's `DetectorBusy`, and a call cancelled by the dispatcher's
    timeout is cancelled in the replica too."""
    # This dispatcher in the replicas' load reports, and its reports' numbers (the
    # replicas keep the last they heard; the policy takes the latest of them).
    caller, seqs = uuid.uuid4().hex[:16], itertools.count(1)

    async def send(requests: list[DetectRequest], waiting: int) -> list[DetectResult | Exception]:
        response = handle.detect_many.remote(requests, caller, waiting, next(seqs))
        try:
            results: list[DetectResult | Exception] = await response
        except BackPressureError as exc:  # the processor knows no Ray: camgraph's own
            raise DetectorBusy(model_id, str(exc)) from exc
        except asyncio.CancelledError:  # timed out: the replica must not go on with it
            response.cancel()
            raise
        return results

    return send
