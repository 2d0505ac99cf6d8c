"""The benchmark's arithmetic against hand-computed values (no timing involved)."""

import math

import numpy as np
import pytest

from benchmarks.stats import (
    BatchDistribution,
    DropAccount,
    check,
    fairness,
    growth,
    percentile,
    ratio,
    summarize_latency,
    total_account,
)


@pytest.mark.parametrize(
    "values",
    [[5.0], [1.0, 2.0], [3.0, 1.0, 2.0, 10.0], [float(x) for x in range(1, 101)], [7.5] * 4],
)
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_equals_numpy_default(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_interpolates_linearly_between_ranks() -> None:
    # sorted [10, 20, 30, 40]: rank (4 - 1) * 0.5 = 1.5 → halfway between 20 and 30
    assert percentile([40, 10, 30, 20], 50) == 25
    # rank 3 * 0.95 = 2.85 → 30 + 0.85 * 10
    assert percentile([10, 20, 30, 40], 95) == pytest.approx(38.5)


def test_percentile_refuses_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_of_known_values() -> None:
    s = summarize_latency([100.0, 200.0, 300.0, 400.0, 1000.0])
    # ranks: p50 → 2 (300); p95 → 3.8 (400 + 0.8 * 600); p99 → 3.96 (400 + 0.96 * 600)
    assert s.count == 5
    assert s.p50_ms == 300
    assert s.p95_ms == pytest.approx(880)
    assert s.p99_ms == pytest.approx(976)
    assert s.mean_ms == 400
    assert s.max_ms == 1000


def test_latency_summary_of_nothing_is_empty_not_zero() -> None:
    s = summarize_latency([])
    assert s.count == 0
    assert s.p50_ms is None and s.p99_ms is None and s.mean_ms is None and s.max_ms is None


def test_ratio_says_why_it_is_missing() -> None:
    assert ratio(15.0, 20.0).value == 0.75
    assert str(ratio(15.0, 20.0)) == "0.75x"
    assert ratio(0.0, 20.0).value == 0.0
    zero = ratio(15.0, 0.0)
    assert zero.value is None and zero.note == "baseline is 0"
    assert ratio(15.0, None).note == "no baseline"
    assert ratio(None, 20.0).note == "not measured"
    assert str(zero) == "n/a (baseline is 0)"


def test_drop_account_balances_when_every_frame_is_placed() -> None:
    # 100 read: 60 processed, 30 superseded, 8 too old, 2 still held at the end
    books = DropAccount(100, 60, {"superseded": 30, "too_old": 8}, in_flight=2)
    assert books.dropped == 38
    assert books.unaccounted == 0
    assert books.balanced
    assert books.drop_fraction == pytest.approx(0.38)


def test_drop_account_flags_lost_frames_beyond_the_tolerance() -> None:
    lost_three = DropAccount(100, 60, {"superseded": 37})
    assert lost_three.unaccounted == 3
    assert not lost_three.balanced
    assert DropAccount(100, 60, {"superseded": 37}, tolerance=3).balanced
    # counted twice (more placed than offered) is as wrong as lost
    assert DropAccount(10, 8, {"superseded": 5}, tolerance=2).unaccounted == -3
    assert not DropAccount(10, 8, {"superseded": 5}, tolerance=2).balanced


def test_drop_accounts_add_up_per_reason() -> None:
    total = total_account(
        [
            DropAccount(10, 5, {"superseded": 5}, tolerance=2),
            DropAccount(20, 10, {"superseded": 7, "back_pressure": 2}, in_flight=1, tolerance=2),
        ]
    )
    assert (total.offered, total.processed, total.in_flight, total.tolerance) == (30, 15, 1, 4)
    assert total.drops == {"back_pressure": 2, "superseded": 12}
    assert total.unaccounted == 0
    assert DropAccount(0, 0).drop_fraction is None


def test_batch_distribution_from_sizes() -> None:
    d = BatchDistribution.from_sizes([1, 2, 2, 4, 1, 2])
    assert d.counts == {1: 2, 2: 3, 4: 1}
    assert d.batches == 6
    assert d.images == 12
    assert d.mean == 2.0
    # images in batches of 1: 2, of 2: 6, of 4: 4 → (1*2 + 2*6 + 4*4) / 12
    assert d.image_weighted_mean == pytest.approx(30 / 12)
    assert d.shares() == {1: pytest.approx(1 / 3), 2: 0.5, 4: pytest.approx(1 / 6)}
    with pytest.raises(ValueError):
        BatchDistribution.from_sizes([0])


def test_batch_distribution_from_the_detectors_histogram() -> None:
    # Detector.stats()["batch_sizes"] after a JSON round trip: text keys
    d = BatchDistribution.from_histogram({"1": 10, "3": 2, "2": 0})
    assert d.counts == {1: 10, 3: 2}
    assert d.images == 16
    assert d.mean == pytest.approx(16 / 12)


def test_fairness_is_min_over_max() -> None:
    assert fairness([1.0, 0.8, 0.9]) == pytest.approx(0.8)
    assert fairness([2.0]) == 1.0
    assert fairness([]) is None
    assert fairness([0.0, 0.0]) is None


def test_growth_compares_the_last_third_with_the_first() -> None:
    assert growth([100, 100, 100, 110, 110, 110]) == pytest.approx(1.1)
    # 7 samples: thirds of 2 → (100 + 102) / 2 vs (120 + 122) / 2
    assert growth([100, 102, 500, 500, 500, 120, 122]) == pytest.approx(121 / 101)
    assert growth([1, 2]) is None
    assert growth([0, 0, 0]) is None


def test_targets_pass_fail_and_not_measured() -> None:
    at_least = check("camgraph / raw", 0.92, ">=", 0.9)
    assert at_least.passed and at_least.verdict == "PASS"
    assert at_least.line() == "PASS camgraph / raw: 0.92 (target >= 0.9)"
    below = check("camgraph / raw", 0.72, ">=", 0.9, "2 replicas x 1 thread")
    assert below.passed is False
    assert below.line() == "FAIL camgraph / raw: 0.72 (target >= 0.9)  (2 replicas x 1 thread)"
    assert check("p99 / single", 3.0, "<=", 3.0).passed  # the bound itself passes
    assert check("p99 / single", 3.01, "<=", 3.0).passed is False
    missing = check("seed at 8", None, ">=", 1.5, "8-camera runs missing")
    assert missing.passed is None and missing.verdict == "N/A"
    assert missing.line() == "N/A  seed at 8: not measured (target >= 1.5)  (8-camera runs missing)"
    assert check("nan", math.nan, ">=", 1.0).passed is None
