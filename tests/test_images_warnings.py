"""Decoder noise becomes data on the result: Python warnings and C-level fd-2 output, never the terminal."""
from __future__ import annotations

import ctypes
import io
import logging
import struct
import warnings
from typing import Literal

import pytest
from PIL import Image

from steadyclip.engine._capture import captured
from steadyclip.engine.images import WARNINGS_INFO_KEY, decode_image, load_image
from steadyclip.engine.outcome import decode_input


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


def _tiff_with_too_many_samples() -> bytes:
    """A 1x1 TIFF claiming 7 samples per pixel: Pillow logs an ERROR record, then refuses it."""
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 10 * 12 + 4),
               (277, 3, 7), (278, 3, 1), (279, 4, 7), (284, 3, 1)]  # (tag, type SHORT/LONG, value)
    ifd = struct.pack("<H", len(entries))
    for tag, typ, value in entries:
        ifd += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(7)


def test_pillow_log_records_land_in_the_outcome_not_on_stderr(capfd: pytest.CaptureFixture[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # a verbose CLI: PIL's records would reach a handler and be printed
    root = logging.getLogger()
    printer = logging.StreamHandler()  # what a CLI installs: records to stderr (an ERROR would print)
    printer.setLevel(logging.INFO)
    root.addHandler(printer)
    try:
        outcome, pixels = decode_input(3, _tiff_with_too_many_samples(), lambda im: im, source="bad.tif")
    finally:
        root.removeHandler(printer)
    assert pixels is None and (outcome.index, outcome.source, outcome.error_type) == (3, "bad.tif", "ImageDecodeError")
    assert "ERROR PIL.TiffImagePlugin: More samples per pixel than can be decoded: 7" in outcome.warnings
    assert not [r for r in caplog.records if r.name.startswith("PIL")]
    assert "samples per pixel" not in capfd.readouterr().err
    # the logger is as it was: records from outside a capture propagate again
    assert logging.getLogger("PIL").propagate and not logging.getLogger("PIL").handlers
