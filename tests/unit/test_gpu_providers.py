"""GPU providers on this CPU machine (deployments/inference/gpu.py, and load_engine's
TensorRT path): the model input read without its weights, TensorRT's profile and cache
key, and the libraries ORT's GPU providers need."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployments.inference import engines, gpu
from deployments.inference.classify import ClassifierEngine
from deployments.inference.engines import EngineOptions, load_engine, make_session
from deployments.inference.gpu import (
    CPU,
    CUDA,
    TENSORRT,
    choose_providers,
    gpu_present,
    model_digest,
    model_inputs,
    profile_max_batch,
    trt_engine_cached,
    trt_profile_shapes,
)
from graph.common.errors import ModelLoadError
from tests.onnx_models import constant_detector, yolo_raw

ROOT = Path(__file__).resolve().parents[2]
RAW = yolo_raw([(100, 100, 40, 40)], [[0.9, 0.05]])


def test_providers_prefer_tensorrt_then_cuda_only_with_a_gpu(tmp_path: Path) -> None:
    everything = [TENSORRT, CUDA, CPU]
    assert choose_providers(everything, gpu=False, trt_cache_dir=tmp_path) == [CPU]
    with_gpu = choose_providers(
        everything, gpu=True, trt_cache_dir=tmp_path, trt_options={"k": "v"}
    )
    assert [p if isinstance(p, str) else p[0] for p in with_gpu] == everything
    options = with_gpu[0][1]  # type: ignore[index]
    assert options["trt_engine_cache_path"] == str(tmp_path) and options["k"] == "v"
    assert choose_providers(everything, gpu=True, trt_cache_dir=None) == [CUDA, CPU]
    assert choose_providers([CPU], gpu=True, trt_cache_dir=tmp_path) == [CPU]


def test_the_input_is_read_as_onnx_reads_it_without_the_weights(tmp_path: Path) -> None:
    demo = ROOT / "models" / "demo-detector.onnx"  # a real Ultralytics export
    graph = onnx.load(str(demo)).graph
    expected = [
        (
            i.name,
            [
                d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in i.type.tensor_type.shape.dim
            ],
        )
        for i in graph.input
    ]
    assert model_inputs(demo) == expected and len(expected) == 1
    assert model_inputs(constant_detector(tmp_path / "m.onnx", RAW)) == [
        ("images", ["batch", 3, "size", "size"])
    ]
    # Old exports list their initializers among the inputs: those are not inputs.
    weight = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    graph2 = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "old",
        [
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 64, 64]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 64, 64])],
        [weight],
    )
    onnx.save(helper.make_model(graph2, ir_version=8), tmp_path / "old.onnx")
    assert model_inputs(tmp_path / "old.onnx") == [("x", ["b", 3, 64, 64])]


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00not an onnx model", b"\x3a\xff\xff\xff\xff\x0f", b"\x0b", b"\x0f"],
    ids=["empty", "garbage", "length-past-the-end", "group-wire-type", "wire-type-7"],
)
def test_a_file_that_is_not_onnx_is_a_model_load_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"cannot load bad\.onnx"):
        model_inputs(bad)


def test_an_input_name_that_is_not_utf8_is_a_model_load_error(tmp_path: Path) -> None:
    data = constant_detector(tmp_path / "m.onnx", RAW).read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data.replace(b"images", b"\xffmages"))  # same length: still well-formed
    with pytest.raises(ModelLoadError, match="not UTF-8"):
        model_inputs(bad)


def test_a_truncated_model_is_a_model_load_error(tmp_path: Path) -> None:
    data = (ROOT / "models" / "demo-detector.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"cannot load cut\.onnx"):
        model_inputs(cut)


def test_tensorrt_gets_one_profile_for_every_batch_up_to_its_ceiling() -> None:
    """ORT's TensorRT provider otherwise sizes its profile by the batches seen so far and
    rebuilds the engine each time a larger one comes (its docs: 'Explicit range of
    dynamic input shape')."""
    profile = trt_profile_shapes("images", ["batch", 3, "h", "w"], 640)
    assert profile == {
        "trt_profile_min_shapes": "images:1x3x640x640",
        "trt_profile_opt_shapes": "images:8x3x640x640",
        "trt_profile_max_shapes": "images:32x3x640x640",
    }
    assert profile_max_batch(profile) == 32 and profile_max_batch({}) is None
    # Larger sides, fewer images: TensorRT sizes its memory for the largest shape.
    big = trt_profile_shapes("images", ["b", 3, "h", "w"], 1280)
    assert big["trt_profile_max_shapes"] == "images:8x3x1280x1280"
    assert trt_profile_shapes("x", ["b", 3, "h", "w"], 4096)["trt_profile_max_shapes"] == (
        "x:1x3x4096x4096"
    )
    # Fixed sides are kept; a fixed batch of 1 is a profile of one shape.
    assert set(trt_profile_shapes("x", [1, 3, "h", 320], 640).values()) == {"x:1x3x640x320"}
    assert profile_max_batch(trt_profile_shapes("x", ["b", 3, 640, 640], 640, max_batch=4)) == 4
    # Nothing to profile, or no way to write it.
    assert trt_profile_shapes("x", [1, 3, 640, 640], 640) == {}
    assert trt_profile_shapes("x", ["b", 640], 640) == {}
    for name in ("a,b", "a:b", "a\x00b", "a\nb", ""):
        assert trt_profile_shapes(name, ["b", 3, 640, 640], 640) == {}


def test_the_engine_cache_key_follows_the_weights_not_the_file_name(tmp_path: Path) -> None:
    """ORT names cached engines by file name and graph structure: two archives' exports
    of one architecture would otherwise share an engine."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = constant_detector(tmp_path / "a" / "model.onnx", RAW)
    b = constant_detector(tmp_path / "b" / "model.onnx", RAW * 2)
    assert model_digest(a) != model_digest(b)
    assert model_digest(a) == model_digest(constant_detector(tmp_path / "c.onnx", RAW))
    (tmp_path / f"{model_digest(a)}_x.engine").write_bytes(b"")
    assert trt_engine_cached(tmp_path, model_digest(a))
    assert not trt_engine_cached(tmp_path, model_digest(b))


@pytest.fixture
def tensorrt_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if TensorRT's and CUDA's libraries had loaded (they cannot on this machine),
    without mapping them into the test process."""
    monkeypatch.setattr(engines, "preload_gpu_libraries", lambda tensorrt=False: True)


@pytest.mark.skipif(gpu_present(), reason="a GPU is present: CUDA loads here")
def test_load_engine_gives_tensorrt_its_profile_cache_key_and_batch_ceiling(
    tmp_path: Path, tensorrt_loads: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The wiring on a real session: TensorRT and CUDA are asked for (onnxruntime-gpu
    lists them here too), do not load on this CPU machine, and the model runs on the CPU
    with its batches in parts of the profile's ceiling; the missing engine reports
    `converting`, and the fallback is a warning."""
    model = constant_detector(tmp_path / "m.onnx", RAW, size=64)
    options = EngineOptions(imgsz=64, gpu=True, trt_cache_dir=tmp_path / "trt", trt_max_batch=4)
    plan = engines.tensorrt_options(model, options)
    assert plan is not None
    assert plan["trt_profile_max_shapes"] == "images:4x3x64x64"
    assert plan["trt_engine_cache_prefix"].startswith("m")
    # Another precision or profile is another engine, under another key.
    for other in (
        EngineOptions(imgsz=64, gpu=True, trt_cache_dir=tmp_path, trt_max_batch=4, fp16=False),
        EngineOptions(imgsz=64, gpu=True, trt_cache_dir=tmp_path, trt_max_batch=8),
    ):
        again = engines.tensorrt_options(model, other)
        assert again is not None
        assert again["trt_engine_cache_prefix"] != plan["trt_engine_cache_prefix"]
    assert engines.tensorrt_options(model, options) == plan  # and the same build, the same
    converting: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="deployments.inference.engines"):
        engine = load_engine(model, options, lambda: converting.append(True))
    assert converting == [True] and (tmp_path / "trt").is_dir()
    assert engine.providers == [CPU]
    assert "TensorrtExecutionProvider, CUDAExecutionProvider did not load" in caplog.text
    assert isinstance(engine, engines.OnnxEngine) and engine.max_batch == 4


def test_tensorrt_is_left_out_where_it_would_rebuild_or_could_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engines, "preload_gpu_libraries", lambda tensorrt=False: not tensorrt)
    options = EngineOptions(imgsz=64, gpu=True, trt_cache_dir=tmp_path)
    model = constant_detector(tmp_path / "m.onnx", RAW, size=64)
    assert engines.tensorrt_options(model, options) is None  # libnvinfer did not load
    monkeypatch.setattr(engines, "preload_gpu_libraries", lambda tensorrt=False: True)
    # A dynamic batch whose input name cannot be written into a profile: CUDA serves it.
    renamed = onnx.load(str(model))
    renamed.graph.input[0].name = "im,ages"
    for node in renamed.graph.node:
        node.input[:] = ["im,ages" if i == "images" else i for i in node.input]
    onnx.save(renamed, tmp_path / "renamed.onnx")
    with caplog.at_level(logging.WARNING, logger="deployments.inference.engines"):
        assert engines.tensorrt_options(tmp_path / "renamed.onnx", options) is None
    assert "cannot be written into a TensorRT profile" in caplog.text


def test_a_model_the_engine_refuses_is_refused_before_tensorrt_builds(
    tmp_path: Path, tensorrt_loads: None
) -> None:
    options = EngineOptions(imgsz=640, gpu=True, trt_cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="configured imgsz 640"):
        engines.tensorrt_options(constant_detector(tmp_path / "a.onnx", RAW, size=320), options)
    with pytest.raises(ModelLoadError, match="fixed batch size 4"):
        engines.tensorrt_options(constant_detector(tmp_path / "b.onnx", RAW, batch=4), options)
    with pytest.raises(ValueError, match="trt_max_batch"):
        EngineOptions(trt_max_batch=0)


PRELOAD_PROBE = """
import sys
from pathlib import Path
from deployments.inference.engines import make_session
from deployments.inference.gpu import CPU, preload_gpu_libraries
if sys.argv[1] == "gpu":
    assert preload_gpu_libraries() is True
else:
    make_session(Path(sys.argv[2]), 1, [CPU])
print("libcublasLt.so.13" in open("/proc/self/maps").read())
"""


def test_gpu_sessions_get_the_cuda_wheels_libraries_and_cpu_sessions_do_not(
    tmp_path: Path,
) -> None:
    """ORT's CUDA provider looks for CUDA only on the library path; the `nvidia-*`
    wheels torch brings are not on it, so a replica serving an ONNX model ran on the CPU
    of a GPU node. A CPU session must not map those libraries (hundreds of MB)."""
    from importlib.util import find_spec

    spec = find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    if not any(any(Path(root).rglob("libcublasLt.so.13")) for root in roots):
        pytest.skip("no CUDA 13 cuBLAS wheel installed here")
    model = str(constant_detector(tmp_path / "m.onnx", RAW))

    def probe(mode: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", PRELOAD_PROBE, mode, model],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.strip().splitlines()[-1]

    assert probe("gpu") == "True"
    assert probe("cpu") == "False"


@pytest.mark.skipif(gpu_present(), reason="a GPU is present: CUDA loads here")
def test_classifiers_use_cuda_only_where_ray_assigned_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A classifier replica without a GPU share must not open a CUDA context on GPU 0
    because the device exists; with one, CUDA is asked for (and here falls back)."""
    monkeypatch.setattr(gpu, "gpu_present", lambda: True)
    monkeypatch.setattr(engines, "gpu_present", lambda: True)  # make_session's own default
    monkeypatch.setattr(engines, "preload_gpu_libraries", lambda tensorrt=False: True)
    model = ROOT / "models" / "body-type.onnx"
    with caplog.at_level(logging.WARNING, logger="deployments.inference.engines"):
        assert ClassifierEngine(model).providers == [CPU]
    assert "did not load" not in caplog.text  # CUDA was never asked for
    with caplog.at_level(logging.WARNING, logger="deployments.inference.engines"):
        assert ClassifierEngine(model, gpu=True).providers == [CPU]
    assert "CUDAExecutionProvider did not load" in caplog.text


@pytest.mark.skipif(gpu_present(), reason="a GPU is present: CUDA loads here")
def test_a_session_without_its_gpu_provider_says_so(
    tmp_path: Path, tensorrt_loads: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="deployments.inference.engines"):
        session = make_session(constant_detector(tmp_path / "m.onnx", RAW), 1, [CUDA, CPU])
    assert session.get_providers() == [CPU]
    assert "CUDAExecutionProvider did not load" in caplog.text
