"""The catalog actor: one per app (detached, restartable), the Ray shell over
`graph.pipeline.catalog.PipelineCatalog`.

A subscribe naming a `modelUrl` calls `load(url)`: the archive is fetched once here
(allow-list, size caps, pickle scan, schema, sha256), then the multiplexed detector and
classifier deployments are asked to load it (`warm`), and the answer comes when the
pipeline is enabled or has failed (its error names the problem). Camera actors get the
pipeline file from `load` too, and `touch` what they use; idle pipelines are unloaded.
After a restart the catalog learns again, from the touches, what is in use.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from typing import Any

import ray
from ray import serve
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

from graph.common.names import PIPELINE_CLASSIFIER, PIPELINE_DETECTOR
from graph.common.redaction import redact, redact_text
from graph.pipeline.archive import ArchiveError, load_archive
from graph.pipeline.catalog import (
    PipelineCatalog,
    PipelineInfo,
    PipelineLoading,
    PipelineState,
    PipelineUnavailable,
    UrlPipelinesSpec,
)
from graph.pipeline.connections import (
    ConnectionSectionError,
    Route,
    archive_routes,
    route_names,
)
from graph.pipeline.plan import PipelinePlan
from graph.pipeline.spec import PipelineFile

logger = logging.getLogger("camgraph.pipelines")


def remote_error(exc: BaseException) -> str:
    """A replica's failure as its cause's text (not Ray's remote traceback)."""
    cause = getattr(exc, "cause", None) or exc
    return redact_text(f"{type(cause).__name__}: {cause}")[:2000]


DOWNLOADS_AT_ONCE = 2  # archive downloads (threads, memory, disk) running at once


def spec_key(app_name: str) -> str:
    """Where the catalog's latest settings are kept (Ray's key-value store)."""
    return f"camgraph:pipeline-catalog-spec:{app_name}"


@ray.remote(max_restarts=-1, max_task_retries=-1)
class CatalogActor:
    def __init__(self, app_name: str, spec: dict[str, Any]) -> None:
        self._app = app_name
        self._spec = UrlPipelinesSpec.model_validate(spec)
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray re-runs the constructor with the first creation's arguments: the
            # settings a redeploy gave since (the allow-list!) come from the cluster's
            # key-value store, under the app's name.
            saved = _internal_kv_get(spec_key(app_name))
            if saved is None:
                logger.warning("pipeline catalog: no saved settings: the first deploy's apply")
            else:
                self._spec = UrlPipelinesSpec.model_validate_json(saved)
        else:
            self._save_spec()
        self._catalog = PipelineCatalog(self._spec.settings)
        self._downloads = asyncio.Semaphore(DOWNLOADS_AT_ONCE)
        self._pipelines: dict[str, PipelineFile] = {}  # by sha256, connections removed
        self._tasks: dict[str, asyncio.Task[None]] = {}  # URL → its load
        self._warnings: dict[str, list[str]] = {}  # by sha256: branch models that failed
        self._routes: dict[str, Route] = {}  # archive_connections: use, by route name
        self._route_names: dict[str, dict[str, str]] = {}  # by sha256: sink → route
        self._sweeper = asyncio.get_event_loop().create_task(self._sweep())

    def _save_spec(self) -> None:
        _internal_kv_put(spec_key(self._app), self._spec.model_dump_json(), overwrite=True)

    def configure(self, spec: dict[str, Any]) -> None:
        """A redeploy's settings (allow-list, limits) apply from the next load and the
        next sweep on (URLs no longer allowed are then unloaded); kept for restarts."""
        spec_now = UrlPipelinesSpec.model_validate(spec)
        if spec_now.use_connections != self._spec.use_connections:
            self._route_names.clear()  # pipelines loaded from now on say where they go
        self._spec = spec_now
        self._catalog.settings = self._spec.settings
        self._save_spec()

    async def load(self, url: str, wait_s: float | None = None) -> dict[str, Any]:
        """The pipeline at `url`, loaded (or shared) and enabled: `info` and `pipeline`.
        Raises UrlRefused or PipelineUnavailable (with the problem) otherwise, and
        PipelineLoading when it is not enabled within `wait_s` (default: the load
        timeout); the load goes on."""
        task = self._tasks.get(url)
        if task is None:
            info = self._catalog.begin(url)  # raises for a refused or recently failed URL
            if info is not None:
                return self._answer(info)
            task = self._start(url)
        limit_s = self._spec.settings.load_timeout_s
        wait_s = limit_s if wait_s is None else min(wait_s, limit_s)
        try:
            await asyncio.wait_for(asyncio.shield(task), wait_s)
        except TimeoutError:
            state, _, _ = self._catalog.state_of(url)
            raise PipelineLoading(
                f"pipeline still {state.value} after {wait_s:g}s: subscribe again later"
            ) from None
        state, error, info = self._catalog.state_of(url)
        if state is PipelineState.ERROR:
            raise PipelineUnavailable(error or "failed")
        if state is not PipelineState.ENABLED or info is None:
            raise PipelineLoading(f"pipeline {state.value}: subscribe again later")
        return self._answer(info)

    def _start(self, url: str) -> asyncio.Task[None]:
        task = self._tasks[url] = asyncio.get_running_loop().create_task(self._load(url))

        def forget(_: asyncio.Task[None]) -> None:
            if self._tasks.get(url) is task:
                del self._tasks[url]

        task.add_done_callback(forget)
        return task

    def _answer(self, info: PipelineInfo) -> dict[str, Any]:
        routes = self._route_names.get(info.key, {}) if self._spec.use_connections else {}
        return {"info": asdict(info), "pipeline": self._pipelines[info.key], "routes": routes}

    async def _load(self, url: str) -> None:
        spec, key = self._spec, None
        try:
            async with asyncio.timeout(spec.settings.load_timeout_s):
                key = await self._load_within(url)
        except TimeoutError:
            message = f"not loaded within {spec.settings.load_timeout_s:g}s (load_timeout_s)"
            self._catalog.failed(url, message, key)

    async def _load_within(self, url: str) -> str | None:
        spec, key = self._spec, None
        try:
            loaded = await self._download(url)
            key, pipeline = loaded.sha256, loaded.pipeline.without_connections()
            warnings, names = loaded.pipeline.connection_warnings(), {}
            own: list[Route] = []
            if spec.use_connections:  # where this archive's actions go: its own servers
                try:
                    own = archive_routes(loaded.pipeline.redis, loaded.pipeline.postgresql)
                except ConnectionSectionError as exc:
                    raise PipelineUnavailable(f"connection sections: {exc}") from None
                warnings, names = [], route_names(own)
            version = pipeline.version or key[:12]
            PipelinePlan.of(pipeline, version)  # what a camera actor will build must build
            self._routes.update((r.name, r) for r in own)
            root = pipeline.pipeline
            info = PipelineInfo(
                key,
                root.modelId,
                version,
                root.imgsz or 640,
                tuple(n.modelId for n in root.walk()[1:]),
            )
            self._pipelines[key] = pipeline
            self._route_names[key] = names
            self._warnings[key] = warnings
            if self._catalog.downloaded(url, info):
                await self._warm(info)
                self._catalog.report(key, PipelineState.ENABLED)
                logger.info("pipeline %s (%s) enabled from %s", root.modelId, key[:12], redact(url))
        except ArchiveError as exc:  # its problems, not the URL (a signed one) again
            self._catalog.failed(url, redact_text("; ".join(exc.problems))[:2000], key)
        except PipelineUnavailable as exc:
            self._catalog.failed(url, exc.message, key)
        except Exception as exc:
            logger.warning("pipeline at %s failed: %s", redact(url), remote_error(exc))
            self._catalog.failed(url, remote_error(exc), key)
        return key

    async def _download(self, url: str) -> Any:
        """`load_archive` in a thread, at most DOWNLOADS_AT_ONCE at a time. The slot is
        held until the thread ends, also when the load's deadline cancels the wait (the
        thread stops at the download's own deadline, download_total_s)."""
        spec = self._spec
        await self._downloads.acquire()
        future = asyncio.ensure_future(
            asyncio.to_thread(
                load_archive, url, spec.archive_cache_dir, spec.limits, spec.url_check()
            )
        )
        future.add_done_callback(lambda _: self._downloads.release())
        return await asyncio.shield(future)

    async def _warm(self, info: PipelineInfo) -> None:
        """One replica of each deployment loads the pipeline's models (a .pt exports to
        ONNX here, once per node). The root model failing fails the pipeline (the
        subscribe's error); a branch model failing leaves it enabled with a warning, as
        a configured pipeline whose Classifier is in error: that branch then fails on
        each object and the actions go on with the other branches' results."""
        detector = serve.get_deployment_handle(PIPELINE_DETECTOR, app_name=self._app)
        classifier = serve.get_deployment_handle(PIPELINE_CLASSIFIER, app_name=self._app)
        branches = [
            classifier.options(multiplexed_model_id=f"{info.key}:{b}").warm.remote()
            for b in info.branches
        ]
        try:
            await detector.options(multiplexed_model_id=info.key).warm.remote()
        except Exception as exc:
            raise PipelineUnavailable(f"the detector failed to load: {remote_error(exc)}") from exc
        results = await asyncio.gather(*branches, return_exceptions=True)
        warnings = [
            f"branch {b}: failed to load: {remote_error(r)}"
            for b, r in zip(info.branches, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if warnings:
            logger.warning("pipeline %s: %s", info.key[:12], "; ".join(warnings))
            self._warnings[info.key] = [*self._warnings.get(info.key, []), *warnings]

    def replica_failed(self, key: str, text: str) -> None:
        """A replica could not load this pipeline's model (e.g. the archive at its URL
        changed, for a replica on a node without it): shown as a warning."""
        warnings = self._warnings.setdefault(key, [])
        if text not in warnings and len(warnings) < 10:
            warnings.append(f"a replica failed to load: {text}")

    def report(self, key: str, state: str, error: str | None = None) -> None:
        self._catalog.report(key, PipelineState(state), error)

    def route(self, name: str) -> dict[str, Any] | None:
        """A route's connection, for the Actions deployment only (it holds a password)."""
        route = self._routes.get(name)
        return None if route is None else asdict(route)

    def source_of(self, key: str) -> str | None:
        return self._catalog.source_of(key)

    def retired(self) -> list[str]:
        return list(self._catalog.retired)

    async def touch(self, used: dict[str, str]) -> None:
        """Camera actors' pipelines in use (sha256 → URL); ones this catalog does not
        hold (it restarted) are loaded again in the background."""
        for key in self._catalog.touch(used):
            url = used[key]
            if url not in self._tasks:
                try:
                    if self._catalog.begin(url) is None:
                        self._start(url)
                except Exception as exc:  # refused now (the allow-list changed)
                    logger.warning("pipeline at %s in use but %s", redact(url), exc)

    def status(self, public: bool = False) -> dict[str, Any]:
        """By URL (`GET /pipelines`), or without URLs (`public`: the open /health)."""
        if public:
            status = self._catalog.public_status()
            key_of = {k[:12]: k for k in self._warnings}
            for pid, item in status.items():
                warnings = self._warnings.get(key_of.get(pid, ""))
                if warnings:
                    item["warnings"] = warnings
            return status
        status = self._catalog.status(redact)
        for item in status.values():
            warnings = self._warnings.get(item.get("sha256", ""))
            if warnings:
                item["warnings"] = warnings
        return status

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._spec.settings.touch_interval_s)
            for key in self._catalog.sweep():
                logger.info("pipeline %s unloaded (idle)", key[:12])
            # What the catalog no longer holds (unloaded, evicted, refused, failed);
            # routes stay: their entries may still wait in the outbox.
            for key in [k for k in self._pipelines if not self._catalog.holds(k)]:
                self._pipelines.pop(key, None)
                self._warnings.pop(key, None)
                self._route_names.pop(key, None)
