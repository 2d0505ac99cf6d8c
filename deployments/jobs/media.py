"""Media of a job: download (network policy, size and time limits), decoding of images
and videos with pixel limits."""

from __future__ import annotations

import asyncio
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from deployments.jobs.records import MediaError, _JobCancelled, redact_url
from graph.common.netpolicy import DEFAULT_DENIED, denied, networks


async def download(
    url: str,
    directory: Path,
    max_bytes: int,
    timeout_s: float,
    cancelled: asyncio.Event | None = None,
    denied_networks: Sequence[str] = DEFAULT_DENIED,
) -> Path:
    """Fetch `url` into a temp file under `directory`; MediaError when it fails, takes
    longer than `timeout_s` or is larger than `max_bytes` (checked as it streams), or
    when it (or a redirect) goes to a denied network."""
    shown = redact_url(url)
    deny = networks(denied_networks)
    if (refusal := await asyncio.to_thread(denied, url, deny)) is not None:
        raise MediaError(refusal)

    async def check_request(request: httpx.Request) -> None:
        """Every request, the redirects' too: http(s) only, never a denied network."""
        target = str(request.url)
        refusal = await asyncio.to_thread(denied, target, deny)
        if not target.startswith(("http://", "https://")) or refusal is not None:
            raise MediaError("refused by policy: redirect")

    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="media-", suffix=".part")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            async with (
                asyncio.timeout(timeout_s),
                httpx.AsyncClient(
                    follow_redirects=True,
                    timeout=min(timeout_s, 30.0),
                    event_hooks={"request": [check_request]},
                ) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise MediaError(f"download of {shown} failed: HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise MediaError(
                        f"the media at {shown} is {int(declared)} bytes, "
                        f"more than the limit of {max_bytes} bytes"
                    )
                size = 0
                async for chunk in response.aiter_bytes(256 * 1024):
                    if cancelled is not None and cancelled.is_set():
                        raise _JobCancelled
                    size += len(chunk)
                    if size > max_bytes:
                        raise MediaError(
                            f"the media at {shown} is larger than the limit of {max_bytes} bytes"
                        )
                    out.write(chunk)
        return path
    except TimeoutError:
        path.unlink(missing_ok=True)
        raise MediaError(f"download of {shown} took longer than {timeout_s}s") from None
    except httpx.HTTPError as exc:
        path.unlink(missing_ok=True)
        raise MediaError(f"download of {shown} failed: {type(exc).__name__}: {exc}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@dataclass
class _Video:
    capture: Any  # cv2.VideoCapture
    frame_count: int | None
    fps: float | None


def _image_pixels(path: Path) -> int | None:
    """Width x height from the header alone, or None if PIL does not know the format."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return int(image.width) * int(image.height)
    except Image.DecompressionBombError:
        return 2**62
    except (UnidentifiedImageError, OSError, ValueError, ImportError):
        # ImportError: a PIL plugin registered by another library (ultralytics' HEIF
        # opener) whose module is missing; the format is simply unknown here.
        return None


def open_media(path: Path, max_pixels: int) -> np.ndarray | _Video:
    """A decoded image, or an opened video; MediaError when it is neither. Too many pixels
    are refused from the header, before decoding."""
    if not path.is_file():
        raise MediaError(f"no such file: {path}")
    pixels = _image_pixels(path)
    if pixels is not None and pixels > max_pixels:
        raise MediaError(f"the image has more than the limit of {max_pixels} pixels")
    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # reads the signature first
    except cv2.error:
        image = None
    if image is not None and image.size:
        if image.shape[0] * image.shape[1] > max_pixels:
            raise MediaError(f"the image has more than the limit of {max_pixels} pixels")
        return image
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise MediaError(f"{path.name} is not a readable image or video")
    w, h = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    if w * h > max_pixels:
        capture.release()
        raise MediaError(f"the video's frames have more than the limit of {max_pixels} pixels")
    count, fps = capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(cv2.CAP_PROP_FPS)
    return _Video(capture, int(count) if count > 0 else None, fps if fps > 0 else None)


def _read_frame(video: _Video, skip: int) -> tuple[np.ndarray, float] | None:
    """Skip `skip` frames (grab only), read the next: the frame and its time in seconds."""
    for _ in range(skip):
        if not video.capture.grab():
            return None
    ok, frame = video.capture.read()
    if not ok or frame is None:
        return None
    return frame, float(video.capture.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0
