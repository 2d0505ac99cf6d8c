"""The context the registry saved for its own restart (streams.context.pickle): read
back, or ignored with a log line when missing or unreadable (no Ray started)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import ray

from stream_actors.registry import context_path, load_context
from stream_actors.settings import StreamContext, StreamSettings


def context(app: str) -> StreamContext:
    return StreamContext(
        app, "camgraph", "demo", {"demo": 640}, {"demo": "Detector_demo"}, StreamSettings()
    )


def test_the_context_sits_next_to_the_state_file() -> None:
    assert context_path(Path("data/streams.json")) == Path("data/streams.context.pickle")


def test_a_saved_context_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "streams.context.pickle"
    path.write_bytes(ray.cloudpickle.dumps(context("saved")))
    assert load_context(path, context("first")) == context("saved")
    assert load_context(tmp_path / "missing.pickle", context("first")) == context("first")


def test_a_context_saved_by_an_older_layout_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a file whose pickle names the class where it used to live
    (stream_actors.actors.StreamContext), the registry starts from its first context."""
    path = tmp_path / "streams.context.pickle"
    path.write_bytes(b"\x80\x04cstream_actors.actors\nStreamContext\n.")
    with caplog.at_level(logging.ERROR, logger="camgraph.streams"):
        assert load_context(path, context("first")) == context("first")
    assert "is unreadable" in caplog.text
