"""A camera actor's detector dispatchers, one per detector target, with the registry's
fair shares of the cluster's calls and which subscription uses which target (pure: no
Ray; the actor injects how a target's calls are sent).

The registry asks each actor for its *demand* (per target, the frames/s each live
subscription asks, `subscription_weight`: those whose stream is not down) and the
frames its calls got answers for (`detected`), and gives it back its *shares*
(`admission_shares` in shares.py); see dispatch.py for what a share does to a
dispatcher.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from stream_actors.branch_clock import BranchClock
from stream_actors.dispatch import (
    DetectDispatcher,
    DispatchSettings,
    SendFn,
    target_label,
)

Target = tuple[str, str]  # ("model", model id) or (deployment, multiplexed id)

# Frames/s a live subscription is counted for when neither its targetFps nor its
# stream's rate is known (a stream just connected, a lossless replay read as fast as
# it is taken): a typical camera's rate, and the weight every subscription had before.
DEFAULT_SOURCE_FPS = 10.0
MAX_WEIGHT_FPS = 120.0  # as targetFps's own limit
MIN_WEIGHT_FPS = 0.001  # a tiny targetFps still asks something (else it had no share)


def subscription_weight(target_fps: float | None, source_fps: float | None) -> float:
    """The frames/s a live subscription asks of the detector, its weight in the fair
    shares: its `targetFps`, at most what its stream offers (`source_fps`, None or 0:
    not known); the stream's rate without a targetFps; `DEFAULT_SOURCE_FPS` without
    either. A 1 fps snapshot camera then takes a tenth of a 10 fps camera's calls, not
    as many: calls it could not fill would idle while the other actors' are capped."""
    offered = source_fps if source_fps is not None and source_fps > 0 else None
    if target_fps is None:
        weight = offered or DEFAULT_SOURCE_FPS
    else:
        weight = min(target_fps, offered) if offered is not None else target_fps
    return min(max(weight, MIN_WEIGHT_FPS), MAX_WEIGHT_FPS)


class TargetAdmission:
    def __init__(self, settings: DispatchSettings, branches: BranchClock) -> None:
        self._settings, self._branches = settings, branches
        self.dispatchers: dict[Target, DetectDispatcher] = {}
        self.shares: dict[str, float] = {}  # target label → share (absent: its own calls)
        self._labels: dict[str, str] = {}  # subscription id → its target's label
        self._answered_before: Counter[str] = Counter()  # of dispatchers replaced
        self._run = uuid.uuid4().hex  # this process's counts: a restart begins anew

    def dispatcher(self, target: Target, make_send: Callable[[], SendFn]) -> DetectDispatcher:
        """The target's dispatcher, made (with its share) on first use."""
        dispatcher = self.dispatchers.get(target)
        if dispatcher is None:
            dispatcher = DetectDispatcher(make_send(), self._settings, self._branches)
            dispatcher.set_share(self.shares.get(target_label(target)))
            self.dispatchers[target] = dispatcher
        return dispatcher

    def attach(self, sub_id: str, target: Target) -> None:
        self._labels[sub_id] = target_label(target)

    def detach(self, sub_id: str) -> None:
        self._labels.pop(sub_id, None)

    def demand(self, live: Iterable[str]) -> dict[str, int]:
        """Live subscriptions per target label, of the subscription ids `live` (those
        whose stream is up)."""
        return dict(Counter(self._labels[s] for s in live if s in self._labels))

    def demand_fps(self, weights: Mapping[str, float]) -> dict[str, list[float]]:
        """The frames/s each live subscription asks, per target label (sorted), of
        `weights` (subscription id → its `subscription_weight`, for those whose stream
        is up)."""
        asked: dict[str, list[float]] = {}
        for sub_id, weight in weights.items():
            if (label := self._labels.get(sub_id)) is not None:
                asked.setdefault(label, []).append(round(weight, 3))
        return {label: sorted(values) for label, values in asked.items()}

    def detected(self) -> dict[str, int]:
        """Frames each target answered since the actor started (those of dispatchers a
        redeploy replaced included): the registry's measure of what the detectors take."""
        answered = Counter(self._answered_before)
        for target, dispatcher in self.dispatchers.items():
            answered[target_label(target)] += dispatcher.stats.answered
        return dict(answered)

    def report(self, weights: Mapping[str, float]) -> dict[str, Any]:
        """What the registry's fair shares need of this actor, for its `streams()` reply:
        `demand` (live subscriptions per target; what older registries read),
        `demand_fps`, `detected` with the actor's own clock (`detected_at`: the
        registry times each actor's counts by it) and run id (`detected_run`: new
        counts after a restart), and the shares it holds. `weights`:
        subscription id → `subscription_weight`, of those whose stream is up."""
        return {
            "demand": self.demand(weights),
            "demand_fps": self.demand_fps(weights),
            "detected": self.detected(),
            "detected_at": time.monotonic(),
            "detected_run": self._run,
            "admission_shares": dict(self.shares),
        }

    def set_shares(self, shares: Mapping[str, Any]) -> int:
        """The registry's shares by target label; a target it does not name uses its
        own `calls_in_flight`. All or nothing: ValueError on a share that is not a
        positive number. Returns how many dispatchers it set."""
        clean: dict[str, float] = {}
        for label, value in shares.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"share of {label!r} is not a number: {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"share of {label!r} must be positive and finite: {value!r}")
            clean[str(label)] = float(value)
        self.shares = clean
        for target, dispatcher in self.dispatchers.items():
            dispatcher.set_share(clean.get(target_label(target)))
        return len(self.dispatchers)

    def renew(self) -> None:
        """After a redeploy: new frames go to new dispatchers (made on first use); the
        old ones finish what they admitted."""
        for target, dispatcher in self.dispatchers.items():
            self._answered_before[target_label(target)] += dispatcher.stats.answered
        self.dispatchers.clear()

    def status(self) -> dict[str, Any]:
        return {target_label(t): d.status() for t, d in self.dispatchers.items()}
