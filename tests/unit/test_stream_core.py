"""Pure stream logic: mailbox, reconnect policy, stability (no Ray, no sockets)."""

import random
import threading

import numpy as np
import pytest

from graph.common.vision import Box
from stream_actors.clock import ManualClock
from stream_actors.mailbox import DropReason, LatestFrameMailbox
from stream_actors.meter import RateMeter
from stream_actors.reconnect import Backoff, BreakerState, CircuitBreaker, TokenBucket
from stream_actors.stability import Observation, StabilityRules, StabilityValidator

IMG = np.zeros((2, 2, 3), np.uint8)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_mailbox_keeps_only_the_newest_and_counts_every_superseded_frame() -> None:
    box = LatestFrameMailbox()
    for _ in range(5):
        box.put(IMG)
    frame = box.take()
    assert frame is not None and frame.seq == 5
    assert box.take() is None
    stats = box.stats()
    assert stats["received"] == 5 and stats["delivered"] == 1
    assert stats["drops"]["superseded"] == 4
    box.record_drop(DropReason.BACK_PRESSURE)
    assert box.stats()["drops"]["back_pressure"] == 1


def test_mailbox_drops_frames_older_than_the_limit() -> None:
    clock = ManualClock()
    box = LatestFrameMailbox(max_age_s=0.5, clock=clock)
    box.put(IMG)
    clock.advance(0.5)
    frame = box.take()  # exactly as old as the limit: still fresh
    assert frame is not None and frame.captured_mono == 0.0
    assert frame.captured_at == clock.time() - 0.5  # stamped by the same clock
    box.put(IMG)
    clock.advance(0.625)
    assert box.take() is None
    stats = box.stats()
    assert stats["drops"]["too_old"] == 1 and stats["delivered"] == 1


def test_mailbox_timing_is_the_frames_age_and_the_sources_interval() -> None:
    """The waiting frame's age and number and the source's frame interval (the median of
    its recent ones, so one stall does not skew it); None without a frame or an
    interval."""
    clock = ManualClock()
    box = LatestFrameMailbox(clock=clock)
    assert box.timing() is None
    box.put(IMG)
    assert box.timing() is None  # one frame: no interval yet
    for _ in range(5):
        clock.advance(0.1)
        box.put(IMG)
    clock.advance(0.025)
    timing = box.timing()
    assert timing is not None and timing.seq == 6
    assert (timing.age_s, timing.interval_s) == pytest.approx((0.025, 0.1))
    clock.advance(3.0)  # a stall: one long interval among short ones
    box.put(IMG)
    clock.advance(0.05)
    timing = box.timing()
    assert timing is not None and timing.seq == 7  # a new frame: a new number
    assert (timing.age_s, timing.interval_s) == pytest.approx((0.05, 0.1))
    assert box.take() is not None
    assert box.timing() is None  # nothing waits


def test_the_rate_meter_counts_its_window_and_its_own_age_on_its_clock() -> None:
    clock = ManualClock()
    meter = RateMeter(clock=clock)
    for _ in range(4):
        clock.advance(0.25)
        meter.mark()
    assert meter.rate(5.0) == 4.0  # 4 events in its first second: not 4 in 5 s
    clock.advance(4.0)
    assert meter.rate(5.0) == 0.8
    clock.advance(0.5)
    assert meter.rate(5.0) == 0.6  # the mark at 0.25 s left the window
    meter.mark(now=1.0)  # an event stamped by its caller
    assert meter.rate(5.0) == 0.8


def test_mailbox_take_wakes_when_a_frame_arrives_from_another_thread() -> None:
    box = LatestFrameMailbox()
    threading.Timer(0.05, lambda: box.put(IMG)).start()
    frame = box.take(timeout_s=5)
    assert frame is not None and frame.seq == 1
    assert box.take(timeout_s=0.01) is None


def test_every_frame_is_accounted_under_a_concurrent_producer() -> None:
    box = LatestFrameMailbox()
    done = threading.Event()

    def produce() -> None:
        for _ in range(2000):
            box.put(IMG)
        done.set()

    threading.Thread(target=produce).start()
    taken = 0
    while not done.is_set() or box.stats()["pending"]:
        if box.take(timeout_s=0.001) is not None:
            taken += 1
    stats = box.stats()
    assert stats["received"] == 2000
    assert taken + stats["drops"]["superseded"] == 2000


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    b = Backoff(base_s=1, factor=2, cap_s=10, jitter=0.5, rng=random.Random(0))
    delays = [b.next_delay_s() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 10, 10, 10, 10]
    assert all(c * 0.5 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered: no two cameras retry in lockstep
    b.reset()
    assert b.next_delay_s() <= 1


def test_breaker_opens_after_failures_then_allows_one_trial() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=3, open_s=30, clock=clock)
    for _ in range(2):
        br.record_failure()
    assert br.state is BreakerState.CLOSED and br.allow()
    br.record_failure()
    assert br.state is BreakerState.OPEN and not br.allow()
    assert br.retry_in_s() == pytest.approx(30)
    clock.now += 30
    assert br.state is BreakerState.HALF_OPEN and br.allow()
    br.record_failure()  # the trial failed: open again for a full period
    assert br.state is BreakerState.OPEN
    clock.now += 30
    br.record_success()
    assert br.state is BreakerState.CLOSED and br.failures == 0


def test_token_bucket_caps_the_rate_and_says_how_long_to_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=5, burst=3, clock=clock)
    assert [bucket.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_acquire() == pytest.approx(0.2)
    clock.now += 1.0
    granted = sum(bucket.try_acquire() == 0.0 for _ in range(10))
    assert granted == 3  # refills at 5/s but never above the burst
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def obs(track: int, x: float, conf: float = 0.9, w: float = 100, h: float = 50) -> Observation:
    return Observation(track, 0, (x, 10, x + w, 10 + h), conf)


def test_track_becomes_stable_after_n_good_hits_and_is_lost_after_m_misses() -> None:
    v = StabilityValidator(StabilityRules(min_hits=3, max_misses=2))
    assert v.update([obs(1, 0)], 1) == []
    assert v.update([obs(1, 5)], 2) == []
    events = v.update([obs(1, 10)], 3)
    assert [(e.kind, e.track_id) for e in events] == [("new", 1)]
    assert v.update([obs(1, 15)], 4) == []  # same view: no update event
    assert v.update([], 5) == []
    events = v.update([], 6)
    assert [(e.kind, e.track_id, e.frame_seq) for e in events] == [("lost", 1, 6)]
    assert v.stable_ids() == set()


def test_low_confidence_and_size_jumps_reset_the_run() -> None:
    v = StabilityValidator(StabilityRules(min_hits=3, min_confidence=0.5, max_size_jitter=0.2))
    seq = [obs(1, 0), obs(1, 1, conf=0.3), obs(1, 2), obs(1, 3, w=200), obs(1, 4, w=200)]
    assert all(v.update([o], i) == [] for i, o in enumerate(seq))
    assert [e.kind for e in v.update([obs(1, 5, w=205)], 9)] == ["new"]


def test_a_size_cut_by_the_images_edge_may_change_up_to_four_times_the_jitter() -> None:
    """A vehicle entering at the left edge grows 60 % wider between hits a second apart:
    with the image's bounds its width may change by up to 4 x max_size_jitter while a
    box touches that edge (a jump beyond that still restarts the run), its height is
    judged as before, and so is a box clear of every edge (also against bounds offset
    by a region of interest)."""
    frame = (0.0, 0.0, 1280.0, 720.0)

    def entering(v: StabilityValidator, bounds: Box | None, x0: float = 0) -> list:
        kinds = []
        for i, w in enumerate((50, 80, 128)):  # cut at x0: only its width grows
            box = (x0, 100.0, x0 + w, 160.0)
            kinds += [e.kind for e in v.update([Observation(1, 0, box, 0.9)], i, bounds=bounds)]
        return kinds

    rules = StabilityRules(min_hits=3, max_size_jitter=0.25)
    assert entering(StabilityValidator(rules), frame) == ["new"]
    assert entering(StabilityValidator(rules), None) == []  # without bounds: judged
    roi = (200.0, 50.0, 900.0, 650.0)  # the detector saw this region only
    assert entering(StabilityValidator(rules), roi, x0=200) == ["new"]
    assert entering(StabilityValidator(rules), frame, x0=200) == []  # not the frame's edge
    v = StabilityValidator(rules)  # clear of the edges: a width jump resets the run
    for i, w in enumerate((50, 80, 128)):
        assert v.update([Observation(1, 0, (400, 100, 400 + w, 160), 0.9)], i, bounds=frame) == []
    v = StabilityValidator(rules)  # cut left and right: the height is still judged
    for i, h in enumerate((60, 100, 160)):
        assert v.update([Observation(1, 0, (0, 100, 1280, 100 + h), 0.9)], i, bounds=frame) == []
    v = StabilityValidator(rules)  # cut on one side in the first hit only
    assert v.update([Observation(1, 0, (1250, 100, 1280, 160), 0.9)], 0, bounds=frame) == []
    assert v.update([Observation(1, 0, (1215, 100, 1270, 160), 0.9)], 1, bounds=frame) == []
    kinds = [
        e.kind for e in v.update([Observation(1, 0, (1110, 100, 1170, 160), 0.9)], 2, bounds=frame)
    ]
    assert kinds == ["new"]  # 30 → 55 (83 %) at the edge, 55 → 60 clear of it
    v = StabilityValidator(rules)  # at the edge, 20 → 80 wide (300 %): a new run
    for i, w in enumerate((20, 80, 100)):
        assert v.update([Observation(1, 0, (0, 100, w, 160), 0.9)], i, bounds=frame) == []
    v = StabilityValidator(rules)  # in a corner both sizes may grow 60 %, not 300 %
    kinds = []
    for i, s in enumerate((1.0, 1.6, 2.56)):
        box = (0.0, 0.0, 50 * s, 40 * s)
        kinds += [e.kind for e in v.update([Observation(1, 0, box, 0.9)], i, bounds=frame)]
    assert kinds == ["new"]
    v = StabilityValidator(rules)
    for i, h in enumerate((40, 160, 200)):
        assert v.update([Observation(1, 0, (0, 0, 50, h), 0.9)], i, bounds=frame) == []
    v = StabilityValidator(rules)  # leaving at the right: cut in the later hits only
    kinds = []
    for i, x1 in enumerate((1150, 1230, 1250)):
        box = (x1, 100, min(x1 + 80, 1280), 160)
        kinds += [e.kind for e in v.update([Observation(1, 0, box, 0.9)], i, bounds=frame)]
    assert kinds == ["new"]


def test_a_clearly_better_view_emits_updated_and_unstable_tracks_vanish_silently() -> None:
    v = StabilityValidator(StabilityRules(min_hits=1, max_misses=1))
    assert [e.kind for e in v.update([obs(1, 0, conf=0.6), obs(2, 300, conf=0.2)], 1)] == ["new"]
    assert v.update([obs(1, 1, conf=0.62)], 2) == []
    assert [e.kind for e in v.update([obs(1, 2, conf=0.7)], 3)] == ["updated"]
    assert [e.kind for e in v.update([obs(1, 3, conf=0.7, w=130, h=60)], 4)] == ["updated"]
    assert [e.kind for e in v.update([], 5)] == ["lost"]  # track 2 never stable: no event


def test_at_low_frame_rates_two_hits_min_stable_s_apart_make_a_track_stable() -> None:
    """At 1 frame/s, min_hits 3 takes 3 s: two qualifying hits in a row at least
    `min_stable_s` apart (capture times) suffice. At 2 and 10 frames/s min_hits still
    decides; a hit that does not qualify, or a miss, restarts the span; with the rule
    off, or without capture times, only min_hits counts."""

    def kinds(v: StabilityValidator, o: list[Observation], seq: int, at: float | None) -> list:
        return [e.kind for e in v.update(o, seq, at)]

    v = StabilityValidator(StabilityRules(min_hits=3, min_stable_s=0.8))
    assert kinds(v, [obs(1, 0)], 1, 100.0) == []
    assert kinds(v, [obs(1, 5)], 2, 101.0) == ["new"]
    for step in (0.1, 0.5):  # 10 and 2 frames/s: the third hit
        v = StabilityValidator(StabilityRules(min_hits=3, min_stable_s=0.8))
        assert kinds(v, [obs(2, 0)], 1, 0.0) == [] and kinds(v, [obs(2, 1)], 2, step) == []
        assert kinds(v, [obs(2, 2)], 3, 2 * step) == ["new"]
    v = StabilityValidator(StabilityRules(min_hits=3, min_stable_s=0.8))
    assert kinds(v, [obs(3, 0)], 1, 0.0) == []
    assert kinds(v, [obs(3, 1, conf=0.3)], 2, 1.0) == []  # does not qualify: run 0
    assert kinds(v, [obs(3, 2)], 3, 2.0) == []  # a new run from 2.0 s
    assert kinds(v, [], 4, 3.0) == []  # a miss: run 0
    assert kinds(v, [obs(3, 3)], 5, 4.0) == []  # a new run from 4.0 s
    assert kinds(v, [obs(3, 4)], 6, 5.0) == ["new"]
    v = StabilityValidator(StabilityRules(min_hits=3, min_stable_s=0.8))
    assert kinds(v, [obs(5, 0)], 1, 0.0) == []
    assert kinds(v, [], 2, 0.5) == []  # a miss: the run and its span start again
    assert kinds(v, [obs(5, 1)], 3, 1.0) == [] and kinds(v, [obs(5, 2)], 4, 1.5) == []
    assert kinds(v, [obs(5, 3)], 5, 2.0) == ["new"]  # the third hit (min_hits)
    v = StabilityValidator(StabilityRules(min_hits=4, min_stable_s=0.8))
    assert kinds(v, [obs(6, 0)], 1, 0.0) == []
    assert kinds(v, [obs(6, 1, w=200)], 2, 1.0) == []  # a size jump: a new run from 1.0
    assert kinds(v, [obs(6, 2, w=200)], 3, 1.5) == []  # 0.5 s: not yet
    assert kinds(v, [obs(6, 3, w=200)], 4, 1.9) == ["new"]  # 0.9 s (3 hits of 4)
    v = StabilityValidator(StabilityRules(min_hits=5, min_stable_s=0.8))
    assert kinds(v, [obs(7, 0)], 1, 0.0) == []
    assert kinds(v, [obs(7, 1)], 2, 5.0) == []  # a 5 s gap (> 4 × 0.8): no evidence
    assert kinds(v, [obs(7, 2)], 3, 5.5) == []
    assert kinds(v, [obs(7, 3)], 4, 5.9) == ["new"]  # 0.9 s after the gap (4 hits of 5)
    for rules, times in (
        (StabilityRules(min_hits=3, min_stable_s=None), True),
        (StabilityRules(min_hits=3), False),
    ):
        v = StabilityValidator(rules)
        assert kinds(v, [obs(4, 0)], 1, 0.0 if times else None) == []
        assert kinds(v, [obs(4, 1)], 2, 5.0 if times else None) == []
        assert kinds(v, [obs(4, 2)], 3, 10.0 if times else None) == ["new"]
