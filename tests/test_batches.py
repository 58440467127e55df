"""vaelink.batches: every accepted input becomes one normalised batch (and torch stays torch, on its
device, unless the host must change it); every batch becomes each output kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vaelink
from vaelink.batches import (
    ImageBatch,
    LatentBatch,
    as_image_batch,
    as_latent_batch,
    decode_output,
    encode_output,
)
from vaelink.dtypes import bfloat16, to_bfloat16


def pixels(seed: int, shape: tuple[int, ...] = (16, 24, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# -- images ---------------------------------------------------------------------------------------


def test_every_uint8_layout_is_an_nhwc_batch() -> None:
    hwc = pixels(0)
    for given in (hwc, hwc[None], [hwc], (hwc,), Image.fromarray(hwc), vaelink.encode_image(hwc)):
        batch = as_image_batch(given, 8, "crop")
        assert batch.pixels and batch.like is None and batch.size == (16, 24)
        assert np.array_equal(batch.data, hwc[None])
    gray = as_image_batch(hwc[:, :, 0], 8, "crop")
    assert np.array_equal(gray.data, np.repeat(hwc[None, :, :, :1], 3, axis=3))


def test_sides_are_fitted_or_left_alone() -> None:
    odd = pixels(1, (20, 27, 3))
    assert as_image_batch(odd, 8, "crop").size == (16, 24)
    assert np.array_equal(as_image_batch(odd, 8, "crop").data[0], odd[2:18, 1:25])
    assert np.array_equal(
        as_image_batch(odd, 8, "resize").data[0], vaelink.fit_to_multiple(odd, 8, "resize")
    )
    assert as_image_batch(odd, 8, None).size == (20, 27), "left for the model to refuse"


def test_float_images_become_float32_nchw() -> None:
    x = np.random.default_rng(2).uniform(-1, 1, (3, 16, 8))
    batch = as_image_batch(x, 8, "crop")
    assert not batch.pixels and batch.data.dtype == np.float32 and batch.data.shape == (1, 3, 16, 8)
    bf16 = as_image_batch(to_bfloat16(x.astype(np.float32))[None], 8, "crop")
    assert bf16.data.dtype == np.float32 and bf16.size == (16, 8)


def test_pixels_and_floats_agree() -> None:
    hwc = pixels(3)
    expected = vaelink.preprocess(hwc)
    assert np.array_equal(as_image_batch(hwc, 8, "crop").nchw_float(), expected)
    in_torch = as_image_batch(torch.from_numpy(hwc), 8, "crop").nchw_float()
    assert isinstance(in_torch, torch.Tensor)
    assert np.array_equal(in_torch.numpy(), expected), "the same arithmetic in torch"


def test_a_torch_tensor_stays_itself_when_nothing_has_to_change() -> None:
    tensor = torch.from_numpy(pixels(4, (2, 16, 24, 3)))
    batch = as_image_batch(tensor, 8, "crop")
    assert batch.data is tensor and batch.like is tensor and len(batch) == 2
    floats = torch.zeros(1, 3, 16, 16)
    assert as_image_batch(floats, 8, "crop").data is floats
    # Gray, or sides to fit: changed on the host, still answered as torch.
    gray = as_image_batch(torch.from_numpy(pixels(5, (16, 24))), 8, "crop")
    assert isinstance(gray.data, np.ndarray) and gray.like is not None
    odd = as_image_batch(torch.from_numpy(pixels(6, (20, 24, 3))), 8, "crop")
    assert isinstance(odd.data, np.ndarray) and odd.size == (16, 24)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "empty batch"),
        ([pixels(0), pixels(1, (24, 16, 3))], "same size"),
        (np.zeros((16, 16, 3), np.int32), "uint8 or float"),
        (np.zeros((1, 16, 16, 4), np.uint8), "NHWC RGB"),
        (np.zeros((1, 4, 16, 16), np.float32), "3-channel"),
    ],
)
def test_bad_images_are_refused(images: object, message: str) -> None:
    with pytest.raises(vaelink.TensorError, match=message):
        as_image_batch(images, 8, "crop")  # type: ignore[arg-type]


def test_a_batch_passes_through() -> None:
    batch = ImageBatch(pixels(7)[None], pixels=True)
    assert as_image_batch(batch, 8, "crop") is batch


# -- latents --------------------------------------------------------------------------------------


def test_latents_keep_their_wire_dtype_or_are_rounded_to_the_one_asked() -> None:
    z = np.random.default_rng(8).standard_normal((1, 4, 4, 4)).astype(np.float32)
    assert as_latent_batch(z).numpy() is z
    assert as_latent_batch(z.astype(np.float16)).numpy().dtype == np.float16
    assert as_latent_batch(np.ones((1, 4, 2, 2), np.int64)).numpy().dtype == np.float32
    rounded = as_latent_batch(z, wire_dtype="bfloat16")
    assert rounded.wire_dtype == "bfloat16" and rounded.data.dtype == bfloat16
    assert np.array_equal(rounded.data, to_bfloat16(z))


def test_packed_latents_unpack_with_the_image_size() -> None:
    z = np.random.default_rng(9).standard_normal((2, 16, 4, 6)).astype(np.float32)
    packed = vaelink.pack_latents(z)
    batch = as_latent_batch(packed, 32, 48)
    assert batch.packed and np.array_equal(batch.unpacked(), z)
    in_torch = as_latent_batch(torch.from_numpy(packed), 32, 48)
    assert in_torch.like is not None and torch.equal(in_torch.unpacked(), torch.from_numpy(z))
    with pytest.raises(vaelink.TensorError, match="need height and width"):
        as_latent_batch(packed)


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (np.zeros((0, 4, 8, 8), np.float32), "empty"),
        (np.zeros((4, 8), np.float32), r"\[B, 4, H, W\] or packed \[B, HW/4, 16\]"),
    ],
)
def test_bad_latents_are_refused(latents: np.ndarray, message: str) -> None:
    with pytest.raises(vaelink.TensorError, match=message):
        as_latent_batch(latents, channels=4)


# -- outputs --------------------------------------------------------------------------------------


def test_encode_outputs() -> None:
    z = np.ones((1, 4, 2, 2), np.float32)
    like = torch.zeros(1)
    assert encode_output(z, None, None) is z
    assert isinstance(encode_output(z, None, like), torch.Tensor)
    assert isinstance(encode_output(torch.from_numpy(z), "numpy", like), np.ndarray)
    with pytest.raises(ValueError, match="unknown output"):
        encode_output(z, "pil", None)  # type: ignore[arg-type]


def test_decode_outputs() -> None:
    images = pixels(10, (2, 16, 24, 3))
    assert decode_output(images, "numpy", None, 90) is images
    assert torch.equal(decode_output(images, "torch", None, 90), torch.from_numpy(images))
    pil = decode_output(images, "pil", None, 90)
    assert [np.asarray(p).tolist() for p in pil] == images.tolist()
    pngs = decode_output(images, "png", None, 90)
    assert [vaelink.decode_image(p).tolist() for p in pngs] == images.tolist()
    floats = np.zeros((1, 3, 8, 8), np.float32)
    assert decode_output(floats, "float", None, 90) is floats
    assert isinstance(decode_output(floats, "float", torch.zeros(1), 90), torch.Tensor)
    assert isinstance(LatentBatch(floats).numpy(), np.ndarray)
