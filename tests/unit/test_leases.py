"""The registry's decisions on WebSocket subscriptions and limits (stream_actors.reconcile),
on explicit times, never the wall clock: a connection's subscriptions end one grace after
it left, a client that comes back within it keeps them (and their stream), persistent and
REST subscriptions never expire, a restart gives a fresh grace; `streams.max_streams`
refuses only a subscription that opens one more stream; and the seed's setting names."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from graph.common.errors import StreamLimitReached
from graph.config import AppConfig
from stream_actors.reconcile import (
    LeaseBook,
    StallMeter,
    actor_payload,
    adds_stream_over_limit,
    stale_session_streams,
)
from stream_actors.settings import StreamSettings
from stream_actors.subscriptions import (
    RegistryState,
    StreamSpec,
    Subscription,
    SubscriptionTable,
    load_state,
    save_state,
    stream_key,
)

GRACE = 30.0
SUB = "display-1;cam-1"


def book() -> LeaseBook:
    return LeaseBook(GRACE)


def camera(sub_id: str = SUB, url: str = "rtsp://10.0.0.1/s", **extra: object) -> Subscription:
    return Subscription.model_validate({"subscriptionIdentifier": sub_id, "rtspUrl": url, **extra})


def test_a_connections_subscription_ends_one_grace_after_it_left() -> None:
    leases = book()
    assert leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=100.0)
    assert leases.release("conn-a", now=110.0) == 1
    assert leases.expire(now=110.0 + GRACE - 0.1) == []
    assert leases.expire(now=110.0 + GRACE) == [SUB]
    assert leases.holds == {}  # forgotten: the registry removes the subscription


def test_a_connection_that_stops_renewing_loses_its_subscriptions_without_a_release() -> None:
    """An ingress replica that crashed runs no close hook: the last renewal's grace ends."""
    leases = book()
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=0.0)
    assert leases.renew("conn-a", now=10.0) == 1
    assert leases.expire(now=10.0 + GRACE - 0.1) == []
    assert leases.expire(now=10.0 + GRACE) == [SUB]


def test_renewals_keep_a_live_connections_subscriptions() -> None:
    leases = book()
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=0.0)
    for t in range(10, 300, 10):  # every grace/3
        assert leases.renew("conn-a", now=float(t)) == 1
        assert leases.expire(now=float(t) + 1) == []
    assert leases.renew("conn-unknown", now=300.0) == 0


def test_a_client_that_resubscribes_within_the_grace_takes_it_over_and_keeps_its_stream() -> None:
    """Given a subscription whose connection closed, when a new connection subscribes the
    same id with the same payload within the grace, then the subscription outlives the
    old connection's grace, and the table asks its stream for no change (same key, not
    stopped): the camera actor keeps the reader running."""
    table, leases = SubscriptionTable(4), book()
    sub = camera()
    table.add(sub)
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=0.0)
    leases.release("conn-a", now=5.0)

    changed, stopped = table.add(sub)  # the same payload again
    assert changed == {stream_key(sub)} and stopped == set()
    assert table.spec(stream_key(sub)) == SubscriptionTable(4, table.state()).spec(stream_key(sub))
    assert leases.subscribed(SUB, "conn-b", persistent=False, known=True, now=20.0)
    assert leases.expire(now=5.0 + GRACE) == []  # conn-a's hold ended, conn-b's did not
    assert set(leases.holds[SUB]) == {"conn-b"}
    assert leases.describe(SUB, now=5.0 + GRACE, wall_now=0.0) == {
        "owner": "connection",
        "connections": 1,
    }
    leases.release("conn-b", now=40.0)
    assert leases.expire(now=40.0 + GRACE) == [SUB]


def test_a_subscription_two_connections_hold_ends_when_both_have_left() -> None:
    """Two connections follow one subscription: one leaving does not end it."""
    leases = book()
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=0.0)
    leases.subscribed(SUB, "conn-b", persistent=False, known=True, now=1.0)
    leases.release("conn-a", now=2.0)
    leases.renew("conn-b", now=25.0)
    assert leases.expire(now=2.0 + GRACE) == []
    leases.release("conn-b", now=40.0)
    assert leases.expire(now=40.0 + GRACE) == [SUB]


def test_persistent_and_rest_subscriptions_never_expire() -> None:
    leases = book()
    assert not leases.subscribed("d;ws", "conn-a", persistent=True, known=False, now=0.0)
    assert not leases.subscribed("d;rest", None, persistent=False, known=False, now=0.0)
    assert leases.release("conn-a", now=1.0) == 0
    assert leases.expire(now=1e9) == []
    assert leases.describe("d;ws", now=0.0, wall_now=0.0) == {"owner": "persistent"}
    assert leases.describe("d;rest", now=0.0, wall_now=0.0) == {"owner": "persistent"}


def test_persistence_sticks_and_a_rest_or_persistent_subscribe_ends_a_lease() -> None:
    """A WebSocket client following a persistent subscription does not make it end at its
    disconnect; a REST subscribe (or `"persistent": true`) of a held one makes it
    persistent."""
    leases = book()
    leases.subscribed(SUB, None, persistent=False, known=False, now=0.0)  # REST
    assert not leases.subscribed(SUB, "conn-a", persistent=False, known=True, now=1.0)
    assert leases.holds == {}

    leases.subscribed("d;x", "conn-a", persistent=False, known=False, now=0.0)
    assert not leases.subscribed("d;x", None, persistent=False, known=True, now=1.0)
    leases.subscribed("d;y", "conn-a", persistent=False, known=False, now=0.0)
    assert not leases.subscribed("d;y", "conn-a", persistent=True, known=True, now=1.0)
    assert leases.expire(now=1e9) == []


def test_an_unsubscribed_subscription_is_forgotten() -> None:
    leases = book()
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=0.0)
    leases.removed(SUB)
    assert leases.renew("conn-a", now=1.0) == 0 and leases.expire(now=1e9) == []


def test_a_released_subscription_says_when_it_ends() -> None:
    leases = book()
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=100.0)
    assert "ends_at" not in leases.describe(SUB, now=100.0, wall_now=1_800_000_000.0)
    leases.release("conn-a", now=110.0)
    shown = leases.describe(SUB, now=120.0, wall_now=1_800_000_000.0)
    assert shown == {
        "owner": "connection",
        "connections": 1,
        "ends_in_s": 20.0,
        "ends_at": "2027-01-15T08:00:20Z",
    }


def test_a_registry_restart_gives_every_held_subscription_a_fresh_grace(tmp_path: Path) -> None:
    """Given holds saved with the desired state on the old process's clock, when the
    registry loads them, then each lasts one full grace from the load, released or not,
    and holds of subscriptions no longer in the state are dropped."""
    path = tmp_path / "streams.json"
    table, leases = SubscriptionTable(4), book()
    for sub_id in (SUB, "display-2;cam-1", "display-3;cam-3"):
        table.add(camera(sub_id))
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=5_000.0)
    leases.subscribed("display-2;cam-1", "conn-b", persistent=False, known=False, now=5_000.0)
    leases.release("conn-b", now=5_001.0)
    leases.subscribed("gone;cam-9", "conn-a", persistent=False, known=False, now=5_000.0)
    save_state(path, table.state().model_copy(update={"leases": leases.holds}))

    state = load_state(path)
    restored = LeaseBook.restored(GRACE, state.leases, SubscriptionTable(4, state).subs, now=3.0)
    assert set(restored.holds) == {SUB, "display-2;cam-1"}  # display-3 is persistent
    assert restored.holds["display-2;cam-1"]["conn-b"].released
    assert restored.expire(now=3.0 + GRACE - 0.1) == []
    assert restored.renew("conn-a", now=20.0) == 1  # the live connection renews as before
    assert restored.expire(now=3.0 + GRACE) == ["display-2;cam-1"]


def test_a_state_saved_before_leases_loads_with_every_subscription_persistent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "streams.json"
    path.write_text(
        RegistryState(subscriptions={SUB: camera()}).model_dump_json(exclude={"leases"})
    )
    state = load_state(path)
    assert state.leases == {} and LeaseBook.restored(GRACE, state.leases, [SUB], 0.0).holds == {}


def test_a_subscribe_that_would_open_a_stream_beyond_the_limit_is_refused() -> None:
    running = {"d;a": "rtsp-a", "d;b": "rtsp-b"}
    assert adds_stream_over_limit(running, "d;c", "rtsp-c", max_streams=2)
    assert not adds_stream_over_limit(running, "d;c", "rtsp-c", max_streams=3)
    assert not adds_stream_over_limit(running, "d;c", "rtsp-c", max_streams=None)
    # a subscription on a running stream, or a takeover, opens nothing: accepted
    assert not adds_stream_over_limit(running, "d;c", "rtsp-a", max_streams=2)
    assert not adds_stream_over_limit(running, "d;a", "rtsp-a", max_streams=1)
    # a subscription that moves to a new stream closes its old one: no more streams
    assert not adds_stream_over_limit(running, "d;a", "rtsp-c", max_streams=2)
    # a limit lowered below what runs refuses only new streams
    assert adds_stream_over_limit(running, "d;c", "rtsp-c", max_streams=1)
    assert not adds_stream_over_limit(running, "d;c", "rtsp-b", max_streams=1)


def test_the_limit_error_names_the_limit_and_survives_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(StreamLimitReached(8)))
    assert error.limit == 8
    assert str(error).startswith("stream limit reached: at most 8 camera streams")
    assert "streams.max_streams" in str(error)


def test_a_camera_actor_gets_the_default_fps_and_not_what_only_the_registry_reads() -> None:
    sent = actor_payload(camera(persistent=True), default_fps=5.0)
    assert sent["targetFps"] == 5.0 and "persistent" not in sent
    assert actor_payload(camera(targetFps=2), default_fps=5.0)["targetFps"] == 2
    assert actor_payload(camera(), default_fps=None)["targetFps"] is None
    # the same subscription, persistent or not, is the same for the camera actor: a
    # takeover that changes `persistent` restarts nothing there
    assert Subscription.model_validate(
        actor_payload(camera(persistent=True), None)
    ) == Subscription.model_validate(actor_payload(camera(), None))


def test_stream_settings_take_the_seeds_names() -> None:
    settings = StreamSettings.model_validate(
        {"max_streams": 8, "target_fps": 5, "reconnect_interval_sec": 2, "disconnect_grace_s": 3}
    )
    assert settings.max_streams == 8 and settings.target_fps == 5.0
    assert settings.reader.backoff_base_s == 2.0 and settings.disconnect_grace_s == 3.0
    assert StreamSettings().disconnect_grace_s == 30.0 and StreamSettings().max_streams is None
    same = {"reconnect_interval_sec": 2, "reader": {"backoff_base_s": 2, "watchdog_s": 7}}
    kept = StreamSettings.model_validate(same)
    assert kept.reader.backoff_base_s == 2.0 and kept.reader.watchdog_s == 7.0
    config = AppConfig.model_validate(
        {"models": [{"id": "m", "path": "m.onnx"}], "streams": {"reconnect_interval_sec": 1}}
    )
    assert config.resolved_streams().reader.backoff_base_s == 1.0


@pytest.mark.parametrize(
    "streams, problem",
    [
        ({"reconnect_interval_sec": 2, "reader": {"backoff_base_s": 1}}, "give one"),
        ({"reconnect_interval_sec": 20}, "raise the cap"),
        ({"reconnect_interval_sec": 0}, "greater than 0"),
        ({"max_streams": 0}, "greater than or equal to 1"),
        ({"target_fps": 500}, "less than or equal to 120"),
        ({"disconnect_grace_s": 0}, "greater than or equal to 1"),
        (
            {"dispatch": {"overloaded_wait_s": 5}, "processing": {"detect_timeout_s": 5}},
            "overloaded_wait_s .* must be below",
        ),
    ],
)
def test_bad_stream_settings_are_refused_with_what_is_wrong(
    streams: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        StreamSettings.model_validate(streams)


def test_a_renewal_arriving_after_the_release_does_not_undo_it() -> None:
    """The session's last renewal can still be on its way when it releases: the release
    stands (the subscription ends one grace after it, and GET /streams says when)."""
    leases = book()
    leases.subscribed("d;c", "conn-1", persistent=False, known=False, now=0.0)
    assert leases.release("conn-1", now=1.0) == 1
    assert leases.renew("conn-1", now=2.0) == 0
    assert leases.describe("d;c", now=2.0, wall_now=0.0)["ends_in_s"] == GRACE - 1.0
    assert leases.expire(1.0 + GRACE) == ["d;c"]


def test_holds_last_longer_by_the_time_the_registry_could_not_run() -> None:
    """A registry stalled for 5 s (a starved process) heard no renewal or re-subscribe
    meanwhile: every hold, released ones included, lasts 5 s longer."""
    leases = book()
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=0.0)
    leases.subscribed("display-2;cam-1", "conn-b", persistent=False, known=False, now=0.0)
    leases.release("conn-b", now=1.0)
    leases.extend(5.0)
    assert leases.expire(now=GRACE + 4.9) == []
    assert leases.expire(now=GRACE + 5.0) == [SUB]
    assert leases.expire(now=1.0 + GRACE + 4.9) == []
    assert leases.expire(now=1.0 + GRACE + 5.0) == ["display-2;cam-1"]


def test_stalls_extend_a_hold_by_one_grace_at_most_and_a_renewal_resets_that() -> None:
    """A registry that is always late still ends the subscriptions of connections gone:
    a hold gains at most one grace from stalls until its connection renews it."""
    leases = book()
    leases.subscribed(SUB, "conn-a", persistent=False, known=False, now=0.0)
    for _ in range(10):
        leases.extend(GRACE / 4)
    assert leases.expire(now=2 * GRACE - 0.1) == []
    leases.renew("conn-a", now=10.0)
    leases.extend(GRACE * 3)
    assert leases.expire(now=10.0 + 2 * GRACE - 0.1) == []
    assert leases.expire(now=10.0 + 2 * GRACE) == [SUB]


def test_streams_whose_actor_holds_another_session_are_pushed_again() -> None:
    wanted = {"rtsp-a": ["d1;c1"], "rtsp-b": ["d2;c1", "d3;c1"], "rtsp-c": ["d4;c1"]}
    display_of = {"d1;c1": "d1", "d2;c1": "d2", "d3;c1": "d3", "d4;c1": "d4"}
    expected = {"d1": "x", "d2": None, "d3": "y", "d4": None}
    reported = {"d1": "x", "d2": None, "d3": "old", "d4": "evicted"}
    assert stale_session_streams(wanted, display_of, expected, reported) == ["rtsp-b", "rtsp-c"]
    assert stale_session_streams(wanted, display_of, expected, dict(expected)) == []
    # An actor of an older camgraph reports no sessions: left alone.
    assert stale_session_streams(wanted, display_of, expected, None) == []


def test_subscribers_change_only_the_spec_fields_their_streams_kind_reads() -> None:
    """Another subscriber on the same RTSP camera with its own fileLoop, fileRealtime or
    snapshotInterval (or one leaving) leaves the spec as it was: a changed spec reopens
    the camera for everyone on it."""
    table = SubscriptionTable(4)
    table.add(camera("d1;c", url="rtsp://h/cam"))
    (key,) = table.stream_keys()
    alone = table.spec(key)
    table.add(camera("d2;c", url="rtsp://h/cam", fileLoop=False, snapshotInterval=200))
    table.add(camera("d3;c", url="rtsp://h/cam", fileRealtime=False))
    assert table.spec(key) == alone
    assert alone == StreamSpec(key=key, kind="rtsp", url="rtsp://h/cam")
    # What a camera actor compares: the spec after its trip through JSON.
    assert StreamSpec.model_validate(alone.model_dump(mode="json")) == alone


def test_a_stall_is_credited_once_by_whichever_caller_runs_first_after_it() -> None:
    """The watcher probes every 0.25 s and the expiry credits too; after a 4 s freeze
    the first of the two to run credits 3.75 s, the other nothing."""
    meter = StallMeter(0.25, 0.05, now=100.0)
    assert meter.credit(100.25) == 0.0  # on time
    assert meter.credit(100.3) == 0.0  # an expiry between two probes
    assert meter.credit(104.3) == pytest.approx(3.75)
    assert meter.credit(104.31) == 0.0
    assert meter.total_s == pytest.approx(3.75)
