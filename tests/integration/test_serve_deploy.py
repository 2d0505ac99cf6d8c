"""serve_config.yaml deployed the operators' way: `serve deploy` against the cluster."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import yaml

from graph.config import PROJECT_ROOT
from tests.integration.apps import detector_stats, healthy, remove_app, wait_until

pytestmark = pytest.mark.integration
APP = "camgraph-deploy-test"
PREFIX = "/deploy-test"
MODEL = "demo_vehicle_det_v1"  # the root of serve_config.yaml's demo pipeline


def config_for(cluster: dict[str, Any], user_config: dict[str, Any], data: Path) -> dict[str, Any]:
    """The project's serve_config.yaml, renamed, pinned to one small detector replica and
    writing its archives cache, streams state and local action store under `data`."""
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": cluster["http_port"]}
    (app,) = config["applications"]
    app.update(name=APP, route_prefix=PREFIX)
    app["args"]["archive_cache_dir"] = str(data / "archives")
    app["args"]["actions"]["data_dir"] = str(data / "actions")
    app["args"].setdefault("streams", {})["state_path"] = str(data / "streams.json")
    for deployment in app["deployments"]:
        if deployment["name"].startswith("Detector_"):
            deployment.pop("autoscaling_config", None)
            deployment.update(
                num_replicas=1,
                user_config=user_config,
                ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
            )
    return config


def serve_deploy(cluster: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).with_name("serve")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run(
        [str(serve_cli), "deploy", str(path), "--address", cluster["dashboard_url"]],
        check=True,
        env=env,
        timeout=120,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def deployed(
    cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, Any], Path]]:
    data = tmp_path_factory.mktemp("deploy")
    path = data / "serve_config.yaml"
    try:
        serve_deploy(
            cluster,
            config_for(cluster, {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}, data),
            path,
        )
        url = cluster["http_url"] + PREFIX
        wait_until(healthy(url), what="the config-deployed app to be healthy")
        yield cluster, path
    finally:
        remove_app(APP)


def test_config_deploy_serves_detect(deployed: tuple[dict[str, Any], Path]) -> None:
    cluster, _ = deployed
    image = cv2.imencode(".jpg", np.full((120, 160, 3), 80, np.uint8))[1].tobytes()
    r = httpx.post(
        cluster["http_url"] + PREFIX + "/detect", files={"file": ("a.jpg", image)}, timeout=60
    )
    assert r.status_code == 200, r.text


def test_user_config_change_applies_without_restarting_the_replica(
    deployed: tuple[dict[str, Any], Path],
) -> None:
    cluster, path = deployed
    before = detector_stats(APP, MODEL)
    assert before["config"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}
    serve_deploy(
        cluster,
        config_for(cluster, {"max_batch_size": 2, "batch_wait_timeout_s": 0.02}, path.parent),
        path,
    )
    after = wait_until(
        lambda: (s := detector_stats(APP, MODEL))["config"]["max_batch_size"] == 2 and s,
        what="the new user_config to reach the replica",
    )
    assert after["config"] == {"max_batch_size": 2, "batch_wait_timeout_s": 0.02}
    assert (after["pid"], after["replica"]) == (before["pid"], before["replica"])
