"""Detector throughput against batch size, per ONNX Runtime provider (`make bench-gpu`).

For each provider configuration and batch size (1 to 32 by default), on the same
held-out scenes, letterboxed to the square GPU replicas are fed:
- camgraph: `OnnxEngine.detect`, what a detector replica runs per batch (uint8 BGR to
  float CHW, the session, box decoding and NMS);
- raw: the session's own run on the prepared float tensor, the limit of that provider.

Configurations: `cpu`, `cuda`, `trt-fp32` and `trt-fp16` (TensorRT with camgraph's
engine cache and its one optimization profile for batches 1 to 32, `trt_profile_shapes`).
A configuration whose provider did not load is reported as such, not timed. With a CUDA
build of torch and a GPU, the Ultralytics engine and the raw torch forward pass of the
`.pt` twin are timed too. `--configs cpu --batches 1,2` runs on any machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from demo.datasets import HELD_OUT_SEED_START
from demo.scenes import Scene
from deployments.inference.engines import EngineOptions, OnnxEngine, tensorrt_options
from deployments.inference.gpu import CPU, CUDA, TENSORRT, TRT_MAX_BATCH, choose_providers
from graph.common.vision import DetectParams, letterbox, to_model_input

CONFIGS = ("cpu", "cuda", "trt-fp32", "trt-fp16")
IMGSZ = 640


def timed(fn: Callable[[], Any], seconds: float) -> tuple[int, float]:
    """Calls of `fn` in about `seconds` after 3 discarded ones, and the time they took."""
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n, time.perf_counter() - start


def providers_for(config: str, onnx: Path, cache_dir: Path) -> list[Any]:
    if config == "cpu":
        return [CPU]
    if config == "cuda":
        return [CUDA, CPU]
    # What load_engine gives a replica: its profile and cache key, or no TensorRT where
    # its libraries did not load (the configuration is then reported unavailable).
    fp16 = config == "trt-fp16"
    options = EngineOptions(IMGSZ, gpu=True, trt_cache_dir=cache_dir / config, fp16=fp16)
    trt = tensorrt_options(onnx, options)
    if trt is None:
        return [CUDA, CPU]
    return choose_providers([TENSORRT, CUDA, CPU], True, options.trt_cache_dir, fp16, trt)


MAIN_PROVIDER = {"cpu": CPU, "cuda": CUDA, "trt-fp32": TENSORRT, "trt-fp16": TENSORRT}


def frames(count: int) -> np.ndarray:
    return np.stack(
        [
            letterbox(Scene(HELD_OUT_SEED_START + 900 + k, n_frames=1).render(0)[0], IMGSZ)[0]
            for k in range(count)
        ]
    )


def onnx_rows(
    config: str, onnx: Path, cache_dir: Path, batches: Sequence[int], seconds: float
) -> list[dict[str, Any]]:
    (cache_dir / config).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    engine = OnnxEngine(
        onnx, IMGSZ, 1, providers_for(config, onnx, cache_dir), max_batch=TRT_MAX_BATCH
    )
    load_s = round(time.perf_counter() - start, 2)
    if MAIN_PROVIDER[config] not in engine.providers:
        return [{"config": config, "unavailable": True, "session_providers": engine.providers}]
    images = frames(max(batches))
    rows = []
    for bs in batches:
        batch = engine.batch(list(images[:bs]))
        params = [DetectParams()] * bs
        n, dt = timed(functools.partial(engine.detect, batch, params), seconds)
        tensor = to_model_input(batch)
        m, dr = timed(functools.partial(engine.run, tensor), seconds)
        row: dict[str, Any] = {
            "config": config,
            "batch": bs,
            "camgraph_img_s": round(n * bs / dt, 1),
            "raw_session_img_s": round(m * bs / dr, 1),
            "camgraph_ms_per_batch": round(dt / n * 1000, 2),
            "session_load_s": load_s,
        }
        row["camgraph_to_raw"] = round(row["camgraph_img_s"] / row["raw_session_img_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def torch_rows(pt: Path, batches: Sequence[int], seconds: float) -> list[dict[str, Any]]:
    """The `.pt` twin through Ultralytics and as a bare fp32 forward pass (CUDA only)."""
    import torch

    from deployments.inference.engines import UltralyticsEngine

    engine = UltralyticsEngine(pt, IMGSZ, device="0")
    net: Any = engine._model.model.to("cuda").eval()
    images = frames(max(batches))
    rows = []
    for bs in batches:
        batch, params = images[:bs], [DetectParams()] * bs
        n, dt = timed(functools.partial(engine.detect, batch, params), seconds)
        x = torch.from_numpy(to_model_input(batch)).cuda()

        def forward(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                net(x)
            torch.cuda.synchronize()

        m, dr = timed(forward, seconds)
        row: dict[str, Any] = {
            "config": "torch-cuda",
            "batch": bs,
            "ultralytics_img_s": round(n * bs / dt, 1),
            "raw_torch_fp32_img_s": round(m * bs / dr, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--onnx", type=Path, default=Path("models/demo-detector.onnx"))
    parser.add_argument("--pt", type=Path, default=Path("models/demo-detector.pt"))
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {CONFIGS}")
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--cache-dir", type=Path, default=Path("data/trt-bench-cache"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    batches = [int(b) for b in args.batches.split(",")]
    if not batches or min(batches) < 1 or max(batches) > TRT_MAX_BATCH:
        parser.error(f"--batches: integers from 1 to {TRT_MAX_BATCH} (TensorRT's profile)")
    report: dict[str, Any] = {
        "ort_version": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "rows": [],
    }
    for config in configs:
        report["rows"].extend(onnx_rows(config, args.onnx, args.cache_dir, batches, args.seconds))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        report["gpu"] = torch.cuda.get_device_name(0)
        report["rows"].extend(torch_rows(args.pt, batches, args.seconds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
