"""What every integration test module shares: one app-config builder (each app keeps its
state under its own directory, never a `make run`'s), one deploy-and-always-remove context,
and one way of waiting on a condition."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.datasets import HELD_OUT_SEED_START, write_clip
from graph.config import PROJECT_ROOT, AppConfig
from tests.peers import RtspServer

DEMO_DETECTOR = PROJECT_ROOT / "models" / "demo-detector.onnx"


def demo_model(**extra: Any) -> dict[str, Any]:
    """The demo detector as a `models` entry, one ONNX Runtime thread (2 cores here)."""
    return {"id": "demo", "path": str(DEMO_DETECTOR), "intra_op_threads": 1, **extra}


def app_config(data: Path, models: list[dict[str, Any]] | None = None, **args: Any) -> AppConfig:
    """An AppConfig whose stream state and media jobs live under `data` (a test's own
    directory): `args` are the other top-level sections, merged over those defaults."""
    raw: dict[str, Any] = {"models": [demo_model()] if models is None else models, **args}
    raw["streams"] = {"state_path": str(data / "streams.json"), **raw.get("streams", {})}
    raw["jobs"] = {"jobs_dir": str(data / "jobs"), **raw.get("jobs", {})}
    if raw.get("pipelines"):
        raw.setdefault("archive_cache_dir", str(data / "archives"))
    return AppConfig.model_validate(raw)


@contextlib.contextmanager
def scene_camera(directory: Path, seed: int, copies: int = 1) -> Iterator[RtspServer]:
    """A real RTSP server (GStreamer) playing held-out synthetic scene `seed` (10 s,
    640x360, 10 fps) at mount `scene` (with copies > 1: `scene0`, `scene1`, ...)."""
    clip = write_clip(
        HELD_OUT_SEED_START + seed,
        n_frames=100,
        video_path=directory / "scene.mp4",
        fps=10,
        scale=0.5,
    )
    server = RtspServer({"scene": clip}, copies=copies).start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate: Any, timeout_s: float = 120, what: Any = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # e.g. the app is not deployed yet
            pass
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what() if callable(what) else what}")


def healthy(url: str) -> Callable[[], bool]:
    """A predicate: the app at `url` reports every model ready."""
    return lambda: httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


@contextlib.contextmanager
def deployed(
    name: str,
    application: Any,
    route_prefix: str = "/",
    ready: Callable[[], Any] | None = None,
    what: str = "the app to be ready",
) -> Iterator[None]:
    """`serve.run` the application, wait until `ready`, and remove it and its detached
    actors afterwards whatever happened (a failed start must not leave its route prefix
    to the next module)."""
    from ray import serve

    try:
        serve.run(application, name=name, route_prefix=route_prefix)
        if ready is not None:
            wait_until(ready, what=what)
        yield
    finally:
        remove_app(name)


def detector_stats(app: str, model_id: str = "demo") -> dict[str, Any]:
    """The counters of the (single) replica of Detector_<model_id> in `app`."""
    from ray import serve

    from graph.common.names import detector_name

    handle = serve.get_deployment_handle(detector_name(model_id), app_name=app)
    return handle.stats.remote().result(timeout_s=30)


def remove_app(app: str) -> None:
    """Delete a test app and its detached actors, which outlive it: the stream registry
    (stopping its camera actors first), the EventHub, the media jobs actor and the
    pipeline catalog. Each step
    runs whatever the previous one did."""
    import ray
    from ray import serve

    from graph.common.names import (
        STREAMS_NAMESPACE,
        catalog_name,
        hub_name,
        jobs_actor_name,
        registry_name,
    )

    def kill(name: str, shutdown: bool = False) -> None:
        try:
            actor = ray.get_actor(name, STREAMS_NAMESPACE)
        except ValueError:  # no such actor
            return
        try:
            if shutdown:
                ray.get(actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(actor, no_restart=True)

    try:
        kill(registry_name(app), shutdown=True)  # the cameras first: they publish to the hub
    finally:
        try:
            serve.delete(app)  # then the ingress, which reads the hub
        finally:
            kill(hub_name(app))
            kill(jobs_actor_name(app))
            kill(catalog_name(app))
