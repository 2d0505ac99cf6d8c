"""One local Ray cluster for the whole integration session (as Ray's cluster tests)."""

import socket
from collections.abc import Iterator
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    http_port, dashboard_port = free_port(), free_port()
    # Logical CPUs above the 2 physical ones: replicas ask for fractions and mostly wait.
    # The dashboard is on because `serve deploy` (the operators' path) talks to it.
    ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=False,
        namespace="camgraph-tests",
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    yield {
        "http_port": http_port,
        "http_url": f"http://127.0.0.1:{http_port}",
        "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
    }
    serve.shutdown()
    ray.shutdown()
