"""Detection metrics (pure numpy): IoU matching and VOC-style all-point AP."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graph.common.vision import iou_matrix

__all__ = ["average_precision", "id_switches", "iou_matrix", "match_image"]


def match_image(
    pred: np.ndarray,
    scores: np.ndarray,
    gt: np.ndarray,
    ignore: np.ndarray,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy match by score. Returns per prediction: 1 = true positive, 0 = false
    positive, -1 = matched an ignored (barely visible) object and so counts as neither."""
    order = np.argsort(-scores, kind="stable")
    outcome = np.zeros(len(pred), np.int8)
    taken = np.zeros(len(gt), bool)
    ious = iou_matrix(pred, gt)
    for i in order:
        if len(gt) == 0:
            break
        candidates = np.where(~taken, ious[i], -1.0)
        j = int(candidates.argmax())
        if candidates[j] >= iou_threshold:
            taken[j] = True
            outcome[i] = -1 if ignore[j] else 1
        elif (ious[i][ignore] >= iou_threshold).any():
            outcome[i] = -1
    return outcome, taken


def average_precision(scores: Sequence[float], outcomes: Sequence[int], n_gt: int) -> float:
    """All-point interpolated AP over the pooled predictions of a whole dataset."""
    if n_gt == 0:
        return float("nan")
    s, o = np.asarray(scores, np.float64), np.asarray(outcomes, np.int8)
    keep = o >= 0
    s, o = s[keep], o[keep]
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(o[order] == 1)
    fp = np.cumsum(o[order] == 0)
    recall = np.concatenate([[0.0], tp / n_gt, [1.0]])
    precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def id_switches(
    truth_frames: Sequence[Sequence[tuple[int, tuple[float, float, float, float]]]],
    track_frames: Sequence[Sequence[tuple[int, tuple[float, float, float, float]]]],
    iou_threshold: float = 0.5,
) -> tuple[int, int]:
    """ID switches of a tracker against ground truth, as in CLEAR-MOT: per frame each
    truth object is matched (greedy by IoU) to a track; a switch is counted whenever an
    object's matched track differs from the one it last matched. Returns (switches,
    number of distinct truth objects that were ever matched)."""
    last: dict[int, int] = {}
    switches = 0
    for truths, tracks in zip(truth_frames, track_frames, strict=True):
        if not truths or not tracks:
            continue
        ious = iou_matrix(
            np.array([b for _, b in truths], np.float32).reshape(-1, 4),
            np.array([b for _, b in tracks], np.float32).reshape(-1, 4),
        )
        pairs = sorted(
            ((ious[i, j], i, j) for i in range(len(truths)) for j in range(len(tracks))),
            reverse=True,
        )
        used_t: set[int] = set()
        used_k: set[int] = set()
        for iou, i, j in pairs:
            if iou < iou_threshold:
                break
            if i in used_t or j in used_k:
                continue
            used_t.add(i)
            used_k.add(j)
            obj, track = truths[i][0], tracks[j][0]
            if obj in last and last[obj] != track:
                switches += 1
            last[obj] = track
    return switches, len(last)
