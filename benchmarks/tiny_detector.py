"""A near-free detector for the per-frame tax phase (`make bench-tax`).

It has the demo detector's interface: input `images` (B, 3, S, S) float, output
`output0` (B, 4 + nc, 8400), the YOLO layout, with the class names in the model's
metadata. Its only work is one mean over the image, so a frame costs little more than
its decode and letterbox. Run through camgraph and through raw ONNX Runtime side by
side, the difference in CPU per frame is what the graph adds (Serve handle calls,
routers, actor hops, tracking and events), not what the model costs.

Each image gets the same three boxes (two vehicles and a person), so tracking,
stability and events have the work they have with a real detector.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

NAMES = {0: "vehicle", 1: "person"}
ANCHORS = 8400  # a 640-pixel YOLOv8's candidate count


def raw_output(imgsz: int = 640) -> np.ndarray:
    """(4 + nc, ANCHORS): three confident boxes, every other candidate at score 0."""
    out = np.zeros((4 + len(NAMES), ANCHORS), np.float32)
    out[:4, :] = [[imgsz / 2], [imgsz / 2], [8.0], [8.0]]
    boxes = [  # cx, cy, w, h, class, score
        (0.30 * imgsz, 0.55 * imgsz, 0.20 * imgsz, 0.12 * imgsz, 0, 0.91),
        (0.70 * imgsz, 0.60 * imgsz, 0.24 * imgsz, 0.14 * imgsz, 0, 0.87),
        (0.50 * imgsz, 0.45 * imgsz, 0.05 * imgsz, 0.15 * imgsz, 1, 0.82),
    ]
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[:4, i] = (cx, cy, w, h)
        out[4 + cls, i] = score
    return out


def constant_detector_model(
    raw: np.ndarray,
    props: dict[str, str] | None = None,
    batch: int | str = "batch",
    size: int | str = "size",
) -> Any:
    """An ONNX 'detector' whose output is `raw` (4 + nc, N) for every image of the batch
    (plus 0 x the image mean, so the output's batch dimension follows the input's), with
    `props` as its metadata (e.g. the class names). Also the engine tests' model."""
    from onnx import TensorProto, helper, numpy_helper

    rows, n = raw.shape
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean", "shape"], ["mean3"]),
        helper.make_node("Mul", ["mean3", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "raw"], ["output0"]),
    ]
    inits = [
        numpy_helper.from_array(raw[None].astype(np.float32), "raw"),
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, rows, n])
    graph = helper.make_graph(nodes, "constant_detector", [images], [out], inits)
    # IR 8: readable by every ONNX Runtime we support (the newest onnx writes 14)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if props is not None:
        helper.set_model_props(model, props)
    return model


def build(path: Path, imgsz: int = 640) -> Path:
    """Write the model (unchanged when it is there already)."""
    if path.is_file():
        return path
    import onnx

    props = {"names": repr(NAMES), "imgsz": repr([imgsz, imgsz])}
    model = constant_detector_model(raw_output(imgsz), props, size=imgsz)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/bench-models/tiny-detector.onnx"))
    parser.add_argument("--imgsz", type=int, default=640)
    print(build(parser.parse_args().out, parser.parse_args().imgsz))


if __name__ == "__main__":
    main()
