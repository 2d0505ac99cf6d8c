"""Runs a baseline in spawned processes that start their warm-up at the same instant.

Each worker is a top-level function `fn(spec, ready) -> dict`: it loads its model and
opens its inputs, then calls `ready()`, which blocks until every worker is ready and
returns the shared start (wall clock). The worker warms up for `spec.warmup_s`,
measures for `spec.seconds`, and returns plain data (`{"cameras": [...], ...}`). The
parent samples the workers' CPU and memory over the measured window only.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from benchmarks.measure import ProcessSampler, Usage, pids_selector

READY_TIMEOUT_S = 180.0  # loading Ultralytics and 16 models on a busy box is slow
GRACE_S = 60.0  # a worker finishing its last inference after the window


class WorkerSpec(Protocol):
    @property
    def warmup_s(self) -> float: ...

    @property
    def seconds(self) -> float: ...


Worker = Callable[[Any, Callable[[], float]], dict[str, Any]]
Selector = Callable[[], Any]


@dataclass
class WorkersOutcome:
    results: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    background: Usage | None = None
    error: str | None = None


def _worker_main(fn: Worker, spec: Any, out: Any, go: Any, start_at: Any, index: int) -> None:
    def ready() -> float:
        out.put(("ready", index, os.getpid()))
        go.wait()
        return float(start_at.value)

    try:
        result = fn(spec, ready)
        out.put(("done", index, result))
    except BaseException:
        out.put(("error", index, traceback.format_exc()))
    finally:
        out.close()
        out.join_thread()
    os._exit(0)  # reader threads stuck in a read must not keep the process alive


def run_workers(
    fn: Worker,
    specs: Sequence[WorkerSpec],
    desc: str,
    background: Selector | None = None,
    progress: bool = True,
) -> WorkersOutcome:
    """Start one process per spec, release them together, gather their results."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_worker_main, args=(fn, s, out, go, start_at, i), daemon=True)
        for i, s in enumerate(specs)
    ]
    for p in procs:
        p.start()
    outcome = WorkersOutcome()
    try:
        pids = _await_ready(out, len(procs))
        warmup_s, seconds = specs[0].warmup_s, specs[0].seconds
        start_at.value = time.time() + 0.2
        go.set()
        measure_start = start_at.value + warmup_s
        end = measure_start + seconds
        sampler = ProcessSampler(pids_selector(pids))
        bg = ProcessSampler(background) if background is not None else None
        wait_window(start_at.value, measure_start, end, desc, progress, lambda: _start(sampler, bg))
        outcome.usage = sampler.stop()
        outcome.background = bg.stop() if bg is not None else None
        outcome.results = _await_done(out, len(procs), GRACE_S)
    except RuntimeError as exc:
        outcome.error = str(exc)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    return outcome


def _start(sampler: ProcessSampler, bg: ProcessSampler | None) -> None:
    sampler.start()
    if bg is not None:
        bg.start()


def _await_ready(out: Any, n: int) -> list[int]:
    pids: dict[int, int] = {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(pids) < n:
        kind, index, payload = _get(out, deadline, "workers to load")
        if kind == "error":
            raise RuntimeError(f"worker {index} failed while loading:\n{payload}")
        if kind == "ready":
            pids[index] = int(payload)
    return list(pids.values())


def _await_done(out: Any, n: int, grace_s: float) -> list[dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + grace_s
    while len(results) < n:
        kind, index, payload = _get(out, deadline, "workers to finish")
        if kind == "error":
            raise RuntimeError(f"worker {index} failed:\n{payload}")
        if kind == "done":
            results[index] = payload
    return [results[i] for i in sorted(results)]


def _get(out: Any, deadline: float, what: str) -> tuple[str, int, Any]:
    try:
        item: tuple[str, int, Any] = out.get(timeout=max(0.1, deadline - time.monotonic()))
    except queue.Empty:
        raise RuntimeError(f"timed out waiting for {what}") from None
    return item


def progress_bar(total_s: float, desc: str, enabled: bool) -> Any:
    """A seconds bar for one phase (warm-up + window)."""
    from tqdm import tqdm

    return tqdm(
        total=round(total_s),
        desc=desc,
        disable=not enabled,
        leave=False,
        bar_format="{desc}: {bar} {n:.0f}/{total:.0f} s",
    )


def wait_window(
    start: float,
    measure_start: float,
    end: float,
    desc: str,
    progress: bool,
    on_measure: Callable[[], None],
) -> None:
    """Sleep through warm-up and window (wall clock) with a progress bar, calling
    `on_measure` once the window starts."""
    bar = progress_bar(end - start, desc, progress)
    measuring = False
    try:
        while (now := time.time()) < end:
            if not measuring and now >= measure_start:
                on_measure()
                measuring = True
            bar.n = round(max(0.0, now - start), 1)
            bar.refresh()
            time.sleep(min(0.25, max(0.0, end - now)))
        if not measuring:
            on_measure()
    finally:
        bar.close()
