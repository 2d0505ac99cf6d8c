"""A display's session in its pipelines (no Ray): `{session_id}` is the session the
backend set (setSessionId), a new session starts new records at once for the objects in
view, and `{session.<field>}` is filled from patchSession data; checked on the entries
the runner hands to the outbox."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.delivery.outbox import OutboxEntry
from graph.events.model import TrackedDetection
from graph.pipeline.plan import PipelinePlan
from graph.pipeline.render import object_key, object_uuid
from graph.pipeline.runner import BranchResult, BranchSettings, PipelineRunner
from graph.pipeline.spec import PipelineFile

BASE = {"camera_id": "cam", "display_id": "disp", "subscription_id": "disp;cam", "model_id": "det"}


def pipeline(**root_extra: Any) -> dict[str, Any]:
    return {
        "pipeline": {
            "modelId": "det",
            "modelFile": "det.onnx",
            "triggerClasses": ["vehicle"],
            "minConfidence": 0.5,
            "actions": [
                {
                    "type": "postgresql_create_record",
                    "table": "visits",
                    "key_field": "visit_id",
                    "key_value": "{object_id}",
                    "fields": {
                        "session_id": "{session_id}",
                        "lane": "{session.lane}",
                        "track_id": "{track_id}",
                    },
                }
            ],
            "branches": [
                {
                    "modelId": "body_cls",
                    "modelFile": "body.onnx",
                    "triggerClasses": ["vehicle"],
                    "minConfidence": 0.5,
                }
            ],
            "parallelActions": [
                {
                    "type": "redis_publish",
                    "channel": "visits:{session_id}",
                    "message": "{track_id} lane {session.lane}: {body_cls.label}",
                }
            ],
            **root_extra,
        }
    }


def plan() -> PipelinePlan:
    return PipelinePlan.of(PipelineFile.model_validate(pipeline()), "v1")


IMAGE = np.random.default_rng(0).integers(0, 255, (360, 640, 3), dtype=np.uint8)
CAR = TrackedDetection(3, 0, "vehicle", 0.9, (100.0, 100.0, 300.0, 200.0), True)


class Runs:
    """A runner over the plan with a classifier that always says "van", recording what
    it hands to the outbox."""

    def __init__(self) -> None:
        self.submitted: list[OutboxEntry] = []

        async def classify(branch: str, crop: np.ndarray) -> BranchResult | None:
            return BranchResult("van", 0.9)

        async def submit(entries: list[OutboxEntry]) -> None:
            self.submitted.extend(entries)

        self.runner = PipelineRunner(
            plan(), BASE, classify, submit, BranchSettings(min_pass_interval_s=60)
        )

    def take(self) -> list[OutboxEntry]:
        out, self.submitted = self.submitted, []
        return out


def upserts(entries: list[OutboxEntry]) -> list[dict[str, Any]]:
    """The record writes (the seeds' create is an `insert`, once per object and
    session; later revisions update its row by its key)."""
    return [e.op for e in entries if e.op["type"] in ("insert", "update")]


def publishes(entries: list[OutboxEntry]) -> list[dict[str, Any]]:
    return [e.op for e in entries if e.op["type"] == "redis_publish"]


def test_without_a_session_each_object_is_its_own_session() -> None:
    """As in the detector-worker: the object's {session_id} is its {object_id}, a UUID
    derived from its record identity, and the row's key."""

    async def main() -> list[OutboxEntry]:
        runs = Runs()
        runs.runner.observe(IMAGE, 1e9, 1, [CAR])
        await runs.runner.drain()
        return runs.take()

    (record,) = upserts(asyncio.run(main()))
    own = record["fields"]["session_id"]
    assert own == record["key"] == str(uuid.UUID(own))
    assert own == object_uuid(record["object_key"])
    assert (record["type"], record["key_field"]) == ("insert", "visit_id")
    assert record["fields"]["lane"] is None  # no session data: NULL, the record goes out


def test_a_session_keys_records_its_data_fills_templates_and_a_new_one_starts_new_records() -> None:
    async def main() -> None:
        runs = Runs()
        runner = runs.runner
        assert runner.set_session(4242) is True
        assert runner.set_session(4242) is False  # the same again changes nothing
        runner.observe(IMAGE, 1e9, 1, [CAR])
        await runner.drain()
        first = runs.take()
        (record,) = upserts(first)
        assert record["fields"] == {"session_id": "4242", "lane": None, "track_id": "3"}
        assert record["key"] == object_uuid(record["object_key"])
        # The publish names {session.lane}, in its message: it waits for the value.
        assert publishes(first) == []
        assert runner.status()["session_id"] == 4242

        # patchSession data: the record is updated, the publish goes out.
        assert runner.set_session(4242, {"lane": 2}) is True
        await runner.drain()
        patched = runs.take()
        (update,) = upserts(patched)
        assert update["fields"]["lane"] == "2"
        assert update["object_key"] == record["object_key"]  # the same row, by its key
        assert update["key"] == record["key"] and update["slot"] == record["slot"]
        assert update["seq"] > record["seq"]
        (message,) = publishes(patched)
        assert message == {
            "type": "redis_publish",
            "channel": "visits:4242",
            "message": "3 lane 2: van",
            "slot": message["slot"],
            "seq": message["seq"],
        }
        # Data that changes nothing rendered sends nothing.
        assert runner.set_session(4242, {"lane": 2, "unused": "x"}) is True
        await runner.drain()
        assert runs.take() == []

        # A new session while the car is in view: a new record at once, every action
        # again (keyed by the new session), without the old session's data.
        assert runner.set_session("visit-77") is True
        await runner.drain()
        renewed = runs.take()
        (new_record,) = upserts(renewed)
        assert new_record["fields"] == {
            "session_id": "visit-77",
            "lane": None,
            "track_id": "3",
        }
        assert new_record["object_key"] != record["object_key"]
        assert new_record["key"] != record["key"] and new_record["slot"] != record["slot"]
        assert publishes(renewed) == []  # its lane is not known in this session

        # Cleared: an id of the runner's own again, not the one of before any session.
        assert runner.set_session(None) is True
        await runner.drain()
        (cleared,) = upserts(runs.take())
        assert cleared["fields"]["session_id"] == cleared["key"]  # its own again
        assert cleared["object_key"] not in {record["object_key"], new_record["object_key"]}

    asyncio.run(main())


def test_an_object_lost_before_a_new_session_keeps_its_records_in_the_old_one() -> None:
    """A track that left before the session changed is not moved: what it still sends
    (here its last chance after a refused hand-over) says and is keyed by its session."""

    async def main() -> None:
        runs = Runs()
        runner = runs.runner
        runner.set_session(4242, {"lane": 1})
        refuse = True
        submit = runner._submit

        async def refusing(entries: list[OutboxEntry]) -> None:
            if refuse:
                raise ConnectionError("actions away")
            await submit(entries)

        runner._submit = refusing
        runner.observe(IMAGE, 1e9, 1, [CAR])
        await runner.drain()
        assert runs.take() == [] and runner.submit_errors > 0
        runner.observe(IMAGE, 1e9 + 0.1, 2, [], lost=[3])  # gone, its last chance pending
        runner.set_session("visit-77")
        refuse = False
        await runner.drain()
        records = upserts(runs.take())
        assert records and {r["fields"]["session_id"] for r in records} == {"4242"}
        assert {r["fields"]["lane"] for r in records} == {"1"}
        in_4242 = {"pipeline_id": "det", "pipeline_version": "v1", "camera_id": "cam"}
        keys = {r["object_key"] for r in records}
        assert keys == {object_key({**in_4242, "record_scope": 4242}, 3)}

    asyncio.run(main())


def test_session_templates_are_valid_and_the_name_session_is_reserved() -> None:
    plan_ = plan()
    # {session.lane} waits for no branch: the record needs nothing, the publish its branch.
    assert [sorted(a.needs) for a in plan_.actions] == [[], ["body_cls"]]
    bad = pipeline()
    bad["pipeline"]["branches"][0]["modelId"] = "session"
    with pytest.raises(ValidationError, match="modelId 'session' is reserved"):
        PipelineFile.model_validate(bad)
    unknown = pipeline()
    unknown["pipeline"]["actions"][0]["fields"]["lane"] = "{sesion.lane}"
    with pytest.raises(ValidationError, match=r"template field \{sesion.lane\}"):
        PipelineFile.model_validate(unknown)
    # Client data never names a Redis key or channel (a client would pick any key).
    for action in (
        {"type": "redis_publish", "channel": "lane:{session.lane}", "message": "m"},
        {"type": "redis_save_image", "key": "crops:{session.lane}.jpg"},
    ):
        hostile = pipeline()
        hostile["pipeline"]["actions"].append(action)
        with pytest.raises(ValidationError, match="a client sets"):
            PipelineFile.model_validate(hostile)


def test_session_values_render_as_text_and_json() -> None:
    from graph.pipeline.templates import render

    data = {"n": 2, "ok": True, "tags": ["a", "b"], "who": {"name": "Ann"}}
    got = render("{session.n} {session.ok} {session.tags} {session.who}", {}, {"session": data})
    assert got == '2 true ["a","b"] {"name":"Ann"}'


def test_a_seed_create_takes_the_key_of_its_tables_update() -> None:
    """The seeds' archives name no key on the create: it takes the update's (the
    `session_id` column, `{session_id}` by default), so the update finds its row."""
    seed = pipeline()
    root = seed["pipeline"]
    del root["actions"][0]["key_field"], root["actions"][0]["key_value"]
    root["parallelActions"].append(
        {
            "type": "postgresql_update_combined",
            "table": "visits",
            "key_field": "session_id",
            "waitForBranches": ["body_cls"],
            "fields": {"body": "{body_cls.label}"},
        }
    )
    plan_ = PipelinePlan.of(PipelineFile.model_validate(seed), "v1")
    keys = [(p.action.type, p.key_field, p.key_value) for p in plan_.actions]
    assert keys == [
        ("postgresql_create_record", "session_id", "{session_id}"),
        ("redis_publish", None, None),
        ("postgresql_update_combined", "session_id", "{session_id}"),
    ]
