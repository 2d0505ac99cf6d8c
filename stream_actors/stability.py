"""Stability of tracked objects (per camera and pipeline): a track becomes a stable object
after N consecutive hits with confidence >= c and size jitter <= j (or, at low processed
frame rates, after two such hits at least `min_stable_s` apart), and is lost after M
frames without a hit. A size cut by the edge of the image the detector saw (an object
entering or leaving) may change by up to 4 j. Emits object lifecycle events: new,
updated (a clearly better view: more confident or larger), lost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from graph.common.schemas import StrictModel
from graph.common.vision import Box, cut_by_edge


class StabilityRules(StrictModel):
    min_hits: int = Field(3, ge=1, le=100, description="consecutive qualifying hits")
    min_confidence: float = Field(0.5, ge=0, le=1)
    max_size_jitter: float = Field(
        0.25, gt=0, le=10, description="max relative change of box width/height"
    )
    min_stable_s: float | None = Field(
        None,
        gt=0,
        le=600,
        description="also stable after 2 consecutive qualifying hits at least this many "
        "seconds apart (no gap between them over 4 times this): where a camera is "
        "processed at about 1 frame/s or less (an overloaded detector), min_hits frames "
        "take several seconds (null: min_hits only; the streams' default rules set 0.8)",
    )
    max_misses: int = Field(5, ge=1, le=1000, description="frames without a hit → lost")
    better_confidence: float = Field(0.05, ge=0, le=1, description="'updated' when conf rises by")
    better_area: float = Field(0.2, ge=0, le=10, description="'updated' when area grows by")


GAP_FACTOR = 4.0  # a gap between hits longer than this × min_stable_s restarts its span
EDGE_MARGIN = 0.005  # of the image's width (height): a box this close to its edge is cut
EDGE_JITTER_FACTOR = 4.0  # a size cut by the edge may change by this × max_size_jitter


@dataclass(frozen=True)
class Observation:
    track_id: int
    cls: int
    box: Box
    confidence: float


@dataclass(frozen=True)
class ObjectEvent:
    kind: Literal["new", "updated", "lost"]
    track_id: int
    cls: int
    box: Box
    confidence: float
    frame_seq: int


@dataclass
class _Track:
    cls: int
    box: Box
    confidence: float
    run: int = 0
    misses: int = 0
    stable: bool = False
    best_confidence: float = 0.0
    best_area: float = 0.0
    run_since: float | None = None  # when the current run of qualifying hits began
    last_at: float | None = None  # the capture time of the last hit


def _size_jumped(a: Box, b: Box, limit: float, bounds: Box | None = None) -> bool:
    """Whether the width or height changed by more than `limit` (relative) from `a` to
    `b`. With `bounds`, a dimension along which either box is cut by the image's edge
    may change by up to EDGE_JITTER_FACTOR × `limit`: an object entering or leaving the
    view changes that size by how much of it is in view, not by detection noise (at
    about one frame a second, 25 % and more between hits), while a jump beyond that
    (another object taking the track over) still starts a new run."""
    for axis in (0, 1):
        sa, sb = a[axis + 2] - a[axis], b[axis + 2] - b[axis]
        cut = False
        if bounds is not None:
            margin = EDGE_MARGIN * (bounds[axis + 2] - bounds[axis])
            cut = cut_by_edge(a, bounds, axis, margin) or cut_by_edge(b, bounds, axis, margin)
        if abs(sb - sa) / max(sa, 1e-6) > limit * (EDGE_JITTER_FACTOR if cut else 1.0):
            return True
    return False


def _area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


class StabilityValidator:
    def __init__(self, rules: StabilityRules) -> None:
        self.rules = rules
        self._tracks: dict[int, _Track] = {}

    def _gap_too_long(self, t: _Track, at: float | None) -> bool:
        """A gap between two hits over 4 × `min_stable_s` (a reconnect, a stall, a
        detector outage): no frame was judged meanwhile, so the gap is no evidence."""
        limit = self.rules.min_stable_s
        if limit is None or at is None or t.last_at is None:
            return False
        return at - t.last_at > GAP_FACTOR * limit

    def _long_enough(self, t: _Track, at: float | None) -> bool:
        """Two or more qualifying hits in a row (this one among them) spanning
        `min_stable_s` (capture times)."""
        limit = self.rules.min_stable_s
        if limit is None or at is None or t.run_since is None or t.run < 2:
            return False
        return at - t.run_since >= limit

    def update(
        self,
        observations: list[Observation],
        frame_seq: int,
        at: float | None = None,
        bounds: Box | None = None,
    ) -> list[ObjectEvent]:
        """Feed one frame's tracker output (`at`: its capture time, seconds; without it
        only `min_hits` makes a track stable; `bounds`: x1 y1 x2 y2 of the image the
        detector saw, in the boxes' coordinates: a size cut by its edge may change by
        up to EDGE_JITTER_FACTOR × max_size_jitter); returns the lifecycle events it
        causes."""
        r, events = self.rules, []
        seen = set()
        for ob in observations:
            seen.add(ob.track_id)
            t = self._tracks.get(ob.track_id)
            if t is None:
                t = self._tracks[ob.track_id] = _Track(ob.cls, ob.box, ob.confidence)
            qualifies = ob.confidence >= r.min_confidence
            if not qualifies:
                t.run = 0
            elif t.run and _size_jumped(t.box, ob.box, r.max_size_jitter, bounds):
                t.run = 1  # a jump in size starts a new run
            else:
                t.run += 1
            if t.run == 1 or self._gap_too_long(t, at):
                t.run_since = at  # the time span starts again (min_hits counts on)
            t.last_at = at
            t.misses, t.box, t.confidence, t.cls = 0, ob.box, ob.confidence, ob.cls
            if not t.stable and (t.run >= r.min_hits or self._long_enough(t, at)):
                t.stable, t.best_confidence, t.best_area = True, ob.confidence, _area(ob.box)
                events.append(
                    ObjectEvent("new", ob.track_id, ob.cls, ob.box, ob.confidence, frame_seq)
                )
            elif (
                t.stable
                and qualifies
                and (
                    ob.confidence >= t.best_confidence + r.better_confidence
                    or _area(ob.box) >= t.best_area * (1 + r.better_area)
                )
            ):
                t.best_confidence = max(t.best_confidence, ob.confidence)
                t.best_area = max(t.best_area, _area(ob.box))
                events.append(
                    ObjectEvent("updated", ob.track_id, ob.cls, ob.box, ob.confidence, frame_seq)
                )
        for track_id in list(self._tracks):
            if track_id in seen:
                continue
            t = self._tracks[track_id]
            t.misses += 1
            t.run = 0
            if t.misses >= r.max_misses:
                del self._tracks[track_id]
                if t.stable:
                    events.append(
                        ObjectEvent("lost", track_id, t.cls, t.box, t.confidence, frame_seq)
                    )
        return events

    def stable_ids(self) -> set[int]:
        return {k for k, t in self._tracks.items() if t.stable}
