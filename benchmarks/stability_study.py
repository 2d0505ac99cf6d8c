"""Offline study: how often a ground-truth vehicle gets a stable track (the event that
starts its branch pass and its record), by frames detected per camera and by tracker
and stability settings.

The same detector (camgraph's letterbox and `OnnxEngine`, the processors' `conf`), the
same `Tracker` and `StabilityValidator` as the camera actors, fed every Nth frame of
`make bench-pipeline`'s held-out clips with their capture times: what a camera actor
sees when the detector takes one of its frames every N/10 s. Detections are computed
once per clip and cached (`--cache-dir`), so settings compare in seconds. No Ray.

    .venv/bin/python -m benchmarks.stability_study --clips 8 --steps 1,5,10,20

A vehicle (as `make bench-pipeline` counts them: at least half visible in 10 frames)
is found when a "new" event's box has IoU >= 0.5 with its ground-truth box in that
frame. Duplicates: more "new" events for a vehicle already found (an id switch gives a
second record); unmatched: "new" events that match no vehicle.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.pipeline_phase import make_clips, vehicles_of
from graph.common.vision import Box, iou_matrix
from stream_actors.stability import StabilityRules, StabilityValidator
from stream_actors.tracking import Tracker, TrackerConfig

MATCH_IOU = 0.5


def clip_detections(
    clip: Path, onnx: Path, imgsz: int, conf: float, cache: Path
) -> list[np.ndarray]:
    """Every frame's detector rows (x1 y1 x2 y2 conf cls, frame pixels) as one object
    array, cached next to the clip's name and the detector's."""
    out = cache / f"{clip.stem}-{onnx.stem}-{imgsz}-c{conf}.npy"
    if out.exists():
        return list(np.load(out, allow_pickle=True))
    import av

    from deployments.inference.engines import OnnxEngine
    from graph.common.vision import RECT_STRIDE, DetectParams, letterbox, unletterbox_boxes

    engine = OnnxEngine(onnx, imgsz, intra_op_threads=2)
    params = DetectParams(conf=conf)
    rows_per_frame = []
    with av.open(str(clip)) as container:
        for frame in container.decode(video=0):
            boxed, lb = letterbox(frame.to_ndarray(format="bgr24"), imgsz, RECT_STRIDE)
            rows = np.array(engine.detect(engine.batch([boxed]), [params])[0], np.float32)
            rows[:, :4] = unletterbox_boxes(rows[:, :4], lb)
            rows_per_frame.append(rows.reshape(-1, 6))
    cache.mkdir(parents=True, exist_ok=True)
    array = np.empty(len(rows_per_frame), dtype=object)
    array[:] = rows_per_frame
    np.save(out, array, allow_pickle=True)
    return rows_per_frame


def sampled(n_frames: int, step: int, jitter: float, rng: random.Random) -> list[int]:
    """Every `step`-th frame from a random phase, each moved by up to `jitter` × step
    (a detector's turns are not evenly spaced), in order and without repeats."""
    if step <= 1:
        return list(range(n_frames))
    picked, last = [], -1
    for base in range(rng.randrange(step), n_frames, step):
        index = base + round(rng.uniform(-jitter, jitter) * step)
        index = min(max(index, last + 1), n_frames - 1)
        if index > last:
            picked.append(index)
            last = index
    return picked


def new_events(
    rows_per_frame: Sequence[np.ndarray],
    indices: Sequence[int],
    fps: float,
    rules: StabilityRules,
    tracker: TrackerConfig,
    vehicle_cls: int,
    bounds: Box | None = None,
) -> list[tuple[int, np.ndarray]]:
    """(frame index, box) of every "new" event, as a processor would emit them
    (`bounds`: the frame, for the edge rule; None: sizes always compared)."""
    track, stability = Tracker(tracker), StabilityValidator(rules)
    events = []
    for index in indices:
        rows = rows_per_frame[index]
        rows = rows[rows[:, 5] == vehicle_cls]  # the pipeline's expected classes
        at = index / fps
        tracked = track.update(rows, at)
        for event in stability.update([o for _, o in tracked], index, at, bounds):
            if event.kind == "new":
                events.append((index, np.array(event.box, np.float32)))
    return events


@dataclass
class Score:
    vehicles: int = 0
    found: int = 0
    duplicates: int = 0
    unmatched: int = 0

    def add(self, other: Score) -> None:
        for name in ("vehicles", "found", "duplicates", "unmatched"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def row(self) -> dict[str, Any]:
        v = max(self.vehicles, 1)
        return {
            "vehicles": self.vehicles,
            "found": round(self.found / v, 3),
            "records_per_vehicle": round((self.found + self.duplicates + self.unmatched) / v, 3),
            "duplicates": self.duplicates,
            "unmatched": self.unmatched,
        }


def score_clip(truth: dict[str, Any], events: Sequence[tuple[int, np.ndarray]]) -> Score:
    vehicles = vehicles_of(truth)
    frames = truth["frames"]
    counts: dict[int, int] = {}
    unmatched = 0
    for index, box in events:
        objects = [o for o in frames[index]["objects"] if int(o["object_id"]) in vehicles]
        if not objects:
            unmatched += 1
            continue
        ious = iou_matrix(box[None], np.array([o["box"] for o in objects], np.float32))[0]
        best = int(np.argmax(ious))
        if ious[best] < MATCH_IOU:
            unmatched += 1
            continue
        oid = int(objects[best]["object_id"])
        counts[oid] = counts.get(oid, 0) + 1
    return Score(
        vehicles=len(vehicles),
        found=len(counts),
        duplicates=sum(n - 1 for n in counts.values()),
        unmatched=unmatched,
    )


NO_EDGE = " without the edge rule"  # sizes cut by the edge judged, as before 2026-12-05
VARIANTS: dict[str, Callable[[], tuple[StabilityRules, TrackerConfig]]] = {
    "default": lambda: (StabilityRules(min_stable_s=0.8), TrackerConfig()),
    "default" + NO_EDGE: lambda: (StabilityRules(min_stable_s=0.8), TrackerConfig()),
    "min_hits only": lambda: (StabilityRules(), TrackerConfig()),
    "tracker ids at once": lambda: (
        StabilityRules(min_stable_s=0.8),
        TrackerConfig(minimum_consecutive_frames=1),
    ),
}


def study(
    clips: Sequence[Path],
    steps: Sequence[int],
    variants: Sequence[str],
    onnx: Path,
    imgsz: int,
    conf: float,
    cache: Path,
    seeds: int,
    jitter: float,
) -> list[dict[str, Any]]:
    data = []
    for clip in clips:
        truth = json.loads(clip.with_suffix(".json").read_text())
        data.append((truth, clip_detections(clip, onnx, imgsz, conf, cache)))
    vehicle_cls = truth["classes"].index("vehicle")
    results = []
    for step in steps:
        for name in variants:
            rules, tracker = VARIANTS[name]()
            total = Score()
            for seed in range(seeds if step > 1 else 1):
                rng = random.Random(seed)
                for truth, rows in data:
                    indices = sampled(len(rows), step, jitter, rng)
                    frame = (0.0, 0.0, float(truth["width"]), float(truth["height"]))
                    bounds = None if name.endswith(NO_EDGE) else frame
                    events = new_events(
                        rows, indices, truth["fps"], rules, tracker, vehicle_cls, bounds
                    )
                    total.add(score_clip(truth, events))
            fps = data[0][0]["fps"] / step
            results.append({"frames_per_s": fps, "variant": name, **total.row()})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=300, help="frames per clip (10 fps)")
    parser.add_argument("--steps", default="1,5,10,20", help="every Nth frame (10 fps clips)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3, help="random phases per step")
    parser.add_argument("--jitter", type=float, default=0.0, help="of a step, each way")
    parser.add_argument("--onnx", type=Path, default=Path("models/demo-detector.onnx"))
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--conf", type=float, default=0.1, help="as the processors'")
    parser.add_argument("--clip-dir", type=Path, default=Path("data/bench-pipeline"))
    parser.add_argument("--cache-dir", type=Path, default=Path("data/stability-study"))
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    clips = make_clips(args.clips, args.frames, args.clip_dir)
    steps = [int(s) for s in args.steps.split(",")]
    rows = study(
        clips,
        steps,
        variants,
        args.onnx,
        args.imgsz,
        args.conf,
        args.cache_dir,
        args.seeds,
        args.jitter,
    )
    print(
        "| frames / s | variant | vehicles | found | records / vehicle | duplicates | unmatched |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['frames_per_s']:g} | {r['variant']} | {r['vehicles']} | {r['found']} "
            f"| {r['records_per_vehicle']} | {r['duplicates']} | {r['unmatched']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
