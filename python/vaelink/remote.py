"""The remote backend: the Hugging Face remote-VAE protocol, client side, over the Rust HTTP
transport (`vaelink._native.HttpClient`).

What goes on the wire is what the public Hugging Face endpoints accept (see the protocol notes in
the README): parameters in the query string, encoded as Python's `requests` encodes them, tensors as
raw little-endian bodies with `shape`/`dtype`, images as PNG. A vaelink server describes itself at
`GET /info`; against one the backend takes faster paths (raw pixels, whole batches) and routes a
model to its own URL on a server of several.

- `RemoteEndpoint`: one URL, its client and token; requests and the cached `/info`.
- `RemoteBackend`: a `vaelink.backend.Backend` for one model on one endpoint.
- `endpoint_tokens`: which of the tokens given goes to which endpoint.

Hostile or broken servers: every request carries the time left of its call (`deadline`) and a cap
on the answer's size computed from what the request can legitimately return; an answer that is not
a valid tensor of the expected shape and dtype is a `RemoteResponseError`."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ._native import HttpClient
from .batches import ImageBatch, LatentBatch, RawOutput
from .cards import IDENTITY, ModelCard, Scaling
from .dtypes import is_bfloat16, to_float32
from .errors import (
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteResponseError,
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
    "endpoint_tokens",
    "environment_token",
    "origin",
]

TOKEN_ENV_VARS = ("VAELINK_TOKEN", "HF_TOKEN")
"""Where a bearer token comes from when none is given, in this order."""
INFO_TTL = 60.0
"""Seconds a server's `/info` is trusted before it is asked again."""
INFO_MAX_BYTES = 1 << 20
"""The largest `/info` answer read."""
ANSWER_SLACK = 1 << 16
"""Bytes allowed above the largest valid answer: room for a JSON error body instead."""
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


def origin(url: str) -> str:
    """`scheme://host:port` of a URL (default ports made explicit, lower case)."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def endpoint_tokens(
    urls: Sequence[str], token: str | Mapping[str, str] | None
) -> dict[str, str | None]:
    """The token given for each URL; None where none was (the environment's may apply then).

    A str goes to every URL, which must then share one origin: a token belongs to the service it
    was issued for, and a fallback list usually spans several. A mapping gives each its own: keyed
    by the URL itself (trailing slash or not), else by an origin (`https://host[:port]`), which
    covers every URL there."""
    if token is None:
        return dict.fromkeys(urls)
    if isinstance(token, str):
        origins = sorted({origin(url) for url in urls})
        if len(origins) > 1:
            raise ValueError(
                f"one token for endpoints of different origins ({', '.join(origins)}): give each "
                "its own with token={url or origin: token} or (url, token) entries"
            )
        return dict.fromkeys(urls, token)
    by_url = {key.strip().rstrip("/"): value for key, value in token.items()}
    by_origin = {
        origin(key): value
        for key, value in token.items()
        if urlsplit(key.strip()).path in ("", "/")
    }
    return {url: by_url.get(url.rstrip("/"), by_origin.get(origin(url))) for url in urls}


@functools.cache
def default_client() -> HttpClient:
    """The process-wide client (default timeouts and retries), created on first use."""
    return HttpClient()


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def _app_roots(url: str) -> list[str]:
    """Where a vaelink app serving `url` may be mounted, deepest first: `http://h/vae/sdxl/` may be
    the app under `/vae/sdxl`, under `/vae` (a route prefix, as Ray Serve or a proxy gives) or at
    the origin."""
    base = _base_url(url)
    segments = [s for s in urlsplit(url).path.split("/") if s]
    return [base + "".join(f"/{s}" for s in segments[:n]) for n in range(len(segments), -1, -1)]


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
    root: str = ""
    """The URL the app is mounted at (its `/info` is `root + "/info"`), without a trailing slash."""

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

    def relative(self, url: str) -> str:
        """`url`'s path below the app's root, without slashes around it."""
        if self.root and url.startswith(self.root):
            return urlsplit(url[len(self.root) :]).path.strip("/")
        return urlsplit(url).path.strip("/")

    def model(self, url: str) -> dict[str, Any] | None:
        """The model a request to `url` reaches, when that is certain."""
        name = self.relative(url).split("/")[0]
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
        deadline: float | None = None,
        max_response_bytes: int | None = None,
    ) -> tuple[dict[str, str], bytearray]:
        """One request (retried by the client's policy); `(headers, body)` of a 2xx answer, a
        `vaelink.errors.RemoteError` otherwise. `deadline` (`time.monotonic()`) ends it, retries
        and their waits included; a body above `max_response_bytes` is refused unread."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        _, response_headers, content = self.client.request(
            method,
            url or self.url,
            encode_query(params or {}),
            list((headers or {}).items()),
            body,
            self.token or None,
            timeout=timeout,
            max_response_bytes=max_response_bytes,
        )
        return response_headers, content

    def post(
        self,
        params: Mapping[str, Any],
        body: bytes,
        headers: Mapping[str, str] | None = None,
        url: str | None = None,
        *,
        deadline: float | None = None,
        max_response_bytes: int | None = None,
    ) -> tuple[dict[str, str], bytearray]:
        return self.request(
            "POST",
            url,
            params=params,
            headers=headers,
            body=body,
            deadline=deadline,
            max_response_bytes=max_response_bytes,
        )

    def info(self, deadline: float | None = None) -> ServerInfo | None:
        """The server's `/info` if it is a vaelink server, else None; cached for `INFO_TTL`.
        Asked at each root the URL may be mounted under, deepest first (`_app_roots`).

        No connection, a timeout or 429/503 after the retries raise (the endpoint is down or busy);
        any other failure or answer means a plain protocol endpoint."""
        now = time.monotonic()
        with self._lock:
            if self._info is not None and now - self._info[0] < INFO_TTL:
                return self._info[1]
        info = None
        for root in _app_roots(self.url):
            try:
                headers, body = self.request(
                    "GET", root + "/info", deadline=deadline, max_response_bytes=INFO_MAX_BYTES
                )
                is_json = "json" in headers.get("content-type", "")
                info = ServerInfo.parse(json.loads(body)) if is_json else None
            except (RemoteConnectionError, RemoteTimeoutError, RemoteUnavailableError):
                raise  # down, or busy even after the retries: the caller moves on
            except RemoteAuthError:
                return None  # not cached: a token may come (the requests themselves will say 401)
            except (RemoteError, json.JSONDecodeError, UnicodeDecodeError):
                info = None
            if info is not None:
                info = replace(info, root=root)
                break
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


def _check_images(images: np.ndarray, shape: tuple[int, ...], output: RawOutput) -> np.ndarray:
    """`images` if they have the expected `shape` (`[B, H, W, 3]` or `[B, 3, H, W]`) and dtype."""
    dtype = np.float32 if output == "float" else np.uint8
    if images.shape != shape or images.dtype != dtype:
        raise TensorError(
            f"the endpoint answered {images.dtype} {list(images.shape)}, "
            f"not {np.dtype(dtype)} {list(shape)}"
        )
    return images


def _is_float(tensor: np.ndarray) -> bool:
    return tensor.dtype.kind == "f" or is_bfloat16(tensor.dtype)


def _answer_cap(shape: Sequence[int], itemsize: int) -> int:
    """The response body limit for a tensor answer of `shape`."""
    return int(np.prod(shape, dtype=np.int64)) * itemsize + ANSWER_SLACK


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

    def _route(self, deadline: float | None = None) -> tuple[ServerInfo | None, str]:
        """The server's info (fast path only) and where requests for this model go: a vaelink
        server of several models is asked at `/<name>/` when the URL names none. Raises
        `RemoteError` when the server cannot serve the model."""
        info = self.endpoint.info(deadline) if self.fast_path else None
        url = self.endpoint.url
        if info is None or not info.models:
            return info, url
        path = info.relative(url)
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
        return info, f"{info.root}/{name}/{path + '/' if path else ''}"

    def _post(
        self,
        url: str,
        params: Mapping[str, Any],
        body: bytes,
        headers: Mapping[str, str],
        deadline: float | None,
        expected: tuple[int, ...] | list[tuple[int, ...]],
        itemsize: int,
    ) -> np.ndarray:
        """One request whose answer is a tensor of `expected` shape (or one of a list of shapes;
        dtype items of at most `itemsize` bytes): the body is capped to that, and anything else is
        a `RemoteResponseError`."""
        shapes = expected if isinstance(expected, list) else [expected]
        response_headers, content = self.endpoint.post(
            params,
            body,
            headers,
            url,
            deadline=deadline,
            max_response_bytes=max(_answer_cap(shape, itemsize) for shape in shapes),
        )
        try:
            tensor = read_tensor(response_headers, content)
        except TensorError as error:
            kind = response_headers.get("content-type", "no content type")
            raise RemoteResponseError(f"not a valid answer ({kind}): {error}", url=url) from error
        if tensor.shape not in shapes:
            wanted = " or ".join(str(list(shape)) for shape in shapes)
            raise RemoteResponseError(
                f"answered shape {list(tensor.shape)}, expected {wanted}", url=url
            )
        return tensor

    def _post_tensor(
        self,
        url: str,
        params: Mapping[str, Any],
        tensor: np.ndarray,
        headers: Mapping[str, str],
        deadline: float | None,
        expected: tuple[int, ...] | list[tuple[int, ...]],
        itemsize: int,
    ) -> np.ndarray:
        wire = to_wire(tensor)
        query = {**params, "shape": list(wire.shape), "dtype": wire.dtype}
        return self._post(url, query, wire.body, headers, deadline, expected, itemsize)

    def encode(
        self,
        images: ImageBatch,
        /,
        *,
        sample: bool = False,
        seed: int | None = None,
        deadline: float | None = None,
    ) -> Any:
        """`Backend.encode`; `deadline` (`time.monotonic()`) ends every request of the call."""
        params: dict[str, Any] = scaling_query(self.card.scaling)
        if sample:
            params |= {"sample": True, "seed": seed}
        return self._encode(images, params, deadline, moments=False)

    def moments(self, images: ImageBatch, /, *, deadline: float | None = None) -> Any:
        """`Backend.moments`: asks with `moments=True` and no scaling (factor 1, shift 0). A vaelink
        server answers the posterior's moments `[B, 2C, h, w]`; other endpoints ignore the
        parameter (the protocol's rule for unknown ones) and answer `[B, C, h, w]` latents,
        unscaled: what they encode by default (the posterior mean on vaelink's, and as far as
        is known on the public ones)."""
        params = scaling_query(IDENTITY) | {"moments": True}
        return self._encode(images, params, deadline, moments=True)

    def _encode(
        self, images: ImageBatch, params: dict[str, Any], deadline: float | None, moments: bool
    ) -> Any:
        info, url = self._route(deadline)
        f, channels = self.card.spatial_factor, self.card.latent_channels
        h, w = images.size

        def latents(n: int) -> tuple[int, ...] | list[tuple[int, ...]]:
            shape = (n, channels, h // f, w // f)
            return [(n, 2 * channels, h // f, w // f), shape] if moments else shape

        def answer(tensor: np.ndarray) -> np.ndarray:
            if not _is_float(tensor):
                raise RemoteResponseError(f"answered {tensor.dtype} latents", url=url)
            return to_float32(tensor)

        def tensor(x: np.ndarray, extra: dict[str, Any] | None = None) -> np.ndarray:
            # No Content-Type: as the diffusers client sends images and tensors to encode.
            query = params | (extra or {})
            return answer(
                self._post_tensor(url, query, x, ACCEPT_TENSOR, deadline, latents(len(x)), 4)
            )

        def png(pixels: np.ndarray) -> np.ndarray:
            body = encode_image(pixels, "png")  # fast, lossless: the server sees these pixels
            return answer(self._post(url, params, body, ACCEPT_TENSOR, deadline, latents(1), 4))

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
        return _concat(pieces)

    def decode(
        self,
        latents: LatentBatch,
        /,
        *,
        output: RawOutput = "uint8",
        deadline: float | None = None,
    ) -> Any:
        """`Backend.decode`; `deadline` (`time.monotonic()`) ends every request of the call."""
        floats = output == "float"
        z = latents.numpy()
        if floats and latents.wire_dtype is None:
            z = to_float32(z)  # endpoints answer in the latents' dtype: float32, as locally
        info, url = self._route(deadline)
        params: dict[str, Any] = {
            "output_type": "pt",
            "partial_postprocess": not floats,  # uint8 pixels, rounded as the engine rounds
            "image_format": "jpg",  # informational for pt; sent as the diffusers client does
            **scaling_query(self.card.scaling),
        }
        if latents.height is not None and latents.width is not None:
            params |= {"height": latents.height, "width": latents.width}
        f = self.card.spatial_factor
        if latents.packed:  # as `unpack_latents` sizes them
            assert latents.height is not None and latents.width is not None
            h, w = 2 * (latents.height // 16), 2 * (latents.width // 16)
        else:
            h, w = z.shape[2:]
        height, width = h * f, w * f

        def images(n: int) -> tuple[int, ...]:
            return (n, 3, height, width) if floats else (n, height, width, 3)

        # A vaelink server takes batches; to others one latent per request (several in flight).
        size = info.batch_size(z[0].nbytes) if info is not None else 1

        def post(s: slice) -> np.ndarray:
            piece = np.ascontiguousarray(z[s])
            expected = images(len(piece))
            tensor = self._post_tensor(
                url, params, piece, TENSOR_HEADERS, deadline, expected, 4 if floats else 1
            )
            try:
                return _check_images(
                    to_float32(tensor) if _is_float(tensor) else tensor, expected, output
                )
            except TensorError as error:
                raise RemoteResponseError(str(error), url=url) from error

        return _concat(self._map(post, _split(len(z), size)))
