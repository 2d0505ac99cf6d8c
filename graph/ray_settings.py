"""The settings camgraph starts Ray with: Ray's background work that a camgraph cluster
does not need, turned down (issue 19), measured by `make bench-ray` against Ray's defaults.

What each one gives up, and why that is fine for a camgraph deployment:

- `--include-log-monitor=false` (a `ray start` flag): the log monitor tails every worker's
  log file on the node and publishes new lines to the GCS, for a driver started with
  `log_to_driver`. A `serve deploy` cluster has no such driver; the logs stay in the
  session's `logs/` folder and the dashboard's log viewer still reads them there.
- `RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5` (Ray: 0.1): the Serve controller's loop, which
  reconciles replicas and takes autoscaling decisions. camgraph's autoscaling waits
  seconds before it acts (`upscale_delay_s`), so reacting 0.4 s later changes nothing a
  camera sees; the controller's idle CPU falls with the loop rate.
- `RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000` (Ray: 100): how often each router and
  replica hands its cached request metrics to Ray's metrics agent. The dashboard's and
  Prometheus' scrape interval is seconds anyway.

The dashboard and its agent stay on: the Serve view, replicas and scaling on the Ray
dashboard are part of what operators get. `python -m graph.ray_settings env|flags` prints
them for the Makefile and for scripts that run `ray start` themselves."""

from __future__ import annotations

import os
import sys

LEAN_ENV: dict[str, str] = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}
LEAN_START_FLAGS: tuple[str, ...] = ("--include-log-monitor=false",)


def lean_env(base: dict[str, str]) -> dict[str, str]:
    """`base` with the lean settings added; a variable the operator set wins."""
    return {**LEAN_ENV, **base}


def env_assignments(base: dict[str, str]) -> str:
    """`K=V ...` for `env` in a shell: the lean settings, the operator's value where set."""
    return " ".join(f"{k}={base.get(k, v)}" for k, v in LEAN_ENV.items())


def main(argv: list[str] | None = None) -> int:
    what = (argv if argv is not None else sys.argv[1:]) or ["env"]
    if what[0] == "env":
        print(env_assignments(dict(os.environ)))
    elif what[0] == "flags":
        print(" ".join(LEAN_START_FLAGS))
    else:
        print("usage: python -m graph.ray_settings env|flags", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
