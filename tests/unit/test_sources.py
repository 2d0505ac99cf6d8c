"""Camera sources against real peers: an H.264 clip on disk and a real HTTP server."""

import functools
import http.server
import threading
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest

from demo.datasets import write_clip
from stream_actors.sources import (
    PyAVSource,
    SnapshotSource,
    SourceConnectionError,
    SourceReadError,
)
from tests.peers import http_server


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(
        3, n_frames=12, video_path=tmp_path_factory.mktemp("clip") / "c.mp4", fps=10, scale=0.25
    )


def test_file_is_read_once_in_full(clip: Path) -> None:
    frames = list(PyAVSource(str(clip)).frames())
    assert len(frames) == 12
    assert frames[0].image.shape == (180, 320, 3) and frames[0].image.dtype == np.uint8


class FakeTime:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_looping_file_keeps_going_and_pacing_follows_its_frame_rate(clip: Path) -> None:
    fake = FakeTime()
    source = PyAVSource(str(clip), loop=True, pace=True, sleep=fake.sleep, clock=fake.clock)
    slept = fake.slept
    frames = list(islice(source.frames(), 30))
    assert len(frames) == 30  # more than the clip holds: it looped
    # paced at 10 fps: the requested sleeps add up to about 29 frame periods
    assert sum(slept) == pytest.approx(2.9, abs=0.5)


def test_a_replay_on_the_files_clock_keeps_its_frame_spacing_and_never_goes_back(
    clip: Path,
) -> None:
    frames = list(islice(PyAVSource(str(clip), loop=True, media_time=True).frames(), 30))
    gaps = np.diff([f.captured_at for f in frames])
    assert np.allclose(gaps[:11], 0.1, atol=1e-3)  # 10 fps, however fast it was read
    assert (gaps > 0).all()  # across the loop as well


def test_key_frames_only_match_the_full_decode_and_so_do_the_frames_after(
    tmp_path: Path,
) -> None:
    """While `keyframes_only` holds the source gives the key frames only, each the same
    pixels as the full decode; switching back right after a key frame goes on with the
    next frame, whose reference is that key frame: every frame equals the full decode
    (no frame built on a skipped reference)."""
    clip = write_clip(5, n_frames=40, video_path=tmp_path / "k.mp4", fps=10, scale=0.25)
    full = list(PyAVSource(str(clip), media_time=True).frames())
    reference = {round(f.captured_at - full[0].captured_at, 3): f for f in full}
    keys = [round(f.captured_at - full[0].captured_at, 3) for f in full if f.key_frame]
    assert len(keys) >= 4 and len(full) == 40

    wanted = {"keys": False}
    source = PyAVSource(str(clip), media_time=True, keyframes_only=lambda: wanted["keys"])
    got = []
    for n, frame in enumerate(source.frames()):
        got.append(frame)
        wanted["keys"] = 2 <= n < 4  # all, then key frames for 2 frames, then all again
    at = [round(f.captured_at - got[0].captured_at, 3) for f in got]
    assert at[:3] == [0.0, 0.1, 0.2]
    assert at[3:5] == keys[1:3] and got[3].key_frame and got[4].key_frame
    assert np.diff(at[4:]).round(3).tolist() == [0.1] * (len(got) - 5)
    for frame, t in zip(got, at, strict=True):
        assert np.array_equal(frame.image, reference[t].image), t


def test_missing_and_corrupt_files_are_connection_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceConnectionError, match=r"missing\.mp4"):
        next(PyAVSource(str(tmp_path / "missing.mp4")).frames())
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(SourceConnectionError):
        next(PyAVSource(str(junk)).frames())


def test_refused_rtsp_is_a_connection_error() -> None:
    with pytest.raises(SourceConnectionError, match=r"rtsp://127\.0\.0\.1:9"):
        next(PyAVSource("rtsp://127.0.0.1:9/none", open_timeout_s=1, read_timeout_s=1).frames())


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_snapshot_source_polls_at_its_interval(http_dir: tuple[str, Path]) -> None:
    base, root = http_dir
    cv2.imwrite(str(root / "cam.jpg"), np.full((48, 64, 3), 200, np.uint8))
    fake = FakeTime()
    source = SnapshotSource(f"{base}/cam.jpg", interval_s=0.5, sleep=fake.sleep, clock=fake.clock)
    frames = list(islice(source.frames(), 3))
    slept = fake.slept
    assert [f.image.shape for f in frames] == [(48, 64, 3)] * 3
    assert slept == [pytest.approx(0.5), pytest.approx(0.5)]


def test_snapshot_failures_are_typed(http_dir: tuple[str, Path]) -> None:
    base, root = http_dir
    with pytest.raises(SourceReadError, match="HTTP 404"):
        SnapshotSource(f"{base}/nope.jpg").grab()
    (root / "half.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(SourceReadError, match="undecodable"):
        SnapshotSource(f"{base}/half.jpg").grab()
    with pytest.raises(SourceConnectionError):
        SnapshotSource("http://127.0.0.1:9/cam.jpg", timeout_s=1).grab()
    with pytest.raises(SourceConnectionError, match="http"):
        SnapshotSource("file:///etc/passwd")


class _Serve(http.server.BaseHTTPRequestHandler):
    """/bomb.png: a PNG header claiming 30000 × 30000; /redirect: 302 to ftp://."""

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/snap.jpg")
            self.end_headers()
            return
        from tests.unit.test_ingress_images import bomb_png

        body = bomb_png(30_000, 30_000)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hostile_server() -> Iterator[str]:
    with http_server(_Serve) as base:
        yield base


def test_a_snapshot_bomb_is_refused_from_its_header_before_decoding(hostile_server: str) -> None:
    with pytest.raises(SourceReadError, match="snapshot of 900000000 pixels, more than the limit"):
        SnapshotSource(f"{hostile_server}/bomb.png").grab()


def test_a_snapshot_redirect_to_another_scheme_is_refused(hostile_server: str) -> None:
    with pytest.raises(SourceReadError, match="HTTP 302"):
        SnapshotSource(f"{hostile_server}/redirect").grab()
