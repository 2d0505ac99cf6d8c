"""`make bench`: camgraph side by side with its baselines, in one run, on the same clips
and the same model.

For each camera count: (a) raw ONNX Runtime without Ray (both process layouts), (b)
the seed's thread-per-camera `YOLO.predict`, (c) Ultralytics' multi-stream loader
(RTSP), and camgraph (an already deployed one at --url, or --deploy). Cameras play
at their frame rate ("realtime"); a "saturation" run replays every frame as fast as
each system takes them, which is the throughput limit the targets compare.

    python -m benchmarks.harness --cameras 1,4,8,16 --seconds 30 --warmup-s 10
    python -m benchmarks.harness --quick             # about 3 minutes

Writes bench.json, bench.md and bench.png (bench-quick.* with --quick) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.baselines import Camera, run_raw, run_seed, run_ultralytics_streams
from benchmarks.frames import ClipSpec, RtspPeer, ensure_clips, rtsp_available
from benchmarks.measure import PhaseResult, ray_selector
from benchmarks.report import (
    capacity_fps,
    comparisons,
    environment,
    markdown,
    overload_run_cameras,
    per_frame_tax,
    targets,
    tax_target,
    write_json,
    write_plot,
)

SYSTEMS = ("raw", "seed", "ultralytics", "camgraph")
QUICK = {"cameras": "1,4", "seconds": 8.0, "warmup_s": 2.0, "systems": "raw,seed,camgraph"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness's options (shared with `camgraph bench`)."""
    parser.add_argument("--cameras", default="1,4,8,16", help="camera counts, e.g. 1,4,8,16")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per run")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="discarded before it")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run: cameras {QUICK['cameras']}, {QUICK['seconds']:g} s windows, "
        f"{QUICK['systems']}",
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {SYSTEMS}")
    parser.add_argument(
        "--saturation-cameras",
        type=int,
        default=4,
        help="cameras of the unthrottled (every frame) run; 0: none",
    )
    parser.add_argument(
        "--no-overload",
        action="store_true",
        help="skip the extra camgraph run at 2x capacity when the sweep has none",
    )
    parser.add_argument(
        "--source", choices=("file", "rtsp"), default="file", help="how cameras are fed"
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a deployed camgraph")
    parser.add_argument("--model-id", default=None, help="camgraph model (default: its default)")
    parser.add_argument(
        "--deploy",
        type=Path,
        default=None,
        metavar="BASE_CONFIG",
        help="first deploy a plain-detector variant of this serve config (e.g. "
        "serve_config.yaml) to a local Ray cluster",
    )
    parser.add_argument(
        "--ray-cpus",
        type=int,
        default=2,
        help="logical CPUs of the --deploy cluster (make run's RAY_CPUS: no placement "
        "limit a user would hit is hidden)",
    )
    parser.add_argument("--onnx", type=Path, default=Path("models/demo-detector.onnx"))
    parser.add_argument("--pt", type=Path, default=Path("models/demo-detector.pt"))
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--fps", type=int, default=10, help="camera frame rate")
    parser.add_argument("--scale", type=float, default=0.5, help="0.5: 640x360, 1: 1280x720")
    parser.add_argument("--clip-frames", type=int, default=100, help="frames per looped clip")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/bench-clips"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--tax",
        action="store_true",
        help="the per-frame tax phase: raw and camgraph at saturation with a near-free "
        "detector (benchmarks/tiny_detector.py) instead of --onnx",
    )
    parser.add_argument(
        "--raw-batches",
        default=None,
        help="raw ORT also runs one process with batches of the newest frames of this many "
        "cameras, e.g. 8,32 (default: 8,32 where an NVIDIA GPU is, none on CPUs, where a "
        "batch costs as much per frame)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--no-progress", action="store_true")


def parse_counts(text: str) -> list[int]:
    counts = sorted({int(x) for x in text.split(",") if x.strip()})
    if not counts or counts[0] < 1:
        raise ValueError(f"camera counts must be positive integers: {text!r}")
    return counts


def parse_batches(text: str | None, gpu: bool) -> list[int]:
    """`--raw-batches`: sizes above 1 (1 is always run); None: 8 and 32 on a GPU."""
    if text is None:
        return [8, 32] if gpu else []
    batches = sorted({int(x) for x in text.split(",") if x.strip()})
    if batches and batches[0] < 1:
        raise ValueError(f"batch sizes must be positive integers: {text!r}")
    return [b for b in batches if b > 1]


def parse_systems(text: str) -> list[str]:
    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {SYSTEMS}")
    return systems


def _cuda_available() -> bool:
    """Whether this node has a CUDA GPU (the seed-style target is higher there)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # no torch, or a broken CUDA runtime: the CPU targets
        return False


def single_inference_ms(model: Path, imgsz: int, clip: Path, runs: int = 20) -> float:
    """Median letterbox + inference + decoding of one frame on one thread, as one
    camgraph detector replica does it (the unit of the overload latency target)."""
    import cv2

    from benchmarks.stats import percentile
    from deployments.inference.engines import OnnxEngine
    from graph.common.vision import RECT_STRIDE, DetectParams, letterbox

    cap = cv2.VideoCapture(str(clip))
    ok, image = cap.read()
    cap.release()
    if not ok:
        raise RuntimeError(f"cannot read {clip}")
    engine = OnnxEngine(model, imgsz, intra_op_threads=1)
    params = [DetectParams(conf=0.1)]
    times = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        boxed, _ = letterbox(image, imgsz, RECT_STRIDE)  # as the camera actors'
        engine.detect(engine.batch([boxed]), params)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return percentile(times, 50)


class Plan:
    """Which runs to make, from the options."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.tax:  # the graph's own cost: saturation only, against raw ONNX Runtime
            from benchmarks.tiny_detector import build

            args.onnx = build(args.cache_dir.parent / "bench-models" / "tiny-detector.onnx")
            args.systems = "raw,camgraph"
            args.cameras = str(args.saturation_cameras or 4)
            args.saturation_cameras = args.saturation_cameras or 4
            args.no_overload = True
        if args.quick:
            args.cameras, args.systems = QUICK["cameras"], QUICK["systems"]
            args.seconds, args.warmup_s = QUICK["seconds"], QUICK["warmup_s"]
        self.counts = parse_counts(str(args.cameras))
        self.systems = parse_systems(str(args.systems))
        from deployments.inference.gpu import gpu_present

        args.raw_batch_sizes = parse_batches(args.raw_batches, gpu_present())
        self.saturation = args.saturation_cameras
        self.overload = not args.no_overload and not args.quick
        self.realtime = not args.tax  # the tax phase compares saturation runs only
        self.max_cameras = max([*self.counts, self.saturation])

    def needs_rtsp(self, source: str) -> bool:
        return source == "rtsp" or "ultralytics" in self.systems


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0, or 1 with --strict when a target failed."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    plan = Plan(args)
    progress = not args.no_progress
    spec = ClipSpec(args.clip_frames, args.fps, args.scale)
    clips = ensure_clips(args.cache_dir, plan.max_cameras, spec)
    peer: RtspPeer | None = None
    notes: list[str] = []
    if plan.needs_rtsp(args.source):
        if rtsp_available():
            peer = RtspPeer(clips).start()
        elif args.source == "rtsp":
            print("--source rtsp needs the GStreamer RTSP server: run `make peers`")
            return 2
        else:
            notes.append("Ultralytics streams skipped: no GStreamer RTSP server (make peers)")
    try:
        with contextlib.ExitStack() as stack:
            if args.deploy is not None and "camgraph" in plan.systems:
                args.url = stack.enter_context(_deploy(args))
            phases = _run_all(args, plan, clips, peer, progress)
    finally:
        if peer is not None:
            peer.stop()
    single = single_inference_ms(args.onnx, args.imgsz, clips[0])
    tax = per_frame_tax(phases, float(args.fps)) if args.tax else None
    gpu = _cuda_available()
    tgts = [tax_target(tax)] if args.tax else targets(phases, single, float(args.fps), gpu)
    import cv2

    cap = cv2.VideoCapture(str(clips[0]))
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    cap.release()
    report: dict[str, Any] = {
        "environment": environment(),
        "source": args.source,
        "clips": {
            "cameras": len(clips),
            "width": width,
            "height": height,
            "fps": args.fps,
            "frames": args.clip_frames,
            "paths": [str(c) for c in clips],
        },
        "model": {"onnx": str(args.onnx), "pt": str(args.pt), "imgsz": args.imgsz},
        "seconds": args.seconds,
        "warmup_s": args.warmup_s,
        "single_inference_ms": round(single, 2),
        "capacity_fps": capacity_fps(phases),
        "comparisons": comparisons(phases),
        "per_frame_tax": tax,
        "targets": [t.__dict__ | {"verdict": t.verdict} for t in tgts],
        "phases": [p.to_json() for p in phases],
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench-tax" if args.tax else "bench-quick" if args.quick else "bench"
    write_json(args.out / f"{stem}.json", report)
    text = markdown(report, phases, tgts)
    (args.out / f"{stem}.md").write_text(text)
    plot = write_plot(args.out / f"{stem}.png", phases)
    _print_summary(phases, report["comparisons"], tgts)
    print(f"wrote {args.out / stem}.json, .md{', .png' if plot else ''}")
    return 1 if args.strict and any(t.passed is False for t in tgts) else 0


def _cameras(clips: Sequence[Path], n: int, peer: RtspPeer | None, rtsp: bool) -> list[Camera]:
    if rtsp:
        assert peer is not None
        return [Camera(f"cam{i}", peer.camera_url(i)) for i in range(n)]
    return [Camera(f"cam{i}", str(clips[i])) for i in range(n)]


def _run_all(
    args: argparse.Namespace,
    plan: Plan,
    clips: Sequence[Path],
    peer: RtspPeer | None,
    progress: bool,
) -> list[PhaseResult]:
    from benchmarks.camgraph_phase import run_camgraph

    phases: list[PhaseResult] = []
    # An idle cluster still costs CPU during the baselines: sampled as their background.
    background = ray_selector() if "camgraph" in plan.systems else None
    rtsp = args.source == "rtsp"

    def baselines(n: int, mode: str) -> None:
        cams = _cameras(clips, n, peer, rtsp)
        common: dict[str, Any] = {"background": background, "progress": progress}
        if "raw" in plan.systems:
            phases.extend(
                run_raw(
                    cams,
                    mode,
                    args.seconds,
                    args.warmup_s,
                    args.onnx,
                    args.imgsz,
                    batches=args.raw_batch_sizes,
                    **common,
                )
            )
        if "seed" in plan.systems:
            phases.append(
                run_seed(
                    cams, mode, args.seconds, args.warmup_s, args.pt, args.fps, args.imgsz, **common
                )
            )
        if "ultralytics" in plan.systems and mode == "realtime" and peer is not None:
            phases.append(
                run_ultralytics_streams(
                    _cameras(clips, n, peer, True),
                    args.seconds,
                    args.warmup_s,
                    args.pt,
                    args.fps,
                    args.imgsz,
                    **common,
                )
            )

    def camgraph(n: int, mode: str) -> None:
        if "camgraph" in plan.systems:
            phases.append(
                run_camgraph(
                    args.url,
                    _cameras(clips, n, peer, rtsp),
                    args.seconds,
                    args.warmup_s,
                    mode=mode,
                    model_id=args.model_id,
                    max_in_flight=2,  # the most streams.processing.max_in_flight allows
                    progress=progress,
                )
            )

    runs: list[tuple[Callable[[int, str], None], int, str]] = []
    if plan.saturation and not rtsp:  # a live stream cannot be replayed faster
        runs += [
            (baselines, plan.saturation, "saturation"),
            (camgraph, plan.saturation, "saturation"),
        ]
    for n in plan.counts if plan.realtime else []:
        runs += [(baselines, n, "realtime"), (camgraph, n, "realtime")]
    for step, n, mode in runs:
        step(n, mode)
    capacity = capacity_fps(phases)
    if plan.overload and "camgraph" in plan.systems and capacity and not rtsp:
        # The sweep may have no run near 2x capacity: one more run where it is reached.
        want = overload_run_cameras(plan.counts, capacity, float(args.fps))
        if want is not None:
            more = ensure_clips(
                args.cache_dir, want, ClipSpec(args.clip_frames, args.fps, args.scale)
            )
            phases.append(
                run_camgraph(
                    args.url,
                    _cameras(more, want, None, False),
                    args.seconds,
                    args.warmup_s,
                    model_id=args.model_id,
                    progress=progress,
                )
            )
    return phases


def _deploy(args: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    """A cluster of the harness's own with a plain-detector variant of the config."""
    import yaml

    from benchmarks.camgraph_phase import bench_serve_config, local_camgraph

    base = yaml.safe_load(args.deploy.read_text())
    args.model_id = args.model_id or "bench_det"
    config = bench_serve_config(base, str(args.onnx.resolve()), args.model_id, args.imgsz)
    return local_camgraph(config, args.cache_dir / "bench_serve_config.yaml", cpus=args.ray_cpus)


def _print_summary(
    phases: Sequence[PhaseResult], rows: Sequence[dict[str, Any]], tgts: Sequence[Any]
) -> None:
    print(
        f"\n{'mode':10} {'cams':>4} {'phase':44} {'fps':>7} {'offered':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'CPU %':>6}"
    )
    for p in phases:
        if p.error is not None:
            print(f"{p.mode:10} {p.cameras:4} {p.name:44} error: {p.error.splitlines()[-1][:60]}")
            continue
        lat = p.latency
        print(
            f"{p.mode:10} {p.cameras:4} {p.name:44} {p.fps:7.2f} {p.offered_fps:8.1f} "
            f"{_num(lat.p50_ms):>7} {_num(lat.p99_ms):>7} {_num(p.usage.cpu_pct):>6}"
        )
    print()
    for row in rows:
        if row["camgraph_fps"] is None:
            continue
        print(
            f"{row['mode']:10} {row['cameras']:4} cameras: camgraph/raw "
            f"{_ratio(row['camgraph_over_raw'])}, camgraph/seed {_ratio(row['camgraph_over_seed'])}"
            f", camgraph/ultralytics {_ratio(row['camgraph_over_ultralytics'])}"
        )
    print()
    for t in tgts:
        print(t.line())


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _ratio(r: dict[str, Any]) -> str:
    return f"{r['value']:.2f}x" if r["value"] is not None else f"n/a ({r['note']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks.harness",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        Plan(copy.copy(args))  # counts, systems and batch sizes: a usage error, not a trace
    except ValueError as exc:
        parser.error(str(exc))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
