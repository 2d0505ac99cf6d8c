"""The pipeline benchmark's ground truth and scoring (benchmarks/pipeline_phase.py), on
a clip the scene generator wrote and records shaped as the demo pipeline writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.pipeline_phase import (
    DSN_ENV,
    READABLE_PLATE_PX,
    VEHICLE_MIN_FRAMES,
    PipelineRun,
    VehicleTruth,
    camera_counts,
    pipeline_config,
    render,
    score,
    vehicles_of,
)
from demo.datasets import write_clip

META = {
    "date": "d",
    "environment": "e",
    "single_inference_ms": 40.0,
    "inference_capacity_fps": 50.0,
    "capacity_basis": "raw",
    "raw_capacity_fps": 40.0,
    "raw_layout": "2 procs x 1 thread",
    "capacity_fps": 40.0,
    "frames": 300,
}


def test_camera_counts_offer_each_level_of_the_capacity_within_bounds() -> None:
    assert camera_counts([2, 4], 45.0, 16) == {2: 9, 4: 16}  # 18 capped at 16
    assert camera_counts([0.1, 2.5], 45.0, 32) == {0.1: 1, 2.5: 11}  # at least one
    assert camera_counts([2], 45.0, 16, fps=5.0) == {2: 16}
    with pytest.raises(ValueError, match="no capacity"):
        camera_counts([2], 0.0, 16)


def _obj(oid: int, visible: float, plate_h: int, cls: str = "vehicle") -> dict[str, object]:
    return {
        "object_id": oid,
        "cls": cls,
        "box": [0, 0, 100, 60],
        "body_type": "sedan" if cls == "vehicle" else None,
        "plate": f"AB{oid:03d}" if cls == "vehicle" else None,
        "plate_box": [10, 10, 60, 10 + plate_h] if cls == "vehicle" else None,
        "visible_fraction": visible,
        "occluded": False,
        "truncated": False,
    }


def test_vehicles_need_enough_visible_frames_and_readable_plates_enough_pixels() -> None:
    frames = []
    for i in range(VEHICLE_MIN_FRAMES):
        objs = [_obj(1, 0.9, READABLE_PLATE_PX if i == 3 else 12), _obj(2, 0.9, 12)]
        objs.append(_obj(9, 1.0, 0, cls="person"))
        if i < VEHICLE_MIN_FRAMES - 1:
            objs.append(_obj(3, 0.9, 40))  # one frame short
        objs.append(_obj(4, 0.3, 40))  # never half visible
        frames.append({"index": i, "objects": objs})
    vehicles = vehicles_of({"frames": frames})
    assert set(vehicles) == {1, 2}
    assert vehicles[1].readable and not vehicles[2].readable
    assert vehicles[1] == VehicleTruth(1, "sedan", "AB001", True)


def test_score_matches_records_by_plate_within_their_camera() -> None:
    truths = {
        "c1": {
            1: VehicleTruth(1, "sedan", "AAA111", True),
            2: VehicleTruth(2, "bus", "BBB222", True),
        },
        "c2": {3: VehicleTruth(3, "truck", "CCC333", False)},
    }
    records = [
        {"camera_id": "c1", "body_type": "sedan", "plate": "AAA111"},  # right
        {"camera_id": "c1", "body_type": "sedan", "plate": "AAA111"},  # a second record
        {"camera_id": "c1", "body_type": None, "plate": "BBB22"},  # misread plate
        {"camera_id": "c2", "body_type": "bus", "plate": "CCC333"},  # wrong type
        {"camera_id": "c2", "body_type": "truck", "plate": "AAA111"},  # other camera's plate
        {"camera_id": "elsewhere", "body_type": "sedan", "plate": "AAA111"},  # not this run
    ]
    s = score(truths, records)
    assert (s.vehicles, s.records, s.readable_plates) == (3, 5, 2)
    assert s.plates_exact == 1  # AAA111 on c1; CCC333 was found but is not readable
    assert s.records_matched == 3 and s.body_type_correct == 2
    assert s.records_with_body_type == 4
    assert s.records_per_vehicle == pytest.approx(5 / 3)
    assert s.plate_recall == pytest.approx(0.5)
    assert s.body_type_accuracy == pytest.approx(2 / 3)
    run = PipelineRun("priority", 2.0, 2, s, overload_inference=1.25, played=600)
    run.processed, run.offered = 150, 400
    text = render([run], META)
    assert "| priority | 2.0x | 1.2x | 2 | 4.0x | 150 / 400 | 1.67 (5/3) | 0.50 (1/2) |" in text
    assert "detects 40.0 frames/s of these clips (2 procs x 1 thread, every frame)" in text
    assert "Overload = offered / what raw ONNX Runtime decodes" in text
    assert "these clips: 40.0 frames/s." in text
    given = render([run], {**META, "capacity_basis": "given", "capacity_fps": 34.6})
    assert "Overload = offered / a capacity given on the command line" in given
    assert "(--capacity-fps): 34.6 frames/s." in given
    unprocessed = render(
        [PipelineRun("priority", 2.0, 2, s)], {**META, "capacity_basis": "inference"}
    )
    assert "| priority | 2.0x | 0.0x | 2 | - | 0 / 0 |" in unprocessed
    assert "Overload = offered / the detector replicas' frames/s" in unprocessed
    assert "Where the cores went" not in text  # nothing sampled, nothing said
    run = PipelineRun("priority", 2.0, 2, s)
    run.cpu_pct_by_role = {
        "CameraActor": 60.0,
        "ServeReplica:camgraph:Classifier_demo_plate_ocr_v1": 30.0,
        "raylet": 5.0,
    }
    text = render(
        [run],
        META,
    )
    assert (
        "- priority, 2.0x: all 95; CameraActor 60, Classifier_demo_plate_ocr_v1 30, raylet 5"
        in text
    )


def test_a_generated_clip_has_vehicles_with_types_and_readable_plates(tmp_path: Path) -> None:
    clip = write_clip(300_000, 60, tmp_path / "c.mp4", fps=10, scale=1.0)
    vehicles = vehicles_of(json.loads(clip.with_suffix(".json").read_text()))
    assert vehicles and all(v.body_type and v.plate for v in vehicles.values())
    assert any(v.readable for v in vehicles.values())


def test_the_config_is_make_runs_with_records_in_this_runs_schema() -> None:
    base = {"applications": [{"args": {"actions": {"data_dir": "x"}, "pipelines": ["p"]}}]}
    on = pipeline_config(base, "bench_1", hold=True)
    args = on["applications"][0]["args"]
    assert args["actions"]["postgres_schema"] == "bench_1"
    assert args["actions"]["postgres_dsn_env"] == DSN_ENV and args["pipelines"] == ["p"]
    assert "postgres_dsn" not in args["actions"]  # never in the deployed config
    assert "dispatch" not in args.get("streams", {})
    off = pipeline_config(base, "bench_1", hold=False)
    assert off["applications"][0]["args"]["streams"]["dispatch"]["branch_hold_s"] == 0
    assert "streams" not in base["applications"][0]["args"]  # the base is not changed
    noshed = pipeline_config(base, "bench_1", hold=True, shed=False)["applications"][0]["args"]
    assert noshed["streams"] == {"reader": {"shed_decode": False}}


def test_the_stability_study_samples_in_order_and_scores_by_iou() -> None:
    """benchmarks/stability_study.py: every Nth frame from a random phase, jittered but
    in order and without repeats; a "new" event found when its box overlaps a counted
    vehicle's box (IoU >= 0.5) in that frame, a second one for it a duplicate, one that
    overlaps none unmatched."""
    import random

    import numpy as np

    from benchmarks.stability_study import sampled, score_clip

    assert sampled(5, 1, 0.0, random.Random(0)) == [0, 1, 2, 3, 4]
    for seed in range(20):
        picked = sampled(300, 10, 0.4, random.Random(seed))
        assert picked == sorted(set(picked)) and 28 <= len(picked) <= 30
        assert all(0 <= i < 300 for i in picked)
        gaps = np.diff(picked)
        assert gaps.min() >= 1 and gaps.max() <= 18
    frames = [
        {"index": i, "objects": [_obj(1, 0.9, 12), _obj(4, 0.3, 12)]}
        for i in range(VEHICLE_MIN_FRAMES)
    ]
    box = np.array([0, 0, 100, 60], np.float32)  # _obj's box
    shifted = np.array([70, 0, 170, 60], np.float32)  # IoU 30/170 with it
    score = score_clip({"frames": frames}, [(2, box), (5, box + 5), (7, shifted)])
    assert (score.vehicles, score.found, score.duplicates, score.unmatched) == (1, 1, 1, 1)
    assert score.row()["records_per_vehicle"] == 3.0


@pytest.mark.parametrize(
    "args",
    [
        ["--capacity-fps", "0"],
        ["--capacity-fps", "nan"],
        ["--overload", "2,-1"],
        ["--overload", "2,abc"],
        ["--capacity-seconds", "0"],
        ["--variants", "priority,fastest"],
    ],
)
def test_bad_arguments_are_refused_before_anything_is_measured(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.pipeline_phase import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2  # argparse's usage error, before the first measurement
    assert "error:" in capsys.readouterr().err
