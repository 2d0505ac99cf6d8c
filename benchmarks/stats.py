"""The benchmark's arithmetic (pure, no I/O): percentiles, latency summaries, ratios,
drop accounting, batch-size distributions, fairness and PASS/FAIL targets.

Everything here is checked by hand-computed values in tests/unit/test_bench_stats.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Comparator = Literal[">=", "<="]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, numpy's default method; ValueError when empty."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    """Latencies in ms; every figure is None when nothing was measured."""

    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None


def summarize_latency(values_ms: Sequence[float]) -> LatencySummary:
    if not values_ms:
        return LatencySummary(0, None, None, None, None, None)
    return LatencySummary(
        count=len(values_ms),
        p50_ms=percentile(values_ms, 50),
        p95_ms=percentile(values_ms, 95),
        p99_ms=percentile(values_ms, 99),
        mean_ms=math.fsum(values_ms) / len(values_ms),
        max_ms=max(values_ms),
    )


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator, or None with the reason it cannot be computed."""

    value: float | None
    note: str = ""

    def __str__(self) -> str:
        return f"{self.value:.2f}x" if self.value is not None else f"n/a ({self.note})"


def ratio(numerator: float | None, denominator: float | None) -> Ratio:
    """A ratio that says why it is missing instead of dividing by zero or by nothing."""
    if numerator is None:
        return Ratio(None, "not measured")
    if denominator is None:
        return Ratio(None, "no baseline")
    if denominator == 0:
        return Ratio(None, "baseline is 0")
    return Ratio(numerator / denominator)


@dataclass(frozen=True)
class DropAccount:
    """Where the offered frames went: offered = processed + drops + in flight.

    `in_flight` is the net change of frames held between the window's two ends (read
    but neither processed nor dropped yet), when it is known; `tolerance` is how far
    the books may be off when it is not (e.g. max frames in flight + the pending slot).
    """

    offered: int
    processed: int
    drops: Mapping[str, int] = field(default_factory=dict)
    in_flight: int = 0
    tolerance: int = 0

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def unaccounted(self) -> int:
        return self.offered - self.processed - self.dropped - self.in_flight

    @property
    def balanced(self) -> bool:
        return abs(self.unaccounted) <= self.tolerance

    @property
    def drop_fraction(self) -> float | None:
        return self.dropped / self.offered if self.offered > 0 else None

    def __add__(self, other: DropAccount) -> DropAccount:
        reasons = set(self.drops) | set(other.drops)
        return DropAccount(
            self.offered + other.offered,
            self.processed + other.processed,
            {r: self.drops.get(r, 0) + other.drops.get(r, 0) for r in sorted(reasons)},
            self.in_flight + other.in_flight,
            self.tolerance + other.tolerance,
        )


def total_account(accounts: Iterable[DropAccount]) -> DropAccount:
    total = DropAccount(0, 0)
    for account in accounts:
        total = total + account
    return total


@dataclass(frozen=True)
class BatchDistribution:
    """Batches counted by their exact size."""

    counts: Mapping[int, int]

    @staticmethod
    def from_sizes(sizes: Iterable[int]) -> BatchDistribution:
        counts: dict[int, int] = {}
        for size in sizes:
            if size < 1:
                raise ValueError(f"a batch of {size} images")
            counts[size] = counts.get(size, 0) + 1
        return BatchDistribution(dict(sorted(counts.items())))

    @staticmethod
    def from_histogram(counts: Mapping[int | str, int | float]) -> BatchDistribution:
        """Exact per-size counts, e.g. the detector's `stats()["batch_sizes"]` (JSON
        turns its keys into text)."""
        merged: dict[int, int] = {}
        for size, n in counts.items():
            if int(n) > 0:
                merged[int(size)] = merged.get(int(size), 0) + int(n)
        return BatchDistribution(dict(sorted(merged.items())))

    @property
    def batches(self) -> int:
        return sum(self.counts.values())

    @property
    def images(self) -> int:
        return sum(size * n for size, n in self.counts.items())

    @property
    def mean(self) -> float | None:
        """Images per batch."""
        return self.images / self.batches if self.batches else None

    @property
    def image_weighted_mean(self) -> float | None:
        """The batch size the average image travelled in."""
        images = self.images
        return sum(size * size * n for size, n in self.counts.items()) / images if images else None

    def shares(self) -> dict[int, float]:
        """Fraction of batches at each size."""
        total = self.batches
        return {size: n / total for size, n in self.counts.items()} if total else {}


def fairness(per_camera_fps: Sequence[float]) -> float | None:
    """min / max of per-camera processed fps; None without cameras or when all are 0."""
    if not per_camera_fps:
        return None
    top = max(per_camera_fps)
    return min(per_camera_fps) / top if top > 0 else None


def growth(samples: Sequence[float]) -> float | None:
    """Mean of the last third / mean of the first third (memory "stays flat" near 1);
    None with fewer than 3 samples or a zero start."""
    if len(samples) < 3:
        return None
    third = len(samples) // 3
    first = math.fsum(samples[:third]) / third
    last = math.fsum(samples[-third:]) / third
    return last / first if first > 0 else None


@dataclass(frozen=True)
class Target:
    """One PASS/FAIL line. `passed` is None when the figure was not measured."""

    name: str
    measured: float | None
    threshold: float
    comparator: Comparator
    passed: bool | None
    note: str = ""

    @property
    def verdict(self) -> str:
        return "N/A" if self.passed is None else "PASS" if self.passed else "FAIL"

    def line(self) -> str:
        measured = "not measured" if self.measured is None else f"{self.measured:.3g}"
        note = f"  ({self.note})" if self.note else ""
        return (
            f"{self.verdict:4} {self.name}: {measured} "
            f"(target {self.comparator} {self.threshold:g}){note}"
        )


def check(
    name: str, measured: float | None, comparator: Comparator, threshold: float, note: str = ""
) -> Target:
    if measured is None or math.isnan(measured):
        return Target(name, None, threshold, comparator, None, note or "not measured")
    passed = measured >= threshold if comparator == ">=" else measured <= threshold
    return Target(name, measured, threshold, comparator, passed, note)
