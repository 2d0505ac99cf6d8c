"""What every phase measures and how: per-camera counters over a window, CPU and memory
of the phase's processes, and the result record the report is made from."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from benchmarks.stats import (
    DropAccount,
    LatencySummary,
    fairness,
    growth,
    summarize_latency,
    total_account,
)


@dataclass
class CameraResult:
    """One camera over the measured window. `latencies_ms` are capture → detection."""

    camera: str
    account: DropAccount
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.account.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def offered_fps(self) -> float:
        return self.account.offered / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "camera": self.camera,
            "fps": round(self.fps, 3),
            "offered_fps": round(self.offered_fps, 3),
            "offered": self.account.offered,
            "processed": self.account.processed,
            "drops": dict(self.account.drops),
            "in_flight": self.account.in_flight,
            "unaccounted": self.account.unaccounted,
            "latency": _rounded(asdict(summarize_latency(self.latencies_ms))),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> CameraResult:
        """From a worker process's plain dict (`camera`, `offered`, `processed`, ...)."""
        account = DropAccount(
            int(data["offered"]),
            int(data["processed"]),
            {str(k): int(v) for k, v in data.get("drops", {}).items()},
            int(data.get("in_flight", 0)),
            int(data.get("tolerance", 0)),
        )
        return CameraResult(
            str(data["camera"]),
            account,
            float(data["seconds"]),
            [float(x) for x in data.get("latencies_ms", [])],
        )


@dataclass
class Usage:
    """CPU (% of one core, summed over processes) and RSS of a set of processes."""

    cpu_pct: float | None = None
    rss_start_bytes: int | None = None
    rss_end_bytes: int | None = None
    rss_max_bytes: int | None = None
    rss_growth: float | None = None  # last third / first third of the samples
    processes: int = 0
    samples: int = 0
    cpu_pct_by_role: dict[str, float] = field(default_factory=dict)  # where the cores went


@dataclass
class PhaseResult:
    """One phase: a system (raw, seed, ultralytics, camgraph) at N cameras in one mode."""

    name: str
    system: str  # "raw" | "seed" | "ultralytics" | "camgraph"
    mode: str  # "realtime" | "saturation"
    cameras: int
    seconds: float
    per_camera: list[CameraResult] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    background: Usage | None = None  # e.g. an idle Ray cluster during a baseline
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def fps(self) -> float:
        return sum(c.fps for c in self.per_camera)

    @property
    def offered_fps(self) -> float:
        return sum(c.offered_fps for c in self.per_camera)

    @property
    def account(self) -> DropAccount:
        return total_account(c.account for c in self.per_camera)

    @property
    def latency(self) -> LatencySummary:
        return summarize_latency([x for c in self.per_camera for x in c.latencies_ms])

    @property
    def fairness(self) -> float | None:
        return fairness([c.fps for c in self.per_camera]) if self.cameras > 1 else None

    def to_json(self) -> dict[str, Any]:
        account = self.account
        return {
            "name": self.name,
            "system": self.system,
            "mode": self.mode,
            "cameras": self.cameras,
            "seconds": round(self.seconds, 2),
            "fps": round(self.fps, 3),
            "offered_fps": round(self.offered_fps, 3),
            "fairness": _round(self.fairness),
            "latency_capture_to_detection": _rounded(asdict(self.latency)),
            "drops": dict(account.drops),
            "accounting": {
                "offered": account.offered,
                "processed": account.processed,
                "dropped": account.dropped,
                "in_flight": account.in_flight,
                "unaccounted": account.unaccounted,
                "tolerance": account.tolerance,
                "balanced": account.balanced,
            },
            "usage": _rounded(asdict(self.usage)),
            "background": _rounded(asdict(self.background)) if self.background else None,
            "per_camera": [c.to_json() for c in self.per_camera],
            "extra": self.extra,
            "notes": self.notes,
            "error": self.error,
        }


def _round(x: float | None, digits: int = 3) -> float | None:
    return round(x, digits) if x is not None else None


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _round(v) if isinstance(v, float) else v for k, v in d.items()}


class ProcessSampler:
    """Samples CPU time and RSS of the processes `select()` returns, in a thread.

    CPU % is the CPU seconds used between the first and the last sample over the wall
    time between them (100 = one core); a process that appeared in between counts
    from 0 when it was created after the first sample, else from its first sighting."""

    def __init__(
        self, select: Callable[[], Iterable[psutil.Process]], interval_s: float = 0.5
    ) -> None:
        self._select = select
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._rss: list[int] = []
        self._roles: dict[int, str] = {}
        self._t0: float | None = None
        self._t1: float | None = None

    def _sample(self) -> None:
        now = time.time()
        rss = 0
        for proc in self._select():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    cpu = times.user + times.system
                    rss += proc.memory_info().rss
                    created = proc.create_time()
                    if proc.pid not in self._roles:
                        self._roles[proc.pid] = process_role(proc.name(), proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if proc.pid not in self._first:
                born_inside = self._t0 is not None and created >= self._t0
                self._first[proc.pid] = 0.0 if born_inside else cpu
            self._last[proc.pid] = cpu
        if self._t0 is None:
            self._t0 = now
        self._t1 = now
        self._rss.append(rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def start(self) -> ProcessSampler:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Usage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        wall = (self._t1 or 0.0) - (self._t0 or 0.0)
        cpu_s = sum(self._last[p] - self._first[p] for p in self._last)
        roles: dict[str, float] = {}
        for pid in self._last:
            role = self._roles.get(pid, "?")
            roles[role] = roles.get(role, 0.0) + self._last[pid] - self._first[pid]
        return Usage(
            cpu_pct=100 * cpu_s / wall if wall > 0 else None,
            rss_start_bytes=self._rss[0] if self._rss else None,
            rss_end_bytes=self._rss[-1] if self._rss else None,
            rss_max_bytes=max(self._rss) if self._rss else None,
            rss_growth=growth([float(x) for x in self._rss]),
            processes=len(self._last),
            samples=len(self._rss),
            cpu_pct_by_role={
                r: round(100 * t / wall, 1)
                for r, t in sorted(roles.items(), key=lambda kv: -kv[1])
                if wall > 0
            },
        )


def pids_selector(pids: Iterable[int]) -> Callable[[], list[psutil.Process]]:
    """The given processes (and none other), as long as they live."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return lambda: [p for p in procs if p.is_running()]


def process_role(name: str, cmdline: list[str]) -> str:
    """What a process is for, from its title: a Ray worker's actor
    (`ServeReplica:camgraph:Detector_x`, `CameraActor`, `ProxyActor`...), `raylet`,
    `gcs_server`, or the script a Python helper runs (`dashboard.py`, `agent.py`...)."""
    first = cmdline[0] if cmdline else name
    if first.startswith("ray::"):
        return first[5:].split(" ")[0].split(".")[0] or "ray::"
    if name in ("raylet", "gcs_server"):
        return name
    scripts = [a.rsplit("/", 1)[-1] for a in cmdline[1:] if a.endswith(".py")]
    return scripts[0] if scripts else name


def is_ray_process(name: str, cmdline: list[str]) -> bool:
    """Raylet, GCS, dashboard, log monitor and every Ray worker (`ray::...`)."""
    if name in ("raylet", "gcs_server") or name.startswith("ray::"):
        return True
    if not cmdline:
        return False
    if cmdline[0].startswith("ray::"):
        return True
    return any(
        "/site-packages/ray/" in arg or arg.endswith(("/raylet", "/gcs_server")) for arg in cmdline
    )


def ray_selector(refresh_s: float = 2.0) -> Callable[[], list[psutil.Process]]:
    """The local Ray cluster's processes, rescanned every `refresh_s` (actors come and
    go; scanning every process on every sample would cost more than it measures)."""
    cache: list[psutil.Process] = []
    scanned = [0.0]

    def select() -> list[psutil.Process]:
        now = time.monotonic()
        if now - scanned[0] >= refresh_s:
            found = []
            for proc in psutil.process_iter(["name", "cmdline"]):
                try:
                    if is_ray_process(proc.info["name"] or "", proc.info["cmdline"] or []):
                        found.append(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            cache[:] = found
            scanned[0] = now
        return [p for p in cache if p.is_running()]

    return select
