"""One API for local and remote VAEs: `vaelink.encode`, `vaelink.decode` and `vaelink.VAE`.

With no endpoint the local engine runs the model; with a URL that endpoint does (any server that
speaks the Hugging Face remote-VAE protocol: the public endpoints, `vaelink serve`); with a list
(`[url1, url2, "local"]`) each is tried in turn until one answers, so that a service that is down
falls back to the next one or to the local engine. Results are the same wherever they come from.

`VAE` only chooses: inputs become batches (`vaelink.batches`), a backend runs them (the local
`vaelink.engine.Engine`, or a `vaelink.remote.RemoteBackend`), and the result is converted to the
output asked for."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, Unpack, overload

import numpy as np
import numpy.typing as npt

from ._native import HttpClient
from .backend import Backend
from .batches import (
    DecodeOutput,
    EncodeOutput,
    Fit,
    ImageInput,
    LatentInput,
    RawOutput,
    as_image_batch,
    as_latent_batch,
    check_decode_output,
    decode_output,
    encode_output,
)
from .cards import DEFAULT_MODEL
from .dtypes import DTypeName
from .engine import Engine, Provider
from .errors import (
    RemoteConnectionError,
    RemoteError,
    RemoteRequestError,
    RemoteTimeoutError,
    RemoteUnavailableError,
)
from .exports import Model, ModelLike, resolve_model
from .remote import RemoteBackend, RemoteEndpoint, endpoint_tokens

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "LOCAL",
    "VAE",
    "DecodeOptions",
    "EncodeOptions",
    "Endpoints",
    "Token",
    "VAEOptions",
    "decode",
    "encode",
]

LOCAL = "local"
"""The name of the local engine in an endpoint list."""

T = TypeVar("T")

Endpoints = str | Sequence[str | tuple[str, str | None]] | None
"""Where a model runs: None (the local engine), a URL, or a list of URLs, `"local"` and
`(url, token)` pairs, tried in order."""
Token = str | Mapping[str, str] | None
"""A bearer token for the endpoint (or the endpoints of one origin), or one per URL or origin."""

_DOWN = (RemoteConnectionError, RemoteTimeoutError, RemoteUnavailableError)
"""Failures after which an endpoint is tried last for `cooldown` seconds."""


def _out_of_time(url: str, timeout: float | None) -> RemoteTimeoutError:
    """For an endpoint not tried: the call's time was spent before its turn (0 attempts: it is
    not held against it)."""
    return RemoteTimeoutError(
        f"not tried: the call's timeout ({timeout} s) was spent", url=url, attempts=0
    )


class VAEOptions(TypedDict, total=False):
    """`VAE`'s keyword arguments (also taken by the one-call functions)."""

    token: Token
    timeout: float | None
    read_timeout: float | None
    connect_timeout: float
    retries: int
    concurrency: int
    fast_path: bool
    cooldown: float
    provider: Provider
    client: HttpClient | None


class _EncodeSettings(TypedDict, total=False):
    sample: bool
    seed: int | None
    fit: Fit | None


class EncodeOptions(_EncodeSettings, total=False):
    """`VAE.encode`'s keyword arguments."""

    output: EncodeOutput | None


class _DecodeSettings(TypedDict, total=False):
    height: int | None
    width: int | None
    quality: int
    wire_dtype: DTypeName | None


class DecodeOptions(_DecodeSettings, total=False):
    """`VAE.decode`'s keyword arguments."""

    output: DecodeOutput | None


class _EncodeCall(_EncodeSettings, VAEOptions, total=False):
    """`vaelink.encode`'s keyword arguments but `output` (a parameter of its own: overloads)."""


class _DecodeCall(_DecodeSettings, VAEOptions, total=False):
    """`vaelink.decode`'s keyword arguments but `output`."""


Pixels = npt.NDArray[np.uint8]
"""uint8 `[B, H, W, 3]` images."""
Latents = npt.NDArray[np.floating[Any]]
"""`[B, C, h, w]` latents: float32 from the local engine, an endpoint's own float dtype."""


def _targets(endpoint: Endpoints) -> tuple[str | tuple[str, str | None], ...]:
    """The list as given, checked (and hashable)."""
    if endpoint is None:
        return (LOCAL,)
    targets = (endpoint,) if isinstance(endpoint, str) else tuple(endpoint)
    if not targets:
        raise ValueError("endpoint list is empty; pass None for the local engine")
    for target in targets:
        pair = isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str)
        if not (isinstance(target, str) or (pair and isinstance(target[1], str | None))):
            raise TypeError(
                f"endpoints are URLs, {LOCAL!r} or (url, token) pairs, got {target!r:.80}"
            )
    return targets


def _tokens(
    targets: Sequence[str | tuple[str, str | None]], token: Token
) -> tuple[tuple[str, ...], dict[str, str | None]]:
    """(the targets' names, the token given for each URL: None for none, then the environment's
    may apply). A `(url, token)` entry's own token comes before `token`."""
    names = tuple(t if isinstance(t, str) else t[0] for t in targets)
    urls = [name for name in dict.fromkeys(names) if name != LOCAL]
    own: dict[str, str | None] = {}
    for target in targets:
        if isinstance(target, tuple):
            url, given = target
            if own.get(url, given) != given:
                raise ValueError(f"two different tokens for {url}")
            own[url] = given
    tokens = endpoint_tokens([url for url in urls if url not in own], token)
    return names, tokens | own


class VAE:
    """A model, local or remote: keeps the engine's sessions, the HTTP connections and what each
    endpoint said about itself across calls. Thread-safe; usable as a context manager.

    Args:
        model: A card name (`vaelink models`) or an export folder. Remote endpoints get its
            scaling factors explicitly with every request; the local engine loads it when first
            needed.
        endpoint: None (local), a URL, or a list of URLs, `"local"` and `(url, token)` pairs,
            tried in order. An endpoint that was down (no connection, timeout, 429/503 after the
            retries) goes to the back of the list for `cooldown` seconds; one that answered with
            something that is no valid answer, or redirected in a loop, is skipped for this call
            only.
        token: Sent as `Authorization: Bearer`, surrounding whitespace stripped (`""`: none). A
            str goes to every URL of the list, which must share one origin; a mapping
            `{url or origin: token}` gives each its own; a `(url, token)` entry has its own. URLs
            given no token get `VAELINK_TOKEN` or `HF_TOKEN`, over HTTPS and to loopback
            addresses only.
        timeout: Seconds one `encode`/`decode` call may take from its first request: every
            attempt, retry and wait, all the pieces of a batch and every endpoint of the list
            share them (the local engine is not cut). None: no limit.
        read_timeout: Seconds between two reads of an answer (None: no limit of its own).
        connect_timeout: Seconds to establish a connection.
        retries: Retries of a request on connection errors, 429 and 503, with exponential
            backoff and jitter, honouring `Retry-After`; none is started that would end past the
            deadline.
        concurrency: Requests in flight at once when a batch is sent in pieces (at least 1).
        fast_path: Against a vaelink server (it says so at `GET /info`), send raw uint8 pixels
            and whole batches instead of one PNG per request.
        cooldown: Seconds an endpoint that was down stays at the back of the list.
        provider: The local engine's (`auto`, `cpu`, `cuda`).
        client: The `HttpClient` to send requests with, its own timeouts and retries instead of
            `read_timeout`, `connect_timeout` and `retries` (default: one made on first use).

    Raises:
        UnknownModelError: `model` is neither a folder nor the name of a model card.
        CorruptExportError: `model` is a folder that is not a valid export.
        ValueError: An empty endpoint list, two tokens for one URL, or one str token for URLs of
            different origins.
        TypeError: An endpoint entry that is not a URL, `"local"` or a `(url, token)` pair.
    """

    def __init__(
        self,
        model: ModelLike = DEFAULT_MODEL,
        endpoint: Endpoints = None,
        *,
        token: Token = None,
        timeout: float | None = 300.0,
        read_timeout: float | None = None,
        connect_timeout: float = 10.0,
        retries: int = 3,
        concurrency: int = 4,
        fast_path: bool = True,
        cooldown: float = 30.0,
        provider: Provider = "auto",
        client: HttpClient | None = None,
    ) -> None:
        self.model = resolve_model(model)
        self.card = self.model.card
        self.targets, self._tokens = _tokens(_targets(endpoint), token)
        self.token = token
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.fast_path = fast_path
        self.cooldown = cooldown
        self.provider = provider
        self._client = client
        self._timeouts = (read_timeout, connect_timeout)
        self._retries = retries
        self._engine: Engine | None = None
        self._remotes: dict[str, RemoteBackend] = {}
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = list(self.targets) if len(self.targets) > 1 else self.targets[0]
        return f"VAE({self.card.name!r}, endpoint={where!r})"

    # -- backends -------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The local engine, loaded on first use."""
        with self._lock:
            if self._engine is None:
                self._engine = Engine(self.model, provider=self.provider)
            return self._engine

    def remote(self, url: str) -> RemoteBackend:
        """The backend for `url`, made on first use (all share one HTTP client)."""
        with self._lock:
            if url not in self._remotes:
                if self._client is None:
                    read_timeout, connect_timeout = self._timeouts
                    self._client = HttpClient(  # `timeout` is a deadline per call, not here
                        timeout=None,
                        read_timeout=read_timeout,
                        connect_timeout=connect_timeout,
                        retries=self._retries,
                    )
                token = self._tokens.get(url)
                if url not in self._tokens and isinstance(self.token, Mapping):
                    token = endpoint_tokens([url], self.token)[url]  # a URL off the list
                endpoint = RemoteEndpoint(url, self._client, token)
                self._remotes[url] = RemoteBackend(
                    endpoint, self.card, fast_path=self.fast_path, concurrency=self.concurrency
                )
            return self._remotes[url]

    def endpoint(self, url: str) -> RemoteEndpoint:
        return self.remote(url).endpoint

    def backend(self, target: str) -> Backend:
        return self.engine if target == LOCAL else self.remote(target)

    def close(self) -> None:
        """Stops the request threads; idle connections close with the client."""
        with self._lock:
            remotes, self._remotes = list(self._remotes.values()), {}
            self._client = None
        for remote in remotes:
            remote.close()

    def __enter__(self) -> VAE:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fallback -------------------------------------------------------------------------------

    def _ordered_targets(self) -> list[str]:
        now = time.monotonic()
        up = [t for t in self.targets if self._down_until.get(t, 0.0) <= now]
        return up + [t for t in self.targets if t not in up]

    def _first_answer(self, run: Callable[[Backend, float | None], T]) -> T:
        """`run(backend, deadline)` on each target's backend in turn until one succeeds. Failures
        of an endpoint - no answer, an error status, an answer that is no valid answer - move on to
        the next one, except a request the endpoint refused as malformed (400, 422: it would fail
        everywhere); when every target failed, the last error is raised with the others noted.

        Every endpoint gets what is left of one deadline (`timeout` from now); one reached with
        nothing left fails at once. The local engine is not cut."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        failures: list[tuple[str, RemoteError]] = []
        for target in self._ordered_targets():
            try:
                if target != LOCAL and deadline is not None and time.monotonic() >= deadline:
                    raise _out_of_time(target, self.timeout)
                result = run(self.backend(target), deadline)
            except RemoteError as error:
                if isinstance(error, _DOWN) and error.attempts > 0:
                    self._down_until[target] = time.monotonic() + self.cooldown
                malformed = isinstance(error, RemoteRequestError) and error.status in (400, 422)
                failures.append((target, error))
                if malformed or len(failures) == len(self.targets):
                    break
                continue
            self._down_until.pop(target, None)
            return result
        _, last = failures[-1]
        for other, earlier in failures[:-1]:
            last.add_note(f"vaelink: {other} failed before: {earlier}")
        raise last

    # -- encode and decode ----------------------------------------------------------------------

    @overload
    def encode(
        self,
        images: ImageInput,
        *,
        sample: bool = ...,
        seed: int | None = ...,
        fit: Fit | None = ...,
        output: Literal["numpy"],
    ) -> Latents: ...
    @overload
    def encode(
        self,
        images: ImageInput,
        *,
        sample: bool = ...,
        seed: int | None = ...,
        fit: Fit | None = ...,
        output: EncodeOutput | None = ...,
    ) -> Any: ...
    def encode(
        self,
        images: ImageInput,
        *,
        sample: bool = False,
        seed: int | None = None,
        fit: Fit | None = "crop",
        output: EncodeOutput | None = None,
    ) -> Any:
        """Images -> scaled latents `[B, C, H/8, W/8]` float32 (a torch tensor when given torch,
        or as `output` says). AutoencoderKL models give the posterior mean, or with `sample=True`
        a sample (`seed` makes it reproducible; the same as the local engine's when the batch goes
        in one request). Sides that are not multiples of 8 are cropped (`fit`).

        Args:
            images: An image or a batch: PIL images, uint8 `HWC`/`NHWC` arrays (gray `HW`
                replicated), float `CHW`/`NCHW` in [-1, 1], torch tensors of either kind, file
                paths or encoded bytes, or a list of same-size images.
            sample: Sample the posterior instead of taking its mean (AutoencoderKL models).
            seed: The seed of the sampling noise (None: fresh noise).
            fit: How sides that are not multiples of the spatial factor are fitted: `crop` the
                centre, `resize` with Lanczos, or None to leave them for the model to refuse.
            output: `numpy` or `torch` (default: torch for torch input, else numpy).

        Returns:
            The scaled latents, float32: a numpy array or a torch tensor, as `output` says.

        Raises:
            TensorError: Images of a bad shape or dtype, empty, non-finite, or of different
                sizes in one batch.
            DecodeError: An image file or bytes that cannot be decoded (`ImageTooLargeError`
                when too large).
            OSError: An image path that cannot be read.
            ValueError: An unknown `output`.
            ModelError: The local engine cannot run the model: `ModelNotExportedError`,
                `CorruptExportError`, `RuntimeMissingError` (no ONNX Runtime), `EngineError`.
            NonFiniteOutputError: The model turned finite input into NaN or infinity.
            RemoteError: Every endpoint tried failed (the last failure, the others in its notes);
                a request refused as malformed (400, 422) is not tried elsewhere.
            InvalidEndpointError: An endpoint URL that cannot be requested.
        """
        batch = as_image_batch(images, self.card.spatial_factor, fit)

        def run(backend: Backend, deadline: float | None) -> Any:
            if isinstance(backend, RemoteBackend):
                return backend.encode(batch, sample=sample, seed=seed, deadline=deadline)
            return backend.encode(batch, sample=sample, seed=seed)

        latents = self._first_answer(run)
        return encode_output(latents, output, batch.like)

    def moments(
        self, images: ImageInput, *, fit: Fit | None = "crop", output: EncodeOutput | None = None
    ) -> Any:
        """Images -> the encoder's output, unscaled, float32 (torch when given torch): for
        AutoencoderKL models the posterior's moments `[B, 2C, H/8, W/8]`, mean then log-variance
        (`diffusers`' `DiagonalGaussianDistribution(moments)`), from the local engine and
        `vaelink serve`; `[B, C, H/8, W/8]` latents from a tiny model, and from an endpoint that
        gives latents only (its default, the posterior mean as far as is known).

        Args:
            images: What `encode` takes.
            fit: As for `encode`.
            output: `numpy` or `torch` (default: torch for torch input, else numpy).

        Returns:
            The unscaled encoder output: moments, or latents as above.

        Raises:
            TensorError, DecodeError, OSError, ValueError, ModelError, NonFiniteOutputError,
            RemoteError, InvalidEndpointError: As for `encode`.
        """
        batch = as_image_batch(images, self.card.spatial_factor, fit)

        def run(backend: Backend, deadline: float | None) -> Any:
            if isinstance(backend, RemoteBackend):
                return backend.moments(batch, deadline=deadline)
            return backend.moments(batch)

        return encode_output(self._first_answer(run), output, batch.like)

    @overload
    def decode(
        self,
        latents: LatentInput,
        *,
        height: int | None = ...,
        width: int | None = ...,
        output: Literal["numpy"],
        quality: int = ...,
        wire_dtype: DTypeName | None = ...,
    ) -> Pixels: ...
    @overload
    def decode(
        self,
        latents: LatentInput,
        *,
        height: int | None = ...,
        width: int | None = ...,
        output: Literal["pil"],
        quality: int = ...,
        wire_dtype: DTypeName | None = ...,
    ) -> list[Image.Image]: ...
    @overload
    def decode(
        self,
        latents: LatentInput,
        *,
        height: int | None = ...,
        width: int | None = ...,
        output: Literal["png", "jpeg", "webp"],
        quality: int = ...,
        wire_dtype: DTypeName | None = ...,
    ) -> list[bytes]: ...
    @overload
    def decode(
        self,
        latents: LatentInput,
        *,
        height: int | None = ...,
        width: int | None = ...,
        output: DecodeOutput | None = ...,
        quality: int = ...,
        wire_dtype: DTypeName | None = ...,
    ) -> Any: ...
    def decode(
        self,
        latents: LatentInput,
        *,
        height: int | None = None,
        width: int | None = None,
        output: DecodeOutput | None = None,
        quality: int = 90,
        wire_dtype: DTypeName | None = None,
    ) -> Any:
        """Scaled latents `[B, C, h, w]` (or packed `[B, hw/4, 4C]` with `height` and `width`, the
        image size) -> images. `output`: `numpy` (default; uint8 `[B, H, W, 3]`), `torch` (the
        same as a tensor; the default for torch latents), `float` (the raw decoder output
        `[B, 3, H, W]`, float32), `pil` (a list of images), `png`/`jpeg`/`webp` (a list of encoded
        images; `quality` for JPEG). `wire_dtype` converts the latents before sending them
        (`bfloat16` halves the upload of float32 ones).

        Args:
            latents: Scaled latents, a numpy array or a torch tensor.
            height: The image height in pixels, for packed latents.
            width: The image width in pixels, for packed latents.
            output: The output kind, as above (default: `torch` for torch latents, else
                `numpy`).
            quality: JPEG quality, 1-100.
            wire_dtype: `float16`, `bfloat16` or `float32` to round the latents to before
                sending (None: as given).

        Returns:
            The images in the `output` kind.

        Raises:
            ValueError: An unknown `output`.
            TensorError: Latents of a bad shape (or channel count), empty, non-finite, or packed
                without `height` and `width`; an unknown `wire_dtype`.
            EncodeError: A `quality` out of range for an encoded `output`.
            ModelError, NonFiniteOutputError, RemoteError, InvalidEndpointError: As for
                `encode`.
        """
        check_decode_output(output)
        batch = as_latent_batch(latents, height, width, wire_dtype, self.card.latent_channels)
        kind: DecodeOutput = output or ("torch" if batch.like is not None else "numpy")
        raw: RawOutput = "float" if kind == "float" else "uint8"

        def run(backend: Backend, deadline: float | None) -> Any:
            if isinstance(backend, RemoteBackend):
                return backend.decode(batch, output=raw, deadline=deadline)
            return backend.decode(batch, output=raw)

        images = self._first_answer(run)
        return decode_output(images, kind, batch.like, quality)

    async def aencode(self, images: ImageInput, **options: Unpack[EncodeOptions]) -> Any:
        """`encode` in a worker thread (the request and the engine run without the GIL).

        Args:
            images: What `encode` takes.
            **options: `encode`'s keyword arguments.

        Returns:
            What `encode` returns.

        Raises:
            VaelinkError: What `encode` raises (and its `ValueError`, `OSError`).
        """
        return await asyncio.to_thread(lambda: self.encode(images, **options))

    async def adecode(self, latents: LatentInput, **options: Unpack[DecodeOptions]) -> Any:
        """`decode` in a worker thread.

        Args:
            latents: What `decode` takes.
            **options: `decode`'s keyword arguments.

        Returns:
            What `decode` returns.

        Raises:
            VaelinkError: What `decode` raises (and its `ValueError`).
        """
        return await asyncio.to_thread(lambda: self.decode(latents, **options))


# -- one-call functions ---------------------------------------------------------------------------

_VAE_KEYS = VAEOptions.__optional_keys__


@functools.lru_cache(maxsize=8)
def _shared_vae(
    model: ModelLike, targets: tuple[str | tuple[str, str | None], ...], options: tuple[Any, ...]
) -> VAE:
    unfrozen: dict[str, Any] = {k: dict(v) if isinstance(v, frozenset) else v for k, v in options}
    return VAE(model, targets, **unfrozen)


def shared_vae(model: ModelLike, endpoint: Endpoints, options: VAEOptions | dict[str, Any]) -> VAE:
    """A `VAE` kept for the one-call functions, so that repeated calls reuse sessions and
    connections (the 8 most recently used configurations are kept)."""
    key = model if isinstance(model, Model) else os.fspath(model)
    # A token mapping, hashable for the cache key.
    frozen = {k: frozenset(v.items()) if isinstance(v, Mapping) else v for k, v in options.items()}
    return _shared_vae(key, _targets(endpoint), tuple(sorted(frozen.items())))


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(VAE options, call options)."""
    vae = {k: v for k, v in options.items() if k in _VAE_KEYS}
    return vae, {k: v for k, v in options.items() if k not in _VAE_KEYS}


@overload
def encode(
    images: ImageInput,
    model: ModelLike = ...,
    endpoint: Endpoints = ...,
    *,
    output: Literal["numpy"],
    **options: Unpack[_EncodeCall],
) -> Latents: ...
@overload
def encode(
    images: ImageInput,
    model: ModelLike = ...,
    endpoint: Endpoints = ...,
    *,
    output: EncodeOutput | None = ...,
    **options: Unpack[_EncodeCall],
) -> Any: ...
def encode(
    images: ImageInput,
    model: ModelLike = DEFAULT_MODEL,
    endpoint: Endpoints = None,
    *,
    output: EncodeOutput | None = None,
    **options: Unpack[_EncodeCall],
) -> Any:
    """Images -> scaled latents with `model`, locally (no endpoint), on an endpoint, or on the first
    of a list that answers (`[url, ..., "local"]`). Takes `VAE`'s options and `VAE.encode`'s;
    returns what `VAE.encode` does.

    The `VAE` is kept between calls (the 8 most recently used configurations), so repeated calls
    reuse the engine's sessions and the connections.

    Args:
        images: What `VAE.encode` takes.
        model: A card name or an export folder.
        endpoint: None (local), a URL, or a list of URLs, `"local"` and `(url, token)` pairs.
        output: `numpy` or `torch` (default: torch for torch input, else numpy).
        **options: `VAE`'s keyword arguments (`token`, `timeout`, ...) and `VAE.encode`'s
            (`sample`, `seed`, `fit`).

    Returns:
        The scaled latents, as `VAE.encode` returns them.

    Raises:
        TypeError, ValueError, UnknownModelError, CorruptExportError: A bad model or endpoint
            list, as for `VAE`.
        VaelinkError: What `VAE.encode` raises.
    """
    vae_options, call = _split_options(dict(options))
    return shared_vae(model, endpoint, vae_options).encode(images, output=output, **call)


@overload
def decode(
    latents: LatentInput,
    model: ModelLike = ...,
    endpoint: Endpoints = ...,
    *,
    output: Literal["numpy"],
    **options: Unpack[_DecodeCall],
) -> Pixels: ...
@overload
def decode(
    latents: LatentInput,
    model: ModelLike = ...,
    endpoint: Endpoints = ...,
    *,
    output: Literal["pil"],
    **options: Unpack[_DecodeCall],
) -> list[Image.Image]: ...
@overload
def decode(
    latents: LatentInput,
    model: ModelLike = ...,
    endpoint: Endpoints = ...,
    *,
    output: Literal["png", "jpeg", "webp"],
    **options: Unpack[_DecodeCall],
) -> list[bytes]: ...
@overload
def decode(
    latents: LatentInput,
    model: ModelLike = ...,
    endpoint: Endpoints = ...,
    *,
    output: DecodeOutput | None = ...,
    **options: Unpack[_DecodeCall],
) -> Any: ...
def decode(
    latents: LatentInput,
    model: ModelLike = DEFAULT_MODEL,
    endpoint: Endpoints = None,
    *,
    output: DecodeOutput | None = None,
    **options: Unpack[_DecodeCall],
) -> Any:
    """Scaled latents -> images with `model`, locally or remotely as for `encode`. Takes `VAE`'s
    options and `VAE.decode`'s; returns what `VAE.decode` does for `output`.

    Args:
        latents: What `VAE.decode` takes.
        model: A card name or an export folder.
        endpoint: None (local), a URL, or a list of URLs, `"local"` and `(url, token)` pairs.
        output: `numpy`, `torch`, `float`, `pil`, `png`, `jpeg` or `webp`, as for `VAE.decode`.
        **options: `VAE`'s keyword arguments and `VAE.decode`'s (`height`, `width`, `quality`,
            `wire_dtype`).

    Returns:
        The images, as `VAE.decode` returns them.

    Raises:
        TypeError, ValueError, UnknownModelError, CorruptExportError: A bad model or endpoint
            list, as for `VAE`.
        VaelinkError: What `VAE.decode` raises.
    """
    vae_options, call = _split_options(dict(options))
    return shared_vae(model, endpoint, vae_options).decode(latents, output=output, **call)
