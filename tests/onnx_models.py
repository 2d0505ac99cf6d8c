"""Small real ONNX graphs for engine tests (built with onnx.helper, run by ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchmarks.tiny_detector import constant_detector_model

OPSET = [helper.make_opsetid("", 17)]
IR_VERSION = 8  # readable by every ONNX Runtime we support (newest onnx writes 14)


def _image_input(batch: int | str = "batch", size: int | str = "size") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])


def constant_detector(
    path: Path,
    raw: np.ndarray,
    names: dict[int, str] | None = None,
    batch: int | str = "batch",
    size: int | str = "size",
) -> Path:
    """A 'detector' whose output is `raw` (4 + nc, N) for every image of the batch, plus
    0 x the image mean, so the output's batch dimension follows the input's (the
    benchmark's near-free detector is built the same way)."""
    props = None if names is None else {"names": repr(names)}
    onnx.save(constant_detector_model(raw, props, batch, size), path)
    return path


def faulty_detector(path: Path) -> Path:
    """Loads fine (dynamic output dims) but emits (B, 3, W): too few rows for YOLO boxes."""
    node = helper.make_node("ReduceMean", ["images"], ["output0"], axes=[2], keepdims=0)
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 3, "w"])
    graph = helper.make_graph([node], "faulty", [_image_input()], [out])
    onnx.save(helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION), path)
    return path


def yolo_raw(
    boxes_xywh: list[tuple[float, float, float, float]], class_scores: list[list[float]]
) -> np.ndarray:
    """Hand-made YOLO output (4 + nc, N) from candidate boxes and their class scores."""
    xywh = np.asarray(boxes_xywh, np.float32).T
    scores = np.asarray(class_scores, np.float32).T
    return np.concatenate([xywh, scores], axis=0)
