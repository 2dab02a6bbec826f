"""Safe image input: every mode lands as the RGB a user would see; bad input gets a typed error."""
from __future__ import annotations

import hashlib
import io
import logging
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from steadyclip.engine.images import EXIF_INFO_KEY, image_sha256, load_image
from steadyclip.errors import (
    ImageDecodeError,
    ImageError,
    ImageSourceError,
    ImageTooLargeError,
    InputError,
)


def encode(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def px(im: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(im.getpixel(xy))  # type: ignore[arg-type]


def quadrants() -> Image.Image:
    """4x2 image: left column red, everything else blue; top-left pixel marked green."""
    im = Image.new("RGB", (4, 2), (0, 0, 255))
    im.putpixel((0, 1), (255, 0, 0))
    im.putpixel((0, 0), (0, 255, 0))
    return im


def with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "PNG", exif=exif.tobytes())


def patch_ihdr(png: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR size (and its CRC): a 'decompression bomb' header on a tiny file."""
    assert png[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return png[:16] + body + crc + png[33:]


# ---- orientation -------------------------------------------------------------------------
def test_exif_orientation_6_is_applied_and_not_left_for_a_second_rotation() -> None:
    out = load_image(with_orientation(quadrants(), 6))
    assert out.size == (2, 4)  # rotated 90 degrees clockwise: width and height swap
    assert px(out, (1, 0)) == (0, 255, 0)  # stored top-left ends up top-right
    assert px(out, (0, 0)) == (255, 0, 0)
    assert out.info[EXIF_INFO_KEY] == "orientation 6 applied"
    assert out.getexif().get(0x0112) is None  # nothing downstream can rotate it again


@pytest.mark.parametrize("orientation,size,green_at", [
    (1, (4, 2), (0, 0)), (2, (4, 2), (3, 0)), (3, (4, 2), (3, 1)), (4, (4, 2), (0, 1)),
    (5, (2, 4), (0, 0)), (6, (2, 4), (1, 0)), (7, (2, 4), (1, 3)), (8, (2, 4), (0, 3)),
])
def test_every_exif_orientation(orientation: int, size: tuple[int, int], green_at: tuple[int, int]) -> None:
    out = load_image(with_orientation(quadrants(), orientation))
    assert out.size == size
    assert px(out, green_at) == (0, 255, 0)


def test_unreadable_exif_is_logged_and_recorded_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    data = encode(quadrants(), "PNG", exif=b"\x00\x00\x00garbage")
    with caplog.at_level(logging.WARNING, logger="steadyclip.engine.images"):
        out = load_image(data)
    assert out.size == (4, 2) and px(out) == (0, 255, 0)
    assert out.info[EXIF_INFO_KEY].startswith("unreadable")
    assert "EXIF block unreadable" in caplog.text


@pytest.mark.filterwarnings("error")
def test_corrupt_exif_under_warnings_as_errors_still_loads_unrotated() -> None:
    out = load_image(encode(quadrants(), "PNG", exif=b"II*\x00\x08\x00\x00\x00\xff\xff"))
    assert out.size == (4, 2) and out.info[EXIF_INFO_KEY].startswith("unreadable")


# ---- modes -------------------------------------------------------------------------------
def test_sixteen_bit_gradient_is_scaled_not_clipped() -> None:
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = load_image(encode(Image.fromarray(values)))  # a 16-bit greyscale PNG
    got = np.asarray(out)
    assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
    assert np.array_equal(got[..., 0], np.rint(values / 257.0).astype(np.uint8))
    assert np.array_equal(got[..., 0], got[..., 2])
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) == 256


def test_mode_i_is_read_as_sixteen_bit_and_refuses_out_of_range() -> None:
    im = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    assert im.mode == "I"
    assert [px(load_image(im), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    with pytest.raises(ImageDecodeError, match="outside 0..65535"):
        load_image(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)))


def test_float_images_unit_range_scaled_and_nan_refused() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [px(load_image(unit), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    byte_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert [px(load_image(byte_range), (x, 0))[0] for x in range(3)] == [0, 100, 255]
    with pytest.raises(ImageDecodeError, match="NaN"):
        load_image(Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32)))


def test_rgba_is_composited_onto_white_or_the_given_background() -> None:
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (255, 0, 0, 128))
    out = load_image(encode(im))
    assert px(out, (0, 0)) == (255, 255, 255)
    assert px(out, (1, 0)) == (255, 0, 0)
    assert px(out, (2, 0)) in {(255, 127, 127), (255, 128, 128)}
    assert px(load_image(im, background=(0, 0, 0)), (0, 0)) == (0, 0, 0)


def test_palette_with_transparency_is_composited() -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    for fmt in ("PNG", "GIF"):
        out = load_image(encode(im, fmt, transparency=0))
        assert px(out, (0, 0)) == (255, 255, 255), fmt
        assert px(out, (1, 0)) == (200, 0, 0), fmt


@pytest.mark.parametrize("mode,value,expected", [
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("CMYK", (255, 0, 0, 0), (0, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("LA", (90, 0), (255, 255, 255)),
    ("LA", (90, 255), (90, 90, 90)),
    ("PA", (0, 255), (0, 0, 0)),
    ("YCbCr", (128, 128, 128), (128, 128, 128)),
    ("LAB", (128, 128, 128), (119, 119, 119)),  # L*=50 grey in sRGB
    ("HSV", (0, 255, 255), (255, 0, 0)),
    ("RGBa", (0, 0, 0, 0), (255, 255, 255)),
])
def test_other_modes_become_the_expected_rgb(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    out = load_image(Image.new(mode, (2, 2), value))  # type: ignore[arg-type]
    assert out.mode == "RGB" and px(out) == expected


def test_cmyk_jpeg_file() -> None:
    out = load_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = px(out)
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_image_gives_the_first_frame(fmt: str, kw: dict[str, object]) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **kw)
    out = load_image(data)
    assert out.info["steadyclip_animated"] is True
    assert px(out) == (255, 0, 0)


def test_pil_image_on_a_later_frame_gives_first_and_is_left_where_it_was() -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = Image.open(io.BytesIO(encode(frames[0], "GIF", save_all=True, append_images=frames[1:])))
    gif.seek(2)
    assert px(load_image(gif)) == (255, 0, 0)
    assert gif.tell() == 2


def test_result_is_a_new_image_not_the_callers() -> None:
    mine = Image.new("RGB", (2, 2), (1, 2, 3))
    out = load_image(mine)
    out.putpixel((0, 0), (9, 9, 9))
    assert px(mine) == (1, 2, 3)


# ---- sources -----------------------------------------------------------------------------
def test_paths_bytes_bytearray_and_file_objects_agree(tmp_path: Path) -> None:
    data = encode(quadrants())
    path = tmp_path / "q.png"
    path.write_bytes(data)
    ref = np.asarray(load_image(data))
    with open(path, "rb") as f:
        for src in (str(path), path, bytearray(data), f, io.BytesIO(data)):
            assert np.array_equal(np.asarray(load_image(src)), ref)  # type: ignore[arg-type]


def test_image_sha256_hashes_raw_bytes(tmp_path: Path) -> None:
    data = encode(quadrants())
    path = tmp_path / "q.png"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    stream = io.BytesIO(data)
    assert image_sha256(data) == image_sha256(path) == image_sha256(stream) == want
    assert stream.tell() == 0  # a caller's stream is left where it was
    with pytest.raises(ImageSourceError):
        image_sha256(quadrants())  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [12, None, 3.5, ["a.png"], {"path": "a.png"}])
def test_non_image_types_are_source_errors(bad: object) -> None:
    with pytest.raises(ImageSourceError, match="file path, the file's bytes"):
        load_image(bad)  # type: ignore[arg-type]


def test_missing_path_directory_and_url_are_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageSourceError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageSourceError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageSourceError, match="URL"):
        load_image("https://example.com/cat.jpg")


def test_text_file_named_jpg_empty_and_random_bytes_are_decode_errors(tmp_path: Path) -> None:
    fake = tmp_path / "photo.jpg"
    fake.write_text("<html>not an image</html>")
    with pytest.raises(ImageDecodeError, match=r"photo\.jpg is not a recognised image"):
        load_image(fake)
    with pytest.raises(ImageDecodeError, match=r"<bytes len=0> is empty"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match=r"<bytes len=4096>"):
        load_image(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path / "empty.png")


def test_postscript_is_refused_unread() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        load_image(eps)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_decode_errors_even_if_someone_enabled_truncated_loading(
        fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        load_image(data[: len(data) * 2 // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError):
        load_image(data[: len(data) * 2 // 3])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---- size caps ---------------------------------------------------------------------------
def test_decompression_bomb_is_refused_from_the_header_fast_and_small() -> None:
    bomb = patch_ihdr(encode(Image.new("L", (1, 1))), 100_000, 100_000)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        load_image(bomb)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 5_000_000
    assert "max_pixels" in str(info.value) and isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_pixel_cap_reports_the_numbers_and_how_to_raise_it() -> None:
    header_only = patch_ihdr(encode(Image.new("RGB", (1, 1))), 3000, 2000)
    with pytest.raises(ImageTooLargeError, match=r"3000x2000 = 6,000,000 pixels.*max_pixels=6000000"):
        load_image(header_only, max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (50, 50)), max_pixels=2499)
    assert load_image(Image.new("RGB", (50, 50)), max_pixels=2500).size == (50, 50)


def test_bad_options_are_input_errors() -> None:
    with pytest.raises(InputError, match="max_pixels"):
        load_image(b"x", max_pixels=0)
    with pytest.raises(InputError, match="background"):
        load_image(b"x", background=(0, 0, 300))


# ---- fuzzing -----------------------------------------------------------------------------
def _seeds() -> list[bytes]:
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(rgb.convert("RGBA"), "PNG"),
        encode(rgb, "JPEG", quality=80, exif=exif.tobytes()),
        encode(rgb.convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames]),
        encode(rgb, "WEBP", quality=70),
        encode(Image.fromarray(np.arange(120, dtype=np.uint16).reshape(12, 10) * 500), "PNG"),
        encode(rgb, "TIFF", compression="tiff_lzw"),
        encode(rgb.convert("LA"), "PNG", save_all=True, append_images=[rgb.convert("LA")]),  # APNG
    ]


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "byte", "cut", "insert", "dup"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 32))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt metadata it skips
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzzed_files_give_rgb_or_an_image_error(data: bytes) -> None:
    try:
        out = load_image(data, max_pixels=1 << 20)
    except ImageError:
        return
    assert out.mode == "RGB" and out.size[0] * out.size[1] <= 1 << 20
    out.tobytes()  # fully decoded: nothing left to fail lazily
