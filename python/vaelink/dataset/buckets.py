"""Aspect-ratio buckets and the preprocessing trainers apply before caching latents.

Buckets follow SDXL's recipe (as kohya's `make_bucket_resolutions`): sides that are multiples of
`step`, no bucket holding more than `resolution ** 2` pixels, one bucket per width. An image goes
to the bucket closest to its aspect ratio, is resized to cover it (the smaller scale that fills
both sides) and centre-cropped, or resized to it exactly (`mode="resize"`, aspect not kept).
With `no_upscale`, an image that would be enlarged is only centre-cropped to a multiple of
`step` instead. What was done is recorded per item (`Placement`): SDXL's micro-conditioning
needs the original size and the crop's top-left corner."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from ..errors import TensorError
from ..image import resize_image

__all__ = ["BucketSpec", "Placement", "prepare_pixels"]

Mode = Literal["crop", "resize"]


@dataclass(frozen=True)
class BucketSpec:
    """How images become training inputs. `resolution`: the side of the square whose area every
    bucket stays within; `step`: the multiple of every side (a multiple of the VAE's spatial
    factor); `min_side` / `max_side`: the range of sides (default `resolution / 2` and
    `resolution * 2`); `mode`: `crop` (resize to cover, centre-crop) or `resize` (stretch);
    `no_upscale`: never enlarge; `flip`: also encode the horizontally flipped image."""

    resolution: int = 1024
    step: int = 64
    min_side: int | None = None
    max_side: int | None = None
    mode: Mode = "crop"
    no_upscale: bool = False
    flip: bool = False

    def check(self, spatial_factor: int) -> None:
        if self.step < 1 or self.step % spatial_factor:
            raise TensorError(
                f"step must be a positive multiple of the model's spatial factor "
                f"{spatial_factor}, got {self.step}"
            )
        if self.resolution < self.step:
            raise TensorError(f"resolution {self.resolution} is smaller than step {self.step}")
        if self.mode not in ("crop", "resize"):
            raise TensorError(f"mode must be crop or resize, got {self.mode!r}")
        if self.sides[0] > self.sides[1]:
            raise TensorError(f"min_side {self.sides[0]} exceeds max_side {self.sides[1]}")

    @property
    def sides(self) -> tuple[int, int]:
        low = self.min_side if self.min_side is not None else self.resolution // 2
        high = self.max_side if self.max_side is not None else self.resolution * 2
        return max(self.step, low - low % self.step), high - high % self.step

    def buckets(self) -> list[tuple[int, int]]:
        """Every `(width, height)` bucket, sorted by aspect ratio."""
        low, high = self.sides
        area = self.resolution * self.resolution
        found: set[tuple[int, int]] = set()
        for width in range(low, high + 1, self.step):
            height = min(high, area // width // self.step * self.step)
            if height >= low:
                found.add((width, height))
                found.add((height, width))
        if not found:
            raise TensorError(f"no bucket fits {self}")
        return sorted(found, key=lambda wh: (wh[0] / wh[1], wh[0]))

    def parameters(self) -> dict[str, Any]:
        """The settings, as recorded in every row and in the manifest."""
        return {**asdict(self), "resample": "lanczos", "sides": list(self.sides)}


@dataclass(frozen=True)
class Placement:
    """Where an item's pixels came from: `original_size` and `target_size` are `(height, width)`
    as SDXL's conditioning takes them; `resized_size` the image after resizing, before cropping;
    `crop_box` `(left, top, right, bottom)` in the resized image (its top-left corner is SDXL's
    `crops_coords_top_left`, as `(top, left)`)."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    target_size: tuple[int, int]
    flipped: bool = False


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - ratio), -wh[0] * wh[1]))


def place(spec: BucketSpec, buckets: list[tuple[int, int]], width: int, height: int) -> Placement:
    """Where an image of `width x height` goes: its bucket, the resize and the crop."""
    bw, bh = nearest_bucket(buckets, width, height)
    if spec.mode == "resize":
        scale_w, scale_h = bw / width, bh / height
        if not (spec.no_upscale and max(scale_w, scale_h) > 1):
            return Placement((height, width), (bh, bw), (0, 0, bw, bh), (bh, bw))
    else:
        scale = max(bw / width, bh / height)
        if not (spec.no_upscale and scale > 1):
            rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
            left, top = (rw - bw) // 2, (rh - bh) // 2
            return Placement((height, width), (rh, rw), (left, top, left + bw, top + bh), (bh, bw))
    # no_upscale and the bucket is larger than the image: its own size, cut to multiples of step.
    tw, th = width - width % spec.step, height - height % spec.step
    if tw == 0 or th == 0:
        raise TensorError(f"image of {width}x{height} is smaller than step {spec.step}")
    left, top = (width - tw) // 2, (height - th) // 2
    return Placement((height, width), (height, width), (left, top, left + tw, top + th), (th, tw))


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    if pixels.shape[:2] == (height, width):
        return pixels
    return resize_image(pixels, width, height)  # Lanczos3 in Rust, the GIL released


def prepare_pixels(
    pixels: np.ndarray, spec: BucketSpec, buckets: list[tuple[int, int]]
) -> tuple[np.ndarray, Placement]:
    """An `(H, W, 3)` uint8 image as the model gets it (bucketed, resized, cropped), and how."""
    height, width = pixels.shape[:2]
    placement = place(spec, buckets, width, height)
    rh, rw = placement.resized_size
    left, top, right, bottom = placement.crop_box
    out = _resize(pixels, rw, rh)[top:bottom, left:right]
    return np.ascontiguousarray(out), placement


def flipped(pixels: np.ndarray, placement: Placement) -> tuple[np.ndarray, Placement]:
    """The horizontal-flip variant of prepared pixels."""
    return np.ascontiguousarray(pixels[:, ::-1]), replace(placement, flipped=True)
