"""The application's control plane: its detached actors, found or created in one place.

The stream registry, the EventHub and the media jobs actor are detached and restartable:
they outlive every ingress replica, so streams, events and jobs keep running through an
ingress restart or a redeploy. Each replica `connect`s: the first creates them, the
others find them, and every one tells them today's models and pipelines.
"""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.catalog import CatalogActor
from deployments.jobs.actor import MediaJobs
from graph.common.names import (
    STREAMS_NAMESPACE,
    catalog_name,
    hub_name,
    jobs_actor_name,
    registry_name,
)
from graph.events.hub import EventHub
from graph.pipeline.catalog import UrlRefused, url_refusal
from graph.pipeline.plan import PipelineRuntime
from graph.wiring import IngressConfig
from stream_actors.registry import StreamRegistry
from stream_actors.settings import StreamContext

# Actor handles: Ray's ActorHandle, typed loosely (its methods are found at run time).
ActorHandle = Any


def stream_context(app_name: str, config: IngressConfig) -> StreamContext:
    """What the registry and its camera actors run with (no Ray)."""
    return StreamContext(
        app_name=app_name,
        namespace=STREAMS_NAMESPACE,
        default_model=config.default_model,
        model_sizes=dict(config.model_sizes),
        detector_names=dict(config.detectors),
        settings=config.streams,
        pipelines={
            model_id: PipelineRuntime.of(
                p.pipeline, p.version, p.classifiers, p.actions, p.sink_routes
            )
            for model_id, p in config.pipelines.items()
        },
        url_touch_s=(
            None if config.url_pipelines is None else config.url_pipelines.settings.touch_interval_s
        ),
    )


class ControlPlane:
    """Handles on one app's registry, EventHub and (lazily) media jobs actors."""

    def __init__(
        self, app_name: str, config: IngressConfig, registry: Any, hub: Any, catalog: Any = None
    ) -> None:
        self.app_name, self._config = app_name, config
        self.registry: ActorHandle = registry
        self.hub: ActorHandle = hub
        self.catalog: ActorHandle | None = catalog  # None: modelUrl pipelines are off
        self._jobs: ActorHandle | None = None

    @classmethod
    def connect(cls, app_name: str, config: IngressConfig) -> ControlPlane:
        """Find or create the registry and the EventHub of `app_name` (blocking: a
        lookup in Ray's control store). The media jobs actor waits for the first job."""
        context = stream_context(app_name, config)
        registry = StreamRegistry.options(  # type: ignore[attr-defined]
            name=registry_name(app_name),
            namespace=STREAMS_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=256,
        ).remote(context)
        registry.configure.remote(context)  # an existing registry learns the models
        hub = EventHub.options(  # type: ignore[attr-defined]
            name=hub_name(app_name),
            namespace=STREAMS_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=1000,
        ).remote(config.events.capacity_per_topic, config.events.max_topics)
        catalog = None
        if config.url_pipelines is not None:
            spec = config.url_pipelines.model_dump(mode="json")
            catalog = CatalogActor.options(  # type: ignore[attr-defined]
                name=catalog_name(app_name),
                namespace=STREAMS_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=256,
            ).remote(app_name, spec)
            catalog.configure.remote(spec)  # one started by an earlier deploy
        return cls(app_name, config, registry, hub, catalog)

    async def load_pipeline(self, url: str) -> dict[str, Any]:
        """The modelUrl pipeline at `url`, loaded by the catalog (or already held); raises
        UrlRefused or PipelineUnavailable naming the problem."""
        spec = self._config.url_pipelines
        if self.catalog is None or spec is None:
            raise UrlRefused(url, url_refusal(url, ()) or "off")
        info: dict[str, Any] = (
            await asyncio.wait_for(self.catalog.load.remote(url), spec.settings.load_timeout_s + 30)
        )["info"]
        return info

    async def pipelines(self, public: bool, timeout_s: float = 10.0) -> dict[str, Any]:
        """Each modelUrl pipeline's state: by URL (`GET /pipelines`), or without URLs
        (`public`: the open `/health`)."""
        if self.catalog is None:
            return {}
        call = self.catalog.status.remote(public)
        status: dict[str, Any] = await asyncio.wait_for(call, timeout_s)
        return status

    async def read_events(
        self, after_id: int, flt: dict[str, Any] | None, limit: int, wait_s: float
    ) -> dict[str, Any]:
        """The hub's long-poll read, bounded a little past its own wait."""
        result: dict[str, Any] = await asyncio.wait_for(
            self.hub.read.remote(after_id, flt, limit, wait_s), wait_s + 10.0
        )
        return result

    async def jobs(self) -> ActorHandle:
        """The media jobs actor, started at the first job request. Found or created off
        the event loop: it is a synchronous lookup in Ray's control store."""
        if self._jobs is None:
            handle = await asyncio.to_thread(self._find_or_start_jobs)
            if self._jobs is None:  # two first requests: one handle is kept
                self._jobs = handle
        return self._jobs

    def _find_or_start_jobs(self) -> ActorHandle:
        config = self._config
        names, sizes = dict(config.detectors), dict(config.model_sizes)
        handle = MediaJobs.options(  # type: ignore[attr-defined]
            name=jobs_actor_name(self.app_name),
            namespace=STREAMS_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=256,
        ).remote(
            self.app_name,
            names,
            sizes,
            config.default_model,
            config.jobs.model_dump(mode="json"),
            hub_name(self.app_name),
            STREAMS_NAMESPACE,
        )
        # An actor started by an earlier deploy learns today's models.
        handle.configure.remote(names, sizes, config.default_model)
        return handle
