"""Score the demo models on scenes never used in training or model selection.

Detector: AP50 per class with camgraph's own engine at the served input size.
Body type: top-1 on ground-truth vehicle crops. Plate: exact text of the plate branch
(vehicle crop → RapidOCR) for plates at least 30 px high.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from demo.datasets import CLASSIFY_MIN_VISIBLE, DETECT_MIN_VISIBLE, EVAL_SEED_START
from demo.metrics import average_precision, match_image
from demo.scenes import DETECT_CLASSES, Scene
from deployments.inference.classify import ClassifierEngine, PlateReader
from deployments.inference.engines import OnnxEngine
from graph.common.vision import DetectParams, crop_square, letterbox, unletterbox_boxes

BARS = {"detector_vehicle_ap50": 0.90, "body_type_top1": 0.90, "plate_exact": 0.70}
MIN_PLATE_PX = 30


def evaluate(
    detector: Path, classifier: Path, scenes: int, frames_per_scene: int, imgsz: int = 640
) -> dict[str, Any]:
    det = OnnxEngine(detector, imgsz, intra_op_threads=2)
    cls = ClassifierEngine(classifier, intra_op_threads=2)
    plates = PlateReader()
    per_class: dict[str, dict[str, list]] = {
        c: {"scores": [], "outcomes": []} for c in DETECT_CLASSES
    }
    n_gt = dict.fromkeys(DETECT_CLASSES, 0)
    found_at_025 = {"vehicle": 0}
    body_hits = body_total = plate_hits = plate_total = 0
    plate_misses: list[tuple[str, str | None]] = []
    start = time.time()
    for k in range(scenes):
        scene = Scene(EVAL_SEED_START + k, n_frames=20 * frames_per_scene)
        for f in range(frames_per_scene):
            image, truths, labels = scene.render(20 * f)
            boxed, lb = letterbox(image, imgsz)
            rows = det.detect(boxed[None], [DetectParams(conf=0.001, iou=0.7)])[0]
            rows[:, :4] = unletterbox_boxes(rows[:, :4], lb)
            for ci, name in enumerate(DETECT_CLASSES):
                objs = [t for t in truths if t.cls == name]
                gt = np.array([t.box for t in objs], np.float64).reshape(-1, 4)
                ignore = np.array([t.visible_fraction < DETECT_MIN_VISIBLE for t in objs], bool)
                pred = rows[rows[:, 5] == ci]
                outcome, _ = match_image(pred[:, :4], pred[:, 4], gt, ignore)
                per_class[name]["scores"] += pred[:, 4].tolist()
                per_class[name]["outcomes"] += outcome.tolist()
                n_gt[name] += int((~ignore).sum())
                if name == "vehicle":
                    confident = pred[pred[:, 4] >= 0.25]
                    _, taken = match_image(confident[:, :4], confident[:, 4], gt, ignore)
                    found_at_025["vehicle"] += int((taken & ~ignore).sum())
            vehicles = [t for t in truths if t.cls == "vehicle" and not t.truncated]
            readable = [t for t in vehicles if t.visible_fraction >= CLASSIFY_MIN_VISIBLE]
            if readable:
                crops = np.stack([crop_square(image, t.box, cls.imgsz) for t in readable])
                for truth, label in zip(readable, cls.classify(crops), strict=True):
                    body_hits += label.label == truth.body_type
                    body_total += 1
            for t in vehicles:
                pb = t.plate_box
                if pb is None or pb[3] - pb[1] < MIN_PLATE_PX:
                    continue
                if not (labels[pb[1] : pb[3], pb[0] : pb[2]] == t.object_id).all():
                    continue  # the plate itself is hidden behind another object
                x1, y1, x2, y2 = t.box
                read = plates.read(image[y1:y2, x1:x2])
                plate_total += 1
                if read is not None and read.label == t.plate:
                    plate_hits += 1
                elif len(plate_misses) < 10:
                    plate_misses.append((str(t.plate), read.label if read else None))
    ap = {
        name: average_precision(v["scores"], v["outcomes"], n_gt[name])
        for name, v in per_class.items()
    }
    results: dict[str, Any] = {
        "seeds": [EVAL_SEED_START, EVAL_SEED_START + scenes - 1],
        "frames": scenes * frames_per_scene,
        "imgsz": imgsz,
        "detector_ap50": {k: round(v, 4) for k, v in ap.items()},
        "detector_vehicle_ap50": round(ap["vehicle"], 4),
        "detector_vehicle_recall_at_conf_0.25": round(
            found_at_025["vehicle"] / max(1, n_gt["vehicle"]), 4
        ),
        "ground_truth_objects": n_gt,
        "body_type_top1": round(body_hits / max(1, body_total), 4),
        "body_type_crops": body_total,
        "plate_exact": round(plate_hits / max(1, plate_total), 4),
        "plates": plate_total,
        "plate_misses_sample": plate_misses,
        "seconds": round(time.time() - start, 1),
    }
    results["bars"] = {
        k: {"target": v, "value": results[k], "pass": results[k] >= v} for k, v in BARS.items()
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--detector", type=Path, default=Path("models/demo-detector.onnx"))
    parser.add_argument("--classifier", type=Path, default=Path("models/body-type.onnx"))
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--frames-per-scene", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("models/evaluation.json"))
    args = parser.parse_args()
    results = evaluate(args.detector, args.classifier, args.scenes, args.frames_per_scene)
    args.out.write_text(json.dumps(results, indent=2))
    for name, bar in results["bars"].items():
        print(
            f"{'PASS' if bar['pass'] else 'FAIL'} {name}: {bar['value']}"
            f" (target >= {bar['target']})"
        )
    if not all(b["pass"] for b in results["bars"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
