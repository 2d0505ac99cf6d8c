"""Pure pre/post-processing for YOLO detectors: letterbox, output decoding, NMS.

The arithmetic follows Ultralytics (LetterBox, non_max_suppression, scale_boxes) so that
camgraph's boxes match `ultralytics.YOLO(...).predict` for the same model and image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from graph.common.errors import BadImageError, InferenceError

PAD_VALUE = 114
CLASS_OFFSET_PX = 7680.0  # Ultralytics' max_wh: separates classes for class-aware NMS
MAX_NMS_CANDIDATES = 30_000
# Camera frames and uploads are letterboxed to a multiple of this, not to the full square
# (`letterbox(..., stride=RECT_STRIDE)`); an engine pads a batch further where its model
# needs it (`stack_padded`): a fixed input size, a stride of 64, TensorRT's one shape.
RECT_STRIDE = 32

Box = tuple[float, float, float, float]  # x1 y1 x2 y2


def cut_by_edge(box: Box, bounds: Box, axis: int, margin: float) -> bool:
    """Whether `box` reaches an edge of `bounds` (the image, or the part of it the
    detector saw) along `axis` (0: left/right, 1: top/bottom), within `margin` pixels:
    part of the object may be out of view."""
    return box[axis] <= bounds[axis] + margin or box[axis + 2] >= bounds[axis + 2] - margin


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the model input: per-axis gain and top-left padding."""

    orig_h: int
    orig_w: int
    gain_x: float
    gain_y: float
    pad_left: int
    pad_top: int


@dataclasses.dataclass(frozen=True)
class DetectParams:
    """Per-request decoding parameters (Ultralytics' predict defaults)."""

    conf: float = 0.25
    iou: float = 0.7
    classes: tuple[int, ...] | None = None
    max_det: int = 300


def letterbox(
    image: np.ndarray, size: int | tuple[int, int] = 640, stride: int | None = None
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio and pad to `size` (h, w) with grey, centred. With
    `stride`, pad only up to the next multiple of it (Ultralytics' `LetterBox(auto=True)`,
    what `predict` feeds a model that takes any input size): a 16:9 frame becomes
    640x384 instead of 640x640, 0.6 of the pixels and of the inference time."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    new_h, new_w = (size, size) if isinstance(size, int) else size
    h, w = image.shape[:2]
    r = min(new_h / h, new_w / w)
    unpad_w, unpad_h = max(round(w * r), 1), max(round(h * r), 1)
    pad_w, pad_h = new_w - unpad_w, new_h - unpad_h
    if stride:
        pad_w, pad_h = pad_w % stride, pad_h % stride
    dw, dh = pad_w / 2, pad_h / 2
    if (w, h) != (unpad_w, unpad_h):
        image = cv2.resize(image, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    out = cv2.copyMakeBorder(
        image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    return out, Letterbox(h, w, unpad_w / w, unpad_h / h, left, top)


def unletterbox_boxes(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Map xyxy boxes from model-input pixels back to original pixels, clipped to the image."""
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, [0, 2]] = (out[:, [0, 2]] - lb.pad_left) / lb.gain_x
    out[:, [1, 3]] = (out[:, [1, 3]] - lb.pad_top) / lb.gain_y
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, lb.orig_w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, lb.orig_h)
    return out


def letterbox_boxes(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """The inverse of `unletterbox_boxes` (without clipping): original → model-input pixels."""
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, [0, 2]] = out[:, [0, 2]] * lb.gain_x + lb.pad_left
    out[:, [1, 3]] = out[:, [1, 3]] * lb.gain_y + lb.pad_top
    return out


def crop_square(
    image: np.ndarray, box: tuple[int, int, int, int], size: int, pad_fraction: float = 0.04
) -> np.ndarray:
    """Crop `box` with a little context and letterbox it into a `size` square (grey pad):
    the classifier input, so long vehicles (buses) are never cut by a centre crop."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)
    px, py = int((x2 - x1) * pad_fraction), int((y2 - y1) * pad_fraction)
    x1, y1, x2, y2 = max(0, x1 - px), max(0, y1 - py), min(w, x2 + px), min(h, y2 + py)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty crop box {box} in a {w}x{h} image")
    crop = image[y1:y2, x1:x2]
    scale = size / max(crop.shape[:2])
    new_w, new_h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    resized = cv2.resize(crop, (new_w, new_h), interpolation=cv2.INTER_AREA)
    out = np.full((size, size, 3), PAD_VALUE, np.uint8)
    oy, ox = (size - new_h) // 2, (size - new_w) // 2
    out[oy : oy + new_h, ox : ox + new_w] = resized
    return out


def stack_padded(
    images: Sequence[np.ndarray], shape: tuple[int, int] | None = None, stride: int = 1
) -> np.ndarray:
    """One BxHxWx3 batch of letterboxed images that may differ in size (cameras of other
    aspect ratios in one batch): each is padded grey at its bottom and right, which
    leaves every box coordinate as it is, to `shape` (a model's fixed input) or else to
    the batch's largest height and width rounded up to `stride`. ValueError for an
    image larger than `shape`."""
    if not images:
        raise ValueError("an empty batch")
    for im in images:
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8 images, got {im.dtype} {im.shape}")
    if shape is None:
        high = max(im.shape[0] for im in images)
        wide = max(im.shape[1] for im in images)
        shape = (-(-high // stride) * stride, -(-wide // stride) * stride)
    if all(im.shape[:2] == shape for im in images):
        return np.stack(images)
    out = np.full((len(images), *shape, 3), PAD_VALUE, np.uint8)
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        if h > shape[0] or w > shape[1]:
            raise ValueError(f"image {im.shape} does not fit the model input {shape}")
        out[i, :h, :w] = im
    return out


def check_fits(image: np.ndarray, imgsz: int) -> None:
    """InferenceError unless `image` is a letterboxed HxWx3 uint8 frame of at most
    `imgsz` a side: checked per frame before it joins a batch, where one wrong frame
    would fail (or, larger, pad up) every camera's frame in it."""
    shape: tuple[int, ...] = tuple(getattr(image, "shape", ()))
    if getattr(image, "dtype", None) != np.uint8 or len(shape) != 3 or shape[2] != 3:
        raise InferenceError(f"expected an HxWx3 uint8 frame, got {shape}")
    if shape[0] > imgsz or shape[1] > imgsz:
        raise InferenceError(f"a {shape[1]}x{shape[0]} frame is larger than the model's {imgsz}")


def to_model_input(batch: np.ndarray) -> np.ndarray:
    """BxHxWx3 uint8 BGR → Bx3xHxW float32 RGB in [0, 1], contiguous."""
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(f"expected a BxHxWx3 uint8 batch, got {batch.dtype} {batch.shape}")
    chw = batch[..., ::-1].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(chw, dtype=np.float32) * np.float32(1 / 255)


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    out = np.empty_like(xywh)
    half_w, half_h = xywh[:, 2] / 2, xywh[:, 3] / 2
    out[:, 0], out[:, 1] = xywh[:, 0] - half_w, xywh[:, 1] - half_h
    out[:, 2], out[:, 3] = xywh[:, 0] + half_w, xywh[:, 1] + half_h
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (N, 4) x (M, 4) (torchvision's definition: no +1)."""
    a, b = np.asarray(a).reshape(-1, 4), np.asarray(b).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None] - inter
    return inter / np.maximum(union, np.finfo(union.dtype).tiny if union.size else 1.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, highest score first (as torchvision.ops.nms)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[iou_matrix(boxes[best], boxes[rest])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def decode_yolo(raw: np.ndarray, params: DetectParams) -> np.ndarray:
    """Decode one image's YOLOv8/YOLO11 output (4 + nc, N) into (K, 6) rows of
    x1, y1, x2, y2, confidence, class_id, best first, in model-input pixels."""
    if raw.ndim != 2 or raw.shape[0] < 5:
        raise ValueError(f"expected a (4 + classes, N) YOLO output, got shape {raw.shape}")
    class_scores = raw[4:]
    cls = class_scores.argmax(0)
    conf = class_scores[cls, np.arange(raw.shape[1])]
    keep = conf > params.conf
    if params.classes is not None:
        keep &= np.isin(cls, params.classes)
    idx = np.nonzero(keep)[0]
    if idx.size == 0:
        return np.zeros((0, 6), np.float32)
    if idx.size > MAX_NMS_CANDIDATES:
        idx = idx[np.argsort(-conf[idx], kind="stable")[:MAX_NMS_CANDIDATES]]
    boxes = xywh_to_xyxy(raw[:4, idx].T.astype(np.float32))
    scores, labels = conf[idx].astype(np.float32), cls[idx]
    kept = nms(boxes + labels[:, None].astype(np.float32) * CLASS_OFFSET_PX, scores, params.iou)
    kept = kept[: params.max_det]
    return np.concatenate(
        [boxes[kept], scores[kept, None], labels[kept, None].astype(np.float32)], axis=1
    )


def decode_batch(raw: np.ndarray, params: Sequence[DetectParams]) -> list[np.ndarray]:
    """Decode a (B, 4 + nc, N) batch output with each image's own parameters."""
    if raw.ndim != 3 or raw.shape[0] != len(params):
        raise ValueError(f"output shape {raw.shape} does not fit a batch of {len(params)}")
    return [decode_yolo(raw[i], p) for i, p in enumerate(params)]


def header_pixels(data: bytes) -> int | None:
    """Width x height from the image header alone (no decode), or None if unknown."""
    import io
    import re
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return int(image.width) * int(image.height)
    except Image.DecompressionBombError as exc:  # past 2 × PIL's own limit: the size
        size = re.search(r"\((\d+) pixels\)", str(exc))
        return int(size.group(1)) if size else 2**62
    except (UnidentifiedImageError, OSError, ValueError, ImportError):
        # ImportError: a PIL plugin registered by another library (ultralytics' HEIF
        # opener) whose module is missing; the format is simply unknown here.
        return None


def decode_image(data: bytes) -> np.ndarray | None:
    """BGR image from encoded bytes, or None when OpenCV cannot decode them."""
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # e.g. over OpenCV's own pixel limit
        return None
    return image if image is not None and image.size else None


def check_header(data: bytes, max_pixels: int) -> None:
    """BadImageError unless the upload's header names an image of at most `max_pixels`:
    a small file that would decode to gigapixels is refused before any decoding."""
    pixels = header_pixels(data)
    if pixels is None:  # a format whose size cannot be read before decoding (e.g. HDR)
        raise BadImageError("the upload is not a decodable image")
    if pixels > max_pixels:
        raise BadImageError(f"the image has {pixels} pixels, more than the limit of {max_pixels}")


def decode_letterboxed(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, Letterbox]:
    """An uploaded image decoded and letterboxed, or BadImageError saying why not (its
    header is checked first, see `check_header`)."""
    check_header(data, max_pixels)
    image = decode_image(data)
    if image is None:
        raise BadImageError("the upload is not a decodable image")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise BadImageError(f"the image has more pixels than the limit of {max_pixels}")
    return letterbox(image, size, RECT_STRIDE)
