"""`streams.max_retries` (the seed's config.json key): a stream whose reconnects keep
failing gives up, goes `failed`, spends nothing more, and starts again only when asked
— on a manual clock, no Ray."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from graph.events.model import hub_event, state_event
from stream_actors.clock import ManualClock
from stream_actors.reader import ReaderPolicy, StreamReader, StreamState
from stream_actors.reconnect import RetryLimit
from stream_actors.settings import StreamSettings
from tests.unit.test_streams_core import SPEC, STEPPED, NoJitter, ScriptedSource, wait_for

REFUSED = "rtsp://h/x: refused"  # ScriptedSource's failed open


def reader_on(
    clock: ManualClock, source: ScriptedSource, max_retries: int, policy: ReaderPolicy = STEPPED
) -> tuple[StreamReader, list[str]]:
    told: list[str] = []
    reader = StreamReader(
        SPEC,
        policy,
        source_factory=source,
        clock=clock,
        rng=NoJitter(),
        max_retries=max_retries,
        on_failed=told.append,
    )
    return reader, told


def gone(reader: StreamReader) -> bool:
    return reader.state is StreamState.FAILED and reader.threads_alive() == 0


def test_the_retry_limit_counts_failed_attempts_in_a_row() -> None:
    limit = RetryLimit(2)
    assert [limit.record_failure() for _ in range(3)] == [False, False, True]
    assert limit.gave_up("boom") == (
        "gave up after 3 failed attempts in a row (streams.max_retries: 2): boom"
    )
    limit.reset()
    assert limit.failures == 0 and not limit.record_failure()
    once = RetryLimit(0)
    assert once.record_failure()
    assert once.gave_up("x") == (
        "gave up after 1 failed attempt in a row (streams.max_retries: 0): x"
    )
    unlimited = RetryLimit(-1)
    assert not any(unlimited.record_failure() for _ in range(10_000))


def test_a_stream_gives_up_after_max_retries_failed_reconnects_and_tries_no_more() -> None:
    """Given max_retries 2 and a camera that always refuses: the first open and its two
    retries fail (backoff 0.5 s, 1 s), then the stream is `failed`, its thread is gone,
    its owner was told once, and an hour later nothing more was tried."""
    clock = ManualClock()
    source = ScriptedSource([], clock)
    reader, told = reader_on(clock, source, max_retries=2)
    reader.start()
    try:
        clock.run_until(1.0)  # failed at 0 and 0.5 s; the next attempt is due at 1.5 s
        assert reader.state is StreamState.RECONNECTING and source.opens == 2
        clock.advance(0.5)
        wait_for(lambda: gone(reader))
        expected = f"gave up after 3 failed attempts in a row (streams.max_retries: 2): {REFUSED}"
        assert reader.last_error == expected and told == [expected]
        assert (source.opens, reader.reconnects) == (3, 2)
        assert clock.sleeps == [0.5, 1.0]  # no wait after the last failure
        status = reader.status()
        assert status["state"] == "failed" and status["last_error"] == expected
        assert status["reader_threads"] == 0
        clock.advance(3600.0)  # past every backoff and circuit cool-down
        time.sleep(0.05)
        assert source.opens == 3 and clock.asleep() == 0 and clock.sleeps == [0.5, 1.0]
        assert reader.state is StreamState.FAILED and told == [expected]
        assert not reader.check_watchdog()
    finally:
        reader.stop()
    assert reader.join(2)


def test_a_frame_between_failures_starts_the_count_again() -> None:
    """Given max_retries 2: two refusals, then one frame before the stream breaks (the
    frame resets the count), then two refusals more: still reconnecting with four
    failures behind it; the next refusal is the third in a row since the frame."""
    clock = ManualClock()
    source = ScriptedSource(["fail", "fail", 1], clock)  # then refusals
    reader, told = reader_on(clock, source, max_retries=2)
    reader.start()
    try:
        # Refused at 0 and 0.5 s; at 1.5 s one frame, then the end (failure 1 again);
        # refused at 2 s (2); the next attempt is due at 3 s.
        clock.run_until(2.5)
        assert reader.state is StreamState.RECONNECTING and told == []
        assert (source.opens, reader.frames_read) == (4, 1)
        assert reader.status()["consecutive_failures"] == 2
        clock.advance(0.5)
        wait_for(lambda: gone(reader))
        assert reader.last_error == (
            f"gave up after 3 failed attempts in a row (streams.max_retries: 2): {REFUSED}"
        )
        assert source.opens == 5 and told == [reader.last_error]
        assert clock.sleeps == [0.5, 1.0, 0.5, 1.0]  # the frame reset the backoff too
    finally:
        reader.stop()
    assert reader.join(2)


def test_minus_one_never_gives_up() -> None:
    """Given max_retries -1 (the default) and a camera that always refuses: after 64
    retries in a second it is still reconnecting."""
    clock = ManualClock()
    fast = ReaderPolicy(backoff_base_s=1 / 64, backoff_cap_s=1 / 64, breaker_failures=1000)
    source = ScriptedSource([], clock)
    reader = StreamReader(SPEC, fast, source_factory=source, clock=clock, rng=NoJitter())
    reader.start()
    try:
        clock.run_until(1.0)
        assert (source.opens, reader.reconnects) == (65, 64)
        assert reader.state is StreamState.RECONNECTING and reader.threads_alive() == 1
        assert reader.last_error == REFUSED
    finally:
        reader.stop()
    assert reader.join(2)


def test_max_retries_zero_gives_up_at_the_first_failure_and_revive_starts_afresh() -> None:
    """Given max_retries 0: the first refusal ends it (no backoff). `revive` (what a new
    subscribe does) starts a thread with a fresh count: it connects; reviving a stream
    that is not failed does nothing."""
    clock = ManualClock()
    source = ScriptedSource(["fail", "hang"], clock)
    reader, told = reader_on(clock, source, max_retries=0)
    assert not reader.revive()  # not started, not failed
    reader.start()
    try:
        wait_for(lambda: gone(reader))
        assert reader.last_error == (
            f"gave up after 1 failed attempt in a row (streams.max_retries: 0): {REFUSED}"
        )
        assert clock.sleeps == [] and source.opens == 1 and len(told) == 1
        assert reader.revive()
        wait_for(lambda: reader.frames_read == 1)
        assert reader.state is StreamState.CONNECTED and source.opens == 2
        status = reader.status()
        assert status["consecutive_failures"] == 0 and status["circuit"] == "closed"
        assert not reader.revive() and reader.threads_alive() == 1
    finally:
        reader.stop()
        for hang in source.hangs:
            hang.set()
    assert reader.join(2)
    assert not reader.revive()  # stopped: never restarted


def test_a_state_event_carries_the_state_and_the_error_to_every_transport() -> None:
    event = hub_event(state_event("d;cam-1", "cam-1", "demo", "failed", "gave up"))
    assert event["type"] == "state" and event["topic"] == "sub:d;cam-1"
    data = event["data"]
    assert (data["state"], data["last_error"], data["frame_seq"]) == ("failed", "gave up", -1)


@pytest.mark.parametrize(("given", "ok"), [(-1, True), (0, True), (5, True), (-2, False)])
def test_max_retries_is_minus_one_or_more(given: int, ok: bool) -> None:
    assert StreamSettings().max_retries == -1
    if ok:
        assert StreamSettings(max_retries=given).max_retries == given
    else:
        with pytest.raises(ValidationError, match="max_retries"):
            StreamSettings(max_retries=given)
