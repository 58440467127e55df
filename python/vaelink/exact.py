"""Exact tiling: run an AutoencoderKL's segments (`vaelink.export_segments`) tile by tile so that the
result equals the untiled pass up to floating-point summation order.

Each step maps one full-resolution activation map held on the host (float32 numpy) to the next. A
convolution step runs its ONNX segment on each output tile's input region plus the halo it needs
and keeps the tile's core; a step that starts with a GroupNorm first reduces that norm's per-group
mean and variance over the whole map (float64 on the host) and hands them to every tile. The
mid-block attention runs on the host over all positions at latent resolution, query block by query
block (scores are `block x N`, never `N x N`). Only a tile and its halo ever go to the runtime.

Fast tiling (`run_fast`, the idea of the "Tiled VAE" extension) trades exactness for memory and
time: the chain runs once, untiled, on an area-downscaled copy of the input (its longer side about
one tile, each channel's mean and std kept), recording every norm's statistics; then each tile runs
through the part's fused graph (all segments in one, the statistics as inputs) in one runtime call,
and the tiles are blended with `tiling.run_tiled`'s linear ramps. No full-resolution activation map
is ever held, and the mid-block attention stays within the tile (as in diffusers' tiling), so
results are close to, not equal to, the untiled pass."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _native
from .tiling import TileGrid, check_cancelled, run_tiled

__all__ = ["ExactProgram", "area_downscale", "group_stats", "run_fast"]

Stats = tuple[np.ndarray, np.ndarray]
WHOLE = 1 << 30  # a core tile larger than any map: each step runs once over the whole input

SCORE_ELEMENTS = 1 << 24  # attention scores per query block: 64 MiB of float32


def group_stats(x: np.ndarray, groups: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and 1/std `[N, C, 1, 1]` of GroupNorm over the whole map `x` (float32,
    contiguous), reduced by the Rust core: in parallel, without a temporary copy, two passes per
    group so that a large mean costs the variance nothing (relative error ~1e-7)."""
    mean, rstd = _native.group_stats(x, groups, eps)
    per = x.shape[1] // groups

    def expand(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, per, axis=1)[:, :, None, None]

    return expand(mean), expand(rstd)


def _cores(size: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, size)) for s in range(0, size, tile)]


def _region(kind: str, o0: int, o1: int, size: int) -> tuple[int, int, int, int]:
    """For output core `[o0, o1)` along one axis: the input rows `[i0, i1)` to hand over, the zero
    rows to append after them, and where the core starts in the segment's output."""
    if kind == "same":  # 3x3, padding 1: one sample of halo on each side inside the image
        i0, i1 = max(0, o0 - 1), min(size, o1 + 1)
        return i0, i1, 0, o0 - i0
    if kind == "up":  # nearest 2x then 3x3: the halo, halved (rounded outward)
        i0, i1 = max(0, (o0 - 1) // 2), min(size, (o1 + 2) // 2)
        return i0, i1, 0, o0 - 2 * i0
    if kind == "down":  # diffusers pads (0, 1) and convolves 3x3 with stride 2, padding 0
        i0, end = 2 * o0, 2 * o1 + 1
        i1 = min(size, end)
        return i0, i1, end - i1, 0
    return o0, o1, 0, 0  # point


def _out_size(kind: str, size: int) -> int:
    if kind == "up":
        return 2 * size
    if kind == "down":
        return (size + 1 - 3) // 2 + 1
    return size


class ExactProgram:
    """The steps of one part (encoder or decoder), run on a host map `x` `[N, C, H, W]`.

    `session(file)`: an ONNX Runtime session for a segment file (the engine caches them)."""

    def __init__(self, steps: Sequence[dict[str, Any]], session: Callable[[str], Any]) -> None:
        self.steps = list(steps)
        self.session = session
        # After its last reader, a map is dropped: at most a few full maps live at once.
        self.last_use: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for key in ("input", "res"):
                if step.get(key):
                    self.last_use[step[key]] = i

    def run(
        self,
        x: np.ndarray,
        tile: int,
        reference: int,
        cancel: threading.Event | None = None,
        *,
        record: list[Stats] | None = None,
    ) -> np.ndarray:
        """`tile`: the core tile's side in samples at the resolution `reference` (the image's
        height in pixels); each step's tiles scale with its own resolution. `record`: a list that
        receives each norm step's statistics, in order (fast tiling's downscaled pass)."""
        maps: dict[str, np.ndarray] = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        out = maps["x"]
        for i, step in enumerate(self.steps):
            src = maps[step["input"]]
            if step["op"] == "attend":
                out = self._attend(src, step, cancel)
            else:
                given: Stats | None = None
                if step.get("norm"):
                    given = group_stats(src, **step["norm"])
                    if record is not None:
                        record.append(given)
                res = maps[step["res"]] if step.get("res") else None
                out = self._conv(src, res, step, tile, reference, cancel, given)
            maps[step["output"]] = out
            for key in ("input", "res"):
                name = step.get(key)
                if name and self.last_use.get(name) == i:
                    maps.pop(name, None)
        return out

    def _conv(
        self,
        src: np.ndarray,
        res: np.ndarray | None,
        step: dict[str, Any],
        tile: int,
        reference: int,
        cancel: threading.Event | None,
        stats: Stats | None = None,
    ) -> np.ndarray:
        kind = step["kind"]
        n, _, h, w = src.shape
        oh, ow = _out_size(kind, h), _out_size(kind, w)
        out = np.empty((n, step["out_channels"], oh, ow), np.float32)
        feed: dict[str, np.ndarray] = {}
        if stats is not None:
            feed["mean"], feed["rstd"] = stats
        session = self.session(step["file"])
        core = max(1, tile * oh // reference)
        for y0, y1 in _cores(oh, core):
            iy0, iy1, pad_y, cy = _region(kind, y0, y1, h)
            for x0, x1 in _cores(ow, core):
                check_cancelled(cancel)
                ix0, ix1, pad_x, cx = _region(kind, x0, x1, w)
                piece = src[:, :, iy0:iy1, ix0:ix1]
                if pad_y or pad_x:
                    piece = np.pad(piece, ((0, 0), (0, 0), (0, pad_y), (0, pad_x)))
                feed["x"] = np.ascontiguousarray(piece)
                if res is not None:  # the residual over the segment's whole output region
                    ry0, rx0 = y0 - cy, x0 - cx
                    ry1 = ry0 + (iy1 - iy0) * (2 if kind == "up" else 1)
                    rx1 = rx0 + (ix1 - ix0) * (2 if kind == "up" else 1)
                    feed["res"] = np.ascontiguousarray(res[:, :, ry0:ry1, rx0:rx1])
                (y,) = session.run(None, feed)
                out[:, :, y0:y1, x0:x1] = y[:, :, cy : cy + y1 - y0, cx : cx + x1 - x0]
        return out

    def _attend(
        self, qkv: np.ndarray, step: dict[str, Any], cancel: threading.Event | None
    ) -> np.ndarray:
        """softmax(q k^T * scale) v over all positions, one block of queries at a time."""
        n, c3, h, w = qkv.shape
        c, heads = c3 // 3, step["heads"]
        d, tokens = c // heads, h * w
        flat = qkv.reshape(n, 3, heads, d, tokens)
        out = np.empty((n, heads, d, tokens), np.float32)
        block = max(1, SCORE_ELEMENTS // tokens)
        scale = np.float32(step["scale"])
        for i in range(n):
            for head in range(heads):
                q = np.ascontiguousarray(flat[i, 0, head].T) * scale  # [tokens, d]
                k, v = flat[i, 1, head], flat[i, 2, head]  # [d, tokens]
                for s in range(0, tokens, block):
                    check_cancelled(cancel)
                    scores = q[s : s + block] @ k
                    scores -= scores.max(axis=1, keepdims=True)
                    np.exp(scores, out=scores)
                    scores /= scores.sum(axis=1, keepdims=True)
                    out[i, head, :, s : s + block] = (scores @ v.T).T
        return out.reshape(n, c, h, w)


def _area_matrix(size: int, out: int) -> np.ndarray:
    """`[out, size]` weights of area averaging: output sample i covers input `[i, i + 1) * size /
    out`, each input sample weighted by the length of it inside that span."""
    edges = np.arange(out + 1, dtype=np.float64) * size / out
    left = np.arange(size, dtype=np.float64)
    overlap = np.minimum(edges[1:, None], left[None, :] + 1) - np.maximum(edges[:-1, None], left)
    weights: np.ndarray = np.clip(overlap, 0, None) * out / size
    return weights.astype(np.float32)


def area_downscale(x: np.ndarray, longest: int, align: int = 1) -> np.ndarray:
    """`x` `[N, C, H, W]` area-averaged so that its longer side is about `longest`, sides rounded
    to multiples of `align` (the encoder's spatial factor); never upscaled."""
    _, _, h, w = x.shape
    scale = min(1.0, longest / max(h, w))
    oh = min(h, max(align, round(h * scale / align) * align))
    ow = min(w, max(align, round(w * scale / align) * align))
    if (oh, ow) == (h, w):
        return np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = _area_matrix(h, oh), _area_matrix(w, ow)
    return np.ascontiguousarray(rows @ x.astype(np.float32) @ cols.T)


def run_fast(
    program: ExactProgram,
    fused: Any,
    x: np.ndarray,
    grid: TileGrid,
    align: int,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """Fast tiling of one part over `x` `[1, C, H, W]`: statistics from a downscaled pass of
    `program` whose longer side is one tile of `grid` (`align`: the sides' multiple, the spatial
    factor when encoding), then `grid`'s tiles run through `fused` (the part's fused graph's
    session) with them and are blended."""
    stats: list[Stats] = []
    check_cancelled(cancel)
    small = area_downscale(x, grid.tile, align)
    # Averaging smooths the input (latents above all), lowering its variance and so shifting every
    # later norm's statistics; restoring each channel's full-size mean and std undoes most of that
    # (kl-small, latents pooled 4x: 23.5 dB against untiled without this, 35.6 dB with it).
    axes = (2, 3)
    spread = small.std(axis=axes, keepdims=True)
    small = (small - small.mean(axis=axes, keepdims=True)) / np.maximum(spread, 1e-6)
    small = small * x.std(axis=axes, keepdims=True) + x.mean(axis=axes, keepdims=True)
    program.run(np.ascontiguousarray(small, np.float32), WHOLE, 1, cancel, record=stats)
    feed = {
        f"{name}{k}": s
        for k, pair in enumerate(stats)
        for name, s in zip(("mean", "rstd"), pair, strict=True)
    }

    def tile(t: np.ndarray) -> np.ndarray:
        (y,) = fused.run(None, {**feed, "x": np.ascontiguousarray(t, np.float32)})
        return np.asarray(y)

    out: np.ndarray = run_tiled(tile, x, grid, cancel)
    return out
