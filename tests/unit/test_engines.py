"""ONNX engine and ModelSlot on real (tiny) ONNX models in ONNX Runtime."""

import threading
from pathlib import Path

import numpy as np
import pytest

from deployments.inference.engines import (
    EngineOptions,
    ModelSlot,
    OnnxEngine,
    fixed_input_size,
    load_engine,
    parse_names,
    parse_stride,
)
from deployments.inference.gpu import CPU, CUDA, TENSORRT
from graph.common.errors import InferenceError, ModelLoadError, ModelNotReadyError
from graph.common.vision import DetectParams
from tests.onnx_models import constant_detector, faulty_detector, yolo_raw

RAW = yolo_raw([(100, 100, 40, 40), (300, 300, 60, 20)], [[0.9, 0.05], [0.1, 0.7]])


def batch(n: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def test_engine_decodes_each_image_with_its_own_params(tmp_path: Path) -> None:
    path = constant_detector(tmp_path / "m.onnx", RAW, names={0: "vehicle", 1: "person"})
    engine = OnnxEngine(path, imgsz=64)
    assert engine.names == {0: "vehicle", 1: "person"}
    assert engine.providers == [CPU]
    out = engine.detect(
        batch(3), [DetectParams(), DetectParams(conf=0.8), DetectParams(classes=(1,))]
    )
    assert [len(o) for o in out] == [2, 1, 1]
    assert out[1][0, 5] == 0 and out[2][0, 5] == 1
    np.testing.assert_allclose(out[0][0, :4], [80, 80, 120, 120])


def test_engine_loops_over_a_fixed_batch_one_model(tmp_path: Path) -> None:
    path = constant_detector(tmp_path / "b1.onnx", RAW, batch=1, size=64)
    out = OnnxEngine(path, imgsz=64).detect(batch(4), [DetectParams()] * 4)
    assert [len(o) for o in out] == [2, 2, 2, 2]


def test_frames_letterboxed_to_their_own_shape_fit_fixed_and_dynamic_models(
    tmp_path: Path,
) -> None:
    """A dynamic export takes a rectangle as it is (padded only to the batch's largest
    and to the model's stride); a fixed-size export gets it padded to its size, at the
    bottom right, so the boxes keep their coordinates."""
    wide = batch(1)[0][:32]  # 32x64: a 2:1 frame letterboxed with a stride
    dynamic = OnnxEngine(constant_detector(tmp_path / "d.onnx", RAW), imgsz=64)
    assert dynamic.input_hw is None and dynamic.stride == 32
    assert dynamic.batch([wide, wide]).shape == (2, 32, 64, 3)
    assert dynamic.batch([wide, wide.transpose(1, 0, 2)]).shape == (2, 64, 64, 3)
    fixed = OnnxEngine(constant_detector(tmp_path / "f.onnx", RAW, size=64), imgsz=64)
    assert fixed.input_hw == (64, 64)
    images = fixed.batch([wide])
    assert images.shape == (1, 64, 64, 3) and (images[0, 32:] == 114).all()
    assert [len(o) for o in fixed.detect(images, [DetectParams()])] == [2]


def test_gpus_keep_one_square_input_and_the_cpu_takes_rectangles() -> None:
    assert fixed_input_size("height", "width", [TENSORRT, CUDA, CPU], 640) == (640, 640)
    assert fixed_input_size("height", "width", [CUDA, CPU], 640) == (640, 640)
    assert fixed_input_size("height", "width", [CPU], 640) is None
    assert fixed_input_size(640, 640, [CPU], 640) == (640, 640)


def test_a_model_that_names_its_sides_but_takes_only_the_square_keeps_the_square(
    tmp_path: Path,
) -> None:
    """Probed at load: a model whose height and width are named but whose graph needs
    them equal (here: a square-only reshape) is fed the square, not refused."""
    import onnx
    from onnx import TensorProto, helper

    # A Sub of the images and their own transpose (B,3,W,H) fails unless H == W.
    nodes = [
        helper.make_node("Transpose", ["images"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Sub", ["images", "t"], ["d"]),
        helper.make_node("ReduceMean", ["d"], ["m4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m4", "shape"], ["m"]),
        helper.make_node("Mul", ["m", "zero"], ["m0"]),
        helper.make_node("Add", ["raw", "m0"], ["output0"]),
    ]
    raw = RAW[None].astype(np.float32)
    graph = helper.make_graph(
        nodes,
        "square-only",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["b", *raw.shape[1:]])],
        [
            onnx.numpy_helper.from_array(raw, "raw"),
            onnx.numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
            onnx.numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "square.onnx")
    engine = OnnxEngine(tmp_path / "square.onnx", imgsz=128)
    assert engine.input_hw == (128, 128)
    wide = batch(1, 128)[0][:64]
    assert [len(o) for o in engine.detect(engine.batch([wide]), [DetectParams()])] == [2]


def test_stride_metadata_is_read_and_bounded() -> None:
    assert parse_stride("64") == 64 and parse_stride(None) == 32
    assert parse_stride("abc") == 32 and parse_stride("48") == 32 and parse_stride("-32") == 32
    assert parse_stride("1024") == 32 and parse_stride("128", imgsz=64) == 32


def test_a_fixed_batch_other_than_one_is_refused_at_load(tmp_path: Path) -> None:
    path = constant_detector(tmp_path / "b4.onnx", RAW, batch=4, size=64)
    with pytest.raises(ModelLoadError, match="fixed batch size 4"):
        OnnxEngine(path, imgsz=64)


def test_load_engine_follows_the_gpu_assignment_it_is_given(tmp_path: Path) -> None:
    path = constant_detector(tmp_path / "m.onnx", RAW)
    engine = load_engine(path, EngineOptions(imgsz=64, gpu=False))
    assert engine.providers == [CPU]


def test_names_fall_back_to_numbers_without_metadata(tmp_path: Path) -> None:
    engine = OnnxEngine(constant_detector(tmp_path / "m.onnx", RAW), imgsz=64)
    assert parse_names("not a dict", 2) == {0: "class0", 1: "class1"}
    assert engine.names == {0: "class0", 1: "class1"}


def test_load_errors_are_typed_and_say_why(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxEngine(tmp_path / "missing.onnx", 640)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00not an onnx model")
    with pytest.raises(ModelLoadError, match=r"cannot load corrupt\.onnx"):
        OnnxEngine(corrupt, 640)
    fixed = constant_detector(tmp_path / "fixed.onnx", RAW, size=320)
    with pytest.raises(ModelLoadError, match="configured imgsz 640"):
        OnnxEngine(fixed, 640)
    with pytest.raises(ModelLoadError, match="unsupported model format"):
        load_engine(tmp_path / "model.tflite", EngineOptions())


def test_unusable_output_is_an_inference_error(tmp_path: Path) -> None:
    engine = OnnxEngine(faulty_detector(tmp_path / "faulty.onnx"), 64)
    with pytest.raises(InferenceError):
        engine.detect(batch(2), [DetectParams()] * 2)


def test_batches_above_the_engines_ceiling_run_in_parts_with_the_same_results() -> None:
    from demo.datasets import HELD_OUT_SEED_START
    from demo.scenes import Scene
    from graph.common.vision import letterbox

    model = Path(__file__).resolve().parents[2] / "models" / "demo-detector.onnx"
    frames = [
        letterbox(Scene(HELD_OUT_SEED_START + 900 + k, n_frames=1).render(0)[0], 640)[0]
        for k in range(5)
    ]
    whole = OnnxEngine(model, 640)
    images = whole.batch(frames)
    parted = OnnxEngine(model, 640, max_batch=2)
    sizes: list[int] = []
    run = parted._session.run

    def recorded(names: object, feeds: dict[str, np.ndarray]) -> object:
        sizes.extend(v.shape[0] for v in feeds.values())
        return run(names, feeds)

    parted._session.run = recorded  # the real session, its calls counted
    expected, got = whole.infer(images), parted.infer(images)
    assert sizes == [2, 2, 1]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    params = [DetectParams()] * 5
    assert [len(r) for r in parted.detect(images, params)] == [
        len(r) for r in whole.detect(images, params)
    ]
    assert sum(len(r) for r in whole.detect(images, params)) > 0  # real scenes, real boxes


def test_slot_reports_loading_then_enabled(tmp_path: Path) -> None:
    path = constant_detector(tmp_path / "m.onnx", RAW)
    release = threading.Event()

    def loader(converting: object) -> OnnxEngine:
        release.wait(10)
        return OnnxEngine(path, 64)

    slot = ModelSlot("demo")
    slot.start(loader)
    assert slot.status()["state"] == "loading"
    with pytest.raises(ModelNotReadyError) as info:
        slot.engine()
    assert (info.value.model_id, info.value.state) == ("demo", "loading")
    release.set()
    slot.join(10)
    assert slot.status()["state"] == "enabled"
    assert slot.status()["providers"] == [CPU]
    assert len(slot.engine().detect(batch(1), [DetectParams()])[0]) == 2


def test_requests_wait_for_a_loading_model_but_not_for_a_conversion(tmp_path: Path) -> None:
    """A replica autoscaling just added gets frames before its model is loaded: they
    wait for it (bounded) instead of failing. A conversion, minutes long, is not
    waited for."""
    import asyncio

    path = constant_detector(tmp_path / "m.onnx", RAW)
    release = threading.Event()

    def loader(converting: object) -> OnnxEngine:
        release.wait(10)
        return OnnxEngine(path, 64)

    slot: ModelSlot[OnnxEngine] = ModelSlot("demo")
    slot.start(loader)

    async def first_frame() -> int:
        asyncio.get_running_loop().call_later(0.3, release.set)
        await slot.wait_loaded(10)
        return len(slot.engine().detect(batch(1), [DetectParams()])[0])

    assert asyncio.run(first_frame()) == 2
    stuck = threading.Event()
    bounded: ModelSlot[OnnxEngine] = ModelSlot("stuck")
    bounded.start(lambda converting: stuck.wait(10) and OnnxEngine(path, 64))  # type: ignore[func-returns-value]
    asyncio.run(bounded.wait_loaded(0.2))
    with pytest.raises(ModelNotReadyError, match="loading"):
        bounded.engine()
    stuck.set()

    def converts(converting):  # type: ignore[no-untyped-def]
        converting()
        stuck.wait(10)
        raise ModelLoadError("never")

    stuck.clear()
    converting: ModelSlot[OnnxEngine] = ModelSlot("trt")
    converting.start(converts)
    for _ in range(1000):
        if converting.status()["state"] == "converting":
            break
        threading.Event().wait(0.01)
    assert converting.status()["state"] == "converting"
    asyncio.run(asyncio.wait_for(converting.wait_loaded(30), 2))  # TimeoutError if it waits
    stuck.set()


def test_slot_reports_converting_and_errors_with_their_message() -> None:
    seen = []
    release = threading.Event()

    def loader(converting):  # type: ignore[no-untyped-def]
        converting()
        seen.append(True)
        release.wait(10)
        raise ModelLoadError("engine build failed")

    slot = ModelSlot("trt")
    slot.start(loader)
    for _ in range(1000):
        if seen:
            break
        threading.Event().wait(0.01)
    assert slot.status()["state"] == "converting"
    release.set()
    slot.join(10)
    assert slot.status() == {"state": "error", "error": "ModelLoadError: engine build failed"}
    with pytest.raises(ModelNotReadyError, match="engine build failed"):
        slot.engine()


def test_not_ready_error_survives_pickling() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ModelNotReadyError("m", "error", "boom")))
    assert (err.model_id, err.state, err.message) == ("m", "error", "boom")
