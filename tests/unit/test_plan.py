"""The static plan of the demo pipeline: which branches run for which class and which
actions wait for which branches."""

from __future__ import annotations

import pytest

from graph.config import PROJECT_ROOT
from graph.pipeline.archive import ArchiveLimits, LoadedArchive, load_archive
from graph.pipeline.plan import PipelinePlan

BODY, PLATE = "demo_bodytype_cls_v1", "demo_plate_ocr_v1"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LoadedArchive:
    cache = tmp_path_factory.mktemp("archives")
    return load_archive(PROJECT_ROOT / "models" / "demo.mpta", cache, ArchiveLimits())


def test_the_plan_knows_what_each_action_waits_for(demo: LoadedArchive) -> None:
    plan = PipelinePlan.of(demo.pipeline, "v1")
    needs = {(p.action.type, p.needs) for p in plan.actions}
    assert needs == {
        ("redis_save_image", frozenset()),
        ("postgresql_create_record", frozenset()),
        ("postgresql_update_combined", frozenset({BODY, PLATE})),
        ("redis_publish", frozenset({BODY, PLATE})),
    }
    assert plan.tables() == {
        "vehicle_events": {
            "camera_id",
            "display_id",
            "session_id",
            "object_id",
            "track_id",
            "detected_at",
            "confidence",
            "body_type",
            "plate",
        }
    }
    assert [b.model_id for b in plan.branches] == [BODY, PLATE]
    assert plan.branches[0].aliases == ("body_type",)
    # The create takes the update's key: the row the update looks for is the one it made.
    keys = {p.action.type: (p.key_field, p.key_value) for p in plan.actions}
    assert keys["postgresql_create_record"] == ("object_id", "{object_id}")
    assert keys["postgresql_update_combined"] == ("object_id", "{object_id}")


def test_the_plan_triggers_on_vehicles_above_the_minimum_confidence(demo: LoadedArchive) -> None:
    plan = PipelinePlan.of(demo.pipeline, "v1")
    assert plan.triggers("vehicle", 0.5)
    assert not plan.triggers("vehicle", 0.49)
    assert not plan.triggers("person", 0.99)
    body = plan.branches[0]
    # A branch triggers on its parent's label only; its minConfidence is for its own
    # result (the detector-worker's semantics), whatever the parent's confidence.
    assert body.triggers("vehicle")
    assert not body.triggers("person")
    assert body.accepts(0.5) and not body.accepts(0.49)
    assert body.source("vehicle") == "vehicle"  # crop: true, cropClass: the object's own
    assert plan.expected_classes is None and plan.keeps("person")
