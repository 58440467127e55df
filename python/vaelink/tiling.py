"""Tiled execution: run a spatial model over same-shape overlapping tiles and blend the overlaps.

Every tile has the same shape - the last tile of a row or column shifts inward instead of shrinking -
so algorithm caches (cuDNN, CUDA graphs) keep hitting. Overlaps are blended with linear ramps,
normalised so that the weights at every output pixel sum to one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import OperationCancelledError
from .frameworks import is_torch, to_torch

__all__ = ["TileGrid", "check_cancelled", "run_tiled", "tile_starts"]


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of same-size tiles covering `[0, size)`, stepping `tile - overlap`; the last one
    ends exactly at `size`. Offsets are multiples of `align` when `size` and `tile` are."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, overlap: int, fade_start: bool, fade_end: bool) -> np.ndarray:
    """1 in the middle, rising linearly over `overlap` samples at the ends that meet another tile."""
    w = np.ones(length, np.float32)
    if overlap > 0:
        rise = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if fade_start:
            w[:overlap] = np.minimum(w[:overlap], rise)
        if fade_end:
            w[length - overlap :] = np.minimum(w[length - overlap :], rise[::-1])
    return w


@dataclass(frozen=True)
class TileGrid:
    """Tiles of `tile x tile` input samples overlapping by `overlap`; the model maps `n` input samples
    to `n * num // den` output samples along each spatial axis."""

    tile: int
    overlap: int
    num: int = 1
    den: int = 1

    def out(self, n: int) -> int:
        return n * self.num // self.den

    def count(self, height: int, width: int) -> int:
        return len(self._starts(height)) * len(self._starts(width))

    def _starts(self, size: int) -> list[int]:
        return tile_starts(size, self.tile, self.overlap, align=self.den)


def check_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise OperationCancelledError("cancelled")


def run_tiled(
    fn: Callable[[Any], Any], x: Any, grid: TileGrid, cancel: threading.Event | None = None
) -> Any:
    """Applies `fn` (NCHW -> NC'H'W') tile by tile over `x` and blends the results. `x` is a numpy
    array or a torch tensor; the blend happens where `x` lives. `cancel`: checked before each tile
    (`OperationCancelledError`), so that abandoned work stops within one tile."""
    as_x = _converter(x)
    _, _, height, width = x.shape
    ys, xs = grid._starts(height), grid._starts(width)
    th, tw = min(grid.tile, height), min(grid.tile, width)
    out: Any = None
    weight = as_x(np.zeros((grid.out(height), grid.out(width)), np.float32))
    for y in ys:
        for x0 in xs:
            check_cancelled(cancel)
            result = fn(x[:, :, y : y + th, x0 : x0 + tw])
            oy, ox, oh, ow = grid.out(y), grid.out(x0), grid.out(th), grid.out(tw)
            # Ramps only where this tile meets another: overlaps are measured in output samples.
            overlap_y = min(grid.out(grid.overlap), oh // 2)
            overlap_x = min(grid.out(grid.overlap), ow // 2)
            wy = _ramp(oh, overlap_y, y > 0, y + th < height)
            wx = _ramp(ow, overlap_x, x0 > 0, x0 + tw < width)
            w = as_x(wy[:, None] * wx[None, :])
            if out is None:
                shape = (*result.shape[:2], grid.out(height), grid.out(width))
                out = as_x(np.zeros(shape, np.float32))
            out[:, :, oy : oy + oh, ox : ox + ow] += result * w
            weight[oy : oy + oh, ox : ox + ow] += w
    out /= weight
    return out


def _converter(like: Any) -> Callable[[np.ndarray], Any]:
    """Moves numpy arrays to where `like` lives (torch tensors' device), or leaves them as they are."""
    if is_torch(like):
        return lambda a: to_torch(a, like)
    return lambda a: a
