"""The lean Ray settings (graph/ray_settings.py) against Ray's own definitions, and the
pure parts of `make bench-ray` (benchmarks/ray_overhead.py) on real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.ray_overhead import (
    Round,
    Window,
    cluster_processes,
    cluster_selector,
    render,
    stop_cluster,
)
from graph import ray_settings
from graph.ray_settings import LEAN_ENV, LEAN_START_FLAGS, env_assignments


def test_every_lean_start_flag_parses_as_ray_start_reads_it() -> None:
    from ray.scripts.scripts import start

    ctx = start.make_context("start", ["--head", *LEAN_START_FLAGS])
    assert ctx.params["include_log_monitor"] is False


def test_serve_reads_the_lean_environment() -> None:
    # A misspelt name would be ignored by Ray without a word: Serve's own constants,
    # imported in a process with the lean environment, must hold the lean values.
    code = (
        "import ray.serve._private.constants as c; "
        "print(c.CONTROL_LOOP_INTERVAL_S, c.RAY_SERVE_METRICS_EXPORT_INTERVAL_MS)"
    )
    env = {**os.environ, **LEAN_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [LEAN_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"], "1000"]


def test_ray_core_defines_each_lean_core_setting() -> None:
    # Ray's core reads RAY_<name> for each entry of its RayConfig (ray_config_def.h);
    # a misspelt name would be ignored without a word. Python cannot read these values
    # back, so the names are checked against the RayConfig Ray's bindings declare.
    import ray

    declared = (Path(ray.__file__).parent / "includes" / "ray_config.pxd").read_text()
    core = [k[len("RAY_") :] for k in LEAN_ENV if not k.startswith("RAY_SERVE_")]
    assert core == ["max_direct_call_object_size"]
    for name in core:
        assert re.search(rf"\b{name}\(\) const", declared), name
    # A live frame call (one square 640 frame, with its pickling) rides inline.
    assert int(LEAN_ENV["RAY_max_direct_call_object_size"]) >= 640 * 640 * 3 + 64 * 1024


def test_the_operators_value_wins() -> None:
    text = env_assignments({"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.2"})
    pairs = dict(item.split("=", 1) for item in text.split())
    assert pairs["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.2"
    assert pairs["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"
    assert set(pairs) == set(LEAN_ENV)


@pytest.mark.parametrize("value", ["0.2 rm", "$(id)", "", "1;true"])
def test_a_value_the_shell_would_split_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="RAY_SERVE_CONTROL_LOOP_INTERVAL_S"):
        env_assignments({"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": value})
    env = {**os.environ, "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": value}
    done = subprocess.run(
        [sys.executable, "-m", "graph.ray_settings", "env"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stdout == ""  # make run stops on it
    assert "graph.ray_settings: not a plain word" in done.stderr


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


def test_cluster_processes_finds_the_tree_and_stop_kills_only_it() -> None:
    # A Ray-looking parent (a script under site-packages/ray/ would be one; here its
    # command line names such a path) that names the cluster's temp dir, with a child
    # that does not (as a raylet and its workers); a `tail`-like process that names the
    # temp dir but is not Ray's, and an outsider: both must survive.
    with tempfile.TemporaryDirectory(prefix="cgray-test-") as temp_dir:
        script = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
        ray_arg = "/x/site-packages/ray/_private/fake.py"
        parent = subprocess.Popen([sys.executable, "-c", script, ray_arg, f"--temp-dir={temp_dir}"])
        reader = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", f"{temp_dir}/session/logs"]
        )
        outsider = subprocess.Popen(["sleep", "60"])
        try:
            deadline = time.monotonic() + 10
            while True:
                pids = {p.pid for p in cluster_processes(temp_dir, client_port=1)}
                if len(pids) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert parent.pid in pids and len(pids) == 2  # the parent and its child
            assert reader.pid not in pids and outsider.pid not in pids
            assert cluster_selector(temp_dir, client_port=1)() != []
            assert stop_cluster(lambda: cluster_processes(temp_dir, 1), timeout_s=5) == 0
            assert parent.wait(timeout=5) is not None
            assert cluster_processes(temp_dir, client_port=1) == []
            assert reader.poll() is None and outsider.poll() is None
        finally:
            for proc in (parent, reader, outsider):
                proc.kill()
                proc.wait()
