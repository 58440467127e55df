"""Exact tiling (`vaelink.exact`): an AutoencoderKL tiled with whole-image GroupNorm statistics and
whole-image attention equals the untiled engine run and diffusers' own forward pass.

Bound: max |tiled - reference| / max |reference| <= 1e-4 in float32 (measured about 1e-6), with
64-pixel tiles on 200 x 264 images (sides not multiples of the tile: many tiles, halos, ragged
edges), on an SDXL-like (4 latent channels, quant convs) and a FLUX-like (16 channels, no quant
convs, factor 8) seeded model with GroupNorm and the mid-block attention. Blended tiling on the same
models is off by 10-100% of the range, so the comparisons can fail."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import engine_fixtures as ef
import numpy as np
import pytest
import torch

import vaelink
from vaelink import exact
from vaelink.engine import Engine, EngineError
from vaelink.errors import CorruptExportError, OperationCancelledError, TensorError
from vaelink.exports import MANIFEST

EXACT_TOL = 1e-4
HEIGHT, WIDTH, TILE = 200, 264, 64
STRIP_AREA = TILE**2 + 5 * WIDTH


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with ef.one_torch_thread():
        yield


@pytest.fixture(scope="module", params=["sdxl-like", "flux-like"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ef.Exported:
    return ef.exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def images(photos: dict[str, np.ndarray]) -> np.ndarray:
    return vaelink.preprocess(ef.photo_batch(photos["astronaut"], 1, HEIGHT, WIDTH))


class TileSpy:
    """Records the spatial shape of every tile handed to a segment."""

    def __init__(self, engine: Engine) -> None:
        self.shapes: list[tuple[int, int]] = []
        original = engine._segment_session

        def session(file: str) -> Any:
            inner = original(file)
            spy = self

            class Proxy:
                def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
                    spy.shapes.append(feed["x"].shape[2:])
                    return inner.run(names, feed)

            return Proxy()

        engine._segment_session = session  # type: ignore[method-assign]


def test_exact_tiles_equal_untiled_and_diffusers(model: ef.Exported, images: np.ndarray) -> None:
    engine = model.engine(tile_size=TILE)
    spy = TileSpy(engine)

    untiled = engine.encode(images, tile=False)
    tiled = engine.encode(images, tile=True, tiling="exact")
    assert ef.rel_err(tiled, untiled) <= EXACT_TOL
    assert ef.rel_err(tiled, model.encode(images)) <= EXACT_TOL
    # Many strips, none bigger than a tile's area and a few halo rows (a stride-2 step reads
    # 2 x (rows + 2 halo) + 1 rows of its input).
    assert len(spy.shapes) > 100 and max(h * w for h, w in spy.shapes) <= STRIP_AREA

    spy.shapes.clear()
    decoded = engine.decode(untiled, output="float", tile=False)
    decoded_tiled = engine.decode(untiled, output="float", tile=True, tiling="exact")
    assert ef.rel_err(decoded_tiled, decoded) <= EXACT_TOL
    assert ef.rel_err(decoded_tiled, model.decode(untiled)) <= EXACT_TOL
    assert len(spy.shapes) > 100 and max(h * w for h, w in spy.shapes) <= STRIP_AREA

    # Blended tiles normalise on their own: far off, so the bound above means something.
    blended = engine.decode(untiled, output="float", tile=True, tiling="blended")
    assert ef.rel_err(blended, decoded) > 100 * EXACT_TOL
    assert ef.rel_err(engine.encode(images, tile=True, tiling="blended"), untiled) > 100 * EXACT_TOL


def test_exact_is_the_default_and_keeps_torch(
    tmp_path_factory: pytest.TempPathFactory, images: np.ndarray
) -> None:
    model = ef.exported("sd15-like", tmp_path_factory)
    engine = model.engine(tile_size=32)
    exact_z = engine.encode(images, tile=True, tiling="exact")
    np.testing.assert_array_equal(engine.encode(images, tile=True), exact_z)
    as_torch = engine.encode(torch.from_numpy(images), tile=True)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), exact_z, rtol=0, atol=1e-6)
    decoded = engine.decode(torch.from_numpy(exact_z), output="float", tile=True)
    assert isinstance(decoded, torch.Tensor)
    untiled = engine.decode(exact_z, output="float", tile=False)
    assert ef.rel_err(decoded.numpy(), untiled) <= EXACT_TOL


def test_cancel_stops_exact_tiling(
    tmp_path_factory: pytest.TempPathFactory, images: np.ndarray
) -> None:
    engine = ef.exported("sd15-like", tmp_path_factory).engine(tile_size=32)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(OperationCancelledError):
        engine.encode(images, tile=True, tiling="exact", cancel=cancel)


def test_models_without_segments(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, images: np.ndarray
) -> None:
    # Tiny autoencoders do not normalise: no segments, blended tiling, exact refused.
    taesd = ef.exported("taesd-like", tmp_path_factory)
    assert taesd.engine().manifest.segments == {}
    with pytest.raises(EngineError, match="no segments"):
        taesd.engine(tile_size=32).encode(images, tile=True, tiling="exact")

    # An export from before exact tiling, and one whose segments predate the row-strip layout
    # (their graphs pad differently): blended with a note, refused when exact or fast is asked for.
    def without_segments(data: dict[str, Any]) -> None:
        del data["segments"]

    def without_layout(data: dict[str, Any]) -> None:
        for steps in data["segments"].values():
            for step in steps:
                del step["layout"]

    for name, edit in (("old", without_segments), ("older", without_layout)):
        folder = ef.exported("sd15-like", tmp_path_factory).copy(tmp_path / name)
        data = json.loads((folder / MANIFEST).read_text())
        edit(data)
        (folder / MANIFEST).write_text(json.dumps(data))
        engine = Engine(folder, provider="cpu", tile_size=32)
        with pytest.warns(UserWarning, match="predates exact tiling"):
            engine.encode(images, tile=True)
        for tiling in ("exact", "fast"):
            with pytest.raises(EngineError, match="no segments"):
                engine.encode(images, tile=True, tiling=tiling)
    with pytest.raises(EngineError, match="unknown tiling"):
        engine.encode(images, tile=True, tiling="seamless")  # type: ignore[arg-type]


def test_segments_are_verified(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    folder = ef.exported("sd15-like", tmp_path_factory).copy(tmp_path / "spoilt")
    step = json.loads((folder / MANIFEST).read_text())["segments"]["decoder"][0]
    with open(folder / step["file"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptExportError, match="does not match its manifest"):
        Engine(folder, provider="cpu")


@pytest.mark.parametrize("offset", [0.0, 800.0])
def test_group_stats_are_torchs_group_norm_statistics(offset: float) -> None:
    """The Rust core's statistics normalise exactly as torch's GroupNorm does, a large mean too."""
    rng = np.random.default_rng(3)
    x = (offset + 2 * rng.standard_normal((2, 64, 33, 47))).astype(np.float32)
    mean, rstd = exact.group_stats(x, 32, 1e-6)
    assert mean.shape == rstd.shape == (2, 64, 1, 1) and mean.dtype == np.float32
    expected = torch.nn.functional.group_norm(torch.from_numpy(x).double(), 32, eps=1e-6)
    ours = (x.astype(np.float64) - mean) * rstd
    np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=2e-5 * (1 + offset / 100))


def test_strip_statistics_are_the_whole_maps() -> None:
    """Statistics of a map held in strips with halo rows (each strip counting only its own rows,
    merged in float64) equal those of the whole map; rows outside a map are refused."""
    rng = np.random.default_rng(5)
    x = (3 + rng.standard_normal((1, 16, 23, 9))).astype(np.float32)
    whole = exact.group_stats(x, 4, 1e-6)
    # Strips owning rows [0, 8), [8, 15), [15, 23), stored with two halo rows each side.
    strips = [
        (np.ascontiguousarray(x[:, :, 0:10]), (0, 8)),
        (np.ascontiguousarray(x[:, :, 6:17]), (2, 9)),
        (np.ascontiguousarray(x[:, :, 13:23]), (2, 10)),
    ]
    for merged, expected in zip(exact.strip_stats(strips, 4, 1e-6), whole, strict=True):
        np.testing.assert_allclose(merged, expected, rtol=2e-6)
    own = exact.group_stats(x, 4, 1e-6, rows=(6, 17))
    copied = exact.group_stats(np.ascontiguousarray(x[:, :, 6:17]), 4, 1e-6)
    np.testing.assert_allclose(own, copied, rtol=1e-6)
    with pytest.raises(TensorError, match="rows"):
        exact.group_stats(x, 4, 1e-6, rows=(20, 24))


def test_attention_segment_is_softmax_attention(tmp_path: Path) -> None:
    """The attention nodes (ONNX Runtime's MultiHeadAttention between reshapes) compute
    softmax(q k^T / sqrt(d)) v per head, q, k and v stacked on channels as the qkv segment makes."""
    from onnx import TensorProto, helper

    from vaelink.export_segments import _save, attention_nodes
    from vaelink.runtime import load_onnxruntime

    rng = np.random.default_rng(0)
    heads, channels = 2, 8
    qkv = rng.standard_normal((2, 3 * channels, 5, 7), dtype=np.float32)
    nodes, inits = attention_nodes("x", "y", heads=heads, channels=channels)
    shape = ["n", 3 * channels, "h", "w"]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    path = _save(graph, tmp_path / "attention.onnx")
    ort = load_onnxruntime()
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": qkv}
    )
    d = channels // heads
    q, k, v = (t.reshape(2, heads, d, 35) for t in np.split(qkv, 3, axis=1))
    scores = np.einsum("nhdq,nhdk->nhqk", q, k) / np.sqrt(d)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("nhqk,nhdk->nhdq", weights, v).reshape(2, channels, 5, 7)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_exact_on_the_real_sd_layout(
    tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]
) -> None:
    # The SD1.x/SDXL/SD3/FLUX.1 body as it ships (widths 128/256/512/512, two resnets a block,
    # 32 groups), seeded: a 256 x 256 image in 128-pixel tiles cuts every map in four, the
    # mid-block's attention too. The 1024 / 512 case is the same cut at 4x the area; it
    # takes minutes on the CPU, so it is measured in benches/bench_engine.py --exact sd:1024:512.
    from diffusers import AutoencoderKL

    from vaelink.cards import get_card
    from vaelink.export import export_vae

    torch.manual_seed(ef.SEED)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()
    folder = export_vae(
        vae, get_card("sd15"), tmp_path_factory.mktemp("sd") / "sd", variants=("float32",)
    )
    engine = Engine(folder, provider="cpu", tile_size=128)
    images = vaelink.preprocess(ef.photo_batch(photos["astronaut"], 1, 256, 256))
    z = engine.encode(images, tile=False)
    assert ef.rel_err(engine.encode(images, tile=True, tiling="exact"), z) <= EXACT_TOL
    decoded = engine.decode(z, output="float", tile=False)
    tiled = engine.decode(z, output="float", tile=True, tiling="exact")
    assert ef.rel_err(tiled, decoded) <= EXACT_TOL
    blended = engine.decode(z, output="float", tile=True, tiling="blended")
    assert ef.rel_err(blended, decoded) > 100 * EXACT_TOL
