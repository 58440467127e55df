"""The four element types of the remote-VAE wire format, their numpy dtypes, and conversions.

numpy has no bfloat16 of its own; vaelink uses `ml_dtypes.bfloat16` (the dtype JAX and ONNX use),
whose arrays cross into the Rust core as their uint16 bits, and converts float32 to it in the core."""

from __future__ import annotations

from typing import Literal

import ml_dtypes
import numpy as np

from . import _native
from .errors import TensorError

__all__ = [
    "WIRE_DTYPES",
    "DTypeName",
    "bfloat16",
    "dtype_name",
    "from_bfloat16",
    "from_bits",
    "little_endian",
    "numpy_dtype",
    "to_bfloat16",
    "to_bits",
    "to_float32",
]

DTypeName = Literal["float16", "bfloat16", "float32", "uint8"]

bfloat16: np.dtype = np.dtype(ml_dtypes.bfloat16)

WIRE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": bfloat16,
    "float32": np.dtype("<f4"),
    "uint8": np.dtype("u1"),
}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a wire dtype name; `TensorError` for any other name."""
    try:
        return WIRE_DTYPES[name]
    except (KeyError, TypeError):
        expected = ", ".join(WIRE_DTYPES)
        raise TensorError(f"unknown dtype {name!r}; expected one of {expected}") from None


def dtype_name(dtype: np.dtype | type) -> DTypeName:
    """The wire name of a numpy dtype; `TensorError` for dtypes the wire cannot carry."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    for name, candidate in WIRE_DTYPES.items():
        if dt == candidate:
            return name  # type: ignore[return-value]
    raise TensorError(
        f"dtype {dt} cannot travel on the wire; use float16, bfloat16, float32 or uint8"
    )


def to_bits(array: np.ndarray) -> np.ndarray:
    """A bfloat16 array as its uint16 bits (a view); other arrays unchanged."""
    return array.view(np.uint16) if array.dtype == bfloat16 else array


def from_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bits from the core as a bfloat16 array (a view)."""
    return bits.view(bfloat16)


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array as the Rust core and the wire take it: C-contiguous, little-endian (a copy only
    when it is not already). 0-d arrays stay 0-d."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.require(array, requirements="C")


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 with round-to-nearest-even (NaN stays NaN), without torch."""
    src = np.require(array, np.float32, "C")
    return from_bits(_native.f32_to_bf16(src))


def from_bfloat16(array: np.ndarray) -> np.ndarray:
    """bfloat16 (or its uint16 bits) -> float32, exactly."""
    src = np.require(array, requirements="C")
    if src.dtype not in (bfloat16, np.uint16):
        raise TensorError(f"expected a bfloat16 array, got {src.dtype}")
    return _native.bf16_to_f32(to_bits(src))


def to_float32(array: np.ndarray) -> np.ndarray:
    """Any float array (bfloat16 included) as float32; float32 ones unchanged."""
    if array.dtype == bfloat16:
        return from_bfloat16(array)
    return array.astype(np.float32, copy=False)
