"""Media jobs without Ray: real clips and images, the real demo detector (ONNX Runtime),
real files on disk and a real local HTTP server."""

from __future__ import annotations

import asyncio
import http.server
import json
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from demo.datasets import HELD_OUT_SEED_START, write_clip
from demo.metrics import match_image
from demo.scenes import Scene
from deployments.inference.engines import OnnxEngine
from deployments.jobs.manager import JobManager
from deployments.jobs.media import download
from deployments.jobs.records import (
    DuplicateJobError,
    JobFinishedError,
    JobNotFoundError,
    JobRecord,
    JobRequest,
    MediaError,
    new_record,
    redact_url,
)
from deployments.jobs.runner import Detect, JobRun
from deployments.jobs.settings import MediaJobSettings
from deployments.jobs.store import JobStore
from graph.common.schemas import DetectConfig, to_detections
from graph.common.vision import DetectParams, letterbox, unletterbox_boxes
from graph.config import PROJECT_ROOT

MODEL = PROJECT_ROOT / "models" / "demo-detector.onnx"
EVENT_KEYS = {
    "topic",
    "type",
    "time",
    "job_id",
    "camera_id",
    "subscription_id",
    "display_id",
    "model_id",
    "session_id",
    "data",
}


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A held-out synthetic scene, 30 frames at 640x360, 10 fps, with its ground truth."""
    out = tmp_path_factory.mktemp("clip") / "clip.mp4"
    return write_clip(HELD_OUT_SEED_START + 23, n_frames=30, video_path=out, fps=10, scale=0.5)


@pytest.fixture(scope="module")
def engine() -> OnnxEngine:
    return OnnxEngine(MODEL, imgsz=640, intra_op_threads=2)


def real_detector(engine: OnnxEngine) -> Detect:
    """What the actor's detect does, with the engine in-process instead of a replica."""

    async def detect(image: np.ndarray) -> list[dict[str, Any]]:
        boxed, lb = letterbox(image, 640)
        rows = (await asyncio.to_thread(engine.detect, boxed[None], [DetectParams()]))[0]
        rows[:, :4] = unletterbox_boxes(rows[:, :4], lb)
        return to_detections(rows, engine.names)

    return detect


def box(x1: float = 1, y1: float = 2, x2: float = 30, y2: float = 40) -> dict[str, Any]:
    return {
        "class_id": 0,
        "label": "vehicle",
        "confidence": 0.9,
        "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
    }


async def one_box(image: np.ndarray) -> list[dict[str, Any]]:
    await asyncio.sleep(0)
    return [box()]


def settings(tmp: Path, **overrides: Any) -> MediaJobSettings:
    overrides.setdefault("allowed_dirs", (Path(tempfile.gettempdir()),))  # the test clips
    return MediaJobSettings(jobs_dir=tmp / "jobs", progress_every_s=0.0, **overrides)


def request(**fields: Any) -> JobRequest:
    return JobRequest.model_validate(fields)


def record(tmp: Path, req: JobRequest, media_id: str = "media-1", **update: Any) -> JobRecord:
    rec = new_record(media_id, req, "demo", settings(tmp))
    return rec.model_copy(update=update)


def run(
    tmp: Path,
    req: JobRequest,
    detect: Detect,
    cancelled: asyncio.Event | None = None,
    **overrides: Any,
) -> tuple[JobRecord, list[dict[str, Any]], JobRun]:
    """Run one job to its end; its final record, every event it published, the run."""
    events: list[dict[str, Any]] = []

    async def go() -> tuple[JobRecord, JobRun]:
        job = JobRun(
            record(tmp, req),
            req,
            detect,
            events.extend,
            settings(tmp, **overrides),
            cancelled or asyncio.Event(),
        )
        return await job.run(), job

    final, job = asyncio.run(go())
    return final, events, job


# ---- a whole video with the real detector ------------------------------------------------
def test_video_job_reaches_100_percent_with_detections_matching_the_ground_truth(
    tmp_path: Path, clip: Path, engine: OnnxEngine
) -> None:
    """Given a synthetic clip, when a job runs over it with the real detector, then every
    frame is processed, progress climbs to 100 % and the boxes match the ground truth."""
    final, events, job = run(tmp_path, request(path=str(clip)), real_detector(engine))

    assert final.status == "succeeded", final.error
    assert final.kind == "video" and final.error is None
    assert final.progress.model_dump() == {
        "processed_frames": 30,
        "total_frames": 30,
        "percent": 100.0,
    }
    assert job.frames_read == 30
    for event in events:
        assert set(event) == EVENT_KEYS
        assert event["topic"] == f"job:{final.job_id}" and event["job_id"] == final.job_id
        assert event["model_id"] == "demo" and event["data"]["media_id"] == "media-1"
    progress = [e["data"] for e in events if e["type"] == "job.progress"]
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert progress[0]["status"] == "running" and progress[-1]["status"] == "succeeded"
    assert set(progress[-1]) == {
        "media_id",
        "status",
        "processed_frames",
        "total_frames",
        "percent",
    }
    assert events[-1]["type"] == "job.finished"
    assert events[-1]["data"] == {
        "media_id": "media-1",
        "status": "succeeded",
        "error": None,
        "processed_frames": 30,
        "total_frames": 30,
        "percent": 100.0,
    }
    # one job.detections event per result frame, identical content, in frame order
    detections = [e["data"] for e in events if e["type"] == "job.detections"]
    assert [d["frame_index"] for d in detections] == [r.frame_index for r in final.result]
    assert [d["frame_index"] for d in detections] == sorted(d["frame_index"] for d in detections)
    for data, result in zip(detections, final.result, strict=True):
        assert set(data) == {"media_id", "frame_index", "timestamp_s", "detections"}
        assert data["detections"] == [d.model_dump() for d in result.detections]
        assert data["timestamp_s"] == pytest.approx(result.frame_index / 10, abs=1e-3)

    truth = json.loads(clip.with_suffix(".json").read_text())
    by_frame = {r.frame_index: r.detections for r in final.result}
    found = wanted = false_positives = predicted = 0
    for index, frame in enumerate(truth["frames"]):
        vehicles = [o for o in frame["objects"] if o["cls"] == "vehicle"]
        gt = np.array([o["box"] for o in vehicles], np.float32).reshape(-1, 4)
        ignore = np.array(
            [o["visible_fraction"] < 0.5 or o["truncated"] for o in vehicles], bool
        ).reshape(-1)
        pred = [d for d in by_frame.get(index, []) if d.label == "vehicle"]
        boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in pred], np.float32)
        scores = np.array([d.confidence for d in pred], np.float32)
        outcome, taken = match_image(boxes.reshape(-1, 4), scores, gt, ignore, 0.5)
        found += int((taken & ~ignore).sum())
        wanted += int((~ignore).sum())
        false_positives += int((outcome == 0).sum())
        predicted += len(pred)
    print(f"vehicles found {found}/{wanted}, false positives {false_positives}/{predicted}")
    assert wanted >= 30, "the clip must show vehicles"
    assert found >= 0.8 * wanted
    assert false_positives <= 0.2 * predicted


def test_image_job_gives_one_frame_in_the_images_own_pixels(
    tmp_path: Path, engine: OnnxEngine
) -> None:
    image, truths, _ = Scene(HELD_OUT_SEED_START + 9, n_frames=1).render(0)
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), image)
    final, events, _ = run(tmp_path, request(path=path.as_uri()), real_detector(engine))

    assert final.status == "succeeded" and final.kind == "image"
    assert final.progress.model_dump() == {
        "processed_frames": 1,
        "total_frames": 1,
        "percent": 100.0,
    }
    assert [r.frame_index for r in final.result] == [0] and final.result[0].timestamp_s == 0
    boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in final.result[0].detections])
    visible = [o.box for o in truths if o.cls == "vehicle" and o.visible_fraction >= 0.5]
    from demo.metrics import iou_matrix

    assert visible and (iou_matrix(np.array(visible, np.float32), boxes).max(axis=1) >= 0.5).all()
    assert boxes[:, 2].max() > 640, "boxes are in the 1280x720 image's pixels, not the model's"
    types = [e["type"] for e in events]
    assert types.count("job.detections") == 1 and types[-2:] == ["job.progress", "job.finished"]


# ---- reading: stride, limits, concurrency, cancel, bad media --------------------------------
def test_stride_and_max_frames_bound_what_is_processed(tmp_path: Path, clip: Path) -> None:
    final, events, _ = run(tmp_path, request(path=str(clip), frame_stride=3), one_box, max_frames=5)
    assert final.status == "succeeded" and final.frame_stride == 3
    assert [r.frame_index for r in final.result] == [0, 3, 6, 9, 12]
    assert [r.timestamp_s for r in final.result] == pytest.approx([0, 0.3, 0.6, 0.9, 1.2])
    assert final.progress.processed_frames == 5 and final.progress.percent == 100
    first = next(
        e["data"] for e in events if e["type"] == "job.progress" and e["data"]["total_frames"]
    )
    assert first["total_frames"] == 5  # min(ceil(30 / 3), max_frames)


def test_frames_in_flight_are_bounded_and_results_stay_in_frame_order(
    tmp_path: Path, clip: Path
) -> None:
    in_flight, most = 0, 0
    delays = iter([0.03, 0.0, 0.02, 0.0, 0.01] * 10)

    async def uneven(image: np.ndarray) -> list[dict[str, Any]]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(next(delays))  # later frames often finish first
        in_flight -= 1
        return [box(x1=float(image.mean()))]

    final, _, _ = run(tmp_path, request(path=str(clip)), uneven, detect_concurrency=3)
    assert final.status == "succeeded"
    assert most == 3
    assert [r.frame_index for r in final.result] == list(range(30))


def test_cancel_mid_way_stops_reading_and_says_cancelled(tmp_path: Path, clip: Path) -> None:
    cancelled = asyncio.Event()
    calls = 0

    async def slow(image: np.ndarray) -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 5:
            cancelled.set()
        await asyncio.sleep(0.01)
        return [box()]

    final, events, job = run(tmp_path, request(path=str(clip)), slow, cancelled)
    assert final.status == "cancelled" and final.error is None
    assert final.finished_at is not None
    assert 3 <= final.progress.processed_frames < 30
    assert job.frames_read <= final.progress.processed_frames + 2  # concurrency 2: no more
    assert calls == job.frames_read
    assert events[-1]["type"] == "job.finished" and events[-1]["data"]["status"] == "cancelled"
    assert all(e["data"]["percent"] < 100 for e in events if e["type"] == "job.progress")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.mp4", b"this is not a video\n" * 50, "not a readable image or video"),
        ("noise.jpg", bytes(range(256)) * 40, "not a readable image or video"),
        ("empty.png", b"", "not a readable image or video"),
    ],
)
def test_bad_media_fails_the_job_with_a_clear_error(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    final, events, _ = run(tmp_path, request(path=str(path)), one_box)
    assert final.status == "failed" and message in (final.error or ""), final.error
    assert events[-1]["data"]["status"] == "failed" and events[-1]["data"]["error"] == final.error


def test_missing_and_disallowed_files_fail_with_their_reason(tmp_path: Path, clip: Path) -> None:
    final, _, _ = run(tmp_path, request(path=str(tmp_path / "gone.mp4")), one_box)
    assert final.status == "failed" and final.error == f"no such file: {tmp_path / 'gone.mp4'}"
    final, _, _ = run(tmp_path, request(path=str(clip)), one_box, allowed_dirs=(tmp_path / "x",))
    assert final.status == "failed"
    assert final.error == "refused by policy: `path` media only from jobs.allowed_dirs"


def test_too_many_pixels_fail_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((200, 300, 3), np.uint8))
    final, _, _ = run(tmp_path, request(path=str(path)), one_box, max_image_pixels=50_000)
    assert final.status == "failed" and "limit of 50000 pixels" in (final.error or "")


def test_a_detector_error_fails_the_job_naming_the_frame(tmp_path: Path, clip: Path) -> None:
    async def broken(image: np.ndarray) -> list[dict[str, Any]]:
        raise RuntimeError("replica died")

    final, _, _ = run(tmp_path, request(path=str(clip)), broken)
    assert final.status == "failed"
    assert final.error == "detection failed on frame 0: RuntimeError: replica died"


# ---- downloads ------------------------------------------------------------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/unsized/"):  # no Content-Length: only streaming can tell
            data = (Path(self.directory) / self.path.removeprefix("/unsized/")).read_bytes()
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def server(tmp_path: Path, clip: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_Handler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_media_is_downloaded_processed_and_removed(
    tmp_path: Path, server: str, clip: Path
) -> None:
    final, _, _ = run(tmp_path, request(url=f"{server}/clip.mp4"), one_box, max_frames=3)
    assert final.status == "succeeded" and final.progress.processed_frames == 3
    assert final.source == f"{server}/clip.mp4"
    assert not list((tmp_path / "jobs" / "downloads").iterdir())


def test_downloads_above_the_limit_fail_the_job(tmp_path: Path, server: str, clip: Path) -> None:
    size = clip.stat().st_size
    limit = size // 2
    final, _, _ = run(
        tmp_path, request(url=f"{server}/clip.mp4"), one_box, max_download_bytes=limit
    )
    assert final.status == "failed"
    assert final.error == (
        f"the media at {server}/clip.mp4 is {size} bytes, more than the limit of {limit} bytes"
    )
    with pytest.raises(MediaError, match=f"larger than the limit of {limit} bytes"):
        asyncio.run(download(f"{server}/unsized/clip.mp4", tmp_path / "dl", limit, 10))
    final, _, _ = run(tmp_path, request(url=f"{server}/missing.mp4"), one_box)
    assert final.status == "failed" and "HTTP 404" in (final.error or "")
    assert not [p for p in (tmp_path / "dl").iterdir()]
    assert not list((tmp_path / "jobs" / "downloads").iterdir())


# ---- the store ------------------------------------------------------------------------------
def test_records_are_written_atomically_and_temp_files_ignored(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    store.open()
    done = record(tmp_path, request(path="/m.mp4"), status="succeeded", finished_at=1.0)
    store.put(done)
    store.persist(done.job_id)
    files = sorted(p.name for p in (tmp_path / "jobs").iterdir())
    assert files == [f"{done.job_id}.json"], "no temp file is left behind"
    # a crash mid-write leaves a temp file; a hand-damaged record is skipped, not fatal
    (tmp_path / "jobs" / f".{done.job_id}.json.x1y2.tmp").write_text('{"job_id": "trunc')
    (tmp_path / "jobs" / f"{'f' * 32}.json").write_text("{not json")

    again = JobStore(tmp_path / "jobs")
    assert again.open() == []
    assert again.get(done.job_id) == done
    assert not list((tmp_path / "jobs").glob("*.tmp"))
    with pytest.raises(JobNotFoundError):
        again.get("0" * 32)


def test_a_restart_marks_queued_and_running_jobs_interrupted(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    store.open()
    req = request(path="/m.mp4")
    running = record(tmp_path, req, "a", status="running", started_at=2.0)
    queued = record(tmp_path, req, "b")
    done = record(tmp_path, req, "c", status="failed", finished_at=3.0, error="x")
    for rec in (running, queued, done):
        store.put(rec)
        store.persist(rec.job_id)

    interrupted = JobStore(tmp_path / "jobs").open()
    assert {r.job_id for r in interrupted} == {running.job_id, queued.job_id}
    reloaded = JobStore(tmp_path / "jobs")
    assert reloaded.open() == []  # persisted: a second restart finds nothing to interrupt
    assert reloaded.get(running.job_id).status == "interrupted"
    assert "restarted while the job was running" in (reloaded.get(running.job_id).error or "")
    assert reloaded.get(queued.job_id).status == "interrupted"
    assert reloaded.get(done.job_id) == done
    assert reloaded.active_for("a") is None


def test_the_oldest_finished_jobs_are_pruned(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs", keep_finished=2)
    store.open()
    req = request(path="/m.mp4")
    recs = [
        record(tmp_path, req, f"m{i}", status="succeeded", finished_at=float(i)) for i in range(4)
    ]
    active = record(tmp_path, req, "live", status="running")
    for rec in [*recs, active]:
        store.put(rec)
        store.persist(rec.job_id)
    assert sorted(store.prune()) == sorted([recs[0].job_id, recs[1].job_id])
    kept = {p.stem for p in (tmp_path / "jobs").glob("*.json")}
    assert kept == {recs[2].job_id, recs[3].job_id, active.job_id}


# ---- the manager: duplicates, cancel, not found ---------------------------------------------
def test_duplicates_cancel_and_unknown_jobs(tmp_path: Path, clip: Path) -> None:
    events: list[dict[str, Any]] = []

    async def scenario() -> None:
        gate = asyncio.Event()

        def detector(model: str, params: DetectParams) -> Detect:
            async def detect(image: np.ndarray) -> list[dict[str, Any]]:
                await gate.wait()
                return [box()]

            return detect

        jobs = JobManager(
            settings(tmp_path, max_running_jobs=1), {"demo"}, "demo", detector, events.extend
        )
        assert jobs.open() == []
        first = await jobs.submit("cam:1.mp4", request(path=str(clip)))
        assert first.status == "queued" and first.model == "demo"
        with pytest.raises(DuplicateJobError) as dup:
            await jobs.submit("cam:1.mp4", request(path=str(clip)))
        assert dup.value.job_id == first.job_id and dup.value.media_id == "cam:1.mp4"
        second = await jobs.submit("other", request(path=str(clip), frame_stride=5))
        for _ in range(200):  # the first job starts (its record is persisted first)
            if jobs.record(first.job_id).status == "running":
                break
            await asyncio.sleep(0.02)
        assert jobs.record(first.job_id).status == "running"
        assert jobs.record(second.job_id).status == "queued"  # one job runs at a time

        cancelled = await jobs.cancel(second.job_id)  # while queued
        assert cancelled.status == "cancelled" and cancelled.started_at is None
        cancelled = await jobs.cancel(first.job_id)  # while running
        assert cancelled.status == "cancelled" and cancelled.progress.processed_frames < 30
        with pytest.raises(JobFinishedError):
            await jobs.cancel(first.job_id)
        with pytest.raises(JobNotFoundError):
            jobs.record("f" * 32)
        with pytest.raises(JobNotFoundError):
            await jobs.cancel("f" * 32)

        gate.set()
        again = await jobs.submit("cam:1.mp4", request(path=str(clip), frame_stride=10))
        final = await jobs.wait(again.job_id, 30)
        assert final.status == "succeeded" and final.progress.processed_frames == 3
        assert [r.media_id for r in jobs.newest()] == ["cam:1.mp4", "other", "cam:1.mp4"]
        assert jobs.stats() == {"queued": 0, "running": 0}

    asyncio.run(scenario())
    on_disk = {
        rec.job_id: rec.status
        for rec in (
            JobRecord.model_validate_json(p.read_text()) for p in (tmp_path / "jobs").glob("*.json")
        )
    }
    assert sorted(on_disk.values()) == ["cancelled", "cancelled", "succeeded"]
    finished = [e["data"]["status"] for e in events if e["type"] == "job.finished"]
    assert sorted(finished) == ["cancelled", "cancelled", "succeeded"]


def test_unknown_models_and_bad_media_ids_are_refused(tmp_path: Path) -> None:
    from graph.common.errors import UnknownModelError

    async def scenario() -> None:
        jobs = JobManager(settings(tmp_path), {"demo"}, "demo", lambda m, p: one_box, [].extend)
        jobs.open()
        with pytest.raises(UnknownModelError):
            await jobs.submit("m", request(path="/x.mp4", model="nope"))
        with pytest.raises(ValueError, match="media id"):
            await jobs.submit("a/b", request(path="/x.mp4"))

    asyncio.run(scenario())


# ---- requests and events --------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "exactly one of url"),
        ({"url": "http://h/a.mp4", "path": "/a.mp4"}, "exactly one of url"),
        ({"url": "ftp://h/a.mp4"}, "http:// or https://"),
        ({"url": "http:///a.mp4"}, "http:// or https://"),
        ({"path": "a.mp4"}, "absolute path"),
        ({"path": "file://server/a.mp4"}, "local file"),
        ({"path": "/a.mp4", "model": "bad model"}, "pattern"),
        ({"path": "/a.mp4", "config": {"conf": 2}}, "less than or equal to 1"),
        ({"path": "/a.mp4", "frame_stride": 0}, "greater than or equal to 1"),
        ({"path": "/a.mp4", "extra": 1}, "Extra inputs"),
    ],
)
def test_bad_requests_are_refused_clearly(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobRequest.model_validate(body)


def test_request_sources_and_redaction() -> None:
    assert request(path="file:///data/a%20b.mp4").local_path() == Path("/data/a b.mp4")
    assert request(path="/data/a.mp4").local_path() == Path("/data/a.mp4")
    assert request(url="https://h/a.mp4", config={"conf": 0.5}).config == DetectConfig(conf=0.5)
    assert (
        redact_url("https://u:pw@h:8/a.mp4?x=1&token=s3") == "https://u:***@h:8/a.mp4?x=1&token=***"
    )
    assert redact_url("http://h/a.mp4") == "http://h/a.mp4"
