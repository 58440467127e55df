"""The one place that knows torch and PIL: detecting their objects and converting to and from numpy.

Neither is a dependency. Detection looks in `sys.modules` (an object cannot be a tensor unless torch
was imported), so it never imports anything; conversions import lazily, with a clear error."""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from .dtypes import bfloat16_dtype

if TYPE_CHECKING:  # names for signatures: the real classes for a type checker, nothing at run time
    import PIL.Image
    import torch as _torch

    Tensor: TypeAlias = _torch.Tensor
    PILImage: TypeAlias = PIL.Image.Image
else:
    Tensor = PILImage = Any

Array: TypeAlias = Any
"""A numpy array or a torch tensor: code that works on both (on the tensor's device)."""

__all__ = [
    "Array",
    "PILImage",
    "Tensor",
    "array_namespace",
    "is_pil",
    "is_torch",
    "pil_images",
    "pil_open",
    "pil_to_rgb",
    "to_numpy",
    "to_torch",
    "torch",
    "torch_if_imported",
]


def _import(name: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"this needs {name.split('.')[0]}: pip install {extra}") from None


def torch() -> ModuleType:
    """The torch module, imported on first use."""
    return _import("torch", "torch")


def torch_if_imported() -> ModuleType | None:
    """torch when something has imported it already; never imports it."""
    return sys.modules.get("torch")


def is_torch(value: object) -> bool:
    module = sys.modules.get("torch")
    return module is not None and isinstance(value, module.Tensor)


def is_pil(value: object) -> bool:
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


def array_namespace(array: Any) -> Any:
    """numpy, or torch for tensors (so that work on a tensor stays on its device)."""
    return torch() if is_torch(array) else np


def to_numpy(value: Any) -> np.ndarray:
    """An array-like as numpy; a torch tensor is copied to the host (bfloat16 as
    `ml_dtypes.bfloat16`)."""
    if not is_torch(value):
        return np.asarray(value)
    t = value.detach().to("cpu").contiguous()
    if t.dtype == torch().bfloat16:
        return np.asarray(t.view(torch().int16).numpy()).view(bfloat16_dtype())
    return np.asarray(t.numpy())


def to_torch(value: Any, like: Any = None) -> Any:
    """A numpy array (or tensor) as a torch tensor, on `like`'s device when given."""
    t = value if is_torch(value) else torch().from_numpy(np.ascontiguousarray(value))
    return t.to(like.device) if like is not None else t


def pil_to_rgb(image: Any) -> np.ndarray:
    """A PIL image as `(H, W, 3)` uint8 RGB, as Pillow's `convert("RGB")` gives it."""
    return np.asarray(image.convert("RGB"))


def pil_images(pixels: Sequence[np.ndarray] | np.ndarray) -> list[Any]:
    """uint8 `HWC` arrays as PIL images."""
    image = _import("PIL.Image", "pillow")
    return [image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def pil_open(data: bytes | bytearray) -> Any:
    """Encoded image bytes opened by Pillow."""
    return _import("PIL.Image", "pillow").open(io.BytesIO(data))
