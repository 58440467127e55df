"""The local engine against diffusers' own forward pass, on tiny seeded VAEs of every family, exported
to ONNX and run by ONNX Runtime's CPU provider: encoding (mode and sample), decoding (float and uint8,
packed latents), every input kind, float16 and its float32 fallback, batch slicing, tiling, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import engine_fixtures as ef
import numpy as np
import pytest
import torch
from PIL import Image

import vaelink
from vaelink import runtime
from vaelink.engine import Engine, EngineError, MemoryModel
from vaelink.errors import (
    CorruptExportError,
    ModelNotExportedError,
    NonFiniteOutputError,
    OperationCancelledError,
    ProviderUnavailableError,
    UnknownModelError,
    VaelinkWarning,
)
from vaelink.exports import MANIFEST, sha256_file
from vaelink.runtime import GpuMemory, activation_budget
from vaelink.tiling import TileGrid

TOL = 1e-4  # float32, relative to the reference's largest magnitude
FP16_TOL = 1e-2

SIZE = 64  # images are SIZE x SIZE unless said otherwise: a multiple of every config's factor


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with ef.one_torch_thread():
        yield


@pytest.fixture(scope="module", params=list(ef.CONFIGS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ef.Exported:
    return ef.exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> ef.Exported:
    return ef.exported("sd15-like", tmp_path_factory)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> ef.Exported:
    return ef.exported("flux-like", tmp_path_factory)


@pytest.fixture(scope="module")
def pixels(photos: dict[str, np.ndarray]) -> np.ndarray:
    """Two SIZE x SIZE uint8 crops of a photo, NHWC."""
    return ef.photo_batch(photos["astronaut"], 2, SIZE, SIZE)


@pytest.fixture(scope="module")
def images(pixels: np.ndarray) -> np.ndarray:
    """The crops as float32 NCHW in [-1, 1]."""
    return vaelink.preprocess(pixels)


class Spy:
    """Records each `Engine._run_session` call as (part, dtype, input shape)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []
        original = Engine._run_session

        def run(engine: Engine, part: str, x: np.ndarray, dtype: str) -> np.ndarray:
            self.calls.append((part, dtype, x.shape))
            return original(engine, part, x, dtype)

        monkeypatch.setattr(Engine, "_run_session", run)


# -- correctness against diffusers ----------------------------------------------------------------


def test_encode_mode_matches_diffusers(model: ef.Exported, images: np.ndarray) -> None:
    latents = model.engine().encode(images)
    f, c = model.card.spatial_factor, model.card.latent_channels
    assert latents.dtype == np.float32
    assert latents.shape == (2, c, SIZE // f, SIZE // f)
    assert ef.rel_err(latents, model.encode(images)) <= TOL


def test_moments_are_diffusers_posterior(model: ef.Exported, images: np.ndarray) -> None:
    """Unscaled: the mean and, from the log-variance, the std of diffusers' posterior (tiny
    autoencoders: their latents)."""
    moments = model.engine().moments(images)
    mean, std = model.moments(images)
    c = model.card.latent_channels
    assert ef.rel_err(moments[:, :c], mean) <= TOL
    if std is None:
        assert moments.shape[1] == c
    else:
        assert moments.shape[1] == 2 * c
        assert ef.rel_err(np.exp(0.5 * np.clip(moments[:, c:], -30, 20)), std) <= TOL


def test_encode_sample_matches_diffusers_with_the_same_noise(
    model: ef.Exported, images: np.ndarray
) -> None:
    engine = model.engine()
    mean, std = model.moments(images)
    noise = np.random.default_rng(5).standard_normal(mean.shape, dtype=np.float32)
    sampled = engine.encode(images, sample=True, noise=noise)
    if std is None:  # AutoencoderTiny: deterministic, sampling gives the latents
        np.testing.assert_array_equal(sampled, engine.encode(images))
        return
    assert ef.rel_err(sampled, model.scale(mean + std * noise)) <= TOL
    assert not np.allclose(sampled, engine.encode(images))


def test_encode_sample_noise_kinds(sd15: ef.Exported, images: np.ndarray) -> None:
    """float64 noise, lists and torch noise give float32 latents like float32 noise does."""
    engine = sd15.engine()
    mean, _ = sd15.moments(images)
    noise = np.random.default_rng(3).standard_normal(mean.shape)  # float64
    expected = engine.encode(images, sample=True, noise=noise.astype(np.float32))
    for kind in (noise, noise.tolist(), torch.from_numpy(noise)):
        latents = engine.encode(images, sample=True, noise=kind)
        assert latents.dtype == np.float32
        np.testing.assert_array_equal(latents, expected)
    from_torch = engine.encode(torch.from_numpy(images), sample=True, noise=noise)
    assert from_torch.dtype == torch.float32
    np.testing.assert_allclose(from_torch.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", [k for k, c in ef.CONFIGS.items() if c.card.has_posterior])
def test_encode_sample_seeds(
    key: str, images: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Seeds reproduce and differ (AutoencoderKL only: tiny autoencoders have no posterior)."""
    model = ef.exported(key, tmp_path_factory)
    engine = model.engine()
    a = engine.encode(images, sample=True, seed=7)
    b = engine.encode(images, sample=True, seed=7)
    c = engine.encode(images, sample=True, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # The seed's noise is a standard normal draw of the posterior's shape.
    mean, std = model.moments(images)
    noise = np.random.default_rng(7).standard_normal(mean.shape, dtype=np.float32)
    assert ef.rel_err(a, model.scale(mean + std * noise)) <= TOL


def test_decode_matches_diffusers(model: ef.Exported, images: np.ndarray) -> None:
    engine = model.engine()
    latents = engine.encode(images)
    decoded = engine.decode(latents, output="float")
    assert decoded.dtype == np.float32
    assert decoded.shape == (2, 3, SIZE, SIZE)
    assert ef.rel_err(decoded, model.decode(latents)) <= TOL


def test_decode_uint8_is_postprocess_of_float(model: ef.Exported, images: np.ndarray) -> None:
    engine = model.engine()
    latents = engine.encode(images)
    pixels = engine.decode(latents)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(
        pixels, vaelink.postprocess(engine.decode(latents, output="float"))
    )


@pytest.mark.parametrize("key", ["flux-like", "taef1-like"])
def test_packed_latents_decode_like_unpacked(
    key: str, tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]
) -> None:
    model = ef.exported(key, tmp_path_factory)
    assert model.card.packed_latents and model.card.spatial_factor == 8
    height, width = 64, 96  # not square, so that swapped sides would show
    engine = model.engine()
    latents = engine.encode(vaelink.preprocess(ef.photo_batch(photos["coffee"], 2, height, width)))
    packed = ef.pack(latents)
    assert packed.shape == (2, (height // 16) * (width // 16), 4 * model.card.latent_channels)
    np.testing.assert_array_equal(vaelink.pack_latents(latents), packed)
    expected = engine.decode(latents, output="float")
    unpacked = engine.decode(packed, height=height, width=width, output="float")
    np.testing.assert_allclose(unpacked, expected, rtol=0, atol=1e-6)
    as_torch = engine.decode(torch.from_numpy(packed), height=height, width=width)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), vaelink.postprocess(expected))


# -- inputs ---------------------------------------------------------------------------------------


def test_every_image_input_kind_encodes_alike(
    sd15: ef.Exported, pixels: np.ndarray, images: np.ndarray, tmp_path: Path
) -> None:
    engine = sd15.engine()
    one = engine.encode(images[:1])
    both = engine.encode(images)
    path = tmp_path / "image.png"
    path.write_bytes(vaelink.encode_image(pixels[0], "png"))
    singles = {
        "uint8 HWC": pixels[0],
        "uint8 NHWC of one": pixels[:1],
        "PIL image in a list": [Image.fromarray(pixels[0])],
        "path str": str(path),
        "Path": path,
        "PNG bytes": path.read_bytes(),
        "float CHW": images[0],
        "float64 NCHW": images[:1].astype(np.float64),
    }
    for kind, value in singles.items():
        out = engine.encode(value)
        assert isinstance(out, np.ndarray), kind
        np.testing.assert_allclose(out, one, rtol=0, atol=1e-6, err_msg=kind)
    batches = {
        "uint8 NHWC": pixels,
        "list of PIL images": [Image.fromarray(p) for p in pixels],
        "list of arrays": list(pixels),
        "float NCHW": images,
    }
    for kind, value in batches.items():
        np.testing.assert_allclose(engine.encode(value), both, rtol=0, atol=1e-6, err_msg=kind)
    assert ef.rel_err(one, sd15.encode(images[:1])) <= TOL


def test_torch_in_torch_out(sd15: ef.Exported, images: np.ndarray) -> None:
    engine = sd15.engine()
    latents = engine.encode(torch.from_numpy(images))
    assert isinstance(latents, torch.Tensor) and latents.dtype == torch.float32
    np.testing.assert_array_equal(latents.numpy(), engine.encode(images))
    half = engine.encode(torch.from_numpy(images).half())  # any float dtype is taken
    assert isinstance(half, torch.Tensor)
    decoded = engine.decode(latents, output="float")
    assert isinstance(decoded, torch.Tensor) and decoded.shape == (2, 3, SIZE, SIZE)
    assert ef.rel_err(decoded.numpy(), sd15.decode(latents.numpy())) <= TOL
    pixels = engine.decode(latents)
    assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8
    assert pixels.shape == (2, SIZE, SIZE, 3)
    # numpy in, numpy out
    assert isinstance(engine.decode(latents.numpy()), np.ndarray)
    np.testing.assert_array_equal(pixels.numpy(), engine.decode(latents.numpy()))


def test_torch_uint8_images(sd15: ef.Exported, pixels: np.ndarray, images: np.ndarray) -> None:
    """uint8 NHWC/HWC tensors are normalised like vaelink.preprocess does."""
    engine = sd15.engine()
    expected = engine.encode(images)
    batch = engine.encode(torch.from_numpy(pixels))
    assert isinstance(batch, torch.Tensor)
    np.testing.assert_allclose(batch.numpy(), expected, rtol=0, atol=1e-5)
    single = engine.encode(torch.from_numpy(pixels[1]))
    np.testing.assert_allclose(single.numpy(), expected[1:], rtol=0, atol=1e-5)


def test_torch_tiled_and_sliced_like_numpy(sd15: ef.Exported, images: np.ndarray) -> None:
    engine = sd15.engine(tile_size=32)
    latents = engine.encode(images, tile=True)
    as_torch = engine.encode(torch.from_numpy(images), tile=True)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), latents, rtol=0, atol=1e-5)
    decoded = engine.decode(latents, output="float", tile=True)
    decoded_torch = engine.decode(torch.from_numpy(latents), output="float", tile=True)
    np.testing.assert_allclose(decoded_torch.numpy(), decoded, rtol=0, atol=1e-5)
    sliced = sd15.engine(memory_limit=1)
    untiled = engine.encode(images, tile=False)
    sliced_torch = sliced.encode(torch.from_numpy(images), tile=False)  # one image at a time
    np.testing.assert_allclose(sliced_torch.numpy(), untiled, rtol=0, atol=1e-5)


# -- float16 --------------------------------------------------------------------------------------


def test_float16_variant_runs_on_cpu_close_to_float32(
    model: ef.Exported, images: np.ndarray
) -> None:
    engine16, engine32 = model.engine(dtype="float16"), model.engine()
    assert engine16.dtype == "float16" and engine16._variant("float16") == "float16"
    latents32 = engine32.encode(images)
    latents16 = engine16.encode(images)
    assert latents16.dtype == np.float32
    assert ef.rel_err(latents16, latents32) <= FP16_TOL
    decoded16 = engine16.decode(latents32, output="float")
    assert ef.rel_err(decoded16, engine32.decode(latents32, output="float")) <= FP16_TOL


def test_float16_non_finite_output_is_redone_in_float32(
    sd15: ef.Exported, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine32 = sd15.engine()
    latents32 = engine32.encode(images)
    decoded32 = engine32.decode(latents32, output="float")

    calls: list[tuple[str, str]] = []
    original = Engine._run_session

    def overflowing(engine: Engine, part: str, x: np.ndarray, dtype: str) -> np.ndarray:
        calls.append((part, dtype))
        out = original(engine, part, x, dtype)
        if dtype == "float16":
            out = out.copy()
            out.flat[::7] = np.nan
            out.flat[3] = np.inf
        return out

    monkeypatch.setattr(Engine, "_run_session", overflowing)
    engine16 = sd15.engine(dtype="float16")
    np.testing.assert_array_equal(engine16.encode(images), latents32)
    np.testing.assert_array_equal(engine16.decode(latents32, output="float"), decoded32)
    assert calls == [
        ("encoder", "float16"),
        ("encoder", "float32"),
        ("decoder", "float16"),
        ("decoder", "float32"),
    ]


def test_float16_non_finite_torch_output_is_redone_in_float32(
    sd15: ef.Exported, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    latents32 = sd15.engine().encode(images)
    dtypes: list[str] = []
    original = Engine._run_bound

    def overflowing(engine: Engine, part: str, x: torch.Tensor, dtype: str) -> torch.Tensor:
        dtypes.append(dtype)
        out = original(engine, part, x, dtype)
        return out * float("inf") if dtype == "float16" else out

    monkeypatch.setattr(Engine, "_run_bound", overflowing)
    latents = sd15.engine(dtype="float16").encode(torch.from_numpy(images))
    assert isinstance(latents, torch.Tensor)
    np.testing.assert_allclose(latents.numpy(), latents32, rtol=0, atol=1e-6)
    assert dtypes == ["float16", "float32"]


def test_float16_finite_output_is_kept(
    sd15: ef.Exported, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    sd15.engine(dtype="float16").encode(images)
    assert [(part, dtype) for part, dtype, _ in spy.calls] == [("encoder", "float16")]


# -- batch slicing and tiling ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sd15-like", "taesd-like"])
def test_small_memory_limit_slices_the_batch(
    key: str,
    tmp_path_factory: pytest.TempPathFactory,
    photos: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = ef.exported(key, tmp_path_factory)
    x = vaelink.preprocess(ef.photo_batch(photos["chelsea"], 5, SIZE, SIZE))
    latents = model.engine().encode(x)
    decoded = model.engine().decode(latents, output="float")

    per_image = model.engine().memory.bytes(SIZE, SIZE, 4)
    # Two images fit, one image does not exceed it: slices of 2, 2, 1 and no tiling.
    sliced = model.engine(memory_limit=2 * per_image + 1)
    spy = Spy(monkeypatch)
    np.testing.assert_allclose(sliced.encode(x), latents, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sliced.decode(latents, output="float"), decoded, rtol=0, atol=1e-5)
    shapes = [(part, shape[:2]) for part, _, shape in spy.calls]
    c = model.card.latent_channels
    assert shapes == [
        ("encoder", (2, 3)),
        ("encoder", (2, 3)),
        ("encoder", (1, 3)),
        ("decoder", (2, c)),
        ("decoder", (2, c)),
        ("decoder", (1, c)),
    ]
    # Less than one image: tile=False still runs, one image at a time.
    spy.calls.clear()
    tiny = model.engine(memory_limit=1)
    np.testing.assert_allclose(tiny.encode(x, tile=False), latents, rtol=0, atol=1e-5)
    assert [shape for _, _, shape in spy.calls] == [(1, 3, SIZE, SIZE)] * 5


def test_attention_plans_no_score_matrix(sd15: ef.Exported, tmp_path: Path) -> None:
    """Exports hold the mid-block attention as MultiHeadAttention (no (h*w)^2 scores), so a large
    image plans only its convolutions' maps; an older export's plan keeps the score matrix."""
    engine = sd15.engine()
    assert engine.memory.attention and not engine.memory.scores
    convs = MemoryModel(engine.memory.full_res_channels, attention=False)
    assert engine.memory.bytes(2048, 2048, 4) == convs.bytes(2048, 2048, 4)
    old = sd15.copy(tmp_path / "old")
    data = json.loads((old / MANIFEST).read_text())
    del data["source"]["config"]["flash_attention"]
    (old / MANIFEST).write_text(json.dumps(data))
    tokens = 2048 * 2048 // sd15.card.spatial_factor**2
    older = Engine(old, provider="cpu").memory.bytes(2048, 2048, 4)
    assert older == convs.bytes(2048, 2048, 4) + 4 * tokens**2


def test_images_over_the_memory_limit_are_tiled(
    sd15: ef.Exported, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blended, so that tiles are whole-graph runs to count (with segments and no room for exact's
    # host maps the default mode is fast: tests/test_fast_tiling.py).
    engine = sd15.engine(memory_limit=1, tile_size=32)
    tiled = engine.encode(images, tile=True, tiling="blended")
    spy = Spy(monkeypatch)
    # tile=None: too big, so tiled
    np.testing.assert_array_equal(engine.encode(images, tiling="blended"), tiled)
    grid = TileGrid(tile=32, overlap=8, num=1, den=2)
    assert len(spy.calls) == 2 * grid.count(SIZE, SIZE) == 2 * 9
    assert {shape for _, _, shape in spy.calls} == {(1, 3, 32, 32)}


def test_tile_larger_than_the_image_is_untiled(sd15: ef.Exported, images: np.ndarray) -> None:
    engine = sd15.engine()  # 512-pixel tiles on the CPU
    latents = engine.encode(images, tile=False)
    np.testing.assert_allclose(engine.encode(images, tile=True), latents, rtol=0, atol=1e-6)
    decoded = engine.decode(latents, output="float", tile=False)
    np.testing.assert_allclose(
        engine.decode(latents, output="float", tile=True), decoded, rtol=0, atol=1e-6
    )


def _rms(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# Tiled vs untiled, relative RMS difference (||tiled - untiled|| / ||untiled||), measured as this
# test runs (96-pixel tiles, two 128 x 160 photo crops; encoder and decoder 2 x 2 tiles each):
#                 sd15   sdxl   sd3    flux   taesd  taef1
#   encode        0.33   0.39   0.55   0.60   0.04   0.17
#   decode        0.33   0.41   0.77   0.78   0.05   0.18
#   other photo   0.96   1.33   1.32   1.23   0.29   0.80   (decoding another photo's latents)
# Every tile is normalised (GroupNorm) and attends (the mid-block attention) on its own, so the
# AutoencoderKL models differ a lot with random weights - diffusers' own tiled_encode/tiled_decode
# differ as much from its untiled pass on these models (0.45-1.04 with 64-pixel tiles). The tiny
# autoencoders have neither; they differ only through the zero padding at tile borders.
TILED_RMS_BOUND = {"AutoencoderKL": 0.9, "AutoencoderTiny": 0.25}


def test_tiled_encode_and_decode(
    model: ef.Exported, photos: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    height, width, tile = 128, 160, 96
    f, c = model.card.spatial_factor, model.card.latent_channels
    x = vaelink.preprocess(ef.photo_batch(photos["astronaut"], 2, height, width))
    engine = model.engine(tile_size=tile)

    spy = Spy(monkeypatch)
    latents = engine.encode(x, tile=False)
    tiled = engine.encode(x, tile=True, tiling="blended")  # exact tiling: tests/test_exact.py
    assert tiled.shape == latents.shape == (2, c, height // f, width // f)
    encoder_tiles = [shape for part, _, shape in spy.calls[1:]]
    assert len(encoder_tiles) == 2 * 4 and set(encoder_tiles) == {(1, 3, tile, tile)}

    spy.calls.clear()
    decoded = engine.decode(latents, output="float", tile=False)
    decoded_tiled = engine.decode(latents, output="float", tile=True, tiling="blended")
    assert decoded_tiled.shape == decoded.shape == (2, 3, height, width)
    decoder_tiles = [shape for part, _, shape in spy.calls[1:]]
    assert len(decoder_tiles) == 2 * 4 and set(decoder_tiles) == {(1, c, tile // f, tile // f)}

    bound = TILED_RMS_BOUND[model.card.architecture]
    assert _rms(tiled, latents) <= bound
    assert _rms(decoded_tiled, decoded) <= bound
    # The blend stays a convex mix of tile outputs: no seams of zeros, nothing non-finite.
    assert np.isfinite(tiled).all() and np.isfinite(decoded_tiled).all()
    # Tiles land where they belong: closer to the untiled result than another photo's decoding.
    other = vaelink.preprocess(ef.photo_batch(photos["coffee"], 2, height, width))
    other_decoded = engine.decode(engine.encode(other, tile=False), output="float", tile=False)
    assert _rms(decoded_tiled, decoded) < _rms(other_decoded, decoded)
    # uint8 output of a tiled decode is the postprocessed float output.
    np.testing.assert_array_equal(
        engine.decode(latents, tile=True, tiling="blended"), vaelink.postprocess(decoded_tiled)
    )


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [True, False])
def test_a_set_cancel_event_stops_encode_and_decode(
    sd15: ef.Exported, images: np.ndarray, tile: bool
) -> None:
    engine = sd15.engine(tile_size=32)
    cancel = threading.Event()
    latents = engine.encode(images, tile=tile, cancel=cancel)  # not set: runs to the end
    cancel.set()
    with pytest.raises(OperationCancelledError):
        engine.encode(images, tile=tile, cancel=cancel)
    with pytest.raises(OperationCancelledError):
        engine.decode(latents, tile=tile, cancel=cancel)


def test_finite_latents_that_decode_to_nan_are_refused(sd15: ef.Exported) -> None:
    """Latents far outside the model's range (3e37) overflow float32 inside the decoder: an error,
    never a NaN image."""
    engine = sd15.engine()
    z = np.full((1, sd15.card.latent_channels, 8, 8), 3e37, np.float32)
    with pytest.raises(NonFiniteOutputError, match="NaN or infinity"):
        engine.decode(z, output="float", scaling=vaelink.cards.IDENTITY)
    with pytest.raises(ValueError):  # a bad-input error, as the others
        engine.decode(z, scaling=vaelink.cards.IDENTITY)


def test_bad_images_are_refused(sd15: ef.Exported, images: np.ndarray) -> None:
    engine = sd15.engine()
    f = sd15.card.spatial_factor
    assert f == 2
    with pytest.raises(vaelink.TensorError, match="3-channel"):
        engine.encode(np.zeros((1, 4, SIZE, SIZE), np.float32))
    with pytest.raises(vaelink.TensorError, match="3-channel"):
        engine.encode(np.zeros((1, 1, SIZE, SIZE), np.float32))
    with pytest.raises(vaelink.TensorError, match="3-channel"):
        engine.encode(np.zeros((SIZE, SIZE), np.float32))
    with pytest.raises(vaelink.VaelinkError) as info:  # RGBA arrays: convert them first
        engine.encode(np.zeros((SIZE, SIZE, 4), np.uint8))
    assert isinstance(info.value, ValueError)
    with pytest.raises(vaelink.TensorError, match="multiple of 2"):
        engine.encode(np.zeros((1, 3, SIZE + 1, SIZE), np.float32))
    with pytest.raises(vaelink.TensorError, match="multiple of 2"):
        engine.encode(np.zeros((SIZE, SIZE + 3, 3), np.uint8))
    with pytest.raises(vaelink.TensorError, match="positive multiple"):
        engine.encode(np.zeros((1, 3, 0, SIZE), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        spoiled = images.copy()
        spoiled[1, 2, 5, 7] = bad
        with pytest.raises(vaelink.TensorError, match="NaN or infinity"):
            engine.encode(spoiled)
    with pytest.raises(vaelink.TensorError, match="NaN or infinity"):
        engine.encode(torch.full((1, 3, SIZE, SIZE), float("nan")))
    for empty in ([], (), np.zeros((0, 3, SIZE, SIZE), np.float32), torch.zeros(0, 3, SIZE, SIZE)):
        with pytest.raises(vaelink.TensorError, match="empty"):
            engine.encode(empty)
    with pytest.raises(vaelink.TensorError, match="same size"):
        engine.encode([np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, 32, 3), np.uint8)])
    with pytest.raises(vaelink.DecodeError):
        engine.encode(b"not an image")


def test_bad_latents_are_refused(sd15: ef.Exported, flux: ef.Exported) -> None:
    engine = sd15.engine()
    with pytest.raises(vaelink.TensorError, match=r"\[B, 4, H, W\]"):
        engine.decode(np.zeros((1, 16, 8, 8), np.float32))
    with pytest.raises(vaelink.TensorError, match=r"\[B, 4, H, W\]"):
        engine.decode(np.zeros((4, 64), np.float32))
    with pytest.raises(vaelink.TensorError, match="empty"):
        engine.decode(np.zeros((0, 4, 8, 8), np.float32))
    with pytest.raises(vaelink.TensorError, match="empty"):
        engine.decode(np.zeros((1, 4, 0, 8), np.float32))
    for bad in (np.nan, np.inf):
        z = np.zeros((2, 4, 8, 8), np.float32)
        z[1, 3, 2, 1] = bad
        with pytest.raises(vaelink.TensorError, match="NaN or infinity"):
            engine.decode(z)
    with pytest.raises(vaelink.TensorError, match="output"):
        engine.decode(np.zeros((1, 4, 8, 8), np.float32), output="png")  # type: ignore[arg-type]

    packed = ef.pack(np.zeros((1, 16, 8, 8), np.float32))
    packed_engine = flux.engine()
    with pytest.raises(vaelink.TensorError, match="height and width"):
        packed_engine.decode(packed)
    with pytest.raises(vaelink.TensorError, match="height and width"):
        packed_engine.decode(packed, height=64)
    with pytest.raises(vaelink.TensorError):
        packed_engine.decode(packed, height=64, width=128)  # 32 tokens expected, 16 given
    with pytest.raises(vaelink.TensorError):
        engine.decode(np.zeros((1, 16, 4 * 4 + 1), np.float32), height=64, width=64)


def test_bad_noise_is_refused(sd15: ef.Exported, images: np.ndarray) -> None:
    with pytest.raises(vaelink.TensorError, match="noise has shape"):
        sd15.engine().encode(images, sample=True, noise=np.zeros((2, 4, 8, 8), np.float32))


def test_unknown_provider(sd15: ef.Exported) -> None:
    with pytest.raises(EngineError, match="unknown provider"):
        Engine(sd15.folder, provider="tpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("tile_size", [0, 1, 3, 33, -4])
def test_bad_tile_size(sd15: ef.Exported, tile_size: int) -> None:
    with pytest.raises(EngineError, match="tile_size"):
        Engine(sd15.folder, provider="cpu", tile_size=tile_size)


def test_missing_variant(sd15: ef.Exported, images: np.ndarray, tmp_path: Path) -> None:
    folder = sd15.copy(tmp_path / "export")
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["variants"]["float16"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    engine = Engine(folder, provider="cpu", dtype="float16")
    with pytest.raises(EngineError, match="no float16 export"):
        engine.encode(images)
    Engine(folder, provider="cpu").encode(images)  # float32 still there


def test_corrupt_onnx_file_is_refused(sd15: ef.Exported, tmp_path: Path) -> None:
    folder = sd15.copy(tmp_path / "export")
    path = folder / "decoder-float32.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16  # same size, other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptExportError, match=r"decoder-float32\.onnx"):
        Engine(folder, provider="cpu")
    path.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(CorruptExportError, match="does not match"):
        Engine(folder, provider="cpu")


def test_missing_file_is_refused(sd15: ef.Exported, tmp_path: Path) -> None:
    folder = sd15.copy(tmp_path / "export")
    (folder / "encoder-float16.onnx").unlink()
    with pytest.raises(CorruptExportError, match=r"encoder-float16\.onnx is missing"):
        Engine(folder, provider="cpu")
    (folder / MANIFEST).unlink()
    with pytest.raises(CorruptExportError, match=r"no manifest\.json"):
        Engine(folder, provider="cpu")


def test_unloadable_graph_is_an_engine_error(
    sd15: ef.Exported, images: np.ndarray, tmp_path: Path
) -> None:
    """A file that matches its manifest but is no ONNX graph: found when the session loads."""
    folder = sd15.copy(tmp_path / "export")
    path = folder / "encoder-float32.onnx"
    path.write_bytes(b"this is not a protobuf" * 10)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["variants"]["float32"]["encoder"].update(
        bytes=path.stat().st_size, sha256=sha256_file(path)
    )
    (folder / MANIFEST).write_text(json.dumps(manifest))
    engine = Engine(folder, provider="cpu")
    with pytest.raises(EngineError, match="cannot load"):
        engine.encode(images)


def test_unknown_model_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    with pytest.raises(UnknownModelError) as info:
        Engine("no-such-vae", provider="cpu")
    message = str(info.value)
    assert "no-such-vae" in message
    for name in ("flux1", "sd15", "sd3", "sdxl", "taef1", "taesd", "taesd3", "taesdxl"):
        assert name in message


def test_model_with_a_card_but_no_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    with pytest.raises(ModelNotExportedError, match="`vaelink export sdxl`"):
        Engine("sdxl", provider="cpu")


_PEAK_RSS_SCRIPT = """
import sys, numpy as np
from vaelink.engine import Engine

def peak_rss():  # VmHWM belongs to this process image (ru_maxrss would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

engine = Engine(sys.argv[1], provider="cpu", memory_limit=1 << 30)
latents = np.random.default_rng(0).standard_normal((1, 16, 512, 512), dtype=np.float32)
before = peak_rss()
image = engine.decode(latents)
assert image.shape == (1, 4096, 4096, 3), image.shape
print(peak_rss() - before)
"""


def test_4096_decode_runs_tiled_within_a_few_gib(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A 4096 x 4096 decode (latents 512 x 512) with a 1 GiB activation budget tiles itself, and the
    process grows by less than 2 GiB: the image itself (48 MiB uint8, 192 MiB float) plus tiles."""
    flux = ef.exported("flux-like", tmp_path_factory)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(flux.folder)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.strip().splitlines()[-1])
    print(f"4096 x 4096 tiled decode: peak RSS grew by {grown / 2**30:.2f} GiB")
    assert grown < 2 << 30, f"peak RSS grew by {grown / 2**30:.2f} GiB"


# -- the CUDA path, with a fake ONNX Runtime -------------------------------------------------------
# No GPU here: `FakeCudaOrt` lists the CUDA provider and records what sessions are asked for; its
# sessions run on the real CPU provider and report CUDA when the provider "loads".


class FakeSession:
    def __init__(self, real: Any, path: str, providers: list[Any], ort: FakeCudaOrt) -> None:
        self.real, self.path, self.providers, self.ort = real, path, providers, ort

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def get_providers(self) -> list[str]:
        asked_cuda = self.providers[0][0] == "CUDAExecutionProvider"
        cuda = ["CUDAExecutionProvider"] if asked_cuda and self.ort.cuda_loads else []
        return [*cuda, "CPUExecutionProvider"]

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feed.values()
        self.ort.runs.append((Path(self.path).name, x.dtype.name, x.shape))
        out = self.real.run(names, feed)
        if self.ort.nan_float16 and x.dtype == np.float16:
            return [np.full_like(o, np.nan) for o in out]
        return out


class FakeCudaOrt:
    def __init__(self, *, cuda_loads: bool = True, arena: bool = True, nan_float16: bool = False):
        import onnxruntime

        self.real = onnxruntime
        self.cuda_loads, self.arena, self.nan_float16 = cuda_loads, arena, nan_float16
        self.sessions: list[FakeSession] = []
        self.arenas: list[tuple[dict[str, str], int]] = []
        self.runs: list[tuple[str, str, tuple[int, ...]]] = []
        self.preloaded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def get_available_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def preload_dlls(self) -> None:
        self.preloaded += 1

    def create_and_register_allocator_v2(
        self, provider: str, memory: Any, options: dict[str, str], arena: Any
    ) -> None:
        assert provider == "CUDAExecutionProvider"
        if not self.arena:
            raise RuntimeError("no shared CUDA allocator in this build")
        self.arenas.append((dict(options), arena.max_mem))

    def InferenceSession(
        self, path: str, options: Any = None, *, providers: list[Any]
    ) -> FakeSession:
        real = self.real.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        session = FakeSession(real, path, providers, self)
        self.sessions.append(session)
        return session


H200 = GpuMemory("NVIDIA H200", 141 << 30, 140 << 30)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeCudaOrt]:
    import vaelink.engine as engine_module

    def install(gpu: GpuMemory | None = H200, **kwargs: Any) -> FakeCudaOrt:
        ort = FakeCudaOrt(**kwargs)
        monkeypatch.setattr(engine_module, "load_onnxruntime", lambda: ort)
        monkeypatch.setattr(engine_module, "gpu_memory", lambda device: gpu)
        monkeypatch.setattr(runtime, "_preloaded", False)
        monkeypatch.setattr(runtime, "_shared_arenas", {})
        return ort

    return install


def test_cuda_sessions_are_checked_and_configured(fake_cuda: Callable[..., FakeCudaOrt]) -> None:
    ort = fake_cuda()
    engine = Engine()  # auto: the provider is listed and loads
    assert engine.provider == "cuda" and engine.dtype == "float16"
    assert engine.execution_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "provider='cuda' (cuda:0, CUDAExecutionProvider" in repr(engine)
    assert ort.preloaded == 1
    (probe,) = ort.sessions  # a small graph opened at once, to check that CUDA really loads
    assert probe.path == str(runtime.PROBE_MODEL)
    name, options = probe.providers[0]
    assert name == "CUDAExecutionProvider"
    assert options["device_id"] == "0" and options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 8), np.float32)
    images = engine.decode(latents)
    assert images.shape == (1, 64, 64, 3)
    assert ort.runs[-1] == ("decoder-float16.onnx", "float16", (1, 16, 8, 8))
    decoder = ort.sessions[-1]
    assert decoder.providers[0] == ("CUDAExecutionProvider", options)
    assert "gpu_mem_limit" not in options  # the one shared arena carries the cap
    engine.encode(np.zeros((1, 64, 64, 3), np.uint8))
    (arena,) = ort.arenas  # one for the device, however many sessions
    assert arena[1] == engine._budget() + engine._weights_bytes()
    assert engine._budget() == activation_budget(H200, engine._weights_bytes())


def test_cuda_that_does_not_load_falls_back_to_the_cpu_for_auto(
    fake_cuda: Callable[..., FakeCudaOrt],
) -> None:
    ort = fake_cuda(cuda_loads=False)
    with pytest.warns(VaelinkWarning, match="CUDA provider did not load.*on the CPU in float32"):
        engine = Engine()
    assert engine.provider == "cpu" and engine.dtype == "float32"
    assert "provider='cpu'" in repr(engine)
    engine.decode(np.zeros((1, 16, 8, 8), np.float32))
    assert ort.sessions[-1].providers == ["CPUExecutionProvider"]
    assert ort.runs[-1][:2] == ("decoder-float32.onnx", "float32")


def test_cuda_asked_for_and_not_loading_raises(fake_cuda: Callable[..., FakeCudaOrt]) -> None:
    fake_cuda(cuda_loads=False)
    with pytest.raises(ProviderUnavailableError, match="CUDA provider did not load"):
        Engine(provider="cuda")


def test_a_cuda_session_that_loses_its_provider_later_is_refused(
    fake_cuda: Callable[..., FakeCudaOrt],
) -> None:
    ort = fake_cuda()
    engine = Engine()
    ort.cuda_loads = False  # the probe saw CUDA; a model's own session must show it too
    with pytest.raises(ProviderUnavailableError, match=r"did not load for decoder-float16\.onnx"):
        engine.decode(np.zeros((1, 16, 8, 8), np.float32))


def test_cuda_device_and_cudnn_search_reach_the_sessions(
    fake_cuda: Callable[..., FakeCudaOrt],
) -> None:
    ort = fake_cuda()
    engine = Engine(device_id=1, cudnn_search="heuristic")
    engine.decode(np.zeros((1, 16, 8, 8), np.float32))
    for session in ort.sessions:  # the probe and the decoder
        options = session.providers[0][1]
        assert options["device_id"] == "1" and options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert ort.arenas[0][0]["device_id"] == "1"
    with pytest.raises(EngineError, match="unknown cudnn_search"):
        Engine(cudnn_search="fastest")  # type: ignore[arg-type]


def test_without_a_shared_arena_each_session_is_capped(
    fake_cuda: Callable[..., FakeCudaOrt],
) -> None:
    ort = fake_cuda(arena=False)
    engine = Engine(memory_limit=1 << 30)
    engine.decode(np.zeros((1, 16, 8, 8), np.float32))
    options = ort.sessions[-1].providers[0][1]
    assert options["gpu_mem_limit"] == str((1 << 30) + engine._weights_bytes())


def test_the_cuda_plan_follows_the_card(fake_cuda: Callable[..., FakeCudaOrt]) -> None:
    grid = TileGrid(128, 32)
    fake_cuda(GpuMemory("NVIDIA H200", 141 << 30, 140 << 30))
    big = Engine()
    assert big._plan(4096, 4096, None, grid) is None  # 141 GB: no tiling
    fake_cuda(GpuMemory("a 2 GB card", 2 << 30, 1900 << 20))
    small = Engine()
    assert small._budget() == 1900 * (1 << 20) - (1 << 30) - small._weights_bytes()
    assert small._plan(4096, 4096, None, grid) is grid
    fake_cuda(None)  # no NVML and no torch context: the documented 8 GiB
    assert Engine()._budget() == 8 << 30


def test_the_float32_retry_is_sliced_for_four_byte_elements(
    fake_cuda: Callable[..., FakeCudaOrt],
) -> None:
    ort = fake_cuda(nan_float16=True)
    probe = Engine()
    two_in_float16 = 2 * probe.memory.bytes(64, 64, 2)  # and one in float32
    engine = Engine(memory_limit=two_in_float16)
    ort.runs.clear()
    engine.decode(np.zeros((2, 16, 8, 8), np.float32))
    assert [(run[1], run[2][0]) for run in ort.runs] == [
        ("float16", 2),
        ("float32", 1),
        ("float32", 1),
    ]


def test_warm_up_on_cuda_runs_the_tile_shape(fake_cuda: Callable[..., FakeCudaOrt]) -> None:
    ort = fake_cuda()
    engine = Engine(tile_size=128)
    ort.runs.clear()
    engine.warm_up()
    shapes = {(name.split("-")[0], shape[2:]) for name, _, shape in ort.runs}
    assert shapes == {
        ("decoder", (8, 8)),
        ("encoder", (64, 64)),
        ("decoder", (16, 16)),
        ("encoder", (128, 128)),
    }
