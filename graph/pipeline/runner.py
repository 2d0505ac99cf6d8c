"""A pipeline's branches and actions for the stable tracks of one subscription (no Ray).

Per stable track whose class triggers the pipeline (`graph.pipeline.plan`), the runner
keeps the best crop seen so far and classifies it once with every branch the object
triggers. It classifies again only when a clearly better crop arrives
(`graph.pipeline.quality`; at most `max_passes` times) or when a branch failed, and keeps
a confidence-weighted vote per branch, so one bad crop does not decide a field.

Each branch classifies its own input (`graph.pipeline.branches`: the object's crop, the
crop of its `cropClass` detection, or the whole frame), within its own `timeout_seconds`
when the archive sets one; a result below the branch's `minConfidence` counts as
nothing found.

After every pass each action is rendered (`graph.pipeline.render`) from the object's
context and the branches' winning results. An action waits until every branch it names
(in templates or `waitForBranches`) has run without error, or has been given up for
this object: after `branch_attempts` consecutive failures or timeouts, when the object's
`max_passes` are spent, or when its track ends (after at least one pass). Then it goes
out with what arrived: the missing branches' columns are NULL (counted per branch in
`actions_partial`), while a key, channel or message naming them still waits, and a later
pass that gets the branch's result updates the record. A branch's own actions wait for
the branch itself. An action is handed to the outbox only when its rendered content
changed since it was last sent, under an idempotency key built from (pipeline, version,
camera, session, track, action, revision). So a record is written once per object and
updated only when a better crop changed what it says.

The session (`setSessionId` of the display) is part of every record's key: a new session
starts new records, at once for the objects in view; an object lost before it keeps the
session it was seen in. Without a session each object is its own (`{session_id}` is its
`{object_id}`, `render.py`). Its data (`patchSession`) fills `{session.<field>}`; new data
updates what it changed.

Classification and submission are injected coroutines: the camera actor passes Serve
handle calls, tests pass real engines and a real outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from deployments.delivery.outbox import OutboxEntry
from graph.common.schemas import StrictModel
from graph.common.vision import Box
from graph.events.model import TrackedDetection
from graph.pipeline.branches import branch_inputs
from graph.pipeline.plan import BranchPlan, PipelinePlan
from graph.pipeline.quality import CropQuality, crop_box, crop_quality
from graph.pipeline.render import iso_time, jpeg_images, object_key, render_entry
from graph.pipeline.spec import RedisSaveImage
from graph.pipeline.templates import SESSION_NAMESPACE, MissingFieldError, idempotency_key

logger = logging.getLogger("camgraph.branches")
REVISIONS_PER_GENERATION = 1_000_000  # a track that comes back orders after all before


@dataclass(frozen=True)
class BranchResult:
    label: str
    confidence: float


ClassifyFn = Callable[[str, np.ndarray], Awaitable[BranchResult | None]]
SubmitFn = Callable[[list[OutboxEntry]], Awaitable[None]]
# (track id, class, branch → {label, class, confidence, aliases}) when a branch's winning
# label for an object appears or changes: what clients are told (result events).
ResultFn = Callable[[int, str, dict[str, dict[str, Any]]], None]


class BranchSettings(StrictModel):
    max_passes: int = Field(4, ge=1, le=50, description="classifications per track, at most")
    min_pass_interval_s: float = Field(0.5, ge=0, le=60, description="between passes")
    retry_after_s: float = Field(2.0, ge=0, le=600, description="after a failed branch")
    branch_timeout_s: float = Field(
        10.0, gt=0, le=300, description="per classification, unless the branch sets its own"
    )
    branch_attempts: int = Field(
        3,
        ge=1,
        le=50,
        description="consecutive failures of a branch on one object before its actions go on",
    )
    crop_padding: float = Field(0.04, ge=0, le=1, description="context around the box")
    max_concurrent_passes: int = Field(4, ge=1, le=64, description="per subscription")
    max_tracks: int = Field(512, ge=1, le=100_000, description="per-track states kept")


@dataclass
class TrackState:
    track_id: int
    class_name: str
    first_stable_at: float
    generation: int = 0  # a track that was lost and came back gets a fresh state
    session: Any = None  # the display's session it belongs to (None: none)
    scope: Any = None  # what keys its records: the session, else an id of the runner's
    session_data: dict[str, Any] = field(default_factory=dict)  # its session's data
    quality: CropQuality | None = None
    context: dict[str, Any] = field(default_factory=dict)
    passes: int = 0
    busy: bool = False
    last_pass_at: float = 0.0
    retry_at: float | None = None  # set when a branch failed or found nothing
    completed: set[str] = field(default_factory=set)  # branches that ran without error
    failures: Counter[str] = field(default_factory=Counter)  # consecutive, per branch
    given_up: set[str] = field(default_factory=set)  # actions no longer wait for these
    partial: set[tuple[int, str]] = field(default_factory=set)  # (action, branch) counted
    lost: bool = False
    announced: bool = False  # the no-branch actions went out when it became stable
    emitting: asyncio.Lock = field(default_factory=asyncio.Lock)  # one revision at a time
    votes: dict[str, dict[str, float]] = field(default_factory=dict)  # branch → label → Σ conf
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent: dict[int, str] = field(default_factory=dict)  # action → digest last submitted
    revisions: dict[int, int] = field(default_factory=dict)
    told: dict[str, str] = field(default_factory=dict)  # branch → label clients were told
    unsent: set[int] = field(default_factory=set)  # actions rendered but refused


class PipelineRunner:
    def __init__(
        self,
        plan: PipelinePlan,
        base_context: dict[str, Any],
        classify: ClassifyFn,
        submit: SubmitFn,
        settings: BranchSettings,
        on_result: ResultFn | None = None,
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        self.plan, self.settings = plan, settings
        self._on_result = on_result
        self._on_timeout = on_timeout  # told of each branch timeout (starved classifiers)
        self._base = dict(base_context)
        self._base.update(pipeline_id=plan.pipeline_id, pipeline_version=plan.version)
        # The display's session as set (a base context may carry one), and what keys the
        # records of objects seen meanwhile: the session, else an id of this runner's own.
        self._session: Any = self._base.setdefault("session_id", None)
        self._scope: Any = self._session if self._session is not None else uuid.uuid4().hex[:16]
        self._session_data: dict[str, Any] = {}
        self._classify, self._submit = classify, submit
        self._tracks: dict[int, TrackState] = {}
        self._history: dict[int, tuple[int, float]] = {}  # track → (generation, first)
        self._crops: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # track → (crop, frame)
        self._tasks: set[asyncio.Task[None]] = set()  # passes (classification slots)
        self._emits: set[asyncio.Task[None]] = set()  # announcements of new objects
        self._saves_frames = any(
            isinstance(p.action, RedisSaveImage) and p.action.region is None for p in plan.actions
        )
        self._branches = plan.all_branches()
        self._needed = frozenset().union(*(p.needs for p in plan.actions))
        self.passes = 0
        self.branch_errors: Counter[str] = Counter()
        self.branch_timeouts: Counter[str] = Counter()  # no answer within its timeout
        self.branch_no_input: Counter[str] = Counter()  # no `cropClass` detection in view
        self.branch_low_confidence: Counter[str] = Counter()  # results below minConfidence
        self.actions_partial: Counter[str] = Counter()  # sent without this branch's result
        self.actions_submitted = 0
        self.actions_incomplete = 0  # tracks lost before an action's inputs were there
        self.actions_lost = 0  # rendered, refused, and still refused when the track ended
        self.submit_errors = 0
        self.last_error: str | None = None

    # -- the display's session -------------------------------------------------------

    def set_session(self, session_id: Any, data: Mapping[str, Any] | None = None) -> bool:
        """The display's session (None: none) and its data. A new session starts new
        records: every object in view has its actions rendered again at once, keyed by
        the new session (revisions go on rising). New data only re-renders them, and
        what it did not change is not sent again. Returns whether anything changed."""
        data = dict(data or {})
        same_id = session_id == self._session and type(session_id) is type(self._session)
        if same_id and data == self._session_data:
            return False
        self._session_data = data
        if not same_id:
            self._session = self._base["session_id"] = session_id
            # Cleared: an id of its own again, not the one of before the session.
            self._scope = uuid.uuid4().hex[:16] if session_id is None else session_id
        for st in list(self._tracks.values()):
            if st.lost:
                continue  # gone before this change: its records stay in its session
            self._join_session(st)
            if not same_id:
                st.sent.clear()  # the new session's records get every action
            if st.announced:
                self._spawn(self._emit(st), self._emits)
        return True

    def _join_session(self, st: TrackState) -> None:
        """The track belongs to the display's current session from now on."""
        st.session, st.scope, st.session_data = self._session, self._scope, self._session_data
        if st.context:
            st.context["session_id"] = self._session

    # -- per frame (synchronous, called by the processor) --------------------------

    def observe(
        self,
        image: np.ndarray,
        captured_at: float,
        frame_seq: int,
        detections: Sequence[TrackedDetection],
        lost: Iterable[int] = (),
        bounds: Box | None = None,
    ) -> None:
        """One processed frame's tracked detections (`bounds`: the part of `image` the
        detector saw, a subscription's crop region; None: all of it)."""
        now = time.monotonic()
        wanted: list[tuple[TrackState, TrackedDetection, CropQuality]] = []
        for det in detections:
            if not det.stable or det.track_id is None:
                continue
            if not self.plan.triggers(det.label, det.confidence):
                continue
            st = self._tracks.get(det.track_id)
            if st is None:
                if len(self._tracks) >= self.settings.max_tracks:
                    self._evict()
                st = self._tracks[det.track_id] = self._new_state(det, captured_at)
            if not st.announced:
                self._announce(st, image, det, frame_seq)
            if st.busy or st.passes >= self.settings.max_passes:
                continue
            due_retry = st.retry_at is not None and now >= st.retry_at
            interval_over = now - st.last_pass_at >= self.settings.min_pass_interval_s
            if not (due_retry or interval_over):
                continue  # no pass could start: skip the crop's quality (per-frame cost)
            others = [d.box for d in detections if d is not det]
            quality = crop_quality(image, det, others, bounds=bounds)
            better = st.quality is None or quality.clearly_better_than(st.quality)
            if due_retry or better:
                wanted.append((st, det, quality))
        # Objects never classified go first, oldest first, so that a busy scene cannot
        # starve a newcomer of its first classification.
        wanted.sort(key=lambda w: (w[0].passes, w[0].last_pass_at, w[0].first_stable_at))
        free = self.settings.max_concurrent_passes - len(self._tasks)
        for st, det, quality in wanted[: max(0, free)]:
            self._start_pass(st, image, det, quality, frame_seq, now, detections)
        for track_id in lost:
            st = self._tracks.get(track_id)
            if st is not None:
                st.lost = True
                if not st.busy:
                    self._finish(st)

    def _new_state(self, det: TrackedDetection, captured_at: float) -> TrackState:
        """A state for a track; one that comes back after being lost keeps its first
        time (the record's timestamp) and gets the next generation, so its actions
        have keys of their own and update the same record."""
        assert det.track_id is not None
        track_id = det.track_id
        generation, first = self._history.pop(track_id, (-1, captured_at))
        self._history[track_id] = (generation + 1, first)
        while len(self._history) > 8 * self.settings.max_tracks:
            del self._history[next(iter(self._history))]  # the oldest
        st = TrackState(track_id, det.label, first, generation + 1)
        self._join_session(st)
        return st

    def _evict(self) -> None:
        idle = [s for s in self._tracks.values() if not s.busy]
        if idle:
            self._finish(min(idle, key=lambda s: s.last_pass_at))

    def _capture(
        self,
        st: TrackState,
        image: np.ndarray,
        det: TrackedDetection,
        quality: CropQuality | None,
        frame_seq: int,
    ) -> np.ndarray | None:
        """Make this detection the track's current view: its crop and its context
        (`quality` None: not a classified view, the first pass still looks for one)."""
        x1, y1, x2, y2 = crop_box(image.shape, det.box, self.settings.crop_padding)
        crop = image[y1:y2, x1:x2].copy()
        if crop.size == 0:
            return None
        st.quality = quality
        bx1, by1, bx2, by2 = det.box
        st.context = {
            **self._base,
            "session_id": st.session,  # its own, which a lost track keeps
            "track_id": det.track_id,
            "class": det.label,
            "label": det.label,
            "confidence": round(det.confidence, 4),
            "timestamp": iso_time(st.first_stable_at),
            "frame_seq": frame_seq,
            "x1": round(bx1),
            "y1": round(by1),
            "x2": round(bx2),
            "y2": round(by2),
        }
        # The frame is kept (a reference, not a copy) only if an action saves the frame.
        self._crops[st.track_id] = (crop, image if self._saves_frames else crop)
        return crop

    def _announce(
        self, st: TrackState, image: np.ndarray, det: TrackedDetection, frame_seq: int
    ) -> None:
        """A new stable object: the actions that need no branch (the record, the crop)
        go out at once, whether or not a classification slot is free."""
        st.announced = True
        if self._capture(st, image, det, None, frame_seq) is not None:
            self._spawn(self._emit(st), self._emits)

    def _start_pass(
        self,
        st: TrackState,
        image: np.ndarray,
        det: TrackedDetection,
        quality: CropQuality,
        frame_seq: int,
        now: float,
        detections: Sequence[TrackedDetection],
    ) -> None:
        crop = self._capture(st, image, det, quality, frame_seq)
        if crop is None:
            return
        inputs = branch_inputs(
            self._branches,
            st.class_name,
            image,
            det,
            crop,
            detections,
            self.settings.crop_padding,
        )
        st.busy, st.last_pass_at, st.retry_at = True, now, None
        st.passes += 1
        self._spawn(self._pass(st, inputs), self._tasks)

    @staticmethod
    def _spawn(coro: Any, into: set[asyncio.Task[None]]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        into.add(task)
        task.add_done_callback(into.discard)

    # -- a pass (asynchronous) ------------------------------------------------------

    async def _pass(self, st: TrackState, inputs: dict[str | None, np.ndarray]) -> None:
        try:
            self.passes += 1
            await self._emit(st)  # actions that need no branch go out at once
            await self._run_branches(self.plan.branches, st.class_name, inputs, st)
            if st.passes >= self.settings.max_passes:
                self._give_up(st, self._needed, "its passes are spent")
            await self._emit(st)
        except Exception as exc:  # a bug must not kill the camera: report it
            logger.exception("pipeline pass failed for track %s", st.track_id)
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            st.busy = False
            if st.lost:
                self._finish(st)

    async def _run_branches(
        self,
        branches: Sequence[BranchPlan],
        parent_label: str,
        inputs: dict[str | None, np.ndarray],
        st: TrackState,
    ) -> None:
        eligible = [b for b in branches if b.triggers(parent_label)]
        parallel = [b for b in eligible if b.parallel]
        if parallel:
            await asyncio.gather(*(self._branch(b, inputs, st) for b in parallel))
        for b in eligible:
            if not b.parallel:
                await self._branch(b, inputs, st)

    async def _branch(
        self, b: BranchPlan, inputs: dict[str | None, np.ndarray], st: TrackState
    ) -> None:
        image = inputs.get(b.source(st.class_name))
        if image is None:  # no detection of its cropClass in this object: not run, not failed
            self.branch_no_input[b.model_id] += 1
            st.retry_at = time.monotonic() + self.settings.retry_after_s
            return
        timeout_s = self.settings.branch_timeout_s if b.timeout_s is None else b.timeout_s
        try:
            result = await asyncio.wait_for(self._classify(b.model_id, image), timeout_s)
        except asyncio.CancelledError:
            raise
        except TimeoutError:  # a busy classifier: tried again later, and counted
            self.branch_timeouts[b.model_id] += 1
            if self._on_timeout is not None:
                self._on_timeout(b.model_id)
            self._failed(st, b.model_id, f"no answer within {timeout_s:g}s")
            return
        except Exception as exc:  # isolated: the other branches go on
            self.branch_errors[b.model_id] += 1
            self.last_error = f"branch {b.model_id}: {type(exc).__name__}: {str(exc)[:300]}"
            logger.warning("%s (track %s)", self.last_error, st.track_id)
            self._failed(st, b.model_id, self.last_error)
            return
        st.failures.pop(b.model_id, None)
        st.completed.add(b.model_id)
        if result is not None and not b.accepts(result.confidence):
            self.branch_low_confidence[b.model_id] += 1
            result = None  # below the branch's minConfidence: as if nothing was found
        if result is None:  # e.g. no readable plate in this crop: try again on a later one
            st.retry_at = time.monotonic() + self.settings.retry_after_s
            return
        # Larger crops are more reliable: weight each vote by confidence × crop size.
        weight = max(result.confidence, 1e-3) * (st.quality.weight() if st.quality else 1.0)
        votes = st.votes.setdefault(b.model_id, {})
        votes[result.label] = votes.get(result.label, 0.0) + weight
        label, weight = max(votes.items(), key=lambda kv: kv[1])
        share = weight / sum(votes.values())
        winner = {"label": label, "class": label, "confidence": round(share, 4)}
        winner.update(dict.fromkeys(b.aliases, label))
        st.results[b.model_id] = winner
        if self._on_result is not None and st.told.get(b.model_id) != label:
            st.told[b.model_id] = label  # once per improvement, never once per frame
            try:
                self._on_result(st.track_id, st.class_name, dict(st.results))
            except Exception:  # telling clients must never stop the pipeline
                logger.exception("result callback failed for track %s", st.track_id)
        await self._run_branches(b.children, result.label, inputs, st)

    def _failed(self, st: TrackState, branch: str, why: str) -> None:
        """A branch failed or timed out on this object: retried after `retry_after_s`,
        given up (for its actions' sake) after `branch_attempts` in a row."""
        st.retry_at = time.monotonic() + self.settings.retry_after_s
        st.failures[branch] += 1
        if st.failures[branch] >= self.settings.branch_attempts:
            reason = f"{st.failures[branch]} failures in a row, last: {why}"
            self._give_up(st, {branch}, reason, logging.WARNING)

    def _give_up(
        self, st: TrackState, branches: Iterable[str], why: str, level: int = logging.INFO
    ) -> bool:
        """Actions stop waiting for these branches on this object (those that did not
        run yet): they go out without them. A later result still updates them. Returns
        whether any branch was newly given up."""
        new = set(branches) - st.completed - st.given_up
        if new:
            st.given_up |= new
            logger.log(
                level, "track %s: actions go on without %s (%s)", st.track_id, sorted(new), why
            )
        return bool(new)

    async def _emit(self, st: TrackState) -> None:
        async with st.emitting:
            await self._emit_locked(st)

    async def _emit_locked(self, st: TrackState) -> None:
        obj_key = object_key({**self._base, "record_scope": st.scope}, st.track_id)
        images = jpeg_images(*self._crops.get(st.track_id, (None, None)))
        results = {**st.results, SESSION_NAMESPACE: st.session_data}
        entries = []
        settled = st.completed | st.given_up
        for plan in self.plan.actions:
            if not (plan.needs <= settled and plan.requires <= st.completed):
                continue
            if isinstance(plan.action, RedisSaveImage):
                region = plan.action.region
                if region is not None and region != st.class_name:
                    continue  # the region names another class: nothing of this object
            try:
                digest, entry = render_entry(plan, st.context, results, obj_key, images)
            except MissingFieldError:
                continue  # a key, channel or message waits for a branch's value
            if st.sent.get(plan.index) == digest:
                continue
            revision = st.revisions.get(plan.index, -1) + 1
            key = idempotency_key(obj_key, plan.index, st.generation, revision)
            # What the sinks order by: a late older revision never overwrites this one.
            op = {
                **entry.op,
                "slot": f"{obj_key}:{plan.index}",
                "seq": st.generation * REVISIONS_PER_GENERATION + revision,
            }
            entries.append(
                (plan.index, digest, revision, OutboxEntry(key, entry.sink, op, entry.blob))
            )
        if not entries:
            return
        try:
            await self._submit([e for *_, e in entries])
        except Exception as exc:
            self.submit_errors += 1
            self.last_error = f"actions: {type(exc).__name__}: {str(exc)[:300]}"
            logger.warning("track %s: %s", st.track_id, self.last_error)
            st.unsent.update(index for index, *_ in entries)
            return  # not marked sent: the next pass (or the last chance) sends them again
        for index, digest, revision, _ in entries:
            st.sent[index], st.revisions[index] = digest, revision
            st.unsent.discard(index)
            missing = self.plan.actions[index].needs - st.completed
            new = {(index, b) for b in missing} - st.partial
            st.partial |= new  # once per object and action, not per revision
            self.actions_partial.update(b for _, b in new)
        self.actions_submitted += len(entries)

    def _finish(self, st: TrackState) -> None:
        self._tracks.pop(st.track_id, None)
        # A track that had a pass ends its branches' chances: its actions go out with
        # what arrived. One never classified (no free slot) keeps its actions back.
        gave_up = st.passes > 0 and self._give_up(st, self._needed, "its track ended")
        if st.unsent or gave_up:  # refused (e.g. BacklogFull) or newly partial: one more try
            self._spawn(self._last_chance(st), self._emits)
        else:
            self._end(st)

    async def _last_chance(self, st: TrackState) -> None:
        """A lost track's actions that were refused (or wait only for branches given up)
        are sent once more; what still cannot be sent is counted as `actions_lost`
        (never silently gone)."""
        try:
            await self._emit(st)
        finally:
            self.actions_lost += len(st.unsent)
            self._end(st)

    def _end(self, st: TrackState) -> None:
        """Count the actions never sent for want of a branch's result (e.g. a key that
        names it), and drop the track's crops unless it came back meanwhile."""
        if st.passes:
            self.actions_incomplete += sum(
                p.index not in st.sent and p.index not in st.unsent and not p.needs <= st.completed
                for p in self.plan.actions
            )
        if st.track_id not in self._tracks:
            self._crops.pop(st.track_id, None)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the passes in flight (tests, shutdown)."""
        pending = self._tasks | self._emits
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    async def stop(self) -> None:
        tasks = list(self._tasks | self._emits)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {
            "pipeline_id": self.plan.pipeline_id,
            "pipeline_version": self.plan.version,
            "session_id": self._session,
            "tracks": len(self._tracks),
            "passes": self.passes,
            "passes_in_flight": len(self._tasks) + len(self._emits),
            "branch_errors": dict(self.branch_errors),
            "branch_timeouts": dict(self.branch_timeouts),
            "branch_no_input": dict(self.branch_no_input),
            "branch_low_confidence": dict(self.branch_low_confidence),
            "actions_submitted": self.actions_submitted,
            "actions_partial": dict(self.actions_partial),
            "actions_incomplete": self.actions_incomplete,
            "actions_lost": self.actions_lost,
            "submit_errors": self.submit_errors,
            "last_error": self.last_error,
        }
