"""The remote backend: the Hugging Face remote-VAE protocol, client side, over the Rust HTTP
transport (`vaelink._native.HttpClient`).

What goes on the wire is what the public Hugging Face endpoints accept (see the protocol notes in
the README): parameters in the query string, encoded as Python's `requests` encodes them, tensors as
raw little-endian bodies with `shape`/`dtype`, images as PNG. A vaelink server describes itself at
`GET /info`; against one the backend takes faster paths (raw pixels, whole batches) and routes a
model to its own URL on a server of several.

- `RemoteEndpoint`: one URL, its client and token; requests and the cached `/info`.
- `RemoteBackend`: a `vaelink.backend.Backend` for one model on one endpoint."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ._native import HttpClient
from .batches import ImageBatch, LatentBatch, RawOutput
from .cards import ModelCard, Scaling
from .dtypes import to_float32
from .errors import (
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteTimeoutError,
    RemoteUnavailableError,
    TensorError,
)
from .image import encode_image
from .wire import read_tensor, to_wire

__all__ = [
    "TOKEN_ENV_VARS",
    "HttpClient",
    "RemoteBackend",
    "RemoteEndpoint",
    "ServerInfo",
    "default_client",
    "encode_query",
    "environment_token",
]

TOKEN_ENV_VARS = ("VAELINK_TOKEN", "HF_TOKEN")
"""Where a bearer token comes from when none is given, in this order."""
INFO_TTL = 60.0
"""Seconds a server's `/info` is trusted before it is asked again."""
ACCEPT_TENSOR = {"Accept": "tensor/binary"}
TENSOR_HEADERS = {"Content-Type": "tensor/binary", **ACCEPT_TENSOR}

T = TypeVar("T")


# -- the query string and the token -----------------------------------------------------------------


def encode_query(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Query pairs as `requests` encodes them: lists as repeated keys, booleans `True`/`False`,
    floats with `repr` (`0.18215`), `None` dropped."""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        values = value if isinstance(value, list | tuple) else [value]
        pairs.extend((key, _query_value(v)) for v in values if v is not None)
    return pairs


def _query_value(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "True" if value else "False"
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    return str(value)


def scaling_query(scaling: Scaling) -> dict[str, float]:
    """Always explicit: the endpoints' defaults for missing factors differ (see the protocol)."""
    return {"scaling_factor": float(scaling.factor), "shift_factor": float(scaling.shift)}


def _is_private_channel(url: str) -> bool:
    """HTTPS, or a connection that never leaves this machine."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def environment_token(url: str) -> str | None:
    """The token of the first of `TOKEN_ENV_VARS` that is set, for a URL it may go to: over HTTPS
    or to this machine, never in clear text over a network."""
    if not _is_private_channel(url):
        return None
    for name in TOKEN_ENV_VARS:
        if value := os.environ.get(name, "").strip():
            return value
    return None


@functools.cache
def default_client() -> HttpClient:
    """The process-wide client (default timeouts and retries), created on first use."""
    return HttpClient()


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


# -- one endpoint -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerInfo:
    """What a vaelink server says about itself at `GET /info`: what the client uses of it."""

    models: dict[str, dict[str, Any]]
    max_batch: int
    max_body_bytes: int
    uint8_images: bool
    """Encode takes raw uint8 HWC/NHWC pixels (`dtype=uint8`): no PNG on either side."""
    float_images: bool
    """Encode takes float NCHW tensors with `input_range=-1,1`."""

    @classmethod
    def parse(cls, data: Any) -> ServerInfo | None:
        """None for anything but a vaelink server's answer."""
        if not isinstance(data, dict) or data.get("server") != "vaelink":
            return None
        try:
            limits = data.get("limits", {})
            dtypes = set(data.get("capabilities", {}).get("encode", {}).get("tensor_dtypes", []))
            return cls(
                models={str(k): dict(v) for k, v in data.get("models", {}).items()},
                max_batch=max(1, int(limits.get("max_batch", 1))),
                max_body_bytes=int(limits.get("max_body_bytes", 64 << 20)),
                uint8_images="uint8" in dtypes,
                float_images="float32" in dtypes,
            )
        except (AttributeError, TypeError, ValueError):
            return None

    def batch_size(self, item_bytes: int) -> int:
        """Items per request within the server's batch and body limits."""
        by_body = max(1, (self.max_body_bytes - 4096) // max(1, item_bytes))
        return max(1, min(self.max_batch, by_body))

    def model(self, url: str) -> dict[str, Any] | None:
        """The model a request to `url` reaches, when that is certain."""
        name = urlsplit(url).path.strip("/").split("/")[0]
        if name in self.models:
            return self.models[name]
        return next(iter(self.models.values())) if len(self.models) == 1 else None


class RemoteEndpoint:
    """One endpoint URL, the client that reaches it and the token it gets: the one given, else
    one from the environment (`environment_token`)."""

    def __init__(self, url: str, client: HttpClient | None = None, token: str | None = None):
        self.url = url
        self.client = client or default_client()
        self.token = token.strip() if token is not None else environment_token(url)
        self._info: tuple[float, ServerInfo | None] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RemoteEndpoint({self.url!r})"

    def request(
        self,
        method: str,
        url: str | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[dict[str, str], bytearray]:
        """One request (retried by the client's policy); `(headers, body)` of a 2xx answer, a
        `vaelink.errors.RemoteError` otherwise."""
        _, response_headers, content = self.client.request(
            method,
            url or self.url,
            encode_query(params or {}),
            list((headers or {}).items()),
            body,
            self.token or None,
        )
        return response_headers, content

    def post(
        self,
        params: Mapping[str, Any],
        body: bytes,
        headers: Mapping[str, str] | None = None,
        url: str | None = None,
    ) -> tuple[dict[str, str], bytearray]:
        return self.request("POST", url, params=params, headers=headers, body=body)

    def info(self) -> ServerInfo | None:
        """The server's `/info` if it is a vaelink server, else None; cached for `INFO_TTL`.

        No connection, a timeout or 429/503 after the retries raise (the endpoint is down or busy);
        any other failure or answer means a plain protocol endpoint."""
        now = time.monotonic()
        with self._lock:
            if self._info is not None and now - self._info[0] < INFO_TTL:
                return self._info[1]
        try:
            headers, body = self.request("GET", _base_url(self.url) + "/info")
            is_json = "json" in headers.get("content-type", "")
            info = ServerInfo.parse(json.loads(body)) if is_json else None
        except (RemoteConnectionError, RemoteTimeoutError, RemoteUnavailableError):
            raise  # down, or busy even after the retries: the caller moves on
        except RemoteAuthError:
            return None  # not cached: a token may come (the requests themselves will say 401)
        except (RemoteError, json.JSONDecodeError, UnicodeDecodeError):
            info = None
        with self._lock:
            self._info = (now, info)
        return info


# -- one model on one endpoint ----------------------------------------------------------------------


def _split(items: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, items)) for start in range(0, items, size)]


def _concat(pieces: Sequence[np.ndarray]) -> np.ndarray:
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _signed_range(x: np.ndarray) -> np.ndarray:
    """Float images for an endpoint that tells the range from the values (the protocol's `auto`):
    [-1, 1] as they are when some are negative, else mapped to [0, 1] - read back as [-1, 1] by
    such an endpoint (up to rounding), where unmapped ones would be taken for [0, 1]."""
    return x if x.min() < 0 else (x + 1) / 2


def _check_images(images: np.ndarray, batch: int, output: RawOutput) -> np.ndarray:
    floats = output == "float"
    ok = images.ndim == 4 and len(images) == batch
    ok = ok and (images.shape[1] == 3 if floats else images.shape[3] == 3)
    ok = ok and (images.dtype == np.float32 if floats else images.dtype == np.uint8)
    if not ok:
        expected = "[B, 3, H, W] floats" if floats else "[B, H, W, 3] uint8"
        raise TensorError(
            f"the endpoint answered {images.dtype} {list(images.shape)}, not {expected}"
        )
    return images


class RemoteBackend:
    """One model on one endpoint: builds the requests, routes them, checks the answers.

    `fast_path`: against a vaelink server (it says so at `GET /info`), send raw pixels and whole
    batches instead of one PNG per request. `concurrency`: requests in flight at once when a batch
    goes out in pieces."""

    def __init__(
        self,
        endpoint: RemoteEndpoint,
        card: ModelCard,
        *,
        fast_path: bool = True,
        concurrency: int = 4,
    ) -> None:
        self.endpoint = endpoint
        self.card = card
        self.fast_path = fast_path
        self.concurrency = max(1, concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RemoteBackend({self.endpoint.url!r}, {self.card.name!r})"

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="vaelink")
            pool = self._pool
        return list(pool.map(fn, items))

    def _route(self) -> tuple[ServerInfo | None, str]:
        """The server's info (fast path only) and where requests for this model go: a vaelink
        server of several models is asked at `/<name>/` when the URL names none. Raises
        `RemoteError` when the server cannot serve the model."""
        info = self.endpoint.info() if self.fast_path else None
        url = self.endpoint.url
        if info is None or not info.models:
            return info, url
        path = urlsplit(url).path.strip("/")
        if path and path not in ("predict", "encode", "decode"):
            return info, url  # the URL names the model (or a route) itself
        name, channels = self.card.name, self.card.latent_channels
        if len(info.models) == 1:
            ((served, card),) = info.models.items()
            theirs = card.get("latent_channels")
            if theirs is not None and int(theirs) != channels:
                raise RemoteError(
                    f"it serves {served!r} with {theirs} latent channels, "
                    f"not {name!r} with {channels}",
                    url=url,
                )
            return info, url
        if name not in info.models:
            raise RemoteError(
                f"it serves {sorted(info.models)}, not {name!r}; add the model to the URL", url=url
            )
        return info, f"{_base_url(url)}/{name}/{path + '/' if path else ''}"

    def _post_tensor(
        self, url: str, params: Mapping[str, Any], tensor: np.ndarray, headers: Mapping[str, str]
    ) -> np.ndarray:
        wire = to_wire(tensor)
        query = {**params, "shape": list(wire.shape), "dtype": wire.dtype}
        response_headers, body = self.endpoint.post(query, wire.body, headers, url)
        return read_tensor(response_headers, body)

    def encode(
        self, images: ImageBatch, /, *, sample: bool = False, seed: int | None = None
    ) -> Any:
        info, url = self._route()
        params: dict[str, Any] = scaling_query(self.card.scaling)
        if sample:
            params |= {"sample": True, "seed": seed}

        def tensor(x: np.ndarray, extra: dict[str, Any] | None = None) -> np.ndarray:
            # No Content-Type: as the diffusers client sends images and tensors to encode.
            return to_float32(self._post_tensor(url, params | (extra or {}), x, ACCEPT_TENSOR))

        def png(pixels: np.ndarray) -> np.ndarray:
            body = encode_image(pixels, "png")  # fast, lossless: the server sees these pixels
            headers, content = self.endpoint.post(params, body, ACCEPT_TENSOR, url)
            return to_float32(read_tensor(headers, content))

        x = images.numpy()
        if images.pixels and info is not None and info.uint8_images:
            pieces = self._map(lambda s: tensor(x[s]), _split(len(x), info.batch_size(x[0].nbytes)))
        elif images.pixels:
            pieces = self._map(png, list(x))
        elif info is not None and info.float_images:
            size = info.batch_size(x[0].nbytes)
            pieces = self._map(
                lambda s: tensor(x[s], {"input_range": "-1,1"}), _split(len(x), size)
            )
        else:
            pieces = self._map(lambda i: tensor(_signed_range(x[i : i + 1])), range(len(x)))
        latents = _concat(pieces)
        if latents.ndim != 4 or len(latents) != len(x):
            raise TensorError(f"the endpoint answered latents of shape {list(latents.shape)}")
        return latents

    def decode(self, latents: LatentBatch, /, *, output: RawOutput = "uint8") -> Any:
        floats = output == "float"
        z = latents.numpy()
        if floats and latents.wire_dtype is None:
            z = to_float32(z)  # endpoints answer in the latents' dtype: float32, as locally
        info, url = self._route()
        params: dict[str, Any] = {
            "output_type": "pt",
            "partial_postprocess": not floats,  # uint8 pixels, rounded as the engine rounds
            "image_format": "jpg",  # informational for pt; sent as the diffusers client does
            **scaling_query(self.card.scaling),
        }
        if latents.height is not None and latents.width is not None:
            params |= {"height": latents.height, "width": latents.width}
        # A vaelink server takes batches; to others one latent per request (several in flight).
        size = info.batch_size(z[0].nbytes) if info is not None else 1

        def post(s: slice) -> np.ndarray:
            tensor = self._post_tensor(url, params, np.ascontiguousarray(z[s]), TENSOR_HEADERS)
            return tensor if tensor.dtype == np.uint8 else to_float32(tensor)

        return _check_images(_concat(self._map(post, _split(len(z), size))), len(z), output)
