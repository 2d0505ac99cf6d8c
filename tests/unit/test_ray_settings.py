"""The lean Ray settings (graph/ray_settings.py) against Ray's own definitions, and the
pure parts of `make bench-ray` (benchmarks/ray_overhead.py) on real processes."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.ray_overhead import Round, Window, cluster_selector, render, stop_cluster
from graph import ray_settings
from graph.ray_settings import LEAN_ENV, LEAN_START_FLAGS, env_assignments


def test_every_lean_start_flag_is_an_option_of_ray_start() -> None:
    from ray.scripts.scripts import start

    options = {opt for param in start.params for opt in param.opts}
    for flag in LEAN_START_FLAGS:
        assert flag.split("=", 1)[0] in options


def test_every_lean_variable_is_read_by_ray_serve() -> None:
    # A misspelt name would be ignored by Ray without a word: each must be one that
    # Serve's constants read from the environment.
    import ray.serve._private.constants as constants

    source = Path(constants.__file__).read_text()
    for name in LEAN_ENV:
        assert f'"{name}"' in source, name


def test_lean_values_parse_as_ray_reads_them() -> None:
    assert float(LEAN_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]) > 0
    assert int(LEAN_ENV["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]) > 0


def test_the_operators_value_wins() -> None:
    text = env_assignments({"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.2"})
    pairs = dict(item.split("=", 1) for item in text.split())
    assert pairs["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.2"
    assert pairs["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"
    assert set(pairs) == set(LEAN_ENV)


def test_cli_prints_env_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert ray_settings.main(["flags"]) == 0
    assert capsys.readouterr().out.split() == list(LEAN_START_FLAGS)
    assert ray_settings.main(["env"]) == 0
    assert "RAY_SERVE_CONTROL_LOOP_INTERVAL_S=" in capsys.readouterr().out
    assert ray_settings.main(["nonsense"]) == 2


def test_window_per_frame_and_background() -> None:
    w = Window(
        seconds=30.0,
        cpu_pct=150.0,
        by_role={"raylet": 10.0, "ServeController": 4.0, "CameraActor": 60.0},
        frames=300,
    )
    assert w.background_pct == pytest.approx(14.0)
    assert w.cpu_ms_per_frame == pytest.approx(150.0)  # 1.5 cores x 30 s / 300 frames
    assert Window(seconds=30.0, cpu_pct=10.0, by_role={}).cpu_ms_per_frame is None


def test_render_compares_the_variants_per_role() -> None:
    def rnd(variant: str, raylet: float) -> Round:
        idle = Window(
            20.0,
            20.0,
            {
                "raylet": raylet,
                "log_monitor.py": 2.0,
                "ray-dashboard-ServeHead-0": 0.5,
                "ray-dashboard-NodeHead-0": 0.5,
                "CameraActor": 5.0,
            },
        )
        busy = Window(30.0, 120.0, {"raylet": raylet * 2}, frames=240)
        return Round(variant=variant, idle=idle, busy=busy)

    text = render(
        [rnd("defaults", 6.0), rnd("lean", 4.0), rnd("defaults", 8.0)],
        {"date": "2026-12-04", "environment": "test box", "idle_s": 20, "busy_s": 30},
    )
    assert "| defaults | 20.0 | 10.0 | 120.0 | 14.0 | 8.00 | 150.0 |" in text
    assert "| lean | 20.0 | 7.0 | 120.0 | 8.0 | 8.00 | 150.0 |" in text
    assert "| raylet | 7.0 / 14.0 | 4.0 / 8.0 |" in text
    assert "| dashboard modules | 1.0 / 0.0 | 1.0 / 0.0 |" in text  # grouped
    assert "CameraActor" not in text  # camgraph's own, not Ray's


def test_cluster_selector_finds_the_tree_and_stop_kills_it() -> None:
    # A parent that names the cluster's temp dir on its command line, with a child that
    # does not (as a raylet and its workers), and an outsider that must survive.
    with tempfile.TemporaryDirectory(prefix="cgray-test-") as temp_dir:
        script = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
        parent = subprocess.Popen([sys.executable, "-c", script, f"--temp-dir={temp_dir}"])
        outsider = subprocess.Popen(["sleep", "60"])
        try:
            select = cluster_selector(temp_dir)
            deadline = time.monotonic() + 10
            while True:
                pids = {p.pid for p in select()}
                if len(pids) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(2.1)  # the selector rescans every 2 s
            assert parent.pid in pids and len(pids) == 2
            assert outsider.pid not in pids
            children = psutil.Process(parent.pid).children()
            assert stop_cluster(select, timeout_s=5) == 0
            assert parent.wait(timeout=5) is not None
            assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
            assert outsider.poll() is None
        finally:
            for proc in (parent, outsider):
                proc.kill()
                proc.wait()
