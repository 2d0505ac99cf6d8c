"""`make demo-models`: scenes → datasets → training → ONNX → evaluation → archive.

Also `python -m demo.build_models pack` to (re)pack models/demo.mpta from the committed
files, deterministically (fixed member order and timestamps), without training.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PIPELINE = "demo-pipeline.json"


def pack(models_dir: Path, out: Path) -> Path:
    """Pack models/demo-pipeline.json and the model files it names into an .mpta."""
    from graph.pipeline.archive import pack_archive

    return pack_archive(models_dir / PIPELINE, out, models_dir)


def export_onnx(pt: Path, imgsz: int, dest: Path) -> None:
    from ultralytics import YOLO

    exported = YOLO(str(pt)).export(
        format="onnx", imgsz=imgsz, dynamic=True, simplify=False, opset=17
    )
    shutil.move(str(exported), dest)


def train_all(out: Path, device: str, train_scenes: int) -> None:
    from demo.datasets import write_datasets

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_yaml = write_datasets(root / "data", train_scenes, max(10, train_scenes // 10))
        run = [sys.executable, "-m", "demo.train"]
        subprocess.run(
            [
                *run,
                "detector",
                "--data",
                str(data_yaml),
                "--out",
                str(root),
                "--device",
                device,
                "--epochs",
                "80",
                "--imgsz",
                "640",
            ],
            check=True,
        )
        subprocess.run(
            [
                *run,
                "classifier",
                "--data",
                str(root / "data" / "classify"),
                "--out",
                str(root),
                "--device",
                device,
                "--epochs",
                "40",
                "--imgsz",
                "128",
                "--batch",
                "128",
            ],
            check=True,
        )
        shutil.copy(root / "detector.pt", out / "demo-detector.pt")
        shutil.copy(root / "body_type.pt", out / "body-type.pt")
    export_onnx(out / "demo-detector.pt", 640, out / "demo-detector.onnx")
    export_onnx(out / "body-type.pt", 128, out / "body-type.onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", nargs="?", choices=["all", "pack"], default="all")
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--device", default="cpu", help="'0' for the first GPU")
    parser.add_argument("--train-scenes", type=int, default=800)
    args = parser.parse_args()
    if args.step == "all":
        train_all(args.out, args.device, args.train_scenes)
        subprocess.run(
            [sys.executable, "-m", "demo.evaluate", "--out", str(args.out / "evaluation.json")],
            check=True,
        )
    print(pack(args.out, args.out / "demo.mpta"))


if __name__ == "__main__":
    main()
