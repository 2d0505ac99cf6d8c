"""`make bench-gpu` (benchmarks/gpu_batch.py) on this machine's CPU: the same code path
a GPU run takes, per provider configuration and batch size."""

import json
from pathlib import Path

import pytest

from benchmarks import gpu_batch
from deployments.inference import engines
from deployments.inference.gpu import gpu_present

MODEL = Path(__file__).resolve().parents[2] / "models" / "demo-detector.onnx"


def test_the_cpu_configuration_times_camgraph_against_the_bare_session(tmp_path: Path) -> None:
    out = tmp_path / "gpu-batch.json"
    argv = ["--onnx", str(MODEL), "--configs", "cpu", "--batches", "1,3"]
    report = gpu_batch.main(
        [*argv, "--seconds", "0.05", "--cache-dir", str(tmp_path), "--out", str(out)]
    )
    assert json.loads(out.read_text()) == report
    rows = report["rows"]
    assert [(r["config"], r["batch"]) for r in rows] == [("cpu", 1), ("cpu", 3)]
    for row in rows:
        assert row["camgraph_img_s"] > 0 and row["raw_session_img_s"] > 0
        assert row["camgraph_to_raw"] > 0 and row["session_load_s"] >= 0


def test_a_provider_that_does_not_load_is_reported_not_timed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if gpu_present():
        pytest.skip("a GPU is present: CUDA loads here")
    # CUDA's libraries stay out of the test process (they cannot load here anyway).
    monkeypatch.setattr(engines, "preload_gpu_libraries", lambda tensorrt=False: True)
    rows = gpu_batch.onnx_rows("cuda", MODEL, tmp_path, [1], 0.05)
    assert rows == [
        {"config": "cuda", "unavailable": True, "session_providers": ["CPUExecutionProvider"]}
    ]


def test_unknown_configurations_and_batches_past_the_profile_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        gpu_batch.main(["--configs", "tpu", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        gpu_batch.main(["--batches", "64", "--out", str(tmp_path / "x.json")])
