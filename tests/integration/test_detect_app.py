"""The deployed graph on a real local Ray cluster, through real HTTP."""

import asyncio
import json
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from ray.serve import Application

from demo.datasets import HELD_OUT_SEED_START
from demo.metrics import iou_matrix
from demo.scenes import Scene
from deployments.detector import Detector
from deployments.ingress import Ingress
from graph.app import Deployments, build_graph
from graph.config import PROJECT_ROOT
from tests.integration.apps import app_config, demo_model, deployed, detector_stats, wait_until
from tests.onnx_models import faulty_detector
from tests.unit.test_pt_safe_load import AUTOBACKEND, torch_zip

pytestmark = pytest.mark.integration
APP = "camgraph-detect-test"
MODEL = PROJECT_ROOT / "models" / "demo-detector.onnx"
UPLOAD_LIMIT = 1024 * 1024
PIXEL_LIMIT = 1_500_000  # above a 1280x720 scene


def graph(tmp: Path, user_config: dict[str, Any]) -> Application:
    """For an imperative deploy (serve.run); config deploys are in test_serve_deploy.py."""
    config = app_config(
        tmp,
        models=[
            demo_model(),
            {"id": "broken", "path": str(tmp / "missing.onnx")},
            {"id": "faulty", "path": str(faulty_detector(tmp / "faulty.onnx")), "imgsz": 64},
            {"id": "pt", "path": str(PROJECT_ROOT / "models" / "demo-detector.pt")},
            # The hostile checkpoints: refused with their reason, never run.
            {"id": "evil_call", "path": str(torch_zip(tmp / "call.pt", AUTOBACKEND))},
            {
                "id": "evil_dup",
                "path": str(torch_zip(tmp / "dup.pt", pickle.dumps({}), AUTOBACKEND)),
            },
        ],
        ingress={
            "max_upload_bytes": UPLOAD_LIMIT,
            "max_image_pixels": PIXEL_LIMIT,
            "default_model": "demo",
            # A replica converting the .pt model (torch, on the same 2 cores) may answer
            # late: a slow answer, not a health error, on a loaded CI machine.
            "health_timeout_s": 8,
        },
    )
    detector = Detector.options(
        num_replicas=1,
        user_config=user_config,
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0.5},
    )
    return build_graph(config, Deployments(detector, Ingress.options(num_replicas=1)))


@pytest.fixture(scope="module")
def client(
    cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("models")
    application = graph(tmp, {"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    with deployed(APP, application), httpx.Client(base_url=cluster["http_url"], timeout=60) as c:
        yield c


def wait_for_states(client: httpx.Client, expected: dict[str, str], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get("/health").json()
        states = {k: v["state"] for k, v in body["models"].items()}
        if states == expected or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def test_health_answers_while_models_load_and_reports_every_model(client: httpx.Client) -> None:
    # Polled from right after deployment: the .pt model is checked and exported to ONNX
    # in its replica (torch and Ultralytics imported: seconds; `converting` meanwhile), so
    # /health must answer meanwhile, with only these states.
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pt = client.get("/health", timeout=30).json()["models"]["pt"]  # > health_timeout_s
        state = pt["state"]
        seen.add(state)
        # a real "loading" comes from the replica itself, not from a health timeout
        assert pt["error"] is None, pt
        if state == "enabled":
            break
        time.sleep(0.05)
    assert seen <= {"loading", "converting", "enabled"} and "enabled" in seen
    expected = {"demo": "enabled", "broken": "error", "faulty": "enabled", "pt": "enabled"}
    expected |= {"evil_call": "error", "evil_dup": "error"}
    body = wait_for_states(client, expected)
    assert body["status"] == "degraded"
    assert body["models"]["demo"]["providers"] == ["CPUExecutionProvider"]
    assert body["models"]["demo"]["classes"] == {"0": "vehicle", "1": "person"}
    assert "missing.onnx" in body["models"]["broken"]["error"]


def test_pt_model_through_the_graph_agrees_with_its_onnx_export(client: httpx.Client) -> None:
    body = client.get("/health").json()["models"]
    # The .pt is served as its ONNX export, by ONNX Runtime like any .onnx model.
    assert body["pt"]["providers"] == ["CPUExecutionProvider"] and body["demo"]["load_s"] > 0
    image, _, _ = Scene(HELD_OUT_SEED_START + 9, n_frames=1).render(0)
    files = {"file": ("scene.jpg", jpeg(image), "image/jpeg")}
    onnx = client.post("/detect?model=demo", files=files).json()
    pt = client.post("/detect?model=pt", files=files).json()
    assert len(pt) == len(onnx) > 0

    def key(d: dict[str, Any]) -> tuple[int, int]:
        return d["class_id"], round(d["box"]["x1"])

    for a, b in zip(sorted(pt, key=key), sorted(onnx, key=key), strict=True):
        assert a["label"] == b["label"]
        assert all(abs(a["box"][k] - b["box"][k]) <= 1.5 for k in ("x1", "y1", "x2", "y2"))
        assert abs(a["confidence"] - b["confidence"]) <= 0.01


def test_detect_finds_the_vehicles_of_a_held_out_scene(client: httpx.Client) -> None:
    image, truths, _ = Scene(HELD_OUT_SEED_START + 7, n_frames=1).render(0)
    response = client.post(
        "/detect",
        files={"file": ("scene.jpg", jpeg(image), "image/jpeg")},
        data={"config": json.dumps({"conf": 0.3})},
    )
    assert response.status_code == 200, response.text
    detections = response.json()
    gt = np.array([t.box for t in truths if t.cls == "vehicle" and t.visible_fraction > 0.6])
    boxes = np.array(
        [
            [d["box"][k] for k in ("x1", "y1", "x2", "y2")]
            for d in detections
            if d["label"] == "vehicle"
        ]
    ).reshape(-1, 4)
    found = (iou_matrix(gt, boxes) >= 0.5).any(axis=1)
    assert len(gt) >= 3 and found.sum() >= 0.9 * len(gt)
    assert all(0 <= d["box"]["x2"] <= 1280 and 0 <= d["box"]["y2"] <= 720 for d in detections)


def test_classes_filter_and_max_det_are_applied(client: httpx.Client) -> None:
    image, _, _ = Scene(HELD_OUT_SEED_START + 8, n_frames=1).render(0)
    files = {"file": ("scene.jpg", jpeg(image), "image/jpeg")}
    only_people = client.post("/detect", files=files, data={"config": '{"classes": [1]}'}).json()
    assert all(d["class_id"] == 1 for d in only_people)
    one = client.post("/detect", files=files, data={"config": '{"max_det": 1}'}).json()
    assert len(one) == 1


def test_concurrent_requests_are_all_answered_in_batches(client: httpx.Client) -> None:
    before = detector_stats(APP)["batch_sizes"]
    images = [jpeg(Scene(HELD_OUT_SEED_START + i, n_frames=1).render(0)[0]) for i in range(4)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=120) as ac:
            return await asyncio.gather(
                *(
                    ac.post("/detect", files={"file": ("f.jpg", images[i % 4], "image/jpeg")})
                    for i in range(32)
                )
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32
    after = detector_stats(APP)["batch_sizes"]
    new = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * n for size, n in new.items()) == 32
    assert max(size for size, n in new.items() if n > 0) > 1


def test_bad_requests_get_clear_statuses(client: httpx.Client) -> None:
    good = jpeg(np.full((64, 64, 3), 90, np.uint8))
    r = client.post("/detect", files={"file": ("e.jpg", b"", "image/jpeg")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]["message"]
    r = client.post("/detect", files={"file": ("x.jpg", b"not an image at all", "image/jpeg")})
    assert r.status_code == 400 and "decodable" in r.json()["detail"]["message"]
    # a 5 kB PNG that decodes to 2 megapixels: refused, not decoded into memory
    bomb = cv2.imencode(".png", np.zeros((1000, 2000, 3), np.uint8))[1].tobytes()
    assert len(bomb) < 64 * 1024
    r = client.post("/detect", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 400 and str(PIXEL_LIMIT) in r.json()["detail"]["message"]
    r = client.post("/detect", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "multipart" in r.json()["detail"]["message"]
    noise = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    big = cv2.imencode(".png", noise)[1].tobytes()
    assert len(big) > UPLOAD_LIMIT
    r = client.post("/detect", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and r.json()["detail"]["limit_bytes"] == UPLOAD_LIMIT
    # The same upload chunked (no Content-Length): refused too, not spooled to disk.
    boundary = "camgraph-chunked"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.png"'
        "\r\nContent-Type: image/png\r\n\r\n"
    ).encode()
    parts = [head, *(big[i : i + 65536] for i in range(0, len(big), 65536))]
    parts.append(f"\r\n--{boundary}--\r\n".encode())
    r = client.post(
        "/detect",
        content=iter(parts),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["detail"]["limit_bytes"] == UPLOAD_LIMIT
    # A bomb past PIL's own limit is refused by its size too (it was a 500).
    from tests.unit.test_ingress_images import bomb_png

    r = client.post("/detect", files={"file": ("bomb.png", bomb_png(30_000, 30_000))})
    assert r.status_code == 400 and "900000000 pixels" in r.json()["detail"]["message"]
    r = client.post("/detect", files={"file": ("g.jpg", good)}, data={"config": '{"iou": 3}'})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "iou"]
    r = client.post("/detect", files={"file": ("g.jpg", good)}, data={"config": '{"conff": 1}'})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "conff"
    r = client.post("/detect", files={"file": ("g.jpg", good)}, data={"config": "{nope"})
    assert r.status_code == 422
    r = client.post("/detect", data={"config": "{}"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    r = client.post("/detect?model=nosuch", files={"file": ("g.jpg", good)})
    assert r.status_code == 404 and "demo" in r.json()["detail"]["known"]


def test_model_not_ready_is_503_with_its_state(client: httpx.Client) -> None:
    r = client.post(
        "/detect?model=broken", files={"file": ("g.jpg", jpeg(np.zeros((32, 32, 3), np.uint8)))}
    )
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    detail = r.json()["detail"]
    assert detail["state"] == "error" and "missing.onnx" in detail["error"]


def test_inference_failure_is_500_with_a_logged_error_id(client: httpx.Client) -> None:
    r = client.post(
        "/detect?model=faulty", files={"file": ("g.jpg", jpeg(np.zeros((32, 32, 3), np.uint8)))}
    )
    assert r.status_code == 500
    error_id = r.json()["detail"]["error_id"]
    assert len(error_id) == 12
    logs = Path("/tmp/ray/session_latest/logs/serve")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(error_id in p.read_text(errors="ignore") for p in logs.glob("replica_*Ingress*")):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"error id {error_id} was not logged by the ingress")


def test_openapi_docs_are_served(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "multipart/form-data" in paths["/detect"]["post"]["requestBody"]["content"]


def test_grpc_listens_on_every_interface_so_without_a_token_it_refuses(
    client: httpx.Client, cluster: dict[str, Any]
) -> None:
    import grpc
    import psutil

    from protos import camgraph_pb2 as pb
    from protos import camgraph_pb2_grpc

    port = cluster["grpc_port"]
    listening = {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    # Serve's gRPC proxy has no host option (HTTP is on 127.0.0.1 only): a wildcard.
    assert listening & {"::", "0.0.0.0"}, listening
    image, _, _ = Scene(HELD_OUT_SEED_START + 3, n_frames=1).render(0)
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    request = pb.DetectRequest(image=jpeg.tobytes(), model="demo")
    with grpc.insecure_channel(cluster["grpc_target"]) as channel:
        stub = camgraph_pb2_grpc.CamgraphStub(channel)

        def refused() -> grpc.RpcError | None:
            try:
                stub.Detect(request, metadata=(("application", APP),), timeout=30)
            except grpc.RpcError as exc:
                # NOT_FOUND etc. while the proxy learns the app's routes: not yet.
                return exc if exc.code() == grpc.StatusCode.UNAUTHENTICATED else None
            pytest.fail("gRPC answered a call on an app without a token")

        error = wait_until(refused, 60, "gRPC to refuse the call without a token")
    assert "every network interface" in error.details()


def test_hostile_pt_models_are_refused_with_their_reason_through_detect(
    client: httpx.Client,
) -> None:
    states = client.get("/health").json()["models"]
    assert states["evil_call"]["state"] == "error", states["evil_call"]
    assert "AutoBackend" in states["evil_call"]["error"], states["evil_call"]
    assert "data.pkl" in states["evil_dup"]["error"], states["evil_dup"]
    image = jpeg(np.zeros((64, 64, 3), np.uint8))
    for model in ("evil_call", "evil_dup"):
        r = client.post(f"/detect?model={model}", files={"file": ("f.jpg", image)})
        assert r.status_code == 503 and r.json()["detail"]["state"] == "error", r.text
        assert r.json()["detail"]["error"] == states[model]["error"]
