"""Uploaded images, as a detector replica decodes them for /detect: refused from their
header when they would decode to too many pixels (a real PIL decompression bomb too),
refused when they are no image, letterboxed otherwise (no Ray)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from graph.common.errors import BadImageError
from graph.common.vision import decode_letterboxed, header_pixels


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
    limit = "the image has 900000000 pixels, more than the limit of 50000000"
    with pytest.raises(BadImageError, match=limit):
        decode_letterboxed(data, 640, max_pixels=50_000_000)


def test_a_normal_image_is_decoded_and_letterboxed() -> None:
    ok, jpeg = cv2.imencode(".jpg", np.full((120, 160, 3), 80, np.uint8))
    assert ok
    assert header_pixels(jpeg.tobytes()) == 120 * 160
    boxed, lb = decode_letterboxed(jpeg.tobytes(), 64, max_pixels=50_000_000)
    assert boxed.shape == (64, 64, 3)
    assert (lb.orig_h, lb.orig_w, lb.pad_top) == (120, 160, 8)


@pytest.mark.parametrize("data", [b"\x00garbage", b"\xff\xd8\xff\xe0" + b"\x00" * 64])
def test_bytes_that_are_no_image_are_a_bad_image_error(data: bytes) -> None:
    with pytest.raises(BadImageError, match="not a decodable image"):
        decode_letterboxed(data, 64, max_pixels=50_000_000)


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded() -> None:
    ok, png = cv2.imencode(".png", np.zeros((100, 100, 3), np.uint8))
    assert ok
    with pytest.raises(BadImageError, match="10000 pixels, more than the limit of 9999"):
        decode_letterboxed(png.tobytes(), 64, max_pixels=9_999)
