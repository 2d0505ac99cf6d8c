"""The harness's bookkeeping without Ray or timing: what it sends to camgraph, how it
reads counters and metrics back, paced clips, process layouts and the targets."""

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from benchmarks.baselines import Camera, best_raw, raw_layouts, raw_variants, take_round_robin
from benchmarks.camgraph_phase import (
    batch_distribution,
    bench_serve_config,
    missing_from,
    run_camgraph,
    subscription_body,
    subscription_counters,
    take_age_median,
    window_account,
    with_own_state,
)
from benchmarks.frames import ClipSpec, PacedCapture
from benchmarks.harness import parse_batches, parse_counts, parse_systems
from benchmarks.measure import CameraResult, PhaseResult, Usage, is_ray_process
from benchmarks.report import (
    capacity_fps,
    comparisons,
    overload_phase,
    overload_run_cameras,
    targets,
)
from benchmarks.stats import DropAccount
from graph.app import Deployments, build_graph
from graph.config import AppConfig
from stream_actors.subscriptions import Subscription

ROOT = Path(__file__).resolve().parents[2]


def test_subscription_bodies_are_valid_subscribe_payloads() -> None:
    file_cam = Camera("cam3", "/data/bench/cam3.mp4")
    realtime = Subscription.model_validate(subscription_body(file_cam, "bench_det", "realtime"))
    assert realtime.subscriptionIdentifier == "bench;cam3"
    assert (realtime.fileUrl, realtime.fileLoop, realtime.fileRealtime) == (
        "/data/bench/cam3.mp4",
        True,
        True,
    )
    assert realtime.modelId == "bench_det"
    lossless = Subscription.model_validate(subscription_body(file_cam, "m", "saturation"))
    assert lossless.fileRealtime is False
    rtsp = Subscription.model_validate(
        subscription_body(Camera("cam0", "rtsp://127.0.0.1:8554/cam0"), "m", "realtime")
    )
    assert rtsp.kind == "rtsp" and rtsp.fileUrl is None


LISTING_START = {
    "streams": [
        {
            "state": "connected",
            "decode": "all",
            "subscriptions": [
                {
                    "subscription_id": "bench;cam0",
                    "processed": 100,
                    "received": 300,
                    "delivered": 101,
                    "drops": {"superseded": 199, "too_old": 0, "back_pressure": 0},
                }
            ],
        }
    ],
    "actors": {"a0": {"cpu_times_s": 10.0}},
}
LISTING_END = {
    "streams": [
        {
            "state": "connected",
            "decode": "keyframes",
            "subscriptions": [
                {
                    "subscription_id": "bench;cam0",
                    "processed": 160,
                    "received": 400,
                    "delivered": 162,
                    "drops": {"superseded": 236, "too_old": 1, "back_pressure": 2},
                    "pipeline": {"tracks": 3},
                }
            ],
        }
    ]
}


def test_window_counters_are_deltas_of_get_streams() -> None:
    first = subscription_counters(LISTING_START)["bench;cam0"]
    last = subscription_counters(LISTING_END)["bench;cam0"]
    assert last["decode"] == "keyframes" and last["pipeline"] and not first["pipeline"]
    books = window_account(first, last, tolerance=2)
    # 100 read in the window: 60 processed, 37 superseded, 1 too old, 2 refused
    assert (books.offered, books.processed) == (100, 60)
    assert books.drops == {"superseded": 37, "too_old": 1, "back_pressure": 2}
    assert books.unaccounted == 0 and books.balanced
    # a subscription that appeared during the window counts from zero
    assert window_account(None, last, 2).offered == 400


def test_batch_distribution_is_the_windows_delta() -> None:
    start = {1: 6, 2: 3, 4: 2}  # replicas' counters summed, before the window
    end = {1: 16, 2: 13, 4: 2, 3: 1}
    dist = batch_distribution(start, end)
    assert dist is not None
    # window: 10 batches of 1, 10 of 2, one of 3, none of 4 -> 21 batches, 33 images
    assert dist.counts == {1: 10, 2: 10, 3: 1}
    assert dist.batches == 21 and dist.mean == pytest.approx(33 / 21)
    assert batch_distribution(start, None) is None


def test_bench_config_serves_the_baselines_model_with_the_base_detectors_settings() -> None:
    base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config = bench_serve_config(base, "models/demo-detector.onnx", "bench_det")
    app = config["applications"][0]
    args = AppConfig.model_validate(app["args"])
    assert not args.pipelines
    assert [(m.id, str(m.path), m.imgsz, m.intra_op_threads) for m in args.models] == [
        ("bench_det", "models/demo-detector.onnx", 640, 1)
    ]
    assert args.ingress.default_model == "bench_det"
    names = [d["name"] for d in app["deployments"]]
    assert names == ["Detector_bench_det", "Ingress"]
    base_detector = next(
        d for d in base["applications"][0]["deployments"] if "Detector" in d["name"]
    )
    assert app["deployments"][0]["user_config"] == base_detector["user_config"]
    assert app["deployments"][0]["autoscaling_config"] == base_detector["autoscaling_config"]
    # every overridden deployment exists in the graph the config builds
    built: list[str] = []

    class Recording:
        def __init__(self, name: str) -> None:
            self.name = name

        def options(self, **kwargs: Any) -> "Recording":
            return Recording(kwargs.get("name", self.name))

        def bind(self, *args: Any) -> str:
            built.append(self.name)
            return self.name

    build_graph(args, Deployments(Recording("Detector"), Recording("Ingress")))  # type: ignore[arg-type]
    assert set(names) <= set(built)
    assert base["applications"][0]["args"]["pipelines"]  # the base config is left alone


def test_paced_capture_returns_the_newest_due_frame_and_counts_the_skipped(
    tmp_path: Path,
) -> None:
    from demo.datasets import write_clip

    clip = write_clip(ClipSpec().seed(0), 6, tmp_path / "c.mp4", fps=10, scale=0.25)
    now = [1000.0]
    cap = PacedCapture(clip, fps=10, clock=lambda: now[0])
    cap.start(1000.0)
    assert cap.counts().offered == 1  # frame 0 is due at the start
    now[0] = 1000.35  # frames 0..3 are due
    got = cap.read(threading.Event())
    assert got is not None
    image, captured_at = got
    assert image.shape == (180, 320, 3)
    assert captured_at == pytest.approx(1000.3)  # frame 3's due time
    counts = cap.counts()
    assert (counts.offered, counts.taken, counts.skipped, counts.pending) == (4, 1, 3, 0)
    now[0] = 1000.95  # frames 4..9: the clip has 6 frames, so it loops
    assert cap.read(threading.Event()) is not None
    counts = cap.counts()
    assert (counts.offered, counts.taken, counts.skipped, counts.pending) == (10, 2, 8, 0)
    stop = threading.Event()
    stop.set()
    assert cap.read(stop) is None  # nothing due yet and told to stop: no wait
    cap.close()


def test_unpaced_capture_reads_every_frame_and_loops(tmp_path: Path) -> None:
    from demo.datasets import write_clip

    clip = write_clip(ClipSpec().seed(1), 3, tmp_path / "c.mp4", fps=10, scale=0.25)
    cap = PacedCapture(clip, fps=10, pace=False)
    for _ in range(7):
        assert cap.read(threading.Event()) is not None
    counts = cap.counts()
    assert (counts.offered, counts.taken, counts.skipped, counts.pending) == (7, 7, 0, 0)
    cap.close()


def test_raw_layouts_split_cameras_between_single_threaded_processes() -> None:
    cams = [Camera(f"cam{i}", f"/c{i}.mp4") for i in range(5)]
    layouts = raw_layouts(cams, cores=2)
    assert [len(s) for s in layouts["1 proc x 2 threads"]] == [5]
    shares = layouts["2 procs x 1 thread"]
    assert [[c.name for c in s] for s in shares] == [["cam0", "cam2", "cam4"], ["cam1", "cam3"]]
    assert list(raw_layouts(cams[:1], cores=2)) == ["1 proc x 2 threads"]  # nothing to split


def test_ray_processes_are_recognised_by_name_or_command_line() -> None:
    assert is_ray_process("raylet", [])
    assert is_ray_process("gcs_server", ["/x/gcs_server", "--port=1"])
    assert is_ray_process("python", ["ray::ServeReplica:camgraph:Detector_m"])
    assert is_ray_process(
        "python", ["python", "/v/lib/python3.11/site-packages/ray/dashboard/x.py"]
    )
    assert not is_ray_process("python", ["python", "-m", "pytest", "tests/integration"])
    assert not is_ray_process("bash", [])


def test_option_parsing() -> None:
    assert parse_counts("8, 1,4,4") == [1, 4, 8]
    with pytest.raises(ValueError):
        parse_counts("0,4")
    assert parse_systems("raw,camgraph") == ["raw", "camgraph"]
    with pytest.raises(ValueError):
        parse_systems("raw,triton")


def phase(
    system: str,
    mode: str,
    cameras: int,
    fps_each: list[float],
    latencies: list[float] | None = None,
    name: str | None = None,
    rss: list[int] | None = None,
) -> PhaseResult:
    p = PhaseResult(name or system, system, mode, cameras, 10.0)
    for i, fps in enumerate(fps_each):
        done = round(fps * 10)
        books = DropAccount(100, done, {"superseded": 100 - done})
        p.per_camera.append(CameraResult(f"cam{i}", books, 10.0, list(latencies or [])))
    p.usage = Usage(rss_growth=(rss[1] / rss[0]) if rss else None)
    return p


def test_ratios_use_the_best_raw_layout_of_the_same_mode_and_camera_count() -> None:
    phases = [
        phase("raw", "saturation", 4, [5, 5, 5, 5], name="raw ORT 1 proc x 2 threads"),
        phase("raw", "saturation", 4, [6, 6, 6, 6], name="raw ORT 2 procs x 1 thread"),
        phase("camgraph", "saturation", 4, [4.5, 4.5, 4.5, 4.5]),
        phase("raw", "realtime", 8, [3] * 8),
        phase("seed", "realtime", 8, [1] * 8),
        phase("camgraph", "realtime", 8, [2] * 8),
    ]
    best = best_raw(phases[:2])
    assert best is not None and best.name == "raw ORT 2 procs x 1 thread"
    rows = {(r["mode"], r["cameras"]): r for r in comparisons(phases)}
    sat = rows[("saturation", 4)]
    assert sat["raw_fps"] == 24 and sat["camgraph_over_raw"]["value"] == pytest.approx(0.75)
    assert sat["camgraph_over_seed"] == {"value": None, "note": "no baseline"}
    assert rows[("realtime", 8)]["camgraph_over_seed"]["value"] == pytest.approx(2.0)


def test_targets_from_hand_made_phases() -> None:
    # capacity 20 fps (raw at saturation); 10 fps cameras: 4 cameras offer 2x capacity
    phases = [
        phase("raw", "saturation", 4, [5, 5, 5, 5]),
        phase("camgraph", "saturation", 4, [4.6, 4.6, 4.5, 4.5]),
        phase("camgraph", "realtime", 1, [10], [40.0] * 10),
        phase("camgraph", "realtime", 4, [4, 4, 4, 3], [100.0] * 99 + [200.0], rss=[100, 103]),
        phase("seed", "realtime", 8, [1] * 8),
        phase("camgraph", "realtime", 8, [2, 2, 2, 2, 2, 2, 2, 1.5], [500.0]),
    ]
    over = overload_phase(phases, 20.0, 10.0)
    assert over is not None and over.cameras == 4
    by_name = {t.name: t for t in targets(phases, single_inference_ms=50.0, camera_fps=10.0)}
    assert by_name["camgraph / raw limit at saturation"].measured == pytest.approx(18.2 / 20)
    assert by_name["camgraph / raw limit at saturation"].passed is True
    seed8 = by_name["camgraph / seed-style at 8 cameras"]
    assert seed8.measured == pytest.approx(15.5 / 8) and seed8.passed is True
    assert by_name["camgraph / seed-style at 4 cameras"].verdict == "N/A"  # no seed run
    # camgraph at 4 cameras realtime, 15 fps, against the raw limit (20 fps, saturation
    # runs do not count): only realtime raw runs of 4 cameras would.
    assert by_name["camgraph / raw limit at 4 cameras realtime"].verdict == "N/A"
    # 100 latencies: p99 rank 98.01 → 100 + 0.01 * 100 = 101 ms, over a 50 ms inference
    p99 = by_name["p99 / single inference under 2x overload"]
    assert p99.measured == pytest.approx(101 / 50) and p99.passed is True
    assert by_name["cameras with unaccounted frames under overload"].passed is True
    assert by_name["cluster RSS growth under overload"].measured == pytest.approx(1.03)
    fair = by_name["fair share min/max fps"]  # the widest run: 8 cameras
    assert fair.measured == pytest.approx(0.75) and fair.passed is False


def test_targets_without_the_runs_they_need_are_not_measured() -> None:
    tgts = targets([phase("raw", "realtime", 1, [10])], single_inference_ms=50.0, camera_fps=10)
    assert [t.verdict for t in tgts] == ["N/A"] * 11


@pytest.mark.parametrize(("gpu", "passed"), [(False, True), (True, False)])
def test_realtime_ratios_at_each_camera_count_cpu_and_gpu_seed_targets(
    gpu: bool, passed: bool
) -> None:
    """camgraph against the best raw layout at 4, 8 and 16 cameras realtime, and against
    the seed-style baseline: at least 1.0 x on a CPU, 1.5 x on a GPU."""
    phases = []
    for n, cg_fps, seed_fps, raw_fps in (
        (4, 1.8, 1.5, 1.9),
        (8, 1.2, 1.0, 2.0),
        (16, 1.2, 1.0, 2.0),
    ):
        phases += [
            phase("raw", "realtime", n, [1.0] * n, name="raw ORT 1 proc x 2 threads"),
            phase("raw", "realtime", n, [raw_fps] * n, name="raw ORT 2 procs x 1 thread"),
            phase("seed", "realtime", n, [seed_fps] * n),
            phase("camgraph", "realtime", n, [cg_fps] * n),
        ]
    by_name = {t.name: t for t in targets(phases, 50.0, 10.0, gpu=gpu)}
    raw4 = by_name["camgraph / raw limit at 4 cameras realtime"]
    assert raw4.measured == pytest.approx(1.8 / 1.9) and raw4.passed is True
    raw8 = by_name["camgraph / raw limit at 8 cameras realtime"]
    assert raw8.measured == pytest.approx(0.6) and raw8.passed is False
    for n in (4, 8, 16):
        seed = by_name[f"camgraph / seed-style at {n} cameras"]
        assert seed.measured == pytest.approx(1.2) and seed.passed is passed


class FakeCamgraph:
    """camgraph's HTTP surface as the harness uses it: counters grow by a fixed step
    per `GET /streams`, each events poll yields one detection 90 ms after capture."""

    def __init__(self) -> None:
        self.subs: dict[str, Subscription] = {}
        self.listings = 0
        self.event_id = 0
        self.deleted: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        if path == "/health":
            model = {"state": "enabled", "providers": ["CPUExecutionProvider"]}
            return httpx.Response(
                200, json={"status": "ok", "default_model": "m", "models": {"m": model}}
            )
        if method == "POST" and path == "/streams":
            sub = Subscription.model_validate_json(request.content)
            self.subs[sub.subscriptionIdentifier] = sub
            return httpx.Response(201, json={"subscriptionIdentifier": sub.subscriptionIdentifier})
        if method == "GET" and path == "/streams":
            self.listings += 1
            n = self.listings
            subs = [
                {
                    "subscription_id": s,
                    "received": 10 * n,
                    "processed": 6 * n,
                    "drops": {"superseded": 4 * n, "too_old": 0},
                }
                for s in self.subs
            ]
            streams = [{"state": "connected", "decode": "all", "subscriptions": subs}]
            return httpx.Response(200, json={"streams": streams, "actors": {}})
        sub_id = path.split("/")[2]
        if method == "DELETE":
            self.deleted.append(sub_id)
            return httpx.Response(204) if self.subs.pop(sub_id, None) else httpx.Response(404)
        if path.endswith("/events"):
            self.event_id += 1
            now = time.time()
            event = {
                "id": self.event_id,
                "kind": "detection",
                "captured_at": now - 0.1,
                "detected_at": now - 0.01,
            }
            return httpx.Response(200, json=[event])
        return httpx.Response(404)


def test_camgraph_phase_reads_counters_and_latencies_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no Ray metrics here: not measured
    fake = FakeCamgraph()
    cams = [Camera("cam0", "/clips/c0.mp4"), Camera("cam1", "/clips/c1.mp4")]
    result = run_camgraph(
        "http://camgraph.test",
        cams,
        seconds=1.0,
        warmup_s=0.2,
        poll_s=0.2,
        progress=False,
        transport=httpx.MockTransport(fake),
    )
    assert result.error is None, result.error
    assert result.extra["model_id"] == "m"
    assert [c.camera for c in result.per_camera] == ["cam0", "cam1"]
    for cam in result.per_camera:
        # one listing at each end of the window: one step of every counter
        assert (cam.account.offered, cam.account.processed) == (10, 6)
        assert cam.account.drops == {"superseded": 4} and cam.account.balanced
        assert cam.latencies_ms and all(89 < x < 91 for x in cam.latencies_ms)
    assert result.extra["batch_sizes"] is None
    assert any("batch sizes not measured" in n for n in result.notes)
    assert fake.subs == {}  # unsubscribed at the end
    assert fake.deleted.count("bench;cam0") == 2  # a leftover check first, then the cleanup


def test_camgraph_phase_reports_an_unreachable_camgraph() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    result = run_camgraph(
        "http://camgraph.test",
        [Camera("cam0", "/c.mp4")],
        1.0,
        0.1,
        progress=False,
        transport=httpx.MockTransport(refuse),
    )
    assert result.error is not None and "not usable" in result.error
    assert result.per_camera == []


def test_capacity_comes_from_a_raw_run_that_was_saturated() -> None:
    keeping_up = phase("raw", "realtime", 1, [10])  # took all 10 fps offered
    assert capacity_fps([keeping_up]) is None
    overwhelmed = phase("raw", "realtime", 8, [2.5] * 8)  # 20 of 80 fps offered
    assert capacity_fps([keeping_up, overwhelmed]) == 20
    unthrottled = phase("raw", "saturation", 4, [6, 6, 6, 6])
    assert capacity_fps([keeping_up, overwhelmed, unthrottled]) == 24


def test_process_roles_come_from_ray_process_titles() -> None:
    from benchmarks.measure import process_role

    replica = ["ray::ServeReplica:camgraph:Detector_bench_det"]
    assert process_role("ray::ServeRepli", replica) == "ServeReplica:camgraph:Detector_bench_det"
    assert process_role("python", ["ray::ServeController.listen_for_change"]) == ("ServeController")
    assert process_role("raylet", ["/x/ray/core/src/ray/raylet/raylet", "--a=1"]) == "raylet"
    dash = ["/v/bin/python", "-u", "/v/site-packages/ray/dashboard/dashboard.py", "--x"]
    assert process_role("python", dash) == "dashboard.py"


def test_the_per_frame_tax_is_camgraphs_cpu_per_frame_beyond_raws() -> None:
    from benchmarks.report import per_frame_tax, tax_target

    raw = phase("raw", "saturation", 4, [50] * 4, name="raw ORT 2 procs x 1 thread")
    raw.usage.cpu_pct = 200.0  # 2 cores for 200 frames/s: 10 ms of CPU per frame
    cg = phase("camgraph", "saturation", 4, [40] * 4)
    cg.usage.cpu_pct = 200.0  # 2 cores for 160 frames/s: 12.5 ms per frame
    tax = per_frame_tax([raw, cg], camera_fps=10.0)
    assert tax is not None
    assert tax["camgraph_over_raw"] == 0.8 and tax["raw_cpu_ms_per_frame"] == 10.0
    assert tax["camgraph_cpu_ms_per_frame"] == 12.5 and tax["tax_cpu_ms_per_frame"] == 2.5
    assert tax["cameras_per_core_of_tax"] == 40.0  # 1000 ms / (2.5 ms x 10 fps)
    assert tax_target(tax).passed is True
    cg.per_camera = cg.per_camera[:2]  # 80 frames/s: 0.4 of raw
    assert tax_target(per_frame_tax([raw, cg], 10.0)).passed is False
    assert per_frame_tax([raw], 10.0) is None


def test_the_near_free_detector_speaks_the_demo_detectors_format(tmp_path: Path) -> None:
    """Its output goes through the same engine code as the real detector's (names from
    its metadata, three boxes per image, batched)."""
    from benchmarks.tiny_detector import NAMES, build
    from deployments.inference.engines import EngineOptions, load_engine
    from graph.common.vision import DetectParams

    engine = load_engine(build(tmp_path / "tiny.onnx"), EngineOptions(640, 1, gpu=False))
    rows = engine.detect(
        np.zeros((2, 640, 640, 3), np.uint8), [DetectParams(0.25, 0.7, None, 300)] * 2
    )
    assert engine.names == NAMES and len(rows) == 2
    assert [int(r[5]) for r in rows[1]] == [0, 0, 1] and rows[0][0][4] == pytest.approx(0.91)


def test_a_camera_missing_from_a_listing_is_named() -> None:
    # A camera actor that did not answer GET /streams in time is left out of the
    # listing; counted from zero, its camera would get every frame since it started
    # (one had 88 frames in an 8 s window at 10 fps): the window waits for it instead.
    listing = {
        "streams": [
            {"state": "running", "subscriptions": [{"subscription_id": "a", "processed": 5}]}
        ]
    }
    counters = subscription_counters(listing)
    assert missing_from(counters, ["a", "b"]) == ["b"]
    assert missing_from(counters, ["a"]) == []


def test_a_benchmark_cluster_never_restores_make_runs_cameras(tmp_path: Path) -> None:
    """The registry of a benchmark's camgraph keeps its subscriptions in a file of its
    own: with serve_config.yaml's default (`data/streams.json`, make run's) it would
    restore make run's demo camera into the measurement."""
    base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config = with_own_state(base, tmp_path)
    for app in config["applications"]:
        path = Path(app["args"]["streams"]["state_path"])
        assert path.parent == tmp_path and path.name.startswith("streams-")
    assert base == yaml.safe_load((ROOT / "serve_config.yaml").read_text())  # a copy


def test_the_overload_run_is_added_where_the_sweep_has_no_2x_point() -> None:
    """2 x of 43.9 fps at 10 fps a camera is 9 cameras: the sweep's 8 (1.8 x) and 16
    (3.6 x) are not "2 x", so the harness adds a run of 9; one of 10 would count."""
    assert overload_run_cameras([1, 4, 8, 16], 43.9, 10.0) == 9
    assert overload_run_cameras([1, 4, 10, 16], 43.9, 10.0) is None
    assert overload_run_cameras([1, 4, 8, 16], 36.4, 10.0) is None  # 8 is 2.2 x
    # 16 cameras offer 2.6 x of 61.7 fps (2026-12-05): not "2 x", though 16 <= 1.25 x 13.
    assert overload_run_cameras([1, 4, 8, 16], 61.7, 10.0) == 13
    assert overload_run_cameras([1, 4, 8, 15], 61.7, 10.0) is None  # 2.4 x
    assert overload_run_cameras([1, 4], None, 10.0) is None  # no capacity measured


def test_free_port_never_hands_out_a_port_that_ray_binds_by_default_or_one_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CI once got 52365 from the kernel for Serve's HTTP port; Ray's dashboard agent then
    # bound it by default and `serve.start` failed. The kernel's answers, replayed.
    from benchmarks import peers

    handed_out = iter([52365, 8265, 41234, 41234, 41235])
    monkeypatch.setattr(peers, "_handed_out", set())

    class KernelSocket:
        def __enter__(self) -> "KernelSocket":
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def bind(self, address: tuple[str, int]) -> None:
            assert address == ("127.0.0.1", 0)
            self.port = next(handed_out)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(peers.socket, "socket", KernelSocket)
    assert peers.free_port() == 41234
    assert peers.free_port() == 41235  # never the same port twice
    assert 52365 in peers.RAY_DEFAULT_PORTS


def test_the_take_age_is_the_median_of_the_cameras_that_report_it() -> None:
    counters = {
        "a": {"take_age_ms_p50": 40.0},
        "b": {"take_age_ms_p50": 90.0},
        "c": {"take_age_ms_p50": 60.0},
        "d": {"take_age_ms_p50": None},  # nothing processed yet
    }
    assert take_age_median(counters, ["a", "b", "c", "d", "gone"]) == 60.0
    assert take_age_median(counters, ["d"]) is None


def test_raw_variants_add_one_batched_process_per_batch_size() -> None:
    cams = [Camera(f"cam{i}", f"/c{i}.mp4") for i in range(4)]
    variants = raw_variants(cams, cores=2, batches=[32, 1, 2, 8, 8])
    assert [(name, len(shares), threads, batch) for name, shares, threads, batch in variants] == [
        ("1 proc x 2 threads", 1, 2, 1),
        ("2 procs x 1 thread", 2, 1, 1),
        ("1 proc, batches of 2", 1, 2, 2),
        ("1 proc, batches of 4", 1, 2, 4),  # 8 and 32 of 4 cameras: one run of 4
    ]
    assert parse_batches(None, gpu=True) == [8, 32] and parse_batches(None, gpu=False) == []
    assert parse_batches("1,4", gpu=True) == [4] and parse_batches("", gpu=True) == []
    with pytest.raises(ValueError, match="positive"):
        parse_batches("0,8", gpu=False)


def test_round_robin_batches_take_each_ready_camera_once_and_go_on_after_the_last() -> None:
    ready = {0: ["a0"], 1: [], 2: ["c0", "c1"], 3: ["d0"], 4: ["e0"]}
    takers = [lambda k=k: ready[k].pop(0) if ready[k] else None for k in range(5)]
    assert take_round_robin(takers, 0, 2) == ([(0, "a0"), (2, "c0")], 3)
    assert take_round_robin(takers, 3, 2) == ([(3, "d0"), (4, "e0")], 5)
    # From 5 (= 0 in the circle): camera 2's next frame, then nothing else is ready.
    assert take_round_robin(takers, 5, 2) == ([(2, "c1")], 3)
    assert take_round_robin(takers, 3, 2) == ([], 3)  # none ready: the turn stays


def test_a_batched_raw_process_accounts_for_every_frame(tmp_path: Path) -> None:
    """Three cameras replayed losslessly, batches of up to 3 through a real session:
    every frame is accounted for, and runs did carry several cameras' frames."""
    from benchmarks.baselines import RawSpec, raw_worker
    from benchmarks.frames import ClipSpec, ensure_clips
    from benchmarks.tiny_detector import build

    clips = ensure_clips(tmp_path / "clips", 3, ClipSpec(n_frames=12, fps=10, scale=0.25), 1)
    cams = tuple(Camera(f"cam{i}", str(p)) for i, p in enumerate(clips))
    model = build(tmp_path / "tiny.onnx")
    spec = RawSpec(str(model), 640, 1, cams, "saturation", 0.5, 1.5, batch=3)
    result = raw_worker(spec, time.time)
    assert all(c["processed"] > 0 for c in result["cameras"])
    for camera in result["cameras"]:
        assert camera["drops"] == {}  # lossless
        assert camera["offered"] == camera["processed"] + camera["in_flight"]
    assert 2 <= result["largest_batch"] <= 3
