"""The detectors' autoscaling policy (pure: the Serve controller imports it by path,
`graph.scaling:frames_policy`, from `autoscaling_config.policy` in serve_config.yaml).

Serve's default policy scales on ongoing requests per replica. A camera actor's
dispatcher sends several frames in one request (lossless replays, and every camera
while branch work is starved), so requests undercount the load: 4 cameras waiting on
one replica can be 1 request, not 4. The frames that wait in the camera actors'
mailboxes are not in this signal: a camera actor holds at most `calls_in_flight` ×
`live_frames_per_call` live frames in the replicas. Detector
replicas report the frames they hold, queued or running (`record_autoscaling_stats`),
and this policy reads `target_ongoing_requests` as frames per replica. Until replicas
report (just started, or an older deployment without the metric) it falls back to
Serve's request count. Serve applies min/max replicas, the scaling factors and the
up/down delays around it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

FRAMES_IN_FLIGHT = "frames_in_flight"


def desired_replicas(
    current: int,
    target_per_replica: float,
    frames_by_replica: Mapping[Any, float] | None,
    total_requests: float,
) -> float:
    """Replicas for the load: frames held across replicas (their look-back average)
    over the target per replica; the request count when no replica reported frames."""
    if current <= 0 or target_per_replica <= 0:
        return float(current)
    load = sum(frames_by_replica.values()) if frames_by_replica else total_requests
    return load / target_per_replica


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
        ),
        {},
    )


class FramesInFlight:
    """A replica's count of the frames it holds (what `record_autoscaling_stats`
    reports): `with frames.hold(n):` around awaiting their results."""

    def __init__(self) -> None:
        self.value = 0

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.value += n
        try:
            yield
        finally:
            self.value -= n

    def stats(self) -> dict[str, float]:
        return {FRAMES_IN_FLIGHT: float(self.value)}
