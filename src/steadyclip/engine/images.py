"""Safe image input: any path, bytes or PIL image in, one fully decoded RGB image out.

What a caller can rely on (each is tested):

- **Pixel cap before decoding.** The header's width x height is checked against
  ``max_pixels`` before any pixel is decoded, so a decompression bomb (a tiny
  file claiming 100k x 100k) costs a header read. Pillow's own bomb check
  (``PIL.Image.MAX_IMAGE_PIXELS``) still applies and is reported the same way;
  steadyclip never changes that process-global.
- **No lazy failures.** The image is fully decoded inside :func:`load_image`;
  a truncated or corrupt file raises here, never later in a model forward.
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is kept off: a truncated file would
  otherwise be grey-filled silently and give a confidently wrong embedding.
- **Only common raster formats** (:data:`DEFAULT_FORMATS`); EPS/PDF-like
  formats that shell out to other programs are refused unread.
- **EXIF orientation applied**, then the orientation metadata dropped, so nothing
  downstream rotates twice. An unreadable EXIF block leaves the image unrotated;
  that is logged and recorded in ``image.info["steadyclip_exif"]``.
- **Alpha composited** onto ``background`` (default white): RGBA, LA, PA, premultiplied
  modes, palettes and colour keys with transparency.
- **Modes**: 16-bit greyscale is scaled ``round(v / 257)`` (not clipped); mode ``I`` is
  read as 16-bit; float ``F`` in [0, 1] is scaled by 255, in [0, 255] used as is;
  CMYK, YCbCr, LAB, HSV, 1-bit and palettes use Pillow's conversions. ICC
  profiles are ignored, as in open_clip's own loaders (models were trained so).
- **Animated** GIF/APNG/WebP: the first frame.
- **Decoder noise is data.** Warnings Pillow raises and what libtiff prints to stderr while
  decoding become :attr:`DecodedImage.warnings` (:func:`decode_image`), never terminal output,
  whatever the process's warnings filter; :func:`load_image` puts them in
  ``image.info["steadyclip_warnings"]`` when there are any.

Every failure is an :class:`~steadyclip.errors.ImageError`: ``ImageSourceError``
(missing path, directory, wrong type), ``ImageDecodeError`` (empty, corrupt,
truncated, unknown format), ``ImageTooLargeError`` (over the pixel cap).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from steadyclip.engine._capture import captured
from steadyclip.engine._pixels import to_rgb as _to_rgb
from steadyclip.engine.errmap import DECODE_ERRORS, decoding
from steadyclip.errors import (
    ImageDecodeError,
    ImageSourceError,
    ImageTooLargeError,
    InputError,
)

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "EXIF_INFO_KEY",
    "WARNINGS_INFO_KEY",
    "DecodedImage",
    "ImageInput",
    "decode_image",
    "decode_into",
    "image_sha256",
    "load_image",
]

_logger = logging.getLogger(__name__)

ImageInput = str | os.PathLike[str] | bytes | Image.Image | IO[bytes]
"""What :func:`load_image` accepts: a path, the file's bytes, a PIL image, a binary file object."""

#: 64 Mpx: above 8K video frames and 50 Mpx phone photos; ~200 MB once decoded to RGB.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

#: Formats Pillow may try. Not here on purpose: EPS (runs Ghostscript), PDF, and
#: rarely-used plugins whose parsers see little fuzzing.
DEFAULT_FORMATS: tuple[str, ...] = (
    "PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "AVIF", "JPEG2000", "QOI",
)

#: ``image.info`` key recording what happened to EXIF orientation.
EXIF_INFO_KEY = "steadyclip_exif"
#: ``image.info`` key holding the decoder's warnings (a tuple of strings), when there are any.
WARNINGS_INFO_KEY = "steadyclip_warnings"

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DecodedImage:
    """A decoded RGB image and what the decoders warned about while producing it."""

    image: Image.Image
    warnings: tuple[str, ...] = ()


def decode_image(
    src: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    formats: Sequence[str] | None = DEFAULT_FORMATS,
    name: str | None = None,
) -> DecodedImage:
    """Decode ``src`` fully into an RGB image, safely, keeping the decoders' warnings.

    Args:
        src: a path, the file's bytes, a binary file object, or a PIL image.
        max_pixels: largest width x height accepted (``None``: :data:`DEFAULT_MAX_PIXELS`).
        background: RGB that transparent pixels are composited onto.
        formats: Pillow format names to accept (``None``: every installed plugin).
        name: how messages name ``src`` (default: its path, ``<bytes len=N>``, the file object's name).

    Returns:
        :class:`DecodedImage`: a new, fully loaded ``RGB`` image (``info`` holds only
        ``steadyclip_*`` keys) and the warnings, e.g. ``("UserWarning: Corrupt EXIF data ...",)``.

    Raises:
        ImageSourceError: missing file, a directory, unreadable file, unsupported type.
        ImageDecodeError: empty, corrupt, truncated or unrecognised data.
        ImageTooLargeError: more than ``max_pixels`` pixels.

    Example:
        >>> decode_image("examples/red_circle.png").image.mode
        'RGB'
    """
    notes: list[str] = []
    rgb = decode_into(notes, src, max_pixels=max_pixels, background=background, formats=formats, name=name)
    return DecodedImage(rgb, tuple(notes))


def decode_into(
    sink: list[str],
    src: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    formats: Sequence[str] | None = DEFAULT_FORMATS,
    name: str | None = None,
) -> Image.Image:
    """:func:`decode_image`, its warnings appended to ``sink`` as they come: kept when decoding fails."""
    cap = _check_cap(max_pixels)
    bg = _check_background(background)
    _keep_truncated_loading_off()
    notes: list[str] = []
    try:
        if isinstance(src, Image.Image):
            with captured(notes):
                rgb = _decode_pil(src, name or "<PIL.Image>", cap, bg)
        else:
            fp, shown, close = _open_source(src, name)
            try:
                rgb = _decode_file(fp, shown, cap, bg, formats, notes)
            finally:
                if close:
                    fp.close()
    finally:
        for note in notes:
            _logger.debug("decoder warning: %s", note)
        sink.extend(notes)
    if notes:
        rgb.info[WARNINGS_INFO_KEY] = tuple(notes)
    return rgb


def load_image(
    src: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    formats: Sequence[str] | None = DEFAULT_FORMATS,
) -> Image.Image:
    """Decode ``src`` fully into an RGB image, safely: :func:`decode_image` without the wrapper.

    Arguments and errors as :func:`decode_image`; its warnings are in
    ``image.info["steadyclip_warnings"]`` when there are any.

    Example:
        >>> load_image("examples/red_circle.png").mode
        'RGB'
    """
    return decode_image(src, max_pixels=max_pixels, background=background, formats=formats).image


def image_sha256(src: str | os.PathLike[str] | bytes | IO[bytes]) -> str:
    """SHA-256 hex digest of an image's raw bytes (a path is streamed in 1 MiB chunks).

    Raises:
        ImageSourceError: missing path, a directory, a PIL image (it has no file bytes).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        return hashlib.sha256(src).hexdigest()
    if isinstance(src, Image.Image):
        raise ImageSourceError("a decoded PIL image has no file bytes to hash; hash the file or its bytes instead")
    fp, _, close = _open_source(src)
    try:
        start = fp.tell() if fp.seekable() else None
        digest = hashlib.sha256()
        while chunk := fp.read(_CHUNK):
            digest.update(chunk)
        if start is not None and not close:
            fp.seek(start)  # leave a caller's file object where it was
        return digest.hexdigest()
    finally:
        if close:
            fp.close()


# ---- sources ---------------------------------------------------------------------------
def _open_source(src: object, shown: str | None = None) -> tuple[IO[bytes], str, bool]:
    """A readable binary stream, a display name for messages, and whether we must close it."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = shown or f"<bytes len={len(data)}>"
        if not data:
            raise ImageDecodeError(f"{name} is empty; pass the image file's bytes")
        return io.BytesIO(data), name, True
    if isinstance(src, (str, os.PathLike)):
        return _open_path(src)
    if hasattr(src, "read"):
        name = shown or str(getattr(src, "name", "<file object>"))
        if not (hasattr(src, "seekable") and src.seekable()):
            data = src.read()
            if not isinstance(data, bytes):
                raise ImageSourceError(f"{name} returned {type(data).__name__}, not bytes; open it in binary mode ('rb')")
            return io.BytesIO(data), name, True
        return src, name, False  # type: ignore[return-value]
    raise ImageSourceError(
        f"cannot read an image from a value of type {type(src).__name__} ({_short(src)}); "
        "pass a file path, the file's bytes, a binary file object or a PIL.Image.Image"
    )


def _open_path(src: str | os.PathLike[str]) -> tuple[IO[bytes], str, bool]:
    try:
        path = Path(os.fspath(src))
    except TypeError as e:
        raise ImageSourceError(f"{_short(src)} is not a usable path: {e}") from e
    name = str(path)
    if isinstance(src, str) and "://" in src:
        raise ImageSourceError(f"{name!r} looks like a URL; steadyclip does not fetch URLs, download the file first")
    try:
        is_dir = path.is_dir()
        if not is_dir:
            return open(path, "rb"), name, True
    except FileNotFoundError as e:
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        raise ImageSourceError(f"no such image file: {name}; check the path{where}") from e
    except (OSError, ValueError) as e:
        raise ImageSourceError(f"cannot read image file {name}: {e}") from e
    raise ImageSourceError(f"{name} is a directory, not an image file; pass the image file (batch jobs take folders)")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_cap(max_pixels: int | None) -> int:
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InputError(f"max_pixels must be a positive int, got {max_pixels!r}; give a pixel count or None")
    return max_pixels


def _check_background(background: tuple[int, int, int]) -> tuple[int, int, int]:
    ok = (isinstance(background, (tuple, list)) and len(background) == 3
          and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in background))
    if not ok:
        raise InputError(f"background must be an (R, G, B) tuple of ints in 0..255, got {background!r}; "
                         "e.g. (255, 255, 255) for white")
    return (int(background[0]), int(background[1]), int(background[2]))


def _keep_truncated_loading_off() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # The switch is process-global and read at decode time; there is no per-image override.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        _logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was on; steadyclip turned it off, because truncated "
            "images would be silently grey-filled and give wrong results"
        )


# ---- decoding --------------------------------------------------------------------------
def _decode_file(fp: IO[bytes], name: str, cap: int, bg: tuple[int, int, int],
                 formats: Sequence[str] | None, notes: list[str]) -> Image.Image:
    with decoding(name, cap):
        try:
            with captured(notes):
                im = Image.open(fp, formats=_installed(formats))
        except UnidentifiedImageError as e:
            accepted = ", ".join(formats) if formats is not None else "any Pillow format"
            raise ImageDecodeError(
                f"{name} is not a recognised image (accepted formats: {accepted}); "
                "check that the file is an image and not empty, HTML or text"
            ) from e
    # libtiff (compressed TIFFs) reports through C handlers that print to fd 2.
    with im, captured(notes, fd_stderr=im.format == "TIFF"):
        return _decode_pil(im, name, cap, bg)


def _installed(formats: Sequence[str] | None) -> list[str] | None:
    """The requested formats this Pillow build has (AVIF, JPEG2000 and others are optional)."""
    if formats is None:
        return None
    Image.init()
    wanted = [f.upper() for f in formats]
    have = [f for f in wanted if f in Image.OPEN]
    if not have:
        raise InputError(f"none of the formats {list(formats)} is available in this Pillow build; "
                         f"choose from {sorted(Image.OPEN)}")
    return have


def _decode_pil(im: Image.Image, name: str, cap: int, bg: tuple[int, int, int]) -> Image.Image:
    width, height = im.size
    if width * height > cap:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the cap of {cap:,}; "
            f"if you trust it, pass max_pixels={width * height} (CLI/server: --max-pixels {width * height}), "
            "or downscale it first"
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{name} has no pixels ({width}x{height}); re-export the image")
    info: dict[str | tuple[int, int], Any] = {"steadyclip_format": str(im.format or "PIL"), "steadyclip_mode": im.mode}
    with decoding(name, cap):
        info["steadyclip_animated"] = bool(getattr(im, "is_animated", False))
        frame = _first_frame(im)
        frame.load()
        frame, info[EXIF_INFO_KEY] = _apply_exif(frame, name)
        rgb = _to_rgb(frame, bg, name)
        if rgb is im:
            rgb = im.copy()  # never hand back (or later mutate) the caller's object
        rgb.load()
    rgb.info = info  # orientation is baked in: drop metadata so nothing rotates it again
    return rgb


def _first_frame(im: Image.Image) -> Image.Image:
    if not getattr(im, "is_animated", False) or im.tell() == 0:
        return im
    position = im.tell()  # a caller's PIL image: don't leave it on another frame
    im.seek(0)
    try:
        return im.copy()
    finally:
        im.seek(position)


def _apply_exif(im: Image.Image, name: str) -> tuple[Image.Image, str]:
    """Apply EXIF orientation; an unreadable EXIF block leaves the image as stored, logged."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # corrupt EXIF: unrotated, under any warnings filter
            orientation = im.getexif().get(_ORIENTATION_TAG)
    except DECODE_ERRORS as e:
        _logger.warning("%s: EXIF block unreadable (%s: %s); image used without rotation", name, type(e).__name__, e)
        warnings.warn(f"EXIF block unreadable ({type(e).__name__}: {e}); image used without rotation",
                      UserWarning, stacklevel=1)  # recorded on the result (decode runs under captured())
        return im, f"unreadable, not rotated ({type(e).__name__})"
    if orientation in (None, 1):
        return im, "none" if orientation is None else "orientation 1"
    if orientation not in _TRANSPOSE:
        _logger.warning("%s: EXIF orientation %r is not 1..8; image used without rotation", name, orientation)
        return im, f"invalid orientation {orientation!r}, not rotated"
    try:
        turned = ImageOps.exif_transpose(im)
    except DECODE_ERRORS as e:  # EXIF readable but Pillow's rewrite of it failed: rotate ourselves
        _logger.debug("%s: exif_transpose failed (%s); applying orientation %d directly", name, e, orientation)
        turned = im.transpose(_TRANSPOSE[orientation])
    return (turned if turned is not None else im), f"orientation {orientation} applied"
