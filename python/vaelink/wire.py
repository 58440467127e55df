"""The tensor wire format of the remote-VAE protocol, bfloat16 conversion, and lossless compression.

On the wire a tensor is its contiguous little-endian element buffer; `shape` and `dtype` travel
beside it (query string for requests, headers for responses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from . import _native
from .dtypes import DTypeName, bfloat16, dtype_name, from_bits, numpy_dtype, to_bits
from .errors import TensorError

__all__ = [
    "WireTensor",
    "compress",
    "decompress",
    "from_bfloat16",
    "from_wire",
    "to_bfloat16",
    "to_wire",
]


class WireTensor(NamedTuple):
    body: bytes
    shape: tuple[int, ...]
    dtype: DTypeName

    def shape_header(self) -> str:
        """The `shape` response header, a JSON list: `[1,4,128,128]`."""
        return "[" + ",".join(map(str, self.shape)) + "]"


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 with round-to-nearest-even (NaN stays NaN), without torch."""
    src = np.require(array, np.float32, "C")  # not ascontiguousarray: it makes 0-d arrays 1-d
    return from_bits(_native.f32_to_bf16(src))


def from_bfloat16(array: np.ndarray) -> np.ndarray:
    """bfloat16 (or its uint16 bits) -> float32, exactly."""
    src = np.require(array, requirements="C")
    if src.dtype not in (bfloat16, np.uint16):
        raise TensorError(f"expected a bfloat16 array, got {src.dtype}")
    return _native.bf16_to_f32(to_bits(src))


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def to_wire(array: np.ndarray, dtype: DTypeName | None = None) -> WireTensor:
    """A tensor as a wire body. `dtype` converts first (float32 -> bfloat16 in the Rust core)."""
    array = np.asarray(array)
    if array.ndim == 0 or array.size == 0:
        raise TensorError(f"cannot send an empty or 0-d tensor (shape {array.shape})")
    if dtype == "bfloat16" and array.dtype != bfloat16:
        array = to_bfloat16(array)
    elif dtype is not None:
        array = array.astype(numpy_dtype(dtype), copy=False)
    name = dtype_name(array.dtype)
    return WireTensor(_little_endian(array).tobytes(), tuple(array.shape), name)


def from_wire(body: bytes | bytearray | memoryview, shape: Sequence[int], dtype: str) -> np.ndarray:
    """A wire body as an array, without copying (read-only when `body` is `bytes`).

    The length must match `shape` and `dtype` exactly; bfloat16 comes back as
    `ml_dtypes.bfloat16`."""
    try:
        dims = _native.check_wire_tensor(list(shape), dtype, memoryview(body).nbytes)
    except OverflowError:  # a dimension beyond 64 bits: hostile or garbled, not a programming error
        raise TensorError(f"tensor shape {list(shape)} is too large") from None
    return np.frombuffer(body, dtype=numpy_dtype(dtype)).reshape(dims)


def compress(array: np.ndarray, level: int = _native.DEFAULT_ZSTD_LEVEL) -> bytes:
    """Lossless: byte-shuffle + zstd behind a self-describing header (shape and dtype included)."""
    array = np.asarray(array)
    shape = list(array.shape)  # before `_little_endian`, which makes a 0-d array 1-d
    array = _little_endian(array)
    name = dtype_name(array.dtype)
    raw = to_bits(array).reshape(-1).view(np.uint8)
    return _native.compress_tensor(raw, shape, name, level)


MAX_DECOMPRESSED_BYTES = 1 << 32
"""4 GiB: `decompress` refuses tensors that declare more (a small zstd frame can expand ~30000x)."""


def decompress(
    data: bytes | bytearray | memoryview, max_bytes: int = MAX_DECOMPRESSED_BYTES
) -> np.ndarray:
    """The array `compress` was given, bit for bit; `FormatError` past `max_bytes` of raw data."""
    if max_bytes < 0:
        raise TensorError(f"max_bytes must not be negative, got {max_bytes}")
    raw, shape, name = _native.decompress_tensor(bytes(data), max_bytes)
    return raw.view(numpy_dtype(name)).reshape(shape)
