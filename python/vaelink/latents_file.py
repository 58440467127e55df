"""Latents on disk as safetensors: several named tensors and string metadata per file.

Readable by `safetensors.numpy.load_file` / `safetensors.torch.load_file` and vice versa."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from . import _native
from .dtypes import dtype_name, little_endian, numpy_dtype, to_bits
from .files import atomic_write_bytes

__all__ = ["latents_from_bytes", "latents_to_bytes", "load_latents", "save_latents"]

Tensors = Mapping[str, np.ndarray]


def latents_to_bytes(tensors: Tensors, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialises named tensors (float16, bfloat16, float32, uint8) and metadata to safetensors."""
    entries = []
    for name, tensor in tensors.items():
        array = little_endian(np.asarray(tensor))
        raw = to_bits(array).reshape(-1).view(np.uint8)
        entries.append((name, raw, list(array.shape), dtype_name(array.dtype)))
    return _native.serialize_safetensors(entries, dict(metadata) if metadata else None)


def latents_from_bytes(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parses safetensors bytes into `({name: array}, metadata)`, tensors in file order."""
    tensors, metadata = _native.deserialize_safetensors(data)
    arrays = {
        name: raw.view(numpy_dtype(dtype)).reshape(shape) for name, raw, shape, dtype in tensors
    }
    return arrays, metadata


def save_latents(
    path: str | os.PathLike[str], tensors: Tensors, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes named tensors and metadata to a safetensors file, whole or not at all (a file
    already there is kept until the new one is complete).

    Args:
        path: The file to write.
        tensors: `{name: array}`, float16, bfloat16, float32 or uint8, none of them 0-d or empty.
        metadata: String metadata for the file's header.

    Raises:
        TensorError: A tensor of a dtype other than those four, 0-d, with a zero dimension or
            more than 8 dimensions.
        FormatError: Tensors or metadata safetensors cannot hold.
        OSError: The file cannot be written.
    """
    atomic_write_bytes(path, latents_to_bytes(tensors, metadata))  # whole, or the old file kept


def load_latents(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file: named tensors and metadata, as `save_latents` writes them.

    Args:
        path: The file to read.

    Returns:
        `({name: array}, metadata)`, tensors in file order; bfloat16 ones as
        `ml_dtypes.bfloat16` arrays.

    Raises:
        FormatError: A file that is not valid safetensors, or holds a tensor of a dtype other
            than float16, bfloat16, float32 and uint8.
        TensorError: A tensor that is 0-d, has a zero dimension or more than 8 dimensions.
        OSError: The file cannot be read.
    """
    with open(path, "rb") as f:
        return latents_from_bytes(f.read())
