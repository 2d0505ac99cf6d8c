"""The detectors' autoscaling policy (pure: the Serve controller imports it by path,
`graph.scaling:frames_policy`, from `autoscaling_config.policy` in serve_config.yaml).

Serve's default policy scales on ongoing requests per replica. A camera actor's
dispatcher sends several frames in one request (lossless replays, and every camera
while branch work is starved), so requests undercount the load: 4 cameras waiting on
one replica can be 1 request, not 4. And most of the demand never reaches a replica:
a camera actor holds at most its calls (`calls_in_flight`, or the registry's fair share
of the cluster's calls) × `live_frames_per_call` live frames in the replicas, while the
rest of its cameras wait in their mailboxes for a call.

So the load is counted in frames, from two reports of each replica
(`record_autoscaling_stats`):
- `frames_in_flight`: the frames it holds, queued or running;
- `frames_waiting:<caller>`: what each dispatcher that called it said it still held
  back (every `detect_many` call carries the caller's waiting frames and a sequence
  number, reported as `frames_waiting_seq:<caller>`). A dispatcher's calls go to
  several replicas, so the policy counts each caller once: the report of the replica
  that heard from it last. A caller silent for `WAITING_TTL_S` (a dead actor, a
  replaced dispatcher) is reported as 0 for `WAITING_LINGER_S` more, so that Serve's
  look-back average decays to 0 rather than carrying its last value, and then dropped.
The policy reads `target_ongoing_requests` as frames per replica. Until replicas
report (just started, or an older deployment without the metric) it falls back to
Serve's request count. Serve applies min/max replicas, the scaling factors and the
up/down delays around it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

FRAMES_IN_FLIGHT = "frames_in_flight"
FRAMES_WAITING = "frames_waiting:"  # + the caller's id
FRAMES_WAITING_SEQ = "frames_waiting_seq:"  # + the caller's id: its report's number
WAITING_TTL_S = 30.0  # a caller silent this long (its calls' own timeout) counts 0 ...
WAITING_LINGER_S = 60.0  # ... for this long more (Serve's look-back), then is dropped
MAX_CALLERS = 1024  # callers remembered per replica (the oldest go first)
MAX_WAITING = 100_000  # frames one caller may claim to hold back
_CALLER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def waiting_frames(metrics: Mapping[str, Mapping[Any, float]]) -> float:
    """Frames held back in the callers, summed over callers; each caller once: the
    report of the replica with its latest sequence number (the largest report when
    none has one)."""
    total = 0.0
    for name, by_replica in metrics.items():
        if not name.startswith(FRAMES_WAITING) or not by_replica:
            continue
        seqs = metrics.get(FRAMES_WAITING_SEQ + name[len(FRAMES_WAITING) :], {})
        latest = max(by_replica, key=lambda r: (seqs.get(r, -1.0), by_replica[r]))
        total += by_replica[latest]
    return total


def desired_replicas(
    current: int,
    target_per_replica: float,
    frames_by_replica: Mapping[Any, float] | None,
    total_requests: float,
    waiting: float = 0.0,
) -> float:
    """Replicas for the load: frames held across replicas (their look-back average)
    plus the frames waiting in the callers, over the target per replica; the request
    count when no replica reported frames."""
    if current <= 0 or target_per_replica <= 0:
        return float(current)
    load = sum(frames_by_replica.values()) if frames_by_replica else total_requests
    return (load + waiting) / target_per_replica


def frames_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's policy signature: `AutoscalingContext` in, (replicas, state) out."""
    if ctx.current_num_replicas == 0:  # cold start: Serve's own answer
        return ctx.target_num_replicas, {}
    metrics = ctx.aggregated_metrics or {}
    return (
        desired_replicas(
            ctx.current_num_replicas,
            ctx.config.get_target_ongoing_requests(),
            metrics.get(FRAMES_IN_FLIGHT),
            ctx.total_num_requests,
            waiting_frames(metrics),
        ),
        {},
    )


class FramesInFlight:
    """A replica's load report (what `record_autoscaling_stats` returns): the frames
    it holds (`with frames.hold(n):` around awaiting their results), and what its
    callers last said they hold back (`note_waiting`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.value = 0
        self._clock = clock
        self._waiting: dict[str, tuple[int, int, float]] = {}  # caller → (frames, seq, when)

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.value += n
        try:
            yield
        finally:
            self.value -= n

    def others(self, mine: int) -> int:
        """The frames held here besides `mine` (which the caller holds): what a call's
        answer reports as the replica's backlog (`DetectResult.backlog`). Frames of
        other calls that ran in the same batch count until their calls resume, and
        calls still on their way here do not count."""
        return max(self.value - mine, 0)

    def note_waiting(self, caller: object, waiting: object, seq: object = 0) -> None:
        """A caller's report; one that is not a short id and counts is ignored (it must
        not break the call it came with, nor the metrics' names). Call and `stats` on
        the replica's event loop: the dict is not locked."""
        if not isinstance(caller, str) or not _CALLER.fullmatch(caller):
            return
        if type(waiting) is not int or type(seq) is not int:  # bool is not a count
            return
        self._waiting.pop(caller, None)  # re-inserted last: the dict is oldest first
        self._waiting[caller] = (min(max(waiting, 0), MAX_WAITING), max(seq, 0), self._clock())
        while len(self._waiting) > MAX_CALLERS:
            del self._waiting[next(iter(self._waiting))]

    def stats(self) -> dict[str, float]:
        now = self._clock()
        report = {FRAMES_IN_FLIGHT: float(self.value)}
        for caller, (waiting, seq, at) in list(self._waiting.items()):
            if now - at > WAITING_TTL_S + WAITING_LINGER_S:
                del self._waiting[caller]
                continue
            report[FRAMES_WAITING + caller] = float(waiting if now - at <= WAITING_TTL_S else 0)
            report[FRAMES_WAITING_SEQ + caller] = float(seq)
        return report
