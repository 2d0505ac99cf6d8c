"""Deterministic camera inputs for the benchmark: one generated clip per camera (held-out
scenes, never seen in training) cached on disk, served as files or over RTSP by the
project's GStreamer test server (`scripts/rtsp_server.py`).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.peers import SYSTEM_PYTHON, RtspServer
from demo.datasets import HELD_OUT_SEED_START

# Far from the seeds other tools use (the demo camera is +7, benchmarks/detect.py +500..,
# gpu_batch.py +900..), so a benchmark clip is its own scene.
BENCH_SEED_OFFSET = 700


@dataclass(frozen=True)
class ClipSpec:
    """How the benchmark clips are made. 0.5 scale is 640x360: the size of an analytics
    sub-stream, which keeps decoding realistic (about 1 ms a frame here) while 16
    cameras still fit on 2 cores; scale 1.0 gives 1280x720 (about 6 ms a frame:
    the generated scenes' noise makes a high bitrate)."""

    n_frames: int = 100
    fps: int = 10
    scale: float = 0.5

    def seed(self, camera: int) -> int:
        return HELD_OUT_SEED_START + BENCH_SEED_OFFSET + camera

    def path(self, cache_dir: Path, camera: int) -> Path:
        name = f"cam{camera:03d}-s{self.seed(camera)}-n{self.n_frames}-f{self.fps}"
        return cache_dir / f"{name}-x{self.scale:g}.mp4"


def _write(args: tuple[int, int, Path, int, float]) -> Path:
    from demo.datasets import write_clip

    seed, n_frames, path, fps, scale = args
    tmp = path.with_name(path.stem + ".partial.mp4")
    write_clip(seed, n_frames, tmp, fps, scale)
    tmp.with_suffix(".json").replace(path.with_suffix(".json"))
    tmp.replace(path)  # a clip interrupted half-way is never taken for a finished one
    return path


def ensure_clips(cache_dir: Path, cameras: int, spec: ClipSpec, workers: int = 2) -> list[Path]:
    """The clips of cameras 0..cameras-1, generating the missing ones (cached by name)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [spec.path(cache_dir, i) for i in range(cameras)]
    missing = [(spec.seed(i), spec.n_frames, p, spec.fps, spec.scale) for i, p in enumerate(paths)]
    missing = [m for m in missing if not m[2].is_file()]
    if missing:
        from tqdm import tqdm

        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(missing)))) as pool:
            done = pool.map(_write, missing)
            for _ in tqdm(done, total=len(missing), desc="clips", unit="clip"):
                pass
    return [p.resolve() for p in paths]


def rtsp_available() -> bool:
    """Whether Debian's GStreamer RTSP server can run here (`make peers` installs it)."""
    try:
        probe = subprocess.run(
            [
                SYSTEM_PYTHON,
                "-c",
                'import gi; gi.require_version("GstRtspServer", "1.0"); '
                "from gi.repository import GstRtspServer",
            ],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class RtspPeer(RtspServer):
    """The tests' GStreamer RTSP server serving clip i at rtsp://127.0.0.1:PORT/cam<i>,
    each played in a loop at its own frame rate (a live camera)."""

    def __init__(self, clips: Sequence[Path], port: int | None = None) -> None:
        super().__init__({f"cam{i}": Path(c) for i, c in enumerate(clips)}, port=port)

    def camera_url(self, camera: int) -> str:
        return self.url(f"cam{camera}")

    def start(self, timeout_s: float = 20.0) -> RtspPeer:
        super().start(timeout_s)
        return self


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class FeedCounts:
    """A feed's counters at one instant: offered = taken + skipped + pending."""

    offered: int
    taken: int
    skipped: int  # superseded: due, but a newer frame was due when the reader came
    pending: int  # due, not yet read


class PacedCapture:
    """`cv2.VideoCapture` of a file that behaves like a live camera (what the seed's
    per-camera thread sees): frame k is due at `start + k / fps`; a read returns the
    newest due frame, skipping (decoding, as a camera's stream must) the older ones,
    or waits for the next one. With `pace=False` it returns every frame at once
    (saturation). Loops at the end of the file. One reader thread per capture."""

    def __init__(
        self, path: Path, fps: float, pace: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        import cv2

        self._cv2 = cv2
        self.path, self.fps, self.pace = path, fps, pace
        self._clock = clock
        self._cap = self._open()
        self._lock = threading.Lock()
        self._start: float | None = None
        self._consumed = 0
        self._taken = 0

    def _open(self) -> Any:
        cap = self._cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise RuntimeError(f"cannot open {self.path}")
        return cap

    def start(self, at: float) -> None:
        with self._lock:
            self._start = at

    def _due(self, now: float) -> int:
        if self._start is None or now < self._start:
            return 0
        return int((now - self._start) * self.fps) + 1

    def _advance(self, decode: bool) -> Any:
        """Grab (and with `decode`, convert) the next frame, looping at the end."""
        cap = self._cap
        for _ in range(2):
            if cap.grab():
                if not decode:
                    return None
                ok, image = cap.retrieve()
                if ok:
                    return image
            cap.release()
            cap = self._cap = self._open()
        raise RuntimeError(f"{self.path}: no frame after reopening")

    def read(self, stop: threading.Event) -> tuple[Any, float] | None:
        """(BGR image, capture wall time), or None when `stop` was set while waiting."""
        if not self.pace:
            image = self._advance(decode=True)
            with self._lock:
                self._taken += 1
                self._consumed += 1
            return image, self._clock()
        assert self._start is not None, "start() the capture first"
        while True:
            now = self._clock()
            with self._lock:
                due = self._due(now)
                consumed = self._consumed
            if due > consumed:
                break
            wait_s = self._start + consumed / self.fps - now
            if stop.wait(max(0.0, wait_s)):
                return None
        for _ in range(due - 1 - consumed):  # superseded frames are still decoded
            self._advance(decode=False)
            with self._lock:
                self._consumed += 1
        image = self._advance(decode=True)
        with self._lock:
            self._consumed += 1
            self._taken += 1
        return image, self._start + (due - 1) / self.fps

    def counts(self, now: float | None = None) -> FeedCounts:
        with self._lock:
            if not self.pace:
                return FeedCounts(self._taken, self._taken, 0, 0)
            due = self._due(self._clock() if now is None else now)
            due = max(due, self._consumed)
            return FeedCounts(due, self._taken, self._consumed - self._taken, due - self._consumed)

    def close(self) -> None:
        self._cap.release()


class LiveCapture:
    """`cv2.VideoCapture` of an RTSP URL read as the seed does: blocking `read()`, frames
    in order (FFmpeg buffers what the reader cannot take yet, so nothing is counted as
    dropped and the capture time is when `read()` returned)."""

    def __init__(self, url: str, fps: float) -> None:
        import cv2

        os.environ.setdefault(
            "OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp|analyzeduration;100000"
        )
        self.path, self.fps, self.pace = url, fps, True
        self._cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
        if not self._cap.isOpened():
            raise RuntimeError(f"cannot open {url}")
        self._lock = threading.Lock()
        self._taken = 0

    def start(self, at: float) -> None:
        pass

    def read(self, stop: threading.Event) -> tuple[Any, float] | None:
        ok, image = self._cap.read()
        if not ok:
            raise RuntimeError(f"{self.path}: read failed")
        with self._lock:
            self._taken += 1
        return image, time.time()

    def counts(self, now: float | None = None) -> FeedCounts:
        with self._lock:
            return FeedCounts(self._taken, self._taken, 0, 0)

    def close(self) -> None:
        self._cap.release()
