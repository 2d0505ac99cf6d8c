"""Media jobs through the deployed graph: `POST /detect/{media_id}`, `GET` and `DELETE
/jobs/{id}`, and the job's events as server-sent events, on a real local Ray cluster with
real clips (local paths and a real HTTP server)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from demo.datasets import HELD_OUT_SEED_START, write_clip
from demo.metrics import match_image
from deployments.detector import Detector
from deployments.ingress import Ingress
from graph.app import Deployments, build_graph
from tests.integration.apps import app_config, deployed, healthy, wait_until

pytestmark = pytest.mark.integration
APP = "camgraph-jobs-test"
DOWNLOAD_LIMIT = 4 * 1024 * 1024  # above the 60-frame clip (~1.7 MB)
FRAMES = 60


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A held-out synthetic scene, 60 frames at 640x360, 10 fps, with its ground truth."""
    out = tmp_path_factory.mktemp("clip") / "scene.mp4"
    return write_clip(HELD_OUT_SEED_START + 27, n_frames=FRAMES, video_path=out, fps=10, scale=0.5)


@pytest.fixture(scope="module")
def media_server(tmp_path_factory: pytest.TempPathFactory, clip: Path) -> Iterator[str]:
    """A real HTTP server with the clip and a file above the download limit."""
    root = tmp_path_factory.mktemp("www")
    (root / "scene.mp4").write_bytes(clip.read_bytes())
    (root / "big.mp4").write_bytes(np.random.default_rng(0).bytes(2 * DOWNLOAD_LIMIT))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def client(
    cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp("jobs-app")
    config = app_config(
        data,
        jobs={
            "allowed_dirs": [str(tmp_path_factory.getbasetemp())],  # the tests' clips
            "max_download_bytes": DOWNLOAD_LIMIT,
            "progress_every_s": 0.2,
        },
    )
    detector = Detector.options(
        num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.5}
    )
    url = cluster["http_url"]
    graph = build_graph(config, Deployments(detector, Ingress.options(num_replicas=1)))
    with (
        deployed(APP, graph, ready=healthy(url), what="the demo model"),
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        yield c


def submit(client: httpx.Client, media_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/detect/{media_id}", json=body)
    assert response.status_code == 202, response.text
    job = dict(response.json())
    assert job["media_id"] == media_id and job["status"] in ("queued", "running")
    assert job["events_url"] == f"/events?job={job['job_id']}&last_event_id=0"
    return job


def job_record(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def finished(client: httpx.Client, job_id: str, timeout_s: float = 180) -> dict[str, Any]:
    return dict(
        wait_until(
            lambda: (r := job_record(client, job_id))["status"] not in ("queued", "running") and r,
            timeout_s,
            f"job {job_id} to finish",
        )
    )


def sse_events(client: httpx.Client, job_id: str, timeout_s: float = 180) -> list[dict[str, Any]]:
    """The job's events from its start (`last_event_id=0` replays what the hub holds),
    read as server-sent events until `job.finished`; checks the SSE framing as it goes."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    params: dict[str, str | int] = {"job": job_id, "last_event_id": 0}
    with client.stream("GET", "/events", params=params, timeout=httpx.Timeout(30.0)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            assert time.monotonic() < deadline, "no job.finished event in time"
            if line.startswith(":"):  # heartbeat comment
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "data" not in fields:  # e.g. the `retry:` preamble
                fields = {}
                continue
            event = json.loads(fields["data"])
            assert fields["event"] == event["type"]
            if event["type"] != "dropped":
                assert int(fields["id"]) == event["id"]
                events.append(event)
            fields = {}
            if event["type"] == "job.finished":
                return events
    pytest.fail("the event stream ended before job.finished")


def vehicle_recall(record: dict[str, Any], truth: dict[str, Any]) -> tuple[int, int]:
    """Ground-truth vehicles (at least half visible, not truncated) matched at IoU ≥ 0.5."""
    by_frame = {r["frame_index"]: r["detections"] for r in record["result"]}
    found = wanted = 0
    for index, frame in enumerate(truth["frames"]):
        vehicles = [o for o in frame["objects"] if o["cls"] == "vehicle"]
        gt = np.array([o["box"] for o in vehicles], np.float32).reshape(-1, 4)
        ignore = np.array([o["visible_fraction"] < 0.5 or o["truncated"] for o in vehicles], bool)
        pred = [d for d in by_frame.get(index, []) if d["label"] == "vehicle"]
        boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in pred])
        scores = np.array([d["confidence"] for d in pred], np.float32)
        _, taken = match_image(boxes.reshape(-1, 4), scores, gt, ignore.reshape(-1), 0.5)
        found += int((taken & ~ignore.reshape(-1)).sum())
        wanted += int((~ignore).sum())
    return found, wanted


def test_a_video_job_reaches_100_percent_with_detections_matching_the_ground_truth(
    client: httpx.Client, clip: Path
) -> None:
    """Given a synthetic clip on disk, when a job is submitted for it, then a second job for
    the same media is refused while it runs, its events arrive as SSE up to 100 %, and the
    record's detections match the ground truth."""
    job = submit(client, "scene-1", {"path": str(clip), "config": {"conf": 0.25}})
    duplicate = client.post("/detect/scene-1", json={"path": str(clip)})
    assert duplicate.status_code == 409, duplicate.text
    assert duplicate.json()["detail"]["job_id"] == job["job_id"]
    assert "scene-1" in duplicate.json()["detail"]["message"]

    events = sse_events(client, job["job_id"])
    assert all(
        e["job_id"] == job["job_id"] and e["topic"] == f"job:{job['job_id']}" for e in events
    )
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    progress = [e["data"] for e in events if e["type"] == "job.progress"]
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert events[-1]["data"] == {
        "media_id": "scene-1",
        "status": "succeeded",
        "error": None,
        "processed_frames": FRAMES,
        "total_frames": FRAMES,
        "percent": 100.0,
    }

    record = job_record(client, job["job_id"])
    assert record["status"] == "succeeded" and record["kind"] == "video"
    assert record["progress"] == {
        "processed_frames": FRAMES,
        "total_frames": FRAMES,
        "percent": 100.0,
    }
    detections = [e["data"] for e in events if e["type"] == "job.detections"]
    assert [d["frame_index"] for d in detections] == [r["frame_index"] for r in record["result"]]
    truth = json.loads(clip.with_suffix(".json").read_text())
    found, wanted = vehicle_recall(record, truth)
    print(f"vehicles found by the media job: {found}/{wanted}")
    assert wanted >= 30 and found >= 0.8 * wanted

    # finished: the same media id may be submitted again
    again = submit(client, "scene-1", {"path": clip.as_uri(), "frame_stride": 20})
    assert finished(client, again["job_id"])["progress"]["processed_frames"] == 3


def test_cancel_stops_a_running_job(client: httpx.Client, clip: Path) -> None:
    job = submit(client, "scene-cancel", {"path": str(clip)})
    wait_until(
        lambda: job_record(client, job["job_id"])["progress"]["processed_frames"] >= 2,
        120,
        "the job to be under way",
    )
    response = client.delete(f"/jobs/{job['job_id']}")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert cancelled["progress"]["processed_frames"] < FRAMES
    # The job's task has ended once its job.finished event is out: nothing runs after it.
    events = sse_events(client, job["job_id"])
    final = events[-1]["data"]
    assert events[-1]["type"] == "job.finished" and final["status"] == "cancelled", final
    assert final["processed_frames"] == cancelled["progress"]["processed_frames"], final
    after = job_record(client, job["job_id"])
    assert after["status"] == "cancelled"
    assert after["progress"] == cancelled["progress"], "nothing processed after the cancel"
    again = client.delete(f"/jobs/{job['job_id']}")
    assert again.status_code == 409, again.text
    assert client.get(f"/jobs/{'0' * 32}").status_code == 404
    assert client.delete(f"/jobs/{'0' * 32}").status_code == 404


def test_url_media_is_downloaded_within_its_limit(client: httpx.Client, media_server: str) -> None:
    job = submit(client, "remote", {"url": f"{media_server}/scene.mp4", "frame_stride": 10})
    record = finished(client, job["job_id"])
    assert record["status"] == "succeeded", record["error"]
    assert record["progress"]["processed_frames"] == FRAMES // 10
    big = submit(client, "remote-big", {"url": f"{media_server}/big.mp4"})
    record = finished(client, big["job_id"])
    assert record["status"] == "failed"
    assert f"more than the limit of {DOWNLOAD_LIMIT} bytes" in record["error"]


def test_bad_media_fails_the_job_and_bad_requests_are_422(
    client: httpx.Client, tmp_path: Path
) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    job = submit(client, "bad-media", {"path": str(text)})
    record = finished(client, job["job_id"])
    assert record["status"] == "failed" and "not a readable image or video" in record["error"]
    job = submit(client, "outside", {"path": "/etc/passwd"})  # not under jobs.allowed_dirs
    record = finished(client, job["job_id"])
    assert record["error"] == "refused by policy: `path` media only from jobs.allowed_dirs"
    for body in ({}, {"path": "relative.mp4"}, {"url": "ftp://h/a.mp4"}, {"path": "/a", "x": 1}):
        response = client.post("/detect/bad-request", json=body)
        assert response.status_code == 422, (body, response.text)
    assert client.post("/detect/a b", json={"path": str(text)}).status_code == 422
