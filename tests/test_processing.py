"""vaelink.processing against numpy and torch references: preprocess and postprocess bit for bit,
and Flux latent packing against the diffusers formulas."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import vaelink
from vaelink import TensorError

FLOAT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def bits(array: np.ndarray) -> np.ndarray:
    """The raw bits of a float array, so that comparisons are exact (-0.0 != 0.0, NaN == NaN)."""
    return array.view({2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


# -------------------------------------------------------------------------------------------------
# preprocess


def preprocess_reference(images: np.ndarray, dtype: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[None]
    x = 2 * images.astype(np.float32) / 255 - 1
    return x.transpose(0, 3, 1, 2).astype(FLOAT_DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_preprocess_every_value(dtype):
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    image[..., 1] = image[..., 1][::-1]  # channels differ, so a channel mix-up shows
    out = vaelink.preprocess(image, dtype)
    assert out.dtype == FLOAT_DTYPES[dtype] and out.shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(bits(out), bits(preprocess_reference(image, dtype)))
    assert out.min() == -1 and out.max() == 1


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_preprocess_photo_hwc(photo, dtype):
    out = vaelink.preprocess(photo, dtype)
    h, w, _ = photo.shape
    assert out.shape == (1, 3, h, w) and out.flags.c_contiguous
    np.testing.assert_array_equal(bits(out), bits(preprocess_reference(photo, dtype)))


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 3), (4, 5, 7, 3), (2, 300, 301, 3), (1, 1, 100_003, 3)]
)
def test_preprocess_nhwc_batches(shape, dtype, rng):
    # (2, 300, 301) and (1, 1, 100003) are big enough for the parallel path; the latter has rows
    # wider than one parallel task.
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    out = vaelink.preprocess(images, dtype)
    np.testing.assert_array_equal(bits(out), bits(preprocess_reference(images, dtype)))


def test_preprocess_default_dtype_is_float32(photos):
    out = vaelink.preprocess(photos["chelsea"])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, preprocess_reference(photos["chelsea"], "float32"))


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_preprocess_non_contiguous_inputs(photos, dtype):
    rgb = photos["coffee"]
    batch = np.stack([rgb, rgb[::-1], rgb[:, ::-1]])
    views = [
        rgb[10:200:3, 5:400:2],
        rgb[::-1, ::-1],
        rgb[:, :, ::-1],  # BGR
        np.transpose(np.ascontiguousarray(rgb.transpose(1, 0, 2)), (1, 0, 2)),
        batch[::2, 1:, :-1],
    ]
    for view in views:
        assert not view.flags.c_contiguous
        np.testing.assert_array_equal(
            bits(vaelink.preprocess(view, dtype)), bits(preprocess_reference(view, dtype))
        )


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 1), np.uint8),
        np.zeros((2, 4, 4, 4), np.uint8),
        np.zeros((4, 4), np.uint8),
        np.zeros((1, 1, 4, 4, 3), np.uint8),
        np.zeros((0, 4, 4, 3), np.uint8),
        np.zeros((4, 0, 3), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4, 3), np.uint16),
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_preprocess_rejects_bad_images(images):
    with pytest.raises(TensorError):
        vaelink.preprocess(images)


@pytest.mark.parametrize("dtype", ["uint8", "float64", "int8", ""])
def test_preprocess_rejects_bad_dtypes(dtype):
    with pytest.raises(TensorError):
        vaelink.preprocess(np.zeros((4, 4, 3), np.uint8), dtype)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# postprocess


def postprocess_reference(x: np.ndarray) -> np.ndarray:
    y = np.round(np.clip(x.astype(np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    return y.transpose(0, 2, 3, 1)


def _check_postprocess(x: np.ndarray) -> np.ndarray:
    out = vaelink.postprocess(x)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    n, c, h, w = x.shape
    assert out.shape == (n, h, w, c)
    np.testing.assert_array_equal(out, postprocess_reference(x))
    return out


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 3, 64, 64), (2, 3, 512, 384), (3, 3, 7, 5)])
def test_postprocess_random_normal(shape, dtype, rng):
    x = (rng.standard_normal(shape) * 0.7).astype(FLOAT_DTYPES[dtype])
    _check_postprocess(x)


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("channels", [1, 2, 4, 16])
def test_postprocess_other_channel_counts(channels, dtype, rng):
    # Large enough for the parallel path, too.
    x = rng.uniform(-1.2, 1.2, (2, channels, 96, 200)).astype(FLOAT_DTYPES[dtype])
    _check_postprocess(x)


def test_postprocess_near_rounding_ties():
    # x such that (x / 2 + 0.5) * 255 lands on or next to k + 0.5 for every k: the 16 float32
    # neighbours either side of each nominal tie. Some hit exact ties (round half to even).
    k = np.arange(-1, 257, dtype=np.float64)
    nominal = (((k + 0.5) / 255 - 0.5) * 2).astype(np.float32)
    steps, up, down = [nominal], nominal, nominal
    for _ in range(16):
        up = np.nextafter(up, np.float32(np.inf))
        down = np.nextafter(down, np.float32(-np.inf))
        steps += [up, down]
    x = np.stack(steps, axis=1).reshape(1, 1, 1, -1)
    assert np.isfinite(x).all()
    scaled = np.clip(x / 2 + 0.5, 0, 1) * 255
    assert (scaled == np.floor(scaled) + 0.5).sum() > 100  # the test does hit exact ties
    _check_postprocess(x)
    _check_postprocess(np.ascontiguousarray(x.reshape(1, 3, -1, 1)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_postprocess_every_16_bit_value(dtype):
    x = np.arange(65536, dtype=np.uint16).view(FLOAT_DTYPES[dtype])
    x = x[~np.isnan(x.astype(np.float32))].reshape(1, 1, 1, -1)  # NaN: tested separately
    out = _check_postprocess(x)
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_postprocess_far_outside_and_special_values(dtype, rng):
    big = np.array([-1e30, -65504, -300, -3, -1.0000001, 1.0000001, 3, 300, 65504, 1e30])
    x = np.concatenate([big, [np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40]])
    with np.errstate(over="ignore"):  # 1e30 is inf in 16 bits
        x = x.astype(np.float32).astype(FLOAT_DTYPES[dtype]).reshape(1, 1, 2, -1)
    out = _check_postprocess(x)
    assert out.ravel().tolist()[:10] == [0] * 5 + [255] * 5
    huge = (rng.standard_normal((1, 3, 50, 60)) * 1e4).astype(np.float32).astype(x.dtype)
    _check_postprocess(huge)


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_postprocess_nan_becomes_zero(dtype):
    x = np.array([np.nan, -np.nan, 0.5, np.nan], np.float32).astype(FLOAT_DTYPES[dtype])
    out = vaelink.postprocess(x.reshape(1, 1, 1, 4))
    assert out.ravel().tolist() == [0, 0, 191, 0]


@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_postprocess_non_contiguous_and_big_endian(dtype, rng):
    x = rng.uniform(-1.1, 1.1, (4, 6, 40, 50)).astype(FLOAT_DTYPES[dtype])
    for view in [x[::2, ::2], x[:, :3, ::-1, 5:], x.transpose(0, 1, 3, 2)]:
        assert not view.flags.c_contiguous
        _check_postprocess(view)
    if dtype != "bfloat16":
        swapped = x.astype(x.dtype.newbyteorder(">"))
        np.testing.assert_array_equal(vaelink.postprocess(swapped), postprocess_reference(x))


@pytest.mark.parametrize(
    "tensor",
    [
        np.zeros((3, 4, 4), np.float32),
        np.zeros((1, 1, 3, 4, 4), np.float32),
        np.zeros((1, 3, 0, 4), np.float32),
        np.zeros((0, 3, 4, 4), np.float16),
        np.zeros((1, 3, 4, 4), np.float64),
        np.zeros((1, 3, 4, 4), np.uint8),
        np.zeros((1, 3, 4, 4), np.uint16),
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_postprocess_rejects_bad_tensors(tensor):
    with pytest.raises(TensorError):
        vaelink.postprocess(tensor)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_preprocess_then_postprocess_is_identity(photo, dtype):
    np.testing.assert_array_equal(vaelink.postprocess(vaelink.preprocess(photo, dtype))[0], photo)


def test_bfloat16_round_trip_is_within_one_level(photos):
    rgb = photos["astronaut"]
    back = vaelink.postprocess(vaelink.preprocess(rgb, "bfloat16"))[0]
    assert np.abs(back.astype(np.int16) - rgb).max() <= 1


# -------------------------------------------------------------------------------------------------
# Flux packing, against diffusers' formulas written in torch


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def from_torch(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def diffusers_pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def diffusers_unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, channels = latents.shape
    vae_scale_factor = 8
    h = 2 * (height // (vae_scale_factor * 2))
    w = 2 * (width // (vae_scale_factor * 2))
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


PACK_DTYPES = ["float32", "float16", "bfloat16", "uint8"]


def random_latents(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(np.float32).astype(FLOAT_DTYPES[dtype])


def raw(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint8) if array.dtype.itemsize == 1 else bits(array)


@pytest.mark.parametrize("dtype", PACK_DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 16, 128, 128), (2, 4, 6, 10), (3, 1, 2, 2), (1, 16, 96, 170)]
)
def test_pack_matches_diffusers(shape, dtype, rng):
    latents = random_latents(rng, shape, dtype)
    ours = vaelink.pack_latents(latents)
    theirs = from_torch(diffusers_pack(to_torch(latents)))
    assert ours.dtype == latents.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(raw(ours), raw(theirs))


@pytest.mark.parametrize("dtype", PACK_DTYPES)
@pytest.mark.parametrize(
    ("batch", "channels", "height", "width"),
    [(1, 16, 1024, 1024), (2, 16, 768, 1360), (1, 4, 1000, 760), (1, 8, 31, 47), (3, 2, 16, 16)],
)
def test_unpack_matches_diffusers(batch, channels, height, width, dtype, rng):
    h, w = 2 * (height // 16), 2 * (width // 16)
    packed = random_latents(rng, (batch, (h // 2) * (w // 2), channels * 4), dtype)
    ours = vaelink.unpack_latents(packed, height, width)
    theirs = from_torch(diffusers_unpack(to_torch(packed), height, width))
    assert ours.dtype == packed.dtype and ours.shape == (batch, channels, h, w)
    np.testing.assert_array_equal(raw(ours), raw(theirs))
    # Packing the result gives back the input.
    np.testing.assert_array_equal(raw(vaelink.pack_latents(ours)), raw(packed))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pack_and_unpack_non_contiguous_and_big_endian(dtype, rng):
    latents = random_latents(rng, (2, 16, 64, 80), dtype)
    expected = vaelink.pack_latents(latents)
    view = np.ascontiguousarray(latents[:, :, :, ::-1])[:, :, :, ::-1]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(vaelink.pack_latents(view), expected)
    swapped = latents.astype(latents.dtype.newbyteorder(">"))
    np.testing.assert_array_equal(vaelink.pack_latents(swapped), expected)
    np.testing.assert_array_equal(
        vaelink.unpack_latents(expected.byteswap().view(swapped.dtype), 512, 640), latents
    )
    np.testing.assert_array_equal(
        vaelink.unpack_latents(expected[:, ::-1][:, ::-1], 512, 640), latents
    )


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (np.zeros((1, 4, 3, 4), np.float32), "even"),
        (np.zeros((1, 4, 4, 5), np.float32), "even"),
        (np.zeros((4, 4, 4), np.float32), "4 dimensions"),
        (np.zeros((1, 1, 4, 4, 4), np.float32), "4 dimensions"),
        (np.zeros((1, 0, 4, 4), np.float32), "shape"),
        (np.zeros((1, 4, 4, 4), np.float64), "float64"),
        (np.zeros((1, 4, 4, 4), np.int32), "int32"),
    ],
)
def test_pack_rejects_bad_latents(latents, message):
    with pytest.raises(TensorError, match=message):
        vaelink.pack_latents(latents)


@pytest.mark.parametrize(
    ("shape", "height", "width", "message"),
    [
        ((1, 4096, 64), 1024, 1000, "tokens"),  # 1000 // 16 = 62: needs 64 * 31 tokens
        ((1, 4096, 64), 512, 512, "tokens"),
        ((1, 4096, 62), 1024, 1024, "divisible by 4"),
        ((1, 1, 4), 8, 8, "too small"),
        ((1, 1, 4), 16, 15, "too small"),
        ((4096, 64), 1024, 1024, "3 dimensions"),
        ((1, 1, 64, 64), 1024, 1024, "3 dimensions"),
        ((1, 0, 64), 1024, 1024, "fill shape"),
        ((1, 4096, 64), -1024, 1024, "positive"),
    ],
)
def test_unpack_rejects_bad_shapes(shape, height, width, message):
    with pytest.raises(TensorError, match=message):
        vaelink.unpack_latents(np.zeros(shape, np.float32), height, width)
