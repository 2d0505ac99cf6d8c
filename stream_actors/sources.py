"""Camera sources (no Ray): RTSP and video files through PyAV, HTTP snapshot polling.

Every failure surfaces as a typed `SourceError`; the camera actor (issue 4) turns those
into reconnects with backoff. A source yields BGR frames with their capture time.
"""

from __future__ import annotations

import functools
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from graph.common.errors import CamgraphError
from graph.common.netpolicy import DEFAULT_DENIED, Network, denied, networks
from graph.common.redaction import redact, redact_text
from graph.common.vision import header_pixels


class SourceError(CamgraphError):
    """Base of camera source failures; `url` says which camera, without its secrets.

    Its text reaches `last_error` (`GET /streams`, `stateReport.lastError`) and the
    logs, so neither `url` nor `reason` (often a library's message, which quotes the
    URL) keeps a password or a secret query value: the URL is redacted, and so is the
    reason, of the URL (as written or percent-decoded) and of each secret value."""

    def __init__(self, url: str, reason: str) -> None:
        shown, reason = redact(url), redact_text(reason, url)
        super().__init__(shown, reason)  # args, pickled across Ray: redacted as well
        self.url, self.reason = shown, reason

    def __str__(self) -> str:
        return f"{self.url}: {self.reason}"


class SourceConnectionError(SourceError):
    """The source could not be opened (refused, not found, not a video)."""


class SourceReadError(SourceError):
    """The source opened but a read failed, ended or returned garbage."""


class CapturedFrame:
    """A frame and its capture time. The BGR array can be made on first use: under load
    most frames are superseded before anyone looks at them, and the colour conversion
    costs about as much as decoding (measured: ~0.5-2 ms vs ~3 ms for 640x360)."""

    __slots__ = ("_convert", "_image", "captured_at", "key_frame", "source_fps")

    def __init__(
        self,
        image: np.ndarray | None,
        captured_at: float,
        convert: Callable[[], np.ndarray] | None = None,
        key_frame: bool = False,
        source_fps: float | None = None,
    ) -> None:
        if image is None and convert is None:
            raise ValueError("an image or a conversion is required")
        self._image, self._convert, self.captured_at = image, convert, captured_at
        self.key_frame = key_frame
        self.source_fps = source_fps  # the stream's own frame rate, where it gives one

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            assert self._convert is not None
            self._image, self._convert = self._convert(), None  # a race converts twice: harmless
        return self._image


# Measured on RTSP peers: TCP and a short analysis open in ~0.5 s instead of 3-4 s.
RTSP_OPTIONS = {"rtsp_transport": "tcp", "analyzeduration": "100000"}


class PyAVSource:
    """RTSP URL or video file. Files can be paced to their frame rate and looped.

    `keyframes_only`, polled after every frame, switches the decoder to key frames only
    (FFmpeg's skip_frame=NONKEY) and back: when the consumers cannot use more frames
    than the key frames anyway, decoding the others is wasted CPU (measured: 6.5x less
    decode time for a clip with a key frame every 10 frames)."""

    def __init__(
        self,
        url: str,
        *,
        open_timeout_s: float = 3.0,
        read_timeout_s: float = 3.0,
        pace: bool = False,
        loop: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        keyframes_only: Callable[[], bool] | None = None,
        media_time: bool = False,
    ) -> None:
        self.url, self.pace, self.loop = url, pace, loop
        # Replays processed as fast as the graph goes stamp frames with the file's own
        # clock (the start + each frame's time), so tracking sees the scene's real motion.
        self.media_time = media_time
        self._timeouts = (open_timeout_s, read_timeout_s)
        self._sleep, self._clock = sleep, clock
        self._keyframes_only = keyframes_only

    def _open(self) -> Any:
        import av

        options = RTSP_OPTIONS if self.url.startswith(("rtsp://", "rtsps://")) else {}
        try:
            return av.open(self.url, options=options, timeout=self._timeouts)
        except (av.error.FFmpegError, OSError) as exc:
            # Not chained: the library's exception holds the raw URL (its message, args,
            # `filename`), and a logged traceback would print it.
            raise SourceConnectionError(self.url, f"{type(exc).__name__}: {exc}") from None

    def frames(self) -> Iterator[CapturedFrame]:
        """Decoded frames; ends (files without loop) or raises SourceError."""
        import av

        last = 0.0
        while True:
            container = self._open()
            try:
                if not container.streams.video:
                    raise SourceConnectionError(self.url, "no video stream")
                stream = container.streams.video[0]
                rate = float(stream.average_rate or stream.guessed_rate or 0) or None
                # A looped replay's clock never runs backwards.
                start, first_time, wall_start = self._clock(), None, max(time.time(), last + 0.1)
                got_any, skipping = False, False
                for count, frame in enumerate(container.decode(stream)):
                    t = frame.time if frame.time is not None else count / (rate or 10.0)
                    first_time = t if first_time is None else first_time
                    if self.pace and rate:
                        # Due at the frame's own time (so skipped frames are not waited
                        # for); by count where a frame has no timestamp.
                        delay = start + (t - first_time) - self._clock()
                        if delay > 0:
                            self._sleep(delay)
                        elif delay < -1.0:  # fell behind (e.g. a stall): do not catch up
                            start -= delay
                    got_any = True
                    last = wall_start + (t - first_time) if self.media_time else time.time()
                    yield CapturedFrame(
                        None,
                        last,
                        functools.partial(frame.to_ndarray, format="bgr24"),
                        key_frame=bool(frame.key_frame),
                        source_fps=rate,
                    )
                    if self._keyframes_only is not None and self._keyframes_only() != skipping:
                        skipping = not skipping
                        stream.codec_context.skip_frame = "NONKEY" if skipping else "DEFAULT"
            except av.error.FFmpegError as exc:  # ExitError, InvalidDataError, HTTPServerError
                raise SourceReadError(self.url, f"{type(exc).__name__}: {exc}") from None
            finally:
                container.close()
            if not got_any:
                raise SourceReadError(self.url, "the stream ended before any frame")
            if not self.loop:
                if self.url.startswith(("rtsp://", "rtsps://", "http://", "https://")):
                    raise SourceReadError(self.url, "the stream ended")  # a live camera: reconnect
                return


class _PolicyRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects only to http(s) (urllib also follows ftp://) and never into a denied
    network."""

    def __init__(self, deny: Sequence[Network]) -> None:
        super().__init__()
        self.deny = deny

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str):  # type: ignore[no-untyped-def]
        if not newurl.lower().startswith(("http://", "https://")) or denied(newurl, self.deny):
            raise urllib.error.HTTPError(newurl, code, "refused by policy: redirect", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class SnapshotSource:
    """Polls an HTTP(S) JPEG snapshot URL every `interval_s`. A snapshot whose header
    says it has more than `max_pixels` is refused before it is decoded (a few MB of PNG
    can decode to gigabytes)."""

    def __init__(
        self,
        url: str,
        interval_s: float = 1.0,
        timeout_s: float = 3.0,
        max_bytes: int = 20 * 1024 * 1024,
        max_pixels: int = 40_000_000,
        deny: Sequence[Network] = networks(DEFAULT_DENIED),
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise SourceConnectionError(url, "snapshot URLs must be http(s)")
        self.url, self.interval_s, self.timeout_s, self.max_bytes = (
            url,
            interval_s,
            timeout_s,
            max_bytes,
        )
        self.max_pixels, self.deny = max_pixels, tuple(deny)
        self._opener = urllib.request.build_opener(_PolicyRedirects(self.deny))
        self._sleep, self._clock = sleep, clock

    def grab(self) -> CapturedFrame:
        if (refusal := denied(self.url, self.deny)) is not None:
            raise SourceConnectionError(self.url, refusal)
        try:
            with self._opener.open(self.url, timeout=self.timeout_s) as response:
                data = response.read(self.max_bytes + 1)
        # Not chained (see PyAVSource._open). HTTPError is a URLError, URLError an OSError;
        # InvalidURL (its message quotes a part of the URL, a password too) and ValueError:
        # an unusable URL; other HTTPExceptions: a peer that is no HTTP server.
        except urllib.error.HTTPError as exc:
            raise SourceReadError(self.url, f"HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.InvalidURL) as exc:
            raise SourceConnectionError(self.url, f"{type(exc).__name__}: {exc}") from None
        except http.client.HTTPException as exc:
            raise SourceReadError(self.url, f"{type(exc).__name__}: {exc}") from None
        if len(data) > self.max_bytes:
            raise SourceReadError(self.url, f"snapshot larger than {self.max_bytes} bytes")
        pixels = header_pixels(data) if data else None
        if pixels is None:  # empty, or a format whose size is unknown before decoding
            raise SourceReadError(self.url, "undecodable snapshot")
        if pixels > self.max_pixels:
            raise SourceReadError(
                self.url, f"snapshot of {pixels} pixels, more than the limit of {self.max_pixels}"
            )
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if image is None:
            raise SourceReadError(self.url, "undecodable snapshot")
        return CapturedFrame(image, time.time())

    def frames(self) -> Iterator[CapturedFrame]:
        next_due = self._clock()
        while True:
            delay = next_due - self._clock()
            if delay > 0:
                self._sleep(delay)
            next_due = max(next_due + self.interval_s, self._clock())
            yield self.grab()
