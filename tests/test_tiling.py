"""Tiled execution: same-size tiles that cover the input, aligned, and a blend whose weights sum to
one - so that a model acting sample by sample (or a fixed upsampling or pooling) gives exactly the
untiled result."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from vaelink.errors import OperationCancelledError
from vaelink.tiling import TileGrid, run_tiled, tile_starts

# (size, tile, overlap, align)
CASES = [
    (100, 32, 8, 1),
    (64, 32, 8, 1),  # 32 + 24 + ... ends exactly
    (65, 32, 8, 1),
    (33, 32, 0, 1),
    (1000, 96, 24, 8),
    (128, 48, 12, 4),
    (160, 96, 24, 8),
    (40, 12, 3, 1),
    (512, 64, 16, 8),
    (80, 16, 15, 1),  # overlap just below the tile
    (96, 16, 15, 8),  # stride rounds down to 0, kept at the alignment
    (37, 5, 2, 1),
]


@pytest.mark.parametrize(("size", "tile", "overlap", "align"), CASES)
def test_tile_starts(size: int, tile: int, overlap: int, align: int) -> None:
    starts = tile_starts(size, tile, overlap, align)
    assert starts[0] == 0
    assert starts[-1] == size - tile  # the last tile shifts inward instead of shrinking
    assert all(0 <= s <= size - tile for s in starts)  # every tile has the full size
    assert starts == sorted(set(starts))  # increasing, no tile twice
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    steps = np.diff(starts)
    assert (steps <= max(align, tile - overlap)).all()  # neighbours overlap by at least `overlap`
    if size % align == 0 and tile % align == 0:
        assert all(s % align == 0 for s in starts)


def test_tile_starts_small_inputs() -> None:
    assert tile_starts(10, 10, 2) == [0]
    assert tile_starts(10, 32, 8) == [0]  # one tile, clipped to the input by the caller
    assert tile_starts(11, 10, 2) == [0, 1]
    assert tile_starts(24, 16, 4, align=8) == [0, 8]


def test_tile_starts_stride() -> None:
    assert tile_starts(100, 32, 8) == [0, 24, 48, 68]
    assert tile_starts(128, 64, 16, align=8) == [0, 48, 64]
    assert tile_starts(128, 64, 20, align=8) == [0, 40, 64]  # stride 44 rounded down to 40


@pytest.mark.parametrize("overlap", [-1, 32, 40])
def test_tile_starts_bad_overlap(overlap: int) -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, overlap)


class Recorder:
    """Wraps a function of NCHW arrays, recording the shapes it was called with."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.shapes.append(x.shape)
        return self.fn(x)


def _pointwise(x: np.ndarray) -> np.ndarray:
    return np.tanh(3 * x) + x**2 - 0.5


def _upsample2(x: np.ndarray) -> np.ndarray:
    return x.repeat(2, axis=2).repeat(2, axis=3)


def _pool4(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 4, 4, w // 4, 4).mean(axis=(3, 5))


def _channels(x: np.ndarray) -> np.ndarray:
    """3 channels in, 5 out, still pointwise in space."""
    return np.concatenate([x, x[:, :2] * x[:, 1:], x.sum(axis=1, keepdims=True)], axis=1)


GRIDS = [
    # (height, width, grid, fn, expected)
    (70, 100, TileGrid(tile=32, overlap=8), lambda x: x, lambda x: x),
    (70, 100, TileGrid(tile=32, overlap=8), _pointwise, _pointwise),
    (33, 91, TileGrid(tile=16, overlap=15), _pointwise, _pointwise),
    (48, 80, TileGrid(tile=16, overlap=0), _pointwise, _pointwise),
    (40, 56, TileGrid(tile=12, overlap=3, num=2, den=1), _upsample2, _upsample2),
    (128, 160, TileGrid(tile=48, overlap=12, num=1, den=4), _pool4, _pool4),
    (96, 64, TileGrid(tile=64, overlap=16, num=1, den=4), _pool4, _pool4),
    (30, 50, TileGrid(tile=20, overlap=4), _channels, _channels),
    (20, 20, TileGrid(tile=32, overlap=8), _pointwise, _pointwise),  # one tile
]


@pytest.mark.parametrize(("height", "width", "grid", "fn", "expected"), GRIDS)
def test_run_tiled_equals_untiled(height, width, grid, fn, expected) -> None:
    rng = np.random.default_rng(height * width)
    x = rng.standard_normal((2, 3, height, width)).astype(np.float32)
    recorder = Recorder(fn)
    out = run_tiled(recorder, x, grid)
    want = expected(x)
    assert out.dtype == np.float32
    assert out.shape == want.shape == (2, want.shape[1], grid.out(height), grid.out(width))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # Same-size tiles, as many as the grid counts.
    tile_shape = (2, 3, min(grid.tile, height), min(grid.tile, width))
    assert recorder.shapes == [tile_shape] * grid.count(height, width)


def test_run_tiled_weights_sum_to_one_everywhere() -> None:
    """A function that returns a constant gives that constant, whatever the overlaps."""
    for height, width, tile, overlap in itertools.product((17, 64, 99), (23, 64), (16, 24), (0, 5)):
        grid = TileGrid(tile=tile, overlap=overlap)
        out = run_tiled(lambda t: np.full_like(t, 2.5), np.zeros((1, 1, height, width)), grid)
        np.testing.assert_allclose(out, 2.5, rtol=1e-6)


def test_run_tiled_blends_overlaps_convexly() -> None:
    """Each tile returning its own constant: the output stays between the tiles' values, equals a
    tile's value where only that tile covers, and mixes both across an overlap."""
    values = iter(range(1, 100))

    def constant(t: np.ndarray) -> np.ndarray:
        return np.full_like(t, float(next(values)))

    grid = TileGrid(tile=32, overlap=16)
    out = run_tiled(constant, np.zeros((1, 1, 1, 48), np.float32), grid)[0, 0, 0]
    # tiles at 0 and 16: only the first covers [0, 16), only the second [32, 48)
    np.testing.assert_allclose(out[:16], 1.0)
    np.testing.assert_allclose(out[32:], 2.0)
    middle = out[16:32]
    assert (middle > 1).all() and (middle < 2).all()
    assert (np.diff(middle) >= 0).all()  # a ramp, not a step


def test_tile_grid_counts() -> None:
    grid = TileGrid(tile=64, overlap=16, num=1, den=8)
    assert grid.count(128, 160) == 3 * 3
    assert grid.count(64, 64) == 1
    assert grid.out(128) == 16
    assert TileGrid(tile=8, overlap=2, num=8, den=1).out(20) == 160


def test_run_tiled_stops_before_the_next_tile_once_cancelled() -> None:
    cancel = threading.Event()
    calls = []

    def fn(t: np.ndarray) -> np.ndarray:
        calls.append(t.shape)
        if len(calls) == 2:
            cancel.set()  # from "another thread", between two tiles
        return t

    with pytest.raises(OperationCancelledError):
        run_tiled(fn, np.zeros((1, 1, 64, 64), np.float32), TileGrid(16, 4), cancel)
    assert len(calls) == 2
