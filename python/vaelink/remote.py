"""Talking to one remote-VAE endpoint over the Rust HTTP transport (`vaelink._native.HttpClient`).

What goes on the wire is what the public Hugging Face endpoints accept (see the protocol notes in
the README): parameters in the query string, encoded as Python's `requests` encodes them, tensors as
raw little-endian bodies with `shape`/`dtype`, images as PNG. A vaelink server describes itself at
`GET /info`; against one, the client may use faster paths (raw uint8 pixels, whole batches)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from . import wire
from ._native import HttpClient
from .dtypes import bfloat16
from .errors import (
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteTimeoutError,
    RemoteUnavailableError,
    TensorError,
)

__all__ = [
    "TENSOR_HEADERS",
    "Endpoint",
    "HttpClient",
    "ServerInfo",
    "default_client",
    "encode_query",
    "read_tensor",
]

TENSOR_HEADERS = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
INFO_TTL = 60.0
"""Seconds a server's `/info` is trusted before it is asked again."""


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


def read_tensor(headers: Mapping[str, str], body: bytes | bytearray) -> np.ndarray:
    """A tensor response (`shape`/`dtype` headers, raw body) as an array of the wire dtype."""
    try:
        shape = json.loads(headers["shape"])
        dtype = headers["dtype"]
    except (KeyError, ValueError):
        raise TensorError(
            "the endpoint answered without a tensor (no valid shape/dtype headers)"
        ) from None
    if not isinstance(shape, list):
        raise TensorError(f"the shape header must be a JSON list, got {headers['shape']!r}")
    return wire.from_wire(body, shape, dtype)


def to_float32(array: np.ndarray) -> np.ndarray:
    """Wire floats (bfloat16 included) as float32."""
    if array.dtype == bfloat16:
        return wire.from_bfloat16(array)
    return array.astype(np.float32, copy=False)


@dataclass(frozen=True)
class ServerInfo:
    """What a vaelink server says about itself at `GET /info`."""

    models: dict[str, dict[str, Any]]
    max_batch: int
    max_body_bytes: int
    max_pixels: int
    uint8_images: bool
    """Encode takes raw uint8 HWC/NHWC pixels (`dtype=uint8`): no PNG on either side."""
    float_images: bool
    """Encode takes float NCHW tensors with `input_range=-1,1`."""
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def parse(cls, data: Any) -> ServerInfo | None:
        """None for anything but a vaelink server's answer."""
        if not isinstance(data, dict) or data.get("server") != "vaelink":
            return None
        try:
            limits = data.get("limits", {})
            encode = data.get("capabilities", {}).get("encode", {})
            dtypes = set(encode.get("tensor_dtypes", []))
            models = data.get("models", {})
            return cls(
                models={str(k): dict(v) for k, v in models.items()},
                max_batch=max(1, int(limits.get("max_batch", 1))),
                max_body_bytes=int(limits.get("max_body_bytes", 64 << 20)),
                max_pixels=int(limits.get("max_pixels", 2048 * 2048)),
                uint8_images="uint8" in dtypes,
                float_images="float32" in dtypes,
                raw=data,
            )
        except (AttributeError, TypeError, ValueError):
            return None

    def batch_size(self, item_bytes: int) -> int:
        """Items per request within the server's batch and body limits."""
        by_body = max(1, (self.max_body_bytes - 4096) // max(1, item_bytes))
        return max(1, min(self.max_batch, by_body))


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


_default_client: HttpClient | None = None
_client_lock = threading.Lock()


def default_client() -> HttpClient:
    """The process-wide client (default timeouts and retries), created on first use."""
    global _default_client
    with _client_lock:
        if _default_client is None:
            _default_client = HttpClient()
        return _default_client


_info_cache: dict[tuple[str, str | None], tuple[float, ServerInfo | None]] = {}
_info_lock = threading.Lock()


@dataclass
class Endpoint:
    """One endpoint URL, the client that reaches it and the token it gets (None: the client's own,
    or `VAELINK_TOKEN`/`HF_TOKEN` over HTTPS and to loopback)."""

    url: str
    client: HttpClient = field(default_factory=default_client)
    token: str | None = None

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
            self.token,
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
        key = (_base_url(self.url), self.token)
        now = time.monotonic()
        with _info_lock:
            cached = _info_cache.get(key)
        if cached is not None and now - cached[0] < INFO_TTL:
            return cached[1]
        try:
            headers, body = self.request("GET", key[0] + "/info")
            is_json = "json" in headers.get("content-type", "")
            info = ServerInfo.parse(json.loads(body)) if is_json else None
        except (RemoteConnectionError, RemoteTimeoutError, RemoteUnavailableError):
            raise  # down, or busy even after the retries: the caller moves on
        except RemoteAuthError:
            return None  # not cached: a token may come (the requests themselves will say 401)
        except (RemoteError, json.JSONDecodeError, UnicodeDecodeError):
            info = None
        with _info_lock:
            _info_cache[key] = (now, info)
        return info

    def model_url(self, info: ServerInfo | None, name: str, latent_channels: int) -> str:
        """Where to send requests for model `name`: a vaelink server serving several models at
        `/<name>/` is routed there when the URL names none. Raises `RemoteError` when the server
        cannot serve it (no such model, or one with other latent channels)."""
        if info is None or not info.models:
            return self.url
        path = urlsplit(self.url).path.strip("/")
        if path and path not in ("predict", "encode", "decode"):
            return self.url  # the URL names the model (or a route) itself
        if len(info.models) == 1:
            ((served, card),) = info.models.items()
            channels = card.get("latent_channels")
            if channels is not None and int(channels) != latent_channels:
                raise RemoteError(
                    f"it serves {served!r} with {channels} latent channels, "
                    f"not {name!r} with {latent_channels}",
                    url=self.url,
                )
            return self.url
        if name not in info.models:
            raise RemoteError(
                f"it serves {sorted(info.models)}, not {name!r}; add the model to the URL",
                url=self.url,
            )
        base = _base_url(self.url)
        return f"{base}/{name}/{path + '/' if path else ''}"


def split(items: int, size: int) -> Iterable[slice]:
    for start in range(0, items, size):
        yield slice(start, min(start + size, items))


def scaling_params(scaling_factor: float, shift_factor: float) -> dict[str, Any]:
    """Always explicit: the endpoints' defaults for missing factors differ (see the protocol)."""
    return {"scaling_factor": float(scaling_factor), "shift_factor": float(shift_factor)}


def concat(pieces: Sequence[np.ndarray]) -> np.ndarray:
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
