"""`vaelink.compat.remote_encode` / `remote_decode` against diffusers' own functions, both calling the
same `vaelink serve` on loopback: every argument combination gives the same type and exactly the
same values, through vaelink's raw-pixel fast path and through the plain protocol."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from client_fixtures import FakeEndpoint, json_error
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import remote_utils as diffusers
from engine_fixtures import one_torch_thread
from PIL import Image

import vaelink
from vaelink import compat
from vaelink.remote import RemoteEndpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(params=["fast", "plain"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`plain`: vaelink's client as if the server were not vaelink's (no `/info`): PNG uploads."""
    if request.param == "plain":
        monkeypatch.setattr(RemoteEndpoint, "info", lambda self: None)
    return request.param


def same(a, b) -> bool:
    """Same type and exactly the same values (PIL: mode, size, pixels and `format`)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Image.Image):
        return (a.mode, a.size, a.format) == (b.mode, b.size, b.format) and np.array_equal(
            np.asarray(a), np.asarray(b)
        )
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def latents(seed: int, shape=(1, 4, 8, 6), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


DECODE_CASES = {
    "pil jpg": {},
    "pil png": {"image_format": "png"},
    "pt": {"output_type": "pt", "return_type": "pt"},
    "pt partial -> pil": {"output_type": "pt", "partial_postprocess": True},
    "pt partial -> pt": {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"},
    "pt + processor -> pil": {"output_type": "pt", "processor": VaeImageProcessor()},
    "pil + processor -> pil": {"output_type": "pil", "processor": VaeImageProcessor()},
    "pil + processor -> pt": {
        "output_type": "pil",
        "processor": VaeImageProcessor(),
        "return_type": "pt",
    },
    "scaling_factor": {"scaling_factor": 0.13025, "output_type": "pt", "return_type": "pt"},
    "do_scaling=False": {"do_scaling": False, "output_type": "pt", "return_type": "pt"},
    "other factors": {"scaling_factor": 0.5, "shift_factor": 0.25, "image_format": "png"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_diffusers(case, dtype, server):
    z = latents(1, dtype=dtype)
    kwargs = DECODE_CASES[case]
    expected = diffusers.remote_decode(server.url, z, **kwargs)
    got = compat.remote_decode(server.url, z, **kwargs)
    assert same(got, expected), case


def test_decode_a_batch_matches_diffusers(server):
    z = latents(2, (3, 4, 8, 6))
    for kwargs in (
        {"output_type": "pt", "partial_postprocess": True},  # a list of 3 PIL images
        {"output_type": "pt", "return_type": "pt"},
        {"output_type": "pt", "processor": VaeImageProcessor()},  # the first image
    ):
        expected = diffusers.remote_decode(server.url, z, **kwargs)
        assert same(compat.remote_decode(server.url, z, **kwargs), expected)


def test_decode_packed_flux_latents_matches_diffusers(multi):
    url = multi.url + "/flux1/"
    packed = torch.from_numpy(vaelink.pack_latents(latents(3, (1, 16, 4, 6)).numpy()))
    kwargs = {"height": 32, "width": 48, "scaling_factor": 0.3611, "shift_factor": 0.1159}
    for extra in ({}, {"output_type": "pt", "return_type": "pt"}):
        expected = diffusers.remote_decode(url, packed, **kwargs, **extra)
        assert same(compat.remote_decode(url, packed, **kwargs, **extra), expected)


def test_decode_argument_errors_match_diffusers(server):
    packed = latents(4, (1, 6, 16))
    for fn in (diffusers.remote_decode, compat.remote_decode):
        with pytest.raises(ValueError, match="`height` and `width` required"):
            fn(server.url, packed)
        with pytest.raises(ValueError, match="`processor` is required"):
            fn(server.url, latents(4), output_type="pt")


def test_decode_warns_about_do_scaling_as_diffusers_does(server):
    z = latents(5)
    for fn in (diffusers.remote_decode, compat.remote_decode):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(server.url, z, output_type="pt", return_type="pt")
        assert [w.category for w in caught] == [FutureWarning]
        assert "`do_scaling` is deprecated" in str(caught[0].message)


def _photo(photos, h: int = 64, w: int = 48) -> np.ndarray:
    return np.ascontiguousarray(photos["chelsea"][50 : 50 + h, 100 : 100 + w])


def _rgba(pixels: np.ndarray) -> Image.Image:
    alpha = np.random.default_rng(0).integers(0, 256, pixels.shape[:2], dtype=np.uint8)
    return Image.fromarray(np.dstack([pixels, alpha]), "RGBA")


IMAGES = {
    "RGB": lambda p: Image.fromarray(p),
    "RGBA with alpha": _rgba,
    "L": lambda p: Image.fromarray(p).convert("L"),
    "P": lambda p: Image.fromarray(p).convert("P"),
    "not a multiple of 8": lambda p: Image.fromarray(p[:61, :45]),
    "I;16": lambda p: Image.fromarray(p[:, :, 0].astype(np.uint16) * 257),
}


@pytest.mark.parametrize("kind", list(IMAGES))
def test_encode_images_match_diffusers(kind, path, photos, server):
    image = IMAGES[kind](_photo(photos))
    expected = diffusers.remote_encode(server.url, image, scaling_factor=0.13025)
    got = compat.remote_encode(server.url, image, scaling_factor=0.13025)
    assert same(got, expected)


def test_encode_factors_match_diffusers(path, photos, multi):
    image = Image.fromarray(_photo(photos))
    url = multi.url + "/flux1/"
    for kwargs in ({}, {"scaling_factor": 0.3611}, {"scaling_factor": 0.3611, "shift_factor": 0.1}):
        expected = diffusers.remote_encode(url, image, **kwargs)
        assert same(compat.remote_encode(url, image, **kwargs), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encode_tensors_match_diffusers(dtype, photos, server):
    pixels = torch.from_numpy(_photo(photos).copy())
    nchw = (pixels.permute(2, 0, 1)[None] / 255).to(dtype).contiguous()
    for tensor in (nchw, nchw[0], nchw * 2 - 1):  # NCHW and CHW in [0, 1], NCHW in [-1, 1]
        expected = diffusers.remote_encode(server.url, tensor, scaling_factor=0.13025)
        assert same(compat.remote_encode(server.url, tensor, scaling_factor=0.13025), expected)
    hwc = diffusers.remote_encode(server.url, pixels)  # uint8 HWC, as the server takes it
    assert same(compat.remote_encode(server.url, pixels), hwc)


def test_encode_a_non_contiguous_tensor(photos, server):
    """diffusers sends `_to_ndarray(image.contiguous())[0].tobytes()`: the bytes of a temporary
    that is freed before they are read, garbage for a non-contiguous tensor (a permuted one). vaelink
    sends the tensor's values: what diffusers gets for the same tensor made contiguous first."""
    pixels = torch.from_numpy(_photo(photos).copy())
    permuted = pixels.permute(2, 0, 1)[None] / 255
    assert not permuted.is_contiguous()
    expected = diffusers.remote_encode(server.url, permuted.contiguous())
    assert same(compat.remote_encode(server.url, permuted), expected)


def test_errors_are_runtime_errors_with_the_servers_message(server):
    bad = latents(6, (1, 3, 8, 6))
    with pytest.raises(RuntimeError) as theirs:
        diffusers.remote_decode(server.url, bad, output_type="pt", return_type="pt")
    with pytest.raises(RuntimeError) as ours:
        compat.remote_decode(server.url, bad, output_type="pt", return_type="pt")
    assert theirs.value.args[0] == {"error": ours.value.message}
    assert isinstance(ours.value, vaelink.RemoteRequestError) and ours.value.status == 400


def test_503_is_retried_where_diffusers_fails():
    answer = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    shape = "[1,2,2,2]"
    busy = json_error(503, "busy", **{"Retry-After": "0"})
    script = [busy, busy, (200, {"shape": shape, "dtype": "float32"}, answer.tobytes())]
    with FakeEndpoint(script) as fake:
        with pytest.raises(RuntimeError):
            diffusers.remote_encode(fake.url, Image.new("RGB", (16, 16)))  # the first 503
        got = compat.remote_encode(fake.url, Image.new("RGB", (16, 16)))  # the second, then 200
    assert torch.equal(got, torch.from_numpy(answer))
    assert len(fake.posts) == 3


def test_detect_image_type_matches_diffusers():
    for data in (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n....", b"GIF89a", b"BMxx", b"RIFFxxxxWEBP"):
        assert compat.detect_image_type(data) == diffusers.detect_image_type(data)
