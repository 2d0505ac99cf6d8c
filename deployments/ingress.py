"""Ingress deployment: HTTP, WebSocket and SSE through a FastAPI app built per replica,
and gRPC methods for Serve's gRPC proxy. It holds no per-camera state.

The app is late-bound (`@serve.ingress()` with `__serve_build_asgi_app__`): Serve calls
the builder on each replica after `__init__`, so routes close over this replica's
dependencies and nothing is shared through module state. The routes live in
`deployments.api` (one module per resource), the error table in `deployments.api.errors`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import FastAPI
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from deployments.api.app import ApiDeps, build_api
from deployments.api.auth import load_token
from deployments.api.detect import Detectors
from deployments.api.grpc import GrpcApi, GrpcDeps
from deployments.api.state import ReplicaState
from graph.control import ControlPlane
from graph.events.fanout import EventFanout
from graph.wiring import IngressConfig
from protos import camgraph_pb2 as pb


# Every open WebSocket, SSE and gRPC stream holds one of max_ongoing_requests.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    def __init__(
        self,
        config: IngressConfig,
        detectors: dict[str, DeploymentHandle],
        classifiers: dict[str, DeploymentHandle] | None = None,
        actions: DeploymentHandle | None = None,
        url_models: list[DeploymentHandle] | None = None,  # bound so that Serve deploys them
    ) -> None:
        settings = config.settings
        # The registry and EventHub outlive ingress replicas (detached, restartable):
        # streams keep running through an ingress restart or a redeploy of the app.
        control = ControlPlane.connect(serve.get_replica_context().app_name, config)
        fanout = EventFanout(control.read_events, settings.client_queue)
        found = Detectors(detectors, config.default_model, settings)
        # Loaded last: a replica that cannot read its token fails to start (never open).
        token = load_token(settings.auth_token_env, settings.auth_token_file)
        self._api = ApiDeps(
            settings=settings,
            auth_token=token,
            detectors=found,
            classifiers=classifiers or {},
            actions=actions,
            control=control,
            fanout=fanout,
            state=ReplicaState(control, settings.health_timeout_s),
            model_versions={root: p.version for root, p in config.pipelines.items()},
        )
        self._grpc = GrpcApi(GrpcDeps(settings, token, found, fanout))

    def __serve_build_asgi_app__(self) -> FastAPI:
        """This replica's FastAPI app (Serve calls it once, after `__init__`)."""
        return build_api(self._api)

    # gRPC: Serve's proxy calls the method named like the RPC.
    async def Detect(
        self, request: pb.DetectRequest, grpc_context: RayServegRPCContext
    ) -> pb.DetectReply:
        """Objects in one encoded image; boxes in the image's own pixels."""
        return await self._grpc.detect(request, grpc_context)

    async def StreamEvents(
        self, request: pb.EventFilter, grpc_context: RayServegRPCContext
    ) -> AsyncGenerator[pb.Event, None]:
        """Matching events after `after_id` (unset: from now on), until the client cancels."""
        events = self._grpc.stream_events(request, grpc_context)
        try:
            async for event in events:
                yield event
        finally:  # a cancelled call stops following now, not at garbage collection
            await events.aclose()
