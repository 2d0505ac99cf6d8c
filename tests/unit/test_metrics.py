"""AP and matching used by the model card's scores."""

import numpy as np
import pytest

from demo.metrics import average_precision, iou_matrix, match_image


def test_iou_matrix_of_known_boxes() -> None:
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], float)
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150], [0.0, 0.0]])


def test_perfect_detections_give_ap_one() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float)
    outcome, taken = match_image(gt, np.array([0.9, 0.8]), gt, np.zeros(2, bool))
    assert outcome.tolist() == [1, 1] and taken.all()
    assert average_precision([0.9, 0.8], outcome.tolist(), 2) == pytest.approx(1.0)


def test_a_confident_false_positive_halves_precision_at_first_recall() -> None:
    # ranked: FP (0.95), TP (0.9); one object → precision 0.5 at recall 1.
    assert average_precision([0.95, 0.9], [0, 1], 1) == pytest.approx(0.5)
    # a missed object halves the reachable recall
    assert average_precision([0.9], [1], 2) == pytest.approx(0.5)


def test_duplicates_are_false_positives_and_ignored_objects_count_as_neither() -> None:
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float)
    ignore = np.array([False, True])
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]], float)
    outcome, taken = match_image(pred, np.array([0.9, 0.8, 0.7]), gt, ignore)
    assert outcome.tolist() == [1, 0, -1]
    assert taken.tolist() == [True, True]
    assert average_precision([0.9, 0.8, 0.7], outcome.tolist(), 1) == pytest.approx(1.0)
