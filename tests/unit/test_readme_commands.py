"""Every README command that needs no running cluster works, run as a user would: the
installed entry points, from a directory outside the checkout (so nothing of the
checkout's `tests/` or working directory can help)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from graph.config import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
DEMO = PROJECT_ROOT / "models" / "demo.mpta"
SEED_AND_FRAMES = ("--seed", "200000", "--frames", "5")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def documented(command: str) -> None:
    assert command in README, f"the README no longer shows {command!r}: update this test"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    assert not tmp_path.is_relative_to(PROJECT_ROOT)
    return tmp_path


def test_mpta_validate_and_inspect_the_demo_archive(outside: Path) -> None:
    documented(".venv/bin/camgraph mpta validate models/demo.mpta")
    documented(".venv/bin/camgraph mpta inspect models/demo.mpta")
    ok = run([str(BIN / "camgraph"), "mpta", "validate", str(DEMO)], outside)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ok: {DEMO}"
    tree = run([str(BIN / "camgraph"), "mpta", "inspect", str(DEMO)], outside)
    assert tree.returncode == 0, tree.stderr
    assert tree.stdout.startswith("demo_vehicle_det_v1 [detector] demo-detector.onnx")
    assert "demo_bodytype_cls_v1 [classifier]" in tree.stdout


def test_mpta_pack_then_validate(outside: Path) -> None:
    documented(".venv/bin/camgraph mpta pack my-pipeline.json --out my.mpta")
    pipeline = outside / "my-pipeline.json"
    pipeline.write_text((PROJECT_ROOT / "models" / "demo-pipeline.json").read_text())
    packed = run(
        [
            str(BIN / "camgraph"),
            *("mpta", "pack", "my-pipeline.json", "--out", "my.mpta"),
            *("--models-dir", str(PROJECT_ROOT / "models")),
        ],
        outside,
    )
    assert packed.returncode == 0, packed.stderr
    with zipfile.ZipFile(outside / "my.mpta") as archive:
        names = set(archive.namelist())
        assert json.loads(archive.read("pipeline.json")) == json.loads(pipeline.read_text())
    assert {"demo-detector.onnx", "body-type.onnx"} <= names
    ok = run([str(BIN / "camgraph"), "mpta", "validate", "my.mpta"], outside)
    assert ok.returncode == 0, ok.stderr


def test_mpta_validate_refuses_a_traversal_with_the_reason(outside: Path) -> None:
    documented("$ .venv/bin/camgraph mpta validate evil.mpta")
    with zipfile.ZipFile(outside / "evil.mpta", "w") as archive:
        archive.writestr(
            "pipeline.json", (PROJECT_ROOT / "models" / "demo-pipeline.json").read_text()
        )
        archive.writestr("../x", b"x")
    refused = run([str(BIN / "camgraph"), "mpta", "validate", "evil.mpta"], outside)
    assert refused.returncode == 1
    assert "invalid archive evil.mpta:" in refused.stderr
    assert "'../x': path traversal" in refused.stderr


def test_bench_help(outside: Path) -> None:
    documented("camgraph bench --help")
    shown = run([str(BIN / "camgraph"), "bench", "--help"], outside)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: camgraph bench")
    assert "--cameras" in shown.stdout


def test_gpu_config_writes_a_config_serve_accepts(outside: Path) -> None:
    documented(".venv/bin/camgraph gpu-config serve_config.yaml > serve_config.gpu.yaml")
    made = run(
        [str(BIN / "camgraph"), "gpu-config", str(PROJECT_ROOT / "serve_config.yaml")], outside
    )
    assert made.returncode == 0, made.stderr
    import yaml
    from ray.serve.schema import ServeDeploySchema

    variant = yaml.safe_load(made.stdout)
    ServeDeploySchema.model_validate(variant)
    (app,) = variant["applications"]
    detector = next(d for d in app["deployments"] if d["name"].startswith("Detector_"))
    assert detector["ray_actor_options"]["num_gpus"] == 1.0
    assert "GPUs" in made.stderr  # how many the replicas take


def test_make_help_from_outside(outside: Path) -> None:
    shown = run(["make", "-s", "-C", str(PROJECT_ROOT), "help"], outside)
    assert shown.returncode == 0, shown.stderr
    for target in ("run", "stop", "status", "test", "check-run", "lint", "bench"):
        documented(f"make {target}")
        assert target in shown.stdout.split()


def test_demo_clip_command(outside: Path) -> None:
    documented(".venv/bin/python -m demo.datasets clip data/clip.mp4 --seed 200000")
    made = run(
        [str(BIN / "python"), *("-m", "demo.datasets", "clip", "clip.mp4"), *SEED_AND_FRAMES],
        outside,
    )
    assert made.returncode == 0, made.stderr
    truth = json.loads((outside / "clip.json").read_text())
    assert (outside / "clip.mp4").stat().st_size > 0
    assert truth
