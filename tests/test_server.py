"""`vaelink serve` on loopback, against the unmodified diffusers client
(`diffusers.utils.remote_utils.remote_encode / remote_decode`) and raw `requests`: every output type
and input kind equal to what vaelink's engine gives directly, a corpus of bad requests, concurrency
and batching, the bounded queue, auth, graceful shutdown and the command line."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image
from server_fixtures import (
    LiveServer,
    SlowEngine,
    TinyModel,
    export_tiny,
    free_port,
    metric_sum,
    parse_metrics,
)

import vaelink
from vaelink.cli import build_parser, main
from vaelink.engine import Engine
from vaelink.server import Batching, Limits, create_app
from vaelink.server.runner import JsonFormatter

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers: do_scaling

TENSOR = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
LIMITS = Limits(max_body_bytes=1 << 20, max_pixels=512 * 512, max_batch=4)
BATCHING = Batching(max_batch=8, max_wait_ms=20)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("server-exports")
    return {name: export_tiny(name, root) for name in ("sdxl", "flux1")}


@pytest.fixture(scope="session")
def ref(models: dict[str, TinyModel]) -> dict[str, Engine]:
    """Engines of the same exports, called directly: the reference for every answer."""
    return {name: model.engine() for name, model in models.items()}


@pytest.fixture(scope="module")
def server(models: dict[str, TinyModel]):
    """One model (sdxl), answering at `/`."""
    app = create_app({"sdxl": models["sdxl"].engine()}, limits=LIMITS, batching=BATCHING)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def multi(models: dict[str, TinyModel]):
    """Two models, at `/sdxl/` and `/flux1/`."""
    engines = {name: model.engine() for name, model in models.items()}
    with LiveServer(create_app(engines, limits=LIMITS, batching=BATCHING)) as live:
        yield live


def latents(seed: int, shape: tuple[int, ...] = (1, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def photo(seed: int = 0, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A smooth colour image with some edges (not noise), `size` = (height, width)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    channels = [np.sin(x / (5 + 3 * c) + rng.random() * 6) * np.cos(y / 7) for c in range(3)]
    image = (np.stack(channels, -1) + 1) * 120 + (x > w // 2)[..., None] * 15
    return np.clip(image, 0, 255).astype(np.uint8)


def post_tensor(url: str, array: np.ndarray, params: dict[str, Any], **headers: str):
    wire = vaelink.to_wire(array)
    return requests.post(
        url,
        params={"shape": list(wire.shape), "dtype": wire.dtype, **params},
        data=wire.body,
        headers=headers or TENSOR,
        timeout=30,
    )


def tensor_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    shape = [int(n) for n in response.headers["shape"].strip("[]").split(",")]
    return vaelink.from_wire(response.content, shape, response.headers["dtype"])


def assert_json_error(response: requests.Response, status: int | None = None) -> None:
    assert 400 <= response.status_code < 600, response.status_code
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json()["error"], str) and response.json()["error"]


# -- decode with the diffusers client ---------------------------------------------------------------

SDXL_SCALE = 0.13025


def test_decode_pil_jpeg(server, ref):
    z = latents(1)
    image = remote_decode(server.url, z, scaling_factor=SDXL_SCALE)
    assert isinstance(image, Image.Image) and image.size == (64, 64) and image.format == "jpeg"
    pixels = ref["sdxl"].decode(z.numpy())[0]
    expected = vaelink.encode_image(pixels, "jpeg", quality=75)
    raw = requests.post(
        server.url,
        params={
            "shape": [1, 4, 8, 8],
            "dtype": "float32",
            "output_type": "pil",
            "scaling_factor": SDXL_SCALE,
        },
        data=z.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "image/jpeg"},
    )
    assert raw.headers["content-type"] == "image/jpeg" and raw.content == expected
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(expected))))


def test_decode_pil_png(server, ref):
    z = latents(2)
    image = remote_decode(server.url, z, scaling_factor=SDXL_SCALE, image_format="png")
    assert image.format == "png"
    np.testing.assert_array_equal(np.asarray(image), ref["sdxl"].decode(z.numpy())[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_pt_is_the_raw_decoder_output_in_the_latents_dtype(server, ref, dtype):
    z = latents(3).to(dtype)
    out = remote_decode(
        server.url, z, output_type="pt", return_type="pt", scaling_factor=SDXL_SCALE
    )
    expected = torch.from_numpy(ref["sdxl"].decode(z.float().numpy(), output="float")).to(dtype)
    assert out.dtype == dtype and out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.float().abs().max() > 0  # not clamped: the raw output of a random decoder


@pytest.mark.parametrize("return_type", ["pt", "pil"])
def test_decode_pt_partial_postprocess(server, ref, return_type):
    z = latents(4).half()
    out = remote_decode(
        server.url,
        z,
        output_type="pt",
        partial_postprocess=True,
        return_type=return_type,
        scaling_factor=SDXL_SCALE,
    )
    expected = ref["sdxl"].decode(z.float().numpy())
    if return_type == "pt":
        assert out.dtype == torch.uint8 and out.shape == (1, 64, 64, 3)
        np.testing.assert_array_equal(out.numpy(), expected)
    else:
        np.testing.assert_array_equal(np.asarray(out), expected[0])


def test_decode_pt_with_a_processor(server, ref):
    z = latents(5)
    image = remote_decode(
        server.url,
        z,
        output_type="pt",
        return_type="pil",
        processor=VaeImageProcessor(),
        scaling_factor=SDXL_SCALE,
    )
    diff = np.abs(np.asarray(image, np.int16) - ref["sdxl"].decode(z.numpy())[0])
    assert diff.max() <= 1  # diffusers' postprocess in torch vs vaelink's


@pytest.mark.parametrize("return_type", ["pt", "pil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_pil_with_a_processor_returns_unit_range(server, ref, return_type, dtype):
    z = latents(6).to(dtype)
    out = remote_decode(
        server.url,
        z,
        output_type="pil",
        return_type=return_type,
        processor=VaeImageProcessor(),
        scaling_factor=SDXL_SCALE,
    )
    raw = ref["sdxl"].decode(z.float().numpy(), output="float")
    if return_type == "pt":
        assert out.dtype == dtype and out.shape == (1, 3, 64, 64)
        expected = torch.from_numpy(np.clip(raw / 2 + 0.5, 0, 1)).to(dtype)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    else:
        assert isinstance(out, list) and len(out) == 1
        diff = np.abs(np.asarray(out[0], np.int16) - ref["sdxl"].decode(z.float().numpy())[0])
        assert diff.max() <= 1


def test_decode_batch_as_pt(server, ref):
    z = latents(7, (3, 4, 8, 8))
    out = remote_decode(
        server.url, z, output_type="pt", partial_postprocess=True, return_type="pt",
        scaling_factor=SDXL_SCALE,
    )  # fmt: skip
    np.testing.assert_array_equal(out.numpy(), ref["sdxl"].decode(z.numpy()))


def pack(z: torch.Tensor) -> torch.Tensor:
    """`FluxPipeline._pack_latents`."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def test_decode_packed_flux_latents(multi, ref):
    z = latents(8, (1, 16, 8, 8))
    out = remote_decode(
        f"{multi.url}/flux1/",
        pack(z),
        output_type="pt",
        partial_postprocess=True,
        return_type="pt",
        scaling_factor=0.3611,
        shift_factor=0.1159,
        height=64,
        width=64,
    )
    np.testing.assert_array_equal(out.numpy(), ref["flux1"].decode(z.numpy()))
    # Given as the pipeline hands them over, packed, to the engine: the same.
    packed = ref["flux1"].decode(pack(z).numpy(), height=64, width=64)
    np.testing.assert_array_equal(out.numpy(), packed)


def flux_decode(url: str, z: torch.Tensor, **kwargs: Any) -> np.ndarray:
    out = remote_decode(
        f"{url}/flux1/", z, output_type="pt", return_type="pt", **kwargs
    )  # fmt: skip
    return out.numpy()


def test_decode_scaling_sent_equal_to_the_model(multi, ref):
    z = latents(9, (1, 16, 8, 8))
    out = flux_decode(multi.url, z, scaling_factor=0.3611, shift_factor=0.1159)
    np.testing.assert_array_equal(out, ref["flux1"].decode(z.numpy(), output="float"))


def test_decode_do_scaling_true_uses_the_model_factors(multi, ref):
    z = latents(10, (1, 16, 8, 8))
    out = flux_decode(multi.url, z)  # the client's default: do_scaling=True, no factor
    np.testing.assert_array_equal(out, ref["flux1"].decode(z.numpy(), output="float"))


def test_decode_do_scaling_false_sends_nothing_and_applies_nothing(multi, ref):
    """diffusers' own `test_no_scaling`: latents unscaled by the caller and `do_scaling=False`
    (which sends no scaling parameter at all) decode to the image the scaled latents give."""
    z = latents(11, (1, 16, 8, 8))
    scaled = flux_decode(multi.url, z, scaling_factor=0.3611, shift_factor=0.1159)
    unscaled = flux_decode(multi.url, z / 0.3611 + 0.1159, do_scaling=False)
    np.testing.assert_allclose(unscaled, scaled, rtol=0, atol=1e-5)
    raw = post_tensor(f"{multi.url}/flux1/", (z / 0.3611 + 0.1159).numpy(), {"output_type": "pt"})
    np.testing.assert_array_equal(tensor_of(raw), unscaled)


def test_decode_other_factors(multi, ref):
    z = latents(13, (1, 16, 8, 8))
    out = flux_decode(multi.url, z, scaling_factor=0.5, shift_factor=0.25)
    card = ref["flux1"].card
    unscaled = z.numpy() / 0.5 + 0.25
    scaled = (unscaled - card.shift_factor) * card.scaling_factor
    expected = ref["flux1"].decode(scaled.astype(np.float32), output="float")
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_decode_ignores_unknown_parameters(server, ref):
    z = latents(14).numpy()
    response = post_tensor(
        server.url,
        z,
        {
            "output_type": "pt",
            "do_scaling": True,
            "partial_postprocess": True,
            "future_option": "x",
        },
    )
    np.testing.assert_array_equal(tensor_of(response), ref["sdxl"].decode(z))


def test_decode_large_images_are_tiled(models):
    """Past `tile_above_pixels` the engine tiles (here 64-pixel tiles on a 128 x 128 image)."""
    engine = Engine(models["sdxl"].folder, provider="cpu", tile_size=64)
    limits = Limits(tile_above_pixels=64 * 64)
    z = latents(15, (1, 4, 16, 16)).numpy()
    with LiveServer(create_app({"sdxl": engine}, limits=limits)) as live:
        out = tensor_of(post_tensor(live.url, z, {"output_type": "pt", "do_scaling": True}))
    tiled = Engine(models["sdxl"].folder, provider="cpu", tile_size=64)
    np.testing.assert_array_equal(out, tiled.decode(z, output="float", tile=True))
    assert not np.array_equal(out, tiled.decode(z, output="float", tile=False))


# -- encode --------------------------------------------------------------------------------------


def test_encode_pil_image_with_the_model_factors(server, ref):
    pixels = photo(1)
    out = remote_encode(server.url, Image.fromarray(pixels), scaling_factor=SDXL_SCALE)
    assert out.shape == (1, 4, 8, 8) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), ref["sdxl"].encode(pixels))


def test_encode_without_factors_returns_the_raw_posterior_mean(multi, ref):
    pixels = photo(2)
    out = remote_encode(f"{multi.url}/flux1/", Image.fromarray(pixels))
    card = ref["flux1"].card
    expected = ref["flux1"].encode(pixels) / card.scaling_factor + card.shift_factor
    assert out.shape == (1, 16, 8, 8)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def test_encode_flux_with_scaling_and_shift(multi, ref):
    pixels = photo(3)
    out = remote_encode(
        f"{multi.url}/flux1/", Image.fromarray(pixels), scaling_factor=0.3611, shift_factor=0.1159
    )
    np.testing.assert_array_equal(out.numpy(), ref["flux1"].encode(pixels))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_image_bytes_without_content_type(server, ref, fmt):
    data = vaelink.encode_image(photo(4), fmt, quality=90)
    response = requests.post(server.url, params={"scaling_factor": SDXL_SCALE}, data=data)
    assert "Content-Type" not in response.request.headers
    expected = ref["sdxl"].encode(vaelink.decode_image(data))
    np.testing.assert_array_equal(tensor_of(response), expected)


def test_encode_crops_sizes_that_are_not_multiples_of_8(server, ref):
    pixels = photo(5, (70, 67))
    out = remote_encode(server.url, Image.fromarray(pixels), scaling_factor=SDXL_SCALE)
    assert out.shape == (1, 4, 70 // 8, 67 // 8)
    expected = ref["sdxl"].encode(vaelink.fit_to_multiple(pixels, 8))
    np.testing.assert_array_equal(out.numpy(), expected)


def test_encode_fit_resize_and_none(server, ref):
    data = vaelink.encode_image(photo(5, (70, 67)), "png")
    resized = requests.post(server.url, params={"fit": "resize", "do_scaling": True}, data=data)
    expected = ref["sdxl"].encode(vaelink.fit_to_multiple(photo(5, (70, 67)), 8, "resize"))
    np.testing.assert_array_equal(tensor_of(resized), expected)
    assert_json_error(requests.post(server.url, params={"fit": "none"}, data=data), 400)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encode_unit_range_tensor(server, ref, dtype):
    x = torch.from_numpy(photo(6)).permute(2, 0, 1)[None].float().div(255).to(dtype).contiguous()
    out = remote_encode(server.url, x, scaling_factor=SDXL_SCALE)
    assert out.dtype == dtype  # a float tensor's latents come back in its dtype
    expected = ref["sdxl"].encode(x.float().numpy() * 2 - 1)
    torch.testing.assert_close(out, torch.from_numpy(expected).to(dtype), rtol=0, atol=0)


def test_encode_signed_range_tensor(server, ref):
    x = (torch.from_numpy(photo(7)).permute(2, 0, 1)[None].float() / 127.5 - 1).contiguous()
    out = remote_encode(server.url, x, scaling_factor=SDXL_SCALE)
    np.testing.assert_array_equal(out.numpy(), ref["sdxl"].encode(x.numpy()))
    # A bright image has no negative values: the range can be stated instead of guessed.
    bright = x.clamp(0, 1).numpy()
    response = post_tensor(
        f"{server.url}/encode", bright, {"input_range": "-1,1", "do_scaling": True}
    )
    np.testing.assert_array_equal(tensor_of(response), ref["sdxl"].encode(bright))


def test_encode_uint8_hwc_tensor(server, ref):
    pixels = photo(8)
    response = post_tensor(server.url, pixels, {"scaling_factor": SDXL_SCALE}, Accept="*/*")
    np.testing.assert_array_equal(tensor_of(response), ref["sdxl"].encode(pixels))
    assert response.headers["dtype"] == "float32"


def test_encode_output_dtype(server, ref):
    data = vaelink.encode_image(photo(9), "png")
    response = requests.post(server.url, params={"output_dtype": "bfloat16"}, data=data)
    assert response.headers["dtype"] == "bfloat16"
    assert tensor_of(response).dtype == vaelink.dtypes.bfloat16


def test_encode_sample_with_seed(server, ref):
    pixels = photo(10)
    data = vaelink.encode_image(pixels, "png")
    params = {"sample": True, "seed": 7, "scaling_factor": SDXL_SCALE}
    first = tensor_of(requests.post(server.url, params=params, data=data))
    again = tensor_of(requests.post(server.url, params=params, data=data))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, ref["sdxl"].encode(pixels, sample=True, seed=7))
    assert not np.array_equal(first, ref["sdxl"].encode(pixels))


def test_encode_then_decode_round_trip(server, ref):
    """The latents feed a pipeline (or the decoder) directly."""
    z = remote_encode(server.url, Image.fromarray(photo(11)), scaling_factor=SDXL_SCALE)
    image = remote_decode(server.url, z, scaling_factor=SDXL_SCALE, image_format="png")
    np.testing.assert_array_equal(np.asarray(image), ref["sdxl"].decode(z.numpy())[0])


# -- bad requests --------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring `width x height`, with a token IDAT: an image bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload).to_bytes(4, "big")
        return len(payload).to_bytes(4, "big") + kind + payload + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


GOOD_LATENT = np.zeros((1, 4, 8, 8), np.float32).tobytes()
ONES = np.ones((1, 4, 8, 8), np.float32).tobytes()
PNG = vaelink.encode_image(photo(12), "png")
JPEG = vaelink.encode_image(photo(12), "jpeg")
WEBP = vaelink.encode_image(photo(12), "webp")


@dataclass
class Bad:
    params: dict[str, Any]
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(TENSOR))
    status: int = 400


def decode(shape: list[int], dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    return {"shape": shape, "dtype": dtype, "output_type": "pt", **extra}


def nan_latent(value: float) -> bytes:
    z = np.zeros((1, 4, 8, 8), np.float32)
    z[0, 1, 2, 3] = value
    return z.tobytes()


NO_TYPE: dict[str, str] = {}
BAD = {
    "wrong length": Bad(decode([1, 4, 8, 8]), GOOD_LATENT[:-4]),
    "wrong length fp16": Bad(decode([1, 4, 8, 8], "float16"), GOOD_LATENT),
    "unknown dtype": Bad(decode([1, 4, 8, 8], "float64"), GOOD_LATENT),
    "uint8 latents": Bad(decode([1, 4, 8, 8], "uint8"), GOOD_LATENT[:256]),
    "zero shape": Bad(decode([1, 4, 0, 8]), b""),
    "giant shape": Bad(decode([1, 4, 100000, 100000]), GOOD_LATENT, status=413),
    "overflowing shape": Bad(decode([1, 4, 2**40, 2**40]), GOOD_LATENT, status=413),
    "negative shape": Bad(decode([1, 4, -8, 8]), GOOD_LATENT),
    "non-integer shape": Bad(decode([1, 4, "eight", 8]), GOOD_LATENT),
    "missing shape": Bad({"dtype": "float32", "output_type": "pt"}, GOOD_LATENT),
    "missing dtype": Bad({"shape": [1, 4, 8, 8], "output_type": "pt"}, GOOD_LATENT),
    "wrong channels": Bad(decode([1, 3, 8, 8]), GOOD_LATENT[: 3 * 64 * 4]),
    "2-D latents": Bad(decode([32, 8]), GOOD_LATENT),
    "video latents": Bad(decode([1, 4, 1, 8, 8]), GOOD_LATENT),
    "NaN latents": Bad(decode([1, 4, 8, 8]), nan_latent(float("nan"))),
    "infinite latents": Bad(decode([1, 4, 8, 8]), nan_latent(float("inf"))),
    "unknown output type": Bad(decode([1, 4, 8, 8], output_type="gif"), GOOD_LATENT),
    "mp4": Bad(decode([1, 4, 8, 8], output_type="mp4"), GOOD_LATENT),
    "pil batch": Bad(decode([2, 4, 8, 8], output_type="pil"), GOOD_LATENT * 2, {"Content-Type": "tensor/binary", "Accept": "image/jpeg"}),
    "batch over limit": Bad(decode([8, 4, 8, 8]), GOOD_LATENT * 8, status=413),
    "pixels over limit": Bad(decode([1, 4, 128, 128]), GOOD_LATENT * 256, status=413),
    "packed without size": Bad(decode([1, 16, 16]), GOOD_LATENT),
    "packed wrong size": Bad(decode([1, 16, 16], height=128, width=128), GOOD_LATENT),
    "bad scaling factor": Bad(decode([1, 4, 8, 8], scaling_factor="abc"), GOOD_LATENT),
    "NaN scaling factor": Bad(decode([1, 4, 8, 8], scaling_factor="nan"), GOOD_LATENT),
    "zero scaling factor": Bad(decode([1, 4, 8, 8], scaling_factor=0), GOOD_LATENT),
    "overflowing scaling": Bad(decode([1, 4, 8, 8], scaling_factor="1e-45"), ONES),
    "bad boolean": Bad(decode([1, 4, 8, 8], partial_postprocess="maybe"), GOOD_LATENT),
    "empty image": Bad({}, b"", NO_TYPE),
    "corrupt image": Bad({}, b"\x89PNG\r\n\x1a\n" + os.urandom(200), NO_TYPE),
    "truncated PNG": Bad({}, PNG[: len(PNG) // 2], NO_TYPE),
    "JPEG cut in its headers": Bad({}, JPEG[:150], NO_TYPE),
    "truncated WebP": Bad({}, WEBP[: len(WEBP) // 2], NO_TYPE),
    "not an image": Bad({}, b"hello world", NO_TYPE),
    "GIF": Bad({}, b"GIF89a" + b"\0" * 64, NO_TYPE),
    "image bomb": Bad({}, png_declaring(100000, 100000), NO_TYPE, status=413),
    "image over pixel limit": Bad({}, vaelink.encode_image(photo(0, (600, 600)), "png"), NO_TYPE, 413),
    "image tensor wrong length": Bad({"shape": [1, 3, 64, 64], "dtype": "float32"}, b"\0" * 100, NO_TYPE),
    "image tensor 4 channels": Bad({"shape": [1, 4, 64, 64], "dtype": "float32"}, b"\0" * 65536, NO_TYPE),
    "image tensor not multiple": Bad({"shape": [1, 3, 60, 60], "dtype": "float32"}, b"\0" * 43200, NO_TYPE),
    "image tensor empty": Bad({"shape": [1, 3, 0, 64], "dtype": "float32"}, b"", NO_TYPE),
    "image tensor NaN": Bad({"shape": [1, 3, 8, 8], "dtype": "float32"}, b"\xff" * 768, NO_TYPE),
    "image tensor bad layout": Bad({"shape": [64, 64, 3], "dtype": "float32"}, b"\0" * 49152, NO_TYPE),
    "negative seed": Bad({"sample": True, "seed": "-1"}, PNG, NO_TYPE),
    "bad fit": Bad({"fit": "stretch"}, PNG, NO_TYPE),
    "body over limit": Bad({}, b"\0" * (2 << 20), NO_TYPE, status=413),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_request_is_a_json_4xx_and_the_server_goes_on(server, ref, case):
    response = requests.post(
        server.url, params=case.params, data=case.body, headers=case.headers, timeout=30
    )
    assert_json_error(response, case.status)
    z = latents(20).numpy()
    good = post_tensor(
        server.url, z, {"output_type": "pt", "do_scaling": True, "partial_postprocess": True}
    )
    np.testing.assert_array_equal(tensor_of(good), ref["sdxl"].decode(z))


def test_jpeg_cut_in_its_scan_decodes_what_is_there_or_is_a_400(server):
    """The core decodes JPEGs leniently (as browsers show a partial download): never a 5xx."""
    for cut in (len(JPEG) // 4, len(JPEG) // 2, len(JPEG) - 2):
        response = requests.post(server.url, data=JPEG[:cut])
        if response.status_code == 200:
            assert response.headers["shape"] == "[1,4,8,8]"
        else:
            assert_json_error(response, 400)


def test_client_raises_the_json_error(server):
    with pytest.raises(RuntimeError, match="channels"):
        remote_decode(server.url, latents(0, (1, 3, 8, 8)), scaling_factor=SDXL_SCALE)


def test_body_over_limit_without_content_length(server):
    """A chunked body is counted as it arrives."""
    chunks = (b"\0" * (256 << 10) for _ in range(8))
    response = requests.post(server.url, data=chunks, timeout=30)
    assert_json_error(response, 413)


# -- routes, health, info, metrics ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "/", "/predict", "/predict/", "/sdxl", "/sdxl/", "/decode"])
def test_single_model_routes(server, ref, path):
    z = latents(21).numpy()
    out = post_tensor(
        server.url + path, z, {"output_type": "pt", "do_scaling": True, "partial_postprocess": True}
    )
    np.testing.assert_array_equal(tensor_of(out), ref["sdxl"].decode(z))


def test_explicit_encode_route_takes_a_tensor_with_content_type(server, ref):
    x = photo(13)
    response = post_tensor(f"{server.url}/encode", x, {"do_scaling": True})
    np.testing.assert_array_equal(tensor_of(response), ref["sdxl"].encode(x))


def test_multi_model_routes(multi, ref):
    z = latents(22).numpy()
    for path in ("/sdxl/", "/sdxl", "/sdxl/predict", "/sdxl/decode/"):
        response = post_tensor(multi.url + path, z, {"output_type": "pt", "do_scaling": True})
        np.testing.assert_array_equal(tensor_of(response), ref["sdxl"].decode(z, output="float"))
    assert_json_error(
        post_tensor(multi.url + "/", z, {"output_type": "pt", "do_scaling": True}), 404
    )
    assert_json_error(
        post_tensor(multi.url + "/predict", z, {"output_type": "pt", "do_scaling": True}), 404
    )
    assert_json_error(
        post_tensor(multi.url + "/nope/", z, {"output_type": "pt", "do_scaling": True}), 404
    )
    assert_json_error(requests.get(multi.url + "/sdxl/"), 405)
    assert_json_error(requests.get(multi.url + "/no/such/path"), 404)


def test_health_and_info(multi):
    assert requests.get(multi.url + "/health").json() == {
        "status": "ok",
        "models": ["flux1", "sdxl"],
    }
    info = requests.get(multi.url + "/info").json()
    assert info["models"]["flux1"]["latent_channels"] == 16
    assert info["models"]["flux1"]["shift_factor"] == pytest.approx(0.1159)
    assert info["models"]["sdxl"]["provider"] == "cpu"
    assert info["models"]["sdxl"]["execution_providers"] == ["CPUExecutionProvider"]
    assert info["models"]["sdxl"]["device_id"] is None
    assert info["limits"]["max_pixels"] == 512 * 512
    assert info["batching"]["max_batch"] == 8
    assert info["capabilities"]["decode"]["video"] is False
    assert "POST /flux1/encode" in info["routes"]


def test_metrics(server):
    post_tensor(server.url, latents(23).numpy(), {"output_type": "pt", "do_scaling": True})
    requests.post(server.url, data=b"junk")
    response = requests.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    m = parse_metrics(response.text)
    assert metric_sum(m, "vaelink_requests_total", model="sdxl", op="decode", status="200") >= 1
    assert metric_sum(m, "vaelink_errors_total", model="sdxl", op="encode", status="400") >= 1
    assert metric_sum(m, "vaelink_request_seconds_count", model="sdxl", op="decode") >= 1
    assert metric_sum(m, "vaelink_engine_seconds_count", model="sdxl", op="decode") >= 1
    assert metric_sum(m, "vaelink_batch_images_count", model="sdxl") >= 1
    assert metric_sum(m, "vaelink_queue_depth", model="sdxl") == 0
    assert "vaelink_requests_in_flight" in m


def test_metrics_of_the_process(server):
    m = parse_metrics(requests.get(server.url + "/metrics").text)
    assert m["process_resident_memory_bytes"] > 0
    assert m["process_open_fds"] > 0
    assert metric_sum(m, "python_info", implementation="CPython") == 1
    assert metric_sum(m, "python_gc_collections_total") > 0


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/nope", 404, set()),
        ("POST", "/sdxl/nope", 404, set()),
        ("GET", "/", 405, {"POST"}),
        ("GET", "/sdxl/decode", 405, {"POST"}),
        ("DELETE", "/health", 405, {"GET", "HEAD"}),
    ],
)
def test_unknown_paths_and_wrong_methods_are_json(server, method, path, status, allow):
    """`/{model}` routes take any first segment: a wrong method is 405 only for a served model."""
    response = requests.request(method, server.url + path)
    assert_json_error(response, status)
    assert set(filter(None, response.headers.get("allow", "").split(", "))) == allow


# -- concurrency and batching --------------------------------------------------------------------


def test_concurrent_clients_each_get_their_own_answer_and_requests_batch(multi, ref):
    n = 24
    barrier = threading.Barrier(n)
    before = parse_metrics(requests.get(multi.url + "/metrics").text)

    def one(i: int) -> None:
        barrier.wait()
        if i % 3 == 2:  # encodes of different images, interleaved with the decodes
            pixels = photo(100 + i)
            out = remote_encode(f"{multi.url}/sdxl/", Image.fromarray(pixels))
            raw = ref["sdxl"].encode(pixels) / SDXL_SCALE
            np.testing.assert_allclose(out.numpy(), raw, rtol=0, atol=1e-4)
            return
        shape = (1, 4, 8, 8) if i % 2 else (1, 4, 8, 12)  # two shapes: two batch keys
        z = latents(100 + i, shape)
        out = remote_decode(
            f"{multi.url}/sdxl/", z, output_type="pt", return_type="pt",
            scaling_factor=SDXL_SCALE,
        )  # fmt: skip
        expected = ref["sdxl"].decode(z.numpy(), output="float")
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)

    with ThreadPoolExecutor(n) as pool:
        for future in [pool.submit(one, i) for i in range(n)]:
            future.result()
    after = parse_metrics(requests.get(multi.url + "/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("vaelink_requests_total", model="sdxl", status="200") == n
    requests_run = delta("vaelink_batch_requests_sum", model="sdxl")
    engine_calls = delta("vaelink_batch_requests_count", model="sdxl")
    assert requests_run == n
    assert engine_calls < n, "no two requests shared an engine call"


def test_batching_off_runs_one_request_per_engine_call(models, ref):
    engine = SlowEngine(models["sdxl"].engine(), 0.0)
    app = create_app({"sdxl": engine}, batching=Batching(enabled=False))
    n = 6
    with LiveServer(app) as live, ThreadPoolExecutor(n) as pool:
        zs = [latents(200 + i).numpy() for i in range(n)]
        responses = list(
            pool.map(lambda z: post_tensor(live.url, z, {"output_type": "pt", "do_scaling": True}), zs)
        )  # fmt: skip
        for z, response in zip(zs, responses, strict=True):
            np.testing.assert_array_equal(
                tensor_of(response), ref["sdxl"].decode(z, output="float")
            )
    assert engine.calls == n


def test_full_queue_answers_503_with_retry_after(models, ref):
    engine = SlowEngine(models["sdxl"].engine(), 0.3)
    app = create_app({"sdxl": engine}, batching=Batching(enabled=False, max_queue=1))
    n = 5
    barrier = threading.Barrier(n)
    z = latents(30).numpy()

    def one(_: int) -> requests.Response:
        barrier.wait()
        return post_tensor(
            live.url, z, {"output_type": "pt", "do_scaling": True, "partial_postprocess": True}
        )

    with LiveServer(app) as live:
        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(one, range(n)))
        busy = [r for r in responses if r.status_code == 503]
        assert busy, [r.status_code for r in responses]
        for r in busy:
            assert_json_error(r, 503)
            assert int(r.headers["Retry-After"]) >= 1
        for r in responses:
            if r.status_code == 200:
                np.testing.assert_array_equal(tensor_of(r), ref["sdxl"].decode(z))
        after = post_tensor(
            live.url, z, {"output_type": "pt", "do_scaling": True, "partial_postprocess": True}
        )
        np.testing.assert_array_equal(tensor_of(after), ref["sdxl"].decode(z))


def test_graceful_shutdown_answers_requests_in_flight(models, ref):
    engine = SlowEngine(models["sdxl"].engine(), 0.6)
    live = LiveServer(create_app({"sdxl": engine})).start()
    z = latents(31).numpy()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_tensor, live.url, z, {"output_type": "pt", "do_scaling": True})
        deadline = time.monotonic() + 10
        while engine.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        live.stop()  # while the engine is still working on the request
        response = pending.result(timeout=30)
    np.testing.assert_array_equal(tensor_of(response), ref["sdxl"].decode(z, output="float"))
    assert not live.thread.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(live.url + "/health", timeout=5)


# -- auth ----------------------------------------------------------------------------------------


def test_bearer_token(models, ref):
    token = "s3cret-token"
    app = create_app({"sdxl": models["sdxl"].engine()}, token=token)
    z = latents(32).numpy()
    params = {"output_type": "pt", "do_scaling": True, "partial_postprocess": True}
    with LiveServer(app) as live:
        for header in (None, "Bearer wrong", f"Basic {token}", "Bearer", f"Bearer {token}x"):
            headers = dict(TENSOR, **({"Authorization": header} if header else {}))
            response = post_tensor(live.url, z, params, **headers)
            assert_json_error(response, 401)
            assert response.headers["WWW-Authenticate"] == "Bearer"
        with pytest.raises(RuntimeError, match="token"):
            remote_decode(live.url, torch.from_numpy(z), scaling_factor=SDXL_SCALE)
        good = post_tensor(live.url, z, params, **TENSOR, Authorization=f"bearer {token}")
        np.testing.assert_array_equal(tensor_of(good), ref["sdxl"].decode(z))
        assert requests.get(live.url + "/health").status_code == 200
        for path in ("/info", "/metrics"):
            assert_json_error(requests.get(live.url + path), 401)
            ok = requests.get(live.url + path, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200


# -- the command line ----------------------------------------------------------------------------


@dataclass
class CliServer:
    url: str
    output: str = ""
    returncode: int | None = None


@contextmanager
def cli_server(args: list[str], env: dict[str, str]) -> Iterator[CliServer]:
    """`python -m vaelink serve ARGS` on a free port (or VAELINK_PORT's), as a user runs it;
    stopped with SIGTERM on exit, after which its output and exit code are filled in."""
    port = int(env.get("VAELINK_PORT") or free_port())
    port_arg = [] if "VAELINK_PORT" in env else ["--port", str(port)]
    command = [sys.executable, "-m", "vaelink", "serve", *args, *port_arg]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = CliServer(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(server.url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "vaelink serve did not start"
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        server.output = process.communicate(timeout=30)[0].decode()
        server.returncode = process.returncode


def test_cli_serve(models, ref, tmp_path: Path):
    env = dict(os.environ, VAELINK_TOKEN="from-env", VAELINK_HOME=str(tmp_path))
    args = ["--model", str(models["sdxl"].folder), "--model", str(models["flux1"].folder)]
    with cli_server([*args, "--log-level", "warning"], env) as server:
        url = server.url
        z = latents(33).numpy()
        params = {"output_type": "pt", "do_scaling": True, "partial_postprocess": True}
        assert_json_error(post_tensor(url + "/sdxl/", z, params), 401)
        auth = dict(TENSOR, Authorization="Bearer from-env")
        response = post_tensor(url + "/sdxl/", z, params, **auth)
        np.testing.assert_array_equal(tensor_of(response), ref["sdxl"].decode(z))
        assert_json_error(post_tensor(url + "/", z, params, **auth), 404)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (as Python's default would).
    assert server.returncode in (0, -signal.SIGTERM), server.output
    assert "Traceback" not in server.output, server.output


def test_cli_serve_unknown_model_fails_cleanly(tmp_path: Path):
    env = dict(os.environ, VAELINK_HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "vaelink", "serve", "--model", "sdxl", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "not exported" in result.stderr


def test_cli_serve_defaults_to_the_bundled_model(tmp_path: Path):
    """`vaelink serve` with no --model serves vaelink-tiny offline; the unmodified diffusers client
    round-trips a photo through it and gets what the engine gives directly."""
    env = dict(os.environ, VAELINK_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    engine = Engine("vaelink-tiny", provider="cpu")
    photo = vaelink.decode_image(Path(vaelink.__file__).parent / "data" / "astronaut.jpg")
    photo = np.ascontiguousarray(photo[128:384, 128:384])
    with cli_server([], env) as server:
        url = server.url + "/"
        z = remote_encode(url, Image.fromarray(photo), scaling_factor=1.0)
        np.testing.assert_allclose(z.numpy(), engine.encode(photo), rtol=0, atol=1e-5)
        image = remote_decode(
            url,
            z.contiguous(),
            scaling_factor=1.0,
            output_type="pt",
            return_type="pt",
            partial_postprocess=True,
        )
        np.testing.assert_array_equal(image.numpy(), engine.decode(z.numpy()))
    assert "Traceback" not in server.output, server.output


def test_cli_serve_prints_what_it_serves_once_listening(tmp_path: Path):
    env = dict(os.environ, VAELINK_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    with cli_server(["--no-warmup"], env) as server:
        pass
    assert "model vaelink-tiny: provider cpu, dtype float32" in server.output, server.output
    assert f"vaelink serving at {server.url}/" in server.output, server.output


def test_cli_serve_takes_its_options_from_the_environment_and_logs_json(models, tmp_path: Path):
    folders = [str(models[name].folder) for name in ("sdxl", "flux1")]
    env = dict(
        os.environ,
        VAELINK_HOME=str(tmp_path),
        VAELINK_PORT=str(free_port()),
        VAELINK_MODEL=",".join(folders),
        VAELINK_MAX_BATCH="3",
        VAELINK_MAX_QUEUE="7",
        VAELINK_NO_WARMUP="1",
        VAELINK_LOG_FORMAT="json",
    )
    with cli_server(["--max-queue", "9"], env) as server:  # the command line wins
        info = requests.get(server.url + "/info").json()
        assert sorted(info["models"]) == ["flux1", "sdxl"]
        assert info["batching"]["max_batch"] == 3 and info["batching"]["max_queue"] == 9
    assert server.returncode in (0, -signal.SIGTERM), server.output
    records = [json.loads(line) for line in server.output.splitlines() if line.strip()]
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message"}, record
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
    messages = {record["logger"]: [] for record in records}
    for record in records:
        messages[record["logger"]].append(record["message"])
    assert "model flux1: provider cpu, dtype float32" in messages["vaelink.server"]
    assert f"vaelink serving at {server.url}/ (Press CTRL+C to quit)" in messages["vaelink.server"]
    assert any('"GET /info HTTP/1.1" 200' in m for m in messages["uvicorn.access"]), messages
    assert any("Started server process" in m for m in messages["uvicorn.error"]), messages


def test_json_log_line_carries_the_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "vaelink.server", logging.ERROR, "", 0, "failed: %s", ("x",), None
        )
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["message"] == "failed: x"
    assert "ValueError: boom" in entry["exception"]


def test_cli_serve_options_from_the_environment(monkeypatch, capsys):
    """VAELINK_<OPTION> for every option (lists comma-separated, flags 1/true); the command line
    overrides them, VAELINK_MODEL's list included."""
    env = {
        "VAELINK_HOST": "0.0.0.0",
        "VAELINK_PORT": "9123",
        "VAELINK_MODEL": "sdxl, flux1",
        "VAELINK_NO_BATCHING": "true",
        "VAELINK_MAX_WAIT_MS": "2.5",
        "VAELINK_PROVIDER": "cpu",
        "VAELINK_TOKEN_FILE": "/run/secret",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 9123, ["sdxl", "flux1"])
    assert (args.no_batching, args.max_wait_ms, args.provider) == (True, 2.5, "cpu")
    assert args.token_file == "/run/secret" and args.environment_errors == []
    args = build_parser().parse_args(["serve", "--port", "80", "--model", "a", "--model", "b"])
    assert (args.port, args.model) == (80, ["a", "b"])
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "the port to listen on (default: 9123)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("VAELINK_PORT", "abc", "not a valid value for --port"),
        ("VAELINK_PORT", "0", "must be at least 1"),
        ("VAELINK_PROVIDER", "tpu", "choose from auto, cpu, cuda"),
        ("VAELINK_NO_WARMUP", "maybe", "expected one of 1, true, yes, on, 0, false"),
    ],
)
def test_cli_serve_bad_environment_variable_is_a_usage_error(
    monkeypatch, capsys, name, value, says
):
    monkeypatch.setenv(name, value)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"vaelink serve: error: {name}={value!r}: {says}") and err.count("\n") == 1
    )
    build_parser().parse_args(["models"])  # the other commands do not care


def test_cli_serve_fails_at_once_on_a_taken_port(tmp_path: Path):
    """The port is bound before any model loads: the error is the port's, not the model's (sdxl
    is not exported in this empty home), in one line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "vaelink", "serve", "--model", "sdxl", "--port", str(port)],
            env=dict(os.environ, VAELINK_HOME=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    expected = f"vaelink: error: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert result.stderr == expected
