"""`camgraph gpu-config`: a GPU node's variant of a serve config. camgraph's detectors,
and only they, get GPUs and batches; everything else is kept; Serve and camgraph both
accept the result."""

import json
from pathlib import Path
from typing import Any

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
ARCHIVE = str(ROOT / "models" / "demo.mpta")


def shipped() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return config


def by_name(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in app["deployments"]}


def test_the_shipped_detector_gets_a_gpu_and_batches_and_the_rest_is_kept() -> None:
    config = shipped()
    before = json.loads(json.dumps(config))
    variant, notes = gpu_variant(config)
    assert config == before  # the input is left as it was
    (app,), (old_app,) = variant["applications"], before["applications"]
    detector = by_name(app)["Detector_demo_vehicle_det_v1"]
    assert detector["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert detector["user_config"] == {"max_batch_size": 16, "batch_wait_timeout_s": 0.003}
    scaling = detector["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (2, 2)  # as configured
    assert scaling["target_ongoing_requests"] == 16  # frames per replica: a batch at least
    assert scaling["policy"] == {"policy_function": "graph.scaling:frames_policy"}
    assert detector["max_ongoing_requests"] >= 32
    for old in old_app["deployments"]:
        if not old["name"].startswith("Detector_"):
            assert by_name(app)[old["name"]] == old  # classifiers, actions, ingress
    assert {k: v for k, v in app["args"].items() if k != "streams"} == old_app["args"]
    dispatch = StreamSettings.model_validate(app["args"]["streams"]).dispatch
    assert (dispatch.live_frames_per_call, dispatch.max_frames_per_call) == (8, 16)
    assert dispatch.calls_per_replica == 4  # 2 batches of 16 in calls of 8
    assert any("2 GPUs" in n for n in notes)  # 2 replicas x 1 GPU: said, not hidden
    pinned, _ = gpu_variant(shipped(), GpuSettings(replicas=1, gpus_per_replica=0.5))
    one = by_name(pinned["applications"][0])["Detector_demo_vehicle_det_v1"]
    assert one["autoscaling_config"]["max_replicas"] == 1
    assert one["ray_actor_options"]["num_gpus"] == 0.5


def test_the_variant_is_a_config_serve_and_camgraph_accept() -> None:
    variant, _ = gpu_variant(shipped())
    ServeDeploySchema.model_validate(variant)
    (app,) = variant["applications"]
    args = AppConfig.model_validate(app["args"])
    recorded = [RecordingDeployment(n) for n in ("Detector", "Ingress", "Classifier", "Actions")]
    build_graph(args, Deployments(*recorded))  # type: ignore[arg-type]
    bound = {name for d in recorded for name, _ in d.bound}
    assert {d["name"] for d in app["deployments"]} <= bound


def test_other_applications_and_shared_yaml_anchors_are_left_alone() -> None:
    text = f"""
applications:
  - name: other
    import_path: mymod:app
    deployments:
      - name: Detector_x
        num_replicas: 3
  - name: camgraph
    import_path: graph.app:build_app
    args:
      pipelines: [{{archive: {ARCHIVE}}}]
    deployments:
      - name: Detector_demo_vehicle_det_v1
        ray_actor_options: &small {{num_cpus: 0.1}}
        user_config: &batch {{max_batch_size: 8, batch_wait_timeout_s: 0.01}}
      - name: Classifier_demo_bodytype_cls_v1
        ray_actor_options: *small
        user_config: *batch
      - name: Ingress
        ray_actor_options: *small
"""
    config = yaml.safe_load(text)
    variant, notes = gpu_variant(config)
    other, camgraph = variant["applications"]
    assert other == config["applications"][0] and "args" not in other
    assert any("'other': not camgraph's" in n for n in notes)
    deployments = by_name(camgraph)
    assert deployments["Detector_demo_vehicle_det_v1"]["ray_actor_options"]["num_gpus"] == 1
    assert deployments["Classifier_demo_bodytype_cls_v1"]["ray_actor_options"] == {"num_cpus": 0.1}
    assert deployments["Classifier_demo_bodytype_cls_v1"]["user_config"]["max_batch_size"] == 8
    assert deployments["Ingress"]["ray_actor_options"] == {"num_cpus": 0.1}
    assert "&id" not in yaml.safe_dump(variant)


def test_detectors_without_an_entry_get_one_and_urls_are_named() -> None:
    args = {
        "models": [{"id": "plain", "path": "models/demo-detector.onnx"}],
        "pipelines": {
            "archives": [{"archive": ARCHIVE}, {"archive": "https://cms.example/p.mpta"}],
            "allowed_urls": ["https://cms.example/"],
        },
    }
    config = {"applications": [{"name": "c", "import_path": "graph.app:build_app", "args": args}]}
    variant, notes = gpu_variant(config)
    deployments = by_name(variant["applications"][0])
    for name in ("Detector_plain", "Detector_demo_vehicle_det_v1", "PipelineDetector"):
        assert deployments[name]["ray_actor_options"]["num_gpus"] == 1.0
        assert deployments[name]["user_config"]["max_batch_size"] == 16
    assert any("https://cms.example/p.mpta: not read" in n for n in notes)


def test_a_users_own_settings_are_kept_where_they_are_not_the_gpus() -> None:
    args = {
        "models": [{"id": "m", "path": "models/demo-detector.onnx"}],
        "streams": {
            "streams_per_actor": 4,
            "dispatch": {"max_frames_per_call": 32, "calls_per_replica": None, "fair_share": False},
        },
    }
    detector = {"name": "Detector_m", "num_replicas": 3, "max_queued_requests": -1}
    detector["ray_actor_options"] = {"num_cpus": 2, "memory": 1000}
    config = {
        "applications": [
            {
                "name": "c",
                "import_path": "graph.app:build_app",
                "args": args,
                "deployments": [detector],
            }
        ]
    }
    variant, _ = gpu_variant(config)
    (app,) = variant["applications"]
    dispatch = app["args"]["streams"]["dispatch"]
    # 4 streams per actor: a call cannot carry more than 4 live frames.
    assert dispatch == {
        "max_frames_per_call": 32,
        "calls_per_replica": None,
        "fair_share": False,
        "live_frames_per_call": 4,
    }
    d = by_name(app)["Detector_m"]
    assert d["ray_actor_options"] == {"num_cpus": 2, "memory": 1000, "num_gpus": 1.0}
    assert (d["num_replicas"], d["max_queued_requests"]) == (3, -1)


def test_the_command_prints_the_variant_and_refuses_what_serve_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ROOT / "serve_config.yaml"
    assert main(["gpu-config", str(config), "--max-batch-size", "8"]) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out) == gpu_variant(shipped(), GpuSettings(max_batch_size=8))[0]
    assert "2 GPUs" in out.err
    for bad in (
        ["--max-batch-size", "64"],
        ["--gpus-per-replica", "1.5"],
        ["--gpus-per-replica", "0.00001"],
    ):
        assert main(["gpu-config", str(config), *bad]) == 2
    malformed = {
        "missing.yaml": None,
        "list.yaml": "[]",
        "deployment.yaml": "applications: [{name: x, import_path: 'm:app', deployments: [7]}]",
        "nothing.yaml": "applications: [{name: x, import_path: 'm:app'}]",
        "binary.yaml": b"\xff\xfe",
    }
    for name, content in malformed.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        assert main(["gpu-config", str(path)]) == 2, name
    assert "no camgraph detector" in capsys.readouterr().err
