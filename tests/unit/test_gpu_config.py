"""`camgraph gpu-config`: serve_config.yaml's GPU variant is a config Serve and camgraph
both accept, with the detectors, and only they, on GPUs."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from graph.app import Deployments, build_graph
from graph.cli import main
from graph.config import AppConfig
from graph.gpu_config import GpuSettings, gpu_variant
from stream_actors.settings import StreamSettings
from tests.unit.test_graph import RecordingDeployment

ROOT = Path(__file__).resolve().parents[2]


def shipped() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def test_the_detectors_get_gpus_and_batches_and_the_rest_is_unchanged() -> None:
    config = shipped()
    before = copy.deepcopy(config)
    variant = gpu_variant(config, GpuSettings(gpus_per_replica=0.5, replicas=2))
    assert config == before  # the input is left as it was
    (app,) = variant["applications"]
    by_name = {d["name"]: d for d in app["deployments"]}
    detector = by_name["Detector_demo_vehicle_det_v1"]
    assert detector["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert detector["user_config"] == {"max_batch_size": 16, "batch_wait_timeout_s": 0.003}
    scaling = detector["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (2, 2)
    assert scaling["policy"] == {"policy_function": "graph.scaling:frames_policy"}  # kept
    assert detector["max_ongoing_requests"] >= 32
    (old_app,) = before["applications"]
    for old in old_app["deployments"]:
        if not old["name"].startswith("Detector_"):
            assert by_name[old["name"]] == old  # classifiers, actions, ingress: as shipped
    assert {k: v for k, v in app["args"].items() if k != "streams"} == old_app["args"]
    dispatch = StreamSettings.model_validate(app["args"]["streams"]).dispatch
    assert (dispatch.live_frames_per_call, dispatch.max_frames_per_call) == (8, 16)
    assert dispatch.calls_per_replica == 2.0


def test_the_variant_is_a_config_serve_and_camgraph_accept() -> None:
    variant = gpu_variant(shipped())
    ServeDeploySchema.model_validate(variant)
    (app,) = variant["applications"]
    args = AppConfig.model_validate(app["args"])
    recorded = [RecordingDeployment(n) for n in ("Detector", "Ingress", "Classifier", "Actions")]
    build_graph(args, Deployments(*recorded))  # type: ignore[arg-type]
    bound = {name for d in recorded for name, _ in d.bound}
    assert {d["name"] for d in app["deployments"]} <= bound


def test_the_command_prints_the_variant_and_refuses_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ROOT / "serve_config.yaml"
    assert main(["gpu-config", str(config), "--max-batch-size", "8"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == gpu_variant(shipped(), GpuSettings(max_batch_size=8))
    assert main(["gpu-config", str(config), "--max-batch-size", "64"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert main(["gpu-config", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "empty.yaml").write_text("[]")
    assert main(["gpu-config", str(tmp_path / "empty.yaml")]) == 2
    assert "no applications" in capsys.readouterr().err
