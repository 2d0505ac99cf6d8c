"""Writers for the datasets and clips made from synthetic scenes (numpy + OpenCV only).

Seed ranges keep training and evaluation apart: training uses seeds below
`HELD_OUT_SEED_START`; evaluation and tests use seeds from it upwards.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from demo.scenes import BODY_TYPES, DETECT_CLASSES, ObjectTruth, Scene
from graph.common.vision import crop_square

HELD_OUT_SEED_START = 100_000  # validation during training (model selection) and tests
EVAL_SEED_START = 200_000  # quality bars: never seen by training or model selection
DETECT_MIN_VISIBLE = 0.3  # fainter objects are left unlabelled rather than taught as boxes
CLASSIFY_MIN_VISIBLE = 0.75
CROP_SIZE = 160
FRAME_STEP = 23


def square_crop(
    image: np.ndarray,
    box: tuple[int, int, int, int],
    size: int = CROP_SIZE,
    pad_fraction: float = 0.04,
) -> np.ndarray:
    """The classifier's crop (graph.common.vision.crop_square) at the dataset's size."""
    return crop_square(image, box, size, pad_fraction)


def yolo_label_lines(truths: Iterable[ObjectTruth], width: int, height: int) -> list[str]:
    lines = []
    for obj in truths:
        if obj.visible_fraction < DETECT_MIN_VISIBLE:
            continue
        x1, y1, x2, y2 = obj.box
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        bw, bh = (x2 - x1) / width, (y2 - y1) / height
        lines.append(f"{DETECT_CLASSES.index(obj.cls)} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return lines


def _write_scene(args: tuple[int, Path, str, int, float]) -> int:
    seed, root, split, frames_per_scene, det_scale = args
    scene = Scene(seed, n_frames=FRAME_STEP * frames_per_scene)
    written = 0
    for k in range(frames_per_scene):
        t = k * FRAME_STEP
        image, truths, _ = scene.render(t)
        name = f"s{seed}_t{t}"
        small = cv2.resize(image, None, fx=det_scale, fy=det_scale, interpolation=cv2.INTER_AREA)
        cv2.imwrite(
            str(root / "detect" / "images" / split / f"{name}.jpg"),
            small,
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )
        (root / "detect" / "labels" / split / f"{name}.txt").write_text(
            "\n".join(yolo_label_lines(truths, image.shape[1], image.shape[0])) + "\n"
        )
        for obj in truths:
            if obj.cls != "vehicle" or obj.truncated or obj.visible_fraction < CLASSIFY_MIN_VISIBLE:
                continue
            crop = square_crop(image, obj.box)
            cv2.imwrite(
                str(
                    root / "classify" / split / str(obj.body_type) / f"{name}_o{obj.object_id}.jpg"
                ),
                crop,
                [cv2.IMWRITE_JPEG_QUALITY, 92],
            )
        written += 1
    return written


def write_datasets(
    root: Path,
    train_scenes: int,
    val_scenes: int,
    frames_per_scene: int = 4,
    det_scale: float = 0.5,
    workers: int = 8,
) -> Path:
    """Write the YOLO detection dataset and the body-type crop dataset; return data.yaml."""
    for split in ("train", "val"):
        (root / "detect" / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "detect" / "labels" / split).mkdir(parents=True, exist_ok=True)
        for body in BODY_TYPES:
            (root / "classify" / split / body).mkdir(parents=True, exist_ok=True)
    jobs = [(s, root, "train", frames_per_scene, det_scale) for s in range(train_scenes)]
    jobs += [
        (HELD_OUT_SEED_START + s, root, "val", frames_per_scene, det_scale)
        for s in range(val_scenes)
    ]
    with ProcessPoolExecutor(workers) as pool:
        total = sum(pool.map(_write_scene, jobs, chunksize=4))
    data_yaml = root / "detect" / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(DETECT_CLASSES))
    data_yaml.write_text(
        f"path: {(root / 'detect').resolve()}\ntrain: images/train\n"
        f"val: images/val\nnames:\n{names}\n"
    )
    print(f"wrote {total} frames under {root}")
    return data_yaml


def write_clip(
    seed: int, n_frames: int, video_path: Path, fps: int = 10, scale: float = 1.0
) -> Path:
    """Write an H.264 MP4 (no B-frames, keyframe every second) and its ground-truth JSON."""
    import av  # only where clips are written; the generator itself needs no PyAV

    scene = Scene(seed, n_frames=n_frames)
    w, h = int(scene.config.width * scale) // 2 * 2, int(scene.config.height * scale) // 2 * 2
    truth_frames = []
    video_path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(video_path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"bf": "0", "g": str(fps), "preset": "veryfast", "crf": "20"}
        for t, image, truths in scene.frames():
            if scale != 1.0:
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            container.mux(stream.encode(frame))
            truth_frames.append({"index": t, "objects": [_scaled(o, scale) for o in truths]})
        container.mux(stream.encode())
    truth = {
        "seed": seed,
        "fps": fps,
        "width": w,
        "height": h,
        "classes": list(DETECT_CLASSES),
        "frames": truth_frames,
    }
    video_path.with_suffix(".json").write_text(json.dumps(truth))
    return video_path


def _scaled(obj: ObjectTruth, scale: float) -> dict[str, object]:
    data: dict[str, Any] = obj.to_json()
    for key in ("box", "plate_box"):
        if data[key] is not None:
            data[key] = [round(v * scale) for v in data[key]]
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("datasets", help="YOLO detection + body-type crop datasets")
    data.add_argument("root", type=Path)
    data.add_argument("--train-scenes", type=int, default=600)
    data.add_argument("--val-scenes", type=int, default=60)
    data.add_argument("--frames-per-scene", type=int, default=4)
    data.add_argument("--workers", type=int, default=8)
    clip = sub.add_parser("clip", help="an H.264 MP4 (no B-frames) + ground-truth JSON")
    clip.add_argument("video", type=Path, help="output .mp4; the .json is written beside it")
    clip.add_argument("--seed", type=int, default=EVAL_SEED_START)
    clip.add_argument("--frames", type=int, default=300)
    clip.add_argument("--fps", type=int, default=10)
    clip.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    if args.command == "clip":
        print(write_clip(args.seed, args.frames, args.video, args.fps, args.scale))
    else:
        write_datasets(
            args.root,
            args.train_scenes,
            args.val_scenes,
            args.frames_per_scene,
            workers=args.workers,
        )


if __name__ == "__main__":
    main()
