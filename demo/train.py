"""Train the demo detector (vehicle, person) and body-type classifier with Ultralytics.

Models start from Ultralytics' bundled architecture YAMLs with random weights: nothing
is downloaded. Runs on a GPU when one is present (see MODEL_CARD.md for the run used).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def train_detector(
    data_yaml: Path,
    out: Path,
    device: str,
    epochs: int,
    hours: float | None,
    imgsz: int,
    batch: int,
    workers: int,
) -> dict[str, object]:
    from ultralytics import YOLO

    start = time.time()
    model = YOLO("yolo11n.yaml")
    extra = {"time": hours} if hours else {}
    model.train(
        data=str(data_yaml),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device=device,
        workers=workers,
        project=str(out / "runs"),
        name="detect",
        exist_ok=True,
        pretrained=False,
        amp=False,
        plots=False,
        seed=0,
        deterministic=False,
        mosaic=1.0,
        close_mosaic=3,
        fliplr=0.0,
        verbose=False,
        **extra,
    )
    best = out / "runs" / "detect" / "weights" / "best.pt"
    shutil.copy(best, out / "detector.pt")
    metrics = YOLO(str(best)).val(
        data=str(data_yaml),
        imgsz=imgsz,
        device=device,
        plots=False,
        project=str(out / "runs"),
        name="detect-val",
        exist_ok=True,
    )
    per_class = {
        name: float(metrics.box.ap50[i])
        for i, name in metrics.names.items()
        if i < len(metrics.box.ap50)
    }
    return {
        "seconds": round(time.time() - start, 1),
        "map50": float(metrics.box.map50),
        "ap50_per_class": per_class,
    }


def train_classifier(
    data_dir: Path,
    out: Path,
    device: str,
    epochs: int,
    hours: float | None,
    imgsz: int,
    batch: int,
    workers: int,
) -> dict[str, object]:
    from ultralytics import YOLO

    start = time.time()
    model = YOLO("yolo11n-cls.yaml")
    extra = {"time": hours} if hours else {}
    model.train(
        data=str(data_dir),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device=device,
        workers=workers,
        project=str(out / "runs"),
        name="classify",
        exist_ok=True,
        pretrained=False,
        amp=False,
        plots=False,
        seed=0,
        fliplr=0.5,
        verbose=False,
        **extra,
    )
    best = out / "runs" / "classify" / "weights" / "best.pt"
    shutil.copy(best, out / "body_type.pt")
    metrics = YOLO(str(best)).val(
        data=str(data_dir),
        imgsz=imgsz,
        device=device,
        plots=False,
        project=str(out / "runs"),
        name="classify-val",
        exist_ok=True,
    )
    return {"seconds": round(time.time() - start, 1), "top1": float(metrics.top1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["detector", "classifier"])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hours", type=float, default=None)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fn = train_detector if args.what == "detector" else train_classifier
    result = fn(
        args.data,
        args.out,
        args.device,
        args.epochs,
        args.hours,
        args.imgsz,
        args.batch,
        args.workers,
    )
    result.update(
        {
            "epochs_requested": args.epochs,
            "hours_limit": args.hours,
            "imgsz": args.imgsz,
            "batch": args.batch,
            "device": args.device,
        }
    )
    (args.out / f"{args.what}_train.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
