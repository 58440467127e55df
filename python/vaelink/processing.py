"""Pixels <-> VAE tensors, and Flux latent packing. Each call is one pass in the Rust core.

- `preprocess`: uint8 `HWC`/`NHWC` -> `NCHW` in [-1, 1], exactly `2 * x / 255 - 1` in float32, then
  rounded to the requested dtype.
- `postprocess`: float `NCHW` -> uint8 `NHWC`, exactly numpy's
  `np.round(np.clip(x.astype(np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)` (NaN -> 0).
"""

from __future__ import annotations

import numpy as np

from . import _native
from .dtypes import DTypeName, dtype_name, from_bits, is_bfloat16, little_endian, to_bits
from .errors import TensorError

__all__ = ["pack_latents", "postprocess", "preprocess", "unpack_latents"]


def preprocess(images: np.ndarray, dtype: DTypeName = "float32") -> np.ndarray:
    """uint8 `(H, W, 3)` or `(N, H, W, 3)` -> `(N, 3, H, W)` float32/float16/bfloat16 in [-1, 1].

    Args:
        images: uint8 RGB pixels, `HWC` or `NHWC`.
        dtype: `float32` (default), `float16` or `bfloat16`.

    Returns:
        The `NCHW` tensor (bfloat16 as `ml_dtypes.bfloat16`).

    Raises:
        TensorError: Images that are not uint8, not 3-channel `HWC`/`NHWC`, or empty; a `dtype`
            other than the three.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise TensorError(f"preprocess takes uint8 images, got {array.dtype}")
    out = _native.preprocess(little_endian(array), dtype)
    return from_bits(out) if dtype == "bfloat16" else out


def postprocess(tensor: np.ndarray) -> np.ndarray:
    """float32/float16/bfloat16 `(N, C, H, W)` in about [-1, 1] -> uint8 `(N, H, W, C)`.

    Args:
        tensor: The decoder output, `NCHW`; values outside [-1, 1] are clipped.

    Returns:
        The uint8 `NHWC` pixels.

    Raises:
        TensorError: A tensor of another dtype, not 4-D, or empty.
    """
    array = np.asarray(tensor)
    native = array.dtype.newbyteorder("=")  # ">f4" too
    if native not in (np.float32, np.float16) and not is_bfloat16(native):
        raise TensorError(f"postprocess takes float32, float16 or bfloat16, got {array.dtype}")
    return _native.postprocess(to_bits(little_endian(array)))


def _movable(latents: np.ndarray) -> np.ndarray:
    """Contiguous little-endian latents of a wire dtype (bfloat16 as its uint16 bits)."""
    array = little_endian(np.asarray(latents))
    dtype_name(array.dtype)  # the four wire dtypes only
    return array


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """Flux packing: `(B, C, H, W) -> (B, H/2 * W/2, 4C)`, as diffusers'
    `FluxPipeline._pack_latents`.

    Args:
        latents: `(B, C, H, W)` latents of a wire dtype, `H` and `W` even.

    Returns:
        The packed latents, of the same dtype.

    Raises:
        TensorError: Latents that are not 4-D, not of a wire dtype, or of odd height or width.
    """
    array = _movable(latents)
    out = _native.pack_latents(to_bits(array))
    return out.view(array.dtype)  # little-endian, like the data the core moved


def unpack_latents(latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flux unpacking for an image of `height x width` pixels: `(B, HW/4, 4C) -> (B, C, H, W)` with
    `H = 2 * (height // 16)`, `W = 2 * (width // 16)`, as `FluxPipeline._unpack_latents`.

    Args:
        latents: `(B, HW/4, 4C)` packed latents of a wire dtype.
        height: The image height in pixels.
        width: The image width in pixels.

    Returns:
        The `(B, C, H, W)` latents, of the same dtype.

    Raises:
        TensorError: Latents that are not 3-D, not of a wire dtype, or whose token count or
            channels do not fit `height`, `width`; a size that is negative or under 16 pixels.
    """
    if height < 0 or width < 0:
        raise TensorError(f"image size must be positive, got {height}x{width}")
    array = _movable(latents)
    out = _native.unpack_latents(to_bits(array), height, width)
    return out.view(array.dtype)  # little-endian, like the data the core moved
