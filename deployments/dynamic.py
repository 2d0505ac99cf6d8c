"""The multiplexed deployments of pipelines loaded from a subscription's `modelUrl`.

`PipelineDetector` serves every URL pipeline's root model, keyed by the archive's
sha256 (Serve's multiplexed model id), and `PipelineClassifier` every branch model,
keyed `<sha256>:<branch modelId>`. Both are ordinary autoscaled, batched deployments:
Serve routes a request to a replica that holds its model (or loads it there), and
`@serve.batch` splits each batch by model id (Ray 2.60, `serve/batching.py`), so one
batch never mixes two pipelines. Each replica fetches the archive itself, by the URL the
catalog actor knows for the sha256, through the same safe loader as configured archives,
into its node's cache, and checks that the content is the one the catalog loaded: a
multi-node cluster needs no shared storage. Models the catalog unloaded (idle) are
dropped from every replica within a touch interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray import serve

from deployments.inference.classify import BranchEngine, Label
from deployments.inference.engines import Engine, EngineOptions, load_engine
from graph.common.detection import DetectRequest, DetectResult, per_frame, with_backlog
from graph.common.names import STREAMS_NAMESPACE, catalog_name
from graph.common.redaction import redact_text
from graph.common.schemas import BatchUserConfig, BranchModelSpec, DetectorUserConfig
from graph.common.vision import check_fits
from graph.pipeline.archive import ArchiveError, LoadedArchive, cached_archive, load_archive
from graph.pipeline.catalog import PipelineLoading, PipelineUnavailable, UrlPipelinesSpec
from graph.scaling import FramesInFlight

logger = logging.getLogger("ray.serve")

MODELS_PER_REPLICA = 4  # pipelines a detector replica holds (LRU beyond: Serve evicts)
BRANCHES_PER_REPLICA = 16  # branch models a classifier replica holds
MULTIPLEX_ATTR = "__serve_multiplex_wrapper"  # where Serve keeps a replica's models
DETECTOR_BATCHING = DetectorUserConfig()  # batching until user_config says otherwise


class _Archives:
    """What both deployments share: the catalog actor, the node's archive cache, the
    replica's failed loads (Serve's multiplexer keeps no record of failures: without
    this, every frame of a broken pipeline would download it again)."""

    def __init__(self, spec: UrlPipelinesSpec) -> None:
        self.spec = spec
        self._catalog: Any = None
        self._failed: dict[str, tuple[float, str]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._telling: asyncio.Future[None] | None = None

    async def catalog(self) -> Any:
        if self._catalog is None:  # a blocking GCS lookup: off the event loop
            app = serve.get_replica_context().app_name
            self._catalog = await asyncio.to_thread(
                ray.get_actor, catalog_name(app), STREAMS_NAMESPACE
            )
        return self._catalog

    def check_failed(self, model_id: str) -> None:
        failed = self._failed.get(model_id)
        if failed is not None:
            if time.monotonic() - failed[0] < self.spec.settings.retry_after_error_s:
                raise PipelineUnavailable(failed[1])
            del self._failed[model_id]

    def record_failure(self, model_id: str, exc: BaseException) -> None:
        text = redact_text(f"{type(exc).__name__}: {exc}")[:1000]
        self._failed[model_id] = (time.monotonic(), text)
        self._telling = asyncio.ensure_future(self._tell_failed(model_id.partition(":")[0], text))

    async def _tell_failed(self, key: str, text: str) -> None:
        """The catalog shows a replica's failure as a warning of the pipeline."""
        try:
            await (await self.catalog()).replica_failed.remote(key, text)
        except Exception:
            logger.warning("pipeline %s: could not report a failed load", key[:12])

    async def archive(self, key: str) -> LoadedArchive:
        """The archive with this sha256: from the node's cache, else fetched from the
        URL the catalog has for it, and refused when the content there changed."""
        spec = self.spec
        source = f"pipeline {key[:12]}"
        # Asked of the catalog first, also for an archive this node has: one it unloaded
        # (idle, or its URL no longer allowed) is not loaded again behind its back.
        url = await (await self.catalog()).source_of.remote(key)
        if url is None:
            raise PipelineUnavailable(f"{source} is not loaded: subscribe with its modelUrl")
        found = await asyncio.to_thread(cached_archive, spec.archive_cache_dir, key, source)
        if found is not None:
            return found
        try:
            loaded = await asyncio.to_thread(
                load_archive, url, spec.archive_cache_dir, spec.limits, spec.url_check()
            )
        except ArchiveError as exc:  # named by its content, not its URL (a signed one)
            raise ArchiveError(source, [redact_text(p) for p in exc.problems]) from None
        if loaded.sha256 != key:
            raise PipelineUnavailable(f"{source}: the archive at its URL changed since it loaded")
        return loaded

    def converting(self, key: str) -> Callable[[], None]:
        """A loader thread's `on_converting`: tells the catalog (from the event loop)."""
        loop = asyncio.get_running_loop()

        def tell() -> None:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._report(key)))

        return tell

    async def _report(self, key: str) -> None:
        try:
            await (await self.catalog()).report.remote(key, "converting")
        except Exception:  # a report is informative only
            logger.warning("pipeline %s: could not report converting", key[:12])

    def start_sweeper(self, owner: object) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep(owner))

    async def _sweep(self, owner: object) -> None:
        """Drop the models of pipelines the catalog unloaded (Serve itself evicts only
        when a replica is full). Uses the multiplexer's model table (Ray 2.60)."""
        while True:
            await asyncio.sleep(self.spec.settings.touch_interval_s)
            try:
                retired = set(await (await self.catalog()).retired.remote())
            except Exception:
                self._catalog = None
                continue
            wrapper = getattr(owner, MULTIPLEX_ATTR, None)
            if wrapper is None:
                continue
            dropped = [m for m in list(wrapper.models) if m.partition(":")[0] in retired]
            for model_id in dropped:
                wrapper.models.pop(model_id, None)
                logger.info("pipeline model %s unloaded (idle)", model_id)
            if dropped:
                wrapper._push_multiplexed_replica_info = True


class _Model:
    def __init__(self, engine: Any) -> None:
        self.engine = engine


def held(owner: object, model_id: str) -> _Model:
    """The replica's model for a batch, without loading: a batch must never wait on a
    load (it would hold up every pipeline's batches); one unloaded meanwhile fails
    these frames, and the next ones load it again before batching."""
    wrapper = getattr(owner, MULTIPLEX_ATTR, None)
    model = None if wrapper is None else wrapper.models.get(model_id)
    if model is None:
        raise PipelineLoading(f"pipeline model {model_id[:12]} was unloaded: retry")
    return model  # type: ignore[no-any-return]


class _Multiplexed:
    """What both deployments share: the archives helper, the batching settings of their
    batched method (`user_config`), loading the request's model outside any batch, and
    their counters."""

    CONFIG: type[BatchUserConfig] | type[DetectorUserConfig] = BatchUserConfig

    def __init__(self, spec: dict[str, Any]) -> None:
        self._archives = _Archives(UrlPipelinesSpec.model_validate(spec))
        self._batch_sizes: Counter[int] = Counter()

    def _batched(self) -> Any:
        raise NotImplementedError

    async def _model(self, model_id: str) -> _Model:
        raise NotImplementedError

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = self.CONFIG.model_validate(user_config)
        batched: Any = self._batched()  # @serve.batch adds these setters at runtime
        batched.set_max_batch_size(config.max_batch_size)
        batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def _loaded(self) -> _Model:
        self._archives.start_sweeper(self)
        return await self._model(serve.get_multiplexed_model_id())

    def stats(self) -> dict[str, Any]:
        wrapper = getattr(self, MULTIPLEX_ATTR, None)
        return {
            "models": list(wrapper.models) if wrapper is not None else [],
            "batch_sizes": dict(self._batch_sizes),
        }


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=16,
    max_queued_requests=64,
    user_config=DETECTOR_BATCHING.model_dump(),
)
class PipelineDetector(_Multiplexed):
    """The root models of URL pipelines, one multiplexed model per archive."""

    CONFIG = DetectorUserConfig

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self._frames = FramesInFlight()

    def _batched(self) -> Any:
        return self._detect

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def _model(self, key: str) -> _Model:
        archives = self._archives
        archives.check_failed(key)
        try:
            loaded = await archives.archive(key)
            root = loaded.pipeline.pipeline
            assert root.modelFile is not None  # the schema requires it
            spec = archives.spec
            options = EngineOptions(
                root.imgsz or 640,
                spec.settings.intra_op_threads,
                spec.trt_cache_dir,
                gpu=bool(ray.get_gpu_ids()),
                onnx_cache_dir=spec.onnx_cache_dir,
            )
            engine: Engine = await asyncio.to_thread(
                load_engine, loaded.model_path(root.modelFile), options, archives.converting(key)
            )
        except Exception as exc:
            archives.record_failure(key, exc)
            raise
        logger.info("pipeline %s: detector loaded on %s", key[:12], engine.providers)
        return _Model(engine)

    async def warm(self) -> dict[str, Any]:
        """Load this request's pipeline (the catalog calls it once per new pipeline)."""
        engine = (await self._loaded()).engine
        return {"providers": list(engine.providers), "classes": engine.names}

    async def detect(self, request: DetectRequest) -> DetectResult:
        # Loaded first, outside the batch: a pipeline loading here must not hold up the
        # batches of the pipelines already loaded.
        with self._frames.hold(1):
            imgsz = (await self._loaded()).engine.imgsz
            return await self._detect_checked(request, imgsz)

    async def _detect_checked(self, request: DetectRequest, imgsz: int) -> DetectResult:
        check_fits(request.image, imgsz)  # one wrong frame must not fail its batch
        result: DetectResult = await self._detect(request)
        return result

    async def detect_many(
        self,
        requests: list[DetectRequest],
        caller: str | None = None,
        waiting: int = 0,
        seq: int = 0,
    ) -> list[DetectResult | Exception]:
        """Several frames of one pipeline in one call (see Detector.detect_many)."""
        self._frames.note_waiting(caller, waiting, seq)
        with self._frames.hold(len(requests)):
            imgsz = (await self._loaded()).engine.imgsz
            answers = per_frame(
                await asyncio.gather(
                    *(self._detect_checked(r, imgsz) for r in requests), return_exceptions=True
                )
            )
            return with_backlog(answers, self._frames.others(len(requests)))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Frames here, and held back by callers (see Detector.record_autoscaling_stats)."""
        return self._frames.stats()

    @serve.batch(
        max_batch_size=DETECTOR_BATCHING.max_batch_size,
        batch_wait_timeout_s=DETECTOR_BATCHING.batch_wait_timeout_s,
    )
    async def _detect(self, requests: list[DetectRequest]) -> list[DetectResult]:
        engine = held(self, serve.get_multiplexed_model_id()).engine  # one model per batch
        results = engine.detect(
            engine.batch([r.image for r in requests]), [r.params for r in requests]
        )
        self._batch_sizes[len(requests)] += 1
        return [DetectResult(rows, engine.names) for rows in results]


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=32,
    max_queued_requests=128,
    user_config=BatchUserConfig().model_dump(),
)
class PipelineClassifier(_Multiplexed):
    """The branch models of URL pipelines, one multiplexed model per `<sha256>:<branch>`."""

    def _batched(self) -> Any:
        return self._classify

    @serve.multiplexed(max_num_models_per_replica=BRANCHES_PER_REPLICA)
    async def _model(self, model_id: str) -> _Model:
        archives = self._archives
        archives.check_failed(model_id)
        key, _, branch = model_id.partition(":")
        try:
            loaded = await archives.archive(key)
            node = next(
                (n for n in loaded.pipeline.pipeline.walk()[1:] if n.modelId == branch), None
            )
            if node is None:
                raise PipelineUnavailable(f"pipeline {key[:12]} has no branch {branch!r}")
            spec = BranchModelSpec(
                id=branch,
                kind="ocr" if node.modelType == "ocr" else "classifier",
                path=loaded.model_path(node.modelFile) if node.modelFile else None,
                intra_op_threads=archives.spec.settings.intra_op_threads,
                onnx_cache_dir=archives.spec.onnx_cache_dir,
            )
            engine = await asyncio.to_thread(
                BranchEngine, spec, archives.converting(key), bool(ray.get_gpu_ids())
            )
        except Exception as exc:
            archives.record_failure(model_id, exc)
            raise
        return _Model(engine)

    async def warm(self) -> dict[str, Any]:
        engine = (await self._loaded()).engine
        return {"providers": list(engine.providers), "kind": engine.kind}

    async def classify(self, crop: np.ndarray) -> Label | None:
        await self._loaded()
        return await self._classify(crop)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _classify(self, crops: list[np.ndarray]) -> list[Label | None]:
        engine = held(self, serve.get_multiplexed_model_id()).engine
        self._batch_sizes[len(crops)] += 1
        out: list[Label | None] = engine.classify(crops)
        return out
