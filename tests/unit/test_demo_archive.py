"""models/demo.mpta: packed deterministically from the committed models and pipeline."""

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from demo.build_models import pack
from deployments.inference.classify import ClassifierEngine
from deployments.inference.engines import OnnxEngine
from graph.config import PROJECT_ROOT
from graph.pipeline.archive import ArchiveError

MODELS = PROJECT_ROOT / "models"


def test_archive_holds_the_pipeline_and_every_model_it_names(tmp_path: Path) -> None:
    archive = pack(MODELS, tmp_path / "demo.mpta")
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        pipeline = json.loads(z.read("pipeline.json"))
        z.extractall(tmp_path / "x")
    assert names[0] == "pipeline.json"
    assert set(names) == {"pipeline.json", "demo-detector.onnx", "body-type.onnx"}
    root = pipeline["pipeline"]
    assert root["triggerClasses"] == ["vehicle"]
    assert [b["modelId"] for b in root["branches"]] == ["demo_bodytype_cls_v1", "demo_plate_ocr_v1"]
    detector = OnnxEngine(tmp_path / "x" / root["modelFile"], root["imgsz"])
    assert detector.names == {0: "vehicle", 1: "person"}
    body = ClassifierEngine(tmp_path / "x" / root["branches"][0]["modelFile"])
    assert body.imgsz == root["branches"][0]["imgsz"]


def test_packing_is_deterministic(tmp_path: Path) -> None:
    a = pack(MODELS, tmp_path / "a.mpta").read_bytes()
    b = pack(MODELS, tmp_path / "b.mpta").read_bytes()
    assert a == b


def test_packing_refuses_a_pipeline_naming_a_missing_model(tmp_path: Path) -> None:
    shutil.copy(MODELS / "demo-pipeline.json", tmp_path / "demo-pipeline.json")
    shutil.copy(MODELS / "demo-detector.onnx", tmp_path / "demo-detector.onnx")
    with pytest.raises(ArchiveError, match=r"body-type\.onnx"):
        pack(tmp_path, tmp_path / "demo.mpta")
    assert not (tmp_path / "demo.mpta").exists()
