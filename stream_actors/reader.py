"""A self-healing stream reader (no Ray): one thread reads a source and fans each frame
out to the latest-frame mailboxes of its subscriptions.

Every failure (open refused, read error, end of a live stream, undecodable snapshot)
becomes a reconnect after a jittered exponential backoff, gated by a per-camera circuit
breaker and a cluster-wide reconnect budget (`acquire_reconnect`, seconds to wait). A
watchdog (`check_watchdog`, called periodically by the owner) catches a source that
stops delivering without failing (a frozen server): it abandons the stuck thread — it
exits on its own once its read times out — and starts a fresh one.

With `max_retries` (`streams.max_retries`, -1: unlimited) a stream whose attempts keep
failing gives up: `failed`, its thread ends, `on_failed` is called once with the error;
only `revive` (a new subscribe) starts it again, with a fresh count.

Every wait and timestamp goes through an injected `Clock`, so tests step a manual one.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from pydantic import Field, field_validator

from graph.common.netpolicy import DEFAULT_DENIED, denied, networks
from graph.common.schemas import StrictModel
from stream_actors.clock import SYSTEM_CLOCK, Clock
from stream_actors.mailbox import DropReason, LatestFrameMailbox
from stream_actors.meter import RateMeter
from stream_actors.reconnect import Backoff, CircuitBreaker, RetryLimit
from stream_actors.sources import (
    CapturedFrame,
    PyAVSource,
    SnapshotSource,
    SourceConnectionError,
    SourceError,
)
from stream_actors.subscriptions import StreamSpec

logger = logging.getLogger("camgraph.streams")


class StreamState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CIRCUIT_OPEN = "circuit_open"
    ENDED = "ended"  # a file played once to its end
    FAILED = "failed"  # gave up: streams.max_retries reconnects failed in a row
    STOPPED = "stopped"


# States in which a stream gives no frames (not counted in the registry's fair shares).
DOWN_STATES = frozenset(
    {StreamState.CIRCUIT_OPEN, StreamState.ENDED, StreamState.FAILED, StreamState.STOPPED}
)


# Shedding is judged after this much of a decode window when the actor is overloaded.
EARLY_SHED_S = 1.0


class ReaderPolicy(StrictModel):
    open_timeout_s: float = Field(3.0, gt=0, le=60)
    read_timeout_s: float = Field(3.0, gt=0, le=60)
    watchdog_s: float = Field(5.0, gt=0, le=600, description="no frame for this long → reconnect")
    backoff_base_s: float = Field(0.5, gt=0, le=60)
    backoff_cap_s: float = Field(10.0, gt=0, le=600)
    breaker_failures: int = Field(5, ge=1, le=1000, description="failures in a row → open")
    breaker_open_s: float = Field(30.0, gt=0, le=3600, description="open circuit cool-down")
    pace_files: bool = Field(True, description="play files at their frame rate")
    adaptive_decode: bool = Field(
        True, description="decode key frames only while no subscriber can use more"
    )
    decode_window_s: float = Field(5.0, gt=0, le=300, description="demand is judged over this")
    shed_decode: bool = Field(
        True,
        description="while the camera actor's branch work is starved, or (for its pipeline "
        "streams) its frames wait for an overloaded detector (dispatch.overloaded_wait_s), "
        "decode key frames only as soon as they supply what the subscribers take",
    )
    denied_networks: tuple[str, ...] = Field(
        DEFAULT_DENIED,
        description="camera URLs (RTSP, snapshots and their redirects) never go there",
    )

    @field_validator("denied_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        networks(value)  # a bad CIDR is a clear error at deploy time
        return value


def open_source(
    spec: StreamSpec,
    policy: ReaderPolicy,
    keyframes_only: Callable[[], bool] | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> Iterator[CapturedFrame]:
    if spec.kind == "rtsp" and (refusal := denied(spec.url, networks(policy.denied_networks))):
        raise SourceConnectionError(spec.url, refusal)  # before any packet goes there
    if spec.kind == "snapshot":
        return SnapshotSource(
            spec.url,
            interval_s=spec.snapshot_interval_s,
            timeout_s=policy.read_timeout_s,
            deny=networks(policy.denied_networks),
            sleep=clock.sleep,
            clock=clock.monotonic,
        ).frames()
    return PyAVSource(
        spec.url,
        open_timeout_s=policy.open_timeout_s,
        read_timeout_s=policy.read_timeout_s,
        pace=spec.kind == "file" and policy.pace_files and not spec.lossless,
        loop=spec.kind == "file" and spec.loop,
        keyframes_only=keyframes_only,
        media_time=spec.lossless,
        sleep=clock.sleep,
        clock=clock.monotonic,
    ).frames()


# A stream's own rate above this is a clock rate (RTSP's 90 kHz time base, a container's
# tick), not its frame rate: offered_fps ignores it.
MAX_NOMINAL_FPS = 60.0


def key_gop(key_times: list[float], now: float, count: int = 8) -> tuple[float, float]:
    """(longest, mean) interval between the last `count` key frames, the longest also
    counting the time since the last one: a GOP is judged by its longest gap, however
    long (an extra I-frame at a scene cut must not pass an 8 s GOP for a short one).
    Infinite with fewer than two key frames, or with no time between them."""
    recent = key_times[-count:]
    if len(recent) < 2 or recent[-1] <= recent[0]:
        return float("inf"), float("inf")
    gaps = [b - a for a, b in itertools.pairwise(recent)]
    return max(*gaps, now - recent[-1]), (recent[-1] - recent[0]) / len(gaps)


class _Baseline(NamedTuple):
    """A subscriber's mailbox counts at a moment (its attach, a window's end)."""

    box: LatestFrameMailbox
    delivered: int
    superseded: int
    at: float


class StreamReader:
    def __init__(
        self,
        spec: StreamSpec,
        policy: ReaderPolicy,
        acquire_reconnect: Callable[[], float] = lambda: 0.0,
        source_factory: Callable[..., Iterator[CapturedFrame]] | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        max_retries: int = -1,
        on_failed: Callable[[str], None] | None = None,
        shedding: Callable[[], bool] | None = None,
    ) -> None:
        """`source_factory` defaults to `open_source` on `clock`; `rng` draws the
        backoff jitter (tests fix it). `on_failed(last_error)` is called on the reader
        thread when the stream gives up (`max_retries`, -1: never). `shedding()`, read
        on the reader thread, says the actor is overloaded (its branch work starved):
        the decoder then goes to key frames as soon as they would supply what the
        subscribers take, and stays there while it lasts."""
        self._shedding = shedding
        self.spec, self.policy = spec, policy
        self._acquire = acquire_reconnect
        self._open = source_factory or functools.partial(open_source, clock=clock)
        self._clock = clock
        self._backoff = Backoff(
            base_s=policy.backoff_base_s,
            cap_s=policy.backoff_cap_s,
            rng=rng if rng is not None else random.Random(),
        )
        self._breaker = CircuitBreaker(
            policy.breaker_failures, policy.breaker_open_s, clock=clock.monotonic
        )
        self._retries = RetryLimit(max_retries)
        self._on_failed = on_failed
        self._lock = threading.Lock()
        self._mailboxes: dict[str, LatestFrameMailbox] = {}
        self._stop = threading.Event()
        self._generation = 0
        self._threads: list[threading.Thread] = []
        self.state = StreamState.CONNECTING
        self.latest: CapturedFrame | None = None
        self.last_error: str | None = None
        self.frames_read = 0
        self.reconnects = 0  # connection attempts after a failure
        self.watchdog_restarts = 0
        self.outages_s: deque[float] = deque(maxlen=32)  # failure → first frame again
        self._down_since: float | None = None
        self._last_frame_mono: float | None = None
        self._reads = RateMeter(clock=clock)
        self._nominal_fps: float | None = None  # the stream's own rate (its container's)
        self._offered_fps: float | None = None  # measured, where it gives none
        self._all_frames_since = clock.monotonic()  # decoding every frame since
        # Adaptive decoding: key frames only while every subscriber takes (far) fewer
        # frames per second than the key frames alone supply.
        self.keyframes_only = False
        self.shed = False  # key frames only because the actor was overloaded
        self.decode_switches = 0
        self._key_times: deque[float] = deque(maxlen=256)
        self._demand_since = clock.monotonic()
        self._taken_before: dict[str, _Baseline] = {}
        self._attached: dict[str, _Baseline] = {}
        self._low_demand_before = False  # the previous window also had low demand
        self._early_checked_at = -float("inf")
        self._early_after = -float("inf")

    # ---- subscriptions -------------------------------------------------------------
    def attach(self, name: str, mailbox: LatestFrameMailbox) -> None:
        with self._lock:
            self._mailboxes[name] = mailbox
            # Its demand counts from here (a new mailbox under an old name, or one that
            # took frames elsewhere, starts afresh), over the key frames from here.
            self._attached[name] = _Baseline(
                mailbox,
                mailbox.delivered,
                mailbox.drops[DropReason.SUPERSEDED],
                self._clock.monotonic(),
            )

    def detach(self, name: str) -> None:
        with self._lock:
            self._mailboxes.pop(name, None)
            self._attached.pop(name, None)

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
        thread = threading.Thread(
            target=self._run, args=(generation,), name=f"reader-{self.spec.key}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._generation += 1
        self.state = StreamState.STOPPED

    def revive(self) -> bool:
        """Start a `failed` stream again with a fresh count (a new subscribe asked for
        it); False, doing nothing, when it is not failed."""
        if self.state is not StreamState.FAILED or self._stop.is_set():
            return False
        self._retries.reset()
        self._breaker.record_success()
        self._backoff.reset()
        self.state = StreamState.CONNECTING
        logger.info("stream %s: started again after it gave up", self.spec.key)
        self.start()
        return True

    def join(self, timeout_s: float) -> bool:
        """Wait for the reader threads to exit; True when none is left."""
        # Real time, whatever the clock: threads exit in real time.
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self.threads_alive() == 0

    def threads_alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def check_watchdog(self, now: float | None = None) -> bool:
        """Restart the reader when a connected source went silent; True if it did."""
        now = self._clock.monotonic() if now is None else now
        last = self._last_frame_mono
        if self.state is not StreamState.CONNECTED or last is None:
            return False
        if now - last <= self.policy.watchdog_s:
            return False
        self.last_error = f"no frame for {now - last:.1f}s (watchdog)"
        logger.warning("stream %s: %s", self.spec.key, self.last_error)
        self.watchdog_restarts += 1
        self._mark_down(now)
        self.state = StreamState.RECONNECTING
        self._last_frame_mono = None
        self.start()  # the new generation makes the stuck thread exit when it wakes
        return True

    # ---- the reader thread ---------------------------------------------------------
    def _current(self, generation: int) -> bool:
        return not self._stop.is_set() and generation == self._generation

    def _wait(self, seconds: float) -> None:
        self._clock.wait(self._stop, max(0.0, seconds))

    def _mark_down(self, now: float) -> None:
        if self._down_since is None:
            self._down_since = now

    def _run(self, generation: int) -> None:
        first = True
        while self._current(generation):
            if not self._breaker.allow():
                self.state = StreamState.CIRCUIT_OPEN
                self._wait(min(1.0, self._breaker.retry_in_s()))
                continue
            wait_s = 0.0 if first else self._acquire()
            if wait_s > 0:  # the cluster-wide reconnect budget is spent for now
                self._wait(min(wait_s, 1.0))
                continue
            if not first:
                self.reconnects += 1
            first = False
            try:
                for captured in self._open(self.spec, self.policy, self._wants_keyframes_only):
                    if not self._current(generation):
                        return
                    self._deliver(captured)
                    if self.spec.lossless:  # every frame: wait until all took this one
                        self._wait_taken(generation)
                if self._current(generation):
                    self.state = StreamState.ENDED  # a file played once
                return
            except SourceError as exc:
                error = str(exc)
            except Exception as exc:  # a bug or an unexpected library error: keep going
                logger.exception("stream %s: unexpected reader error", self.spec.key)
                error = f"{type(exc).__name__}: {exc}"
            if not self._current(generation):
                return
            self.last_error = error
            self._mark_down(self._clock.monotonic())
            self._breaker.record_failure()
            if self._retries.record_failure():
                self._give_up(error)
                return
            self.state = (
                StreamState.RECONNECTING if self._breaker.allow() else StreamState.CIRCUIT_OPEN
            )
            logger.warning("stream %s: %s (state %s)", self.spec.key, error, self.state)
            self._wait(self._backoff.next_delay_s())

    def _give_up(self, error: str) -> None:
        """No more attempts (the thread ends); the owner is told once."""
        self.last_error = self._retries.gave_up(error)
        self.state = StreamState.FAILED
        logger.error("stream %s: %s", self.spec.key, self.last_error)
        if self._on_failed is not None:
            try:
                self._on_failed(self.last_error)
            except Exception:  # the owner's hook must not hide the state
                logger.exception("stream %s: the failure hook failed", self.spec.key)

    def _restart_demand(self, now: float) -> None:
        """A (re)connect: the new connection decodes every frame (`frames` starts a
        source afresh), and demand and the GOP are judged on its frames only, from a new
        window: the takes and key frames before an outage say nothing of it."""
        with self._lock:
            self._taken_before = {
                n: _Baseline(box, box.delivered, box.drops[DropReason.SUPERSEDED], now)
                for n, box in self._mailboxes.items()
            }
        self._demand_since = now
        self._low_demand_before = False
        self._key_times.clear()
        self._all_frames_since = now  # (before the flags: offered_fps reads both)
        self.keyframes_only = self.shed = False

    def _deliver(self, captured: CapturedFrame) -> None:
        now = self._clock.monotonic()
        if captured.source_fps:
            self._nominal_fps = captured.source_fps
        if self.state is not StreamState.CONNECTED:
            self._all_frames_since = now  # (before the state: offered_fps reads both)
            self.state = StreamState.CONNECTED
            self._restart_demand(now)
            self._breaker.record_success()
            self._backoff.reset()
            self._retries.reset()
            if self._down_since is not None:
                self.outages_s.append(now - self._down_since)
                self._down_since = None
        self._last_frame_mono = now
        self._reads.mark(now)
        if captured.key_frame:
            self._key_times.append(now)
        self.frames_read += 1
        self.latest = captured
        with self._lock:
            mailboxes = list(self._mailboxes.values())
        for mailbox in mailboxes:
            mailbox.put(captured, captured.captured_at)  # converted only if taken

    def _wait_taken(self, generation: int) -> None:
        with self._lock:
            mailboxes = list(self._mailboxes.values())
        for mailbox in mailboxes:
            while self._current(generation) and not mailbox.wait_taken(0.5):
                self._last_frame_mono = self._clock.monotonic()  # waiting is not a stall

    def _wants_keyframes_only(self) -> bool:
        """Polled by the source after each frame; re-judges demand once per window, and
        within a window while the actor is overloaded (`_early_shed_check`).

        Key frames only when every subscriber took at most half as many frames as the
        key frames alone would give it; all frames again as soon as a subscriber took
        every key frame it was given (none superseded), i.e. it could use more."""
        if not self.policy.adaptive_decode or self.spec.lossless:
            return False
        now = self._clock.monotonic()
        window = now - self._demand_since
        early = window < self.policy.decode_window_s
        if early and not self._early_shed_check(now, window):
            return self.keyframes_only
        with self._lock:
            boxes = dict(self._mailboxes)
            attached = dict(self._attached)
        counts = {
            n: _Baseline(box, box.delivered, box.drops[DropReason.SUPERSEDED], now)
            for n, box in boxes.items()
        }
        # The last window's count of this very mailbox, else the one at its attach.
        prior = self._taken_before
        before = {
            n: prior[n] if n in prior and prior[n].box is c.box else attached[n]
            for n, c in counts.items()
        }
        taken = {n: c.delivered - before[n].delivered for n, c in counts.items()}
        superseded = {n: c.superseded - before[n].superseded for n, c in counts.items()}
        since = {n: max(self._demand_since, before[n].at) for n in counts}
        key_times = list(self._key_times)
        keys = sum(1 for t in key_times if t >= self._demand_since)
        keys_of = {n: sum(1 for t in key_times if t >= since[n]) for n in counts}
        # The GOP as the recent key frames show it: the longest gap (including the time
        # since the last one), so that one extra I-frame (a scene cut, a file's loop)
        # does not pass a long GOP for a short one; and the mean, for the supply.
        longest, mean = key_gop(key_times, now)
        # Overloaded (the actor's branch work starved, or its pipeline's frames waiting
        # for the detector): decoding frames no subscriber gets takes the CPU the
        # detector and the classifiers lack, so the key frames suffice as soon as they
        # supply what the subscribers took, at once, for as long as it lasts. Within a
        # window (`early`) the check above already found the actor overloaded.
        shedding = early or (
            self.policy.shed_decode and self._shedding is not None and self._shedding()
        )
        # Key frames only (for low demand as for shedding) only where they come often
        # enough: with a long GOP the stream would go quiet past the watchdog (a
        # reconnect per GOP) and every frame would be old.
        # (A stream already on key frames stays up to 0.6 of the watchdog: no flapping
        # on the jitter of a GOP right at the limit.)
        frequent = longest <= self.policy.watchdog_s * (0.6 if self.keyframes_only else 0.5)
        # A subscriber of less than a second, or that has had no key frame yet, is no
        # evidence of low demand nor of what the key frames would supply it.
        young = any(now - since[n] < EARLY_SHED_S or keys_of[n] == 0 for n in counts)
        shedding = shedding and frequent
        if early:
            # Each subscriber over its own span (one attached a moment ago has taken
            # little, which is no sign of low demand): wait until each has a second.
            if young:
                return self.keyframes_only
            supply = {n: (now - since[n]) / mean for n in counts}
            if not (shedding and all(taken[n] <= supply[n] for n in counts)):
                return self.keyframes_only  # the window goes on: judged whole at its end
            want = True
        elif self.keyframes_only:
            self._low_demand_before = False  # after switching back, two windows again
            # Could use more: took every key frame, or nearly all of them (a burst after
            # a network hiccup can supersede one even when the subscriber keeps up).
            more = any(
                taken[n] > 0 and (superseded[n] == 0 or taken[n] >= 0.8 * keys_of[n])
                for n in counts
            )
            want = frequent and (shedding or not more)
        else:
            # Low demand must last two windows in a row: a transient stall (a replica
            # restarting, a neighbour's reconnect storm) must not drop a camera to 1 fps.
            low = keys > 0 and not young and all(taken[n] <= 0.5 * keys_of[n] for n in counts)
            want = frequent and (
                (low and self._low_demand_before)
                or (
                    shedding
                    and keys > 0
                    and not young
                    and all(taken[n] <= keys_of[n] for n in counts)
                )
            )
            self._low_demand_before = low
        self._taken_before, self._demand_since = counts, now
        self.shed = want and shedding  # key frames because of the overload (status)
        if want != self.keyframes_only:
            if not want:  # no early shedding for a window: no flapping every second
                self._early_after = now + self.policy.decode_window_s
                self._all_frames_since = now
            self.keyframes_only = want
            self.decode_switches += 1
            logger.info(
                "stream %s: decoding %s (frames taken per subscriber %s, key frames %d, in %.1fs)",
                self.spec.key,
                ("key frames only" + (" (overloaded)" if self.shed else ""))
                if want
                else "all frames",
                taken,
                keys,
                window,
            )
        return self.keyframes_only

    def _early_shed_check(self, now: float, window: float) -> bool:
        """Whether to judge shedding before the window ends: an overload present at a
        window's start (a site's cameras all starting at once) sheds after a second or
        one GOP, not at the end of a window that decoded every frame. Only towards key
        frames, never within a window of switching back, and at most twice a second
        (the actor's verdict is read from the reader thread)."""
        if self.keyframes_only or not self.policy.shed_decode or self._shedding is None:
            return False
        if window < EARLY_SHED_S or now < self._early_after:  # (window < decode_window_s)
            return False
        if now - self._early_checked_at < EARLY_SHED_S / 2:
            return False
        self._early_checked_at = now
        return self._shedding()

    # ---- reporting -----------------------------------------------------------------
    def fps(self, window_s: float = 5.0) -> float:
        return self._reads.rate(window_s)

    def offered_fps(self, window_s: float = 5.0) -> float | None:
        """The frames/s the source offers (a subscription's weight in the fair shares):
        a snapshot URL's polling rate; else the rate read over the last `window_s`
        once every frame was decoded for two windows (after a connect or the end of
        key-frames-only decoding, whose first frames may wait for a key frame), kept
        while the stream decodes key frames only, so that shedding under overload never
        lowers a camera's weight; at most the stream's own rate (its container's or
        RTSP session's; above `MAX_NOMINAL_FPS` a clock rate, not a frame rate, and
        ignored), which alone counts until a rate was read. None for a lossless replay
        (read only as fast as its frames are taken) or before any."""
        if self.spec.lossless:
            return None
        if self.spec.kind == "snapshot":
            return 1.0 / self.spec.snapshot_interval_s
        now = self._clock.monotonic()
        connected = self.state is StreamState.CONNECTED and not self.keyframes_only
        if connected and now - self._all_frames_since >= 2 * window_s:
            self._offered_fps = round(self.fps(window_s), 3) or self._offered_fps
        nominal = self._nominal_fps
        if nominal is not None and nominal > MAX_NOMINAL_FPS:
            nominal = None
        rates = [r for r in (nominal, self._offered_fps) if r]
        return min(rates) if rates else None

    def status(self) -> dict[str, Any]:
        latest = self.latest
        return {
            "state": str(self.state),
            "last_error": self.last_error,
            "fps_in": round(self.fps(), 2),
            "offered_fps": self.offered_fps(),  # its weight in the fair shares
            "frames_read": self.frames_read,
            "last_frame_age_s": (
                round(self._clock.time() - latest.captured_at, 3) if latest is not None else None
            ),
            "reconnects": self.reconnects,
            "watchdog_restarts": self.watchdog_restarts,
            "circuit": str(self._breaker.state),
            "consecutive_failures": self._breaker.failures,
            "outages_s": [round(s, 3) for s in self.outages_s],
            "reader_threads": self.threads_alive(),
            "decode": "keyframes" if self.keyframes_only else "all",
            "decode_shed": self.shed,
            "decode_switches": self.decode_switches,
        }
