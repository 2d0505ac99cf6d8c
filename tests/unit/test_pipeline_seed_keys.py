"""Seed `pipeline.json` keys camgraph honours (no Ray): the root's `expectedClasses`, a
branch's `crop` / `cropClass`, its `minConfidence` (on its own result), its
`timeout_seconds`, and actions that go on without a branch that keeps failing (the
detector-worker's `_execute_parallel_actions`). Driven through the real runner and
processor with fake classify / detect / submit coroutines."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.delivery.outbox import OutboxEntry
from graph.common.detection import DetectRequest, DetectResult
from graph.events.model import RingBufferSink, TrackedDetection
from graph.pipeline.plan import PipelinePlan
from graph.pipeline.runner import BranchResult, BranchSettings, PipelineRunner
from graph.pipeline.spec import PipelineFile
from stream_actors.processor import ProcessingSettings, SubscriptionProcessor
from stream_actors.stability import StabilityRules
from stream_actors.subscriptions import Subscription

BASE = {"camera_id": "cam", "display_id": "disp", "subscription_id": "disp;cam", "model_id": "det"}
IMAGE = np.random.default_rng(0).integers(0, 255, (360, 640, 3), dtype=np.uint8)
CAR = TrackedDetection(3, 0, "car", 0.9, (100.0, 100.0, 300.0, 200.0), True)
# Plates: one inside the car, one of another car (more confident), one only a third in.
PLATE_IN = TrackedDetection(None, 1, "plate", 0.7, (150.0, 160.0, 210.0, 185.0), False)
PLATE_OUT = TrackedDetection(None, 1, "plate", 0.95, (400.0, 160.0, 460.0, 185.0), False)
PLATE_EDGE = TrackedDetection(None, 1, "plate", 0.99, (280.0, 150.0, 340.0, 175.0), False)


def branch(model_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "modelId": model_id,
        "modelFile": f"{model_id}.onnx",
        "triggerClasses": ["car"],
        "minConfidence": 0.5,
        "parallel": True,
        **extra,
    }


def spec(branches: list[dict[str, Any]], **root: Any) -> dict[str, Any]:
    return {
        "pipeline": {
            "modelId": "det",
            "modelFile": "det.onnx",
            "triggerClasses": ["car"],
            "minConfidence": 0.5,
            "branches": branches,
            **root,
        }
    }


def plan_of(branches: list[dict[str, Any]], **root: Any) -> PipelinePlan:
    return PipelinePlan.of(PipelineFile.model_validate(spec(branches, **root)), "v1")


Answer = Callable[[str], BranchResult | Awaitable[BranchResult | None] | None]


class Harness:
    """A runner over `plan` whose classifier answers with `answer(branch)` (awaited if
    it is a coroutine; or raises what it raises), recording what each branch was given
    and what went to the outbox."""

    def __init__(
        self, plan: PipelinePlan, answer: Answer, on_result: Any = None, **settings: Any
    ) -> None:
        self.seen: list[tuple[str, np.ndarray]] = []
        self.submitted: list[OutboxEntry] = []

        async def classify(branch_id: str, image: np.ndarray) -> BranchResult | None:
            self.seen.append((branch_id, image))
            result = answer(branch_id)
            return await result if inspect.isawaitable(result) else result

        async def submit(entries: list[OutboxEntry]) -> None:
            self.submitted.extend(entries)

        defaults = {"retry_after_s": 0, "min_pass_interval_s": 0}
        self.runner = PipelineRunner(
            plan, BASE, classify, submit, BranchSettings(**{**defaults, **settings}), on_result
        )

    async def frame(self, seq: int, detections: list[TrackedDetection], **kw: Any) -> None:
        self.runner.observe(IMAGE, 1e9 + seq / 10, seq, detections, **kw)
        await self.runner.drain()

    def take(self) -> list[OutboxEntry]:
        out, self.submitted = self.submitted, []
        return out


def ops(entries: list[OutboxEntry], kind: str) -> list[dict[str, Any]]:
    """The operations of one kind: "redis_publish", or "record" for any PostgreSQL one."""
    if kind == "record":
        return [e.op for e in entries if e.sink == "postgres"]
    return [e.op for e in entries if e.op["type"] == kind]


# -- expectedClasses ------------------------------------------------------------------

# In letterboxed pixels of a 64 x 48 frame (letterboxed to 64): a car and a person.
CAR_ROW, PERSON_ROW = [2.0, 12.0, 22.0, 30.0, 0.9, 0.0], [40.0, 30.0, 62.0, 52.0, 0.8, 1.0]


@pytest.mark.parametrize("with_pipeline", [True, False])
def test_expected_classes_drop_other_detections_before_tracking(with_pipeline: bool) -> None:
    """Given a pipeline whose root expects cars only, when the detector also finds a
    person, then the person never becomes a track or an item of a detection event; a
    subscription without a pipeline keeps every class."""

    async def detect(model_id: str, request: DetectRequest) -> DetectResult:
        return DetectResult(np.array([CAR_ROW, PERSON_ROW], np.float32), {0: "car", 1: "person"})

    async def classify(branch_id: str, image: np.ndarray) -> BranchResult | None:
        return None

    async def submit(entries: list[OutboxEntry]) -> None:
        pass

    async def run() -> tuple[list[set[str]], int]:
        runner = None
        if with_pipeline:
            plan = plan_of([branch("body_cls")], expectedClasses=["car"])
            runner = PipelineRunner(plan, BASE, classify, submit, BranchSettings())
        sink = RingBufferSink(100)
        settings = ProcessingSettings(stability=StabilityRules(min_hits=1, max_misses=2))
        sub = Subscription(subscriptionIdentifier="d;c", rtspUrl="rtsp://127.0.0.1/cam")
        processor = SubscriptionProcessor(sub, "det", 64, detect, sink, settings, runner)
        processor.start()
        for _ in range(3):
            done = processor.processed
            processor.mailbox.put(np.zeros((48, 64, 3), np.uint8), time.time())
            for _ in range(300):
                if processor.processed > done:
                    break
                await asyncio.sleep(0.01)
        stable = processor.stable_tracks
        await processor.stop()
        labels = [{d.label for d in e.detections} for e in sink.after("d;c") if e.detections]
        return labels, stable

    labels, stable = asyncio.run(run())
    assert len(labels) == 3
    if with_pipeline:
        assert labels == [{"car"}] * 3 and stable == 1
    else:
        assert labels == [{"car", "person"}] * 3 and stable == 2


# -- crop / cropClass -----------------------------------------------------------------


def test_each_branch_classifies_its_own_input_and_waits_for_its_crop_class() -> None:
    """Given branches on the object's crop, on the plate inside it, and on the whole
    frame (`crop` false, as the detector-worker), when the car's plate is not in view
    yet, then the plate branch does not run (counted, not an error) and runs on a later
    pass on the plate that lies inside the car, not on a more confident plate elsewhere."""
    plan = plan_of(
        [
            branch("body_cls", crop=True),
            branch("plate_cls", crop=True, cropClass="plate"),
            branch("scene_cls"),
        ]
    )

    async def run() -> Harness:
        h = Harness(plan, lambda b: BranchResult("x", 0.9), crop_padding=0)
        await h.frame(1, [CAR, PLATE_OUT, PLATE_EDGE])
        assert sorted(b for b, _ in h.seen) == ["body_cls", "scene_cls"]
        seen = dict(h.seen)
        assert np.array_equal(seen["body_cls"], IMAGE[100:200, 100:300])
        assert seen["scene_cls"] is IMAGE  # the whole frame
        assert h.runner.status()["branch_no_input"] == {"plate_cls": 1}
        assert h.runner.status()["branch_errors"] == {}
        h.seen.clear()
        await h.frame(2, [CAR, PLATE_OUT, PLATE_EDGE, PLATE_IN])  # a retry is due
        seen = dict(h.seen)
        assert np.array_equal(seen["plate_cls"], IMAGE[160:185, 150:210])
        return h

    h = asyncio.run(run())
    assert h.runner.status()["branch_no_input"] == {"plate_cls": 1}


# -- minConfidence of a branch ----------------------------------------------------------


def test_a_branch_min_confidence_applies_to_its_own_result_not_the_parents() -> None:
    """Given a branch with minConfidence 0.6 and a car detected at 0.55 (the root's
    minimum is 0.5), then the branch runs; a result below 0.6 counts as nothing found
    (no vote, NULL column, counted) and a later confident one fills the record."""
    plan = plan_of(
        [branch("body_cls", minConfidence=0.6)],
        parallelActions=[
            {
                "type": "postgresql_update_combined",
                "table": "cars",
                "key_field": "track_id",
                "fields": {"body": "{body_cls.label}"},
            }
        ],
    )
    answers = iter([BranchResult("bus", 0.4), BranchResult("van", 0.8)])
    told: list[dict[str, Any]] = []
    car = TrackedDetection(3, 0, "car", 0.55, CAR.box, True)

    async def run() -> Harness:
        h = Harness(plan, lambda b: next(answers), lambda t, c, results: told.append(results))
        await h.frame(1, [car])
        (first,) = ops(h.take(), "record")
        assert first["fields"]["body"] is None
        assert h.runner.status()["branch_low_confidence"] == {"body_cls": 1}
        assert told == []
        await h.frame(2, [car])  # retried: nothing was found
        (second,) = ops(h.take(), "record")
        assert second["fields"]["body"] == "van" and second["seq"] > first["seq"]
        return h

    asyncio.run(run())
    assert [r["body_cls"]["label"] for r in told] == ["van"]  # "bus" never had a vote


# -- timeout_seconds --------------------------------------------------------------------


def test_timeout_seconds_is_a_branch_key_bounded_by_the_schema() -> None:
    assert plan_of([branch("b", timeout_seconds=30)]).branches[0].timeout_s == 30
    assert plan_of([branch("b")]).branches[0].timeout_s is None
    for bad in (0, -1, 301):
        with pytest.raises(ValidationError, match="timeout_seconds"):
            PipelineFile.model_validate(spec([branch("b", timeout_seconds=bad)]))


def test_a_branch_timeout_from_the_archive_wins_over_the_setting() -> None:
    """Given a branch with timeout_seconds 0.05 and one with 5, under a setting of 0.3 s,
    when both take 0.5 s, then only the first times out."""
    plan = plan_of([branch("quick", timeout_seconds=0.05), branch("patient", timeout_seconds=5)])

    async def slow(branch_id: str) -> BranchResult:
        await asyncio.sleep(0.5)
        return BranchResult("x", 0.9)

    async def run() -> tuple[Harness, float]:
        h = Harness(plan, slow, branch_timeout_s=0.3)
        started = time.monotonic()
        await h.frame(1, [CAR])
        return h, time.monotonic() - started

    h, elapsed = asyncio.run(run())
    assert h.runner.status()["branch_timeouts"] == {"quick": 1}
    assert h.runner.status()["branch_errors"] == {}
    assert elapsed >= 0.5  # the patient branch was waited for beyond the setting's 0.3 s


# -- partial branch failure -----------------------------------------------------------

PARTIAL = {
    "branches": None,  # filled below
    "actions": [
        {"type": "postgresql_create_record", "table": "cars", "fields": {"cam": "{camera_id}"}}
    ],
    "parallelActions": [
        {
            "type": "postgresql_update_combined",
            "table": "cars",
            "key_field": "track_id",
            "waitForBranches": ["body_cls", "plate_cls"],
            "fields": {"body": "{body_cls.label}", "plate": "{plate_cls.label}"},
        },
        {"type": "redis_publish", "channel": "cars", "message": "{track_id} {plate_cls.label}"},
    ],
}


def partial_plan() -> PipelinePlan:
    plate = branch(
        "plate_cls",
        actions=[{"type": "redis_publish", "channel": "plates", "message": "{track_id}"}],
    )
    root = {k: v for k, v in PARTIAL.items() if k != "branches"}
    return plan_of([branch("body_cls"), plate], **root)


def updates(entries: list[OutboxEntry]) -> list[dict[str, Any]]:
    return [op for op in ops(entries, "record") if "plate" in op["fields"]]


def test_a_combined_update_goes_on_without_a_branch_that_keeps_failing() -> None:
    """Given a plate branch that fails on every attempt, when it failed
    `branch_attempts` times in a row, then the combined update goes out with the body
    type and a NULL plate (counted per branch), while a message naming the plate and
    the plate branch's own action wait; when the plate reader comes back, a later pass
    updates the same record and sends them."""
    plate_up = False

    def answer(branch_id: str) -> BranchResult:
        if branch_id == "plate_cls" and not plate_up:
            raise ConnectionError("plate reader replica gone")
        return BranchResult("van" if branch_id == "body_cls" else "AB123CD", 0.9)

    async def run() -> Harness:
        nonlocal plate_up
        h = Harness(partial_plan(), answer, branch_attempts=2)
        await h.frame(1, [CAR])
        first = h.take()
        assert updates(first) == [] and ops(first, "redis_publish") == []
        await h.frame(2, [CAR])  # the retry fails too: given up
        second = h.take()
        (partial,) = updates(second)
        assert (partial["fields"]["body"], partial["fields"]["plate"]) == ("van", None)
        assert ops(second, "redis_publish") == []  # a message cannot be partial
        assert h.runner.status()["actions_partial"] == {"plate_cls": 1}
        plate_up = True
        await h.frame(3, [CAR])  # a later pass (a retry is due) reads the plate
        third = h.take()
        (full,) = updates(third)
        assert full["fields"]["plate"] == "AB123CD"
        assert full["object_key"] == partial["object_key"] and full["seq"] > partial["seq"]
        messages = sorted(op["message"] for op in ops(third, "redis_publish"))
        assert messages == ["3", "3 AB123CD"]
        return h

    h = asyncio.run(run())
    assert h.runner.status()["branch_errors"] == {"plate_cls": 2}


@pytest.mark.parametrize("ends", ["track lost", "passes spent"])
def test_a_combined_update_goes_on_when_the_object_has_no_chance_left(ends: str) -> None:
    """Given a plate branch that times out (not yet often enough to be given up), when
    the object's track is lost, or its passes are spent, then the combined update goes
    out without the plate; what cannot be partial (a message naming the plate, the plate
    branch's own action) is counted as incomplete when the track ends."""

    async def answer(branch_id: str) -> BranchResult:
        if branch_id == "plate_cls":
            await asyncio.sleep(1)
        return BranchResult("van", 0.9)

    async def run() -> Harness:
        max_passes = 4 if ends == "track lost" else 1
        h = Harness(
            partial_plan(), answer, branch_timeout_s=0.05, branch_attempts=10, max_passes=max_passes
        )
        await h.frame(1, [CAR])
        assert len(updates(h.submitted)) == (0 if ends == "track lost" else 1)
        await h.frame(2, [], lost=[3])
        return h

    h = asyncio.run(run())
    (partial,) = updates(h.submitted)
    assert (partial["fields"]["body"], partial["fields"]["plate"]) == ("van", None)
    assert ops(h.submitted, "redis_publish") == []
    status = h.runner.status()
    assert status["branch_timeouts"] == {"plate_cls": 1}
    assert status["actions_partial"] == {"plate_cls": 1}
    assert status["actions_incomplete"] == 2 and status["tracks"] == 0


def test_a_crop_class_that_expected_classes_drops_is_refused() -> None:
    """Its detections never reach tracking: the branch could never run."""
    plate = branch("plate_ocr", crop=True, cropClass="plate")
    with pytest.raises(ValidationError, match="cropClass 'plate' is not in expectedClasses"):
        PipelineFile.model_validate(spec([plate], expectedClasses=["car"]))
    PipelineFile.model_validate(spec([plate], expectedClasses=["car", "plate"]))
