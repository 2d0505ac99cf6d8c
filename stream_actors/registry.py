"""The stream registry (a Ray shell, a named actor): holds an app's desired
subscriptions, persists them (data/streams.json), packs streams onto camera actors and
reconciles: every `reconcile_s` it compares each camera actor's streams with the
desired state and fixes the difference, so a restarted camera actor or registry heals
without a caller. It also ends the WebSocket subscriptions whose connections have left
(leases renewed by each session, `streams.disconnect_grace_s`) and refuses streams over
`streams.max_streams`, and keeps the displays' sessions (`sessions.py`), which it sends
to the camera actors of their subscriptions, and divides the detector calls among the
camera actors (fair shares). What to do is decided in `reconcile.py` and `shares.py`
(pure); this module calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from graph.common.errors import StreamLimitReached
from graph.common.files import atomic_write_bytes
from graph.common.names import camera_actor_name
from graph.common.redaction import redact
from stream_actors.camera_actor import CameraActor
from stream_actors.placement import PlacementVerdict, placement_verdict
from stream_actors.reconcile import (
    LeaseBook,
    StallMeter,
    actor_payload,
    actor_summary,
    adds_stream_over_limit,
    desired_by_actor,
    failure_text,
    plan_actor,
    plan_round,
    round_error,
    stale_session_streams,
    stream_state,
    unreachable_status,
)
from stream_actors.reconnect import TokenBucket
from stream_actors.serve_calls import REPLICAS_STALE_S, ReplicaCounts, running_replicas
from stream_actors.sessions import SessionBook, session_digest
from stream_actors.settings import StreamContext, context_revision
from stream_actors.shares import DetectedMeter, shares_to_send
from stream_actors.subscriptions import (
    Subscription,
    SubscriptionRefused,
    SubscriptionTable,
    load_state,
    save_state,
    stream_key,
)

logger = logging.getLogger("camgraph.streams")
ACTOR_CALL_TIMEOUT_S = 15.0
STALL_PROBE_S = 0.25  # how often the registry checks that its event loop ran on time
STALL_TOLERANCE_S = 0.05  # lateness below this is scheduling noise, not a stall


def context_path(state_path: Path) -> Path:
    """Where the registry keeps the context it was last configured with."""
    return state_path.with_name(state_path.stem + ".context.pickle")


def load_context(path: Path, first: StreamContext) -> StreamContext:
    """The context saved at `path`, or `first` when there is none or it cannot be read
    (e.g. saved by a camgraph whose classes lived in other modules): logged, ignored."""
    try:
        ctx = ray.cloudpickle.loads(path.read_bytes())  # camgraph's own file
    except FileNotFoundError:
        return first
    except Exception:
        logger.exception("registry: the saved context %s is unreadable", path)
        return first
    logger.info("registry: restarted with the context saved at %s", path)
    return ctx if isinstance(ctx, StreamContext) else first


class ReconcileError(RuntimeError):
    """Some camera actors could not be brought to the wanted state (each one named)."""


def ray_actor_state(actor: Any) -> str | None:
    """Ray's state of an actor from the GCS (ALIVE, PENDING_CREATION, RESTARTING, DEAD),
    or None when it cannot be read. A blocking call: run it off the event loop."""
    try:
        from ray._private import state

        info = state.actors(actor_id=actor._actor_id.hex())
        return str(info["State"]) if info else None
    except Exception:
        return None


@ray.remote(max_restarts=-1, max_task_retries=-1)
class StreamRegistry:
    """The desired subscriptions of one app, persisted; reference-counted shared streams."""

    def __init__(self, ctx: StreamContext) -> None:
        self._path = ctx.settings.state_path
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray re-runs the constructor with the first creation's arguments: the
            # context the ingress gave since (a redeploy's pipelines) comes from disk.
            ctx = load_context(context_path(self._path), ctx)
        else:
            atomic_write_bytes(context_path(self._path), ray.cloudpickle.dumps(ctx))
        self._ctx, self._settings = ctx, ctx.settings
        self._app, self._namespace = ctx.app_name, ctx.namespace
        state = load_state(self._path)
        self._table = SubscriptionTable(self._settings.streams_per_actor, state)
        self._leases = LeaseBook.restored(
            self._settings.disconnect_grace_s, state.leases, self._table.subs, time.monotonic()
        )
        self._sessions = SessionBook(state.sessions)
        self._bucket = TokenBucket(self._settings.reconnects_per_s, self._settings.reconnect_burst)
        self._actors: dict[int, Any] = {}
        self._unplaced: set[int] = set()  # actors Ray has not placed (pending)
        # Running detector replicas, as Serve last said: the fair shares' calls per replica
        # (read once per round: an answer must outlive a slow round or two)
        self._replicas = ReplicaCounts(
            functools.partial(running_replicas, self._app),
            stale_s=max(REPLICAS_STALE_S, 2 * (self._settings.reconcile_s + ACTOR_CALL_TIMEOUT_S)),
        )
        self._detected = DetectedMeter()  # frames/s the detectors took: max-min shares
        self._lock = asyncio.Lock()
        self.last_reconcile_error: str | None = None
        self._closed = False
        # Restored state is applied by the repair loop, started right away (also after
        # a restart of this actor, so streams come back without any caller).
        self._reconciler = asyncio.get_event_loop().create_task(self._reconcile_forever())
        self._stalls = StallMeter(STALL_PROBE_S, STALL_TOLERANCE_S, time.monotonic())
        self._stall_watch = asyncio.get_event_loop().create_task(self._watch_stalls())

    def _credit_stall(self) -> None:
        """Holds are extended by the time this actor's event loop could not run (a
        starved process on a busy node): a renewal or re-subscribe queued meanwhile
        would otherwise come too late for a grace that ran out while nothing was heard.
        Called every STALL_PROBE_S and right before holds are expired, whichever of the
        two the loop runs first after a stall."""
        late = self._stalls.credit(time.monotonic())
        if late > 0:
            self._leases.extend(late)
            if late >= 1.0:
                logger.warning("registry: event loop stalled %.1f s; holds extended", late)

    async def _watch_stalls(self) -> None:
        while True:
            await asyncio.sleep(STALL_PROBE_S)
            self._credit_stall()

    def _ensure_reconciler(self) -> None:
        if self._reconciler.done() and not self._closed:
            self._reconciler = asyncio.create_task(self._reconcile_forever())

    async def configure(self, ctx: StreamContext) -> int:
        """Called by every ingress replica at start: keeps the registry aware of the
        served models (its own settings stay as started) and its repair loop running.
        Returns the number of subscriptions."""
        changed = (
            ctx.pipelines != self._ctx.pipelines
            or ctx.model_sizes != self._ctx.model_sizes
            or ctx.url_touch_s != self._ctx.url_touch_s  # modelUrl pipelines on or off
        )
        self._ctx = replace(ctx, settings=self._settings)
        data = ray.cloudpickle.dumps(self._ctx)  # what a restart of this actor starts from
        await asyncio.to_thread(atomic_write_bytes, context_path(self._path), data)
        self._ensure_reconciler()
        if changed:  # a redeploy with another pipeline version: swap it in, streams go on
            indices = set(self._actors) | set(self._table.placement.values())
            results = await asyncio.gather(
                *(
                    asyncio.wait_for(
                        self._actor(i).update_context.remote(self._ctx), ACTOR_CALL_TIMEOUT_S
                    )
                    for i in indices
                ),
                return_exceptions=True,
            )
            for index, result in zip(indices, results, strict=True):
                if isinstance(result, BaseException):  # it gets the context when restarted
                    logger.warning("camera actor %d kept its old context: %s", index, result)
        return len(self._table.subs)

    async def acquire_reconnect(self) -> float:
        return self._bucket.try_acquire()

    def _actor(self, index: int) -> Any:
        actor = self._actors.get(index)
        if actor is None:
            actor = CameraActor.options(  # type: ignore[attr-defined]
                name=camera_actor_name(self._app, index),
                namespace=self._namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=self._settings.camera_actor_cpus,
                max_concurrency=1000,
                scheduling_strategy="SPREAD",  # over the nodes, not packed on one
            ).remote(self._ctx)
            self._actors[index] = actor
        return actor

    async def _push(self, key: str, revive: bool = False) -> None:
        """Send a stream and its subscriptions to its actor; `revive`: a `failed` stream
        (streams.max_retries) starts again, which only a subscribe asks, never a repair
        round (else the limit would be pointless)."""
        index = self._table.placement[key]
        if index in self._unplaced and (problem := await self._placement_problem(index)):
            raise ReconcileError(problem)  # at once: a call would only time out
        actor = self._actor(index)
        fps = self._settings.target_fps
        subscribers = self._table.subscribers(key)
        subs = [actor_payload(s, fps) for s in subscribers]
        sessions = {s.display_id: self._session_payload(s.display_id) for s in subscribers}
        spec = self._table.spec(key).model_dump(mode="json")
        await asyncio.wait_for(
            actor.set_stream.remote(spec, subs, revive, sessions), ACTOR_CALL_TIMEOUT_S
        )

    async def _stop(self, key: str, index: int) -> None:
        await asyncio.wait_for(self._actor(index).remove_stream.remote(key), ACTOR_CALL_TIMEOUT_S)

    async def _apply(
        self, changed: set[str], stopped: dict[str, int], revive: str | None = None
    ) -> str | None:
        """Start/stop streams now; on failure the repair loop finishes the job later.
        `revive`: the stream a subscribe named, started again if it had given up."""
        index: int | None = None  # the actor being called when it failed
        try:
            for key, index in stopped.items():
                await self._stop(key, index)
            for key in changed:
                index = self._table.placement[key]
                await self._push(key, revive=key == revive)
        except Exception as exc:
            logger.warning("registry: applying a change failed, will retry: %s", exc)
            if isinstance(exc, ReconcileError):
                return str(exc)
            problem = None if index is None else await self._placement_problem(index)
            return failure_text(problem, exc)
        return None

    def _save(self) -> None:
        """Persist the desired state: the subscriptions, their placement, leases and the
        displays' sessions."""
        state = self._table.state().model_copy(
            update={"leases": self._leases.holds, "sessions": self._sessions.state()}
        )
        save_state(self._path, state)

    async def subscribe(self, sub: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        """Add or replace a subscription; persisted before the stream is started.
        `owner`: the WebSocket connection subscribing (None: REST), which holds it until
        it leaves unless the payload is `persistent`. The same payload again (e.g. a
        client that reconnected) changes nothing of the stream. StreamLimitReached: it
        would open a stream beyond `streams.max_streams`."""
        self._ensure_reconciler()
        new = Subscription.model_validate(sub)
        if (refusal := new.file_refusal(self._settings.file_dirs)) is not None:
            raise SubscriptionRefused(refusal)
        sub_id, key, limit = new.subscriptionIdentifier, stream_key(new), self._settings.max_streams
        async with self._lock:
            streams = {i: stream_key(s) for i, s in self._table.subs.items()}
            if limit is not None and adds_stream_over_limit(streams, sub_id, key, limit):
                raise StreamLimitReached(limit)
            old_placement = dict(self._table.placement)
            changed, stopped = self._table.add(new)
            held = self._leases.subscribed(
                sub_id, owner, new.persistent, sub_id in streams, time.monotonic()
            )
            self._save()
            stopping = {k: old_placement[k] for k in stopped}
            pending = await self._apply(changed, stopping, revive=key)
            if held and owner is not None:
                # Its grace counts from the answer, not from before the stream was started
                # (which can take longer than the grace): the session renews from there.
                self._leases.renew(owner, time.monotonic())
        return {
            "subscriptionIdentifier": sub_id,
            "stream": key,
            "pending_error": pending,
            # None: persistent; else the session renews its hold every grace/3
            "lease": {"owner": owner, "grace_s": self._leases.grace_s} if held else None,
        }

    async def unsubscribe(self, subscription_id: str) -> bool:
        async with self._lock:
            if subscription_id not in self._table.subs:
                return False
            self._leases.removed(subscription_id)
            await self._remove([subscription_id])
        return True

    async def _remove(self, subscription_ids: list[str]) -> None:
        """Remove subscriptions (under the lock): the last one on a URL stops its stream."""
        old_placement = dict(self._table.placement)
        changed: set[str] = set()
        stopped: set[str] = set()
        for sub_id in subscription_ids:
            more, less = self._table.remove(sub_id)
            changed, stopped = (changed | more) - less, stopped | less
        self._save()
        await self._apply(changed, {k: old_placement[k] for k in stopped})

    async def set_session(self, display_id: str, session_id: Any) -> bool:
        """A display's session (None: none), persisted, then sent to the camera actors
        of the display's subscriptions. Returns whether it changed."""
        async with self._lock:
            subscribed = {s.display_id for s in self._table.subs.values()}
            changed = self._sessions.set(display_id, session_id, subscribed)
            if not changed:
                return False
            self._save()
            sends = self._session_sends([display_id])
        await self._send_sessions(sends)
        return True

    async def patch_session(self, session_id: Any, data: dict[str, Any]) -> dict[str, Any]:
        """Merge data into a session (its `{session.<field>}` values): the merged data.
        KeyError: no display has that session; SessionDataTooLarge: refused."""
        async with self._lock:
            displays, merged = self._sessions.patch(session_id, data)
            self._save()
            sends = self._session_sends(displays)
        await self._send_sessions(sends)
        return merged

    async def session_of(self, display_id: str) -> dict[str, Any] | None:
        """A display's session ({"id", "data"}), or None."""
        return self._sessions.of(display_id)

    def _session_payload(self, display_id: str) -> dict[str, Any]:
        """What a camera actor gets for a display (`id` None: no session), stamped with
        when it was taken (under the lock): an actor keeps the newest, whatever order
        the calls arrive in."""
        session = self._sessions.of(display_id) or {"id": None, "data": {}}
        return {**session, "seq": time.time_ns()}

    def _session_sends(self, displays: list[str]) -> list[tuple[int, str, Any]]:
        """(Under the lock.) (actor, display, payload) for every actor running one of
        the displays' subscriptions."""
        sends = []
        for display_id in displays:
            payload = self._session_payload(display_id)
            subs = self._table.subs.values()
            keys = {stream_key(s) for s in subs if s.display_id == display_id}
            for index in sorted({self._table.placement[k] for k in keys} - self._unplaced):
                sends.append((index, display_id, payload))
        return sends

    async def _send_sessions(self, sends: list[tuple[int, str, Any]]) -> None:
        """Outside the lock, to all actors at once: an actor that misses one is found by
        the repair loop (its sessions' digests differ) and gets its streams again."""

        async def one(index: int, display_id: str, payload: Any) -> None:
            try:
                call = self._actor(index).set_session.remote(display_id, payload)
                await asyncio.wait_for(call, ACTOR_CALL_TIMEOUT_S)
            except Exception as exc:
                logger.warning("camera actor %d missed a session change: %s", index, exc)

        await asyncio.gather(*(one(*send) for send in sends))

    async def renew(self, owner: str) -> dict[str, Any]:
        """A live WebSocket connection renews its hold on its subscriptions for one grace
        (every grace/3): how many it holds, and the grace, which paces the next renewal."""
        self._ensure_reconciler()  # it is what ends the holds that are not renewed
        held = self._leases.renew(owner, time.monotonic())
        return {"held": held, "grace_s": self._leases.grace_s}

    async def release(self, owner: str) -> int:
        """A WebSocket connection closed: its subscriptions end one grace from now unless
        a connection subscribes them again meanwhile. Returns how many it held."""
        # Not persisted: a restart gives every hold a full grace anyway, and a file write
        # per closing connection would queue renewals behind fsyncs.
        return self._leases.release(owner, time.monotonic())

    async def _expire_leases(self) -> None:
        """Remove the subscriptions whose connections have all left for a grace."""
        async with self._lock:
            self._credit_stall()  # a stall that just ended counts before anything expires
            ended = [s for s in self._leases.expire(time.monotonic()) if s in self._table.subs]
            if ended:
                logger.info(
                    "registry: %d subscription(s) ended, their connections gone for %.0f s: %s",
                    len(ended),
                    self._leases.grace_s,
                    ", ".join(ended),
                )
                await self._remove(ended)

    async def _reconcile_once(self) -> None:
        async with self._lock:
            subscribers = {
                key: [s.subscriptionIdentifier for s in self._table.subscribers(key)]
                for key in self._table.placement
            }
            desired = desired_by_actor(self._table.placement, subscribers)
            known = set(self._actors)  # before Ray's verdicts drop the dead ones
            unplaced = {i: await self._placement_verdict(i) for i in sorted(self._unplaced)}
            plan = plan_round(desired, known, unplaced)
            errors = dict(plan.skipped)
            answered: dict[int, dict[str, Any]] = {}  # the replies of actors with streams
            for index in plan.visit:
                # One actor that fails must not stop the repair of the others: each is
                # tried, and the errors are reported.
                try:
                    reply = await self._reconcile_actor(index, desired.get(index, {}))
                    if index in desired:
                        answered[index] = reply
                except Exception as exc:
                    errors[index] = failure_text(await self._placement_problem(index), exc)
            try:
                await self._rebalance(answered)
            except Exception as exc:  # shares are an optimisation: never the round's error
                logger.warning("registry: fair shares not sent this round: %r", exc)
            if (error := round_error(errors)) is not None:
                raise ReconcileError(error)

    async def _reconcile_actor(self, index: int, wanted: dict[str, list[str]]) -> dict[str, Any]:
        """Repair one actor's streams; returns its `streams()` reply."""
        actor = self._actor(index)
        reply: dict[str, Any] = await asyncio.wait_for(actor.streams.remote(), ACTOR_CALL_TIMEOUT_S)
        plan = plan_actor(wanted, reply, context_revision(self._ctx))
        if plan.update_context:
            # Ray re-ran the actor's constructor with its first context (a restart after
            # a crash or an OOM kill): it gets today's before any stream is restored.
            logger.info("registry: camera actor %d runs an old context: updating it", index)
            await asyncio.wait_for(actor.update_context.remote(self._ctx), ACTOR_CALL_TIMEOUT_S)
        for key in plan.stop:
            await self._stop(key, index)
        for key in plan.push:
            logger.info("registry: restoring stream %s on actor %d", key, index)
            await self._push(key)
        # An actor holding another session for a display than this registry (a change
        # it missed, an eviction) gets those streams again: idempotent, with sessions.
        display_of = {s: self._table.subs[s].display_id for subs in wanted.values() for s in subs}
        expected = {d: session_digest(self._sessions.of(d)) for d in display_of.values()}
        for key in stale_session_streams(wanted, display_of, expected, reply.get("sessions")):
            if key not in plan.push:
                await self._push(key)
        return reply

    async def _rebalance(self, replies: dict[int, dict[str, Any]]) -> None:
        """Send each actor that answered this round (`replies`: its `streams()` reply)
        its fair share of the cluster's detector calls where the one it holds differs
        (`streams.dispatch.fair_share`; off: shares held are cleared). Only this round's
        answers count: an actor that did not answer runs no camera that should take a
        share from the others. One that does not take it keeps its own `calls_in_flight`
        and is asked again next round."""
        dispatch = self._settings.dispatch
        use_replicas = dispatch.fair_share and dispatch.calls_per_replica is not None
        running = self._replicas.get() if use_replicas else {}  # never waits for Serve
        capacity = self._detected.update(replies, time.monotonic())
        wanted = shares_to_send(replies, dispatch, running, self._ctx.detector_names, capacity)
        todo = {
            index: (actor, shares)
            for index, shares in wanted.items()
            if (actor := self._actors.get(index)) is not None
        }
        results = await asyncio.gather(
            *(
                asyncio.wait_for(actor.set_admission_shares.remote(w), ACTOR_CALL_TIMEOUT_S)
                for actor, w in todo.values()
            ),
            return_exceptions=True,
        )
        for index, result in zip(todo, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("registry: camera actor %d kept its share: %r", index, result)

    async def _placement_verdict(self, index: int) -> PlacementVerdict:
        """What Ray says of actor `index` (pending, dead...). Remembers unplaced actors so
        later calls skip them instead of timing out; forgets dead ones so that the next
        call creates them anew."""
        actor = self._actors.get(index)
        state = None if actor is None else await asyncio.to_thread(ray_actor_state, actor)
        verdict = placement_verdict(state, self._settings.camera_actor_cpus)
        if verdict.unplaced:
            self._unplaced.add(index)
        else:
            self._unplaced.discard(index)
        if verdict.dead:
            self._actors.pop(index, None)
        return verdict

    async def _placement_problem(self, index: int) -> str | None:
        """Why actor `index` cannot answer according to Ray, or None."""
        return (await self._placement_verdict(index)).problem

    async def _reconcile_forever(self) -> None:
        while True:
            try:  # apart: a failed expiry must not skip this round's repair
                await self._expire_leases()
            except Exception as exc:
                logger.warning("registry: ending expired subscriptions failed: %r", exc)
            try:
                await self._reconcile_once()
                self.last_reconcile_error = None
            except Exception as exc:  # an actor restarting: try again next round
                self.last_reconcile_error = f"{type(exc).__name__}: {exc}"
                logger.warning("registry: reconcile failed: %s", self.last_reconcile_error)
            await asyncio.sleep(self._settings.reconcile_s)

    async def _statuses(self) -> dict[int, dict[str, Any]]:
        indices = sorted(set(self._table.placement.values()))

        async def one(index: int) -> dict[str, Any]:
            if index in self._unplaced:  # known not placed: ask Ray, not the actor
                problem = await self._placement_problem(index)
                if problem is not None:
                    return unreachable_status(problem)
            try:
                return dict(await asyncio.wait_for(self._actor(index).status.remote(), 5))
            except Exception as exc:
                return unreachable_status(await self._placement_problem(index), exc)

        return dict(zip(indices, await asyncio.gather(*(one(i) for i in indices)), strict=True))

    async def list_streams(self) -> dict[str, Any]:
        """Every stream with its state and its subscriptions' figures."""
        self._ensure_reconciler()
        statuses = await self._statuses()
        now, wall_now = time.monotonic(), time.time()
        streams = []
        for key in self._table.stream_keys():
            index = self._table.placement[key]
            spec = self._table.spec(key)
            entry: dict[str, Any] = {
                "key": key,
                "kind": spec.kind,
                "url": redact(spec.url),
                "actor": camera_actor_name(self._app, index),
                "subscription_ids": [
                    s.subscriptionIdentifier for s in self._table.subscribers(key)
                ],
                "subscriptions": [],
            }
            entry.update(stream_state(key, statuses.get(index, {})))
            entry["owners"] = {
                sub_id: self._leases.describe(sub_id, now, wall_now)
                for sub_id in entry["subscription_ids"]
            }
            streams.append(entry)
        actors = {camera_actor_name(self._app, i): actor_summary(s) for i, s in statuses.items()}
        return {
            "streams": streams,
            "actors": actors,
            "reconcile_error": self.last_reconcile_error,
            # how long the registry's loop could not run, in all (holds were extended so)
            "registry_stalled_s": round(self._stalls.total_s, 2),
            # frames/s the detectors answered lately, per target: the fair shares' level
            "detected_fps": {t: round(r, 2) for t, r in (self._detected.rates or {}).items()},
        }

    def _key_of_camera(self, camera_id: str) -> str | None:
        keys = self._table.by_camera(camera_id)
        return keys[0] if keys else None

    async def latest_jpeg(self, camera_id: str) -> bytes | None:
        """The newest frame of a camera as JPEG; KeyError when no subscription has it."""
        key = self._key_of_camera(camera_id)
        if key is None:
            raise KeyError(camera_id)
        data: bytes | None = await self._actor(self._table.placement[key]).latest_jpeg.remote(key)
        return data

    async def events(self, subscription_id: str, after_id: int = 0) -> list[Any]:
        sub = self._table.subs.get(subscription_id)
        if sub is None:
            raise KeyError(subscription_id)
        index = self._table.placement[stream_key(sub)]
        events: list[Any] = await self._actor(index).events.remote(subscription_id, after_id)
        return events

    async def shutdown(self) -> None:
        """Stop every stream and camera actor (tests, app deletion); forgets nothing."""
        self._closed = True
        self._reconciler.cancel()
        self._stall_watch.cancel()
        indices = set(self._actors) | set(self._table.placement.values())
        for index in indices:
            with contextlib.suppress(ValueError):  # ValueError: not running
                ray.kill(ray.get_actor(camera_actor_name(self._app, index), self._namespace))
        self._actors.clear()
