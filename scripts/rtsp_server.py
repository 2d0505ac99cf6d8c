#!/usr/bin/python3
"""A real RTSP camera for tests and benchmarks: GStreamer's RTSP server serving looping
H.264 files over RTSP (TCP or UDP), bound to 127.0.0.1.

Run it with Debian's own /usr/bin/python3 (it needs `gi`), e.g.
    /usr/bin/python3 scripts/rtsp_server.py --port 8554 cam=clip.mp4 --copies 4
serves rtsp://127.0.0.1:8554/cam0 .. /cam3, all fed from one looping player.

Measured lessons (../shared/NOTES-peers.md): a file pipeline per client stops at end of
file, so each file is played once, in a loop, by a "live" player pipeline whose access
units are pushed into every mount's appsrc (no re-encoding); the payloader must not
re-insert SPS/PPS; the listen backlog and the thread pool are raised so that many
concurrent opens succeed. The files must be H.264 without B-frames (appsrc stamps
arrival times).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

MOUNT_LAUNCH = (
    "( appsrc name=src is-live=true format=time do-timestamp=true "
    "caps=video/x-h264,stream-format=byte-stream,alignment=au "
    "! h264parse ! rtph264pay name=pay0 pt=96 config-interval=0 )"
)


class LoopingPlayer:
    """Plays one H.264 file forever at its own rate and fans its access units out."""

    def __init__(self, path: str) -> None:
        self.sinks: list[Gst.Element] = []
        self.lock = threading.Lock()
        self.pipeline = Gst.parse_launch(
            f'filesrc location="{path}" ! qtdemux ! h264parse config-interval=-1 '
            "! video/x-h264,stream-format=byte-stream,alignment=au "
            "! appsink name=out emit-signals=true sync=true max-buffers=4 drop=true"
        )
        out = self.pipeline.get_by_name("out")
        out.connect("new-sample", self._on_sample)
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message::eos", self._on_eos)
        bus.connect("message::error", self._on_error)

    def start(self) -> None:
        self.pipeline.set_state(Gst.State.PLAYING)

    def _on_sample(self, sink: Gst.Element) -> Gst.FlowReturn:
        sample = sink.emit("pull-sample")
        buffer = sample.get_buffer()
        data = buffer.extract_dup(0, buffer.get_size())
        with self.lock:
            targets = list(self.sinks)
        for appsrc in targets:
            appsrc.emit("push-buffer", Gst.Buffer.new_wrapped(data))
        return Gst.FlowReturn.OK

    def _on_eos(self, _bus: Gst.Bus, _msg: Gst.Message) -> None:
        # Loop: seek back to the start (flushing resets the running time).
        self.pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH, 0)

    def _on_error(self, _bus: Gst.Bus, msg: Gst.Message) -> None:
        err, debug = msg.parse_error()
        print(f"player error: {err} {debug}", file=sys.stderr, flush=True)

    def attach(self, appsrc: Gst.Element) -> None:
        with self.lock:
            self.sinks.append(appsrc)

    def detach(self, appsrc: Gst.Element) -> None:
        with self.lock:
            if appsrc in self.sinks:
                self.sinks.remove(appsrc)


class MountFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, player: LoopingPlayer) -> None:
        super().__init__()
        self.player = player
        self.set_launch(MOUNT_LAUNCH)
        self.set_shared(True)
        self.connect("media-configure", self._configure)

    def _configure(self, _factory: object, media: GstRtspServer.RTSPMedia) -> None:
        appsrc = media.get_element().get_child_by_name("src")
        self.player.attach(appsrc)
        media.connect("unprepared", lambda _m: self.player.detach(appsrc))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mounts", nargs="+", help="name=file.mp4 (H.264, no B-frames)")
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--copies", type=int, default=1, help="mounts name0..nameN-1 per file")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.set_backlog(256)
    pool = GstRtspServer.RTSPThreadPool()
    pool.set_max_threads(args.threads)
    server.set_thread_pool(pool)
    mounts = server.get_mount_points()
    players = []
    for spec in args.mounts:
        name, _, path = spec.partition("=")
        player = LoopingPlayer(path)
        players.append(player)
        names = [name] if args.copies == 1 else [f"{name}{i}" for i in range(args.copies)]
        for mount in names:
            mounts.add_factory(f"/{mount}", MountFactory(player))
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    for player in players:
        player.start()
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    print(f"ready rtsp://127.0.0.1:{args.port}/", flush=True)
    loop.run()
    for player in players:
        player.pipeline.set_state(Gst.State.NULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
