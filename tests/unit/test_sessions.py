"""The registry's book of display sessions (pure) and its persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_actors.sessions import MAX_SESSION_DATA_BYTES, SessionBook, SessionDataTooLarge
from stream_actors.subscriptions import RegistryState, load_state, save_state


def test_set_keeps_data_for_the_same_id_and_starts_empty_for_another() -> None:
    book = SessionBook()
    assert book.set("d1", 4242) is True
    book.patch(4242, {"lane": 2})
    assert book.set("d1", 4242) is False
    assert book.of("d1") == {"id": 4242, "data": {"lane": 2}}
    # "4242" is another id for the display (a number stays a number), data starts over
    assert book.set("d1", "4242") is True
    assert book.of("d1") == {"id": "4242", "data": {}}
    assert book.set("d1", None) is True and book.of("d1") is None
    assert book.set("d1", None) is False


def test_patch_merges_into_every_display_of_the_session_and_refuses_the_unknown() -> None:
    book = SessionBook()
    book.set("d1", 7)
    book.set("d2", 7)
    book.set("d3", 8)
    displays, merged = book.patch("7", {"a": 1})  # compared as text, as the hub does
    assert displays == ["d1", "d2"] and merged == {"a": 1}
    _, merged = book.patch(7, {"b": 2, "a": 3})
    assert merged == {"a": 3, "b": 2} and book.of("d2") == {"id": 7, "data": merged}
    assert book.of("d3") == {"id": 8, "data": {}}
    with pytest.raises(KeyError):
        book.patch(9, {})


def test_data_over_the_cap_is_refused_and_changes_nothing() -> None:
    book = SessionBook()
    book.set("d1", 1)
    book.patch(1, {"a": "x" * (MAX_SESSION_DATA_BYTES // 2)})
    with pytest.raises(SessionDataTooLarge) as refused:
        book.patch(1, {"b": "x" * (MAX_SESSION_DATA_BYTES // 2)})
    assert "at most 65536" in refused.value.message
    assert set(book.of("d1")["data"]) == {"a"}  # type: ignore[index]


def test_the_oldest_display_goes_beyond_the_cap() -> None:
    book = SessionBook(max_sessions=2)
    for display in ("d1", "d2", "d3"):
        book.set(display, display.upper())
    assert list(book.sessions) == ["d2", "d3"]
    book.set("d2", "again")  # set again: newest
    book.set("d4", "D4")
    assert list(book.sessions) == ["d2", "d4"]


def test_sessions_survive_a_restart_of_the_registry(tmp_path: Path) -> None:
    book = SessionBook()
    book.set("d1", 4242)
    book.patch(4242, {"lane": 2, "tags": ["a", "b"]})
    book.set("d2", "s-2")
    path = tmp_path / "streams.json"
    save_state(path, RegistryState(sessions=book.sessions))
    restored = SessionBook(load_state(path).sessions)
    assert restored.of("d1") == {"id": 4242, "data": {"lane": 2, "tags": ["a", "b"]}}
    assert restored.of("d2") == {"id": "s-2", "data": {}}
    assert list(restored.sessions) == ["d1", "d2"]
