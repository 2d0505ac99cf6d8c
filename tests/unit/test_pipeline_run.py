"""Branches and actions per stable track (no Ray): the demo pipeline over a generated
clip with the real detector, tracker, classifier and plate reader, actions through the
real outbox into the local store, checked against the clip's ground truth."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from demo.datasets import HELD_OUT_SEED_START, write_clip
from deployments.delivery.outbox import OutboxEntry
from deployments.delivery.service import ActionService
from deployments.inference.classify import BranchEngine
from deployments.inference.engines import EngineOptions, load_engine
from graph.common.detection import DetectRequest, DetectResult
from graph.common.schemas import ActionsSettings, BranchModelSpec
from graph.config import PROJECT_ROOT
from graph.events.model import RingBufferSink, TrackedDetection
from graph.pipeline.archive import ArchiveLimits, LoadedArchive, load_archive
from graph.pipeline.plan import PipelinePlan
from graph.pipeline.runner import BranchResult, BranchSettings, PipelineRunner
from stream_actors.processor import ProcessingSettings, SubscriptionProcessor
from stream_actors.sources import PyAVSource
from stream_actors.subscriptions import Subscription

BODY, PLATE = "demo_bodytype_cls_v1", "demo_plate_ocr_v1"
BASE = {
    "camera_id": "cam",
    "display_id": "disp",
    "subscription_id": "disp;cam",
    "session_id": "s1",
    "model_id": "m",
}


def recordable_vehicles(truth: dict[str, Any], min_frames: int = 10) -> list[dict[str, Any]]:
    """Ground-truth vehicles that a record is due for: at least half visible in at least
    `min_frames` frames (long enough to become stable objects)."""
    seen: Counter[int] = Counter()
    last: dict[int, dict[str, Any]] = {}
    for frame in truth["frames"]:
        for o in frame["objects"]:
            if o["cls"] == "vehicle" and o["visible_fraction"] >= 0.5:
                seen[o["object_id"]] += 1
                last[o["object_id"]] = o
    return [last[i] for i, n in seen.items() if n >= min_frames]


def assert_body_types(records: list[dict[str, Any]], truth: dict[str, Any]) -> None:
    """The records' body types are the vehicles' own, except at most one per vehicle that
    was never seen whole (cut by the frame edge or hidden) in 5 frames: no classifier can
    be held to a crop that never showed the vehicle."""
    vehicles = recordable_vehicles(truth)
    whole: Counter[int] = Counter()
    for frame in truth["frames"]:
        for o in frame["objects"]:
            if o["cls"] == "vehicle" and o["visible_fraction"] >= 0.8 and not o["truncated"]:
                whole[o["object_id"]] += 1
    never_whole = sum(whole[v["object_id"]] < 5 for v in vehicles)
    wrong = Counter(v["body_type"] for v in vehicles) - Counter(r["body_type"] for r in records)
    assert sum(wrong.values()) <= never_whole, (wrong, never_whole)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LoadedArchive:
    cache = tmp_path_factory.mktemp("archives")
    return load_archive(PROJECT_ROOT / "models" / "demo.mpta", cache, ArchiveLimits())


def test_one_record_per_vehicle_with_branch_fields_from_the_real_models(
    demo: LoadedArchive, tmp_path: Path
) -> None:
    clip = write_clip(HELD_OUT_SEED_START + 30, 200, tmp_path / "clip.mp4", fps=10, scale=1.0)
    truth = json.loads(clip.with_suffix(".json").read_text())
    plan = PipelinePlan.of(demo.pipeline, "v1")
    engine = load_engine(demo.model_path("demo-detector.onnx"), EngineOptions(640, 2))
    branches = {
        BODY: BranchEngine(
            BranchModelSpec(id=BODY, kind="classifier", path=demo.model_path("body-type.onnx"))
        ),
        PLATE: BranchEngine(BranchModelSpec(id=PLATE, kind="ocr")),
    }

    async def detect(model_id: str, request: DetectRequest) -> DetectResult:
        return DetectResult(engine.detect(request.image[None], [request.params])[0], engine.names)

    async def classify(branch: str, crop: np.ndarray) -> BranchResult | None:
        (label,) = branches[branch].classify([crop])
        return None if label is None else BranchResult(label.label, label.confidence)

    async def run() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        service = ActionService(ActionsSettings(data_dir=tmp_path / "actions"), tmp_path)
        runner = PipelineRunner(plan, BASE, classify, service.submit, BranchSettings())
        # A lossless replay: every frame is processed however long a first OCR call takes.
        sub = Subscription(subscriptionIdentifier="disp;cam", fileUrl=str(clip), fileRealtime=False)
        processor = SubscriptionProcessor(
            sub, "m", 640, detect, RingBufferSink(100), ProcessingSettings(), runner
        )
        processor.start()
        for i, frame in enumerate(PyAVSource(str(clip)).frames()):
            processor.mailbox.put(frame.image, 1e9 + i / 10)
            deadline = time.monotonic() + 60
            while processor.processed < processor.mailbox.received:  # every frame
                assert not any(processor.mailbox.drops.values()), (
                    i,
                    processor.status(),
                    runner.status(),
                )
                assert time.monotonic() < deadline, (i, processor.status(), runner.status())
                await asyncio.sleep(0.001)
        await runner.drain()
        status = runner.status()
        await processor.stop()
        for _ in range(100):
            health = await service.health()
            if health["outbox"][0]["depth"] == 0:
                break
            await asyncio.sleep(0.05)
        assert service._local is not None
        records = service._local.rows("vehicle_events")
        await service.close()
        return records, status, health

    records, status, health = asyncio.run(run())
    assert status["branch_errors"] == {} and status["submit_errors"] == 0
    assert health["dead"] == 0 and health["outbox"][0]["depth"] == 0
    recordable = recordable_vehicles(truth)
    assert len(recordable) >= 12
    assert len(records) == len(recordable)  # one record per vehicle, none twice
    assert len({r["track_id"] for r in records}) == len(records)
    assert_body_types(records, truth)
    plates = [r["plate"] for r in records if r["plate"] is not None]
    truth_plates = {o["plate"] for o in recordable}
    assert len(set(plates)) == len(plates)
    assert sum(p in truth_plates for p in plates) >= 0.5 * len(recordable), plates
    for r in records:
        assert (r["camera_id"], r["display_id"]) == ("cam", "disp")
        assert r["detected_at"].endswith("Z") and float(r["confidence"]) >= 0.5
    # Each vehicle's crop was saved under the key template (display, camera, track).
    images = sorted(p.name for p in (tmp_path / "actions" / "images").iterdir())
    assert images == sorted(f"camgraph_disp_cam_{r['track_id']}_v1.jpg" for r in records)


def test_a_failing_branch_is_isolated_and_its_actions_wait_for_it(demo: LoadedArchive) -> None:
    plan = PipelinePlan.of(demo.pipeline, "v1")
    image = np.full((360, 640, 3), 90, np.uint8)
    image[100:200, 100:300] = np.random.default_rng(0).integers(0, 255, (100, 200, 3))
    det = TrackedDetection(3, 0, "vehicle", 0.9, (100.0, 100.0, 300.0, 200.0), True)
    calls: Counter[str] = Counter()
    plate_up = False

    async def classify(branch: str, crop: np.ndarray) -> BranchResult | None:
        calls[branch] += 1
        if branch == PLATE and not plate_up:
            raise ConnectionError("plate reader replica gone")
        return BranchResult("van" if branch == BODY else "AB123CD", 0.9)

    submitted: list[OutboxEntry] = []

    async def submit(entries: list[OutboxEntry]) -> None:
        submitted.extend(entries)

    async def run() -> PipelineRunner:
        nonlocal plate_up
        runner = PipelineRunner(
            plan, BASE, classify, submit, BranchSettings(retry_after_s=0, min_pass_interval_s=0)
        )
        runner.observe(image, 1e9, 1, [det])
        await runner.drain()
        assert runner.branch_errors == Counter({PLATE: 1})
        # The body type ran; the actions that need the plate wait, the others went out.
        assert sorted(e.op["type"] for e in submitted) == ["insert", "redis_save_image"]
        plate_up = True
        runner.observe(image, 1e9 + 0.1, 2, [det])  # a retry is due: same crop, new pass
        await runner.drain()
        runner.observe(image, 1e9 + 0.2, 3, [det])  # complete and unchanged: no new pass
        await runner.drain()
        runner.observe(image, 1e9 + 0.3, 4, [], lost=[3])
        return runner

    runner = asyncio.run(run())
    assert calls == Counter({BODY: 2, PLATE: 2})
    kinds = [e.op["type"] for e in submitted]
    assert sorted(kinds) == ["insert", "redis_publish", "redis_save_image", "update"]
    update = next(e for e in submitted if e.op["type"] == "update")
    assert update.op["fields"] == {"body_type": "van", "plate": "AB123CD"}
    create = next(e for e in submitted if e.op["type"] == "insert")
    # One row per object: the update finds the row the create inserted, by its key.
    assert create.op["key_field"] == update.op["key_field"] == "object_id"
    assert create.op["key"] == update.op["key"]
    assert create.op["object_key"] == update.op["object_key"]
    assert len({e.key for e in submitted}) == len(submitted)
    assert runner.status()["tracks"] == 0 and runner.actions_incomplete == 0


def test_a_branch_that_does_not_answer_in_time_is_a_timeout_not_an_error(
    demo: LoadedArchive,
) -> None:
    plan = PipelinePlan.of(demo.pipeline, "v1")
    image = np.full((360, 640, 3), 90, np.uint8)
    det = TrackedDetection(3, 0, "vehicle", 0.9, (100.0, 100.0, 300.0, 200.0), True)

    async def classify(branch: str, crop: np.ndarray) -> BranchResult | None:
        if branch == PLATE:
            await asyncio.sleep(5)  # a busy plate reader
        return BranchResult("van", 0.9)

    async def submit(entries: list[OutboxEntry]) -> None:
        pass

    async def run() -> PipelineRunner:
        settings = BranchSettings(branch_timeout_s=0.05, min_pass_interval_s=0)
        runner = PipelineRunner(plan, BASE, classify, submit, settings)
        runner.observe(image, 1e9, 1, [det])
        await runner.drain()
        return runner

    runner = asyncio.run(run())
    assert runner.status()["branch_timeouts"] == {PLATE: 1}
    assert runner.status()["branch_errors"] == {}


def test_clients_are_told_each_branch_result_once_per_improvement(demo: LoadedArchive) -> None:
    plan = PipelinePlan.of(demo.pipeline, "v1")
    image = np.full((360, 640, 3), 90, np.uint8)
    image[100:200, 100:300] = np.random.default_rng(1).integers(0, 255, (100, 200, 3))
    det = TrackedDetection(7, 0, "vehicle", 0.9, (100.0, 100.0, 300.0, 200.0), True)
    plate_readable = False
    told: list[tuple[int, str, dict[str, Any]]] = []

    async def classify(branch: str, crop: np.ndarray) -> BranchResult | None:
        if branch == PLATE:
            return BranchResult("AB123CD", 0.8) if plate_readable else None
        return BranchResult("van", 0.9)

    async def submit(entries: list[OutboxEntry]) -> None:
        pass

    async def run() -> None:
        nonlocal plate_readable
        settings = BranchSettings(retry_after_s=0, min_pass_interval_s=0)
        runner = PipelineRunner(plan, BASE, classify, submit, settings, lambda *r: told.append(r))
        runner.observe(image, 1e9, 1, [det])  # body type known, no readable plate yet
        await runner.drain()
        assert [r[2].keys() for r in told] == [{BODY}]
        plate_readable = True
        for seq in range(2, 8):  # a retry pass reads the plate; later frames add nothing
            runner.observe(image, 1e9 + seq / 10, seq, [det])
            await runner.drain()

    asyncio.run(run())
    assert len(told) == 2
    track_id, class_name, results = told[-1]
    assert (track_id, class_name) == (7, "vehicle")
    assert results[BODY]["label"] == "van" and results[PLATE]["label"] == "AB123CD"
    assert results[PLATE]["confidence"] == 1.0  # one vote: all of the share


@pytest.mark.parametrize("backlog_clears", [True, False])
def test_actions_refused_by_a_full_backlog_are_retried_when_the_track_ends_or_counted(
    demo: LoadedArchive, backlog_clears: bool
) -> None:
    """Given a camera actor whose hand-over queue is full (BacklogFull) when a vehicle
    becomes stable, when the track is lost before another pass, then its actions get one
    more try; whatever is still refused is counted as lost, never silently gone."""
    from stream_actors.forwarding import BacklogFull

    plan = PipelinePlan.of(demo.pipeline, "v1")
    image = np.full((360, 640, 3), 90, np.uint8)
    image[100:200, 100:300] = np.random.default_rng(2).integers(0, 255, (100, 200, 3))
    det = TrackedDetection(5, 0, "vehicle", 0.9, (100.0, 100.0, 300.0, 200.0), True)
    full = True
    submitted: list[OutboxEntry] = []

    async def classify(branch: str, crop: np.ndarray) -> BranchResult | None:
        return BranchResult("van" if branch == BODY else "AB123CD", 0.9)

    async def submit(entries: list[OutboxEntry]) -> None:
        if full:
            raise BacklogFull("64 actions not yet sent")
        submitted.extend(entries)

    async def run() -> PipelineRunner:
        nonlocal full
        runner = PipelineRunner(plan, BASE, classify, submit, BranchSettings())
        runner.observe(image, 1e9, 1, [det])
        await runner.drain()
        assert submitted == [] and runner.submit_errors > 0
        full = not backlog_clears
        runner.observe(image, 1e9 + 0.1, 2, [], lost=[5])
        await runner.drain()
        return runner

    runner = asyncio.run(run())
    status = runner.status()
    if backlog_clears:
        assert sorted(e.op["type"] for e in submitted) == sorted(
            ["redis_save_image", "insert", "update", "redis_publish"]
        )
        assert status["actions_lost"] == 0
    else:
        assert submitted == [] and status["actions_lost"] == len(plan.actions)
    assert status["tracks"] == 0


def test_a_box_cut_by_the_crop_region_is_passed_again_only_when_much_larger(
    demo: LoadedArchive,
) -> None:
    """A vehicle at the left edge of a subscription's crop region (`bounds`) is still
    entering: a view 1.5 x larger is no reason for a new pass (twice as large would
    be). Judged against the whole frame, where the same box is not cut, it is."""
    plan = PipelinePlan.of(demo.pipeline, "v1")
    image = np.random.default_rng(1).integers(0, 255, (360, 640, 3), dtype=np.uint8)
    roi = (100.0, 0.0, 640.0, 360.0)

    def passes(bounds: tuple[float, float, float, float] | None) -> int:
        calls: Counter[str] = Counter()

        async def classify(branch: str, crop: np.ndarray) -> BranchResult | None:
            calls[branch] += 1
            return BranchResult("van" if branch == BODY else "AB123CD", 0.9)

        async def submit(entries: list[OutboxEntry]) -> None:
            pass

        async def run() -> None:
            runner = PipelineRunner(
                plan, BASE, classify, submit, BranchSettings(min_pass_interval_s=0)
            )
            for seq, x2 in ((1, 200.0), (2, 250.0)):  # 100 → 150 px wide, at x 100
                det = TrackedDetection(3, 0, "vehicle", 0.9, (100.0, 100.0, x2, 200.0), True)
                runner.observe(image, 1e9 + seq / 10, seq, [det], bounds=bounds)
                await runner.drain()

        asyncio.run(run())
        return calls[BODY]

    assert passes(roi) == 1
    assert passes(None) == 2
