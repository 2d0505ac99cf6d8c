"""Graph building and app config, without a cluster (recording fakes for Serve classes)."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from graph.app import build_app, build_graph
from graph.config import PROJECT_ROOT, AppConfig

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
    app = build_graph(config, detector=detector, ingress=ingress)  # type: ignore[arg-type]
    names = [name for name, _ in detector.bound]
    assert names == ["Detector_a", "Detector_b"]
    spec_a = detector.bound[0][1][0]
    assert spec_a["path"] == str(PROJECT_ROOT / "models" / "a.onnx")
    assert detector.bound[1][1][0]["path"] == "/abs/b.pt"
    assert app[0] == "Ingress"
    detectors, sizes, settings, streams = app[1]
    assert set(detectors) == {"a", "b"} and sizes == {"a": 640, "b": 320}
    assert settings["max_upload_bytes"] > 0
    # The registry's state file resolves against the checkout, not the replica's cwd.
    assert streams["state_path"] == str(PROJECT_ROOT / "data" / "streams.json")


@pytest.mark.parametrize(
    "args, problem",
    [
        ({"models": []}, "at least 1"),
        ({"models": [{"id": "a", "path": "x"}, {"id": "a", "path": "y"}]}, "unique"),
        ({"models": [{"id": "bad id!", "path": "x"}]}, "pattern"),
        ({"models": [{"id": "a", "path": "x", "imgsz": 100}]}, "multiple of 32"),
        ({"models": [{"id": "a", "path": "x"}], "ingress": {"default_model": "b"}}, "not one of"),
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
    models = AppConfig.model_validate(app_config["args"]).models
    expected = {f"Detector_{m.id}" for m in models} | {"Ingress"}
    assert {d["name"] for d in app_config["deployments"]} == expected
    for model in AppConfig.model_validate(app_config["args"]).resolved_models():
        assert model.path.is_file(), f"{model.path} is missing"
