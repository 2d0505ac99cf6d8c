"""Classifier deployment: one per branch model of a pipeline (`Classifier_<model id>`),
crops batched across every camera with `@serve.batch`, stateless, scaled on its own."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve import metrics

from deployments.inference.classify import BranchEngine, Label
from deployments.inference.engines import ModelSlot
from graph.common.schemas import BatchUserConfig, BranchModelSpec

logger = logging.getLogger("ray.serve")
DEFAULT_BATCHING = BatchUserConfig()


@serve.deployment(
    ray_actor_options={"num_cpus": 0.2},
    max_ongoing_requests=32,
    max_queued_requests=128,
    user_config=DEFAULT_BATCHING.model_dump(),
)
class Classifier:
    def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = BranchModelSpec.model_validate(spec)
        self._slot: ModelSlot[BranchEngine] = ModelSlot(self._spec.id)
        gpu = bool(ray.get_gpu_ids())  # CUDA only where Ray assigned this replica a GPU
        self._slot.start(lambda converting: BranchEngine(self._spec, converting, gpu))
        self._batch_sizes: Counter[int] = Counter()
        self._m_batch = metrics.Histogram(
            "camgraph_classifier_batch_size",
            description="crops per classifier batch",
            boundaries=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        )
        self._m_latency = metrics.Histogram(
            "camgraph_classifier_batch_latency_ms",
            description="engine time per batch",
            boundaries=[5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = BatchUserConfig.model_validate(user_config)
        batched: Any = self.classify
        batched.set_max_batch_size(config.max_batch_size)
        batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(
        max_batch_size=DEFAULT_BATCHING.max_batch_size,
        batch_wait_timeout_s=DEFAULT_BATCHING.batch_wait_timeout_s,
    )
    async def classify(self, crops: list[np.ndarray]) -> list[Label | None]:
        """One label (or None: nothing readable) per BGR crop, in order."""
        engine = self._slot.engine()
        start = time.perf_counter()
        out = engine.classify(crops)
        self._m_latency.observe((time.perf_counter() - start) * 1000)
        self._m_batch.observe(len(crops))
        self._batch_sizes[len(crops)] += 1
        return out

    async def __call__(self, crop: np.ndarray) -> Label | None:
        return await self.classify(crop)

    def health(self) -> dict[str, Any]:
        return {"model": self._spec.id, "kind": self._spec.kind, **self._slot.status()}

    def stats(self) -> dict[str, Any]:
        return {"model": self._spec.id, "batch_sizes": dict(self._batch_sizes)}
