"""Actions deployment: a thin Serve shell over `ActionService` (outbox + delivery)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import metrics

from deployments.delivery.outbox import DeliveryReport, OutboxEntry
from deployments.delivery.service import ActionService
from graph.common.names import STREAMS_NAMESPACE, catalog_name
from graph.common.schemas import ActionsSettings
from graph.pipeline.connections import Route


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=64,
    max_queued_requests=512,
)
class Actions:
    def __init__(
        self, settings: dict[str, Any], base_dir: str, routes: dict[str, Any] | None = None
    ) -> None:
        """`routes`: the configured archives' own connections (archive_connections: use);
        a modelUrl archive's are asked of the catalog actor at the route's first entry."""
        self._m_delivered = metrics.Counter(
            "camgraph_actions_delivered_total", "outbox entries delivered", tag_keys=("store",)
        )
        self._m_retried = metrics.Counter(
            "camgraph_actions_retried_total", "delivery attempts put back", tag_keys=("store",)
        )
        self._m_depth = metrics.Gauge(
            "camgraph_outbox_depth", "entries waiting for delivery", tag_keys=("store",)
        )
        self._m_lag = metrics.Gauge(
            "camgraph_outbox_lag_s", "age of the oldest undelivered entry", tag_keys=("store",)
        )
        self._catalog: Any = None
        self._service = ActionService(
            ActionsSettings.model_validate(settings),
            Path(base_dir),
            on_report=self._count,
            routes={name: Route(**r) for name, r in (routes or {}).items()},
            lookup=self._lookup,
        )
        self._gauges_at = 0.0

    async def _lookup(self, name: str) -> Route | None:
        """A modelUrl archive's route, from the catalog actor (None: not known there)."""
        try:
            if self._catalog is None:  # a blocking GCS lookup: off the event loop
                app = serve.get_replica_context().app_name
                self._catalog = await asyncio.wait_for(
                    asyncio.to_thread(ray.get_actor, catalog_name(app), STREAMS_NAMESPACE), 3.0
                )
            found = await asyncio.wait_for(self._catalog.route.remote(name), 3.0)
        except ValueError:  # no catalog: modelUrl pipelines are off
            return None
        except Exception:
            self._catalog = None
            raise
        return None if found is None else Route(**found)

    def _count(self, store: str, report: DeliveryReport) -> None:
        tags = {"store": store}
        if report.delivered:
            self._m_delivered.inc(report.delivered, tags)
        if report.retried:
            self._m_retried.inc(report.retried, tags)

    async def submit(self, entries: list[OutboxEntry]) -> int:
        """Durably accept entries; delivery follows in the background."""
        return await self._service.submit(entries)

    async def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The last entries this replica's sinks took (records, images, messages)."""
        return self._service.recent(limit)

    async def health(self) -> dict[str, Any]:
        await self._service.start()
        report = await self._service.health()
        for stats in report["outbox"]:
            if "depth" in stats:
                tags = {"store": stats["store"]}
                self._m_depth.set(stats["depth"], tags)
                self._m_lag.set(stats["oldest_age_s"], tags)
        return report

    async def check_health(self) -> None:
        """Serve's periodic probe: also starts delivery on an idle replica and refreshes
        the depth and lag gauges."""
        await self.health()

    async def __del__(self) -> None:
        await self._service.close()
