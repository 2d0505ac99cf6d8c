"""The stream registry's decisions on plain data (stream_actors.reconcile): packing,
which actors a repair round calls or skips, and the difference it fixes on each."""

from __future__ import annotations

import subprocess
import sys

from stream_actors.placement import placement_verdict
from stream_actors.reconcile import (
    ActorPlan,
    RoundPlan,
    actor_summary,
    desired_by_actor,
    failure_text,
    first_free_actor,
    plan_actor,
    plan_round,
    round_error,
    stream_state,
    unreachable_status,
)
from stream_actors.subscriptions import Subscription, SubscriptionTable, stream_key


def camera(n: int) -> Subscription:
    return Subscription(subscriptionIdentifier=f"d;c{n}", rtspUrl=f"rtsp://10.0.0.{n}/s")


def test_streams_are_packed_first_fit_streams_per_actor_to_an_actor() -> None:
    assert first_free_actor({}, 2) == 0
    assert first_free_actor({"a": 0, "b": 0}, 2) == 1
    assert first_free_actor({"a": 0, "b": 0, "c": 1, "d": 1}, 2) == 2
    # a slot freed on actor 0 is filled before a new actor is opened
    assert first_free_actor({"a": 0, "c": 1, "d": 1}, 2) == 0

    table = SubscriptionTable(2)
    for n in range(5):
        table.add(camera(n))
    assert [table.placement[stream_key(camera(n))] for n in range(5)] == [0, 0, 1, 1, 2]


def test_the_desired_state_groups_each_actors_streams_with_sorted_subscription_ids() -> None:
    desired = desired_by_actor(
        {"s1": 0, "s2": 1, "s3": 0}, {"s1": ["d2;c", "d1;c"], "s2": ["d;x"], "s3": ["d;y"]}
    )
    assert desired == {0: {"s1": ["d1;c", "d2;c"], "s3": ["d;y"]}, 1: {"s2": ["d;x"]}}


def test_an_actor_without_wanted_streams_is_still_visited_to_stop_what_it_runs() -> None:
    plan = plan_round({2: {"s": ["d;c"]}}, known={0, 2}, unplaced={})
    assert plan == RoundPlan(visit=(0, 2), skipped={})


def test_a_pending_actor_is_skipped_with_its_problem_and_the_others_are_called() -> None:
    """Given actor 0 that Ray cannot place for lack of CPU, the round calls actors 1 and
    2 all the same and names actor 0 with the reason, never a timeout."""
    pending = placement_verdict("PENDING_CREATION", 1.0)
    assert pending.unplaced and not pending.dead
    desired = {0: {"a": ["d;a"]}, 1: {"b": ["d;b"]}, 2: {"c": ["d;c"]}}
    plan = plan_round(desired, known={0, 1, 2}, unplaced={0: pending})
    assert plan.visit == (1, 2)
    assert list(plan.skipped) == [0]
    error = round_error(plan.skipped)
    assert error is not None and error.startswith("actor 0: pending: not enough CPU")


def test_an_actor_ray_has_placed_since_is_called_again() -> None:
    alive = placement_verdict("ALIVE", 1.0)
    assert alive.problem is None and not alive.unplaced
    plan = plan_round({0: {"a": ["d;a"]}}, known={0}, unplaced={0: alive})
    assert plan == RoundPlan(visit=(0,), skipped={})


def test_a_dead_actor_is_forgotten_and_made_anew_only_when_it_has_streams() -> None:
    """Given an actor Ray will not restart: its handle is dropped (no longer known), so
    the next round calls its index again, which creates a new actor; without streams to
    run it is left alone."""
    dead = placement_verdict("DEAD", 0)
    assert dead.dead and not dead.unplaced
    assert dead.problem is not None and dead.problem.startswith("dead")
    assert plan_round({0: {"a": ["d;a"]}}, known=set(), unplaced={}).visit == (0,)
    assert plan_round({}, known=set(), unplaced={}).visit == ()


def test_the_failed_actors_are_named_in_index_order_in_one_error() -> None:
    errors = {
        2: failure_text(None, TimeoutError("no answer")),
        0: failure_text("dead: the camera actor died", RuntimeError("ignored")),
    }
    assert round_error(errors) == (
        "actor 0: dead: the camera actor died; actor 2: TimeoutError: no answer"
    )
    assert round_error({}) is None


def test_the_diff_stops_unwanted_streams_and_pushes_missing_or_changed_ones() -> None:
    wanted = {"a": ["d;1"], "b": ["d;2", "d;3"], "c": ["d;4"]}
    reply = {"streams": {"y": ["d;8"], "a": ["d;1"], "b": ["d;2"], "x": ["d;9"]}, "context": "r1"}
    assert plan_actor(wanted, reply, "r1") == ActorPlan(
        update_context=False, stop=("x", "y"), push=("b", "c")
    )
    in_sync = {"streams": {"a": ["d;1"]}, "context": "r1"}
    assert plan_actor({"a": ["d;1"]}, in_sync, "r1") == ActorPlan(False, (), ())


def test_an_actor_restarted_with_an_old_context_is_updated_and_refilled() -> None:
    reply = {"streams": {}, "context": "r0"}
    plan = plan_actor({"a": ["d;1"], "b": ["d;2"]}, reply, "r1")
    assert plan == ActorPlan(update_context=True, stop=(), push=("a", "b"))


def test_an_older_actors_reply_of_streams_alone_is_read_as_its_streams() -> None:
    reply = {"a": ["d;1"], "gone": ["d;2"]}
    plan = plan_actor({"a": ["d;1"]}, reply, "r1")
    assert plan == ActorPlan(update_context=True, stop=("gone",), push=())


def test_a_failed_actors_streams_are_reported_pending_or_starting_with_its_error() -> None:
    pending = unreachable_status("pending: not enough CPU")
    assert stream_state("s", pending) == {
        "state": "pending",
        "last_error": "pending: not enough CPU",
    }
    failed = unreachable_status(None, TimeoutError("no answer"))
    assert stream_state("s", failed) == {
        "state": "starting",
        "last_error": "TimeoutError: no answer",
    }
    running = {"streams": {"s": {"spec": {"url": "rtsp://x"}, "state": "running", "fps": 9.5}}}
    assert stream_state("s", running) == {"state": "running", "fps": 9.5}


def test_the_decisions_and_the_per_frame_flow_import_no_ray() -> None:
    code = (
        "import sys, stream_actors.reconcile, stream_actors.placement, stream_actors.processor, "
        "stream_actors.settings; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_get_streams_shows_why_an_actor_sheds_its_decoding() -> None:
    """`GET /streams` per actor: branch work starved (`overloaded`) and frames that
    waited long for a detector (`detector_overloaded`), the two causes of shedding;
    what the summary does not name stays out (e.g. the streams, shown per stream)."""
    status = {"pid": 7, "overloaded": False, "detector_overloaded": True, "streams": {}}
    summary = actor_summary(status)
    assert summary["overloaded"] is False and summary["detector_overloaded"] is True
    assert "streams" not in summary
