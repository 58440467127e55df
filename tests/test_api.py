"""`vaelink.encode` / `vaelink.decode` / `vaelink.VAE`: the local engine and `vaelink serve` on
loopback give identical results for every input and output kind (through the raw-pixel fast path
and through the plain protocol the public endpoints speak); fallback lists; retries on 503/429;
bearer tokens; typed errors; the async twins; the Rust HTTP client itself."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from client_fixtures import (
    FakeEndpoint,
    closed_port_url,
    json_error,
    tensor_answer,
)
from engine_fixtures import one_torch_thread
from PIL import Image
from server_fixtures import LiveServer, SlowEngine, TinyModel

import vaelink
from vaelink import api
from vaelink._native import HttpClient
from vaelink.remote import RemoteEndpoint, encode_query, environment_token
from vaelink.server import Batching, create_app

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FAST = HttpClient(backoff=0.01, max_backoff=0.05)
"""Retries without waiting: for the tests that count them."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def local(sdxl: TinyModel) -> vaelink.VAE:
    return vaelink.VAE(sdxl.folder)


@pytest.fixture(scope="module", params=["fast", "plain"])
def remote(request: pytest.FixtureRequest, sdxl: TinyModel, server: LiveServer) -> vaelink.VAE:
    """The same model on the server: raw pixels and batches (`fast`), or one PNG / one latent per
    request as to a public endpoint (`plain`)."""
    return vaelink.VAE(sdxl.folder, server.url, fast_path=request.param == "fast")


def photo(photos: dict[str, np.ndarray], h: int = 64, w: int = 48) -> np.ndarray:
    return np.ascontiguousarray(photos["astronaut"][100 : 100 + h, 200 : 200 + w])


def latents(seed: int, shape: tuple[int, ...] = (1, 4, 8, 6)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Image.Image):
        return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, bytes):
        return a == b
    return a.dtype == b.dtype and np.array_equal(a, b)


# -- local and remote agree ---------------------------------------------------------------------

INPUTS = {
    "numpy HWC": lambda p: p,
    "numpy NHWC batch": lambda p: np.stack([p, p[::-1]]),
    "gray HW": lambda p: p[:, :, 1],
    "PIL": Image.fromarray,
    "PIL RGBA": lambda p: Image.fromarray(p).convert("RGBA"),
    "PNG bytes": lambda p: vaelink.encode_image(p, "png"),
    "list of PIL": lambda p: [Image.fromarray(p), Image.fromarray(p[::-1])],
    "float NCHW [-1, 1]": lambda p: vaelink.preprocess(p),
    "torch uint8 NHWC": lambda p: torch.from_numpy(p.copy())[None],
    "torch uint8 gray HW": lambda p: torch.from_numpy(p[:, :, 0].copy()),
    "torch float NCHW": lambda p: torch.from_numpy(vaelink.preprocess(p)),
}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_encode_remote_equals_local(kind, photos, local, remote):
    images = INPUTS[kind](photo(photos))
    expected = local.encode(images)
    got = remote.encode(images)
    assert equal(got, expected)
    assert tuple(got.shape[1:]) == (4, 8, 6)
    if kind.startswith("torch"):
        assert isinstance(got, torch.Tensor)
    else:
        assert isinstance(got, np.ndarray) and got.dtype == np.float32


def test_encode_a_file_path(photos, local, remote, tmp_path: Path):
    path = tmp_path / "photo.png"
    path.write_bytes(vaelink.encode_image(photo(photos), "png"))
    assert equal(remote.encode(path), local.encode(str(path)))


def test_encode_crops_to_a_multiple_of_8_the_same_way(photos, local, remote):
    odd = photo(photos, 61, 50)
    expected = local.encode(odd)
    assert expected.shape == (1, 4, 7, 6)
    assert equal(remote.encode(odd), expected)
    resized = local.encode(odd, fit="resize")
    assert equal(remote.encode(odd, fit="resize"), resized)
    assert not np.array_equal(resized, expected)
    with pytest.raises(vaelink.TensorError):
        local.encode(odd, fit=None)


def test_encode_output_types(photos, local, remote):
    expected = local.encode(photo(photos))
    as_torch = remote.encode(photo(photos), output="torch")
    assert isinstance(as_torch, torch.Tensor) and torch.equal(as_torch, torch.from_numpy(expected))
    back = remote.encode(torch.from_numpy(photo(photos).copy()), output="numpy")
    assert isinstance(back, np.ndarray) and np.array_equal(back, expected)


def test_sampling_with_a_seed_is_the_same_remotely(photos, local, remote):
    images = np.stack([photo(photos), photo(photos)[::-1]])
    mean = local.encode(images)
    sampled = local.encode(images, sample=True, seed=7)
    assert not np.array_equal(sampled, mean)
    if remote.fast_path:  # the whole batch in one request: the server draws the same noise
        assert equal(remote.encode(images, sample=True, seed=7), sampled)
    else:  # one image per request, each with the seed: the first image's noise is the same
        got = remote.encode(images, sample=True, seed=7)
        assert np.array_equal(got[0], sampled[0])


@pytest.mark.parametrize("output", ["numpy", "float", "pil", "png", "jpeg", "webp", "torch"])
def test_decode_remote_equals_local(output, local, remote):
    z = latents(1)
    expected = local.decode(z, output=output)
    got = remote.decode(z, output=output)
    assert equal(got, expected)
    if output in ("pil", "png", "jpeg", "webp"):
        assert isinstance(got, list) and len(got) == 1
    if output == "png":
        assert np.array_equal(vaelink.decode_image(got[0]), local.decode(z)[0])


def test_decode_a_batch(local, remote):
    z = latents(2, (3, 4, 8, 6))
    assert equal(remote.decode(z), local.decode(z))
    assert remote.decode(z).shape == (3, 64, 48, 3)
    assert equal(remote.decode(z, output="float"), local.decode(z, output="float"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_latents_give_torch_images(dtype, local, remote):
    z = torch.from_numpy(latents(3)).to(dtype)
    got = remote.decode(z)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
    assert equal(got, local.decode(z))
    floats = remote.decode(z, output="float")
    assert isinstance(floats, torch.Tensor) and floats.dtype == torch.float32
    assert equal(floats, local.decode(z, output="float"))


def test_wire_dtype_bfloat16(local, remote):
    z = latents(4)
    assert equal(remote.decode(z, wire_dtype="bfloat16"), local.decode(z, wire_dtype="bfloat16"))


def test_encode_then_decode_round_trip(photos, local, remote):
    z = remote.encode(photo(photos))
    assert equal(remote.decode(z), local.decode(local.encode(photo(photos))))


def test_flux_packed_latents_through_a_multi_model_server(flux, multi):
    """The client routes to /flux1/ itself; packed latents need the image size."""
    near = vaelink.VAE(flux.folder)
    far = vaelink.VAE(flux.folder, multi.url)
    z = latents(5, (1, 16, 4, 6))
    packed = vaelink.pack_latents(z)
    assert packed.shape == (1, 6, 64)
    expected = near.decode(z)
    assert equal(far.decode(packed, height=32, width=48), expected)
    assert equal(near.decode(packed, height=32, width=48), expected)
    with pytest.raises(vaelink.TensorError, match="height and width"):
        far.decode(packed)
    image = expected[0]
    assert equal(far.encode(image), near.encode(image))


def test_model_not_served_there(multi):
    vae = vaelink.VAE("sd15", multi.url)
    with pytest.raises(vaelink.RemoteError, match="serves \\['flux1', 'sdxl'\\], not 'sd15'"):
        vae.decode(latents(6))


def test_a_server_with_other_latent_channels_is_refused(flux, server):
    with pytest.raises(vaelink.RemoteError, match="4 latent channels"):
        vaelink.VAE(flux.folder, server.url).decode(latents(6, (1, 16, 4, 4)))


# -- one-call functions and async ---------------------------------------------------------------


def test_one_call_functions_keep_their_vae(sdxl, server, photos, local):
    image = photo(photos)
    first = vaelink.encode(image, model=sdxl.folder, endpoint=server.url)
    assert equal(first, local.encode(image))
    hits = api._shared_vae.cache_info().hits
    again = vaelink.encode(image, model=sdxl.folder, endpoint=server.url)
    assert equal(again, first) and api._shared_vae.cache_info().hits == hits + 1
    images = vaelink.decode(first, model=sdxl.folder, endpoint=server.url, output="pil")
    assert equal(images, local.decode(first, output="pil"))
    assert equal(vaelink.decode(first, model=sdxl.folder), local.decode(first))


def test_async_twins(photos, local, remote):
    image = photo(photos)
    z = latents(7, (2, 4, 8, 6))

    async def run():
        return await asyncio.gather(
            remote.aencode(image),
            remote.adecode(z),
            remote.adecode(z[:1], output="float"),
            remote.aencode(image[::-1]),
        )

    encoded, decoded, floats, flipped = asyncio.run(run())
    assert equal(encoded, local.encode(image))
    assert equal(decoded, local.decode(z))
    assert equal(floats, local.decode(z[:1], output="float"))
    assert equal(flipped, local.encode(image[::-1]))


def test_bad_arguments(local, remote):
    with pytest.raises(ValueError, match="unknown output"):
        remote.decode(latents(8), output="gif")
    with pytest.raises(vaelink.TensorError, match="same size"):
        remote.encode([np.zeros((16, 16, 3), np.uint8), np.zeros((24, 16, 3), np.uint8)])
    with pytest.raises(vaelink.TensorError):
        remote.decode(np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="empty"):
        vaelink.VAE("sdxl", [])


# -- fallback -----------------------------------------------------------------------------------


def test_fallback_skips_a_dead_endpoint_and_a_503_endpoint(sdxl, server, local):
    z = latents(9)
    with FakeEndpoint([json_error(503, "down for maintenance")]) as busy:
        dead = closed_port_url()
        vae = vaelink.VAE(sdxl.folder, [dead, busy.url, server.url], client=FAST)
        start = time.monotonic()
        assert equal(vae.decode(z), local.decode(z))
        assert len(busy.posts) == 4  # the first try and three retries
        # Both stay at the back of the list for a while: the next call goes straight through.
        assert vae._ordered_targets() == [server.url, dead, busy.url]
        assert equal(vae.decode(z), local.decode(z))
        assert len(busy.posts) == 4
        assert time.monotonic() - start < 10


def test_fallback_to_the_local_engine(sdxl, photos, local):
    vae = vaelink.VAE(sdxl.folder, [closed_port_url(), "local"], client=FAST)
    image = photo(photos)
    assert equal(vae.encode(image), local.encode(image))


def test_when_every_endpoint_fails_the_last_error_is_raised_with_the_others_noted(sdxl):
    with FakeEndpoint([json_error(503, "overloaded")]) as busy:
        dead = closed_port_url()
        vae = vaelink.VAE(sdxl.folder, [dead, busy.url], client=FAST)
        with pytest.raises(vaelink.RemoteUnavailableError, match="overloaded") as info:
            vae.decode(latents(10))
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and dead.rstrip("/") in notes[0] and "cannot connect" in notes[0]


def test_a_malformed_request_is_not_sent_elsewhere(sdxl, server):
    """A 400 says the input is wrong: the local engine is not tried with it."""
    vae = vaelink.VAE(sdxl.folder, [server.url, "local"])
    with pytest.raises(vaelink.RemoteRequestError) as info:
        vae.decode(np.full((1, 4, 8, 6), np.nan, np.float32))
    assert info.value.status == 400 and "NaN" in info.value.message


# -- retries ------------------------------------------------------------------------------------


def test_503_and_429_are_retried(sdxl):
    answer = np.arange(24, dtype=np.float32).reshape(1, 4, 2, 3)
    script = [
        json_error(503, "busy"),
        json_error(429, "slow down", **{"Retry-After": "0"}),
        tensor_answer(answer),
    ]
    with FakeEndpoint(script) as fake:
        vae = vaelink.VAE(sdxl.folder, fake.url, client=FAST)
        got = vae.encode(np.zeros((16, 24, 3), np.uint8))
    assert np.array_equal(got, answer)
    assert len(fake.posts) == 3
    assert all(s.body == fake.posts[0].body for s in fake.posts), "the same request each time"


def test_retry_after_is_waited_for(sdxl):
    answer = np.zeros((1, 4, 2, 2), np.float32)
    script = [json_error(503, "busy", **{"Retry-After": "1"}), tensor_answer(answer)]
    with FakeEndpoint(script) as fake:
        start = time.monotonic()
        vaelink.VAE(sdxl.folder, fake.url, client=FAST).encode(np.zeros((16, 16, 3), np.uint8))
        assert time.monotonic() - start >= 0.95
    assert len(fake.posts) == 2


def test_retries_run_out(sdxl):
    with FakeEndpoint([json_error(503, "overloaded", **{"Retry-After": "0"})]) as fake:
        vae = vaelink.VAE(sdxl.folder, fake.url, client=HttpClient(retries=2, backoff=0.01))
        with pytest.raises(vaelink.RemoteUnavailableError) as info:
            vae.decode(latents(11))
    error = info.value
    assert (error.status, error.message, error.attempts, error.retry_after) == (
        503,
        "overloaded",
        3,
        0.0,
    )
    assert isinstance(error, RuntimeError) and isinstance(error, vaelink.VaelinkError)
    assert len(fake.posts) == 3
    assert str(error) == f"{fake.url} answered 503: overloaded"


def test_other_errors_are_not_retried(sdxl):
    with FakeEndpoint([json_error(500, "it broke")]) as fake, pytest.raises(RuntimeError) as info:
        vaelink.VAE(sdxl.folder, fake.url, client=FAST).decode(latents(12))
    assert (info.value.status, info.value.message, len(fake.posts)) == (500, "it broke", 1)
    assert type(info.value) is vaelink.RemoteError


# -- auth ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private(sdxl: TinyModel):
    app = create_app({"sdxl": sdxl.engine()}, token="s3cret", batching=Batching(enabled=False))
    with LiveServer(app) as live:
        yield live


def test_token_from_the_argument(sdxl, private, local, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("VAELINK_TOKEN", raising=False)
    z = latents(13)
    assert equal(vaelink.VAE(sdxl.folder, private.url, token="s3cret").decode(z), local.decode(z))
    with pytest.raises(vaelink.RemoteAuthError) as info:
        vaelink.VAE(sdxl.folder, private.url).decode(z)
    assert info.value.status == 401 and info.value.message == "missing or invalid bearer token"
    with pytest.raises(vaelink.RemoteAuthError):
        vaelink.VAE(sdxl.folder, private.url, token="wrong").decode(z)


@pytest.mark.parametrize("variable", ["HF_TOKEN", "VAELINK_TOKEN"])
def test_token_from_the_environment(variable, sdxl, private, local, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("VAELINK_TOKEN", raising=False)
    monkeypatch.setenv(variable, "s3cret")
    z = latents(14)
    vae = vaelink.VAE(sdxl.folder, private.url)
    assert equal(vae.decode(z), local.decode(z))
    assert vae.endpoint(private.url).info() is not None, "/info was authorized too"


def test_the_exact_header_and_no_env_token_in_clear_text(monkeypatch):
    monkeypatch.delenv("VAELINK_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "from-env")
    with FakeEndpoint([(200, {}, b"ok")]) as fake:
        client = HttpClient()
        client.request("POST", fake.url)  # the transport has no token policy of its own
        client.request("POST", fake.url, token="per-call")
        RemoteEndpoint(fake.url, client).post({}, b"")  # loopback: the environment's token
        RemoteEndpoint(fake.url, client, token=" explicit\n").post({}, b"")
        # Through a proxy to a host on the network, in clear text: the environment's token stays
        # home, an explicit one goes.
        proxied = HttpClient(proxy=fake.url)
        RemoteEndpoint("http://vae.example.invalid/", proxied).post({}, b"")
        RemoteEndpoint("http://vae.example.invalid/", proxied, token="explicit").post({}, b"")
    got = [s.headers.get("authorization") for s in fake.posts]
    assert got == [
        None,
        "Bearer per-call",
        "Bearer from-env",
        "Bearer explicit",
        None,
        "Bearer explicit",
    ]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://x.endpoints.huggingface.cloud/", True),
        ("http://127.0.0.1:8000/", True),
        ("http://127.8.9.10/", True),
        ("http://localhost:8000/", True),
        ("http://[::1]:8000/", True),
        ("http://10.0.0.5:8000/", False),
        ("http://vae.example.com/", False),
        ("http://localhost.example.com/", False),
    ],
)
def test_environment_tokens_go_over_https_or_to_this_machine(url, allowed, monkeypatch):
    monkeypatch.delenv("VAELINK_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", " from-env ")
    assert environment_token(url) == ("from-env" if allowed else None)
    monkeypatch.setenv("VAELINK_TOKEN", "first")
    assert environment_token(url) == ("first" if allowed else None)


# -- errors and the client ----------------------------------------------------------------------


def test_typed_errors(sdxl, server):
    vae = vaelink.VAE(sdxl.folder, server.url)
    with pytest.raises(vaelink.RemoteRequestError) as info:
        vae.decode(latents(15, (1, 3, 8, 8)))  # 3 channels for a 4-channel model
    error = info.value
    assert error.status == 400
    assert error.message == "sdxl latents have 4 channels, got shape [1, 3, 8, 8]"
    assert error.url == server.url + "/"
    assert isinstance(error, ValueError) and isinstance(error, RuntimeError)
    with pytest.raises(vaelink.RemoteConnectionError) as info:
        vaelink.VAE(sdxl.folder, closed_port_url(), retries=0).decode(latents(15))
    assert info.value.status is None and "cannot connect" in info.value.message
    assert info.value.attempts == 1
    with pytest.raises(vaelink.InvalidEndpointError):
        vaelink.VAE(sdxl.folder, "ftp://example.com/").decode(latents(15))


def test_read_timeout(sdxl):
    slow = SlowEngine(sdxl.engine(), delay=1.5)
    with LiveServer(create_app({"sdxl": slow}, batching=Batching(enabled=False))) as live:
        vae = vaelink.VAE(sdxl.folder, live.url, timeout=0.3)
        with pytest.raises(vaelink.RemoteTimeoutError) as info:
            vae.decode(latents(16))
    assert info.value.attempts == 1, "a slow answer is not asked for again"


def test_http_client(server):
    client = HttpClient()
    status, headers, body = client.request("GET", server.url + "/health")
    assert status == 200 and headers["content-type"] == "application/json"
    assert isinstance(body, bytearray) and b'"ok"' in body
    with FakeEndpoint([(201, {"X-Twice": "a"}, b"created")]) as fake:
        query = encode_query({"shape": [1, 4], "flag": True, "off": False, "f": 0.18215, "n": None})
        status, headers, body = client.request(
            "POST", fake.url, query, [("Content-Type", "tensor/binary")], b"\x00\x01"
        )
    assert (status, body) == (201, bytearray(b"created"))
    seen = fake.posts[0]
    assert seen.query == {"shape": ["1", "4"], "flag": ["True"], "off": ["False"], "f": ["0.18215"]}
    assert seen.body == b"\x00\x01" and seen.headers["content-type"] == "tensor/binary"
    assert seen.headers["user-agent"].startswith("vaelink/")
    with pytest.raises(ValueError, match="GET or POST"):
        client.request("PUT", fake.url)
    with pytest.raises(ValueError, match="jitter"):
        HttpClient(jitter=2.0)


def test_query_encoding_is_that_of_requests():
    params = {
        "shape": [1, 4, 128, 128],
        "dtype": "float16",
        "partial_postprocess": False,
        "do_scaling": True,
        "scaling_factor": 0.18215,
        "shift_factor": 0.1159,
        "height": 1024,
        "width": None,
        "note": "a b&c=d",
    }
    prepared = requests.Request("POST", "http://h/", params=params).prepare()
    ours = requests.Request("POST", "http://h/", params=encode_query(params)).prepare()
    assert ours.url == prepared.url


def test_vae_repr_and_close(sdxl, server):
    vae = vaelink.VAE(sdxl.folder, [server.url, "local"])
    assert repr(vae) == f"VAE('sdxl', endpoint=['{server.url}', 'local'])"
    with vae:
        vae.decode(latents(17, (2, 4, 8, 6)))
        remote = vae.remote(server.url)
    assert remote._pool is None and not vae._remotes
    assert vaelink.VAE(sdxl.folder).decode(latents(17)).shape == (1, 64, 48, 3)


def test_encoded_outputs_decode_to_the_pixels(local):
    z = latents(18)
    pixels = local.decode(z)[0]
    (png,) = local.decode(z, output="png")
    (webp,) = local.decode(z, output="webp")
    (image,) = local.decode(z, output="pil")
    assert np.array_equal(vaelink.decode_image(png), pixels)
    assert np.array_equal(vaelink.decode_image(webp), pixels)
    assert np.array_equal(np.asarray(image), pixels)
    (jpeg,) = local.decode(z, output="jpeg", quality=95)
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
