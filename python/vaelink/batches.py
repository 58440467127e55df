"""Every accepted input as a normalised batch, and every batch as each output kind.

Backends (the local engine, a remote endpoint) take `ImageBatch` and `LatentBatch` only, so the
rules for what an input means live here and nowhere else:

- images: PIL images, uint8 arrays (`HWC`, `NHWC`, gray `HW`), float `CHW`/`NCHW` in [-1, 1], torch
  tensors of either kind, file paths and encoded bytes, and lists of them;
- latents: float `[B, C, h, w]`, or Flux-packed `[B, hw/4, 4C]` with the image's height and width.

A torch tensor stays a tensor on its device unless it has to be changed on the host (gray pixels,
sides to fit); outputs come back as torch, on the input's device, when the input was torch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import numpy as np

from . import processing
from .dtypes import DTypeName, is_bfloat16, to_float32
from .errors import TensorError
from .frameworks import PILImage, Tensor, is_torch, pil_images, to_numpy, to_torch, torch
from .image import encode_image, fit_to_multiple, load_rgb
from .wire import from_wire, to_wire

__all__ = [
    "DecodeOutput",
    "EncodeOutput",
    "Fit",
    "ImageBatch",
    "ImageInput",
    "LatentBatch",
    "LatentInput",
    "RawOutput",
    "as_image_batch",
    "as_latent_batch",
    "check_decode_output",
    "decode_output",
    "encode_output",
]

OneImage: TypeAlias = (
    np.ndarray | Tensor | PILImage | str | os.PathLike[str] | bytes | bytearray | memoryview
)
ImageInput: TypeAlias = OneImage | Sequence[OneImage]
"""What `encode` takes: one image or batch as an array or tensor, or a list of images."""
LatentInput: TypeAlias = np.ndarray | Tensor
"""What `decode` takes: latents as a numpy array or a torch tensor."""

Fit = Literal["crop", "resize"]
EncodeOutput = Literal["numpy", "torch"]
DecodeOutput = Literal["numpy", "torch", "float", "pil", "png", "jpeg", "webp"]
RawOutput = Literal["uint8", "float"]
"""What a backend's decode returns: uint8 `[B, H, W, 3]` pixels, or the float `[B, 3, H, W]`
decoder output."""


# -- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageBatch:
    """Images ready for a backend: uint8 `NHWC` RGB pixels, or float32 `NCHW` in [-1, 1]; numpy
    arrays, or a torch tensor kept where it is. `like` is the torch tensor given, if any."""

    data: Any
    pixels: bool
    like: Any = None

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        shape = tuple(self.data.shape)
        return (shape[1], shape[2]) if self.pixels else (shape[2], shape[3])

    def numpy(self) -> np.ndarray:
        """The batch on the host, for the wire."""
        return to_numpy(self.data)

    def nchw_float(self) -> Any:
        """float32 `NCHW` in [-1, 1], where the data lives (numpy, or torch on its device)."""
        if not self.pixels:
            return self.data
        if is_torch(self.data):
            # The same expression as vaelink.preprocess, in torch on the tensor's device.
            return self.data.permute(0, 3, 1, 2).float() * 2 / 255 - 1
        return processing.preprocess(self.data)


def _fitted(pixels: np.ndarray, multiple: int, fit: Fit | None) -> np.ndarray:
    h, w = pixels.shape[:2]
    if fit is None or (h % multiple == 0 and w % multiple == 0):
        return pixels
    return fit_to_multiple(pixels, multiple, fit)


def _stack(images: Sequence[np.ndarray], multiple: int, fit: Fit | None) -> np.ndarray:
    fitted = [_fitted(a, multiple, fit) for a in images]
    if len({a.shape for a in fitted}) != 1:
        sizes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in fitted})
        raise TensorError(f"images in a batch must have the same size, got {', '.join(sizes)}")
    return np.stack(fitted) if len(fitted) > 1 else fitted[0][None]


def _pixel_list(array: np.ndarray) -> list[np.ndarray]:
    if array.ndim in (2, 3):
        return [load_rgb(array)]  # gray HW is replicated; HWC must be RGB
    if array.ndim == 4 and array.shape[3] == 3:
        return list(array)
    raise TensorError(f"uint8 images must be HW, HWC or NHWC RGB, got shape {array.shape}")


def _check_floats(shape: tuple[int, ...]) -> None:
    if len(shape) not in (3, 4) or shape[-3] != 3:
        raise TensorError(f"float images must be 3-channel CHW or NCHW RGB in [-1, 1], got {shape}")


def _torch_batch(tensor: Any, multiple: int, fit: Fit | None) -> ImageBatch:
    if tensor.dtype != torch().uint8:
        _check_floats(tuple(tensor.shape))
        x = tensor.float()
        return ImageBatch(x if x.ndim == 4 else x[None], pixels=False, like=tensor)
    shape = tuple(tensor.shape)
    if len(shape) in (3, 4) and shape[-1] == 3:
        h, w = shape[-3:-1]
        if fit is None or (h % multiple == 0 and w % multiple == 0):  # as it is, on its device
            return ImageBatch(tensor if len(shape) == 4 else tensor[None], pixels=True, like=tensor)
    pixels = _stack(_pixel_list(to_numpy(tensor)), multiple, fit)
    return ImageBatch(pixels, pixels=True, like=tensor)


def as_image_batch(images: ImageInput | ImageBatch, multiple: int, fit: Fit | None) -> ImageBatch:
    """Any accepted input as a batch. Sides that are not multiples of `multiple` are fitted
    (`fit`: crop the centre, or resize with Lanczos as diffusers does; None: left for the model to
    refuse)."""
    if isinstance(images, ImageBatch):
        return images
    if is_torch(images):
        return _torch_batch(images, multiple, fit)
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return ImageBatch(_stack(_pixel_list(images), multiple, fit), pixels=True)
        if images.dtype.kind == "f" or is_bfloat16(images.dtype):
            _check_floats(images.shape)
            x = np.ascontiguousarray(to_float32(images))
            return ImageBatch(x if x.ndim == 4 else x[None], pixels=False)
        raise TensorError(f"images must be uint8 or float arrays, got {images.dtype}")
    if isinstance(images, list | tuple):
        if not images:
            raise TensorError("empty batch")
        return ImageBatch(_stack([load_rgb(i) for i in images], multiple, fit), pixels=True)
    return ImageBatch(_stack([load_rgb(images)], multiple, fit), pixels=True)


# -- latents --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentBatch:
    """Latents ready for a backend: float `[B, C, h, w]`, or packed `[B, hw/4, 4C]` with the
    image's `height` and `width`; numpy of a wire dtype, or a torch tensor kept where it is.
    `wire_dtype`: the dtype the caller chose to send them in (they are already rounded to it)."""

    data: Any
    height: int | None = None
    width: int | None = None
    like: Any = None
    wire_dtype: DTypeName | None = None

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def packed(self) -> bool:
        return len(self.data.shape) == 3

    def numpy(self) -> np.ndarray:
        """The latents on the host, for the wire (float32, float16 or bfloat16)."""
        array = to_numpy(self.data)
        if array.dtype in (np.float32, np.float16) or is_bfloat16(array.dtype):
            return array
        return to_float32(array)

    def unpacked(self) -> Any:
        """`[B, C, h, w]` float32, where the data lives."""
        z = self.data.float() if is_torch(self.data) else to_float32(np.asarray(self.data))
        if not self.packed:
            return z
        assert self.height is not None and self.width is not None
        unpacked = processing.unpack_latents(to_numpy(z), self.height, self.width)
        return to_torch(unpacked, like=z) if is_torch(z) else unpacked


def _round_trip(array: np.ndarray, dtype: DTypeName) -> np.ndarray:
    wire = to_wire(array, dtype)
    return from_wire(wire.body, wire.shape, wire.dtype)


def as_latent_batch(
    latents: LatentInput | LatentBatch,
    height: int | None = None,
    width: int | None = None,
    wire_dtype: DTypeName | None = None,
    channels: int | None = None,
) -> LatentBatch:
    """Latents as a batch; `wire_dtype` rounds them through that dtype (as sending them would).
    `channels`, the model's latent channels, only makes error messages precise."""
    if isinstance(latents, LatentBatch):
        return latents
    like = latents if is_torch(latents) else None
    data: Any = latents if like is not None else np.asarray(latents)
    if like is None and data.dtype.kind not in "fc" and not is_bfloat16(data.dtype):
        data = data.astype(np.float32)  # integers
    shape = tuple(data.shape)
    if 0 in shape:
        raise TensorError(f"empty latents {shape}")
    if len(shape) not in (3, 4):
        c, packed = (channels, 4 * channels) if channels else ("C", "4C")
        raise TensorError(
            f"latents must be [B, {c}, H, W] or packed [B, HW/4, {packed}], got {shape}"
        )
    if len(shape) == 3 and (height is None or width is None):
        raise TensorError("packed 3-D latents need height and width (pixels)")
    if wire_dtype is not None:
        data = _round_trip(LatentBatch(data).numpy(), wire_dtype)
    return LatentBatch(data, height, width, like, wire_dtype)


# -- outputs --------------------------------------------------------------------------------------


def encode_output(latents: Any, output: EncodeOutput | None, like: Any) -> Any:
    """Latents as the caller asked: numpy by default, torch (on `like`'s device) for torch input."""
    kind = output or ("torch" if like is not None else "numpy")
    if kind == "numpy":
        return to_numpy(latents)
    if kind == "torch":
        return to_torch(latents, like)
    raise ValueError(f"unknown output {output!r}; expected numpy or torch")


def check_decode_output(output: DecodeOutput | None) -> None:
    if output is not None and output not in get_args(DecodeOutput):
        raise ValueError(f"unknown output {output!r}; expected one of {get_args(DecodeOutput)}")


def decode_output(images: Any, kind: DecodeOutput, like: Any, quality: int) -> Any:
    """Decoded images (uint8 `NHWC`, or float `NCHW` for `float`) as the caller asked."""
    if kind == "float":
        return to_torch(images, like) if like is not None else to_numpy(images)
    if kind == "torch":
        return to_torch(images, like)
    pixels = to_numpy(images)
    if kind == "numpy":
        return pixels
    if kind == "pil":
        return pil_images(pixels)
    return [encode_image(p, kind, quality=quality) for p in pixels]
