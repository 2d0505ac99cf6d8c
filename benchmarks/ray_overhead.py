"""`make bench-ray`: what Ray's own processes cost under `make run`'s graph, with Ray's
defaults and with the lean settings camgraph starts Ray with (graph/ray_settings.py),
side by side in one run.

Each round starts a head node the operators' way (`ray start`, 2 logical CPUs, the
dashboard on, free ports and a temp dir of its own), deploys serve_config.yaml (the demo
pipeline) with `serve deploy`, and samples every process of that cluster (CPU by role):
- an idle window: the graph deployed, no camera;
- a busy window: the demo camera (`make run`'s clip, 10 fps) through the pipeline, with
  the frames it processed, so CPU per frame compares the same work.
Then it stops that cluster by its processes' PIDs (never `ray stop`, which would stop a
`make run` cluster too). Rounds alternate (defaults, lean, defaults, lean...) so the box's
drift falls on both. Records go to a PostgreSQL schema of the run's own, dropped at the
end. Results: benchmarks/results/bench-ray.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from benchmarks.camgraph_phase import subscription_counters, wait_healthy, with_own_state
from benchmarks.measure import ProcessSampler, is_ray_process
from benchmarks.peers import free_port
from benchmarks.pipeline_phase import DSN_ENV, pipeline_config
from graph.ray_settings import LEAN_ENV, LEAN_START_FLAGS

# Ray's own processes, by the role benchmarks.measure.process_role gives them: the
# dashboard's head runs its modules as `ray-dashboard-<Module>-0` subprocesses.
BACKGROUND_ROLES = frozenset(
    {
        "raylet",
        "gcs_server",
        "dashboard.py",
        "DashboardAgent",
        "RuntimeEnvAgent",
        "log_monitor.py",
        "monitor.py",
        "ServeController",
        "ProxyActor",
    }
)


def is_background(role: str) -> bool:
    return role in BACKGROUND_ROLES or role.startswith("ray-dashboard-")


@dataclass
class Window:
    seconds: float
    cpu_pct: float
    by_role: dict[str, float]
    frames: int = 0

    @property
    def background_pct(self) -> float:
        return sum(v for k, v in self.by_role.items() if is_background(k))

    @property
    def cpu_ms_per_frame(self) -> float | None:
        if not self.frames:
            return None
        return 10 * self.cpu_pct * self.seconds / self.frames


@dataclass
class Round:
    variant: str
    idle: Window
    busy: Window
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("idle", "busy"):
            w: Window = getattr(self, key)
            out[key]["background_pct"] = round(w.background_pct, 1)
            out[key]["cpu_ms_per_frame"] = w.cpu_ms_per_frame
        return out


# ---- one cluster of this run's own -----------------------------------------------------


def cluster_processes(temp_dir: str, client_port: int) -> list[psutil.Process]:
    """The Ray processes of the cluster started with `temp_dir`: those that name it on
    their command line (GCS, raylet, dashboard, agents, monitors), their descendants
    (the workers: actors and replicas), and its Ray client server (which names only its
    port). Only Ray's own: a shell or a `tail -f` on the cluster's logs is not one."""
    found: dict[int, psutil.Process] = {}
    client_arg = f"--port={client_port}"
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            name, cmdline = proc.info["name"] or "", proc.info["cmdline"] or []
            if not is_ray_process(name, cmdline):
                continue
            ours = any(temp_dir in arg for arg in cmdline)
            client = "ray.util.client.server" in cmdline and client_arg in cmdline
            if ours or client:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def cluster_selector(temp_dir: str, client_port: int) -> Callable[[], list[psutil.Process]]:
    """`cluster_processes`, rescanned at most every 2 s (for the CPU sampler)."""
    cache: list[psutil.Process] = []
    scanned = [-float("inf")]

    def select() -> list[psutil.Process]:
        if time.monotonic() - scanned[0] >= 2.0:
            cache[:] = cluster_processes(temp_dir, client_port)
            scanned[0] = time.monotonic()
        return [p for p in cache if p.is_running()]

    return select


def stop_cluster(scan: Callable[[], list[psutil.Process]], timeout_s: float = 15.0) -> int:
    """SIGTERM, then SIGKILL, every process `scan` finds (scanned afresh before each
    signal: workers come and go); returns how many had to be killed."""
    procs = scan()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    psutil.wait_procs(procs, timeout=timeout_s)
    # The first list too: a worker whose raylet is gone is nobody's descendant any more.
    alive = list({p.pid: p for p in [*procs, *scan()] if p.is_running()}.values())
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(alive)


def _run_cli(args: list[str], env: dict[str, str]) -> None:
    """A Ray CLI command; its own output in the error when it fails."""
    try:
        subprocess.run(args, env=env, check=True, timeout=120, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {exc.stderr[-2000:]}") from exc


@contextlib.contextmanager
def ray_cluster(
    config: dict[str, Any], variant: str, cpus: int, workdir: Path
) -> Iterator[tuple[str, Callable[[], list[psutil.Process]]]]:
    """A head node started by `ray start` with `variant`'s settings, the config deployed
    on it; yields camgraph's URL and the cluster's process selector."""
    temp_dir = tempfile.mkdtemp(prefix="cgray-", dir="/tmp")  # short: Unix socket paths
    ports = {k: free_port() for k in ("gcs", "dash", "agent", "agent_grpc", "renv", "metrics")}
    http_port = free_port()
    config = with_own_state(config, Path(temp_dir))  # not make run's data/streams.json
    config = {**config, "http_options": {"host": "127.0.0.1", "port": http_port}}
    if "grpc_options" in config:
        config["grpc_options"] = {**config["grpc_options"], "port": free_port()}
    config_path = workdir / f"serve_config-{variant}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in LEAN_ENV and k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "token")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    flags: list[str] = []
    if variant == "lean":
        env.update(LEAN_ENV)
        flags = list(LEAN_START_FLAGS)
    bin_dir = Path(sys.executable).parent
    client_port = free_port()
    select = cluster_selector(temp_dir, client_port)
    try:
        _run_cli(
            [
                str(bin_dir / "ray"),
                "start",
                "--head",
                f"--port={ports['gcs']}",
                f"--num-cpus={cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={ports['dash']}",
                f"--dashboard-agent-listen-port={ports['agent']}",
                f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
                f"--runtime-env-agent-port={ports['renv']}",
                f"--metrics-export-port={ports['metrics']}",
                f"--ray-client-server-port={client_port}",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                *flags,
            ],
            env,
        )
        _run_cli(
            [
                str(bin_dir / "serve"),
                "deploy",
                str(config_path),
                "--address",
                f"http://127.0.0.1:{ports['dash']}",
            ],
            env,
        )
        url = f"http://127.0.0.1:{http_port}"
        wait_healthy(url, 300.0)
        yield url, select
    finally:  # also when `ray start` failed half way: what it started is stopped
        killed = stop_cluster(lambda: cluster_processes(temp_dir, client_port))
        if killed:
            print(f"{variant}: {killed} processes needed SIGKILL", file=sys.stderr)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---- one round ----------------------------------------------------------------------------


def _window(
    select: Callable[[], list[psutil.Process]], seconds: float, count: Callable[[], int]
) -> Window:
    before = count()
    sampler = ProcessSampler(select).start()
    time.sleep(seconds)
    usage = sampler.stop()
    return Window(
        seconds=seconds,
        cpu_pct=round(usage.cpu_pct or 0.0, 1),
        by_role=usage.cpu_pct_by_role,
        frames=count() - before,
    )


def run_round(
    config: dict[str, Any], variant: str, args: argparse.Namespace, workdir: Path
) -> Round:
    with (
        ray_cluster(config, variant, args.ray_cpus, workdir) as (url, select),
        httpx.Client(base_url=url, timeout=30.0) as client,
    ):
        sub_id = f"benchray;cam-{uuid.uuid4().hex[:6]}"

        def processed() -> int:
            counters = subscription_counters(client.get("/streams").json())
            return int(counters.get(sub_id, {}).get("processed", 0))

        time.sleep(args.warmup)
        idle = _window(select, args.idle, processed)
        r = client.post(
            "/streams",
            json={"subscriptionIdentifier": sub_id, "fileUrl": str(args.clip.resolve())},
        )
        if r.status_code >= 300:
            raise RuntimeError(f"POST /streams: {r.status_code} {r.text[:300]}")
        deadline = time.monotonic() + 120
        while processed() == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the demo camera processed no frame in 120 s")
            time.sleep(1.0)
        time.sleep(args.warmup)
        busy = _window(select, args.busy, processed)
        client.delete(f"/streams/{sub_id}")
    return Round(variant=variant, idle=idle, busy=busy)


# ---- report ---------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _group(role: str) -> str:
    return "dashboard modules" if role.startswith("ray-dashboard-") else role


def _grouped(by_role: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for role, pct in by_role.items():
        if is_background(role):
            out[_group(role)] = out.get(_group(role), 0.0) + pct
    return out


def render(rounds: list[Round], meta: dict[str, Any]) -> str:
    variants = list(dict.fromkeys(r.variant for r in rounds))
    grouped = {id(w): _grouped(w.by_role) for r in rounds for w in (r.idle, r.busy)}
    roles = sorted(
        {k for g in grouped.values() for k in g},
        key=lambda k: -sum(g.get(k, 0.0) for g in grouped.values()),
    )
    lines = [
        f"# Ray's own processes, defaults against lean ({meta['date']})",
        "",
        f"{meta['environment']}. {len(rounds)} rounds, alternating; idle {meta['idle_s']} s,"
        f" busy {meta['busy_s']} s (the demo camera through the demo pipeline). CPU in % of"
        " one core, mean over the rounds.",
        "",
        "| variant | idle: cluster | idle: Ray's own | busy: cluster | busy: Ray's own |"
        " busy: frames/s | busy: CPU-ms / frame |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        rs = [r for r in rounds if r.variant == v]
        per_frame = [r.busy.cpu_ms_per_frame for r in rs if r.busy.cpu_ms_per_frame]
        lines.append(
            f"| {v} | {_mean([r.idle.cpu_pct for r in rs]):.1f} "
            f"| {_mean([r.idle.background_pct for r in rs]):.1f} "
            f"| {_mean([r.busy.cpu_pct for r in rs]):.1f} "
            f"| {_mean([r.busy.background_pct for r in rs]):.1f} "
            f"| {_mean([r.busy.frames / r.busy.seconds for r in rs]):.2f} "
            f"| {_mean([float(x) for x in per_frame]):.1f} |"
        )
    lines += ["", "Ray's own processes by role, idle / busy:", ""]
    lines += ["| role | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for role in roles:
        cells = []
        for v in variants:
            rs = [r for r in rounds if r.variant == v]
            idle = _mean([grouped[id(r.idle)].get(role, 0.0) for r in rs])
            busy = _mean([grouped[id(r.busy)].get(role, 0.0) for r in rs])
            cells.append(f"{idle:.1f} / {busy:.1f}")
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rerender(path: Path) -> str:
    """The report again from a bench-ray.json (e.g. after a change to the grouping), and
    the file's derived fields (background_pct, cpu_ms_per_frame) recomputed with it."""
    data = json.loads(path.read_text())
    rounds = [
        Round(
            variant=r["variant"],
            idle=Window(**{k: r["idle"][k] for k in ("seconds", "cpu_pct", "by_role", "frames")}),
            busy=Window(**{k: r["busy"][k] for k in ("seconds", "cpu_pct", "by_role", "frames")}),
            notes=r.get("notes", []),
        )
        for r in data["rounds"]
    ]
    data["rounds"] = [r.to_json() for r in rounds]
    path.write_text(json.dumps(data, indent=2))
    return render(rounds, data)


def main(argv: list[str] | None = None) -> int:
    import psycopg

    from benchmarks.report import run_meta

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploy", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--clip", type=Path, default=Path("data/demo-scene.mp4"))
    parser.add_argument("--rounds", type=int, default=2, help="rounds per variant")
    parser.add_argument("--variants", default="defaults,lean")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument("--busy", type=float, default=30.0, help="busy window, seconds")
    parser.add_argument("--ray-cpus", type=int, default=2, help="as make run starts Ray")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("CAMGRAPH_BENCH_DSN", "host=127.0.0.1 port=5432 dbname=test"),
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rerender", type=Path, help="only redo the report from this JSON")
    args = parser.parse_args(argv)
    if args.rerender:
        text = rerender(args.rerender)  # and the JSON's derived fields again
        (args.out / "bench-ray.md").write_text(text)
        print(text)
        return 0
    if not args.clip.exists():
        parser.error(f"{args.clip} not found (make {args.clip} builds it)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"defaults", "lean"}
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")
    schema = f"camgraph_benchray_{uuid.uuid4().hex[:8]}"
    os.environ[DSN_ENV] = args.dsn  # the cluster's workers inherit it from `ray start`
    config = pipeline_config(yaml.safe_load(args.deploy.read_text()), schema, hold=True)
    meta = {
        **run_meta(),
        "idle_s": args.idle,
        "busy_s": args.busy,
        "lean": {"env": LEAN_ENV, "flags": list(LEAN_START_FLAGS)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rounds: list[Round] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            for i in range(args.rounds):  # ABBA...: the box's drift falls on both
                for variant in variants if i % 2 == 0 else variants[::-1]:
                    print(f"round {i + 1}: {variant}", flush=True)
                    rounds.append(run_round(config, variant, args, Path(tmp)))
                    print(json.dumps(rounds[-1].to_json()), flush=True)
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    (args.out / "bench-ray.json").write_text(
        json.dumps({**meta, "rounds": [r.to_json() for r in rounds]}, indent=2)
    )
    text = render(rounds, meta)
    (args.out / "bench-ray.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
