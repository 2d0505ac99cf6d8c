"""Graph building and app config, without a cluster (recording fakes for Serve classes)."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from graph.app import Deployments, build_app, build_graph
from graph.config import PROJECT_ROOT, AppConfig
from graph.wiring import IngressConfig

ROOT = Path(__file__).resolve().parents[2]


class RecordingDeployment:
    """Stands in for a Serve deployment: records options and bind arguments."""

    def __init__(self, name: str) -> None:
        self.name, self.bound = name, []

    def options(self, **kwargs: Any) -> "RecordingDeployment":
        clone = RecordingDeployment(kwargs.get("name", self.name))
        clone.bound = self.bound
        return clone

    def bind(self, *args: Any) -> tuple[str, tuple[Any, ...]]:
        self.bound.append((self.name, args))
        return (self.name, args)


def test_one_detector_per_model_and_an_ingress_routing_to_them() -> None:
    detector, ingress = RecordingDeployment("Detector"), RecordingDeployment("Ingress")
    config = AppConfig.model_validate(
        {
            "models": [
                {"id": "a", "path": "models/a.onnx"},
                {"id": "b", "path": "/abs/b.pt", "imgsz": 320},
            ]
        }
    )
    app = build_graph(config, Deployments(detector, ingress))  # type: ignore[arg-type]
    names = [name for name, _ in detector.bound]
    assert names == ["Detector_a", "Detector_b"]
    spec_a = detector.bound[0][1][0]
    assert spec_a["path"] == str(PROJECT_ROOT / "models" / "a.onnx")
    assert detector.bound[1][1][0]["path"] == "/abs/b.pt"
    assert app[0] == "Ingress"
    wiring, detectors, classifiers, actions, url_models = app[1]
    assert isinstance(wiring, IngressConfig)
    assert wiring.pipelines == {} and classifiers == {} and actions is None
    assert url_models == [] and wiring.url_pipelines is None  # modelUrl is off by default
    assert wiring.events.capacity_per_topic >= 16
    assert wiring.jobs.jobs_dir == PROJECT_ROOT / "data" / "jobs"
    assert set(detectors) == {"a", "b"} and wiring.model_sizes == {"a": 640, "b": 320}
    assert wiring.detectors == {"a": "Detector_a", "b": "Detector_b"}
    assert wiring.default_model == "a"
    assert wiring.settings.max_upload_bytes > 0
    assert wiring.settings.auth_token_env is None and wiring.settings.auth_token_file is None
    # The registry's state file resolves against the checkout, not the replica's cwd.
    assert wiring.streams.state_path == PROJECT_ROOT / "data" / "streams.json"


@pytest.mark.parametrize(
    "args, problem",
    [
        ({"models": []}, "at least one of models, pipelines"),
        ({"models": [{"id": "a", "path": "x"}, {"id": "a", "path": "y"}]}, "unique"),
        ({"models": [{"id": "bad id!", "path": "x"}]}, "pattern"),
        ({"models": [{"id": "a", "path": "x", "imgsz": 100}]}, "multiple of 32"),
        ({"models": [{"id": "a", "path": "x", "colour": "red"}]}, "Extra inputs"),
    ],
)
def test_bad_app_args_are_rejected_with_the_reason(args: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        AppConfig.model_validate(args)


def test_serve_config_builds_and_its_overrides_name_real_deployments() -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (app_config,) = config["applications"]
    assert app_config["import_path"] == "graph.app:build_app"
    app = build_app(app_config["args"])  # real Serve classes: binding needs no cluster
    assert app is not None
    recorded = [RecordingDeployment(n) for n in ("Detector", "Ingress", "Classifier", "Actions")]
    build_graph(AppConfig.model_validate(app_config["args"]), Deployments(*recorded))  # type: ignore[arg-type]
    bound = {name for d in recorded for name, _ in d.bound}
    assert {d["name"] for d in app_config["deployments"]} <= bound


def test_a_pipeline_binds_its_detector_a_classifier_per_branch_and_actions(tmp_path: Path) -> None:
    recorded = [RecordingDeployment(n) for n in ("Detector", "Ingress", "Classifier", "Actions")]
    config = AppConfig.model_validate(
        {
            "pipelines": [{"archive": "models/demo.mpta"}],
            "archive_cache_dir": str(tmp_path / "cache"),
            "onnx_cache_dir": str(tmp_path / "onnx"),
            "actions": {"redis_url": "redis://127.0.0.1:6379/0"},
        }
    )
    app = build_graph(config, Deployments(*recorded))  # type: ignore[arg-type]
    detector, _, classifier, actions = recorded
    ((name, (spec,)),) = detector.bound
    assert name == "Detector_demo_vehicle_det_v1" and Path(spec["path"]).is_file()
    assert spec["onnx_cache_dir"] == str(tmp_path / "onnx")  # where .pt models are exported
    assert Path(spec["path"]).is_relative_to(tmp_path / "cache")  # extracted from the archive
    branches = {n: args[0] for n, args in classifier.bound}
    assert set(branches) == {"Classifier_demo_bodytype_cls_v1", "Classifier_demo_plate_ocr_v1"}
    assert branches["Classifier_demo_bodytype_cls_v1"]["kind"] == "classifier"
    assert branches["Classifier_demo_plate_ocr_v1"] == {
        "id": "demo_plate_ocr_v1",
        "kind": "ocr",
        "path": None,
        "intra_op_threads": 1,
        "onnx_cache_dir": str(tmp_path / "onnx"),
    }
    ((name, (settings, _, routes)),) = actions.bound
    assert routes == {}  # archive_connections: ignore (the default)
    assert name == "Actions" and settings["redis_url"] == "redis://127.0.0.1:6379/0"
    wiring, _, classifiers, bound_actions, _ = app[1]
    (root,) = wiring.pipelines
    assert root == "demo_vehicle_det_v1" and len(wiring.pipelines[root].version) == 12
    assert wiring.pipelines[root].classifiers["demo_plate_ocr_v1"] == "Classifier_demo_plate_ocr_v1"
    assert wiring.pipelines[root].actions == "Actions"
    assert set(classifiers) == {"demo_bodytype_cls_v1", "demo_plate_ocr_v1"}
    assert bound_actions[0] == "Actions"


def test_model_ids_must_be_unique_across_models_and_pipelines(tmp_path: Path) -> None:
    config = AppConfig.model_validate(
        {
            "models": [{"id": "demo_bodytype_cls_v1", "path": "models/body-type.onnx"}],
            "pipelines": [{"archive": "models/demo.mpta"}],
            "archive_cache_dir": str(tmp_path),
        }
    )
    recorded = [RecordingDeployment(n) for n in ("Detector", "Ingress", "Classifier", "Actions")]
    with pytest.raises(ValueError, match="demo_bodytype_cls_v1"):
        build_graph(config, Deployments(*recorded))  # type: ignore[arg-type]
    config = config.model_copy(
        update={"ingress": config.ingress.model_copy(update={"default_model": "nope"})}
    )
    with pytest.raises(ValueError, match="not one of"):
        build_graph(config.model_copy(update={"models": []}), Deployments(*recorded))  # type: ignore[arg-type]


def test_allowed_urls_bind_the_multiplexed_deployments_and_keep_the_archives(
    tmp_path: Path,
) -> None:
    """`pipelines` as a mapping: its archives as before, and modelUrl pipelines on (the
    PipelineDetector and PipelineClassifier deployments, the Actions beside them)."""
    parts = {n: RecordingDeployment(n) for n in ("Detector", "Ingress", "Classifier", "Actions")}
    url_det, url_cls = RecordingDeployment("PD"), RecordingDeployment("PC")
    config = AppConfig.model_validate(
        {
            "models": [{"id": "a", "path": "models/a.onnx"}],
            "pipelines": {
                "archives": [],
                "allowed_urls": ["https://CMS.example/models/", "http://10.0.0.5:8080"],
                "idle_unload_s": 60,
            },
            "archive_cache_dir": str(tmp_path / "archives"),
        }
    )
    assert config.url_pipelines.allowed_urls == (
        "https://cms.example/models/",
        "http://10.0.0.5:8080/",
    )
    app = build_graph(
        config,
        Deployments(
            parts["Detector"],  # type: ignore[arg-type]
            parts["Ingress"],  # type: ignore[arg-type]
            parts["Classifier"],  # type: ignore[arg-type]
            parts["Actions"],  # type: ignore[arg-type]
            url_det,  # type: ignore[arg-type]
            url_cls,  # type: ignore[arg-type]
        ),
    )
    wiring, _, classifiers, actions, url_models = app[1]
    assert [name for name, _ in url_models] == ["PipelineDetector", "PipelineClassifier"]
    spec = url_det.bound[0][1][0]
    assert spec["archive_cache_dir"] == str(tmp_path / "archives")
    assert spec["settings"]["idle_unload_s"] == 60
    assert actions[0] == "Actions" and classifiers == {}
    assert wiring.url_pipelines is not None and wiring.url_pipelines.settings.idle_unload_s == 60


@pytest.mark.parametrize(
    "prefix",
    ["ftp://cms/models/", "https:///models/", "https://cms/models/x.mpta", "https://u:p@cms/m/"],
)
def test_a_bad_allowed_url_is_refused_at_load(prefix: str) -> None:
    with pytest.raises(ValidationError, match="allowed_urls"):
        AppConfig.model_validate(
            {"models": [{"id": "a", "path": "a.onnx"}], "pipelines": {"allowed_urls": [prefix]}}
        )
