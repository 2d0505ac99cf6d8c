"""The detectors' autoscaling policy (pure: the Serve controller imports it by path,
`graph.scaling:frames_policy`, from `autoscaling_config.policy` in serve_config.yaml).

Serve's default policy scales on ongoing requests per replica. A camera actor's
dispatcher sends several frames in one request (lossless replays, and every camera
while branch work is starved), so requests undercount the load: 4 cameras waiting on
one replica can be 1 request, not 4. And most of the demand never reaches a replica:
a camera actor holds at most `calls_in_flight` × `live_frames_per_call` live frames in
the replicas, while the rest of its cameras wait in their mailboxes for a call.

So the load is counted in frames, from two reports of each replica
(`record_autoscaling_stats`):
- `frames_in_flight`: the frames it holds, queued or running;
- `frames_waiting:<caller>`: what each dispatcher that called it in the last
  `WAITING_TTL_S` said it still held back (every `detect_many` call carries the
  caller's waiting frames). A dispatcher's calls go to several replicas, so the policy
  counts each caller once: its largest report.
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
WAITING_TTL_S = 10.0  # a caller that has not called for this long no longer counts
MAX_CALLERS = 1024  # callers remembered per replica (the oldest go first)
MAX_WAITING = 100_000  # frames one caller may claim to hold back
_CALLER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def waiting_frames(metrics: Mapping[str, Mapping[Any, float]]) -> float:
    """Frames held back in the callers: each caller once (its largest report across
    the replicas it called), summed over callers."""
    return sum(
        max(by_replica.values(), default=0.0)
        for name, by_replica in metrics.items()
        if name.startswith(FRAMES_WAITING)
    )


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
        self._waiting: dict[str, tuple[int, float]] = {}  # caller → (frames, when)

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.value += n
        try:
            yield
        finally:
            self.value -= n

    def note_waiting(self, caller: object, waiting: object) -> None:
        """A caller's report; one that is not a short id and a count is ignored (it
        must not break the call it came with, nor the metric's names)."""
        if not isinstance(caller, str) or not _CALLER.fullmatch(caller):
            return
        if not isinstance(waiting, int) or isinstance(waiting, bool):
            return
        self._waiting.pop(caller, None)  # re-inserted last: the dict is oldest first
        self._waiting[caller] = (min(max(waiting, 0), MAX_WAITING), self._clock())
        while len(self._waiting) > MAX_CALLERS:
            del self._waiting[next(iter(self._waiting))]

    def stats(self) -> dict[str, float]:
        now = self._clock()
        for caller in [c for c, (_, at) in self._waiting.items() if now - at > WAITING_TTL_S]:
            del self._waiting[caller]
        report = {FRAMES_IN_FLIGHT: float(self.value)}
        report.update({FRAMES_WAITING + c: float(n) for c, (n, _) in self._waiting.items()})
        return report
