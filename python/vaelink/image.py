"""Image codecs (JPEG, PNG, WebP) and pixel fitting, run by the Rust core with the GIL released.

Pixels are numpy `uint8` arrays of shape `(height, width, 3)`, RGB."""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal, NamedTuple, cast

import numpy as np

from . import _native
from .errors import DecodeError, EncodeError, TensorError, VaelinkWarning
from .frameworks import is_pil, pil_to_rgb

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageInfo",
    "decode_image",
    "encode_image",
    "fit_to_multiple",
    "load_rgb",
    "probe_image",
    "resize_image",
]

DEFAULT_MAX_PIXELS: int = _native.DEFAULT_MAX_PIXELS
"""64 megapixels (8192 x 8192): larger images are refused from their header, before decoding."""

ImageFormat = Literal["jpeg", "png", "webp"]
Subsampling = Literal["4:2:0", "4:2:2", "4:4:4"]
BytesLike = bytes | bytearray | memoryview


class ImageInfo(NamedTuple):
    format: ImageFormat
    width: int
    height: int


def _read_bytes(data: BytesLike | str | os.PathLike[str]) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str | os.PathLike):
        with open(data, "rb") as f:
            return f.read()
    raise TypeError(f"expected image bytes or a file path, got {type(data).__name__}")


def decode_image(
    data: BytesLike | str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = None,
    strict: bool = False,
) -> np.ndarray:
    """Decodes JPEG, PNG or WebP bytes (or a file) into a `(H, W, 3)` uint8 RGB array.

    Gray images are replicated to three channels; 16-bit samples keep their high byte (as Pillow).
    Alpha is dropped by default, keeping each pixel's stored colour exactly as Pillow's
    `convert("RGB")` does; pass `background=(r, g, b)` to composite over that colour instead.
    EXIF orientation is not applied. Raises `DecodeError`, or `ImageTooLargeError` when the header
    declares more than `max_pixels` pixels.

    A JPEG cut short decodes with its missing rows filled in (as libjpeg does): that warns
    (`VaelinkWarning`, naming the file), or with `strict=True` raises `DecodeError`. Truncated
    PNG and WebP always raise.

    Args:
        data: Encoded image bytes, or the path of an image file.
        max_pixels: The most pixels (width x height) accepted, from the header.
        background: An `(r, g, b)` colour, 0-255 each, to composite transparent images over.
        strict: Refuse a truncated JPEG instead of warning.

    Returns:
        The pixels, a `(H, W, 3)` uint8 array.

    Raises:
        DecodeError: Empty, truncated, corrupt or unsupported data; a negative `max_pixels` or an
            invalid `background`.
        ImageTooLargeError: The header declares more than `max_pixels` pixels.
        OSError: `data` is a path that cannot be read.
        TypeError: `data` is neither bytes nor a path.
    """
    if max_pixels < 0:
        raise DecodeError(f"max_pixels must not be negative, got {max_pixels}")
    if background is not None and (
        len(background) != 3 or not all(0 <= int(c) <= 255 for c in background)
    ):
        raise DecodeError(f"background must be three values in 0..255, got {background!r}")
    raw = _read_bytes(data)
    if _truncated_jpeg(raw):
        message = "truncated JPEG: no end-of-image marker after the last scan"
        if strict:
            raise DecodeError(message)
        # The warning alone says which file (a failure is reported with its input by the caller).
        where = f"{os.fspath(data)}: " if isinstance(data, str | os.PathLike) else ""
        warnings.warn(f"{where}{message} (its missing rows decode as grey)", VaelinkWarning, 2)
    return _native.decode_image(raw, max_pixels, background)


def _truncated_jpeg(data: BytesLike) -> bool:
    """A JPEG whose last scan (SOS marker) has no end-of-image marker after it. Markers cannot
    occur inside entropy-coded data (0xFF is stuffed), and an EXIF thumbnail's own markers come
    before the main image's scans."""
    view = bytes(data[:2])
    if view != b"\xff\xd8":
        return False
    raw = data if isinstance(data, bytes | bytearray) else bytes(data)
    return raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda")


def probe_image(data: BytesLike | str | os.PathLike[str]) -> ImageInfo:
    """The format and size of an encoded image, read from its header alone.

    Args:
        data: Encoded image bytes, or the path of an image file.

    Returns:
        `ImageInfo(format, width, height)`, `format` being `jpeg`, `png` or `webp`.

    Raises:
        DecodeError: Data that is empty, of an unsupported format, or has no readable header.
        OSError: `data` is a path that cannot be read.
        TypeError: `data` is neither bytes nor a path.
    """
    fmt, width, height = _native.probe_image(_read_bytes(data))
    return ImageInfo(cast(ImageFormat, fmt), width, height)


def encode_image(
    pixels: np.ndarray,
    format: ImageFormat = "png",
    *,
    quality: int = 90,
    png_level: int | None = None,
    subsampling: Subsampling = "4:2:0",
) -> bytes:
    """Encodes a `(H, W, 3)` uint8 RGB array.

    - `jpeg`: baseline, `quality` 1-100, chroma `subsampling` 4:2:0 by default (as libjpeg and
      Pillow), block-averaged; large images are encoded in strips on several threads and joined
      with restart markers (the same pixels as a one-piece encode, a file any decoder reads).
    - `png`: `png_level=None` (default) is the fast setting (fdeflate: many times faster than zlib
      at a similar size); 1-9 are zlib levels (Pillow's default is 6); 0 stores uncompressed.
    - `webp`: lossless.

    Args:
        pixels: A `(H, W, 3)` uint8 RGB array.
        format: `png` (default), `jpeg` or `webp`.
        quality: JPEG quality, 1-100 (checked whatever the format).
        png_level: None, or a zlib level 0-9.
        subsampling: JPEG chroma subsampling: `4:2:0` (default), `4:2:2` or `4:4:4`.

    Returns:
        The encoded image.

    Raises:
        EncodeError: Pixels that are not a non-empty `(H, W, 3)` uint8 array, an unknown
            `format`, a `quality` or `png_level` out of range, or an unknown `subsampling`.
    """
    if not 1 <= quality <= 100:
        raise EncodeError(f"JPEG quality must be 1 to 100, got {quality}")
    if png_level is not None and not 0 <= png_level <= 9:
        raise EncodeError(f"PNG level must be 0 to 9 or None, got {png_level}")
    return _native.encode_image(_rgb_array(pixels), format, quality, png_level, subsampling)


def fit_to_multiple(
    pixels: np.ndarray, multiple: int = 8, mode: Literal["crop", "resize"] = "crop"
) -> np.ndarray:
    """Makes both sides a multiple of `multiple` (a VAE's spatial factor), rounding down.

    `crop` (default) cuts the centre, dropping at most `multiple - 1` rows and columns and
    resampling nothing. `resize` resamples the whole image with Lanczos3, as diffusers'
    `VaeImageProcessor` does.

    Args:
        pixels: A `(H, W, 3)` uint8 RGB array.
        multiple: The multiple, at least 1.
        mode: `crop` or `resize`.

    Returns:
        A new `(H', W', 3)` uint8 array with both sides multiples of `multiple`.

    Raises:
        EncodeError: `pixels` is not a `(H, W, 3)` uint8 array.
        TensorError: A `multiple` below 1 or larger than a side, or an unknown `mode`.
    """
    if multiple < 1:
        raise TensorError(f"multiple must be at least 1, got {multiple}")
    return _native.fit_to_multiple(_rgb_array(pixels), multiple, mode)


def resize_image(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """An `(H, W, 3)` uint8 RGB image resampled to `height x width` with Lanczos3 (SIMD, in Rust,
    the GIL released; within a level or two of Pillow's `LANCZOS`).

    Args:
        pixels: A `(H, W, 3)` uint8 RGB array.
        width: The new width, at least 1.
        height: The new height, at least 1.

    Returns:
        The resized `(height, width, 3)` uint8 array.

    Raises:
        EncodeError: `pixels` is not a `(H, W, 3)` uint8 array.
        TensorError: A side below 1, or an image that cannot be resized (empty).
    """
    if width < 1 or height < 1:
        raise TensorError(f"cannot resize to {width}x{height}: sides must be at least 1")
    return _native.resize_image(_rgb_array(pixels), width, height)


def _rgb_array(pixels: np.ndarray) -> np.ndarray:
    array = np.asarray(pixels)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise EncodeError(
            f"expected a (height, width, 3) uint8 RGB array, got {array.dtype} {array.shape}"
        )
    return np.ascontiguousarray(array)


def load_rgb(image: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image-like input as a `(H, W, 3)` uint8 array: encoded bytes, a file path, a PIL image,
    or an array (HWC uint8 RGB; gray `(H, W)` is replicated).

    Args:
        image: Encoded bytes, a file path, a PIL image, or a uint8 array.
        max_pixels: The most pixels accepted for encoded images, from the header.

    Returns:
        The pixels, a `(H, W, 3)` uint8 array.

    Raises:
        DecodeError: Encoded data that cannot be decoded (as `decode_image`), or an input of
            another type.
        ImageTooLargeError: More than `max_pixels` pixels.
        EncodeError: An array that is neither gray `(H, W)` nor `(H, W, 3)` uint8.
        OSError: A path that cannot be read.
    """
    if isinstance(image, BytesLike | str | os.PathLike):
        return decode_image(image, max_pixels=max_pixels)
    if is_pil(image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        return _rgb_array(image)
    raise DecodeError(f"cannot read an image from {type(image).__name__}")
