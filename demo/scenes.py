"""Deterministic synthetic road scenes with exact per-pixel ground truth.

Pure numpy + OpenCV so that datasets can be generated anywhere (also on a GPU box
without the project installed). A `Scene` is fully determined by its seed: the same
seed and frame index always give the same pixels and the same truth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np

DETECT_CLASSES: tuple[str, ...] = ("vehicle", "person")
BODY_TYPES: tuple[str, ...] = ("sedan", "hatchback", "truck", "bus", "van")
# BGR, named so ground truth and classifiers can use the names.
COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 232),
    "black": (28, 28, 30),
    "silver": (168, 170, 172),
    "red": (38, 36, 196),
    "blue": (176, 80, 30),
    "green": (60, 140, 40),
    "yellow": (40, 205, 230),
    "orange": (30, 120, 240),
}
PLATE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: ambiguous with digits
PLATE_DIGITS = "0123456789"

# Relative lengths (x the lane's base length) and heights (x length) per body type.
_BODY_LENGTH = {"sedan": 1.0, "hatchback": 0.82, "truck": 1.35, "bus": 1.8, "van": 1.05}


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Geometry of the camera view; defaults give a 1280x720 three-lane road."""

    width: int = 1280
    height: int = 720
    base_length_px: float = 360.0
    # (ground line y as a fraction of height, scale) for each lane, far to near.
    lanes: tuple[tuple[float, float], ...] = ((0.45, 0.42), (0.63, 0.62), (0.83, 0.85))
    sidewalks: tuple[tuple[float, float], ...] = ((0.34, 0.36), (0.97, 1.0))
    vehicle_gap_px: tuple[float, float] = (40.0, 420.0)
    pedestrians_per_sidewalk: tuple[int, int] = (0, 3)


@dataclasses.dataclass(frozen=True)
class ObjectTruth:
    """Ground truth for one object in one frame; `box` is x1, y1, x2, y2 (exclusive)."""

    object_id: int
    cls: str
    box: tuple[int, int, int, int]
    body_type: str | None
    colour: str | None
    plate: str | None
    plate_box: tuple[int, int, int, int] | None
    visible_fraction: float
    occluded: bool
    truncated: bool

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Sprite:
    image: np.ndarray  # HxWx3 uint8
    mask: np.ndarray  # HxW bool
    plate_box: tuple[int, int, int, int] | None = None  # in sprite coordinates


@dataclasses.dataclass
class _Mover:
    object_id: int
    cls: str
    z: int  # drawing order: larger is nearer
    ground_y: int
    x0: float  # left edge at frame 0
    speed: float  # px per frame, signed
    sprite: Sprite | None  # None for pedestrians: they are drawn per frame (walking legs)
    body_type: str | None = None
    colour: str | None = None
    plate: str | None = None
    height_px: int = 0
    person_colours: tuple[tuple[int, int, int], ...] = ()

    def left(self, t: int) -> float:
        return self.x0 + self.speed * t


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    return (int(values[0]), int(values[1]), int(values[2]))


def random_plate(rng: np.random.Generator) -> str:
    """Seven characters: two letters, three digits, two letters (e.g. KX482TP)."""
    pick = lambda alphabet, n: "".join(rng.choice(list(alphabet), size=n))  # noqa: E731
    return pick(PLATE_LETTERS, 2) + pick(PLATE_DIGITS, 3) + pick(PLATE_LETTERS, 2)


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)  # type: ignore[return-value]


def draw_vehicle(
    body_type: str, colour: tuple[int, int, int], length: int, plate: str, facing_right: bool
) -> Sprite:
    """Side view of a vehicle with its plate on the rear bumper, text never mirrored."""
    L = int(length)
    H = int(L * {"bus": 0.55, "truck": 0.5, "van": 0.48}.get(body_type, 0.42))
    img = np.zeros((H, L, 3), np.uint8)
    mask = np.zeros((H, L), np.uint8)
    wheel_r = max(3, int(0.085 * L if body_type != "bus" else 0.055 * L))
    ground = H - 1
    body_bottom = ground - int(wheel_r * 0.6)
    window = (92, 72, 58)
    dark = _shade(colour, 0.7)

    def poly(points: Sequence[tuple[float, float]], fill: tuple[int, int, int]) -> None:
        pts = np.array([[int(x * (L - 1)), int(y)] for x, y in points], np.int32)
        cv2.fillPoly(img, [pts], fill, lineType=cv2.LINE_8)
        cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8)

    # Drawn facing right (front at x=1); mirrored below for left-facing vehicles.
    if body_type in ("sedan", "hatchback"):
        roof = body_bottom - int(0.36 * L * (1.0 if body_type == "sedan" else 1.05))
        belt = body_bottom - int(0.2 * L)
        poly([(0.0, belt), (1.0, belt + 0.02 * L), (1.0, body_bottom), (0.0, body_bottom)], colour)
        if body_type == "sedan":
            cabin = [(0.22, belt), (0.32, roof), (0.62, roof), (0.76, belt)]
        else:
            cabin = [(0.02, belt), (0.06, roof), (0.58, roof), (0.74, belt)]
        poly(cabin, colour)
        inset = 0.03
        win = [
            (cabin[0][0] + inset * 1.5, belt - 2),
            (cabin[1][0] + inset, roof + 0.03 * L),
            (cabin[2][0] - inset * 0.5, roof + 0.03 * L),
            (cabin[3][0] - inset * 1.5, belt - 2),
        ]
        poly(win, window)
        pillar_x = int(0.5 * (win[1][0] + win[2][0]) * (L - 1))
        cv2.line(img, (pillar_x, roof), (pillar_x, belt), colour, max(2, L // 60))
        wheels = (0.2, 0.8)
    elif body_type == "van":
        roof = body_bottom - int(0.42 * L)
        poly(
            [
                (0.0, roof),
                (0.78, roof),
                (1.0, body_bottom - 0.2 * L),
                (1.0, body_bottom),
                (0.0, body_bottom),
            ],
            colour,
        )
        poly(
            [
                (0.08, roof + 0.05 * L),
                (0.76, roof + 0.05 * L),
                (0.9, roof + 0.17 * L),
                (0.08, roof + 0.17 * L),
            ],
            window,
        )
        wheels = (0.18, 0.82)
    elif body_type == "truck":
        roof = body_bottom - int(0.46 * L)
        poly([(0.0, roof), (0.7, roof), (0.7, body_bottom), (0.0, body_bottom)], dark)
        cab_top = body_bottom - int(0.36 * L)
        poly(
            [
                (0.72, cab_top),
                (0.9, cab_top),
                (1.0, body_bottom - 0.15 * L),
                (1.0, body_bottom),
                (0.72, body_bottom),
            ],
            colour,
        )
        poly(
            [
                (0.8, cab_top + 0.04 * L),
                (0.9, cab_top + 0.04 * L),
                (0.97, body_bottom - 0.17 * L),
                (0.8, body_bottom - 0.17 * L),
            ],
            window,
        )
        wheels = (0.14, 0.3, 0.85)  # type: ignore[assignment]
    elif body_type == "bus":
        roof = body_bottom - int(0.5 * L)
        poly([(0.0, roof), (1.0, roof), (1.0, body_bottom), (0.0, body_bottom)], colour)
        top, bottom = roof + int(0.06 * L), roof + int(0.2 * L)
        for k in range(8):
            x1 = 0.04 + k * 0.115
            poly([(x1, top), (x1 + 0.095, top), (x1 + 0.095, bottom), (x1, bottom)], window)
        poly(
            [
                (0.96, top),
                (1.0, top),
                (1.0, body_bottom - 0.06 * L),
                (0.96, body_bottom - 0.06 * L),
            ],
            window,
        )
        wheels = (0.14, 0.82)
    else:
        raise ValueError(f"unknown body type {body_type!r}")

    for wx in wheels:
        centre = (int(wx * (L - 1)), ground - wheel_r)
        cv2.circle(img, centre, wheel_r, (22, 22, 22), -1)
        cv2.circle(mask, centre, wheel_r, 1, -1)
        cv2.circle(img, centre, max(1, wheel_r // 2), (150, 150, 150), -1)

    if not facing_right:
        img = np.ascontiguousarray(img[:, ::-1])
        mask = np.ascontiguousarray(mask[:, ::-1])

    # Plate on the rear bumper: left end for a right-facing vehicle.
    plate_h = max(8, int(0.1 * L))
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = max(1, plate_h // 9)
    (tw, th), _ = cv2.getTextSize(plate, font, 1.0, thickness)
    font_scale = 0.6 * plate_h / th
    (tw, th), _ = cv2.getTextSize(plate, font, font_scale, thickness)
    plate_w = min(int(tw + 0.5 * plate_h), int(0.45 * L))
    if tw > plate_w - 4:  # narrow vehicle: shrink the text to fit
        font_scale *= (plate_w - 4) / tw
        (tw, th), _base = cv2.getTextSize(plate, font, font_scale, thickness)
    py2 = body_bottom - 2
    py1 = py2 - plate_h
    px1 = 2 if facing_right else L - 2 - plate_w
    cv2.rectangle(img, (px1, py1), (px1 + plate_w - 1, py2 - 1), (245, 245, 245), -1)
    cv2.rectangle(img, (px1, py1), (px1 + plate_w - 1, py2 - 1), (20, 20, 20), 1)
    org = (px1 + (plate_w - tw) // 2, py1 + (plate_h + th) // 2)
    cv2.putText(img, plate, org, font, font_scale, (15, 15, 15), thickness, cv2.LINE_AA)
    mask[py1:py2, px1 : px1 + plate_w] = 1
    return Sprite(img, mask.astype(bool), (px1, py1, px1 + plate_w, py2))


def draw_person(height: int, phase: float, colours: tuple[tuple[int, int, int], ...]) -> Sprite:
    """A walking pedestrian; `phase` in [0, 1) swings the legs."""
    skin, shirt, trousers = colours
    H = max(12, int(height))
    W = max(6, int(0.42 * H))
    img = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    cx = W // 2
    head_r = max(2, int(0.075 * H))
    torso_top, hip = 2 * head_r + 1, int(0.55 * H)
    swing = np.sin(2 * np.pi * phase) * 0.18 * H
    legs = [((cx, hip), (int(cx + swing), H - 1)), ((cx, hip), (int(cx - swing), H - 1))]
    leg_w = max(2, int(0.09 * H))
    for target in (img, mask):
        for a, b in legs:
            cv2.line(
                target,
                a,
                (int(np.clip(b[0], 0, W - 1)), b[1]),
                trousers if target is img else 1,
                leg_w,
            )
        cv2.rectangle(
            target,
            (cx - int(0.13 * H), torso_top),
            (cx + int(0.13 * H), hip),
            shirt if target is img else 1,
            -1,
        )
        cv2.circle(target, (cx, head_r), head_r, skin if target is img else 1, -1)
    return Sprite(img, mask.astype(bool))


class Scene:
    """A camera view with vehicles and pedestrians moving through it, fixed by `seed`."""

    def __init__(
        self,
        seed: int,
        n_frames: int = 300,
        config: SceneConfig | None = None,
        prefill: bool = True,
    ) -> None:
        self.seed = seed
        self.n_frames = n_frames
        self.config = cfg = config or SceneConfig()
        rng = np.random.default_rng(seed)
        self._background = self._draw_background(rng)
        self._style: dict[str, Any] = {
            "gain": float(rng.uniform(0.7, 1.25)),
            "bias": float(rng.uniform(-25, 20)),
            "tint": rng.uniform(0.9, 1.1, size=3),
            "blur": float(rng.choice([0.0, 0.0, 0.6, 1.0, 1.4])),
            "noise": float(rng.uniform(0, 7)),
        }
        self._movers: list[_Mover] = []
        next_id = 1
        for lane_index, (ground_frac, scale) in enumerate(cfg.lanes):
            ground_y = int(ground_frac * cfg.height)
            direction = 1 if lane_index % 2 == 0 else -1
            speed = direction * float(rng.uniform(5, 14)) * scale
            base = cfg.base_length_px * scale
            # Place vehicles along the lane's whole trajectory, spaced so none overlap;
            # with `prefill` the lane is already busy at frame 0.
            travel = abs(speed) * n_frames + 2 * cfg.base_length_px
            cursor = (
                (cfg.width if prefill else 0.0)
                if direction > 0
                else (0.0 if prefill else float(cfg.width))
            )
            while (cursor > -travel) if direction > 0 else (cursor < cfg.width + travel):
                mover = self._make_vehicle(rng, next_id, lane_index, ground_y, base, speed)
                length = mover.sprite.image.shape[1]  # type: ignore[union-attr]
                gap = float(rng.uniform(*cfg.vehicle_gap_px))
                if direction > 0:
                    mover.x0 = cursor = cursor - gap - length
                else:
                    mover.x0 = cursor + gap
                    cursor = mover.x0 + length
                self._movers.append(mover)
                next_id += 1
        for walk_index, (ground_frac, scale) in enumerate(cfg.sidewalks):
            ground_y = int(ground_frac * cfg.height) - 1
            for _ in range(int(rng.integers(*cfg.pedestrians_per_sidewalk, endpoint=True))):
                speed = float(rng.choice([-1, 1]) * rng.uniform(1.0, 2.5) * scale)
                height = int(0.55 * cfg.base_length_px * scale * rng.uniform(0.85, 1.1))
                x0 = float(rng.uniform(0, cfg.width))  # drawn before the colours: seeds
                colours = tuple(_rgb(rng.integers(90, 230, 3)) for _ in range(3))  # stay stable
                self._movers.append(
                    _Mover(
                        object_id=next_id,
                        cls="person",
                        z=walk_index,
                        ground_y=ground_y,
                        x0=x0,
                        speed=speed,
                        sprite=None,
                        height_px=height,
                        person_colours=colours,
                    )
                )
                next_id += 1
        self._movers.sort(key=lambda m: (m.ground_y, m.z))

    def _make_vehicle(
        self,
        rng: np.random.Generator,
        object_id: int,
        lane: int,
        ground_y: int,
        base: float,
        speed: float,
    ) -> _Mover:
        body = str(rng.choice(BODY_TYPES))
        colour = str(rng.choice(list(COLOURS)))
        plate = random_plate(rng)
        length = int(base * _BODY_LENGTH[body] * rng.uniform(0.92, 1.08))
        sprite = draw_vehicle(body, COLOURS[colour], length, plate, facing_right=speed > 0)
        return _Mover(
            object_id=object_id,
            cls="vehicle",
            z=lane * 10,
            ground_y=ground_y,
            x0=0.0,
            speed=speed,
            sprite=sprite,
            body_type=body,
            colour=colour,
            plate=plate,
        )

    def _draw_background(self, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        h, w = cfg.height, cfg.width
        img = np.zeros((h, w, 3), np.float32)
        sky_top, sky_bottom = rng.uniform(150, 230, 3), rng.uniform(170, 250, 3)
        horizon = int(0.3 * h)
        for y in range(horizon):
            img[y] = sky_top + (sky_bottom - sky_top) * y / max(1, horizon)
        img[horizon:] = rng.uniform(60, 110, 3) * np.array([0.8, 1.1, 0.8])  # verge
        road_top = int(cfg.sidewalks[0][0] * h)
        road_bottom = int(cfg.sidewalks[1][0] * h) - int(0.1 * h)
        grey = float(rng.uniform(70, 115))
        img[road_top:road_bottom] = grey
        img[int(0.3 * h) : road_top] = grey + 45  # far pavement
        img[road_bottom:] = grey + 50  # near pavement
        for ground_frac, _ in cfg.lanes[:-1]:
            y = int(ground_frac * h) + int(0.03 * h)
            for x in range(0, w, 80):
                img[y : y + 4, x : x + 44] = 225
        texture = rng.normal(0, 4, (h, w, 1)).astype(np.float32)
        return np.clip(img + texture, 0, 255).astype(np.uint8)

    def _sprite_at(self, mover: _Mover, t: int) -> Sprite:
        if mover.sprite is not None:
            return mover.sprite
        phase = (abs(mover.speed) * t / max(1.0, 0.5 * mover.height_px)) % 1.0
        return draw_person(mover.height_px, phase, mover.person_colours)

    def render(self, t: int) -> tuple[np.ndarray, list[ObjectTruth], np.ndarray]:
        """Frame `t` as BGR, the truth of every object at least partly in view, and the
        label map (object id of the topmost object per pixel, 0 for background)."""
        cfg = self.config
        frame = self._background.copy()
        labels = np.zeros((cfg.height, cfg.width), np.int32)
        placed: list[tuple[_Mover, Sprite, int, int, np.ndarray]] = []
        for mover in self._movers:
            sprite = self._sprite_at(mover, t)
            sh, sw = sprite.mask.shape
            x = (
                round(mover.left(t))
                if mover.sprite is not None
                else round((mover.left(t) % (cfg.width + sw)) - sw)
            )
            y = mover.ground_y - sh + 1
            fx1, fy1, fx2, fy2 = (
                max(x, 0),
                max(y, 0),
                min(x + sw, cfg.width),
                min(y + sh, cfg.height),
            )
            if fx1 >= fx2 or fy1 >= fy2:
                continue
            sub_mask = sprite.mask[fy1 - y : fy2 - y, fx1 - x : fx2 - x]
            if not sub_mask.any():
                continue
            region = frame[fy1:fy2, fx1:fx2]
            region[sub_mask] = sprite.image[fy1 - y : fy2 - y, fx1 - x : fx2 - x][sub_mask]
            labels[fy1:fy2, fx1:fx2][sub_mask] = mover.object_id
            placed.append((mover, sprite, x, y, sub_mask))

        truths = []
        for mover, sprite, x, y, sub_mask in placed:
            ys, xs = np.nonzero(sub_mask)
            ox, oy = max(x, 0), max(y, 0)
            box = (
                int(ox + xs.min()),
                int(oy + ys.min()),
                int(ox + xs.max() + 1),
                int(oy + ys.max() + 1),
            )
            in_view = int(sub_mask.sum())
            visible = int((labels[box[1] : box[3], box[0] : box[2]] == mover.object_id).sum())
            plate_box = None
            if sprite.plate_box is not None:
                px1, py1, px2, py2 = sprite.plate_box
                pb = (px1 + x, py1 + y, px2 + x, py2 + y)
                if pb[0] >= 0 and pb[1] >= 0 and pb[2] <= cfg.width and pb[3] <= cfg.height:
                    plate_box = pb
            truths.append(
                ObjectTruth(
                    object_id=mover.object_id,
                    cls=mover.cls,
                    box=box,
                    body_type=mover.body_type,
                    colour=mover.colour,
                    plate=mover.plate,
                    plate_box=plate_box,
                    visible_fraction=round(visible / in_view, 4),
                    occluded=visible < in_view,
                    truncated=in_view < int(sprite.mask.sum()),
                )
            )
        return self._photometric(frame, t), truths, labels

    def _photometric(self, frame: np.ndarray, t: int) -> np.ndarray:
        style = self._style
        out = frame.astype(np.float32) * style["gain"] * style["tint"] + style["bias"]
        if style["blur"] > 0:
            out = cv2.GaussianBlur(out, (0, 0), style["blur"])
        if style["noise"] > 0:
            noise_rng = np.random.default_rng((self.seed, t))
            out += noise_rng.normal(0, style["noise"], out.shape[:2])[..., None]
        return np.clip(out, 0, 255).astype(np.uint8)

    def frames(self) -> Iterator[tuple[int, np.ndarray, list[ObjectTruth]]]:
        for t in range(self.n_frames):
            image, truths, _ = self.render(t)
            yield t, image, truths
