"""The registry's book of display sessions (pure) and its persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_actors.sessions import (
    MAX_DEPTH,
    MAX_SESSION_DATA_BYTES,
    SessionBook,
    SessionDataTooLarge,
    session_digest,
)
from stream_actors.subscriptions import RegistryState, load_state, save_state


def test_set_keeps_data_for_the_same_id_and_another_id_has_its_own() -> None:
    book = SessionBook()
    assert book.set("d1", 4242) is True
    book.patch(4242, {"lane": 2})
    assert book.set("d1", 4242) is False
    assert book.of("d1") == {"id": 4242, "data": {"lane": 2}}
    assert book.set("d1", 77) is True
    assert book.of("d1") == {"id": 77, "data": {}}
    assert book.data == {}  # the data of a session no display has is dropped
    assert book.set("d1", None) is True and book.of("d1") is None
    assert book.set("d1", None) is False


def test_displays_sharing_a_session_share_its_data_and_patches_compare_ids_as_text() -> None:
    book = SessionBook()
    book.set("d1", 7)
    book.patch(7, {"a": 1})
    book.set("d2", "7")  # the same session, named as text
    assert book.of("d2") == {"id": "7", "data": {"a": 1}}
    displays, merged = book.patch("7", {"b": 2, "a": 3})
    assert displays == ["d1", "d2"] and merged == {"a": 3, "b": 2}
    assert book.of("d1") == {"id": 7, "data": merged}
    with pytest.raises(KeyError):
        book.patch(9, {})


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"b": "x" * MAX_SESSION_DATA_BYTES}, "at most"),
        ({"n": float("nan")}, "not plain JSON"),
        ({"n": float("inf")}, "not plain JSON"),
        ({"deep": json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))}, "deeper"),
        ({"deep": json.loads("[" * 500 + "]" * 500)}, "deeper"),  # would break the state file
    ],
)
def test_data_that_cannot_be_a_sessions_data_is_refused_and_changes_nothing(
    data: dict[str, object], why: str, tmp_path: Path
) -> None:
    book = SessionBook()
    book.set("d1", 1)
    book.patch(1, {"a": "kept"})
    with pytest.raises(SessionDataTooLarge) as refused:
        book.patch(1, data)
    assert why in refused.value.message
    assert book.of("d1") == {"id": 1, "data": {"a": "kept"}}
    save_state(tmp_path / "s.json", RegistryState(sessions=book.state()))  # still saveable


def test_beyond_the_cap_a_display_without_subscriptions_goes_first() -> None:
    book = SessionBook(max_sessions=2)
    book.set("d1", "D1")
    book.set("d2", "D2")
    book.set("d3", "D3", subscribed={"d1"})
    assert list(book.displays) == ["d1", "d3"]  # d2 had no subscription
    book.set("d4", "D4", subscribed={"d1", "d3"})
    assert list(book.displays) == ["d3", "d4"]  # all subscribed: the oldest


def test_sessions_survive_a_restart_of_the_registry(tmp_path: Path) -> None:
    book = SessionBook()
    book.set("d1", 4242)
    book.patch(4242, {"lane": 2, "tags": ["a", "b"]})
    book.set("d2", "s-2")
    path = tmp_path / "streams.json"
    save_state(path, RegistryState(sessions=book.state()))
    restored = SessionBook(load_state(path).sessions)
    assert restored.of("d1") == {"id": 4242, "data": {"lane": 2, "tags": ["a", "b"]}}
    assert restored.of("d2") == {"id": "s-2", "data": {}}
    assert list(restored.displays) == ["d1", "d2"]


def test_a_digest_tells_sessions_apart_by_id_type_and_data() -> None:
    digests = {
        session_digest({"id": 1, "data": {}}),
        session_digest({"id": "1", "data": {}}),
        session_digest({"id": 1, "data": {"a": 1}}),
    }
    assert len(digests) == 3 and session_digest(None) is None
