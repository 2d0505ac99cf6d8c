"""GPU throughput versus batch size for camgraph's engines, on the device machine.

For each batch size: camgraph's UltralyticsEngine (the `.pt` path: letterboxed uint8 in,
decoded boxes out) and the raw torch forward pass of the same network (the limit).
Also lists the ONNX Runtime providers present and times ORT when CUDA is among them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from demo.datasets import HELD_OUT_SEED_START
from demo.scenes import Scene
from graph.common.vision import DetectParams, letterbox


def timed(fn: Any, seconds: float) -> tuple[int, float]:
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pt", type=Path, default=Path("models/demo-detector.pt"))
    parser.add_argument("--onnx", type=Path, default=Path("models/demo-detector.onnx"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from deployments.inference.engines import (
        OnnxEngine,
        UltralyticsEngine,
        choose_providers,
        gpu_present,
    )

    frames = np.stack(
        [
            letterbox(Scene(HELD_OUT_SEED_START + 900 + k, n_frames=1).render(0)[0], 640)[0]
            for k in range(32)
        ]
    )
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "ort_version": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "rows": [],
    }
    engine = UltralyticsEngine(args.pt, 640, device="0")
    net: Any = engine._model.model
    net = net.to("cuda").eval()
    ort_engine = None
    if gpu_present() and "CUDAExecutionProvider" in ort.get_available_providers():
        ort_engine = OnnxEngine(
            args.onnx, 640, 4, choose_providers(ort.get_available_providers(), True, None)
        )
        report["ort_session_providers"] = ort_engine.providers
    for bs in (1, 2, 4, 8, 16, 32):
        batch = frames[:bs]
        params = [DetectParams()] * bs
        n, dt = timed(lambda b=batch, p=params: engine.detect(b, p), args.seconds)
        row = {"batch": bs, "camgraph_ultralytics_img_s": round(n * bs / dt, 1)}
        x = torch.from_numpy(batch[..., ::-1].transpose(0, 3, 1, 2).copy()).cuda().float() / 255

        def forward(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                net(x)
            torch.cuda.synchronize()

        n, dt = timed(forward, args.seconds)
        row["raw_torch_fp32_img_s"] = round(n * bs / dt, 1)
        if ort_engine is not None:
            n, dt = timed(lambda b=batch, p=params: ort_engine.detect(b, p), args.seconds)
            row["camgraph_ort_img_s"] = round(n * bs / dt, 1)
        row["ratio_camgraph_to_raw"] = round(
            row["camgraph_ultralytics_img_s"] / row["raw_torch_fp32_img_s"], 3
        )
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


if __name__ == "__main__":
    main()
