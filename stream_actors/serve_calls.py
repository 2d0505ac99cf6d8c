"""How a camera actor reaches the app's Serve deployments: cached deployment handles
(one router per deployment for the whole actor) and the detector call a dispatcher
sends through."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ray.serve.exceptions import BackPressureError

from graph.common.detection import DetectRequest, DetectResult
from graph.common.errors import DetectorBusy
from stream_actors.dispatch import SendFn

logger = logging.getLogger("camgraph.streams")

REPLICAS_REFRESH_S = 10.0  # how often the registry asks Serve for the replicas
REPLICAS_STALE_S = 60.0  # an answer older than this is none (a controller that hangs)


class ServeHandles:
    """Deployment handles of one app, made once each (a redeploy `clear`s them)."""

    def __init__(self, app_name: str) -> None:
        self._app = app_name
        self._plain: dict[str, Any] = {}
        self._mux: dict[tuple[str, str], Any] = {}  # (deployment, multiplexed id) → handle

    def get(self, name: str) -> Any:
        handle = self._plain.get(name)
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(name, app_name=self._app)
            self._plain[name] = handle
        return handle

    def mux(self, name: str, model_id: str) -> Any:
        """A handle on a multiplexed deployment for one model (routed to the replicas
        that hold it); all share the deployment's router."""
        handle = self._mux.get((name, model_id))
        if handle is None:
            handle = self.get(name).options(multiplexed_model_id=model_id)
            self._mux[(name, model_id)] = handle
        return handle

    def clear(self) -> None:
        """Deployments may have been replaced (a redeploy): handles are made anew."""
        self._plain.clear()
        self._mux.clear()


def detector_sender(handle: Any, model_id: str) -> SendFn:
    """A dispatcher's calls to a detector deployment (`detect_many`): Serve's back
    pressure becomes camgraph's `DetectorBusy`, and a call cancelled by the dispatcher's
    timeout is cancelled in the replica too."""
    # This dispatcher in the replicas' load reports, and its reports' numbers (the
    # replicas keep the last they heard; the policy takes the latest of them).
    caller, seqs = uuid.uuid4().hex[:16], itertools.count(1)

    async def send(requests: list[DetectRequest], waiting: int) -> list[DetectResult | Exception]:
        response = handle.detect_many.remote(requests, caller, waiting, next(seqs))
        try:
            results: list[DetectResult | Exception] = await response
        except BackPressureError as exc:  # the processor knows no Ray: camgraph's own
            raise DetectorBusy(model_id, str(exc)) from exc
        except asyncio.CancelledError:  # timed out: the replica must not go on with it
            response.cancel()
            raise
        return results

    return send


def running_replicas(app_name: str) -> dict[str, int]:
    """The running replicas of each deployment of the app, as Serve's controller says
    (blocking, without a timeout of its own: see `ReplicaCounts`). {} when the app is
    not deployed."""
    from ray import serve

    return running_counts(serve.status(), app_name)


def running_counts(status: Any, app_name: str) -> dict[str, int]:
    """`serve.status()`'s running replicas per deployment of one app (Serve keys
    `replica_states` by the state's name)."""
    app = status.applications.get(app_name)
    if app is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}


class ReplicaCounts:
    """What `ask` (e.g. `running_replicas` of the app) last answered, asked again at
    most every `refresh_s` in the background: `get()` never waits for Serve's controller
    (the registry asks in its repair round, under its lock). One ask at a time, on a
    daemon thread of its own: a controller that never answers (a blocking `ray.get`
    without a timeout) holds that thread alone, not a pool the registry needs, and
    no new one starts meanwhile. An answer older than `stale_s` is none ({}: the
    callers fall back to calls per actor); going stale is logged once."""

    def __init__(
        self,
        ask: Callable[[], dict[str, int]],
        refresh_s: float = REPLICAS_REFRESH_S,
        stale_s: float = REPLICAS_STALE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ask, self._refresh_s, self._stale_s, self._clock = ask, refresh_s, stale_s, clock
        self._lock = threading.Lock()  # the asking thread writes, get() reads
        self._counts: dict[str, int] = {}
        self._answered = -float("inf")
        self._asked = -float("inf")
        self._asking = False
        self._said_stale = True  # nothing to say before a first answer

    def get(self) -> dict[str, int]:
        """The last answer (if not stale); starts the next ask when one is due."""
        now = self._clock()
        with self._lock:
            start = not self._asking and now - self._asked >= self._refresh_s
            if start:
                self._asking, self._asked = True, now
            fresh = now - self._answered < self._stale_s
            counts = dict(self._counts) if fresh else {}
            say_stale = not fresh and not self._said_stale
            self._said_stale = self._said_stale or say_stale
        if say_stale:
            logger.warning(
                "detector replicas: Serve's last answer is over %.0f s old; calls per "
                "camera actor until it answers again",
                self._stale_s,
            )
        if start:
            try:
                threading.Thread(target=self._run, name="serve-replicas", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: asked again when due
                logger.warning("detector replicas not asked: %s", exc)
                with self._lock:
                    self._asking = False
        return counts

    @property
    def asking(self) -> bool:
        with self._lock:
            return self._asking

    def _run(self) -> None:
        counts: dict[str, int] | None = None
        try:
            counts = dict(self._ask())
        except BaseException as exc:  # its type only: a schema error's text may quote args
            logger.warning("detector replicas unknown: %s", type(exc).__name__)
        finally:
            with self._lock:
                if counts is not None:
                    self._counts, self._answered, self._said_stale = counts, self._clock(), False
                self._asking = False
