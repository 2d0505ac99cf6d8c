"""The camgraph phase: cameras subscribed to an already deployed camgraph over HTTP.

Counts come from `GET /streams` (each subscription's `received`, `processed` and
`drops`) read at both ends of the window; latencies from the detection events
(`captured_at`, `detected_at`) polled from `GET /streams/{id}/events`; capture → event
as a client sees it, from an SSE client on `GET /events` during the window; CPU and memory
from the local Ray cluster's processes; the detector's batch sizes from every
replica's own counters (when the harness deployed camgraph itself). `local_camgraph`
deploys a plain-detector variant of serve_config.yaml on a cluster of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.baselines import Camera, Mode
from benchmarks.measure import CameraResult, PhaseResult, ProcessSampler, ray_selector
from benchmarks.peers import free_port
from benchmarks.stats import BatchDistribution, DropAccount, percentile
from benchmarks.workers import progress_bar
from graph.ray_settings import LEAN_ENV

DISPLAY_ID = "bench"


def subscription_id(camera: Camera) -> str:
    return f"{DISPLAY_ID};{camera.name}"


def subscription_body(camera: Camera, model_id: str, mode: Mode) -> dict[str, Any]:
    """The `POST /streams` body (stream_actors.subscriptions.Subscription)."""
    body: dict[str, Any] = {"subscriptionIdentifier": subscription_id(camera), "modelId": model_id}
    if camera.is_rtsp:
        body["rtspUrl"] = camera.url
    else:
        body.update(fileUrl=camera.url, fileLoop=True, fileRealtime=mode == "realtime")
    return body


# ---- counters from GET /streams ------------------------------------------------------


def subscription_counters(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each subscription's cumulative counters, with its stream's decode mode and state."""
    out: dict[str, dict[str, Any]] = {}
    for stream in listing.get("streams", []):
        for sub in stream.get("subscriptions", []):
            out[sub["subscription_id"]] = {
                "received": int(sub.get("received", 0)),
                "processed": int(sub.get("processed", 0)),
                "drops": {k: int(v) for k, v in (sub.get("drops") or {}).items()},
                "pipeline": "pipeline" in sub,
                "state": stream.get("state"),
                "decode": stream.get("decode"),
                "take_age_ms_p50": sub.get("take_age_ms_p50"),
            }
    return out


def take_age_median(counters: dict[str, dict[str, Any]], subs: Iterable[str]) -> float | None:
    """The median over the cameras of each one's median frame age when its frame was
    taken for the detector (the part of capture → detection before the call); None
    when no camera reports it."""
    ages = sorted(
        float(a) for s in subs if (a := counters.get(s, {}).get("take_age_ms_p50")) is not None
    )
    return ages[len(ages) // 2] if ages else None


def missing_from(counters: dict[str, Any], subs: Iterable[str]) -> list[str]:
    """The subscriptions a `GET /streams` listing did not report (an actor that did not
    answer in time is left out of it)."""
    return [s for s in subs if s not in counters]


def window_account(
    start: dict[str, Any] | None, end: dict[str, Any], tolerance: int
) -> DropAccount:
    """Counter deltas over the window. Frames held at either end (the pending slot and
    up to max_in_flight at the detector) are not reported, hence the tolerance."""
    before = start or {"received": 0, "processed": 0, "drops": {}}
    drops = {r: n - before["drops"].get(r, 0) for r, n in end["drops"].items()}
    return DropAccount(
        offered=end["received"] - before["received"],
        processed=end["processed"] - before["processed"],
        drops={r: n for r, n in drops.items() if n},
        in_flight=0,
        tolerance=tolerance,
    )


def actor_cpu_s(listing: dict[str, Any]) -> dict[str, float]:
    return {
        name: float(a["cpu_times_s"])
        for name, a in listing.get("actors", {}).items()
        if a.get("cpu_times_s") is not None
    }


# ---- detector batch sizes, exact, from every replica's counters ------------------------


def replica_batch_sizes(model_id: str, app_name: str, max_calls: int = 64) -> dict[int, int] | None:
    """Batches by size so far, summed over the running replicas of Detector_<model_id>
    (each counts its own: `Detector.stats()["batch_sizes"]`). Needs this process to be
    connected to the cluster (`local_camgraph`); None otherwise. A handle call reaches
    one replica: calls repeat until every running replica answered."""
    import ray

    if not ray.is_initialized():
        return None
    from ray import serve

    name = f"Detector_{model_id}"
    status = serve.status().applications[app_name].deployments[name]
    running = sum(n for state, n in status.replica_states.items() if state == "RUNNING")
    handle = serve.get_deployment_handle(name, app_name=app_name)
    seen: dict[str, dict[int, int]] = {}
    for _ in range(max_calls):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = {int(k): int(v) for k, v in stats["batch_sizes"].items()}
        if len(seen) >= running:
            break
    merged: dict[int, int] = {}
    for sizes in seen.values():
        for size, n in sizes.items():
            merged[size] = merged.get(size, 0) + n
    return merged


def batch_distribution(
    start: dict[int, int] | None, end: dict[int, int] | None
) -> BatchDistribution | None:
    """Batches completed between two readings (exact sizes)."""
    if end is None:
        return None
    before = start or {}
    return BatchDistribution.from_histogram({k: n - before.get(k, 0) for k, n in end.items()})


# ---- the phase -----------------------------------------------------------------------


def resolve_model(client: httpx.Client, model_id: str | None) -> tuple[str, dict[str, Any]]:
    """The model to subscribe with (given, else the default) and its /health entry."""
    health = client.get("/health").json()
    chosen = model_id or health.get("default_model")
    entry = health.get("models", {}).get(chosen)
    if entry is None:
        raise RuntimeError(
            f"camgraph serves no model {chosen!r}: {sorted(health.get('models', {}))}"
        )
    if entry.get("state") != "enabled":
        raise RuntimeError(f"model {chosen} is {entry.get('state')}: {entry.get('error')}")
    return str(chosen), entry


def run_camgraph(
    url: str,
    sources: Sequence[Camera],
    seconds: float,
    warmup_s: float,
    *,
    mode: Mode = "realtime",
    model_id: str | None = None,
    poll_s: float = 2.0,
    max_in_flight: int = 1,
    progress: bool = True,
    transport: httpx.BaseTransport | None = None,
    app_name: str = "camgraph",
) -> PhaseResult:
    """Subscribe every camera, discard the warm-up, measure, unsubscribe.
    `max_in_flight` is camgraph's `streams.processing.max_in_flight` (the books'
    tolerance); `transport` replaces the network (tests)."""
    phase = PhaseResult("camgraph", "camgraph", mode, len(sources), seconds)
    subs = {subscription_id(c): c for c in sources}
    with httpx.Client(base_url=url, timeout=30, transport=transport) as client:
        try:
            model, entry = resolve_model(client, model_id)
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            phase.error = f"camgraph at {url} not usable: {exc}"
            return phase
        phase.extra.update(url=url, model_id=model, providers=entry.get("providers"))
        try:
            _measure(
                client,
                phase,
                subs,
                model,
                seconds,
                warmup_s,
                mode,
                poll_s,
                max_in_flight,
                progress,
                app_name,
            )
        except (httpx.HTTPError, RuntimeError) as exc:
            phase.error = f"{type(exc).__name__}: {exc}"
        finally:
            for sub_id in subs:
                with contextlib.suppress(httpx.HTTPError):
                    client.delete(f"/streams/{sub_id}")
    return phase


class EventListener(threading.Thread):
    """An SSE client on `GET /events`: capture → event latency as a client sees it (its
    receive time minus the frame's capture time) for detection events captured in the
    window. The harness and camgraph share a clock: one machine."""

    def __init__(self, url: str, subs: Sequence[str], start: float, end: float) -> None:
        super().__init__(daemon=True, name="bench-sse")
        self.url, self.subs, self.start_at, self.end_at = url, list(subs), start, end
        self.latencies_ms: list[float] = []
        self.dropped = 0
        self.error: str | None = None
        self._stop = threading.Event()

    def run(self) -> None:
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("subscription", s) for s in self.subs
        ]
        params.append(("type", "detection"))
        try:
            timeout = httpx.Timeout(10.0, read=20.0)
            with httpx.stream("GET", f"{self.url}/events", params=params, timeout=timeout) as r:
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if not line.startswith("data: "):
                        continue
                    received = time.time()
                    event = json.loads(line[6:])
                    if event.get("type") == "dropped":
                        self.dropped += int(event.get("count", 0))
                        continue
                    captured = float(event["data"]["captured_at"])
                    if self.start_at <= captured <= self.end_at:
                        self.latencies_ms.append((received - captured) * 1000.0)
        except Exception as exc:  # reported in the phase's notes
            if not self._stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._stop.set()  # the next event or heartbeat ends the loop; daemon either way

    def note(self) -> str:
        if self.error is not None:
            return f"capture -> event not measured: the SSE client failed ({self.error})"
        values = self.latencies_ms
        if not values:
            return "capture -> event not measured: no detection event reached the SSE client"
        p50, p95, p99 = (round(percentile(values, q)) for q in (50, 95, 99))
        return (
            f"capture -> event at an SSE client: p50 {p50} ms, p95 {p95} ms, p99 {p99} ms "
            f"over {len(values)} events ({self.dropped} dropped)"
        )


def _measure(
    client: httpx.Client,
    phase: PhaseResult,
    subs: dict[str, Camera],
    model: str,
    seconds: float,
    warmup_s: float,
    mode: Mode,
    poll_s: float,
    max_in_flight: int,
    progress: bool,
    app_name: str,
) -> None:
    for sub_id, camera in subs.items():
        client.delete(f"/streams/{sub_id}")  # a leftover of an interrupted run
        r = client.post("/streams", json=subscription_body(camera, model, mode))
        if r.status_code != 201:
            raise RuntimeError(f"POST /streams {sub_id}: {r.status_code} {r.text[:300]}")
    _wait_running(client, subs)  # camera actors take seconds to start: not warm-up yet
    start = time.time()
    measure_start, end = start + warmup_s, start + warmup_s + seconds
    cursors = dict.fromkeys(subs, 0)
    latencies: dict[str, list[float]] = {s: [] for s in subs}
    keep_latency = mode == "realtime"  # lossless replays are stamped with the file's clock
    sampler = ProcessSampler(ray_selector())
    first: dict[str, Any] | None = None
    first_at, actors_before, batch_start, polled_at = 0.0, {}, None, 0.0
    bar = progress_bar(end - start, f"camgraph {len(subs)} cam {mode}", progress)
    listener = EventListener(str(client.base_url).rstrip("/"), list(subs), measure_start, end)
    if keep_latency:
        listener.start()
    try:
        while (now := time.time()) < end:
            if first is None and now >= measure_start:
                listing = client.get("/streams").json()
                counters = subscription_counters(listing)
                if missing_from(counters, subs) and now < measure_start + seconds / 2:
                    # An actor that did not answer this listing: its cameras would count
                    # from zero. The window starts once every camera is in it.
                    time.sleep(0.2)
                    continue
                first, first_at = counters, time.time()
                if foreign := sorted(set(counters) - set(subs)):
                    # Another camera on this camgraph takes detector time and places.
                    phase.notes.append(f"other subscriptions ran meanwhile: {foreign}")
                actors_before = actor_cpu_s(listing)
                batch_start = replica_batch_sizes(model, app_name)
                sampler.start()
                for sub_id in subs:  # events before the window are warm-up
                    cursors[sub_id] = _poll_events(client, sub_id, cursors[sub_id], 0, 0, None)
                polled_at = time.time()
            elif first is not None and keep_latency and now - polled_at >= poll_s:
                for sub_id in subs:
                    cursors[sub_id] = _poll_events(
                        client, sub_id, cursors[sub_id], measure_start, end, latencies[sub_id]
                    )
                polled_at = time.time()
            bar.n = round(now - start, 1)
            bar.refresh()
            time.sleep(min(0.5, max(0.0, end - time.time())))
    finally:
        bar.close()
    if keep_latency:  # events of the window's last frames are on their way
        time.sleep(1.0)
        listener.stop()
        if listener.latencies_ms:
            phase.extra["capture_to_event_ms"] = {
                q: round(percentile(listener.latencies_ms, float(q[1:])), 1)
                for q in ("p50", "p95", "p99")
            }
    listing = client.get("/streams").json()
    last, last_at = subscription_counters(listing), time.time()
    if first is None:
        raise RuntimeError("the measured window never started")
    phase.usage = sampler.stop()
    batch_end = replica_batch_sizes(model, app_name)
    if keep_latency:
        for sub_id in subs:  # detections of the window's last moments
            _poll_events(client, sub_id, cursors[sub_id], measure_start, end, latencies[sub_id])
    window_s = last_at - first_at
    for sub_id, camera in subs.items():
        if sub_id not in last:
            phase.notes.append(f"{sub_id} missing from GET /streams at the end")
            continue
        if sub_id not in first:  # never counted at the start: its totals are no window's
            phase.notes.append(f"{sub_id} missing from GET /streams at the window's start")
            continue
        account = window_account(first[sub_id], last[sub_id], max_in_flight + 1)
        phase.per_camera.append(CameraResult(camera.name, account, window_s, latencies[sub_id]))
    phase.extra.update(decode={s: last[s]["decode"] for s in subs if s in last}, poll_s=poll_s)
    phase.extra["take_age_ms_p50"] = take_age_median(last, subs)
    if any(last[s]["pipeline"] for s in subs if s in last):
        phase.notes.append(f"{model} is a pipeline root: its branches and actions ran too")
    actors_after = actor_cpu_s(listing)
    used_s = sum(t - actors_before.get(a, t) for a, t in actors_after.items())
    phase.extra["camera_actors_cpu_pct"] = round(100 * used_s / window_s, 1) if window_s else None
    _record_batches(phase, batch_distribution(batch_start, batch_end))
    if keep_latency:
        phase.notes.append(listener.note())
    else:
        phase.notes.append("lossless replay: latency not comparable, not reported")


def _wait_running(client: httpx.Client, subs: dict[str, Camera], timeout_s: float = 120.0) -> None:
    """Until every subscription has processed a frame (or RuntimeError with why not)."""
    deadline, waiting = time.monotonic() + timeout_s, list(subs)
    while time.monotonic() < deadline:
        counters = subscription_counters(client.get("/streams").json())
        waiting = [s for s in subs if counters.get(s, {}).get("processed", 0) < 1]
        if not waiting:
            return
        time.sleep(0.5)
    raise RuntimeError(f"no frame processed within {timeout_s:g}s for {waiting}")


def _record_batches(phase: PhaseResult, dist: BatchDistribution | None) -> None:
    if dist is None:
        phase.extra["batch_sizes"] = None
        phase.notes.append(
            "detector batch sizes not measured: they are read from the replicas, which "
            "needs the cluster the harness deployed (--deploy)"
        )
        return
    phase.extra["batch_sizes"] = {
        "batches_by_size": {str(k): v for k, v in dist.counts.items()},
        "batches": dist.batches,
        "mean": round(dist.mean, 3) if dist.mean is not None else None,
    }


def _poll_events(
    client: httpx.Client,
    sub_id: str,
    after: int,
    window_start: float,
    window_end: float,
    latencies: list[float] | None,
) -> int:
    """Read new events, record detection latencies inside the window; the new cursor."""
    r = client.get(f"/streams/{sub_id}/events", params={"after": after})
    if r.status_code != 200:
        return after
    for event in r.json():
        after = max(after, int(event["id"]))
        if latencies is None or event.get("kind") != "detection":
            continue
        captured, detected = float(event["captured_at"]), float(event["detected_at"])
        if window_start <= detected < window_end:
            latencies.append((detected - captured) * 1000)
    return after


# ---- deploying (for `--deploy`; the harness assumes a running camgraph otherwise) ------


def bench_serve_config(
    base: dict[str, Any], model_path: str, model_id: str = "bench_det", imgsz: int = 640
) -> dict[str, Any]:
    """serve_config.yaml with a plain detector instead of the pipelines: the model the
    baselines run, no branches or actions, and the base detector's deployment settings
    (replicas, threads, batching) carried over."""
    config = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    app = config["applications"][0]
    args = app.setdefault("args", {})
    threads = 1
    pipelines = args.get("pipelines")
    archives = pipelines.get("archives", []) if isinstance(pipelines, dict) else pipelines
    if archives:
        threads = archives[0].get("intra_op_threads", 1)
    args.pop("pipelines", None)
    args.pop("actions", None)
    args["models"] = [
        {"id": model_id, "path": model_path, "imgsz": imgsz, "intra_op_threads": threads}
    ]
    args.setdefault("ingress", {})["default_model"] = model_id
    kept = []
    detector_done = False
    for dep in app.get("deployments", []):
        name = dep.get("name", "")
        if name.startswith("Detector_") and not detector_done:
            kept.append({**dep, "name": f"Detector_{model_id}"})
            detector_done = True
        elif name == "Ingress":
            kept.append(dep)
    app["deployments"] = kept
    return config


def with_own_state(config: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """The config with the registry's persisted subscriptions in `state_dir`, not the
    default `data/streams.json`: that file is `make run`'s, and its registry would
    restore `make run`'s demo camera (and any camera left by a run that was killed)
    into the benchmark, where it takes detector time and a place on the first camera
    actor."""
    config = json.loads(json.dumps(config))
    for app in config.get("applications", []):
        streams = app.setdefault("args", {}).setdefault("streams", {})
        streams["state_path"] = str(state_dir / f"streams-{app.get('name', 'app')}.json")
    return config


@contextlib.contextmanager
def local_camgraph(
    config: dict[str, Any], config_path: Path, *, cpus: int, timeout_s: float = 240.0
) -> Iterator[str]:
    """A Ray cluster of this process's own (never one that `make run` left), the config
    deployed on it the operators' way (`serve deploy` through the dashboard), on free
    ports; yields camgraph's URL and stops everything on exit."""
    import ray
    from ray import serve

    dashboard_port = free_port()
    state_dir = Path(tempfile.mkdtemp(prefix="camgraph-bench-state-"))
    os.environ.pop("RAY_ADDRESS", None)
    for key, value in LEAN_ENV.items():  # as `make run` starts Ray; the workers inherit it
        os.environ.setdefault(key, value)
    try:
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=False,
        )
    except BaseException:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    try:
        # Serve's ports are taken once Ray's own (some random) are bound: none collide.
        http_port = free_port()
        config = with_own_state(config, state_dir)
        config = {**config, "http_options": {"host": "127.0.0.1", "port": http_port}}
        if "grpc_options" in config:  # a free port too: never 9000 of a `make run` cluster
            config["grpc_options"] = {**config["grpc_options"], "port": free_port()}
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        url = f"http://127.0.0.1:{http_port}"
        serve_cli = Path(sys.executable).with_name("serve")
        subprocess.run(
            [
                str(serve_cli),
                "deploy",
                str(config_path),
                "--address",
                f"http://127.0.0.1:{dashboard_port}",
            ],
            env=_ray_env(),
            check=True,
            timeout=120,
        )
        wait_healthy(url, timeout_s)
        yield url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(state_dir, ignore_errors=True)


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{url}/health", timeout=5).json()
            if body.get("status") == "ok":
                return
            last = json.dumps(body.get("models", {}))[:300]
        except (httpx.HTTPError, ValueError) as exc:
            last = str(exc)
        time.sleep(1)
    raise RuntimeError(f"camgraph not ready after {timeout_s}s: {last}")


def _ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env
