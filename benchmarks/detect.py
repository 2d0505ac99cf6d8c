"""`make bench-detect`: raw ONNX Runtime vs camgraph's `/detect` over HTTP, same model,
same JPEG frames, in one run. Raw runs in both process layouts (1 process x cores
threads, cores processes x 1 thread) before and after the HTTP phases, so drift shows;
the ratio is to the best layout, averaged over its two runs.

Every phase does the whole job per image: JPEG decode, letterbox, inference, box
decoding. During the HTTP phases the Ray cluster's processes are sampled, so the report
says where each image's CPU went (ingress, proxy, detector replicas, Ray itself).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx

from benchmarks.measure import ProcessSampler, pids_selector, ray_selector
from benchmarks.stats import percentile
from benchmarks.workers import run_workers
from demo.datasets import HELD_OUT_SEED_START
from demo.scenes import Scene


def make_frames(n: int) -> list[bytes]:
    frames = []
    for k in range(n):
        image = Scene(HELD_OUT_SEED_START + 500 + k, n_frames=1).render(0)[0]
        frames.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return frames


@dataclass(frozen=True)
class RawDetectSpec:
    model: str
    threads: int
    frames: tuple[bytes, ...]
    offset: int
    warmup_s: float
    seconds: float


def raw_detect_worker(spec: RawDetectSpec, ready: Any) -> dict[str, Any]:
    """One process doing /detect's job in a loop: decode, letterbox, infer, unletterbox."""
    import numpy as np

    from deployments.inference.engines import OnnxEngine
    from graph.common.vision import RECT_STRIDE, DetectParams, letterbox, unletterbox_boxes

    engine = OnnxEngine(Path(spec.model), 640, intra_op_threads=spec.threads)
    params = DetectParams()
    engine.detect(np.full((1, 640, 640, 3), 114, np.uint8), [params])
    t0 = ready()
    measure_start, end = t0 + spec.warmup_s, t0 + spec.warmup_s + spec.seconds
    latencies: list[float] = []
    i = spec.offset
    while (now := time.time()) < end:
        image = cv2.imdecode(
            np.frombuffer(spec.frames[i % len(spec.frames)], np.uint8), cv2.IMREAD_COLOR
        )
        assert image is not None
        boxed, lb = letterbox(image, 640, RECT_STRIDE)  # as the replica's
        rows = engine.detect(engine.batch([boxed]), [params])[0]
        unletterbox_boxes(rows[:, :4], lb)
        done = time.time()
        if now >= measure_start and done < end:
            latencies.append(done - now)
        i += 1
    return {"latencies": latencies}


def raw_phases(
    model: Path, frames: list[bytes], seconds: float, warmup_s: float, cores: int
) -> list[dict[str, Any]]:
    """Both layouts of raw ONNX Runtime, one after the other."""
    phases = []
    for procs, threads in ((1, cores), (cores, 1)):
        specs = [
            RawDetectSpec(str(model), threads, tuple(frames), k, warmup_s, seconds)
            for k in range(procs)
        ]
        name = f"raw ORT {procs} proc x {threads} threads"
        outcome = run_workers(raw_detect_worker, specs, name, progress=False)
        if outcome.error:
            raise SystemExit(f"{name} failed: {outcome.error}")
        latencies = [x for r in outcome.results for x in r["latencies"]]
        phase = summarize(name, len(latencies), seconds, latencies)
        phase.update(layout=f"{procs}x{threads}", cpu_pct=_round(outcome.usage.cpu_pct))
        phases.append(phase)
    return phases


async def http_phase(
    url: str, frames: list[bytes], seconds: float, warmup_s: float, concurrency: int
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[int, int] = {}
    measure_start = time.perf_counter() + warmup_s
    deadline = measure_start + seconds
    ray = ProcessSampler(ray_selector())
    client = ProcessSampler(pids_selector([os.getpid()]))

    async def worker(offset: int, http: httpx.AsyncClient) -> None:
        i = offset
        while (t0 := time.perf_counter()) < deadline:
            file = ("f.jpg", frames[i % len(frames)], "image/jpeg")
            r = await http.post(f"{url}/detect", files={"file": file})
            done = time.perf_counter()
            if r.status_code != 200:
                errors[r.status_code] = errors.get(r.status_code, 0) + 1
            elif t0 >= measure_start and done < deadline:
                latencies.append(done - t0)
            i += concurrency

    async def sample() -> None:
        await asyncio.sleep(warmup_s)
        ray.start(), client.start()
        await asyncio.sleep(seconds)
        usage.update(ray=ray.stop(), client=client.stop())

    usage: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(sample(), *(worker(k, http) for k in range(concurrency)))
    result = summarize(f"/detect concurrency {concurrency}", len(latencies), seconds, latencies)
    result["errors"] = errors
    per_image = max(1, len(latencies))
    roles = usage["ray"].cpu_pct_by_role
    result["cpu_pct"] = _round(usage["ray"].cpu_pct)
    result["client_cpu_pct"] = _round(usage["client"].cpu_pct)
    # CPU-ms per image by process role: % of a core x window / images.
    result["cpu_ms_per_image"] = {
        role: round(pct * 10 * seconds / per_image, 1)
        for role, pct in roles.items()
        if pct * 10 * seconds / per_image >= 0.5
    }
    return result


def summarize(name: str, n: int, seconds: float, latencies: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies] or [float("nan")]
    return {
        "phase": name,
        "images": n,
        "seconds": round(seconds, 2),
        "img_per_s": round(n / seconds, 2),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/demo-detector.onnx"))
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup-s", type=float, default=3)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    health = httpx.get(f"{args.url}/health", timeout=10).json()
    if health["status"] != "ok":
        raise SystemExit(f"camgraph at {args.url} is not ready: {health}")
    frames = make_frames(16)
    cores = os.cpu_count() or 1
    first = raw_phases(args.model, frames, args.seconds, args.warmup_s, cores)
    http = [
        asyncio.run(http_phase(args.url, frames, args.seconds, args.warmup_s, int(c)))
        for c in args.concurrency.split(",")
    ]
    last = raw_phases(args.model, frames, args.seconds, args.warmup_s, cores)
    # The raw limit: the best layout (by its mean over both runs).
    by_layout: dict[str, list[float]] = {}
    for p in first + last:
        by_layout.setdefault(p["layout"], []).append(p["img_per_s"])
    best_layout, runs = max(by_layout.items(), key=lambda kv: statistics.fmean(kv[1]))
    raw = statistics.fmean(runs)
    phases = [*first, *http, *last]
    for p in phases:
        p["ratio_to_raw"] = round(p["img_per_s"] / raw, 3)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {cores} cores",
        "model": str(args.model),
        "raw_best_layout": best_layout,
        "raw_img_per_s": round(raw, 2),
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
    print(f"raw limit: {best_layout} layout, {raw:.2f} img/s")
    for p in http:
        print(f"{p['phase']}: CPU-ms per image by process {p['cpu_ms_per_image']}")


if __name__ == "__main__":
    main()
