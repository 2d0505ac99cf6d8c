"""gRPC through Serve's gRPC proxy with the generated client (protos/camgraph.proto):
Detect agrees with HTTP /detect, errors map to status codes, the bearer token is
enforced, and StreamEvents resumes, filters and follows live events."""

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import cv2
import grpc
import httpx
import numpy as np
import pytest
import ray

from demo.datasets import HELD_OUT_SEED_START
from demo.scenes import Scene
from deployments.detector import Detector
from deployments.ingress import Ingress
from graph.app import Deployments, build_graph
from graph.common.names import STREAMS_NAMESPACE, hub_name
from graph.config import PROJECT_ROOT
from protos import camgraph_pb2 as pb
from protos import camgraph_pb2_grpc
from tests.integration.apps import app_config, deployed, wait_until

pytestmark = pytest.mark.integration
APP = "camgraph-grpc-test"
PREFIX = "/grpc-test"
MODEL = PROJECT_ROOT / "models" / "demo-detector.onnx"
UPLOAD_LIMIT = 1024 * 1024
TOKEN = "grpc-test-token-3f9c"
APP_MD = ("application", APP)
AUTH = (APP_MD, ("authorization", f"Bearer {TOKEN}"))


@pytest.fixture(scope="module")
def stub(
    cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[camgraph_pb2_grpc.CamgraphStub]:
    tmp = tmp_path_factory.mktemp("grpc")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    config = app_config(
        tmp,
        ingress={
            "max_upload_bytes": UPLOAD_LIMIT,
            "default_model": "demo",
            "auth_token_file": str(token_file),
        },
    )
    detector = Detector.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    graph = build_graph(config, Deployments(detector, Ingress.options(num_replicas=1)))
    with (
        grpc.insecure_channel(cluster["grpc_target"]) as channel,
        deployed(APP, graph, route_prefix=PREFIX),
    ):
        client = camgraph_pb2_grpc.CamgraphStub(channel)
        request = pb.DetectRequest(image=scene_jpeg())
        # The proxy learns the app's routes asynchronously; the model loads meanwhile.
        wait_until(
            lambda: client.Detect(request, metadata=AUTH, timeout=30).model == "demo",
            what="gRPC Detect to answer",
        )
        yield client


def scene_jpeg(seed: int = HELD_OUT_SEED_START + 7) -> bytes:
    image, _, _ = Scene(seed, n_frames=1).render(0)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return bytes(data.tobytes())


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def http_detect(cluster: dict[str, Any], image: bytes, config: dict[str, Any]) -> list[dict]:
    response = httpx.post(
        f"{cluster['http_url']}{PREFIX}/detect",
        files={"file": ("scene.jpg", image, "image/jpeg")},
        data={"config": json.dumps(config)},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body: list[dict] = response.json()
    return body


@pytest.mark.parametrize(
    ("grpc_config", "http_config"),
    [
        (pb.DetectConfig(), {}),
        (
            pb.DetectConfig(conf=0.5, classes=[0], max_det=3),
            {"conf": 0.5, "classes": [0], "max_det": 3},
        ),
    ],
    ids=["defaults", "config"],
)
def test_detect_agrees_with_http(
    stub: camgraph_pb2_grpc.CamgraphStub,
    cluster: dict[str, Any],
    grpc_config: pb.DetectConfig,
    http_config: dict[str, Any],
) -> None:
    image = scene_jpeg()
    reply = stub.Detect(
        pb.DetectRequest(image=image, config=grpc_config), metadata=AUTH, timeout=60
    )
    expected = http_detect(cluster, image, http_config)
    assert reply.model == "demo"
    assert len(reply.detections) == len(expected) > 0
    if http_config:
        assert len(expected) <= 3 and {d["class_id"] for d in expected} == {0}

    def key(d: dict[str, Any]) -> tuple[int, float, float]:
        return d["class_id"], d["box"]["x1"], d["box"]["y1"]

    got = [
        {
            "class_id": d.class_id,
            "label": d.label,
            "confidence": d.confidence,
            "box": {"x1": d.box.x1, "y1": d.box.y1, "x2": d.box.x2, "y2": d.box.y2},
        }
        for d in reply.detections
    ]
    for a, b in zip(sorted(got, key=key), sorted(expected, key=key), strict=True):
        assert (a["class_id"], a["label"]) == (b["class_id"], b["label"])
        assert abs(a["confidence"] - b["confidence"]) <= 1e-6
        assert np.allclose(
            [a["box"][k] for k in ("x1", "y1", "x2", "y2")],
            [b["box"][k] for k in ("x1", "y1", "x2", "y2")],
            rtol=0,
            atol=1e-3,
        )


def test_detect_errors_map_to_status_codes(stub: camgraph_pb2_grpc.CamgraphStub) -> None:
    image = scene_jpeg()
    cases = [
        (pb.DetectRequest(image=image, model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (pb.DetectRequest(image=b"\x00garbage" * 64), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        (pb.DetectRequest(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (
            pb.DetectRequest(image=b"\xff" * (UPLOAD_LIMIT + 1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            str(UPLOAD_LIMIT),
        ),
        (
            pb.DetectRequest(image=image, config=pb.DetectConfig(conf=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.conf",
        ),
        (
            pb.DetectRequest(image=image, config=pb.DetectConfig(classes=[-1])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.classes",
        ),
    ]
    for request, code, detail in cases:
        error = rpc_error(lambda r=request: stub.Detect(r, metadata=AUTH, timeout=60))
        assert error.code() == code, (request.model, error.details())
        assert detail in error.details()


def test_missing_and_wrong_tokens_are_unauthenticated(
    stub: camgraph_pb2_grpc.CamgraphStub,
) -> None:
    request = pb.DetectRequest(image=scene_jpeg())
    for metadata in [
        (APP_MD,),
        (APP_MD, ("authorization", "Bearer wrong-token")),
        (APP_MD, ("authorization", f"Basic {TOKEN}")),
        (APP_MD, ("authorization", f"Bearer {TOKEN}x")),
    ]:
        error = rpc_error(lambda m=metadata: stub.Detect(request, metadata=m, timeout=30))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in error.details() and TOKEN not in error.details()
    stream = stub.StreamEvents(pb.EventFilter(), metadata=(APP_MD,), timeout=30)
    error = rpc_error(lambda: next(stream))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # the right token answers
    assert stub.Detect(request, metadata=AUTH, timeout=60).model == "demo"


def job_event(job: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"topic": f"job:{job}", "job_id": job, "type": kind, "data": data}


def test_stream_events_resumes_filters_and_follows(stub: camgraph_pb2_grpc.CamgraphStub) -> None:
    hub = ray.get_actor(hub_name(APP), STREAMS_NAMESPACE)
    start = ray.get(hub.last_id.remote())
    ray.get(
        hub.publish.remote(
            [
                job_event("grpc-job", "job.progress", {"done": 1, "note": "é"}),
                job_event("other-job", "job.progress", {"done": 5}),
                job_event("grpc-job", "job.detections", {"boxes": [[1, 2, 3, 4]]}),
            ]
        )
    )
    stream = stub.StreamEvents(
        pb.EventFilter(jobs=["grpc-job"], after_id=start), metadata=AUTH, timeout=60
    )
    first, second = next(stream), next(stream)
    assert start < first.id < second.id
    assert (first.type, second.type) == ("job.progress", "job.detections")
    assert {first.job_id, second.job_id} == {"grpc-job"} and first.topic == "job:grpc-job"
    assert json.loads(first.data_json) == {"done": 1, "note": "é"}
    assert json.loads(second.data_json) == {"boxes": [[1, 2, 3, 4]]}
    assert first.camera_id == "" and first.time > 0
    # live: published after the stream started
    ray.get(hub.publish.remote([job_event("grpc-job", "job.done", {"ok": True})]))
    live = next(stream)
    assert (live.type, json.loads(live.data_json)) == ("job.done", {"ok": True})
    assert live.id > second.id
    # types filter, resumed from the same point (while the first stream still runs)
    only = stub.StreamEvents(
        pb.EventFilter(jobs=["grpc-job"], types=["job.detections"], after_id=start),
        metadata=AUTH,
        timeout=60,
    )
    assert next(only).id == second.id
    only.cancel()
    stream.cancel()


def test_stream_events_without_after_id_starts_now(stub: camgraph_pb2_grpc.CamgraphStub) -> None:
    hub = ray.get_actor(hub_name(APP), STREAMS_NAMESPACE)
    before = ray.get(hub.publish.remote([job_event("live-job", "before", {})]))
    stream = stub.StreamEvents(pb.EventFilter(jobs=["live-job"]), metadata=AUTH, timeout=60)
    got: list[pb.Event] = []
    reader = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 50
    while reader.is_alive() and time.monotonic() < deadline:  # until the stream is live
        ray.get(hub.publish.remote([job_event("live-job", "tick", {})]))
        reader.join(0.5)
    stream.cancel()
    assert got and got[0].type == "tick" and got[0].id > before
