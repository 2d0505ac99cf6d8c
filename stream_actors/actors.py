"""Ray shells: `CameraActor` hosts several streams (each a reader thread plus one
processor per subscription) and `StreamRegistry` (a named actor) holds the desired
subscriptions, persists them, packs streams onto camera actors and reconciles: every
`reconcile_s` it compares each camera actor's streams with the desired state and fixes
the difference, so a restarted camera actor or registry heals without a caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import psutil
import ray
from pydantic import Field

from graph.common.detection import DetectRequest, DetectResult
from graph.common.files import atomic_write_bytes
from graph.common.names import camera_actor_name, hub_name, registry_name
from graph.common.schemas import StrictModel
from graph.events.hub import restart_safe_first_id
from graph.events.model import FanoutSink, HubPublisher, RingBufferSink, result_event
from graph.pipeline.runner import BranchResult, BranchSettings, PipelineRunner, PipelineRuntime
from stream_actors.forwarding import ActionForwarder
from stream_actors.placement import PENDING_STATES, placement_problem
from stream_actors.processor import ProcessingSettings, SubscriptionProcessor
from stream_actors.reader import ReaderPolicy, StreamReader
from stream_actors.reconnect import TokenBucket
from stream_actors.subscriptions import (
    StreamSpec,
    Subscription,
    SubscriptionRefused,
    SubscriptionTable,
    load_state,
    save_state,
    stream_key,
)

logger = logging.getLogger("camgraph.streams")
ACTOR_CALL_TIMEOUT_S = 15.0


class StreamSettings(StrictModel):
    """`args.streams` in serve_config.yaml: camera actors, readers and per-frame flow."""

    state_path: Path = Field(
        Path("data/streams.json"), description="persisted subscriptions (relative: base_dir)"
    )
    file_dirs: tuple[Path, ...] = Field(
        (Path("data"),),
        description="file cameras read only from these directories (relative: base_dir)",
    )
    streams_per_actor: int = Field(4, ge=1, le=256, description="streams packed per actor")
    camera_actor_cpus: float = Field(
        0.0,
        ge=0,
        le=16,
        description="Ray CPUs reserved per camera actor: 0 so that the deployments' "
        "reservations never keep a camera from being placed (a budget, not a limit)",
    )
    reconcile_s: float = Field(2.0, gt=0, le=60, description="registry's repair interval")
    reconnects_per_s: float = Field(5.0, gt=0, le=1000, description="cluster-wide cap")
    reconnect_burst: int = Field(10, ge=1, le=10_000)
    events_per_subscription: int = Field(512, ge=16, le=100_000)
    actions_backlog_bytes: int = Field(
        64 * 1024**2, ge=1024, description="unsent actions a camera actor holds, at most"
    )
    actions_send_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="one hand-over to the Actions deployment, at most"
    )
    branches: BranchSettings = BranchSettings()
    reader: ReaderPolicy = ReaderPolicy()
    processing: ProcessingSettings = ProcessingSettings()


@dataclass(frozen=True)
class StreamContext:
    """What the registry and camera actors know of the app that owns them."""

    app_name: str
    namespace: str  # the Ray namespace of the registry and camera actors
    default_model: str  # for subscriptions without modelId
    model_sizes: dict[str, int]  # model id → detector input size
    detector_names: dict[str, str]  # model id → Serve deployment name
    settings: StreamSettings
    pipelines: dict[str, PipelineRuntime] = field(default_factory=dict)  # by root model id


def redact(url: str) -> str:
    """The URL without its secrets (rtsp://user:secret@host → rtsp://user:***@host);
    `graph.common.redaction.redact`, the one definition."""
    from graph.common.redaction import redact as _redact

    return _redact(url)


def context_revision(ctx: StreamContext) -> str:
    """A digest of what a camera actor runs with (models, pipeline versions, deployment
    names): the registry compares it to find actors that restarted with an old one."""
    pipelines = {
        m: (r.plan.pipeline_id, r.plan.version, sorted(r.classifier_names.items()), r.actions_name)
        for m, r in ctx.pipelines.items()
    }
    key = [sorted(ctx.model_sizes.items()), sorted(ctx.detector_names.items()), ctx.default_model]
    key.append(sorted(pipelines.items()))
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]


def context_path(state_path: Path) -> Path:
    """Where the registry keeps the context it was last configured with."""
    return state_path.with_name(state_path.stem + ".context.pickle")


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


class _Stream:
    def __init__(self, reader: StreamReader) -> None:
        self.reader = reader
        self.processors: dict[str, SubscriptionProcessor] = {}
        self.subs: dict[str, Subscription] = {}


@ray.remote(max_restarts=-1, max_task_retries=0)
class CameraActor:
    """Owns its streams' threads and per-camera state; restartable (the registry
    re-sends its streams). Async: one event loop drives all its subscriptions."""

    def __init__(self, ctx: StreamContext) -> None:
        self._ctx, self._settings = ctx, ctx.settings
        self._streams: dict[str, _Stream] = {}
        self._handles: dict[str, Any] = {}
        self._forwarders: dict[str, ActionForwarder] = {}
        self._ring = RingBufferSink(
            self._settings.events_per_subscription, first_id=restart_safe_first_id()
        )
        self._hub: Any = None
        self._publisher = HubPublisher(self._send_to_hub)
        self._sink = FanoutSink(self._ring, self._publisher)
        self._local_bucket = TokenBucket(
            self._settings.reconnects_per_s, self._settings.reconnect_burst
        )
        self._registry: Any = None
        self._started = time.time()
        self._lock = threading.Lock()
        self._init_metrics()
        # Async actors run __init__ with their event loop set (checked on Ray 2.60).
        self._watchdog = asyncio.get_event_loop().create_task(self._watch())
        self._publishing = asyncio.get_event_loop().create_task(self._publisher.run())

    async def _send_to_hub(self, events: list[dict[str, Any]], key: tuple[str, int]) -> None:
        """The app's EventHub, found by name (it may restart: found again on failure)."""
        try:
            if self._hub is None:  # a blocking GCS lookup: off the event loop
                name = hub_name(self._ctx.app_name)
                self._hub = await asyncio.to_thread(ray.get_actor, name, self._ctx.namespace)
            await self._hub.publish.remote(events, key)
        except Exception:
            self._hub = None
            raise

    # ---- detector and reconnect budget --------------------------------------------
    async def _detect(self, model_id: str, request: DetectRequest) -> DetectResult:
        handle = self._handles.get(model_id)
        if handle is None:
            from ray import serve

            name = self._ctx.detector_names[model_id]
            handle = serve.get_deployment_handle(name, app_name=self._ctx.app_name)
            self._handles[model_id] = handle
        result: DetectResult = await handle.detect.remote(request)
        return result

    def _handle(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(name, app_name=self._ctx.app_name)
            self._handles[name] = handle
        return handle

    def _runner(self, sub: Subscription, model_id: str) -> PipelineRunner | None:
        """The pipeline runner of a subscription whose model is a pipeline's root."""
        runtime = self._ctx.pipelines.get(model_id)
        if runtime is None:
            return None

        async def classify(branch_id: str, crop: Any) -> BranchResult | None:
            name = runtime.classifier_names[branch_id]
            label = await self._handle(name).classify.remote(crop)
            return None if label is None else BranchResult(label.label, label.confidence)

        forwarder = self._forwarders.get(runtime.actions_name)
        if forwarder is None:
            actions = self._handle(runtime.actions_name)

            async def send(entries: list[Any]) -> int:
                return int(await actions.submit.remote(entries))

            forwarder = ActionForwarder(
                send,
                self._settings.actions_backlog_bytes,
                timeout_s=self._settings.actions_send_timeout_s,
            )
            self._forwarders[runtime.actions_name] = forwarder
        base = {
            "camera_id": sub.camera_id,
            "display_id": sub.display_id,
            "subscription_id": sub.subscriptionIdentifier,
            "session_id": uuid.uuid4().hex[:16],
            "model_id": model_id,
        }

        def on_result(track_id: int, class_name: str, results: dict[str, Any]) -> None:
            event = result_event(
                sub.subscriptionIdentifier, sub.camera_id, model_id, track_id, class_name, results
            )
            self._sink.publish([event])

        return PipelineRunner(
            runtime.plan, base, classify, forwarder.submit, self._settings.branches, on_result
        )

    def _acquire_reconnect(self) -> float:
        """Called from reader threads: the registry's cluster-wide token bucket, or a
        local one while the registry is unreachable (e.g. restarting)."""
        try:
            if self._registry is None:
                name = registry_name(self._ctx.app_name)
                self._registry = ray.get_actor(name, self._ctx.namespace)
            return float(ray.get(self._registry.acquire_reconnect.remote(), timeout=2.0))
        except Exception:
            self._registry = None
            with self._lock:
                return self._local_bucket.try_acquire()

    async def _watch(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(0.5)
            for stream in list(self._streams.values()):
                stream.reader.check_watchdog()
            ticks += 1
            if ticks % 10 == 0:
                try:
                    self._export_metrics()
                except Exception:  # metrics must never stop the watchdog
                    logger.exception("camera actor: exporting metrics failed")

    def _init_metrics(self) -> None:
        """Gauges for the Ray dashboard / Prometheus, tagged by stream and subscription."""
        from ray.util import metrics

        self._m_fps_in = metrics.Gauge(
            "camgraph_stream_fps_in", "frames read per second", tag_keys=("stream",)
        )
        self._m_reconnects = metrics.Gauge(
            "camgraph_stream_reconnects", "reconnect attempts so far", tag_keys=("stream",)
        )
        self._m_fps_done = metrics.Gauge(
            "camgraph_subscription_fps_processed",
            "frames through the detector per second",
            tag_keys=("subscription",),
        )
        self._m_drops = metrics.Gauge(
            "camgraph_subscription_drops",
            "frames dropped so far, by reason",
            tag_keys=("subscription", "reason"),
        )
        self._m_latency = metrics.Gauge(
            "camgraph_subscription_latency_ms_p50",
            "capture to detection, median of recent frames",
            tag_keys=("subscription",),
        )

    def _export_metrics(self) -> None:
        for key, stream in list(self._streams.items()):
            self._m_fps_in.set(stream.reader.fps(), {"stream": key})
            self._m_reconnects.set(stream.reader.reconnects, {"stream": key})
            for sub_id, processor in list(stream.processors.items()):
                status = processor.status()
                tags = {"subscription": sub_id}
                self._m_fps_done.set(status["fps_processed"], tags)
                if status["latency_ms_p50"] is not None:
                    self._m_latency.set(status["latency_ms_p50"], tags)
                for reason, count in status["drops"].items():
                    self._m_drops.set(count, {**tags, "reason": reason})

    # ---- desired state -------------------------------------------------------------
    async def set_stream(self, spec: dict[str, Any], subs: list[dict[str, Any]]) -> None:
        """Make this stream and its subscriptions exactly as given (idempotent)."""
        want = StreamSpec.model_validate(spec)
        wanted = {s.subscriptionIdentifier: s for s in map(Subscription.model_validate, subs)}
        stream = self._streams.get(want.key)
        if stream is not None and stream.reader.spec != want:
            await self.remove_stream(want.key)  # the source itself changed: reopen
            stream = None
        new = stream is None
        if stream is None:
            reader = StreamReader(want, self._settings.reader, self._acquire_reconnect)
            stream = self._streams[want.key] = _Stream(reader)
        for sub_id in [s for s in stream.subs if stream.subs[s] != wanted.get(s)]:
            await self._stop_subscription(stream, sub_id)
        for sub_id, sub in wanted.items():
            if sub_id in stream.subs:
                continue
            model_id = sub.modelId or self._ctx.default_model
            processor = SubscriptionProcessor(
                sub,
                model_id,
                self._ctx.model_sizes[model_id],
                self._detect,
                self._sink,
                self._settings.processing,
                self._runner(sub, model_id),
            )
            stream.subs[sub_id], stream.processors[sub_id] = sub, processor
            stream.reader.attach(sub_id, processor.mailbox)
            processor.start()
        if new:  # after attaching: a lossless replay must not read frames nobody gets
            stream.reader.start()

    async def update_context(self, ctx: StreamContext) -> int:
        """A new pipeline version (or model set) after a redeploy: each subscription whose
        pipeline changed gets a new runner in place, between two frames. Readers,
        trackers and subscriptions go on; returns how many runners were swapped."""
        old, self._ctx = self._ctx, replace(ctx, settings=self._settings)
        self._handles.clear()  # deployments may have been replaced
        swapped = 0
        for stream in self._streams.values():
            for sub_id, processor in stream.processors.items():
                model_id = processor.model_id
                if model_id in ctx.model_sizes:
                    processor.imgsz = ctx.model_sizes[model_id]
                if old.pipelines.get(model_id) == ctx.pipelines.get(model_id):
                    continue
                previous = processor.runner
                processor.runner = self._runner(stream.subs[sub_id], model_id)
                swapped += 1
                if previous is not None:
                    await previous.drain(timeout_s=5.0)  # let its passes send what they found
                    await previous.stop()
        if swapped:
            logger.info("pipelines updated in place for %d subscriptions", swapped)
        return swapped

    async def _stop_subscription(self, stream: _Stream, sub_id: str) -> None:
        stream.reader.detach(sub_id)
        stream.subs.pop(sub_id, None)
        processor = stream.processors.pop(sub_id, None)
        if processor is not None:
            await processor.stop()
        self._ring.forget(sub_id)

    async def remove_stream(self, key: str) -> bool:
        stream = self._streams.pop(key, None)
        if stream is None:
            return False
        stream.reader.stop()
        for sub_id in list(stream.subs):
            await self._stop_subscription(stream, sub_id)
        # The reader exits within its read timeout; never block the event loop on it.
        await asyncio.to_thread(stream.reader.join, self._settings.reader.read_timeout_s + 1)
        return True

    async def streams(self) -> dict[str, Any]:
        """`streams`: stream key → subscription ids, as running here, and `context`: the
        revision of the context in use (the registry reconciles both)."""
        running = {k: sorted(s.subs) for k, s in self._streams.items()}
        return {"streams": running, "context": context_revision(self._ctx)}

    # ---- reporting -----------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        process = psutil.Process()
        return {
            "pid": os.getpid(),
            "cpu_times_s": round(sum(process.cpu_times()[:2]), 3),
            "rss_bytes": process.memory_info().rss,
            "threads": threading.active_count(),
            "started": self._started,
            "streams": {
                key: {
                    "spec": {**s.reader.spec.model_dump(), "url": redact(s.reader.spec.url)},
                    **s.reader.status(),
                    "subscriptions": [p.status() for p in s.processors.values()],
                }
                for key, s in self._streams.items()
            },
            "actions": {name: f.status() for name, f in self._forwarders.items()},
            "events": self._publisher.status(),
        }

    async def latest_jpeg(self, key: str, quality: int = 85) -> bytes | None:
        stream = self._streams.get(key)
        latest = stream.reader.latest if stream is not None else None
        if latest is None:
            return None
        ok, data = await asyncio.to_thread(
            cv2.imencode, ".jpg", latest.image, [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        return data.tobytes() if ok else None

    async def events(self, sub_id: str, after_id: int = 0, limit: int = 1000) -> list[Any]:
        return [e.to_json() for e in self._ring.after(sub_id, after_id, limit)]


@ray.remote(max_restarts=-1, max_task_retries=-1)
class StreamRegistry:
    """The desired subscriptions of one app, persisted; reference-counted shared streams."""

    def __init__(self, ctx: StreamContext) -> None:
        self._path = ctx.settings.state_path
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray re-runs the constructor with the first creation's arguments: the
            # context the ingress gave since (a redeploy's pipelines) comes from disk.
            ctx = self._load_context(ctx)
        else:
            atomic_write_bytes(context_path(self._path), ray.cloudpickle.dumps(ctx))
        self._ctx, self._settings = ctx, ctx.settings
        self._app, self._namespace = ctx.app_name, ctx.namespace
        self._table = SubscriptionTable(self._settings.streams_per_actor, load_state(self._path))
        self._bucket = TokenBucket(self._settings.reconnects_per_s, self._settings.reconnect_burst)
        self._actors: dict[int, Any] = {}
        self._unplaced: set[int] = set()  # actors Ray has not placed (pending)
        self._lock = asyncio.Lock()
        self.last_reconcile_error: str | None = None
        self._closed = False
        # Restored state is applied by the repair loop, started right away (also after
        # a restart of this actor, so streams come back without any caller).
        self._reconciler = asyncio.get_event_loop().create_task(self._reconcile_forever())

    def _ensure_reconciler(self) -> None:
        if self._reconciler.done() and not self._closed:
            self._reconciler = asyncio.create_task(self._reconcile_forever())

    def _load_context(self, first: StreamContext) -> StreamContext:
        path = context_path(self._path)
        try:
            ctx = ray.cloudpickle.loads(path.read_bytes())  # camgraph's own file
        except FileNotFoundError:
            return first
        except Exception:
            logger.exception("registry: the saved context %s is unreadable", path)
            return first
        logger.info("registry: restarted with the context saved at %s", path)
        return ctx if isinstance(ctx, StreamContext) else first

    async def configure(self, ctx: StreamContext) -> int:
        """Called by every ingress replica at start: keeps the registry aware of the
        served models (its own settings stay as started) and its repair loop running.
        Returns the number of subscriptions."""
        changed = ctx.pipelines != self._ctx.pipelines or ctx.model_sizes != self._ctx.model_sizes
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

    async def _push(self, key: str) -> None:
        index = self._table.placement[key]
        if index in self._unplaced and (problem := await self._placement_problem(index)):
            raise ReconcileError(problem)  # at once: a call would only time out
        actor = self._actor(index)
        subs = [s.model_dump(mode="json") for s in self._table.subscribers(key)]
        spec = self._table.spec(key).model_dump(mode="json")
        await asyncio.wait_for(actor.set_stream.remote(spec, subs), ACTOR_CALL_TIMEOUT_S)

    async def _stop(self, key: str, index: int) -> None:
        await asyncio.wait_for(self._actor(index).remove_stream.remote(key), ACTOR_CALL_TIMEOUT_S)

    async def _apply(self, changed: set[str], stopped: dict[str, int]) -> str | None:
        """Start/stop streams now; on failure the repair loop finishes the job later."""
        index: int | None = None  # the actor being called when it failed
        try:
            for key, index in stopped.items():
                await self._stop(key, index)
            for key in changed:
                index = self._table.placement[key]
                await self._push(key)
        except Exception as exc:
            logger.warning("registry: applying a change failed, will retry: %s", exc)
            if isinstance(exc, ReconcileError):
                return str(exc)
            problem = None if index is None else await self._placement_problem(index)
            return problem or f"{type(exc).__name__}: {exc}"
        return None

    async def subscribe(self, sub: dict[str, Any]) -> dict[str, Any]:
        """Add or replace a subscription; persisted before the stream is started."""
        self._ensure_reconciler()
        new = Subscription.model_validate(sub)
        if (refusal := new.file_refusal(self._settings.file_dirs)) is not None:
            raise SubscriptionRefused(refusal)
        async with self._lock:
            old_placement = dict(self._table.placement)
            changed, stopped = self._table.add(new)
            save_state(self._path, self._table.state())
            pending = await self._apply(changed, {k: old_placement[k] for k in stopped})
        return {
            "subscriptionIdentifier": new.subscriptionIdentifier,
            "stream": stream_key(new),
            "pending_error": pending,
        }

    async def unsubscribe(self, subscription_id: str) -> bool:
        async with self._lock:
            if subscription_id not in self._table.subs:
                return False
            old_placement = dict(self._table.placement)
            changed, stopped = self._table.remove(subscription_id)
            save_state(self._path, self._table.state())
            await self._apply(changed, {k: old_placement[k] for k in stopped})
        return True

    async def _reconcile_once(self) -> None:
        async with self._lock:
            wanted_by_actor: dict[int, dict[str, list[str]]] = {}
            for key, index in self._table.placement.items():
                subs = sorted(s.subscriptionIdentifier for s in self._table.subscribers(key))
                wanted_by_actor.setdefault(index, {})[key] = subs
            errors: list[str] = []
            for index in sorted(set(wanted_by_actor) | set(self._actors)):
                # One actor that fails (or that Ray cannot place) must not stop the
                # repair of the others: each is tried, and the errors are reported.
                try:
                    await self._reconcile_actor(index, wanted_by_actor.get(index, {}))
                except Exception as exc:
                    problem = await self._placement_problem(index)
                    errors.append(f"actor {index}: {problem or f'{type(exc).__name__}: {exc}'}")
            if errors:
                raise ReconcileError("; ".join(errors))

    async def _reconcile_actor(self, index: int, wanted: dict[str, list[str]]) -> None:
        if index in self._unplaced and await self._placement_problem(index) is not None:
            raise ReconcileError("not placed")  # no call: it would only time out
        actor = self._actor(index)
        reply = await asyncio.wait_for(actor.streams.remote(), ACTOR_CALL_TIMEOUT_S)
        if reply.get("context") != context_revision(self._ctx):
            # Ray re-ran the actor's constructor with its first context (a restart after
            # a crash or an OOM kill): it gets today's before any stream is restored.
            logger.info("registry: camera actor %d runs an old context: updating it", index)
            await asyncio.wait_for(actor.update_context.remote(self._ctx), ACTOR_CALL_TIMEOUT_S)
        running = reply.get("streams", reply)  # an actor of an older camgraph: streams only
        for key in set(running) - set(wanted):
            await self._stop(key, index)
        for key, subs in wanted.items():
            if running.get(key) != subs:
                logger.info("registry: restoring stream %s on actor %d", key, index)
                await self._push(key)

    async def _placement_problem(self, index: int) -> str | None:
        """Why actor `index` cannot answer according to Ray (pending, dead...), or None.
        Remembers unplaced actors so later calls skip them instead of timing out."""
        actor = self._actors.get(index)
        state = None if actor is None else await asyncio.to_thread(ray_actor_state, actor)
        problem = placement_problem(state, self._settings.camera_actor_cpus)
        if problem is not None and state in PENDING_STATES:
            self._unplaced.add(index)
        else:
            self._unplaced.discard(index)
        if state == "DEAD":  # forget the handle: the next round creates the actor anew
            self._actors.pop(index, None)
        return problem

    async def _reconcile_forever(self) -> None:
        while True:
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
                    return {"error": problem, "unplaced": True, "streams": {}}
            try:
                return dict(await asyncio.wait_for(self._actor(index).status.remote(), 5))
            except Exception as exc:
                problem = await self._placement_problem(index)
                if problem is not None:
                    return {"error": problem, "unplaced": True, "streams": {}}
                return {"error": f"{type(exc).__name__}: {exc}", "streams": {}}

        return dict(zip(indices, await asyncio.gather(*(one(i) for i in indices)), strict=True))

    async def list_streams(self) -> dict[str, Any]:
        """Every stream with its state and its subscriptions' figures."""
        self._ensure_reconciler()
        statuses = await self._statuses()
        streams = []
        for key in self._table.stream_keys():
            index = self._table.placement[key]
            actor = statuses.get(index, {})
            running = actor.get("streams", {}).get(key)
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
            if running is None:
                entry["state"] = "pending" if actor.get("unplaced") else "starting"
                entry["last_error"] = actor.get("error")
            else:
                entry.update({k: v for k, v in running.items() if k != "spec"})
            streams.append(entry)
        actors = {
            camera_actor_name(self._app, i): {
                k: s.get(k)
                for k in (
                    "pid",
                    "cpu_times_s",
                    "rss_bytes",
                    "threads",
                    "error",
                    "actions",
                    "events",
                )
            }
            for i, s in statuses.items()
        }
        return {"streams": streams, "actors": actors, "reconcile_error": self.last_reconcile_error}

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
        indices = set(self._actors) | set(self._table.placement.values())
        for index in indices:
            with contextlib.suppress(ValueError):  # ValueError: not running
                ray.kill(ray.get_actor(camera_actor_name(self._app, index), self._namespace))
        self._actors.clear()
