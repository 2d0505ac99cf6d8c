"""`make bench-pipeline`: the demo pipeline's output under overload, against ground truth.

Generated scenes (held-out seeds, 1280x720, each vehicle with its body type and plate)
are played once, in real time, as file cameras through the full graph that `make run`
deploys (serve_config.yaml: the demo pipeline, its detector, body-type and plate
deployments, and the actions), with records going to a PostgreSQL schema of this run's
own. The number of cameras sets the overload: `--overload 2,4` plays enough cameras
to offer 2x and 4x what the box can detect of these cameras, measured just before
(`--capacity raw`, the default): raw ONNX Runtime without Ray decoding and detecting
every frame of the same 1280x720 clips, best of its two process layouts (as `make
bench`'s raw limit). `--capacity inference` counts one inference alone (the detector
replicas' frames/s with nothing else on the cores: no decoding, tracking or branch
work), as this benchmark did before 2026-12-05. Each level runs twice, in one run, side
by side: with the dispatcher's priority for branch work (the default) and without it
(`branch_hold_s: 0`).

It reports, per level and variant:
- records per ground-truth vehicle (a vehicle: at least half visible in 10 frames);
- plate exact recall: readable plates (at least 30 px high in some frame) found
  exactly in a record of their camera;
- body type: share of records with one, and accuracy on the records whose plate
  identifies their vehicle;
- branch passes and timeouts; frames played, decoded and processed.
Results go to benchmarks/results/bench-pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

VEHICLE_MIN_VISIBLE = 0.5
VEHICLE_MIN_FRAMES = 10  # 1 s at 10 fps: a vehicle a camera could track to stable
READABLE_PLATE_PX = 30  # as demo/evaluate.py's plate bar
PIPELINE_SEED_START = 300_000  # scenes of this benchmark only: never in training or eval
DISPLAY_ID = "benchpipe"
TABLE = "vehicle_events"  # the demo pipeline's postgresql_create_record table


# ---- ground truth and scoring (pure) ---------------------------------------------------


@dataclass(frozen=True)
class VehicleTruth:
    object_id: int
    body_type: str | None
    plate: str | None
    readable: bool  # its plate is at least READABLE_PLATE_PX high in some frame


def vehicles_of(truth: Mapping[str, Any]) -> dict[int, VehicleTruth]:
    """The vehicles a camera could report, from a clip's ground truth (write_clip's)."""
    frames: dict[int, int] = defaultdict(int)
    info: dict[int, dict[str, Any]] = {}
    readable: set[int] = set()
    for frame in truth["frames"]:
        for obj in frame["objects"]:
            if obj["cls"] != "vehicle":
                continue
            oid = int(obj["object_id"])
            info.setdefault(oid, obj)
            if obj["visible_fraction"] >= VEHICLE_MIN_VISIBLE:
                frames[oid] += 1
            box = obj.get("plate_box")
            if obj.get("plate") and box and box[3] - box[1] >= READABLE_PLATE_PX:
                readable.add(oid)
    return {
        oid: VehicleTruth(oid, info[oid].get("body_type"), info[oid].get("plate"), oid in readable)
        for oid, n in frames.items()
        if n >= VEHICLE_MIN_FRAMES
    }


@dataclass
class PipelineScore:
    vehicles: int = 0
    records: int = 0
    readable_plates: int = 0
    plates_exact: int = 0
    records_with_body_type: int = 0
    records_matched: int = 0  # records whose plate names a ground-truth vehicle
    body_type_correct: int = 0

    @property
    def records_per_vehicle(self) -> float | None:
        return self.records / self.vehicles if self.vehicles else None

    @property
    def plate_recall(self) -> float | None:
        return self.plates_exact / self.readable_plates if self.readable_plates else None

    @property
    def body_type_present(self) -> float | None:
        return self.records_with_body_type / self.records if self.records else None

    @property
    def body_type_accuracy(self) -> float | None:
        return self.body_type_correct / self.records_matched if self.records_matched else None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "records_per_vehicle": _r(self.records_per_vehicle),
            "plate_recall": _r(self.plate_recall),
            "body_type_present": _r(self.body_type_present),
            "body_type_accuracy": _r(self.body_type_accuracy),
        }


def score(
    truths: Mapping[str, Mapping[int, VehicleTruth]], records: Iterable[Mapping[str, Any]]
) -> PipelineScore:
    """Records (camera_id, body_type, plate) against each camera's vehicles. A record is
    matched to the vehicle of its camera whose plate it read exactly."""
    out = PipelineScore()
    found: set[tuple[str, int]] = set()
    by_plate = {(cam, v.plate): v for cam, vs in truths.items() for v in vs.values() if v.plate}
    for vs in truths.values():
        out.vehicles += len(vs)
        out.readable_plates += sum(v.readable for v in vs.values())
    for rec in records:
        cam = str(rec.get("camera_id"))
        if cam not in truths:
            continue
        out.records += 1
        body = rec.get("body_type") or None
        out.records_with_body_type += body is not None
        vehicle = by_plate.get((cam, rec.get("plate") or ""))
        if vehicle is None:
            continue
        out.records_matched += 1
        out.body_type_correct += body is not None and body == vehicle.body_type
        if vehicle.readable:
            found.add((cam, vehicle.object_id))
    out.plates_exact = len(found)
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# ---- one run through a deployed graph ------------------------------------------------


@dataclass
class PipelineRun:
    variant: str
    overload: float  # offered / capacity (the run's --capacity basis)
    cameras: int
    score: PipelineScore
    overload_inference: float = 0.0  # offered / the detector replicas' inference alone
    played: int = 0  # the clips' frames (cameras x frames per clip)
    processed: int = 0
    offered: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    passes: int = 0
    branch_timeouts: dict[str, int] = field(default_factory=dict)
    branch_errors: dict[str, int] = field(default_factory=dict)
    dispatch: dict[str, Any] = field(default_factory=dict)
    cpu_pct_by_role: dict[str, float] = field(default_factory=dict)  # while the clips played
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score.to_json()}


def run_level(
    url: str,
    dsn: str,
    schema: str,
    clips: Sequence[Path],
    variant: str,
    overload: float,
    settle_s: float = 20.0,
    timeout_s: float = 240.0,
) -> PipelineRun:
    """Play every clip once (real time) as a camera, wait until they ended and the
    pipeline's work settled, then score the records of this run's cameras."""
    import psycopg

    from benchmarks.measure import ProcessSampler, ray_selector

    tag = uuid.uuid4().hex[:6]
    cams = {f"{variant}-{overload:g}x-{i}-{tag}": clip for i, clip in enumerate(clips)}
    ground = {cam: json.loads(clip.with_suffix(".json").read_text()) for cam, clip in cams.items()}
    truths = {cam: vehicles_of(truth) for cam, truth in ground.items()}
    run = PipelineRun(variant, overload, len(cams), PipelineScore())
    run.played = sum(len(truth.get("frames", [])) for truth in ground.values())
    with httpx.Client(base_url=url, timeout=30) as client:
        try:
            for cam, clip in cams.items():
                body = {
                    "subscriptionIdentifier": f"{DISPLAY_ID};{cam}",
                    "fileUrl": str(clip.resolve()),
                    "fileLoop": False,
                    "fileRealtime": True,
                }
                client.post("/streams", json=body).raise_for_status()
            sampler = ProcessSampler(ray_selector()).start()  # where the cores went
            try:
                _wait_ended(client, set(cams), timeout_s)
            finally:
                run.cpu_pct_by_role = sampler.stop().cpu_pct_by_role
            _settle(dsn, schema, list(cams), settle_s)
            subs = _subscriptions(client, set(cams))
            _account(run, subs, client)
        except (httpx.HTTPError, RuntimeError) as exc:
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            for cam in cams:
                with contextlib.suppress(httpx.HTTPError):
                    client.delete(f"/streams/{DISPLAY_ID};{cam}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            rows = conn.execute(
                f'SELECT camera_id, body_type, plate FROM "{schema}"."{TABLE}" '
                "WHERE camera_id = ANY(%s)",
                (list(cams),),
            ).fetchall()
        except psycopg.errors.UndefinedTable:  # no record at all (yet): scored as such
            rows = []
    run.score = score(truths, [{"camera_id": c, "body_type": b, "plate": p} for c, b, p in rows])
    return run


def _subscriptions(client: httpx.Client, cams: set[str]) -> dict[str, dict[str, Any]]:
    listing = client.get("/streams").raise_for_status().json()
    out: dict[str, dict[str, Any]] = {}
    for stream in listing.get("streams", []):
        for sub in stream.get("subscriptions", []):
            if sub.get("camera_id") in cams:
                out[sub["camera_id"]] = {**sub, "state": stream.get("state")}
    out["_actors"] = listing.get("actors", {})
    return out


def _wait_ended(client: httpx.Client, cams: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        subs = _subscriptions(client, cams)
        if all(subs.get(c, {}).get("state") == "ended" for c in cams):
            return
        time.sleep(2)
    raise RuntimeError(f"the clips did not end within {timeout_s:g}s")


def _settle(dsn: str, schema: str, cams: list[str], settle_s: float) -> None:
    """Until the records of these cameras stop changing for `settle_s` (branch passes
    and the outbox finish after the last frame), at most 6 x settle_s."""
    import psycopg

    last, stable_since, deadline = None, time.monotonic(), time.monotonic() + 6 * settle_s
    with psycopg.connect(dsn, autocommit=True) as conn:  # one connection for the polls
        while time.monotonic() < deadline:
            try:
                now = conn.execute(
                    f'SELECT count(*), count(body_type), count(plate) FROM "{schema}"."{TABLE}" '
                    "WHERE camera_id = ANY(%s)",
                    (cams,),
                ).fetchone()
            except psycopg.errors.UndefinedTable:
                now = None
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= settle_s:
                return
            time.sleep(2)


def _account(run: PipelineRun, subs: dict[str, Any], client: httpx.Client) -> None:
    drops: dict[str, int] = defaultdict(int)
    timeouts: dict[str, int] = defaultdict(int)
    errors: dict[str, int] = defaultdict(int)
    for cam, sub in subs.items():
        if cam == "_actors":
            continue
        run.processed += int(sub.get("processed") or 0)
        run.offered += int(sub.get("received") or 0)
        for reason, n in (sub.get("drops") or {}).items():
            drops[reason] += int(n)
        pipeline = sub.get("pipeline") or {}
        run.passes += int(pipeline.get("passes") or 0)
        for branch, n in (pipeline.get("branch_timeouts") or {}).items():
            timeouts[branch] += int(n)
        for branch, n in (pipeline.get("branch_errors") or {}).items():
            errors[branch] += int(n)
    run.drops = {k: v for k, v in drops.items() if v}
    run.branch_timeouts, run.branch_errors = dict(timeouts), dict(errors)
    run.dispatch = {
        name: actor.get("dispatch") for name, actor in (subs.get("_actors") or {}).items()
    }


# ---- the whole phase -----------------------------------------------------------------


DSN_ENV = "CAMGRAPH_BENCH_PG_DSN"  # the DSN reaches Actions by environment, not in args


def pipeline_config(
    base: dict[str, Any], schema: str, hold: bool, shed: bool = True
) -> dict[str, Any]:
    """serve_config.yaml as `make run` deploys it, with records in PostgreSQL (this
    run's schema, the DSN from DSN_ENV) and the dispatcher's branch priority on or off."""
    config = json.loads(json.dumps(base))
    args = config["applications"][0].setdefault("args", {})
    actions = {k: v for k, v in (args.get("actions") or {}).items() if k != "postgres_dsn"}
    args["actions"] = {
        **actions,
        "redis_url": os.environ.get("CAMGRAPH_BENCH_REDIS", "redis://127.0.0.1:6379/0"),
        "postgres_dsn_env": DSN_ENV,
        "postgres_schema": schema,
    }
    streams = args.setdefault("streams", {})
    if not hold:
        streams["dispatch"] = {**(streams.get("dispatch") or {}), "branch_hold_s": 0}
    if not shed:
        streams["reader"] = {**(streams.get("reader") or {}), "shed_decode": False}
    return config


def camera_counts(
    levels: Sequence[float], capacity_fps: float, max_cameras: int, fps: float = 10.0
) -> dict[float, int]:
    """Cameras at `fps` each that offer `level` x `capacity_fps` (at least 1, at most
    `max_cameras`)."""
    if capacity_fps <= 0:
        raise ValueError(f"no capacity measured ({capacity_fps} frames/s)")
    return {lv: max(1, min(max_cameras, round(lv * capacity_fps / fps))) for lv in levels}


def raw_capacity_fps(clips: Sequence[Path], onnx: Path, seconds: float) -> tuple[float, str]:
    """(frames/s, layout): what the box can detect of these cameras without camgraph:
    raw ONNX Runtime decoding, letterboxing and detecting every frame of `clips`
    (looped, lossless), best of its two process layouts (benchmarks/baselines.py)."""
    from benchmarks.baselines import Camera, best_raw, run_raw

    cameras = [Camera(f"capacity{i}", str(p.resolve())) for i, p in enumerate(clips)]
    phases = run_raw(cameras, "saturation", seconds, min(8.0, seconds), onnx, progress=False)
    best = best_raw(phases)
    if best is None:
        errors = "; ".join(f"{p.name}: {p.error}" for p in phases)
        raise RuntimeError(f"raw ONNX Runtime measured nothing: {errors}")
    return best.fps, str(best.extra.get("layout", best.name))


def make_clips(n: int, frames: int, cache_dir: Path, fps: int = 10) -> list[Path]:
    from demo.datasets import write_clip

    out = []
    for i in range(n):
        seed = PIPELINE_SEED_START + i
        path = cache_dir / f"pipe{i:03d}-s{seed}-n{frames}-f{fps}.mp4"
        if not path.exists() or not path.with_suffix(".json").exists():
            write_clip(seed, frames, path, fps=fps, scale=1.0)
        out.append(path)
    return out


def capacity_fps(onnx: Path, imgsz: int, replicas: int) -> tuple[float, float]:
    """(one inference in ms on one thread, frames/s the detector replicas can take)."""
    import numpy as np

    from deployments.inference.engines import OnnxEngine
    from graph.common.vision import RECT_STRIDE, DetectParams, letterbox

    engine = OnnxEngine(onnx, imgsz, intra_op_threads=1)
    # The scenes' 1280x720 frames, letterboxed as the camera actors do it.
    boxed, _ = letterbox(np.full((720, 1280, 3), 114, np.uint8), imgsz, RECT_STRIDE)
    image = engine.batch([boxed])
    for _ in range(3):
        engine.detect(image, [DetectParams()])
    start, runs = time.perf_counter(), 10
    for _ in range(runs):
        engine.detect(image, [DetectParams()])
    ms = (time.perf_counter() - start) / runs * 1000
    return ms, replicas * 1000 / ms


def render(runs: Sequence[PipelineRun], meta: dict[str, Any]) -> str:
    lines = [
        f"# camgraph pipeline under overload, {meta['date']}",
        "",
        f"{meta['environment']}. One inference {meta['single_inference_ms']:.1f} ms: "
        f"the detector replicas alone take {meta['inference_capacity_fps']:.1f} frames/s. "
        + _raw_line(meta)
        + f"Overload = offered / {_BASIS[meta['capacity_basis']]}: "
        f"{meta['capacity_fps']:.1f} frames/s. Clips of "
        f"{meta['frames']} frames at 10 fps, 1280x720, played once in real time.",
        "",
        "| variant | overload | by one inference | cameras | played / processed | "
        "processed / decoded | records / vehicle | plate exact | body type present | "
        "body type accuracy | passes | branch timeouts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r.score
        per = f"{r.played / r.processed:.1f}x" if r.processed else "-"
        lines.append(
            f"| {r.variant} | {r.overload:.1f}x | {r.overload_inference:.1f}x | {r.cameras} | "
            f"{per} | {r.processed} / {r.offered} | "
            f"{_fmt(s.records_per_vehicle)} ({s.records}/{s.vehicles}) | "
            f"{_fmt(s.plate_recall)} ({s.plates_exact}/{s.readable_plates}) | "
            f"{_fmt(s.body_type_present)} | {_fmt(s.body_type_accuracy)} "
            f"({s.body_type_correct}/{s.records_matched}) | {r.passes} | "
            f"{sum(r.branch_timeouts.values())} |" + (f" error: {r.error}" if r.error else "")
        )
    sampled = [r for r in runs if r.cpu_pct_by_role]
    if sampled:
        lines += ["", "Where the cores went while the clips played (% of one core, top roles):", ""]
        for r in sampled:
            top = sorted(r.cpu_pct_by_role.items(), key=lambda kv: -kv[1])[:8]
            total = sum(r.cpu_pct_by_role.values())
            roles = ", ".join(f"{_short_role(k)} {v:.0f}" for k, v in top)
            lines.append(f"- {r.variant}, {r.overload:.1f}x: all {total:.0f}; {roles}")
    return "\n".join(lines) + "\n"


_BASIS = {
    "given": "a capacity given on the command line (--capacity-fps)",
    "raw": "what raw ONNX Runtime decodes and detects of these clips",
    "inference": "the detector replicas' frames/s from one inference",
}


def _raw_line(meta: Mapping[str, Any]) -> str:
    raw = meta.get("raw_capacity_fps")
    if raw is None:
        return ""
    return (
        f"Raw ONNX Runtime decodes, letterboxes and detects {raw:.1f} frames/s of these "
        f"clips ({meta.get('raw_layout')}, every frame). "
    )


def _short_role(role: str) -> str:
    """`ServeReplica:camgraph:Classifier_demo_plate_ocr_v1` -> `Classifier_demo_plate_ocr_v1`."""
    return role.rsplit(":", 1)[-1] if role.startswith("ServeReplica:") else role


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    import psycopg
    import yaml

    from benchmarks.camgraph_phase import local_camgraph
    from benchmarks.report import run_meta

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploy", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--overload", default="2,4", help="offered / capacity levels")
    parser.add_argument(
        "--capacity",
        choices=("raw", "inference"),
        default="raw",
        help="what the levels count against: raw ONNX Runtime decoding and detecting the "
        "clips (default), or one inference alone",
    )
    parser.add_argument(
        "--capacity-seconds",
        type=float,
        default=15.0,
        help="the raw capacity's measuring window per layout (after up to 8 s of warm-up)",
    )
    parser.add_argument(
        "--capacity-fps",
        type=float,
        default=None,
        help="take this capacity (frames/s) instead of measuring it, whatever --capacity "
        "says (A/B runs at the same cameras)",
    )
    parser.add_argument("--frames", type=int, default=300, help="frames per clip (10 fps)")
    parser.add_argument(
        "--variants",
        default="priority,no-priority",
        help="of priority (the default settings), no-priority (branch_hold_s: 0), "
        "priority-noshed (priority, but all frames decoded under overload)",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("CAMGRAPH_BENCH_DSN", "host=127.0.0.1 port=5432 dbname=test"),
    )
    parser.add_argument("--onnx", type=Path, default=Path("models/demo-detector.onnx"))
    parser.add_argument("--replicas", type=int, default=2, help="the detector's replicas")
    parser.add_argument("--max-cameras", type=int, default=16)
    parser.add_argument("--ray-cpus", type=int, default=2, help="as make run starts Ray")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/bench-pipeline"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    try:
        levels = [float(x) for x in args.overload.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--overload must be numbers separated by commas, got {args.overload!r}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"priority", "no-priority", "priority-noshed"}
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")
    if args.capacity_fps is not None and not (
        math.isfinite(args.capacity_fps) and args.capacity_fps > 0
    ):
        parser.error(f"--capacity-fps must be a positive number, got {args.capacity_fps}")
    if not (math.isfinite(args.capacity_seconds) and args.capacity_seconds > 0):
        parser.error(f"--capacity-seconds must be positive, got {args.capacity_seconds}")
    if not levels or not all(math.isfinite(lv) and lv > 0 for lv in levels):
        parser.error(f"--overload must be positive numbers, got {args.overload!r}")
    ms, inference_fps = capacity_fps(args.onnx, 640, args.replicas)
    meta: dict[str, Any] = {
        **run_meta(),
        "single_inference_ms": ms,
        "inference_capacity_fps": inference_fps,
        "capacity_basis": args.capacity,
        "frames": args.frames,
    }
    capacity = inference_fps
    if args.capacity_fps is not None:
        capacity = args.capacity_fps
        meta.update(capacity_basis="given")
    elif args.capacity == "raw":  # before any Ray process starts: the cores are its own
        sample = make_clips(4, args.frames, args.cache_dir)
        capacity, layout = raw_capacity_fps(sample, args.onnx, args.capacity_seconds)
        meta.update(raw_capacity_fps=capacity, raw_layout=layout)
        print(f"raw ONNX Runtime decodes and detects {capacity:.1f} frames/s ({layout})")
    meta["capacity_fps"] = capacity
    counts = camera_counts(levels, capacity, args.max_cameras)
    clips = make_clips(max(counts.values()), args.frames, args.cache_dir)
    base = yaml.safe_load(args.deploy.read_text())
    runs: list[PipelineRun] = []
    schema = f"camgraph_bench_{uuid.uuid4().hex[:8]}"
    os.environ[DSN_ENV] = args.dsn  # the harness's Ray cluster inherits it
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> str:  # after every level: a failure later keeps what was measured
        (args.out / "bench-pipeline.json").write_text(
            json.dumps({**meta, "runs": [r.to_json() for r in runs]}, indent=2)
        )
        text = render(runs, meta)
        (args.out / "bench-pipeline.md").write_text(text)
        return text

    try:
        for variant in variants:
            config = pipeline_config(
                base, schema, hold=variant.startswith("priority"), shed=variant != "priority-noshed"
            )
            path = args.cache_dir / f"serve_config-{variant}.yaml"
            with local_camgraph(config, path, cpus=args.ray_cpus) as url:
                for level in levels:
                    n = counts[level]
                    run = run_level(url, args.dsn, schema, clips[:n], variant, n * 10 / capacity)
                    run.overload_inference = n * 10 / inference_fps
                    print(json.dumps(run.to_json()), flush=True)
                    runs.append(run)
                    write()
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(write())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
