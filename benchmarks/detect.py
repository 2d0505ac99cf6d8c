"""`make bench-detect`: raw ONNX Runtime in one process vs camgraph's /detect over HTTP,
same model, same JPEG frames, in one run (phases interleaved so drift shows).

Every phase does the whole job per image: JPEG decode, letterbox, inference, decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from benchmarks.stats import percentile
from demo.datasets import HELD_OUT_SEED_START
from demo.scenes import Scene
from deployments.inference.engines import OnnxEngine
from graph.common.vision import DetectParams, letterbox, unletterbox_boxes


def make_frames(n: int) -> list[bytes]:
    frames = []
    for k in range(n):
        image = Scene(HELD_OUT_SEED_START + 500 + k, n_frames=1).render(0)[0]
        frames.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return frames


def raw_phase(model: Path, frames: list[bytes], seconds: float, threads: int) -> dict[str, Any]:
    engine = OnnxEngine(model, 640, intra_op_threads=threads)
    latencies: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        image = cv2.imdecode(np.frombuffer(frames[i % len(frames)], np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        boxed, lb = letterbox(image, 640)
        rows = engine.detect(boxed[None], [DetectParams()])[0]
        unletterbox_boxes(rows[:, :4], lb)
        latencies.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - start
    return summarize(f"raw ORT 1 process, {threads} threads", i, elapsed, latencies)


async def http_phase(
    url: str, frames: list[bytes], seconds: float, concurrency: int
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await client.post(
                f"{url}/detect", files={"file": ("f.jpg", frames[i % len(frames)], "image/jpeg")}
            )
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            i += concurrency

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(k, client) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    result = summarize(f"/detect concurrency {concurrency}", len(latencies), elapsed, latencies)
    result["errors"] = errors
    return result


def summarize(name: str, n: int, elapsed: float, latencies: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies] or [float("nan")]
    return {
        "phase": name,
        "images": n,
        "seconds": round(elapsed, 2),
        "img_per_s": round(n / elapsed, 2),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/demo-detector.onnx"))
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    health = httpx.get(f"{args.url}/health", timeout=10).json()
    if health["status"] != "ok":
        raise SystemExit(f"camgraph at {args.url} is not ready: {health}")
    frames = make_frames(16)
    cores = os.cpu_count() or 1
    phases = [raw_phase(args.model, frames, args.seconds, cores)]
    for c in (1, 8):
        phases.append(asyncio.run(http_phase(args.url, frames, args.seconds, c)))
    phases.append(raw_phase(args.model, frames, args.seconds, cores))  # drift check
    raw = statistics.fmean([phases[0]["img_per_s"], phases[-1]["img_per_s"]])
    for p in phases:
        p["ratio_to_raw"] = round(p["img_per_s"] / raw, 3)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {cores} cores",
        "model": str(args.model),
        "phases": phases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detect.json").write_text(json.dumps(report, indent=2))
    print(f"{'phase':38} {'img/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'x raw':>6}")
    for p in phases:
        print(
            f"{p['phase']:38} {p['img_per_s']:7.2f} {p['p50_ms']:7.1f} {p['p95_ms']:7.1f} "
            f"{p['ratio_to_raw']:6.3f}"
        )


if __name__ == "__main__":
    main()
