"""Field templates of actions and idempotency keys."""

import pytest

from graph.pipeline.templates import MissingFieldError, idempotency_key, render


def test_templates_fill_from_context_and_branch_results() -> None:
    context = {"camera_id": "cam-1", "track_id": 7}
    branches = {"car_brand_cls_v1": {"brand": "Toyota"}}
    assert render("{camera_id}/{track_id}: {car_brand_cls_v1.brand}", context, branches) == (
        "cam-1/7: Toyota"
    )
    # Values are inserted as text, never interpreted as templates themselves.
    assert render("{camera_id}", {"camera_id": "{track_id}"}) == "{track_id}"


def test_a_missing_value_is_a_typed_error_naming_it() -> None:
    with pytest.raises(MissingFieldError, match=r"no value for \{plate.label\}"):
        render("{plate.label}", {}, {"plate": {"confidence": 0.9}})
    with pytest.raises(MissingFieldError, match=r"\{track_id\}"):
        render("{track_id}", {"track_id": None})


def test_idempotency_keys_are_stable_and_distinct() -> None:
    assert idempotency_key("v1", "cam", 3, 0) == idempotency_key("v1", "cam", 3, 0)
    assert idempotency_key("v1", "cam", 3, 0) != idempotency_key("v1", "cam", 3, 1)
    assert len(idempotency_key("x")) == 32
