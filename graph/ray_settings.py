"""The settings camgraph starts Ray with (issue 19): Ray's background work that a camgraph
cluster does not need, turned down, measured by `make bench-ray` against Ray's defaults,
and frames passed inline in their calls.

What each one gives up, and why that is fine for a camgraph deployment:

- `--include-log-monitor=false` (a `ray start` flag): the log monitor tails every worker's
  log file on the node and publishes new lines to the GCS, for a driver started with
  `log_to_driver`. A `serve deploy` cluster has no such driver; the logs stay in the
  session's `logs/` folder, where the dashboard's log viewer and `ray logs` read them.
  Given up: worker output streamed to a `serve run`, `ray job submit` or `ray.init`
  driver attached to the cluster (debugging: start Ray without the flag).
- `RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5` (Ray: 0.1): the Serve controller's loop, which
  reconciles replicas (readiness, health-check results, replica sets sent to routers)
  and takes autoscaling decisions. Each of those steps may come up to 0.4 s later: a
  deploy or a failover takes a little longer; autoscaling waits seconds before it acts
  anyway (`upscale_delay_s`, measured in wall time). The controller's idle CPU falls
  with the loop rate.
- `RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000` (Ray: 100): how often each router and
  replica hands its cached request metrics to Ray's metrics agent. The dashboard's and
  Prometheus' scrape interval is seconds anyway.

- `RAY_max_direct_call_object_size=2097152` (Ray: 102400, 100 KiB): a task's arguments
  and results up to 2 MiB travel inline in the call's RPC, straight to the process that
  runs it, instead of through the node's object store (for each one the raylet
  creates, seals, pins, serves and frees an object). A live frame call carries one
  letterboxed frame (0.7 MB at 640×384, 1.2 MB square), a `/detect` call one upload
  (a 1280×720 JPEG is about 150 KB). Measured here (README, "Frames inline in the
  call"): a Serve call with one such frame costs 3.5-3.7 CPU-ms on the box instead of
  4.8-5.0, and the raylet's CPU at 8 cameras realtime fell from 4.3 % of a core to
  0.3 %. Given up: such objects are not spilled to disk and sit in the processes'
  memory, not in the object store (or its metrics), while a call holds them and, for
  a result, as long as its caller keeps it; camgraph bounds its calls in flight, and
  2 MiB rather than 8 (which also inlined a replay's 8-frame calls, the raylet's last
  5 % of a core at saturation) keeps each call's heap copy small. The setting is the
  whole cluster's, for every job on it. Every node's `ray start` needs it: each
  node's processes read their own environment, and a node started without it uses
  Ray's 100 KiB (nothing breaks, its calls go through the store).

The dashboard and its agent stay on: the Serve view, replicas and scaling on the Ray
dashboard are part of what operators get. `python -m graph.ray_settings env|flags` prints
them for the Makefile and for scripts that run `ray start` themselves."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

LEAN_ENV: dict[str, str] = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_max_direct_call_object_size": "2097152",
}
LEAN_START_FLAGS: tuple[str, ...] = ("--include-log-monitor=false",)


_SAFE_VALUE = re.compile(r"[A-Za-z0-9._-]+")


def env_assignments(base: Mapping[str, str]) -> str:
    """`K=V ...` for `env` in a shell: the lean settings, the operator's value where set.
    The words are split by the shell, so a value must be one plain word (a number): any
    other is refused (ValueError) rather than handed to `env` as a command."""
    pairs = [(k, base.get(k, v)) for k, v in LEAN_ENV.items()]
    bad = [k for k, v in pairs if not _SAFE_VALUE.fullmatch(v)]
    if bad:
        raise ValueError(
            f"not a plain word (a number): {', '.join(f'{k}={base[k]!r}' for k in bad)}"
        )
    return " ".join(f"{k}={v}" for k, v in pairs)


def main(argv: list[str] | None = None) -> int:
    what = (argv if argv is not None else sys.argv[1:]) or ["env"]
    if what[0] == "env":
        try:
            print(env_assignments(os.environ))
        except ValueError as exc:
            print(f"graph.ray_settings: {exc}", file=sys.stderr)
            return 1
    elif what[0] == "flags":
        print(" ".join(LEAN_START_FLAGS))
    else:
        print("usage: python -m graph.ray_settings env|flags", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
