"""Decode shedding (stream_actors/reader.py, `shed_decode`): an overloaded camera actor's
streams go to key frames once those supply what the subscribers take. A real clip on
a manual clock, no Ray."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from demo.datasets import HELD_OUT_SEED_START, write_clip
from stream_actors.clock import ManualClock
from stream_actors.mailbox import LatestFrameMailbox
from stream_actors.reader import ReaderPolicy, StreamReader, open_source
from stream_actors.subscriptions import StreamSpec


def _shed_run(tmp_path: Path, policy: ReaderPolicy) -> list[tuple[bool, int]]:
    # 12 s: no loop (whose first frame is one more key frame) before the last phase.
    clip = write_clip(HELD_OUT_SEED_START + 1, 120, tmp_path / "k.mp4", fps=10, scale=0.25)
    spec = StreamSpec(key="k", kind="file", url=str(clip), loop=True)
    clock = ManualClock()
    shed = [False]
    reader = StreamReader(spec, policy, clock=clock, shedding=lambda: shed[0])
    mailbox = LatestFrameMailbox(clock=clock)
    reader.attach("s", mailbox)

    def take_every(step_s: float, seconds: float) -> None:
        end = clock.monotonic() + seconds
        while clock.monotonic() < end - 1e-9:
            mailbox.take()
            clock.run_until(clock.monotonic() + step_s)

    reader.start()
    try:
        clock.run_until(0.45)
        seen = []
        take_every(0.5, 4.0)  # to 4.45 s: 2 frames a second, 1 key frame a second
        seen.append((reader.keyframes_only, reader.decode_switches))
        shed[0] = True
        take_every(1.0, 2.0)  # to 6.45 s: 1 a second, judged with the overload on
        seen.append((reader.keyframes_only, reader.decode_switches))
        shed_reported = reader.status()["decode_shed"]
        take_every(0.25, 3.0)  # every key frame taken: still overloaded, still key frames
        seen.append((reader.keyframes_only, reader.decode_switches))
        shed[0] = False
        take_every(0.25, 2.0)  # the overload is over and the subscriber could use more
        seen.append((reader.keyframes_only, reader.decode_switches))
        assert not reader.status()["decode_shed"]
        seen.append((shed_reported, -1))
    finally:
        reader.stop()
        clock.advance(60.0)
    assert reader.join(5)
    return seen


def test_an_overloaded_actor_sheds_decoding_to_key_frames(tmp_path: Path) -> None:
    """A 10 fps camera with a key frame a second: a subscriber that takes 2 frames a
    second is not "low demand", all frames are decoded. Once the actor is overloaded
    (`shedding`) and the key frames supply what the subscriber takes (1 a second), the
    next window goes to key frames, at once (not after two windows of demand under half
    the key frames); it stays there while the overload lasts, even when the subscriber
    takes every key frame, and decodes all frames again after it."""
    seen = _shed_run(tmp_path, ReaderPolicy(decode_window_s=1.0))
    assert seen == [(False, 0), (True, 1), (True, 1), (False, 2), (True, -1)]


def test_no_shedding_when_turned_off_or_key_frames_are_far_apart(tmp_path: Path) -> None:
    """`shed_decode: false` keeps all frames under overload; so does a GOP longer than
    half the watchdog (here a 0.8 s watchdog against a key frame a second): key frames
    only would go quiet past the watchdog and reconnect."""
    # Taking every key frame while "overloaded" brings all frames back: nothing holds
    # the key frames (1-2 a second at 1 taken a second may still look like low demand).
    off = _shed_run(tmp_path, ReaderPolicy(decode_window_s=1.0, shed_decode=False))
    assert off[2][0] is False and off[4] == (False, -1)
    far = _shed_run(tmp_path, ReaderPolicy(decode_window_s=1.0, watchdog_s=0.8))
    assert far[2][0] is False and far[4] == (False, -1)


def test_an_overloaded_detector_sheds_the_decoding_of_pipeline_streams_only() -> None:
    """The camera actor's verdict for one stream (`sheds_decode`): starved branch work
    sheds every stream of the actor; frames that waited long for the detector shed only
    the streams that run a pipeline, so detector-only cameras keep every frame fresh.
    Both verdicts expire after the decode window."""
    from types import SimpleNamespace

    from stream_actors.branch_clock import BranchClock
    from stream_actors.camera_actor import sheds_decode

    def stream(*runners: object) -> Any:
        return SimpleNamespace(
            processors={i: SimpleNamespace(runner=r) for i, r in enumerate(runners)}
        )

    pipeline, plain = stream(None, object()), stream(None, None)
    clock = BranchClock()
    assert not any(sheds_decode(clock, 5.0, s) for s in (pipeline, plain, None))
    clock.detector_waited()
    assert sheds_decode(clock, 5.0, pipeline)
    assert not sheds_decode(clock, 5.0, plain) and not sheds_decode(clock, 5.0, None)
    clock.last_detector_wait -= 5.0
    assert not sheds_decode(clock, 5.0, pipeline)  # expired
    clock.timed_out()
    assert clock.starved(grace_s=2.0, window_s=3.0)
    assert all(sheds_decode(clock, 5.0, s) for s in (pipeline, plain, None))


def _early_run(
    tmp_path: Path,
    policy: ReaderPolicy,
    shed: Callable[[float], bool],
    step_s: float,
    marks: list[float],
    take_until: float = float("inf"),
) -> list[tuple[bool, int, int]]:
    """The clip of `_shed_run` from its start, with `shedding()` = `shed(clock time)`;
    one frame taken every `step_s` until `take_until`; (key frames only, switches,
    shedding() calls so far) at each of `marks` (seconds)."""
    clip = write_clip(HELD_OUT_SEED_START + 1, 120, tmp_path / "e.mp4", fps=10, scale=0.25)
    spec = StreamSpec(key="e", kind="file", url=str(clip), loop=True)
    clock = ManualClock()
    calls = [0]

    def shedding() -> bool:
        calls[0] += 1
        return shed(clock.monotonic())

    reader = StreamReader(spec, policy, clock=clock, shedding=shedding)
    mailbox = LatestFrameMailbox(clock=clock)
    reader.attach("s", mailbox)
    seen = []
    reader.start()
    try:
        next_take = step_s
        for mark in marks:
            while next_take <= mark:
                clock.run_until(next_take)
                if next_take <= take_until:
                    mailbox.take()
                next_take += step_s
            clock.run_until(mark)
            seen.append((reader.keyframes_only, reader.decode_switches, calls[0]))
    finally:
        reader.stop()
        clock.advance(60.0)
    assert reader.join(5)
    # At most twice a second, not once a frame (10 a second), while a window runs.
    assert calls[0] <= 2 * marks[-1] + 2
    return seen


def _always(_: float) -> bool:
    return True


def _never(_: float) -> bool:
    return False


def test_an_overload_that_begins_sheds_within_the_window(tmp_path: Path) -> None:
    """With the usual 5 s window, an actor overloaded from the start (all of a site's
    cameras starting at once) sheds a second in, once two key frames show the GOP,
    instead of decoding every frame for the whole first window; it is not asked
    before 1 s."""
    seen = _early_run(tmp_path, ReaderPolicy(), _always, 1.0, [0.95, 2.5, 4.9])
    assert seen[0] == (False, 0, 0)
    assert seen[1][:2] == (True, 1) and seen[2][:2] == (True, 1)


def test_no_early_shedding_without_cause(tmp_path: Path) -> None:
    """No overload: nothing happens within a window, and low demand (1 frame taken
    every 4 s against a key frame a second) still needs two whole windows of 5 s. A
    subscriber that takes more than the key frames supply is not shed early even when
    overloaded; nor is a GOP over half the watchdog, and then the early checks do not
    cut the windows short either: low demand still switches at 10 s, not before."""
    quiet = _early_run(tmp_path, ReaderPolicy(), _never, 4.0, [4.9, 9.9, 10.3])
    assert [s[:2] for s in quiet] == [(False, 0), (False, 0), (True, 1)]
    busy = _early_run(tmp_path, ReaderPolicy(), _always, 0.3, [2.5, 4.9])
    assert [s[:2] for s in busy] == [(False, 0), (False, 0)]
    long_gop = _early_run(
        tmp_path, ReaderPolicy(watchdog_s=1.6), _always, 4.0, [2.5, 4.9, 9.9, 10.3]
    )
    assert [s[:2] for s in long_gop] == [(False, 0)] * 4  # nor for low demand
    assert long_gop[1][2] >= 6  # it was asked, and found overloaded, within the windows


def test_early_checks_judge_the_whole_window_so_far(tmp_path: Path) -> None:
    """Overloaded throughout; the subscriber takes 3 frames a second for 3 s, then
    none. Within the first window what it took stays counted (no early check restarts
    the window), so it does not shed before the window's end at 5 s, where it took more
    than the key frames; in the next window it sheds a second in."""
    seen = _early_run(tmp_path, ReaderPolicy(), _always, 1 / 3, [4.9, 6.5], take_until=3.0)
    assert [s[:2] for s in seen] == [(False, 0), (True, 1)]


def test_early_checks_only_ever_shed(tmp_path: Path) -> None:
    """Shed early, the stream goes back to all frames only at a window's end, once the
    overload is over and the subscriber takes every key frame; and for a window after
    that, no early check sheds it again (no flapping every second)."""
    seen = _early_run(
        tmp_path,
        ReaderPolicy(),
        lambda t: t < 3.0 or t >= 6.5,  # over at 3 s; back at 6.5 s
        0.25,
        [2.9, 5.9],
    )
    # Taking 4 a second: early shedding needs a subscriber that takes no more than
    # the key frames, so nothing switches early here...
    assert [s[:2] for s in seen] == [(False, 0), (False, 0)]
    slow = _early_run(
        tmp_path,
        ReaderPolicy(),
        lambda t: t < 3.0 or t >= 6.5,
        1.0,
        [2.9, 5.9, 6.4, 8.9, 10.9],
    )
    # ...at 1 a second it sheds at 1 s; at the window's end (from 1 s to 6 s) the
    # overload has been over for 3 s and every key frame was taken: all frames again.
    # The overload is back from 6.5 s, but no early check may shed before 11 s (a
    # window after switching back, which is also this window's end): at 10.9 s still
    # all frames.
    assert [s[:2] for s in slow] == [(True, 1), (True, 1), (False, 2), (False, 2), (False, 2)]


def test_the_gop_is_judged_by_its_longest_gap() -> None:
    """An extra I-frame (a scene cut, a file's loop) right after a regular one must not
    pass an 8 s GOP for a short one (key frames only would then go quiet past the
    watchdog): the longest gap counts, and the time since the last key frame too."""
    from stream_actors.reader import key_gop

    assert key_gop([0.0, 8.0, 8.3], 9.0) == (8.0, 4.15)
    assert key_gop([5.0, 5.3], 9.0)[0] == pytest.approx(3.7)  # since the last one
    assert key_gop([0.0, 1.0, 2.0, 3.0], 3.5) == (1.0, 1.0)
    assert key_gop([0.0, 9.0, 10.0, 11.0], 11.5, count=3) == (1.0, 1.0)  # the last 3
    assert key_gop([3.0], 3.5) == key_gop([3.0, 3.0], 3.5) == (float("inf"), float("inf"))


def test_an_eight_second_gop_is_not_shed_for_a_scene_cut(tmp_path: Path) -> None:
    """Through the reader with its default policy: a camera with a key frame every 8 s
    and a scene cut 0.3 s after one, overloaded, a subscriber taking nothing (low demand
    as well). Key frames only would go quiet past the 5 s watchdog, so the stream keeps
    all frames."""
    import av
    import numpy as np

    clip = tmp_path / "gop8.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"bf": "0", "g": "80", "keyint_min": "80", "sc_threshold": "0"}
        for i in range(200):
            image = np.full((48, 64, 3), (i * 3) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            if i in (80, 83):  # a key frame every 8 s, one more 0.3 s after the second
                frame.pict_type = av.video.frame.PictureType.I
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    keys = [p.pts is not None and p.is_keyframe for p in av.open(str(clip)).demux(video=0)]
    spec = StreamSpec(key="g", kind="file", url=str(clip), loop=False)
    clock = ManualClock()
    reader = StreamReader(spec, ReaderPolicy(), clock=clock, shedding=lambda: True)
    reader.attach("s", LatestFrameMailbox(clock=clock))
    reader.start()
    try:
        clock.run_until(19.5)
        assert sum(keys) >= 3  # 0 s, 8 s, 8.3 s (and maybe 16 s)
        assert not reader.keyframes_only and reader.decode_switches == 0
    finally:
        reader.stop()
        clock.advance(60.0)
    assert reader.join(5)


def test_a_reconnect_decodes_all_frames_and_judges_demand_afresh(tmp_path: Path) -> None:
    """Low demand (nothing taken) took the stream to key frames after two windows. A
    reconnect (here the watchdog's restart) starts a source that decodes every frame:
    the reader says so, and judges demand again from the new connection's first frame,
    over two whole windows of it (the key frames and takes before say nothing of it)."""
    clip = write_clip(HELD_OUT_SEED_START + 1, 120, tmp_path / "r.mp4", fps=10, scale=0.25)
    spec = StreamSpec(key="r", kind="file", url=str(clip), loop=True)
    clock = ManualClock()
    reader = StreamReader(spec, ReaderPolicy(watchdog_s=2.0), clock=clock)
    reader.attach("s", LatestFrameMailbox(clock=clock))
    reader.start()
    try:
        clock.run_until(10.5)
        assert reader.keyframes_only and reader.decode_switches == 1
        assert reader.check_watchdog(clock.monotonic() + 10.0)  # forced: a restart
        clock.run_until(10.55, threads=2)  # the abandoned thread, asleep; the new one
        assert reader.state.value == "connected" and not reader.keyframes_only
        first = reader.frames_read
        clock.run_until(20.4)  # under two windows of the new connection: all frames
        assert not reader.keyframes_only and reader.frames_read - first >= 95
        clock.run_until(21.0)
        assert reader.keyframes_only and reader.decode_switches == 2
    finally:
        reader.stop()
        clock.advance(60.0)
    assert reader.join(5)


def _offered_run(tmp_path: Path, strip_rate: bool) -> list[float | None]:
    """`offered_fps` of a 10 fps clip at 0.5, 3, 11 and 32 s: its subscriber takes every
    frame for 12 s, then none, so that by 32 s low demand has had the stream on key
    frames (1 a second) for some seconds."""
    clip = write_clip(HELD_OUT_SEED_START + 1, 120, tmp_path / "o.mp4", fps=10, scale=0.25)
    spec = StreamSpec(key="o", kind="file", url=str(clip), loop=True)
    clock = ManualClock()

    def source(*args: Any, **kwargs: Any) -> Any:
        for frame in open_source(*args, clock=clock, **kwargs):
            if strip_rate:  # a stream that says nothing of its rate (some RTSP cameras)
                frame.source_fps = None
            yield frame

    reader = StreamReader(spec, ReaderPolicy(), source_factory=source, clock=clock)
    mailbox = LatestFrameMailbox(clock=clock)
    reader.attach("s", mailbox)
    seen: list[float | None] = []
    reader.start()
    try:
        for at in (0.5, 3.0, 11.0, 32.0):
            while clock.monotonic() < at - 1e-9:
                if clock.monotonic() < 12.0:
                    mailbox.take()
                clock.run_until(min(at, clock.monotonic() + 0.1))
            seen.append(reader.offered_fps())
        assert reader.keyframes_only and reader.fps() < 3.0
    finally:
        reader.stop()
        clock.advance(60.0)
    assert reader.join(5)
    return seen


def test_the_rate_a_source_offers_survives_key_frame_decoding(tmp_path: Path) -> None:
    """`offered_fps` (a subscription's weight in the fair shares) is the stream's own
    rate from its first frame, and the rate read once every frame was decoded for two
    windows where that is lower. Where the stream gives no rate, only the rate read:
    none before, the clip's 10 fps after, and still 10 while low demand has the
    stream on key frames, so that shedding never lowers a camera's weight."""
    assert _offered_run(tmp_path, strip_rate=False) == [10.0, 10.0, 10.0, 10.0]
    measured = _offered_run(tmp_path, strip_rate=True)
    assert measured[:2] == [None, None]  # under two windows of frames: not judged yet
    assert measured[2:] == [pytest.approx(10.0, abs=0.5)] * 2


def test_a_snapshot_or_a_lossless_replay_offers_no_measured_rate() -> None:
    """A snapshot URL offers its polling rate; a lossless replay, read only as fast as
    it is taken, none of its own (it weighs the default)."""
    snapshot = StreamSpec(key="s", kind="snapshot", url="http://h/x.jpg", snapshot_interval_s=2)
    assert StreamReader(snapshot, ReaderPolicy()).offered_fps() == 0.5
    replay = StreamSpec(key="l", kind="file", url="/x.mp4", lossless=True)
    assert StreamReader(replay, ReaderPolicy()).offered_fps() is None
