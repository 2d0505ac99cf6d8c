"""One local Ray cluster for the whole integration session (as Ray's cluster tests)."""

import os
from collections.abc import Iterator
from typing import Any

import pytest

from graph.ray_settings import LEAN_ENV
from tests.peers import free_port

# As serve_config.yaml's grpc_options (the stubs come from `make protos`).
GRPC_SERVICERS = ["protos.camgraph_pb2_grpc.add_CamgraphServicer_to_server"]


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    dashboard_port = free_port()
    # Always a fresh local cluster: never attach to one left by `make run`.
    os.environ.pop("RAY_ADDRESS", None)
    # Ray's background work turned down as `make run` does (its workers inherit these).
    for key, value in LEAN_ENV.items():
        os.environ.setdefault(key, value)
    # Logical CPUs above the 2 physical ones: replicas ask for fractions and mostly wait.
    # The dashboard is on because `serve deploy` (the operators' path) talks to it.
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=False,
        namespace="camgraph-tests",
    )
    # Serve's ports are taken once Ray's own (some random) are bound, so none collide.
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS},
    )
    yield {
        "http_port": http_port,
        "http_url": f"http://127.0.0.1:{http_port}",
        "grpc_port": grpc_port,
        "grpc_target": f"127.0.0.1:{grpc_port}",
        "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
    }
    serve.shutdown()
    ray.shutdown()
