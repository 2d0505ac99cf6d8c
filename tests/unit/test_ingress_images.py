"""Uploaded images are refused from their header when they would decode to too many
pixels, including a real PIL decompression bomb (no Ray)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from deployments.api.detect import prepare
from graph.common.vision import header_pixels


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG header of width × height whose data is one short row: a few
    hundred bytes that claim hundreds of megapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def test_a_pil_decompression_bomb_is_refused_by_its_size_not_a_crash() -> None:
    data = bomb_png(30_000, 30_000)
    assert len(data) < 10_000
    assert header_pixels(data) == 900_000_000
    refused = prepare(data, 640, max_pixels=50_000_000)
    assert refused == "the image has 900000000 pixels, more than the limit of 50000000"


def test_a_normal_image_is_decoded_and_letterboxed() -> None:
    ok, jpeg = cv2.imencode(".jpg", np.full((120, 160, 3), 80, np.uint8))
    assert ok
    assert header_pixels(jpeg.tobytes()) == 120 * 160
    prepared = prepare(jpeg.tobytes(), 64, max_pixels=50_000_000)
    assert not isinstance(prepared, str)
    boxed, _ = prepared
    assert boxed.shape == (64, 64, 3)
