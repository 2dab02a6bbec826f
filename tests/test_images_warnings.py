"""Decoder noise becomes data on the result: Python warnings and C-level fd-2 output, never the terminal."""
from __future__ import annotations

import ctypes
import io
import warnings
from typing import Literal

import pytest
from PIL import Image

from steadyclip.engine._capture import captured
from steadyclip.engine.images import WARNINGS_INFO_KEY, decode_image, load_image


def _png_with_corrupt_exif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 2), (0, 255, 0)).save(buf, format="PNG", exif=b"II*\x00\x08\x00\x00\x00\xff\xff")
    return buf.getvalue()


@pytest.mark.parametrize("action", ["default", "error", "ignore"])
def test_pillow_warnings_are_recorded_whatever_the_filter(action: Literal["default", "error", "ignore"],
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter(action)
        out = decode_image(_png_with_corrupt_exif())
    assert out.image.mode == "RGB" and out.image.size == (4, 2)
    assert any("Corrupt EXIF" in w for w in out.warnings), out.warnings
    assert load_image(_png_with_corrupt_exif()).info[WARNINGS_INFO_KEY] == out.warnings
    assert "Corrupt EXIF" not in capfd.readouterr().err


def test_a_clean_image_has_no_warnings() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.warnings == () and WARNINGS_INFO_KEY not in out.image.info


def test_c_level_stderr_is_captured_and_fd2_restored(capfd: pytest.CaptureFixture[str]) -> None:
    libc = ctypes.CDLL(None)
    line = b"TIFFReadDirectory: Warning, Unknown field with tag 65000 (0xfde8) encountered.\n"
    notes: list[str] = []
    with captured(notes, fd_stderr=True):
        libc.write(2, line, len(line))
    libc.write(2, b"after\n", 6)
    assert notes == ["stderr: " + line.decode().strip()]
    assert capfd.readouterr().err == "after\n"
