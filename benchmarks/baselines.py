"""The baselines camgraph is measured against, on the same clips and the same model.

(a) raw ONNX Runtime without Ray: camgraph's own reader (PyAV, paced files or RTSP,
    latest-frame mailbox with its drop accounting), letterbox and `OnnxEngine`, in one
    loop per process. Two layouts: one process with intra-op threads = cores, and one
    single-threaded process per core with the cameras split between them.
(b) the seed's way: one thread per camera, `cv2.VideoCapture` and
    `ultralytics.YOLO(.pt).predict(frame)` per frame.
(c) Ultralytics' own multi-stream loader: `predict(source=<.streams file>, stream=True)`.
    RTSP only: LoadStreams reads a file as fast as it decodes, with no pacing, and
    stops at its end (no loop), so a timed run over files is not possible with it.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.frames import cpu_count
from benchmarks.measure import CameraResult, PhaseResult
from benchmarks.workers import Selector, WorkersOutcome, run_workers

Mode = str  # "realtime": cameras at their frame rate; "saturation": every frame, unthrottled


@dataclass(frozen=True)
class Camera:
    """One camera input: a name and a file path or an rtsp:// URL."""

    name: str
    url: str

    @property
    def is_rtsp(self) -> bool:
        return self.url.startswith(("rtsp://", "rtsps://"))


# ---- (a) raw ONNX Runtime ------------------------------------------------------------


@dataclass(frozen=True)
class RawSpec:
    model: str
    imgsz: int
    threads: int
    cameras: tuple[Camera, ...]
    mode: Mode
    warmup_s: float
    seconds: float
    conf: float = 0.1  # camgraph's stream threshold (ByteTrack wants the low scores)
    iou: float = 0.7
    max_frame_age_s: float = 2.0  # camgraph's default freshness limit
    adaptive_decode: bool = True  # camgraph's reader default (key frames when overloaded)
    batch: int = 1  # frames of different cameras per session run (a GPU's best is > 1)


class _Feed:
    """A camera in a raw worker: camgraph's StreamReader feeding a mailbox."""

    def __init__(self, camera: Camera, spec: RawSpec, wake: threading.Event) -> None:
        from stream_actors.mailbox import LatestFrameMailbox
        from stream_actors.reader import ReaderPolicy, StreamReader
        from stream_actors.subscriptions import StreamSpec

        lossless = spec.mode == "saturation" and not camera.is_rtsp
        self.name = camera.name
        self.mailbox = LatestFrameMailbox(None if lossless else spec.max_frame_age_s, wake.set)
        self.reader = StreamReader(
            StreamSpec(
                key=camera.name,
                kind="rtsp" if camera.is_rtsp else "file",
                url=camera.url,
                loop=True,
                lossless=lossless,
            ),
            ReaderPolicy(adaptive_decode=spec.adaptive_decode),
        )
        self.reader.attach(camera.name, self.mailbox)
        self.processed = 0
        self.latencies_ms: list[float] = []

    def snapshot(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.mailbox.stats()
        return {**stats, "processed": self.processed}


def _delta(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    drops = {r: end["drops"][r] - start["drops"].get(r, 0) for r in end["drops"]}
    return {
        "offered": end["received"] - start["received"],
        "processed": end["processed"] - start["processed"],
        "drops": {r: n for r, n in drops.items() if n},
        "in_flight": end["pending"] - start["pending"],  # nothing is mid-inference here
    }


T = TypeVar("T")


def take_round_robin(
    takers: Sequence[Callable[[], T | None]], turn: int, batch: int
) -> tuple[list[tuple[int, T]], int]:
    """The next run's frames: from camera `turn` on, in a circle, the newest frame of each
    camera that has one, at most `batch`; and the camera to start from next time (the
    one after the last taken), so that no camera waits more than one pass."""
    taken: list[tuple[int, T]] = []
    for k in range(len(takers)):
        i = (turn + k) % len(takers)
        item = takers[i]()
        if item is not None:
            taken.append((i, item))
            if len(taken) == batch:
                break
    return taken, (taken[-1][0] + 1 if taken else turn)


def raw_worker(spec: RawSpec, ready: Any) -> dict[str, Any]:
    """One raw ONNX Runtime process over its share of the cameras (round-robin): each
    run takes the newest frame of up to `spec.batch` cameras that have one."""
    import numpy as np

    from deployments.inference.engines import OnnxEngine
    from graph.common.vision import RECT_STRIDE, DetectParams, letterbox, unletterbox_boxes

    engine = OnnxEngine(Path(spec.model), spec.imgsz, intra_op_threads=spec.threads)
    params = DetectParams(conf=spec.conf, iou=spec.iou)
    blank = np.full((spec.batch, spec.imgsz, spec.imgsz, 3), 114, np.uint8)
    for size in range(1, spec.batch + 1):  # every size it may run (a GPU tunes per shape)
        for _ in range(2 if size in (1, spec.batch) else 1):
            engine.detect(blank[:size], [params] * size)
    wake = threading.Event()
    feeds = [_Feed(c, spec, wake) for c in spec.cameras]
    t0 = ready()
    for feed in feeds:
        feed.reader.start()
    measure_start, end = t0 + spec.warmup_s, t0 + spec.warmup_s + spec.seconds
    keep_latency = spec.mode == "realtime"  # lossless replays carry the file's clock
    first: list[dict[str, Any]] | None = None
    first_at = 0.0
    takers = [feed.mailbox.take for feed in feeds]
    turn = runs = largest = 0
    while True:
        now = time.time()
        if first is None and now >= measure_start:
            first, first_at = [f.snapshot() for f in feeds], now
        if now >= end:
            break
        wake.clear()
        picked, turn = take_round_robin(takers, turn, spec.batch)
        if not picked:
            wake.wait(0.05)
            continue
        taken = [(feeds[i], frame) for i, frame in picked]
        largest = max(largest, len(taken))
        boxed = [letterbox(frame.image, spec.imgsz, RECT_STRIDE) for _, frame in taken]
        results = engine.detect(engine.batch([b for b, _ in boxed]), [params] * len(taken))
        for rows, (_, lb) in zip(results, boxed, strict=True):
            unletterbox_boxes(rows[:, :4], lb)
        detected_at = time.time()
        runs += 1
        for feed, frame in taken:
            feed.processed += 1
            if keep_latency and measure_start <= detected_at < end:
                feed.latencies_ms.append((detected_at - frame.captured_at) * 1000)
    last, last_at = [f.snapshot() for f in feeds], time.time()
    for feed in feeds:
        feed.reader.stop()
    if first is None:
        first, first_at = last, last_at
    return {
        "pid": os.getpid(),
        "providers": list(engine.providers),
        "runs": runs,  # session runs, warm-up included
        "largest_batch": largest,
        "decode": {f.name: f.reader.status()["decode"] for f in feeds},
        "cameras": [
            {
                "camera": f.name,
                "seconds": last_at - first_at,
                "latencies_ms": f.latencies_ms,
                **_delta(a, b),
            }
            for f, a, b in zip(feeds, first, last, strict=True)
        ],
    }


def raw_layouts(cameras: Sequence[Camera], cores: int) -> dict[str, list[list[Camera]]]:
    """The two layouts of (a): camera shares per process. Per core needs 2+ cameras."""
    layouts = {f"1 proc x {cores} threads": [list(cameras)]}
    procs = min(cores, len(cameras))
    if procs > 1:
        layouts[f"{procs} procs x 1 thread"] = [list(cameras[i::procs]) for i in range(procs)]
    return layouts


def raw_variants(
    cameras: Sequence[Camera], cores: int, batches: Sequence[int] = ()
) -> list[tuple[str, list[list[Camera]], int, int]]:
    """(name, camera shares per process, intra-op threads, batch) of each raw run: the
    two layouts one frame at a time, and one process per batch size in `batches` (a
    GPU's layout: the newest frames of up to that many cameras per run)."""
    variants = [
        (layout, shares, cores if len(shares) == 1 else 1, 1)
        for layout, shares in raw_layouts(cameras, cores).items()
    ]
    # A batch holds one frame per camera: larger sizes than the cameras are the same run.
    for batch in sorted({min(b, len(cameras)) for b in batches} - {0, 1}):
        variants.append((f"1 proc, batches of {batch}", [list(cameras)], cores, batch))
    return variants


def run_raw(
    cameras: Sequence[Camera],
    mode: Mode,
    seconds: float,
    warmup_s: float,
    model: Path,
    imgsz: int = 640,
    background: Selector | None = None,
    progress: bool = True,
    batches: Sequence[int] = (),
) -> list[PhaseResult]:
    """Every raw variant (`raw_variants`), one after the other; `best_raw` picks one."""
    cores = cpu_count()
    phases = []
    for layout, shares, threads, batch in raw_variants(cameras, cores, batches):
        specs = [
            RawSpec(str(model), imgsz, threads, tuple(s), mode, warmup_s, seconds, batch=batch)
            for s in shares
        ]
        name = f"raw ORT {layout}"
        outcome = run_workers(
            raw_worker, specs, f"{name} {len(cameras)} cam {mode}", background, progress
        )
        phase = PhaseResult(name, "raw", mode, len(cameras), seconds)
        for result in _take(phase, outcome):
            phase.extra.setdefault("providers", result["providers"])
            phase.extra.setdefault("decode", {}).update(result["decode"])
        phase.extra.update(
            layout=layout, processes=len(shares), intra_op_threads=threads, batch=batch
        )
        if mode == "saturation":
            phase.notes.append("lossless replay: latency not comparable, not reported")
        phases.append(phase)
    return phases


def best_raw(phases: Sequence[PhaseResult]) -> PhaseResult | None:
    """The raw limit: the layout that processed the most frames."""
    ok = [p for p in phases if p.system == "raw" and p.error is None and p.per_camera]
    return max(ok, key=lambda p: p.fps, default=None)


# ---- (b) seed-style: a thread per camera, YOLO.predict per frame ------------------------


@dataclass(frozen=True)
class SeedSpec:
    model_pt: str
    imgsz: int
    cameras: tuple[Camera, ...]
    fps: float
    mode: Mode
    warmup_s: float
    seconds: float


def seed_worker(spec: SeedSpec, ready: Any) -> dict[str, Any]:
    """Each camera thread reads the newest frame and predicts with its own model
    (Ultralytics' advice for threads: one model per thread)."""
    import numpy as np

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    from benchmarks.frames import LiveCapture, PacedCapture

    blank = np.full((360, 640, 3), 114, np.uint8)
    models = []
    for _ in spec.cameras:
        model = YOLO(spec.model_pt, task="detect")
        model.predict(blank, imgsz=spec.imgsz, verbose=False)  # builds the predictor
        models.append(model)
    caps: list[Any] = [
        LiveCapture(c.url, spec.fps)
        if c.is_rtsp
        else PacedCapture(Path(c.url), spec.fps, pace=spec.mode == "realtime")
        for c in spec.cameras
    ]
    stop = threading.Event()
    locks = [threading.Lock() for _ in caps]
    processed = [0] * len(caps)
    latencies: list[list[float]] = [[] for _ in caps]
    t0 = ready()
    measure_start, end = t0 + spec.warmup_s, t0 + spec.warmup_s + spec.seconds
    keep_latency = spec.mode == "realtime"

    errors: list[str] = []

    def camera_loop(i: int) -> None:
        try:
            while not stop.is_set():
                got = caps[i].read(stop)
                if got is None:
                    return
                image, captured_at = got
                models[i].predict(image, imgsz=spec.imgsz, verbose=False)
                detected_at = time.time()
                with locks[i]:
                    processed[i] += 1
                if keep_latency and measure_start <= detected_at < end:
                    latencies[i].append((detected_at - captured_at) * 1000)
        except Exception as exc:  # the camera stops, as the seed's thread would
            errors.append(f"{spec.cameras[i].name}: {type(exc).__name__}: {exc}")

    def snapshot() -> list[dict[str, int]]:
        now = time.time()
        snaps = []
        for i, cap in enumerate(caps):
            with locks[i]:
                counts = cap.counts(now)
                done = processed[i]
            snaps.append(
                {
                    "offered": counts.offered,
                    "processed": done,
                    "superseded": counts.skipped,
                    "held": counts.pending + counts.taken - done,  # due or mid-predict
                }
            )
        return snaps

    for cap in caps:
        cap.start(t0)
    threads = [
        threading.Thread(target=camera_loop, args=(i,), daemon=True) for i in range(len(caps))
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, measure_start - time.time()))
    first, first_at = snapshot(), time.time()
    time.sleep(max(0.0, end - time.time()))
    last, last_at = snapshot(), time.time()
    stop.set()
    for thread in threads:
        thread.join(30)
    return {
        "pid": os.getpid(),
        "errors": errors,
        "cameras": [
            {
                "camera": c.name,
                "seconds": last_at - first_at,
                "offered": b["offered"] - a["offered"],
                "processed": b["processed"] - a["processed"],
                "drops": {"superseded": b["superseded"] - a["superseded"]},
                "in_flight": b["held"] - a["held"],
                "latencies_ms": latencies[i],
            }
            for i, (c, a, b) in enumerate(zip(spec.cameras, first, last, strict=True))
        ],
    }


def run_seed(
    cameras: Sequence[Camera],
    mode: Mode,
    seconds: float,
    warmup_s: float,
    model_pt: Path,
    fps: float,
    imgsz: int = 640,
    background: Selector | None = None,
    progress: bool = True,
) -> PhaseResult:
    spec = SeedSpec(str(model_pt), imgsz, tuple(cameras), fps, mode, warmup_s, seconds)
    name = "seed-style (thread/camera, YOLO.predict)"
    outcome = run_workers(
        seed_worker, [spec], f"seed {len(cameras)} cam {mode}", background, progress
    )
    phase = PhaseResult(name, "seed", mode, len(cameras), seconds)
    for result in _take(phase, outcome):
        phase.notes += [f"camera thread died: {e}" for e in result["errors"]]
    phase.extra.update(model=str(model_pt), models_per_process=len(cameras))
    if any(c.is_rtsp for c in cameras):
        phase.notes.append("RTSP read in order by cv2: FFmpeg buffers, nothing counts as dropped")
    return phase


# ---- (c) Ultralytics' multi-stream loader ---------------------------------------------


@dataclass(frozen=True)
class StreamsSpec:
    model_pt: str
    imgsz: int
    cameras: tuple[Camera, ...]
    fps: float
    warmup_s: float
    seconds: float


def streams_worker(spec: StreamsSpec, ready: Any) -> dict[str, Any]:
    """`YOLO.predict(source=<file>.streams, stream=True)`: one batch per step, one
    image per stream (LoadStreams waits until every stream has a new frame)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO
    from ultralytics.utils import ops

    model = YOLO(spec.model_pt, task="detect")
    with tempfile.TemporaryDirectory(prefix="camgraph-bench-") as tmp:
        listing = Path(tmp) / "cameras.streams"
        listing.write_text("\n".join(c.url for c in spec.cameras) + "\n")
        index = {ops.clean_str(c.url).replace(os.sep, "_"): i for i, c in enumerate(spec.cameras)}
        results: Any = model.predict(
            source=str(listing), stream=True, imgsz=spec.imgsz, verbose=False
        )
        next(iter(results))  # opens every stream (sequentially) before the clock starts
        t0 = ready()
        measure_start, end = t0 + spec.warmup_s, t0 + spec.warmup_s + spec.seconds
        counts = [0] * len(spec.cameras)
        speeds_ms: list[float] = []
        result: Any
        for k, result in enumerate(results):
            now = time.time()
            if now >= end:
                break
            if now >= measure_start:
                counts[index.get(str(result.path), k % len(counts))] += 1
                speeds_ms.append(sum(result.speed.values()))
        results.close()
    offered = round(spec.fps * spec.seconds)
    return {
        "pid": os.getpid(),
        "speed_ms_mean": sum(speeds_ms) / len(speeds_ms) if speeds_ms else None,
        "cameras": [
            {
                "camera": c.name,
                "seconds": spec.seconds,
                "offered": offered,
                "processed": n,
                "drops": {"superseded": offered - n},
                "latencies_ms": [],
            }
            for c, n in zip(spec.cameras, counts, strict=True)
        ],
    }


def run_ultralytics_streams(
    cameras: Sequence[Camera],
    seconds: float,
    warmup_s: float,
    model_pt: Path,
    fps: float,
    imgsz: int = 640,
    background: Selector | None = None,
    progress: bool = True,
) -> PhaseResult:
    name = "ultralytics streams (predict stream=True)"
    phase = PhaseResult(name, "ultralytics", "realtime", len(cameras), seconds)
    if not all(c.is_rtsp for c in cameras):
        phase.error = "needs RTSP cameras (LoadStreams plays files unpaced, once)"
        return phase
    spec = StreamsSpec(str(model_pt), imgsz, tuple(cameras), fps, warmup_s, seconds)
    outcome = run_workers(
        streams_worker, [spec], f"ultralytics {len(cameras)} cam", background, progress
    )
    for result in _take(phase, outcome):
        phase.extra["speed_ms_mean"] = result["speed_ms_mean"]
    phase.notes += [
        "offered is the server's nominal rate: LoadStreams does not count the frames it reads",
        "no capture time in LoadStreams: latency not measured (extra.speed_ms_mean is "
        "Ultralytics' pre+inference+post per image)",
    ]
    return phase


def _take(phase: PhaseResult, outcome: WorkersOutcome) -> list[dict[str, Any]]:
    """Fill a phase with its workers' error, usage and cameras; their raw results."""
    phase.error = outcome.error
    phase.usage, phase.background = outcome.usage, outcome.background
    for result in outcome.results:
        phase.per_camera += [CameraResult.from_json(c) for c in result["cameras"]]
    return outcome.results
