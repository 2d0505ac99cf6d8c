"""Camera streams on the deployed graph against real peers: a GStreamer RTSP server
(killed, restarted and frozen for real) and a real HTTP snapshot server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import ray

from demo.datasets import HELD_OUT_SEED_START, write_clip
from demo.metrics import id_switches, iou_matrix
from deployments.detector import Detector
from deployments.ingress import Ingress
from graph.app import Deployments, build_graph
from graph.common.names import STREAMS_NAMESPACE, registry_name
from stream_actors.dispatch import DispatchSettings
from tests.integration.apps import app_config, deployed, wait_until
from tests.peers import RtspServer, SnapshotServer

pytestmark = pytest.mark.integration
APP = "camgraph-streams-test"
CAMERAS = 16
WATCHDOG_S = 4.0
BACKOFF_CAP_S = 2.0
OPEN_TIMEOUT_S = 3.0
BREAKER_OPEN_S = 5.0
# Far above what an outage of the other tests costs (≤ 5 failures in a row), reached by
# a dead URL in about 30 s (the circuit's trials come every BREAKER_OPEN_S).
MAX_RETRIES = 8
FAIR_FRAMES = 50
FAIR_WINDOW_CAP_S = 300.0
DETECTOR_REPLICAS = 2
# The cluster's detector calls the registry divides: calls_per_replica × running replicas
BUDGET = (DispatchSettings().calls_per_replica or 0) * DETECTOR_REPLICAS


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A held-out synthetic scene at 640x360, 10 fps, 20 s, with its ground truth."""
    out = tmp_path_factory.mktemp("clip") / "scene.mp4"
    return write_clip(HELD_OUT_SEED_START + 23, n_frames=200, video_path=out, fps=10, scale=0.5)


@pytest.fixture(scope="module")
def rtsp(clip: Path) -> Iterator[RtspServer]:
    server = RtspServer({"scene": clip}, copies=CAMERAS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = app_config(
        tmp_path_factory.mktemp("state"),
        streams={
            "streams_per_actor": 4,
            "reconcile_s": 1.0,
            "max_retries": MAX_RETRIES,
            "reader": {
                "open_timeout_s": OPEN_TIMEOUT_S,
                "read_timeout_s": 3.0,
                "watchdog_s": WATCHDOG_S,
                "backoff_base_s": 0.3,
                "backoff_cap_s": BACKOFF_CAP_S,
                "breaker_failures": 3,
                "breaker_open_s": BREAKER_OPEN_S,
            },
        },
    )
    detector = Detector.options(
        num_replicas=DETECTOR_REPLICAS,
        max_ongoing_requests=24,
        ray_actor_options={"num_cpus": 0.5},
    )
    graph = build_graph(config, Deployments(detector, Ingress.options(num_replicas=1)))
    with deployed(APP, graph):
        yield cluster["http_url"]


def subscribe(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{url}/streams", json=body, timeout=30)
    assert response.status_code == 201, response.text
    return dict(response.json())


def unsubscribe(url: str, sub_id: str) -> None:
    response = httpx.delete(f"{url}/streams/{sub_id}", timeout=30)
    assert response.status_code == 204, response.text


def streams(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/streams", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def stream_of(url: str, sub_id: str) -> dict[str, Any] | None:
    for stream in streams(url)["streams"]:
        if sub_id in stream["subscription_ids"]:
            return dict(stream)
    return None


def sub_status(stream: dict[str, Any], sub_id: str) -> dict[str, Any]:
    return next(s for s in stream["subscriptions"] if s["subscription_id"] == sub_id)


def in_state(url: str, sub_id: str, *states: str) -> dict[str, Any] | None:
    stream = stream_of(url, sub_id)
    return stream if stream is not None and stream.get("state") in states else None


def processed(url: str, sub_id: str) -> int:
    stream = stream_of(url, sub_id)
    if stream is None or not stream["subscriptions"]:
        return 0
    return int(sub_status(stream, sub_id)["processed"])


def events(url: str, sub_id: str, after: int = 0) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/streams/{sub_id}/events", params={"after": after}, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json())


def test_bad_subscribe_bodies_get_422_naming_the_field(app: str) -> None:
    cases = {
        "subscriptionIdentifier": {
            "subscriptionIdentifier": "no-semicolon",
            "rtspUrl": "rtsp://x/",
        },
        "rtspUrl": {"subscriptionIdentifier": "d;c", "rtspUrl": "http://not-rtsp/"},
        "fileUrl": {"subscriptionIdentifier": "d;c", "fileUrl": "relative.mp4"},
        "targetFps": {"subscriptionIdentifier": "d;c", "rtspUrl": "rtsp://h/", "targetFps": -1},
        "modelId": {"subscriptionIdentifier": "d;c", "rtspUrl": "rtsp://h/", "modelId": "nope"},
    }
    for field, body in cases.items():
        response = httpx.post(f"{app}/streams", json=body, timeout=30)
        assert response.status_code == 422, (field, response.text)
        assert field in json.dumps(response.json()["detail"]), (field, response.text)
    mixed = {"subscriptionIdentifier": "d;c", "rtspUrl": "rtsp://h/", "fileUrl": "/data/a.mp4"}
    response = httpx.post(f"{app}/streams", json=mixed, timeout=30)
    assert response.status_code == 422 and "fileUrl cannot be combined" in response.text
    none = {"subscriptionIdentifier": "d;c"}
    response = httpx.post(f"{app}/streams", json=none, timeout=30)
    assert response.status_code == 422 and "one of rtspUrl, snapshotUrl, fileUrl" in response.text
    assert httpx.delete(f"{app}/streams/d;unknown", timeout=30).status_code == 404
    assert httpx.get(f"{app}/cameras/unknown/image", timeout=30).status_code == 404
    assert httpx.get(f"{app}/camera/unknown/image", timeout=30).status_code == 404


def aligned_tracks(
    evts: list[dict[str, Any]], truth: dict[str, Any]
) -> list[list[tuple[int, tuple[float, ...]]]]:
    """The RTSP stream loops and frames are dropped under load, so each processed frame
    is placed on the truth timeline by its detections: the truth frame whose vehicle
    boxes they match best (objects move, so the best frame is unambiguous)."""
    truth_boxes = [
        np.array([o["box"] for o in f["objects"] if o["cls"] == "vehicle"], np.float32).reshape(
            -1, 4
        )
        for f in truth["frames"]
    ]
    placed = []
    for event in evts:
        boxes = np.array(
            [d["box"] for d in event["detections"] if d["label"] == "vehicle"], np.float32
        ).reshape(-1, 4)
        scores = [
            float((iou_matrix(boxes, t).max(axis=1) > 0.7).sum()) if len(t) and len(boxes) else 0
            for t in truth_boxes
        ]
        placed.append(int(np.argmax(scores)))
    return placed  # type: ignore[return-value]


def test_tracked_objects_from_rtsp_match_the_ground_truth(
    app: str, rtsp: RtspServer, clip: Path
) -> None:
    """Given a synthetic scene served over RTSP, when it is tracked for one full loop,
    then each ground-truth vehicle keeps one track id (ID switches <= 2 per 100)."""
    truth = json.loads(clip.with_suffix(".json").read_text())
    sub = "track;cam-track"
    subscribe(app, {"subscriptionIdentifier": sub, "rtspUrl": rtsp.url("scene0")})
    wait_until(lambda: processed(app, sub) > 0, 60, "the first processed frame")
    evts: list[dict[str, Any]] = []
    deadline = time.monotonic() + 2.5 * len(truth["frames"]) / truth["fps"]
    while time.monotonic() < deadline:
        evts += events(app, sub, evts[-1]["id"] if evts else 0)
        time.sleep(2)
    unsubscribe(app, sub)
    detections = [e for e in evts if e["kind"] == "detection"]
    placed = aligned_tracks(detections, truth)
    # One whole loop: from the first frame placed near the start to where it wraps again.
    starts = [i for i in range(1, len(placed)) if placed[i] < placed[i - 1] - 50]
    assert starts, f"no loop boundary seen in {len(placed)} frames"
    segment = range(starts[0], starts[1] if len(starts) > 1 else len(placed))
    assert len(segment) >= 0.5 * len(truth["frames"]), "too few frames processed in a loop"
    truths, tracks = [], []
    for i in segment:
        frame = truth["frames"][placed[i]]
        truths.append(
            [
                (o["object_id"], o["box"])
                for o in frame["objects"]
                if o["cls"] == "vehicle" and o["visible_fraction"] >= 0.5 and not o["truncated"]
            ]
        )
        tracks.append(
            [
                (d["track_id"], d["box"])
                for d in detections[i]["detections"]
                if d["track_id"] is not None and d["label"] == "vehicle"
            ]
        )
    switches, objects = id_switches(truths, tracks)
    print(f"vehicles tracked over RTSP: {objects}, id switches: {switches}")
    assert objects >= 8
    assert switches <= max(1, round(0.02 * objects))
    lifecycle = {k: sum(e["kind"] == k for e in evts) for k in ("new", "updated", "lost")}
    assert lifecycle["new"] >= objects // 2 and lifecycle["lost"] >= 1, lifecycle


def test_rtsp_server_killed_restarted_and_frozen(app: str, clip: Path) -> None:
    """Given a camera on its own RTSP server: when the server dies and comes back, the
    stream resumes within the backoff bound; when it freezes past the watchdog, the
    reader reconnects and no reader thread is left hanging; the actor never dies."""
    server = RtspServer({"cam": clip}).start()
    sub = "ops;cam-ops"
    try:
        subscribe(app, {"subscriptionIdentifier": sub, "rtspUrl": server.url("cam")})
        wait_until(lambda: in_state(app, sub, "connected"), 60, "connected")
        pid = streams(app)["actors"]
        server.stop()
        wait_until(lambda: in_state(app, sub, "reconnecting", "circuit_open"), 30, "reconnecting")
        time.sleep(3)
        server.start()
        back = time.monotonic()
        wait_until(lambda: in_state(app, sub, "connected"), 60, "connected again")
        resumed_s = time.monotonic() - back
        # The next attempt comes within one capped backoff (or the circuit's cool-down, if
        # the outage opened it); opening then takes less than the open timeout.
        bound = max(BACKOFF_CAP_S, BREAKER_OPEN_S) + OPEN_TIMEOUT_S + 2
        print(f"resumed {resumed_s:.1f}s after the server came back (bound {bound:.0f}s)")
        assert resumed_s <= bound, resumed_s
        frames_before = in_state(app, sub, "connected")["frames_read"]  # type: ignore[index]
        server.freeze()
        time.sleep(WATCHDOG_S + 6)
        frozen = stream_of(app, sub)
        assert frozen is not None and frozen["state"] != "connected", frozen
        assert frozen["watchdog_restarts"] + frozen["reconnects"] >= 2, frozen
        server.thaw()
        wait_until(lambda: in_state(app, sub, "connected"), 60, "connected after the freeze")
        stream = wait_until(
            lambda: (s := in_state(app, sub, "connected")) and s["reader_threads"] == 1 and s,
            30,
            "stuck reader threads to exit",
        )
        assert stream["frames_read"] > frames_before
        print(f"outages (failure → first frame again), s: {stream['outages_s']}")
        assert streams(app)["actors"].keys() == pid.keys()
        assert all(streams(app)["actors"][name]["pid"] == pid[name]["pid"] for name in pid), (
            "a camera actor died"
        )
    finally:
        server.stop()
        unsubscribe(app, sub)


def test_two_subscriptions_share_one_stream_until_the_last_leaves(
    app: str, rtsp: RtspServer
) -> None:
    url = rtsp.url("scene1")
    subscribe(app, {"subscriptionIdentifier": "d1;cam-shared", "rtspUrl": url})
    subscribe(
        app,
        {
            "subscriptionIdentifier": "d2;cam-shared",
            "rtspUrl": url,
            "targetFps": 2,
            "cropX1": 0,
            "cropY1": 0,
            "cropX2": 320,
            "cropY2": 360,
        },
    )
    shared = [s for s in streams(app)["streams"] if s["url"] == url]
    assert len(shared) == 1 and sorted(shared[0]["subscription_ids"]) == [
        "d1;cam-shared",
        "d2;cam-shared",
    ]
    wait_until(
        lambda: processed(app, "d1;cam-shared") > 10 and processed(app, "d2;cam-shared") > 3,
        60,
        "both subscriptions processing",
    )
    image = httpx.get(f"{app}/cameras/cam-shared/image", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    seed_path = httpx.get(f"{app}/camera/cam-shared/image", timeout=30)  # the seeds' path
    assert seed_path.status_code == 200 and seed_path.headers["content-type"] == "image/jpeg"
    decoded = cv2.imdecode(np.frombuffer(image.content, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (360, 640, 3)
    # The crop subscription only sees the left half: every box lies inside it.
    crop_events = events(app, "d2;cam-shared")
    boxes = [d["box"] for e in crop_events if e["kind"] == "detection" for d in e["detections"]]
    assert boxes and all(b[2] <= 321 for b in boxes)
    unsubscribe(app, "d1;cam-shared")
    assert next(s for s in streams(app)["streams"] if s["url"] == url)["subscription_ids"] == [
        "d2;cam-shared"
    ]
    unsubscribe(app, "d2;cam-shared")
    assert not [s for s in streams(app)["streams"] if s["url"] == url]
    assert httpx.get(f"{app}/cameras/cam-shared/image", timeout=30).status_code == 404


def processed_fps_while_polling(
    app: str, sub_id: str, window_s: float, poll: Any = None
) -> tuple[float, list[Any]]:
    """The processed fps of `sub_id` over `window_s`, polling GET /streams every 0.5 s (and
    `poll`, if given) all along: both windows of a comparison put the same load on the
    ingress, registry and camera actors, so only what differs between them is measured."""
    seen: list[Any] = []
    start_n, start_t = processed(app, sub_id), time.monotonic()
    while time.monotonic() - start_t < window_s:
        if poll is not None:
            seen.append(poll())
        else:
            streams(app)
        time.sleep(0.5)
    return (processed(app, sub_id) - start_n) / (time.monotonic() - start_t), seen


def test_bad_url_opens_the_circuit_without_slowing_other_cameras(
    app: str, rtsp: RtspServer
) -> None:
    """Given a camera running at its pace, when a refused URL is subscribed on the same
    camera actor and goes through failures, an open circuit and a half-open retry, then the
    good camera keeps its processed fps (windows of equal length, equally polled)."""
    good = "d;cam-good"
    subscribe(app, {"subscriptionIdentifier": good, "rtspUrl": rtsp.url("scene2")})
    wait_until(lambda: processed(app, good) > 20, 60, "the good camera running")
    window_s = BREAKER_OPEN_S + 5  # the circuit opens, then its half-open trial fails
    fps_before, _ = processed_fps_while_polling(app, good, window_s)
    bad = "d;cam-bad"
    subscribe(app, {"subscriptionIdentifier": bad, "rtspUrl": "rtsp://127.0.0.1:9/nothing"})
    wait_until(
        lambda: (s := stream_of(app, bad)) and s["consecutive_failures"] >= 1, 30, "a first failure"
    )
    fps_during, states = processed_fps_while_polling(
        app, good, window_s, lambda: (stream_of(app, bad) or {}).get("state")
    )
    stream = wait_until(lambda: in_state(app, bad, "circuit_open"), 60, "the circuit to open")
    assert "circuit_open" in states, states
    assert "Connection refused" in (stream["last_error"] or ""), stream
    assert stream["consecutive_failures"] >= 3
    assert httpx.get(f"{app}/cameras/cam-bad/image", timeout=30).status_code == 503
    others = [
        (s["key"], s["state"], s.get("decode"), s.get("fps_in")) for s in streams(app)["streams"]
    ]
    print(f"good camera processed fps: {fps_before:.2f} alone, {fps_during:.2f} beside the bad URL")
    assert fps_during >= 0.8 * fps_before, (fps_before, fps_during, states, others)
    unsubscribe(app, bad)
    unsubscribe(app, good)


def test_a_dead_url_gives_up_after_max_retries_until_subscribed_again(app: str) -> None:
    """Given a refused URL: after MAX_RETRIES reconnects failed in a row it is `failed`,
    its thread gone, nothing more tried (repair rounds included), its subscription told
    by a `state` event; subscribing again starts it with a fresh count."""
    dead = "d;cam-dead"
    body = {"subscriptionIdentifier": dead, "rtspUrl": "rtsp://127.0.0.1:9/dead"}
    subscribe(app, body)
    stream = wait_until(lambda: in_state(app, dead, "failed"), 90, "the stream to give up")
    attempts = MAX_RETRIES + 1
    limit = f"(streams.max_retries: {MAX_RETRIES})"
    expected = f"gave up after {attempts} failed attempts in a row {limit}: "
    assert stream["last_error"].startswith(expected), stream
    assert "Connection refused" in stream["last_error"], stream
    assert stream["consecutive_failures"] == attempts and stream["reconnects"] == MAX_RETRIES
    time.sleep(BREAKER_OPEN_S + 2)  # a cool-down and several repair rounds later
    later = in_state(app, dead, "failed")
    assert later is not None and later["reconnects"] == MAX_RETRIES, later
    assert later["reader_threads"] == 0, later
    told = [e for e in events(app, dead) if e["kind"] == "state"]
    assert [(e["extra"]["state"], e["extra"]["last_error"]) for e in told] == [
        ("failed", stream["last_error"])
    ]
    subscribe(app, body)  # the same payload again: a fresh start
    wait_until(
        lambda: (s := stream_of(app, dead)) and s["state"] != "failed" and s["reader_threads"],
        30,
        "the stream to start again",
    )
    unsubscribe(app, dead)


def test_snapshot_camera_is_polled_at_its_interval(app: str, tmp_path: Path, clip: Path) -> None:
    _ok, jpeg = cv2.imencode(".jpg", np.full((360, 640, 3), 90, np.uint8))
    (tmp_path / "snap.jpg").write_bytes(jpeg.tobytes())
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    server = SnapshotServer(tmp_path).start()
    try:
        subscribe(
            app,
            {
                "subscriptionIdentifier": "d;cam-snap",
                "snapshotUrl": server.url("snap.jpg"),
                "snapshotInterval": 200,
            },
        )
        subscribe(
            app,
            {"subscriptionIdentifier": "d;cam-broken", "snapshotUrl": server.url("broken.jpg")},
        )
        wait_until(
            lambda: processed(app, "d;cam-snap") >= 10,
            60,
            lambda: f"snapshots processed: {stream_of(app, 'd;cam-snap')}",
        )
        stream = in_state(app, "d;cam-snap", "connected")
        assert stream is not None and 3.0 <= stream["fps_in"] <= 5.5, stream
        broken = wait_until(
            lambda: (s := stream_of(app, "d;cam-broken")) and s.get("last_error") and s,
            30,
            "the broken snapshot error",
        )
        assert "undecodable" in broken["last_error"]
        assert httpx.get(f"{app}/cameras/cam-snap/image", timeout=30).status_code == 200
    finally:
        unsubscribe(app, "d;cam-snap")
        unsubscribe(app, "d;cam-broken")
        server.stop()


def test_registry_and_camera_actor_restarts_heal(app: str, rtsp: RtspServer) -> None:
    """Killing the registry (it restarts and reloads its persisted state) keeps streams
    running; killing a camera actor brings its streams back through the registry."""
    sub = "d;cam-heal"
    subscribe(app, {"subscriptionIdentifier": sub, "rtspUrl": rtsp.url("scene3")})
    wait_until(lambda: processed(app, sub) > 5, 60, "processing")
    registry = ray.get_actor(registry_name(APP), STREAMS_NAMESPACE)
    ray.kill(registry, no_restart=False)
    stream = wait_until(lambda: stream_of(app, sub), 60, "the registry back with its state")
    actor = ray.get_actor(stream["actor"], STREAMS_NAMESPACE)
    ray.kill(actor, no_restart=False)
    wait_until(lambda: processed(app, sub) > 5, 90, "the stream restored on the new actor")
    unsubscribe(app, sub)


Snapshot = tuple[float, dict[str, int], dict[str, Any]]


def counts_snapshot(url: str, subs: list[str]) -> Snapshot:
    """When, each subscription's processed frames, and each actor's status, from one
    `GET /streams` answer that has them all."""

    def complete() -> Snapshot | None:
        state = streams(url)
        counts = {}
        for stream in state["streams"]:
            for s in stream["subscriptions"]:
                if s["subscription_id"] in subs:
                    counts[s["subscription_id"]] = s["processed"]
        actors = state["actors"]
        if set(counts) != set(subs) or any(a.get("cpu_times_s") is None for a in actors.values()):
            return None  # an actor missed the registry's status deadline: ask again
        return time.monotonic(), counts, actors

    result: Snapshot = wait_until(complete, 60, "every camera in one /streams answer")
    return result


def fair_window(
    url: str, subs: list[str]
) -> tuple[float, dict[str, int], dict[str, Any], float, dict[str, int], dict[str, Any]]:
    """Two snapshots, the second once the slowest camera has FAIR_FRAMES more frames, so
    that one frame more or less (where the window cuts a camera's cycle) is ≤ 2 % of any
    camera's count: on a busy 2-core box 16 cameras get 0.3–0.8 fps each, and a fixed
    minute measured noise."""
    t0, c0, actors0 = counts_snapshot(url, subs)
    while True:
        time.sleep(5)
        t1, c1, actors1 = counts_snapshot(url, subs)
        if min(c1[s] - c0[s] for s in subs) >= FAIR_FRAMES or t1 - t0 > FAIR_WINDOW_CAP_S:
            return t0, c0, actors0, t1, c1, actors1


def budget_shares(url: str, actors: Iterable[str]) -> dict[str, float] | None:
    """Each actor's share, once all of them hold one and they sum to BUDGET (polled: an
    actor that misses a registry round keeps its old share until the next one)."""
    status = streams(url)["actors"]
    got: dict[str, float] = {}
    for name in actors:
        dispatch = status.get(name, {}).get("dispatch") or {}
        share = next((d.get("share") for d in dispatch.values()), None)
        if share is None:
            return None
        got[name] = float(share)
    return got if sum(got.values()) == pytest.approx(BUDGET, abs=0.05) else None


def test_a_camera_alone_on_its_actor_gets_no_more_than_its_share(
    app: str, rtsp: RtspServer
) -> None:
    """Five cameras packed four to an actor: one actor holds four, the other one. The
    registry gives them 4/5 and 1/5 of the detector calls (calls_per_replica × the 2
    replicas Serve runs; each camera weighs 10 fps), so under overload the lone camera
    gets about the frames each packed one gets (without shares: 3-4 times)."""
    subs = [f"uneven;cam-{i}" for i in range(5)]
    for i, sub in enumerate(subs):
        subscribe(app, {"subscriptionIdentifier": sub, "rtspUrl": rtsp.url(f"scene{i}")})
    try:
        wait_until(lambda: all(processed(app, s) > 0 for s in subs), 120, "all cameras running")
        layout: dict[str, list[str]] = {}
        for stream in streams(app)["streams"]:
            for sub in stream["subscription_ids"]:
                if sub in subs:
                    layout.setdefault(stream["actor"], []).append(sub)
        assert sorted(len(v) for v in layout.values()) == [1, 4], layout
        got = wait_until(lambda: budget_shares(app, layout), 30, "the shares on both actors")
        lone = next(name for name, v in layout.items() if len(v) == 1)
        assert got[lone] == pytest.approx(BUDGET / 5, abs=0.01), got
        assert 0 < sum(wait_until(lambda: streams(app)["detected_fps"], 30).values()) < 55
        offered = [s["offered_fps"] for s in streams(app)["streams"] if s["actor"] in layout]
        assert offered == pytest.approx([10] * 5, abs=1), offered
        time.sleep(5)  # warm-up after the shares
        t0, c0, _, t1, c1, _ = fair_window(app, subs)
        fps = {s: (c1[s] - c0[s]) / (t1 - t0) for s in subs}
        fairness = min(fps.values()) / max(fps.values())
        print(f"5 cameras on actors {layout}: fps {fps}, fairness {fairness:.2f}")
        drops = [sub_status(stream_of(app, s) or {}, s)["drops"] for s in subs]
        assert sum(d["superseded"] for d in drops) > 0  # overloaded, else all get their fps
        assert fairness >= 0.7, (layout, fps)
    finally:
        for sub in subs:
            unsubscribe(app, sub)


def test_sixteen_cameras_progress_fairly_with_bounded_memory(app: str, rtsp: RtspServer) -> None:
    subs = [f"load;cam-load-{i}" for i in range(CAMERAS)]
    for i, sub in enumerate(subs):
        subscribe(app, {"subscriptionIdentifier": sub, "rtspUrl": rtsp.url(f"scene{i}")})
    try:
        wait_until(lambda: all(processed(app, s) > 0 for s in subs), 120, "all cameras running")
        time.sleep(10)  # warm-up

        t0, c0, actors0, t1, c1, actors1 = fair_window(app, subs)
        fps = {s: (c1[s] - c0[s]) / (t1 - t0) for s in subs}
        fairness = min(fps.values()) / max(fps.values())
        total = sum(fps.values())
        rss0 = sum(a["rss_bytes"] for a in actors0.values())
        rss1 = sum(a["rss_bytes"] for a in actors1.values())
        cpu = sum(actors1[a]["cpu_times_s"] - actors0[a]["cpu_times_s"] for a in actors1)
        print(
            f"16 cameras over {t1 - t0:.0f} s: total {total:.1f} fps processed, per camera "
            f"{min(fps.values()):.2f}..{max(fps.values()):.2f}, fairness {fairness:.2f}, "
            f"camera actors {len(actors1)}: {cpu / (t1 - t0) / CAMERAS * 100:.1f}% of a core "
            f"per stream, RSS {rss0 / 2**20:.0f} → {rss1 / 2**20:.0f} MiB"
        )
        # Per actor, its cameras' fps, reconnects and dispatch: where unfairness comes from.
        by_actor: dict[str, dict[str, Any]] = {
            name: {"dispatch": actors1[name].get("dispatch"), "cameras": {}} for name in actors1
        }
        for stream in streams(app)["streams"]:
            for sub in stream["subscription_ids"]:
                if sub in subs and stream["actor"] in by_actor:
                    by_actor[stream["actor"]]["cameras"][sub] = {
                        "fps": round(fps[sub], 3),
                        "reconnects": stream.get("reconnects"),
                        "watchdog_restarts": stream.get("watchdog_restarts"),
                    }
        assert all(v > 0 for v in fps.values())
        assert fairness >= 0.8, json.dumps(by_actor)
        # 4 full actors share the 2 replicas' calls (calls per actor would make it 8)
        hosts = [name for name, v in by_actor.items() if v["cameras"]]
        assert len(hosts) == CAMERAS // 4, json.dumps(by_actor)
        wait_until(lambda: budget_shares(app, hosts), 30, f"shares summing to {BUDGET} calls")
        assert rss1 <= rss0 * 1.2 + 50 * 2**20
        state = streams(app)
        drops = [
            s["drops"]
            for stream in state["streams"]
            for s in stream["subscriptions"]
            if s["subscription_id"] in subs
        ]
        assert sum(d["superseded"] for d in drops) > 0  # overloaded: frames are dropped
        # Calls waited for frames about to be superseded (the actors pass frame timings).
        dispatch = [d for n in hosts for d in (state["actors"][n].get("dispatch") or {}).values()]
        assert sum(d.get("next_frame_holds", 0) for d in dispatch) > 0, json.dumps(by_actor)
    finally:
        for sub in subs:
            unsubscribe(app, sub)
