"""Which detection a `cropClass` branch classifies for an object (no Ray)."""

from __future__ import annotations

from graph.events.model import TrackedDetection
from graph.pipeline.branches import belonging, inside_share


def det(
    track: int, label: str, box: tuple[float, float, float, float], conf: float = 0.9
) -> TrackedDetection:
    return TrackedDetection(track, 0, label, conf, box, True)


def test_a_plate_belongs_to_the_car_it_lies_in_most_never_to_two() -> None:
    left = det(1, "car", (0, 0, 100, 60))
    right = det(2, "car", (60, 0, 160, 60))  # overlapping the left car
    plate = det(3, "plate", (62, 40, 98, 50))  # inside both boxes entirely
    deep = det(4, "plate", (100, 40, 130, 50))  # in the right car only
    frame = [left, right, plate, deep]
    # Both cars hold the first plate whole: the tighter fit decides (equal areas here:
    # the first one listed keeps it), and the other car does not get it too.
    owners = [o.track_id for o in (left, right) if belonging(frame, o, "plate") is plate]
    assert len(owners) == 1
    assert belonging(frame, right, "plate") in (plate, deep)
    half = det(5, "plate", (90, 40, 110, 50))  # half in the left car, all in the right
    assert belonging([left, right, half], left, "plate") is None
    assert belonging([left, right, half], right, "plate") is half


def test_the_most_confident_plate_inside_wins_and_empty_boxes_never_belong() -> None:
    car = det(1, "car", (0, 0, 100, 60))
    weak, strong = det(2, "plate", (10, 40, 40, 50), 0.4), det(3, "plate", (50, 40, 80, 50), 0.8)
    assert belonging([car, weak, strong], car, "plate") is strong
    flat = det(4, "plate", (10, 40, 10, 50))
    assert inside_share(flat.box, car.box) == 0.0
    assert belonging([car, flat], car, "plate") is None
    outside = det(5, "plate", (200, 40, 230, 50))
    assert belonging([car, outside], car, "plate") is None
