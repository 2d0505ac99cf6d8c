"""The camera actor (a Ray shell): hosts several streams, each a reader thread plus one
processor per subscription, and one event loop for all of them. Restartable: the
registry (`registry.py`) re-sends its streams and today's context.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import cv2
import psutil
import ray

from deployments.delivery.outbox import OutboxEntry
from graph.common.detection import DetectResult
from graph.common.names import (
    ACTIONS,
    PIPELINE_CLASSIFIER,
    PIPELINE_DETECTOR,
    catalog_name,
    hub_name,
    registry_name,
)
from graph.common.redaction import redact, redact_text
from graph.events.model import (
    FanoutSink,
    HubPublisher,
    RingBufferSink,
    state_event,
)
from graph.events.ring import restart_safe_first_id
from graph.pipeline.catalog import PipelineInfo, PipelineLoading
from graph.pipeline.plan import PipelineRuntime
from graph.pipeline.runner import BranchResult, PipelineRunner, ResultFn
from stream_actors.actor_metrics import CameraMetrics
from stream_actors.admission import TargetAdmission, subscription_weight
from stream_actors.branch_clock import BranchClock
from stream_actors.dispatch import (
    AdmitFn,
    DetectDispatcher,
    FrameTimingFn,
    SendFn,
    TakeFn,
)
from stream_actors.forwarding import ActionForwarder, rerouted
from stream_actors.processor import SubscriptionProcessor
from stream_actors.reader import DOWN_STATES, StreamReader, StreamState
from stream_actors.reconnect import TokenBucket
from stream_actors.serve_calls import ServeHandles, detector_sender
from stream_actors.sessions import session_digest
from stream_actors.settings import StreamContext, context_revision
from stream_actors.subscriptions import StreamSpec, Subscription, url_pipeline

logger = logging.getLogger("camgraph.streams")
# How long set_stream waits for a modelUrl pipeline (the catalog goes on loading it; a
# later repair round attaches the subscription): well under the registry's call timeout.
URL_LOAD_WAIT_S = 8.0


class _Stream:
    def __init__(self, reader: StreamReader) -> None:
        self.reader = reader
        self.processors: dict[str, SubscriptionProcessor] = {}
        self.subs: dict[str, Subscription] = {}


def sheds_decode(clock: BranchClock, window_s: float, stream: _Stream | None) -> bool:
    """Whether an overloaded actor's reader may decode key frames only (`shed_decode`):
    within one decode window the dispatchers found branch work starved (only with the
    branch priority on: `branch_hold_s` > 0), or, for a stream with a pipeline
    subscription, a live frame of the actor (any of its detector targets) waited longer
    than `overloaded_wait_s` for its detector call.
    A pipeline's records come first: its readers then stop decoding frames that no
    detector call will take. Streams without a pipeline keep every frame fresh while
    only the detector is short. Read on reader threads."""
    if clock.starved_within(window_s):
        return True
    if stream is None or not clock.detector_overloaded_within(window_s):
        return False
    try:  # a snapshot of the loop's dict: one C call under the GIL...
        processors = tuple(stream.processors.values())
    except RuntimeError:  # ...unless a GC pass let the loop resize it mid-copy
        return False  # judged again at the next window
    return any(p.runner is not None for p in processors)


@ray.remote(max_restarts=-1, max_task_retries=0)
class CameraActor:
    """Owns its streams' threads and per-camera state; restartable (the registry
    re-sends its streams). Async: one event loop drives all its subscriptions."""

    def __init__(self, ctx: StreamContext) -> None:
        self._ctx, self._settings = ctx, ctx.settings
        self._streams: dict[str, _Stream] = {}
        self._handles = ServeHandles(ctx.app_name)
        self._branch_clock = BranchClock()  # pending classification passes
        # One dispatcher per detector target: ("model", model id) or (deployment,
        # multiplexed id); all the actor's subscriptions on it share its calls, and
        # the registry's fair share of the cluster's calls.
        self._admission = TargetAdmission(self._settings.dispatch, self._branch_clock)
        self._catalog: Any = None
        self._url_used: dict[str, tuple[str, str]] = {}  # sub id → (sha256, modelUrl)
        self._stream_locks: dict[str, asyncio.Lock] = {}
        self._touching: asyncio.Future[None] | None = None
        self._forwarders: dict[str, ActionForwarder] = {}
        # display id → {"id", "data", "seq"}: the displays' sessions, as the registry
        # sends them; a cleared one stays as {"id": None, ...} so that its seq orders
        self._sessions: dict[str, dict[str, Any]] = {}
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
        self._metrics = CameraMetrics()  # gauges for the Ray dashboard / Prometheus
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
    def _admitter(self, target: tuple[str, str], model_id: str) -> AdmitFn:
        """A subscription's admission to its detector target's dispatcher (looked up per
        frame: a redeploy replaces the dispatchers, see update_context)."""

        async def admit(
            take: TakeFn, live: bool, timing: FrameTimingFn | None
        ) -> DetectResult | None:
            return await self._dispatcher(target, model_id).admit(take, live, timing)

        return admit

    def _dispatcher(self, target: tuple[str, str], model_id: str) -> DetectDispatcher:
        return self._admission.dispatcher(target, lambda: self._sender(target, model_id))

    def _sender(self, target: tuple[str, str], model_id: str) -> SendFn:
        """How a dispatcher's calls reach its target's replicas."""
        kind, name = target
        if kind == "model":
            return detector_sender(self._handles.get(self._ctx.detector_names[name]), model_id)
        # a multiplexed deployment (modelUrl pipelines), by the archive's sha256
        return detector_sender(self._handles.mux(kind, name), model_id)

    # ---- modelUrl pipelines ------------------------------------------------------
    async def _catalog_handle(self) -> Any:
        if self._catalog is None:  # a blocking GCS lookup: off the event loop
            name = catalog_name(self._ctx.app_name)
            self._catalog = await asyncio.to_thread(ray.get_actor, name, self._ctx.namespace)
        return self._catalog

    async def _url_pipeline(self, url: str) -> tuple[PipelineInfo, PipelineRuntime]:
        """The pipeline at `url`, from the catalog (loaded there first if need be)."""
        try:
            catalog = await self._catalog_handle()
            call = catalog.load.remote(url, URL_LOAD_WAIT_S)
            reply = await asyncio.wait_for(call, URL_LOAD_WAIT_S + 2.0)
        except (ray.exceptions.RayActorError, ValueError):
            self._catalog = None  # restarting, or not found: looked up again next time
            raise
        raw = reply["info"]
        info = PipelineInfo(**{**raw, "branches": tuple(raw["branches"])})
        ids = {b: f"{info.key}:{b}" for b in info.branches}
        routes = reply.get("routes") or {}
        return info, PipelineRuntime.of(reply["pipeline"], info.version, ids, ACTIONS, routes)

    async def _touch(self) -> None:
        """Tell the catalog which URL pipelines run here (idle ones are unloaded)."""
        used = dict(self._url_used.values())
        if not used:
            return
        try:
            await asyncio.wait_for((await self._catalog_handle()).touch.remote(used), 10.0)
        except Exception as exc:
            self._catalog = None
            logger.warning("pipeline catalog: touch failed: %s", type(exc).__name__)

    def _runner(
        self,
        sub: Subscription,
        model_id: str,
        on_result: ResultFn,
        url_runtime: PipelineRuntime | None = None,
    ) -> PipelineRunner | None:
        """The pipeline runner of a subscription whose model is a pipeline's root (or
        of its modelUrl pipeline: `url_runtime`, branches on PipelineClassifier); it
        tells `on_result` (its processor's) each improvement of an object's results."""
        runtime = url_runtime or self._ctx.pipelines.get(model_id)
        if runtime is None:
            return None

        async def classify(branch_id: str, crop: Any) -> BranchResult | None:
            name = runtime.classifier_names[branch_id]
            if url_runtime is not None:
                handle = self._handles.mux(PIPELINE_CLASSIFIER, name)
            else:
                handle = self._handles.get(name)
            token = self._branch_clock.start()  # the dispatchers yield to pending passes
            response = handle.classify.remote(crop)
            try:
                label = await response
            except asyncio.CancelledError:  # the runner's timeout, or a stop
                response.cancel()  # the classifier must not spend its CPU on it
                raise
            finally:
                self._branch_clock.end(token)
            return None if label is None else BranchResult(label.label, label.confidence)

        forwarder = self._forwarders.get(runtime.actions_name)
        if forwarder is None:
            actions = self._handles.get(runtime.actions_name)

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
            "model_id": model_id,
        }
        submit: Callable[[Sequence[OutboxEntry]], Awaitable[None]] = forwarder.submit
        if runtime.sink_routes:  # the archive's own servers (archive_connections: use)
            submit = rerouted(forwarder.submit, runtime.sink_routes)
        runner = PipelineRunner(
            runtime.plan,
            base,
            classify,
            submit,
            self._settings.branches,
            on_result,
            on_timeout=lambda _branch: self._branch_clock.timed_out(),
        )
        if (session := self._sessions.get(sub.display_id)) is not None:
            runner.set_session(session["id"], session["data"])
        return runner

    def _session_of(self, display_id: str) -> dict[str, Any] | None:
        session = self._sessions.get(display_id)
        if session is None or session["id"] is None:
            return None
        return {"id": session["id"], "data": session["data"]}

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
            touch_s = self._ctx.url_touch_s
            if touch_s is not None and ticks % max(1, round(touch_s / 0.5)) == 0:
                self._touching = asyncio.ensure_future(self._touch())
            if ticks % 10 == 0:
                try:
                    self._metrics.export(list(self._streams.items()))
                except Exception:  # metrics must never stop the watchdog
                    logger.exception("camera actor: exporting metrics failed")

    # ---- desired state -------------------------------------------------------------
    async def set_stream(
        self,
        spec: dict[str, Any],
        subs: list[dict[str, Any]],
        revive: bool = False,
        sessions: dict[str, dict[str, Any] | None] | None = None,
    ) -> None:
        """Make this stream and its subscriptions exactly as given (idempotent). `revive`
        (a subscribe asked for the stream, not a repair round): a stream that gave up
        (`failed`, streams.max_retries) starts again. `sessions`: the sessions of the
        subscriptions' displays (None: no session), applied first. One call per stream
        at a time: a repair round's call that its caller gave up on may still run."""
        for display_id, session in (sessions or {}).items():
            await self.set_session(display_id, session)
        want = StreamSpec.model_validate(spec)
        async with self._stream_lock(want.key):
            await self._set_stream(want, subs, revive)

    def _stream_lock(self, key: str) -> asyncio.Lock:
        lock = self._stream_locks.get(key)
        if lock is None:
            lock = self._stream_locks[key] = asyncio.Lock()
        return lock

    async def _set_stream(self, want: StreamSpec, subs: list[dict[str, Any]], revive: bool) -> None:
        wanted = {s.subscriptionIdentifier: s for s in map(Subscription.model_validate, subs)}
        # modelUrl pipelines of the subscriptions to attach, before anything changes.
        stream = self._streams.get(want.key)
        kept = set()
        if stream is not None and stream.reader.spec == want:
            kept = {i for i, s in stream.subs.items() if wanted.get(i) == s}
        urls = await self._url_pipelines({i: s for i, s in wanted.items() if i not in kept})
        stream = self._streams.get(want.key)
        if stream is not None and stream.reader.spec != want:
            await self._remove_stream(want.key)  # the source itself changed: reopen
            stream = None
        new = stream is None
        if stream is None:
            reader = StreamReader(
                want,
                self._settings.reader,
                self._acquire_reconnect,
                max_retries=self._settings.max_retries,
                on_failed=self._failure_hook(want.key),
                shedding=functools.partial(self._shedding, want.key),
            )
            stream = self._streams[want.key] = _Stream(reader)
        for sub_id in [s for s in stream.subs if stream.subs[s] != wanted.get(s)]:
            await self._stop_subscription(stream, sub_id)
        for sub_id, sub in wanted.items():
            if sub_id in stream.subs:
                continue
            if sub_id in urls:
                processor = self._url_processor(sub, urls[sub_id])
                if processor is None:
                    continue  # reported; the registry's repair rounds ask again
                self._admission.attach(sub_id, (PIPELINE_DETECTOR, self._url_used[sub_id][0]))
            else:
                model_id = sub.modelId or self._ctx.default_model
                processor = SubscriptionProcessor(
                    sub,
                    model_id,
                    self._ctx.model_sizes[model_id],
                    None,
                    self._sink,
                    self._settings.processing,
                    admit=self._admitter(("model", model_id), model_id),
                )
                processor.runner = self._runner(sub, model_id, processor.on_result)
                self._admission.attach(sub_id, ("model", model_id))
            stream.subs[sub_id], stream.processors[sub_id] = sub, processor
            stream.reader.attach(sub_id, processor.mailbox)
            processor.start()
        if new:  # after attaching: a lossless replay must not read frames nobody gets
            stream.reader.start()
        elif revive:
            stream.reader.revive()

    async def _url_pipelines(
        self, wanted: dict[str, Subscription]
    ) -> dict[str, tuple[str, PipelineInfo, PipelineRuntime] | Exception]:
        """Each modelUrl subscription's pipeline (or why it cannot run now), asked of the
        catalog at once and for at most URL_LOAD_WAIT_S (an enabled one answers at once)."""
        todo: dict[str, str] = {}
        for sub_id, sub in wanted.items():
            url = url_pipeline(sub, self._ctx.model_sizes, self._ctx.url_touch_s is not None)
            if url is not None:
                todo[sub_id] = url
        found = await asyncio.gather(
            *(self._url_pipeline(u) for u in todo.values()), return_exceptions=True
        )
        out: dict[str, tuple[str, PipelineInfo, PipelineRuntime] | Exception] = {}
        for (sub_id, url), result in zip(todo.items(), found, strict=True):
            if isinstance(result, BaseException):
                out[sub_id] = result if isinstance(result, Exception) else RuntimeError()
            else:
                out[sub_id] = (url, *result)
        return out

    def _url_processor(
        self, sub: Subscription, found: tuple[str, PipelineInfo, PipelineRuntime] | Exception
    ) -> SubscriptionProcessor | None:
        """The processor of a subscription that runs its modelUrl's pipeline: detections
        on PipelineDetector (the archive's sha256 as multiplexed id), events under the
        client's own modelId (the root's when it sent none). None when the pipeline
        cannot be had now: the subscription gets a `failed` state event."""
        sub_id = sub.subscriptionIdentifier
        if isinstance(found, Exception):
            cause = getattr(found, "cause", None) or found
            error = redact_text(f"pipeline: {type(cause).__name__}: {str(cause)[:500]}")
            logger.warning("%s: %s", sub_id, error)
            if not isinstance(cause, PipelineLoading):  # still loading: not given up
                model_id = sub.modelId or ""
                event = state_event(sub_id, sub.camera_id, model_id, "failed", error)
                self._sink.publish([event])
            return None
        url, info, runtime = found
        model_id = sub.modelId or info.model_id
        admit = self._admitter((PIPELINE_DETECTOR, info.key), model_id)
        processor = SubscriptionProcessor(
            sub, model_id, info.imgsz, None, self._sink, self._settings.processing, admit=admit
        )
        processor.runner = self._runner(sub, model_id, processor.on_result, runtime)
        self._url_used[sub_id] = (info.key, url)  # attached by the caller right away
        return processor

    async def set_session(self, display_id: str, session: dict[str, Any] | None) -> int:
        """A display's session (`{"id", "data", "seq"}`; None: none any more) for its
        subscriptions' pipelines, and the ones it subscribes later. One older (`seq`)
        than the one held is ignored: calls may arrive out of order. Returns how many
        pipelines it changed."""
        held = self._sessions.get(display_id)
        seq = None if session is None else session.get("seq")
        if seq is not None and held is not None and held.get("seq", 0) > seq:
            return 0
        if session is None:
            self._sessions.pop(display_id, None)
        else:
            self._sessions[display_id] = session
        changed = 0
        for stream in self._streams.values():
            for processor in stream.processors.values():
                runner = processor.runner
                if runner is None or processor.sub.display_id != display_id:
                    continue
                if session is None or session["id"] is None:
                    changed += runner.set_session(None)
                else:
                    changed += runner.set_session(session["id"], session["data"])
        return changed

    def _shedding(self, key: str) -> bool:
        """Read on the reader threads (see `sheds_decode`)."""
        window = self._settings.reader.decode_window_s
        return sheds_decode(self._branch_clock, window, self._streams.get(key))

    def _failure_hook(self, key: str) -> Callable[[str], None]:
        """What a reader thread calls when its stream gives up: each subscription of the
        stream gets a `state` event (SSE, gRPC, /streams/{id}/events), on this loop."""
        loop = asyncio.get_running_loop()

        def publish(error: str) -> None:
            stream = self._streams.get(key)
            if stream is None or stream.reader.state is not StreamState.FAILED:
                return  # removed or revived meanwhile
            events = [
                state_event(sub_id, p.sub.camera_id, p.model_id, "failed", error)
                for sub_id, p in stream.processors.items()
            ]
            self._sink.publish(events)

        def hook(error: str) -> None:  # on the reader thread
            loop.call_soon_threadsafe(publish, error)

        return hook

    async def update_context(self, ctx: StreamContext) -> int:
        """A new pipeline version (or model set) after a redeploy: each subscription whose
        pipeline changed gets a new runner in place, between two frames. Readers,
        trackers and subscriptions go on; returns how many runners were swapped."""
        old, self._ctx = self._ctx, replace(ctx, settings=self._settings)
        self._handles.clear()  # deployments may have been replaced
        # New frames go to new dispatchers; the old ones finish what they admitted.
        self._admission.renew()
        swapped = 0
        for stream in self._streams.values():
            for sub_id, processor in stream.processors.items():
                model_id = processor.model_id
                if sub_id in self._url_used:
                    continue  # a modelUrl pipeline: its archive's content does not change
                if model_id in ctx.model_sizes:
                    processor.imgsz = ctx.model_sizes[model_id]
                if old.pipelines.get(model_id) == ctx.pipelines.get(model_id):
                    continue
                previous = processor.runner
                processor.runner = self._runner(stream.subs[sub_id], model_id, processor.on_result)
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
        self._url_used.pop(sub_id, None)
        self._admission.detach(sub_id)
        processor = stream.processors.pop(sub_id, None)
        if processor is not None:
            await processor.stop()
        self._ring.forget(sub_id)

    async def remove_stream(self, key: str) -> bool:
        async with self._stream_lock(key):
            return await self._remove_stream(key)

    async def _remove_stream(self, key: str) -> bool:
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
        revision of the context in use (the registry reconciles both); and what its fair
        shares need (`TargetAdmission.report`)."""
        running = {k: sorted(s.subs) for k, s in self._streams.items()}
        displays = {sub.display_id for s in self._streams.values() for sub in s.subs.values()}
        sessions = {d: session_digest(self._session_of(d)) for d in displays}
        live = {
            sub_id: subscription_weight(p.sub.targetFps, s.reader.offered_fps())
            for s in self._streams.values()
            if s.reader.state not in DOWN_STATES
            for sub_id, p in s.processors.items()
        }
        return {
            "streams": running,
            "context": context_revision(self._ctx),
            "sessions": sessions,
            **self._admission.report(live),  # live: subscriptions whose stream is up
        }

    async def set_admission_shares(self, shares: dict[str, float]) -> int:
        """The registry's fair shares of the cluster's detector calls, by target label
        (a target it does not name uses `calls_in_flight`). Returns the dispatchers set."""
        return self._admission.set_shares(shares)

    # ---- reporting -----------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        process = psutil.Process()
        window = self._settings.reader.decode_window_s
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
            "dispatch": self._admission.status(),
            "branch_passes_pending": self._branch_clock.pending,
            "overloaded": self._branch_clock.starved_within(window),  # branch work starved
            "detector_overloaded": self._branch_clock.detector_overloaded_within(window),
            "branch_timeouts": self._branch_clock.timeouts,
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
