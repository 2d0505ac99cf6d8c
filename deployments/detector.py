"""Detector deployment: one YOLO engine per replica, dynamically batched, stateless."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import ray
from ray import serve
from ray.serve import metrics

from deployments.inference.engines import Engine, EngineOptions, ModelSlot, load_engine
from graph.common.detection import (
    DetectRequest,
    DetectResult,
    EncodedImage,
    per_frame,
    with_backlog,
)
from graph.common.schemas import DetectorUserConfig, ModelSpec
from graph.common.vision import check_fits, decode_letterboxed
from graph.scaling import FramesInFlight

logger = logging.getLogger("ray.serve")

BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
# How long a request waits for the model of a replica that is still loading it (one
# autoscaling just started): ONNX models load in about a second here.
LOAD_WAIT_S = 15.0


DEFAULT_BATCHING = DetectorUserConfig()


def replica_cpu_share() -> float:
    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # outside a Ray worker
        return 1.0


@serve.deployment(
    ray_actor_options={"num_cpus": 1.0},
    max_ongoing_requests=16,
    max_queued_requests=64,
    user_config=DEFAULT_BATCHING.model_dump(),
)
class Detector:
    """Serve shell over `ModelSlot` + engine; answers `health()` without loading."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = ModelSpec.model_validate(spec)
        threads = self._spec.intra_op_threads
        if threads == "auto":
            threads = max(1, round(replica_cpu_share()))
        # GPU only when Ray assigned this replica one (num_gpus > 0): replicas without
        # a share must not run on GPU 0 outside Ray's accounting.
        options = EngineOptions(
            self._spec.imgsz,
            int(threads),
            self._spec.trt_cache_dir,
            self._spec.fp16,
            gpu=bool(ray.get_gpu_ids()),
            onnx_cache_dir=self._spec.onnx_cache_dir,
        )
        self._slot: ModelSlot[Engine] = ModelSlot(self._spec.id)
        path = Path(self._spec.path)
        self._slot.start(lambda converting: load_engine(path, options, converting))
        self._config = DetectorUserConfig()
        self._batch_sizes: Counter[int] = Counter()
        self._frames = FramesInFlight()  # queued or running here: the autoscaling signal
        self._decoding = asyncio.Semaphore(1)  # uploads decoded here (detect_image)
        cv2.setNumThreads(1)  # a resize must not spread over every core of the node
        self._started = time.time()
        # Serve tags every metric with its deployment (Detector_<model id>) and replica.
        self._m_batch = metrics.Histogram(
            "camgraph_detector_batch_size",
            description="images per detector batch",
            boundaries=BATCH_BUCKETS,
        )
        self._m_latency = metrics.Histogram(
            "camgraph_detector_batch_latency_ms",
            description="engine time per batch",
            boundaries=[5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
        )
        self._m_images = metrics.Counter(
            "camgraph_detector_images_total", description="images detected"
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._config = DetectorUserConfig.model_validate(user_config)
        batched: Any = self._detect_batch  # @serve.batch adds these setters at runtime
        batched.set_max_batch_size(self._config.max_batch_size)
        batched.set_batch_wait_timeout_s(self._config.batch_wait_timeout_s)
        logger.info("detector %s reconfigured: %s", self._spec.id, self._config)

    @serve.batch(
        max_batch_size=DEFAULT_BATCHING.max_batch_size,
        batch_wait_timeout_s=DEFAULT_BATCHING.batch_wait_timeout_s,
    )
    async def _detect_batch(self, requests: list[DetectRequest]) -> list[DetectResult]:
        """One result per request, in request order."""
        engine = self._slot.engine()
        # One batch, smaller images padded to the largest (`stack_padded`); the session
        # runs synchronously on purpose (measured: a thread hop made every batch size 1).
        images = engine.batch([r.image for r in requests])
        start = time.perf_counter()
        results = engine.detect(images, [r.params for r in requests])
        self._m_latency.observe((time.perf_counter() - start) * 1000)
        self._batch_sizes[len(requests)] += 1
        self._m_batch.observe(len(requests))
        self._m_images.inc(len(requests))
        return [DetectResult(rows, engine.names) for rows in results]

    async def detect(self, request: DetectRequest) -> DetectResult:
        """One letterboxed frame (media jobs; tests)."""
        with self._frames.hold(1):
            return await self._detect_one(request)

    async def _detect_one(self, request: DetectRequest) -> DetectResult:
        check_fits(request.image, self._spec.imgsz)
        await self._slot.wait_loaded(LOAD_WAIT_S)
        result: DetectResult = await self._detect_batch(request)
        return result

    async def detect_image(self, request: EncodedImage) -> DetectResult:
        """One encoded image (the ingress's /detect and gRPC Detect): decoded and
        letterboxed here, in a worker thread that runs beside the engine, then batched
        like any frame. The bytes cross Ray's object store instead of the model-sized
        pixels, and the ingress's event loop never decodes. BadImageError: the client's
        image (HTTP 400)."""
        with self._frames.hold(1):
            await self._slot.wait_loaded(LOAD_WAIT_S)
            self._slot.engine()  # ModelNotReadyError before any decoding
            # One decode at a time: a 50-megapixel upload takes ~0.3 GB and half a CPU
            # second, and this replica's cores belong to the cameras' frames too.
            async with self._decoding:
                boxed, lb = await asyncio.to_thread(
                    decode_letterboxed, request.data, self._spec.imgsz, request.max_pixels
                )
            result: DetectResult = await self._detect_batch(DetectRequest(boxed, request.params))
        return DetectResult(result.rows, result.names, lb)

    async def __call__(self, request: DetectRequest) -> DetectResult:
        return await self.detect(request)

    async def detect_many(
        self,
        requests: list[DetectRequest],
        caller: str | None = None,
        waiting: int = 0,
        seq: int = 0,
    ) -> list[DetectResult | Exception]:
        """Several frames in one call (a camera actor's dispatcher: one handle call and
        one request for all its ready subscriptions). They join the same batches as
        single requests, so frames of several callers still batch together. A frame
        that fails gets its error in its place; the others keep their results.
        `waiting`: the frames the caller still holds back, `seq` its report's number
        (the autoscaling signal)."""
        self._frames.note_waiting(caller, waiting, seq)
        with self._frames.hold(len(requests)):
            answers = per_frame(
                await asyncio.gather(
                    *(self._detect_one(r) for r in requests), return_exceptions=True
                )
            )
            return with_backlog(answers, self._frames.others(len(requests)))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: frames here, queued or running, and the
        frames its callers hold back. A call of a camera actor carries several frames,
        and most waiting frames never reach a replica, so requests undercount the load;
        the policy `graph.scaling:frames_policy` scales on these instead. Async: on
        the event loop that notes the callers' reports (Serve runs a sync one in a
        thread)."""
        return self._frames.stats()

    def health(self) -> dict[str, Any]:
        status = {"model": self._spec.id, **self._slot.status()}
        if self._spec.warnings:
            status["warnings"] = list(self._spec.warnings)
        return status

    def stats(self) -> dict[str, Any]:
        """This replica's counters (for tests and the benchmark; metrics go to Prometheus)."""
        return {
            "model": self._spec.id,
            "pid": os.getpid(),
            "replica": serve.get_replica_context().replica_id.unique_id,
            "started": self._started,
            "config": self._config.model_dump(),
            "batch_sizes": dict(self._batch_sizes),
        }
