"""Lossless tensor compression: byte-shuffle + zstd behind a self-describing header (shape and dtype
included), in the Rust core."""

from __future__ import annotations

import numpy as np

from . import _native
from .dtypes import dtype_name, little_endian, numpy_dtype, to_bits
from .errors import TensorError

__all__ = ["MAX_DECOMPRESSED_BYTES", "compress", "decompress"]

MAX_DECOMPRESSED_BYTES = 1 << 32
"""4 GiB: `decompress` refuses tensors that declare more (a small zstd frame can expand ~30000x)."""


def compress(array: np.ndarray, level: int = _native.DEFAULT_ZSTD_LEVEL) -> bytes:
    """The array's bytes, shape and dtype, compressed losslessly.

    Args:
        array: A float16, bfloat16, float32 or uint8 array of 1 to 8 dimensions, none of them 0.
        level: The zstd level (default 3).

    Returns:
        The compressed tensor, header included (`decompress` reads it back).

    Raises:
        TensorError: An array of another dtype, 0-d, empty or of more than 8 dimensions.
        FormatError: A `level` outside zstd's range.
    """
    array = little_endian(np.asarray(array))
    raw = to_bits(array).reshape(-1).view(np.uint8)
    return _native.compress_tensor(raw, list(array.shape), dtype_name(array.dtype), level)


def decompress(
    data: bytes | bytearray | memoryview, max_bytes: int = MAX_DECOMPRESSED_BYTES
) -> np.ndarray:
    """The array `compress` was given, bit for bit; `FormatError` past `max_bytes` of raw data.

    Args:
        data: What `compress` returned.
        max_bytes: The most bytes of raw tensor data accepted (default 4 GiB).

    Returns:
        The array, of its original shape and dtype (bfloat16 as `ml_dtypes.bfloat16`).

    Raises:
        FormatError: Data that is not a compressed tensor, is corrupt or truncated, or declares
            more than `max_bytes`.
        TensorError: A negative `max_bytes`, or a header with an invalid shape.
    """
    if max_bytes < 0:
        raise TensorError(f"max_bytes must not be negative, got {max_bytes}")
    raw, shape, name = _native.decompress_tensor(bytes(data), max_bytes)
    return raw.view(numpy_dtype(name)).reshape(shape)
