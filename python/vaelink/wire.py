"""The tensor wire format of the remote-VAE protocol.

On the wire a tensor is its contiguous little-endian element buffer; `shape` and `dtype` travel
beside it (query string for requests, headers for responses)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from . import _native
from .dtypes import (
    DTypeName,
    dtype_name,
    is_bfloat16,
    little_endian,
    numpy_dtype,
    to_bfloat16,
)
from .errors import TensorError

__all__ = ["WireTensor", "from_wire", "read_tensor", "to_wire"]


class WireTensor(NamedTuple):
    body: bytes
    shape: tuple[int, ...]
    dtype: DTypeName

    def shape_header(self) -> str:
        """The `shape` response header, a JSON list: `[1,4,128,128]`."""
        return "[" + ",".join(map(str, self.shape)) + "]"


def to_wire(array: np.ndarray, dtype: DTypeName | None = None) -> WireTensor:
    """A tensor as a wire body. `dtype` converts first (float32 -> bfloat16 in the Rust core).

    Args:
        array: A non-empty array of at least one dimension.
        dtype: `float16`, `bfloat16`, `float32` or `uint8` to convert to (None: as it is).

    Returns:
        `WireTensor(body, shape, dtype)`: the little-endian bytes, the shape and the dtype name.

    Raises:
        TensorError: An empty or 0-d array, an unknown `dtype`, or an array whose dtype the wire
            cannot carry.
    """
    array = np.asarray(array)
    if array.ndim == 0 or array.size == 0:
        raise TensorError(f"cannot send an empty or 0-d tensor (shape {array.shape})")
    if dtype == "bfloat16" and not is_bfloat16(array.dtype):
        array = to_bfloat16(array)
    elif dtype is not None:
        array = array.astype(numpy_dtype(dtype), copy=False)
    name = dtype_name(array.dtype)
    return WireTensor(little_endian(array).tobytes(), tuple(array.shape), name)


def from_wire(body: bytes | bytearray | memoryview, shape: Sequence[int], dtype: str) -> np.ndarray:
    """A wire body as an array, without copying (read-only when `body` is `bytes`).

    The length must match `shape` and `dtype` exactly; bfloat16 comes back as
    `ml_dtypes.bfloat16`.

    Args:
        body: The tensor's little-endian bytes.
        shape: Its shape: 1 or more positive dimensions.
        dtype: `float16`, `bfloat16`, `float32` or `uint8`.

    Returns:
        The array, a view of `body`.

    Raises:
        TensorError: An unknown `dtype`, an invalid or too large `shape`, or a `body` whose
            length does not match them.
    """
    try:
        dims = _native.check_wire_tensor(list(shape), dtype, memoryview(body).nbytes)
    except OverflowError:  # a dimension beyond 64 bits: hostile or garbled, not a programming error
        raise TensorError(f"tensor shape {list(shape)} is too large") from None
    return np.frombuffer(body, dtype=numpy_dtype(dtype)).reshape(dims)


def read_tensor(headers: Mapping[str, str], body: bytes | bytearray) -> np.ndarray:
    """A tensor response (`shape`/`dtype` headers, raw body) as an array of the wire dtype."""
    try:
        shape = json.loads(headers["shape"])
        dtype = headers["dtype"]
    except (KeyError, ValueError):
        raise TensorError("the answer is no tensor (no valid shape/dtype headers)") from None
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise TensorError(f"the shape header must be a JSON list of integers, got {shape!r}")
    return from_wire(body, shape, dtype)
