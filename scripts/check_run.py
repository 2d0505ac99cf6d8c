"""`make run` as a newcomer runs it, checked end to end (CI's `make check-run`).

A clean HOME (no ~/.ray token, no caches; pip's cache stays the real one so nothing is
downloaded twice), then `make run`, then wait for the demo camera's first detection (a
`detection` event with boxes) and its first record in the local store, then `make stop`,
and no Ray process started by that run may be left. Prints the time from `make run` to
each step; exits non-zero on any failure. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAY_PROCESS_MARKERS = ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private")
TARGET_S = 60.0  # the target: `make run` → first detection, venv installed
EXTRA_CAMERAS = 7  # with the demo camera: 8, one camera actor at the default 8 streams


def ray_processes() -> dict[int, str]:
    """pid → command line of every Ray process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in cmd for marker in RAY_PROCESS_MARKERS):
            found[int(entry.name)] = cmd.strip()[:160]
    return found


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def first_detection(base: str, subscription: str) -> int:
    """Boxes in the newest detection events of the demo subscription (0: none yet)."""
    quoted = urllib.request.quote(subscription, safe="")
    events = get_json(f"{base}/streams/{quoted}/events?after=0")
    assert isinstance(events, list)
    boxes = [len(e.get("detections") or ()) for e in events if e.get("kind") == "detection"]
    return max(boxes, default=0)


def request(method: str, url: str, body: object | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as response:
        return int(response.status)


def eight_cameras(base: str, clip: Path, timeout_s: float = 120) -> list[str]:
    """Seven more file cameras (copies of the demo clip: one stream each) on `make run`'s
    own resources: every one of the eight must be processed, none left pending; then
    the seven are unsubscribed (subscriptions persist across `make stop`)."""
    folder = clip.parent / "check-run"
    folder.mkdir(exist_ok=True)
    ids = [f"check-run;cam-{i}" for i in range(EXTRA_CAMERAS)]
    failures: list[str] = []
    try:
        for i, sub_id in enumerate(ids):
            copy = folder / f"cam-{i}.mp4"
            if not copy.exists():
                shutil.copyfile(clip, copy)
            started = time.monotonic()
            request(
                "POST", f"{base}/streams", {"subscriptionIdentifier": sub_id, "fileUrl": str(copy)}
            )
            if time.monotonic() - started > 10:
                failures.append(f"subscribing {sub_id} took {time.monotonic() - started:.0f} s")
        deadline, waiting = time.monotonic() + timeout_s, {"?"}
        while time.monotonic() < deadline and waiting:
            listing = get_json(f"{base}/streams")
            assert isinstance(listing, dict)
            processed = {
                sub["subscription_id"]: sub["processed"]
                for stream in listing["streams"]
                for sub in stream["subscriptions"]
            }
            waiting = {i for i in [*ids, "demo-display;demo-camera"] if not processed.get(i)}
            time.sleep(1)
        if waiting:
            states = {s["url"]: (s["state"], s["last_error"]) for s in listing["streams"]}
            failures.append(f"cameras never processed: {sorted(waiting)}; streams: {states}")
        else:
            actors = sorted({s["actor"] for s in listing["streams"]})
            print(f"check-run: 8 cameras processed on {len(actors)} camera actors")
    finally:
        for sub_id in ids:
            try:
                request("DELETE", f"{base}/streams/{urllib.request.quote(sub_id, safe='')}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    failures.append(f"unsubscribing {sub_id}: {exc.code}")
            except Exception as exc:  # go on: each one left would start at the next run
                failures.append(f"unsubscribing {sub_id}: {type(exc).__name__}: {exc}")
    return failures


def records_since(data_dir: Path, since: float) -> int:
    """Records written into the local store's tables since `since` (wall clock)."""
    path = data_dir / "records.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        tables = [  # the pipeline's record tables: those with camgraph's timestamps
            t
            for t in names
            if any(c[1] == "camgraph_created_at" for c in db.execute(f'PRAGMA table_info("{t}")'))
        ]
        return sum(
            db.execute(
                f'SELECT count(*) FROM "{t}" WHERE camgraph_created_at >= ?', (since,)
            ).fetchone()[0]
            for t in tables
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--subscription", default="demo-display;demo-camera")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "actions")
    parser.add_argument("--timeout-s", type=float, default=300)
    args = parser.parse_args()

    busy = [p for p in (8000, 8265, 6380) if port_busy(p)]
    if busy:
        print(f"check-run: ports {busy} are in use (a `make run` cluster?): `make stop` first")
        return 1
    before = ray_processes()
    real_home = Path.home()
    home = Path(tempfile.mkdtemp(prefix="camgraph-home-"))
    env = {
        **os.environ,
        "HOME": str(home),
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(real_home / ".cache" / "pip")),
    }
    for inherited in (
        *("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_AUTH_MODE"),
        *("XDG_CACHE_HOME", "XDG_CONFIG_HOME"),
    ):
        env.pop(inherited, None)  # nothing of the used machine may help the newcomer
    failures: list[str] = []
    started_wall, started = time.time(), time.monotonic()
    try:
        run = subprocess.run(["make", "run"], cwd=ROOT, env=env, timeout=args.timeout_s)
        ready_s = time.monotonic() - started
        print(f"check-run: `make run` returned {run.returncode} after {ready_s:.1f} s")
        if run.returncode != 0:
            failures.append(f"`make run` failed with exit code {run.returncode}")
        else:
            if not (home / ".ray" / "auth_token").exists():
                failures.append("`make run` did not create Ray's token in the clean HOME")
            detection_s = record_s = None
            deadline = started + args.timeout_s
            last = "no answer yet"
            while time.monotonic() < deadline and (detection_s is None or record_s is None):
                try:
                    if detection_s is None and first_detection(args.url, args.subscription) > 0:
                        detection_s = time.monotonic() - started
                        print(f"check-run: first detection {detection_s:.1f} s after `make run`")
                    if record_s is None and records_since(args.data_dir, started_wall) > 0:
                        record_s = time.monotonic() - started
                        print(f"check-run: first record {record_s:.1f} s after `make run`")
                except (OSError, urllib.error.URLError, sqlite3.Error, ValueError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.5)
            if detection_s is None:
                failures.append(f"no detection from the demo camera ({last})")
            if record_s is None:
                failures.append("no record in the local store")
            if detection_s is not None:
                try:
                    failures += eight_cameras(args.url, ROOT / "data" / "demo-scene.mp4")
                except Exception as exc:
                    failures.append(f"8 cameras: {type(exc).__name__}: {exc}")
                verdict = "PASS" if detection_s <= TARGET_S else "FAIL"
                if detection_s > TARGET_S:
                    failures.append(f"first detection after {detection_s:.0f} s > {TARGET_S:.0f} s")
                print(
                    f"check-run: make run → first detection {detection_s:.1f} s "
                    f"(target ≤ {TARGET_S:.0f} s): {verdict}"
                )
    except subprocess.TimeoutExpired:
        failures.append(f"`make run` did not return within {args.timeout_s:.0f} s")
    finally:
        subprocess.run(["make", "stop"], cwd=ROOT, env=env, timeout=120)
        left: dict[int, str] = {}
        for _ in range(40):  # `ray stop` signals; processes may take a moment to exit
            left = {p: c for p, c in ray_processes().items() if p not in before}
            if not left:
                break
            time.sleep(0.5)
        if left:
            failures.append(
                "Ray processes left after `make stop`: "
                + "; ".join(f"{p} {c}" for p, c in list(left.items())[:5])
            )
        shutil.rmtree(home, ignore_errors=True)
    for failure in failures:
        print(f"check-run FAILED: {failure}")
    if not failures:
        print("check-run: ok (clean HOME, detection and record, nothing left running)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
