"""`vaelink.encode` / `vaelink.decode` / `vaelink.VAE`: the local engine and `vaelink serve` on
loopback give identical results for every input and output kind (through the raw-pixel fast path
and through the plain protocol the public endpoints speak); fallback lists; retries on 503/429;
bearer tokens; typed errors; the async twins; the Rust HTTP client itself."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from client_fixtures import (
    FakeEndpoint,
    RawEndpoint,
    closed_port_url,
    endless,
    json_error,
    tensor_answer,
    trickle,
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


def test_moments_are_the_same_remotely(photos, local, remote):
    """Unscaled mean and log-variance from `vaelink serve` (`moments=True`), as from the engine."""
    x = torch.from_numpy(vaelink.preprocess(photo(photos)))
    moments = local.moments(x)
    assert moments.shape == (1, 8, 8, 6) and isinstance(moments, torch.Tensor)
    assert torch.allclose(moments[:, :4] * local.card.scaling_factor, local.encode(x), atol=1e-6)
    assert torch.allclose(remote.moments(x), moments, atol=1e-5)


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


# -- hostile servers ---------------------------------------------------------------------------

DECODED = [1, 64, 48, 3]
"""What `latents(n)` decode to: uint8 pixels."""


def test_timeout_bounds_the_whole_call_against_a_trickling_server(sdxl):
    """One byte every 0.2 s never trips the read timeout; `timeout` ends the call, batch pieces
    and all (three requests in flight, then retries that would not fit are not started)."""
    with RawEndpoint(trickle(DECODED, "uint8")) as slow:
        vae = vaelink.VAE(sdxl.folder, slow.url, timeout=1.0, read_timeout=5.0, fast_path=False)
        start = time.monotonic()
        with pytest.raises(vaelink.RemoteTimeoutError) as info:
            vae.decode(latents(30, (3, 4, 8, 6)))
        elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 2.0, elapsed
    assert info.value.attempts == 1
    assert slow.posts == 3


def test_no_retry_is_waited_for_past_the_timeout(sdxl):
    with FakeEndpoint([json_error(503, "busy", **{"Retry-After": "5"})]) as busy:
        vae = vaelink.VAE(sdxl.folder, busy.url, timeout=2.0)
        start = time.monotonic()
        with pytest.raises(vaelink.RemoteUnavailableError) as info:
            vae.decode(latents(31))
        assert time.monotonic() - start < 1.5
    assert info.value.retry_after == 5.0 and len(busy.posts) == 1


def test_a_fallback_list_shares_one_deadline_and_the_local_engine_is_not_cut(sdxl, local):
    z = latents(32)
    with RawEndpoint(trickle(DECODED, "uint8")) as slow, FakeEndpoint([]) as unused:
        vae = vaelink.VAE(sdxl.folder, [slow.url, unused.url, "local"], timeout=0.8)
        start = time.monotonic()
        assert equal(vae.decode(z), local.decode(z))
        assert time.monotonic() - start < 3.0
        # The second endpoint was reached with no time left: not asked, and not held against it.
        assert unused.seen == []
        assert vae._ordered_targets() == [unused.url, "local", slow.url]


def test_a_huge_answer_is_refused_early_and_not_retried(sdxl, local):
    z = latents(33)
    for declared in (False, True):
        with RawEndpoint(endless(1 << 30, declared)) as huge:
            vae = vaelink.VAE(sdxl.folder, huge.url, fast_path=False)
            start = time.monotonic()
            with pytest.raises(vaelink.RemoteResponseError, match="exceeds") as info:
                vae.decode(z)
            assert time.monotonic() - start < 5
            assert huge.posts == 1
            fallback = vaelink.VAE(sdxl.folder, [huge.url, "local"])
            assert equal(fallback.decode(z), local.decode(z))
        # The cap is what a [1, 64, 48, 3] uint8 answer can be, plus room for a JSON error.
        assert info.value.message == f"the response exceeds {64 * 48 * 3 + (1 << 16)} bytes"
        assert huge.written < 64 << 20, "the client stopped reading"


_MEMORY_PROBE = """
import json, sys, time
sys.path.insert(0, {tests!r})
import numpy as np
import vaelink
from client_fixtures import RawEndpoint, endless

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

results = {{}}
z = np.zeros((1, 16, 8, 8), np.float32)
for declared in (False, True):
    with RawEndpoint(endless(1 << 30, declared)) as huge:
        vae = vaelink.VAE("vaelink-tiny", huge.url, fast_path=False)
        try:
            vae.decode(z)  # warm up: the client, its threads, the pool
        except vaelink.RemoteResponseError:
            pass
        before = peak()
        start = time.monotonic()
        try:
            vae.decode(z)
        except vaelink.RemoteResponseError as error:
            message = str(error)
        results["declared" if declared else "undeclared"] = {{
            "growth": peak() - before, "seconds": time.monotonic() - start,
            "server_wrote": huge.written, "error": message,
        }}
print(json.dumps(results))
"""


def test_client_memory_against_a_server_streaming_1_gib():
    """A decode of a small latent against a server that streams 1 GiB (length declared, or not):
    the client's peak RSS grows by far less than the stream (measured in a fresh process)."""
    script = _MEMORY_PROBE.format(tests=str(Path(__file__).parent))
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for kind, result in results.items():
        assert result["growth"] < 64 << 20, (kind, result)
        assert "exceeds" in result["error"], (kind, result)
        assert result["server_wrote"] < 64 << 20, (kind, result)


BAD_ANSWERS = {
    "an HTML page": (200, {"Content-Type": "text/html"}, b"<html>Please log in</html>"),
    "a body shorter than its shape": (200, {"shape": str(DECODED), "dtype": "uint8"}, b"\0" * 99),
    "a wrong shape": tensor_answer(np.zeros((1, 32, 24, 3), np.uint8)),
    "a wrong dtype": tensor_answer(np.zeros(DECODED, np.float32)),
    "a shape header that is no list": (200, {"shape": "1,64,48,3", "dtype": "uint8"}, b""),
}


@pytest.mark.parametrize("kind", list(BAD_ANSWERS))
def test_a_200_that_is_no_valid_answer_fails_over(kind, sdxl, local):
    z = latents(34)
    with FakeEndpoint([BAD_ANSWERS[kind]]) as bad:
        with pytest.raises(vaelink.RemoteResponseError) as info:
            vaelink.VAE(sdxl.folder, bad.url).decode(z)
        assert isinstance(info.value, vaelink.RemoteError) and info.value.url == bad.url
        vae = vaelink.VAE(sdxl.folder, [bad.url, "local"])
        assert equal(vae.decode(z), local.decode(z))
        assert len(bad.posts) == 2, "not retried"
        assert vae._ordered_targets() == [bad.url, "local"], "no cooldown"


def test_encode_answers_are_checked_too(sdxl, photos, local):
    image = photo(photos)
    wrong = [tensor_answer(np.zeros((1, 4, 8, 8), np.float32)), BAD_ANSWERS["an HTML page"]]
    for answer in [*wrong, tensor_answer(np.zeros((1, 4, 8, 6), np.uint8))]:
        with FakeEndpoint([answer]) as bad:
            with pytest.raises(vaelink.RemoteResponseError):
                vaelink.VAE(sdxl.folder, bad.url).encode(image)
            vae = vaelink.VAE(sdxl.folder, [bad.url, "local"])
            assert equal(vae.encode(image), local.encode(image))


def test_every_endpoint_answering_garbage_raises_the_last_with_the_others_noted(sdxl):
    html = BAD_ANSWERS["an HTML page"]
    with FakeEndpoint([html]) as first, FakeEndpoint([BAD_ANSWERS["a wrong shape"]]) as second:
        vae = vaelink.VAE(sdxl.folder, [first.url, second.url])
        with pytest.raises(vaelink.RemoteResponseError, match="expected") as info:
            vae.decode(latents(35))
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and "text/html" in notes[0]


def test_a_redirect_loop_is_reported_as_such_and_not_retried(sdxl, local):
    z = latents(36)
    with FakeEndpoint([(307, {"Location": "/"}, b"")]) as loop:
        with pytest.raises(vaelink.RemoteRedirectError, match="too many redirects") as info:
            vaelink.VAE(sdxl.folder, loop.url, client=FAST).decode(z)
        assert info.value.url == loop.url and len(loop.posts) == 6  # one request, 5 redirects
        vae = vaelink.VAE(sdxl.folder, [loop.url, "local"], client=FAST)
        assert equal(vae.decode(z), local.decode(z))
        assert vae._ordered_targets() == [loop.url, "local"], "no cooldown"


# -- tokens in a fallback list ------------------------------------------------------------------


def _auth_seen(*fakes: FakeEndpoint) -> list[str | None]:
    return [fake.posts[-1].headers.get("authorization") for fake in fakes]


def test_each_endpoint_gets_its_own_token(sdxl, monkeypatch):
    monkeypatch.delenv("VAELINK_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "from-env")
    z = latents(37)
    answer = tensor_answer(np.zeros(DECODED, np.uint8))
    failing = json_error(500, "no")
    with FakeEndpoint([failing]) as a, FakeEndpoint([failing]) as b, FakeEndpoint([answer]) as c:
        mapping = {a.url: " token-a\n", b.url.rstrip("/"): "token-b"}
        vaelink.VAE(sdxl.folder, [a.url, b.url, c.url], token=mapping).decode(z)
        assert _auth_seen(a, b, c) == ["Bearer token-a", "Bearer token-b", "Bearer from-env"]
        origin = "http://127.0.0.1:" + c.url.rsplit(":", 1)[1].strip("/")
        pairs = [(a.url, "pair-a"), b.url, c.url]
        vaelink.VAE(sdxl.folder, pairs, token={origin: "origin-c", a.url: "x"}).decode(z)
        assert _auth_seen(a, b, c) == ["Bearer pair-a", "Bearer from-env", "Bearer origin-c"]
        vaelink.VAE(sdxl.folder, [(a.url, ""), (b.url, None), c.url], token="").decode(z)
        assert _auth_seen(a, b, c) == [None, "Bearer from-env", None]
        with pytest.raises(ValueError, match="different origins"):
            vaelink.VAE(sdxl.folder, [a.url, b.url], token="one-for-all")
        with pytest.raises(ValueError, match="two different tokens"):
            vaelink.VAE(sdxl.folder, [(a.url, "1"), (a.url, "2")])
        with pytest.raises(TypeError, match="pairs"):
            vaelink.VAE(sdxl.folder, [(a.url, 5)])  # type: ignore[list-item]
        # One origin, several paths: one token for all is fine; "local" needs none.
        same = [a.url + "decode", a.url + "predict", "local"]
        vae = vaelink.VAE(sdxl.folder, same, token="shared")
        assert {vae.endpoint(u).token for u in same[:2]} == {"shared"}
        # The one-call functions take a mapping too (kept, hashable, in their cache).
        vaelink.decode(z, model=sdxl.folder, endpoint=[a.url, c.url], token={c.url: "t"})
        assert _auth_seen(c) == ["Bearer t"]


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


def test_a_server_under_a_route_prefix_gets_the_fast_path(flux, sdxl):
    """A vaelink app mounted under /vae (as by a proxy or Ray Serve's route prefix), beside another
    app answering its own /info at the root: the client finds the app's /info under the prefix,
    routes /vae/<model>/ itself and takes the fast path."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    engines = {"sdxl": sdxl.engine(), "flux1": flux.engine()}
    inner = create_app(engines, batching=Batching(enabled=False))

    async def other_info(request: object) -> JSONResponse:
        return JSONResponse({"server": "something else"})

    outer = Starlette(
        routes=[Route("/info", other_info), Mount("/vae", app=inner)],
        lifespan=lambda app: inner.router.lifespan_context(inner),
    )
    outer.state.vaelink = inner.state.vaelink  # the runner's guards (header deadline, limits)
    with LiveServer(outer) as live:
        prefixed = live.url + "/vae/"
        far = vaelink.VAE(flux.folder, prefixed)
        info = far.endpoint(prefixed).info()
        assert info is not None and info.root == live.url + "/vae"
        assert info.uint8_images and sorted(info.models) == ["flux1", "sdxl"]
        near = vaelink.VAE(flux.folder)
        z = latents(7, (1, 16, 4, 6))
        assert equal(far.decode(z), near.decode(z))
        image = near.decode(z)[0]
        assert equal(far.encode(image), near.encode(image))
        # A URL naming the model under the prefix reaches it as it is.
        named = vaelink.VAE(sdxl.folder, live.url + "/vae/sdxl/")
        assert named.endpoint(live.url + "/vae/sdxl/").info().root == live.url + "/vae"
        assert equal(named.decode(latents(8)), vaelink.VAE(sdxl.folder).decode(latents(8)))
