"""A camera actor that Ray cannot place is reported as pending for lack of CPU (in
`POST /streams`, `GET /streams` and `/health`), at once rather than after a timeout,
and the registry's repair loop goes on with the actors it can reach."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from deployments.detector import Detector
from deployments.ingress import Ingress
from graph.app import Deployments, build_graph
from graph.config import PROJECT_ROOT
from tests.integration.apps import app_config, demo_model, deployed, healthy, wait_until

pytestmark = pytest.mark.integration
APP = "camgraph-placement-test"


@pytest.fixture(scope="module")
def app(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("placement")
    config = app_config(
        data,
        models=[demo_model(intra_op_threads="auto")],
        # More CPUs than the test cluster has: Ray leaves the camera actor pending.
        streams={"reconcile_s": 1.0, "camera_actor_cpus": 16},
    )
    detector = Detector.options(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
    url = f"{cluster['http_url']}/placement"
    graph = build_graph(config, Deployments(detector, Ingress.options(num_replicas=1)))
    with deployed(APP, graph, route_prefix="/placement", ready=healthy(url), what="the model"):
        yield url


def test_an_unplaceable_camera_actor_is_reported_pending_not_as_a_timeout(app: str) -> None:
    clip = PROJECT_ROOT / "data" / "demo-scene.mp4"
    body = {"subscriptionIdentifier": "d;cam-pending", "fileUrl": str(clip)}
    started = time.monotonic()
    first = httpx.post(f"{app}/streams", json=body, timeout=60)
    first_s = time.monotonic() - started
    assert first.status_code == 201, first.text
    # The first call learns it the hard way (one call timeout, then Ray's state) ...
    assert first.json()["pending_error"].startswith("pending: not enough CPU"), first.json()
    assert first_s < 30

    def listed() -> dict[str, Any] | None:
        streams = httpx.get(f"{app}/streams", timeout=30).json()["streams"]
        return next((s for s in streams if s["state"] == "pending"), None)

    stream = wait_until(listed, 60, "the stream to be listed as pending")
    assert stream["last_error"].startswith("pending: not enough CPU"), stream
    assert "16 CPU" in stream["last_error"]
    health = httpx.get(f"{app}/health", timeout=30).json()
    assert health["streams"]["by_state"] == {"pending": 1}
    # ... and later calls answer at once: the registry asks Ray, not the actor.
    body["subscriptionIdentifier"] = "d2;cam-pending"
    started = time.monotonic()
    again = httpx.post(f"{app}/streams", json=body, timeout=60)
    again_s = time.monotonic() - started
    assert again.json()["pending_error"].startswith("pending: not enough CPU")
    # No call timeout this time: well under the first call's (a loaded box slows both).
    assert again_s < max(5.0, first_s / 2), (again_s, first_s)
    for sub in ("d;cam-pending", "d2;cam-pending"):
        assert httpx.delete(f"{app}/streams/{sub}", timeout=60).status_code == 204


def test_a_file_camera_outside_the_allowed_directories_is_refused(app: str) -> None:
    for path in ("/etc/passwd", "file:///proc/self/environ", str(PROJECT_ROOT / "README.md")):
        body = {"subscriptionIdentifier": "d;cam-file", "fileUrl": path}
        refused = httpx.post(f"{app}/streams", json=body, timeout=60)
        assert refused.status_code == 403, refused.text
        message = refused.json()["detail"]["message"]
        assert message == "refused by policy: file cameras read only from streams.file_dirs"
    streams = httpx.get(f"{app}/streams", timeout=30).json()["streams"]
    assert all(s["kind"] != "file" or "cam-file" not in str(s) for s in streams)
    assert httpx.get(f"{app}/cameras/cam-file/image", timeout=30).status_code == 404
