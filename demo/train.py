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
from typing import Any

# Per model kind: architecture, run name, weights file, and the augmentations that differ
# (no flips for the detector: plates must stay readable; mosaic off for the last epochs).
KINDS: dict[str, dict[str, Any]] = {
    "detector": {
        "yaml": "yolo11n.yaml",
        "run": "detect",
        "weights": "detector.pt",
        "train": {"mosaic": 1.0, "close_mosaic": 3, "fliplr": 0.0, "deterministic": False},
    },
    "classifier": {
        "yaml": "yolo11n-cls.yaml",
        "run": "classify",
        "weights": "body_type.pt",
        "train": {"fliplr": 0.5},
    },
}


def train(
    what: str,
    data: Path,
    out: Path,
    device: str,
    epochs: int,
    hours: float | None,
    imgsz: int,
    batch: int,
    workers: int,
) -> dict[str, object]:
    """Train one model from random init; copy its best weights to `out`; validate them."""
    from ultralytics import YOLO

    kind = KINDS[what]
    start = time.time()
    extra = {"time": hours} if hours else {}
    YOLO(kind["yaml"]).train(
        data=str(data),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device=device,
        workers=workers,
        project=str(out / "runs"),
        name=kind["run"],
        exist_ok=True,
        pretrained=False,
        amp=False,
        plots=False,
        seed=0,
        verbose=False,
        **kind["train"],
        **extra,
    )
    best = out / "runs" / kind["run"] / "weights" / "best.pt"
    shutil.copy(best, out / kind["weights"])
    metrics = YOLO(str(best)).val(
        data=str(data),
        imgsz=imgsz,
        device=device,
        plots=False,
        project=str(out / "runs"),
        name=f"{kind['run']}-val",
        exist_ok=True,
    )
    result: dict[str, object] = {"seconds": round(time.time() - start, 1)}
    if what == "classifier":
        result["top1"] = float(metrics.top1)
    else:
        result["map50"] = float(metrics.box.map50)
        result["ap50_per_class"] = {
            name: float(metrics.box.ap50[i])
            for i, name in metrics.names.items()
            if i < len(metrics.box.ap50)
        }
    return result


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
    result = train(
        args.what,
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
