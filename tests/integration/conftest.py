"""One local Ray cluster for the whole integration session (as Ray's cluster tests)."""

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.peers import free_port

# As serve_config.yaml's grpc_options (the stubs come from `make protos`).
GRPC_SERVICERS = ["protos.camgraph_pb2_grpc.add_CamgraphServicer_to_server"]


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    http_port, grpc_port, dashboard_port = free_port(), free_port(), free_port()
    # Always a fresh local cluster: never attach to one left by `make run`.
    os.environ.pop("RAY_ADDRESS", None)
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


def detector_stats(app: str, model_id: str = "demo") -> dict[str, Any]:
    """The counters of the (single) replica of Detector_<model_id> in `app`."""
    from ray import serve

    handle = serve.get_deployment_handle(f"Detector_{model_id}", app_name=app)
    return handle.stats.remote().result(timeout_s=30)


def wait_until(predicate: Any, timeout_s: float = 120, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # e.g. the app is not deployed yet
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what() if callable(what) else what}")


def remove_app(app: str) -> None:
    """Delete a test app and its detached actors, which outlive it: the stream registry
    (stopping its camera actors first), the EventHub and the media jobs actor."""
    import contextlib

    import ray
    from ray import serve

    from deployments.ingress import STREAMS_NAMESPACE
    from deployments.jobs.manager import jobs_actor_name
    from graph.events.hub import hub_name
    from stream_actors.actors import registry_name

    def kill(name: str, shutdown: bool = False) -> None:
        with contextlib.suppress(ValueError):  # ValueError: no such actor
            actor = ray.get_actor(name, STREAMS_NAMESPACE)
            if shutdown:
                ray.get(actor.shutdown.remote(), timeout=60)
            ray.kill(actor, no_restart=True)

    kill(registry_name(app), shutdown=True)  # the cameras first: they publish to the hub
    serve.delete(app)  # then the ingress, which reads the hub
    kill(hub_name(app))
    kill(jobs_actor_name(app))
