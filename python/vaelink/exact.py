"""Exact tiling: run an AutoencoderKL's segments (`vaelink.export_segments`) tile by tile so that the
result equals the untiled pass up to floating-point summation order.

Each step maps one full-resolution activation map held on the host (float32 numpy, as full-width
row strips of a tile's area, `Strips`) to the next. A convolution step runs its ONNX segment on
each strip as stored, with the halo rows its 3x3 reads (the graph pads as the model does), and
keeps the output as the runtime returned it; between convolutions only halo rows are copied. A step
that starts with a GroupNorm first reduces that norm's per-group mean and variance over the whole
map (float64 on the host) and hands them to every strip. The mid-block attention runs over all
positions at latent resolution in one runtime call (ONNX Runtime's MultiHeadAttention: flash
attention, scores are never held `N x N`). Only a strip and its halo, or the latent-resolution
attention's input, ever go to the runtime.

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
LAYOUT = "rows"  # segments for row strips with halo rows (older exports' segments cropped tiles)


def group_stats(
    x: np.ndarray, groups: int, eps: float, rows: tuple[int, int] | None = None
) -> Stats:
    """Per-channel mean and 1/std `[N, C, 1, 1]` of GroupNorm over the map `x` (float32,
    contiguous; `rows`: only those rows), reduced by the Rust core: in parallel, without a
    temporary copy, two passes per group so that a large mean costs the variance nothing
    (relative error ~1e-7)."""
    return strip_stats([(x, rows or (0, x.shape[2]))], groups, eps)


def strip_stats(
    strips: Sequence[tuple[np.ndarray, tuple[int, int]]], groups: int, eps: float
) -> Stats:
    """`group_stats` of the map made of `strips` (each an array and the rows of it that count):
    each strip's group means and variances, merged in float64 (Chan et al.'s parallel variance)."""
    if len(strips) == 1:
        x, rows = strips[0]
        mean, rstd = _native.group_stats(x, groups, eps, rows)
    else:
        counts, means, variances = [], [], []
        for x, rows in strips:
            m, r = _native.group_stats(x, groups, eps, rows)
            counts.append(rows[1] - rows[0])
            means.append(m.astype(np.float64))
            variances.append(1 / r.astype(np.float64) ** 2 - eps)
        weights = np.array(counts, np.float64)[:, None, None] / sum(counts)
        m64 = np.stack(means)
        mean64 = (weights * m64).sum(axis=0)
        var = (weights * (np.stack(variances) + (m64 - mean64) ** 2)).sum(axis=0)
        mean, rstd = mean64, 1 / np.sqrt(np.maximum(var, 0) + eps)
    per = strips[0][0].shape[1] // groups

    def expand(a: np.ndarray) -> np.ndarray:
        return np.repeat(a.astype(np.float32), per, axis=1)[:, :, None, None]

    return expand(mean), expand(rstd)


class Strips:
    """A map `[N, C, H, W]` held as full-width row strips. Strip `i` owns rows `[edges[i],
    edges[i + 1])` and is stored with up to `halo` rows of its neighbours' on each side, so that a
    3x3 segment runs on the stored array as it is (the graph pads like the model) and its output,
    which has the same rows, is kept as the runtime returned it: only the halo rows, refreshed from
    the neighbours, are ever copied between convolutions. Halo rows of an output are stale (they
    saw a strip's edge) until refreshed."""

    def __init__(
        self, shape: tuple[int, ...], edges: list[int], halo: int, parts: list[np.ndarray]
    ) -> None:
        self.shape, self.edges, self.parts = shape, edges, parts
        self.halo = halo if len(edges) > 2 else 0

    @classmethod
    def whole(cls, x: np.ndarray) -> Strips:
        return cls(x.shape, [0, x.shape[2]], 0, [np.ascontiguousarray(x, np.float32)])

    def stored(self, i: int) -> tuple[int, int]:
        """The rows strip `i`'s array holds."""
        return max(0, self.edges[i] - self.halo), min(self.shape[2], self.edges[i + 1] + self.halo)

    def owned(self) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """Each strip's array and its own rows within it (for statistics)."""
        return [
            (part, (self.edges[i] - self.stored(i)[0], self.edges[i + 1] - self.stored(i)[0]))
            for i, part in enumerate(self.parts)
        ]

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows `[r0, r1)` (inside the map) as one contiguous array, from the strips' own rows."""
        for i, part in enumerate(self.parts):
            if self.halo == 0 and self.stored(i) == (r0, r1):
                return part  # one strip's own rows: no copy
        n, c, _, w = self.shape
        out = np.empty((n, c, r1 - r0, w), np.float32)
        for i, part in enumerate(self.parts):
            a, b = max(r0, self.edges[i]), min(r1, self.edges[i + 1])
            if a < b:
                first = self.stored(i)[0]
                out[:, :, a - r0 : b - r0] = part[:, :, a - first : b - first]
        return out

    def laid_out(self, edges: list[int], halo: int) -> Strips:
        """This map in strips `edges` with `halo` rows (itself when it already is), halos fresh."""
        laid = Strips(self.shape, edges, halo, [])
        if (edges, laid.halo) == (self.edges, self.halo):
            self.refresh()
            return self
        laid.parts = [self.rows(*laid.stored(i)) for i in range(len(edges) - 1)]
        return laid

    def refresh(self) -> None:
        """Copies each strip's halo rows from the neighbours that own them."""
        for i, part in enumerate(self.parts):
            first, last = self.stored(i)
            for a, b in ((first, self.edges[i]), (self.edges[i + 1], last)):
                if a < b:
                    j = i - 1 if a < self.edges[i] else i + 1
                    src_first = self.stored(j)[0]
                    part[:, :, a - first : b - first] = self.parts[j][
                        :, :, a - src_first : b - src_first
                    ]

    def full(self) -> np.ndarray:
        return self.parts[0] if len(self.parts) == 1 else self.rows(0, self.shape[2])


def _strip_edges(height: int, width: int, area: int, even: bool) -> list[int]:
    """Row strips of at most `area` samples (one row at least; an even count when `even`). A map
    wider than `area` samples (over 262144 pixels with 512-pixel tiles) gets strips of one row,
    larger than a tile: not guarded, as no image is that wide."""
    rows = max(1, area // width)
    if even:
        rows = max(2, rows // 2 * 2)
    return [*range(0, height, rows), height]


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

    @staticmethod
    def runs(steps: Sequence[dict[str, Any]]) -> bool:
        """Whether `steps` are segments this program runs (exports before row strips are not)."""
        return bool(steps) and all(step.get("layout") == LAYOUT for step in steps)

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
        height in pixels); each step runs on full-width row strips of that tile's area at its
        own resolution. `record`: a list that receives each norm step's statistics, in order
        (fast tiling's downscaled pass)."""
        maps: dict[str, Strips] = {"x": Strips.whole(x)}
        out = maps["x"]
        for i, step in enumerate(self.steps):
            src = maps[step["input"]]
            check_cancelled(cancel)
            if step["op"] == "attend":  # over all positions at once: no score matrix is held
                (y,) = self.session(step["file"]).run(None, {"x": src.full()})
                out = Strips.whole(y)
            else:
                out = self._conv(src, maps, step, tile, reference, cancel, record)
            maps[step["output"]] = out
            for key in ("input", "res"):
                name = step.get(key)
                if name and self.last_use.get(name) == i:
                    maps.pop(name, None)
        return out.full()

    def _conv(
        self,
        src: Strips,
        maps: dict[str, Strips],
        step: dict[str, Any],
        tile: int,
        reference: int,
        cancel: threading.Event | None,
        record: list[Stats] | None,
    ) -> Strips:
        kind = step["kind"]
        _, _, h, w = src.shape
        oh, ow = _out_size(kind, h), _out_size(kind, w)
        edges = _strip_edges(oh, ow, (tile * oh // reference) ** 2, even=kind == "up")
        # Halo rows each output strip is computed with: a 3x3 reads one beyond its own; "up"
        # keeps two (whole input rows make pairs of output rows); "point" keeps its input's.
        halo = {"same": max(1, src.halo), "point": src.halo, "down": 1, "up": 2}[kind]
        if kind in ("same", "point"):
            src = src.laid_out(edges, halo)
        out = Strips((src.shape[0], step["out_channels"], oh, ow), edges, halo, [])
        feed: dict[str, np.ndarray] = {}
        if step.get("norm"):
            feed["mean"], feed["rstd"] = strip_stats(src.owned(), **step["norm"])
            if record is not None:
                record.append((feed["mean"], feed["rstd"]))
        res = maps[step["res"]].laid_out(edges, out.halo) if step.get("res") else None
        session = self.session(step["file"])
        for i in range(len(edges) - 1):
            check_cancelled(cancel)
            r0, r1 = out.stored(i)
            if kind == "down":  # the stride-2 3x3 reads rows 2 r0 .. 2 r1 (the graph pads one)
                feed["x"] = src.rows(2 * r0, min(h, 2 * r1 + 1))
            elif kind == "up":  # nearest 2x from even rows: input rows r0 / 2 .. r1 / 2
                feed["x"] = src.rows(r0 // 2, r1 // 2)
            else:
                feed["x"] = src.parts[i]
            if res is not None:
                feed["res"] = res.parts[i]
            (y,) = session.run(None, feed)
            out.parts.append(y)
        return out


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
