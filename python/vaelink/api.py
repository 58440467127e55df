"""One API for local and remote VAEs: `vaelink.encode`, `vaelink.decode` and `vaelink.VAE`.

With no endpoint the local engine runs the model; with a URL that endpoint does (any server that
speaks the Hugging Face remote-VAE protocol: the public endpoints, `vaelink serve`); with a list
(`[url1, url2, "local"]`) each is tried in turn until one answers, so that a service that is down
falls back to the next one or to the local engine. Results are the same wherever they come from.

Inputs: PIL images, uint8 arrays (`HWC`, `NHWC`, gray `HW`), float `NCHW` arrays in [-1, 1], torch
tensors, file paths and encoded bytes, and lists of them. Outputs: numpy by default, torch when
given torch, PIL images or encoded image bytes on request."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from .dtypes import DTypeName, bfloat16
from .engine import DEFAULT_MODEL, Engine, Provider, _is_torch
from .errors import (
    RemoteConnectionError,
    RemoteError,
    RemoteRequestError,
    RemoteTimeoutError,
    RemoteUnavailableError,
    TensorError,
)
from .image import encode_image, fit_to_multiple, load_rgb
from .registry import ModelCard, get_card
from .remote import (
    TENSOR_HEADERS,
    Endpoint,
    HttpClient,
    concat,
    read_tensor,
    scaling_params,
    split,
    to_float32,
)
from .store import read_manifest
from .wire import from_wire, to_wire

__all__ = ["LOCAL", "VAE", "DecodeOutput", "EncodeOutput", "decode", "encode"]

LOCAL = "local"
"""The name of the local engine in an endpoint list."""

Fit = Literal["crop", "resize"]
EncodeOutput = Literal["numpy", "torch"]
DecodeOutput = Literal["numpy", "torch", "float", "pil", "png", "jpeg", "webp"]
DECODE_OUTPUTS = ("numpy", "torch", "float", "pil", "png", "jpeg", "webp")

T = TypeVar("T")


# -- inputs -------------------------------------------------------------------------------------


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor's data as a numpy array on the CPU (bfloat16 as `ml_dtypes.bfloat16`)."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(bfloat16)
    return t.numpy()


@dataclass
class Images:
    """A batch of images to encode, in one of two forms, and the torch tensor it came from."""

    pixels: np.ndarray | None = None
    """uint8 `NHWC` RGB."""
    floats: np.ndarray | None = None
    """float32 `NCHW` in [-1, 1]."""
    torch_input: Any = None
    """The torch tensor given, unchanged, when the local engine can take it as it is (and keep it
    on its device)."""
    like: Any = None
    """The torch tensor given, if any: the latents come back as torch, on its device."""

    def engine_input(self) -> Any:
        if self.torch_input is not None:
            return self.torch_input
        return self.pixels if self.pixels is not None else self.floats


def _fit(pixels: np.ndarray, multiple: int, fit: Fit | None) -> np.ndarray:
    h, w = pixels.shape[:2]
    if fit is None or (h % multiple == 0 and w % multiple == 0):
        return pixels
    return fit_to_multiple(pixels, multiple, fit)


def _pixel_batch(arrays: Sequence[np.ndarray], multiple: int, fit: Fit | None) -> np.ndarray:
    fitted = [_fit(a, multiple, fit) for a in arrays]
    if len({a.shape for a in fitted}) != 1:
        sizes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in fitted})
        raise TensorError(f"images in a batch must have the same size, got {', '.join(sizes)}")
    return np.stack(fitted) if len(fitted) > 1 else fitted[0][None]


def _uint8_batch(array: np.ndarray) -> list[np.ndarray]:
    if array.ndim in (2, 3):
        return [load_rgb(array)]  # gray HW is replicated; HWC must be RGB
    if array.ndim == 4 and array.shape[3] == 3:
        return list(array)
    raise TensorError(f"uint8 images must be HW, HWC or NHWC RGB, got shape {array.shape}")


def _float_batch(array: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(array, dtype=np.float32)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] != 3:
        raise TensorError(f"float images must be CHW or NCHW RGB in [-1, 1], got {array.shape}")
    return x


def prepare_images(images: Any, multiple: int, fit: Fit | None = "crop") -> Images:
    """Any supported input as a batch; sides not multiples of `multiple` are fitted (`fit`: crop
    the centre, or resize with Lanczos as diffusers does; None: left for the model to refuse)."""
    if _is_torch(images):
        array = tensor_to_numpy(images)
        if array.dtype == np.uint8:
            pixels = _pixel_batch(_uint8_batch(array), multiple, fit)
            # The tensor itself for the local engine, unless it was gray or had to be fitted.
            same = array.ndim in (3, 4) and pixels.shape[1:] == array.shape[-3:]
            return Images(pixels=pixels, torch_input=images if same else None, like=images)
        floats = _float_batch(array.astype(np.float32))
        return Images(floats=floats, torch_input=images, like=images)
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return Images(pixels=_pixel_batch(_uint8_batch(images), multiple, fit))
        if images.dtype.kind == "f" or images.dtype == bfloat16:
            return Images(floats=_float_batch(images.astype(np.float32)))
        raise TensorError(f"images must be uint8 or float arrays, got {images.dtype}")
    if isinstance(images, list | tuple):
        if not images:
            raise TensorError("empty batch")
        return Images(pixels=_pixel_batch([load_rgb(i) for i in images], multiple, fit))
    return Images(pixels=_pixel_batch([load_rgb(images)], multiple, fit))


def _latents_array(latents: Any, wire_dtype: DTypeName | None) -> np.ndarray:
    """Latents as a numpy array of a wire float dtype (float64 becomes float32)."""
    array = tensor_to_numpy(latents) if _is_torch(latents) else np.asarray(latents)
    if array.dtype not in (np.float32, np.float16, bfloat16):  # float64, integers
        array = array.astype(np.float32)
    if array.ndim not in (3, 4) or 0 in array.shape:
        raise TensorError(
            f"latents must be [B, C, H, W] or packed [B, HW/4, 4C], got {array.shape}"
        )
    return array if wire_dtype is None else _converted(array, wire_dtype)


def _converted(array: np.ndarray, dtype: DTypeName) -> np.ndarray:
    wire = to_wire(array, dtype)
    return from_wire(wire.body, wire.shape, wire.dtype)


def _signed_range(x: np.ndarray) -> np.ndarray:
    """Float images for an endpoint that tells the range from the values (the protocol's `auto`):
    [-1, 1] as they are when some are negative, else mapped to [0, 1] - read back as [-1, 1] by
    such an endpoint (up to rounding), where unmapped ones would be taken for [0, 1]."""
    return x if x.min() < 0 else (x + 1) / 2


# -- outputs ------------------------------------------------------------------------------------


def _as_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if _is_torch(value) else np.asarray(value)


def _as_torch(value: Any, like: Any) -> Any:
    import torch

    tensor = value if _is_torch(value) else torch.from_numpy(np.ascontiguousarray(value))
    return tensor.to(like.device) if like is not None else tensor


def encode_output(latents: Any, output: EncodeOutput | None, like: Any) -> Any:
    kind = output or ("torch" if like is not None else "numpy")
    if kind == "numpy":
        return _as_numpy(latents)
    if kind == "torch":
        return _as_torch(latents, like)
    raise ValueError(f"unknown output {output!r}; expected numpy or torch")


def decode_output(images: Any, kind: DecodeOutput, like: Any, quality: int) -> Any:
    """Decoded images (uint8 `NHWC`, or float `NCHW` for `float`) as the caller asked."""
    if kind == "float":
        return _as_torch(images, like) if like is not None else _as_numpy(images)
    if kind == "torch":
        return _as_torch(images, like)
    pixels = _as_numpy(images)
    if kind == "numpy":
        return pixels
    if kind == "pil":
        from PIL import Image

        return [Image.fromarray(p) for p in pixels]
    return [encode_image(p, kind, quality=quality) for p in pixels]


# -- the VAE ------------------------------------------------------------------------------------


def resolve_card(model: str | os.PathLike[str]) -> ModelCard:
    """The card of a model name or of an export folder (from its manifest)."""
    folder = Path(model)
    if folder.is_dir():
        return read_manifest(folder, verify=False).card
    return get_card(str(model))


def _targets(endpoint: str | Sequence[str] | None) -> tuple[str, ...]:
    if endpoint is None:
        return (LOCAL,)
    targets = (endpoint,) if isinstance(endpoint, str) else tuple(endpoint)
    if not targets:
        raise ValueError("endpoint list is empty; pass None for the local engine")
    for target in targets:
        if not isinstance(target, str):
            raise TypeError(f"endpoints are URLs or {LOCAL!r}, got {type(target).__name__}")
    return targets


_DOWN = (RemoteConnectionError, RemoteTimeoutError, RemoteUnavailableError)
"""Failures after which an endpoint is tried last for `cooldown` seconds."""


class VAE:
    """A model, local or remote: keeps the engine's sessions, the HTTP connections and what each
    endpoint said about itself across calls. Thread-safe; usable as a context manager.

    - `model`: a card name (`vaelink models`) or an export folder. Remote endpoints get its scaling
      factors explicitly with every request; the local engine loads it when first needed.
    - `endpoint`: None (local), a URL, or a list of URLs and `"local"`, tried in order. An endpoint
      that was down (no connection, timeout, 429/503 after the retries) goes to the back of the
      list for `cooldown` seconds.
    - `token`: sent as `Authorization: Bearer`; by default `VAELINK_TOKEN` or `HF_TOKEN` is, over
      HTTPS and to loopback addresses.
    - `timeout` (seconds to wait for an answer), `connect_timeout`, `retries` (on connection errors,
      429 and 503, with exponential backoff and jitter, honouring `Retry-After`).
    - `concurrency`: requests in flight at once when a batch is sent an image at a time.
    - `fast_path`: against a vaelink server (it says so at `GET /info`), send raw uint8 pixels and
      whole batches instead of one PNG per request.
    - `provider`: the local engine's (`auto`, `cpu`, `cuda`).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        endpoint: str | Sequence[str] | None = None,
        *,
        token: str | None = None,
        timeout: float | None = 300.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        concurrency: int = 4,
        fast_path: bool = True,
        cooldown: float = 30.0,
        provider: Provider = "auto",
        client: HttpClient | None = None,
    ) -> None:
        self.model = model
        self.targets = _targets(endpoint)
        self.card = resolve_card(model)
        self.token = token
        self.concurrency = max(1, concurrency)
        self.fast_path = fast_path
        self.cooldown = cooldown
        self.provider = provider
        self._client = client
        self._client_options = {
            "read_timeout": timeout,
            "connect_timeout": connect_timeout,
            "retries": retries,
        }
        self._engine: Engine | None = None
        self._endpoints: dict[str, Endpoint] = {}
        self._down_until: dict[str, float] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = list(self.targets) if len(self.targets) > 1 else self.targets[0]
        return f"VAE({self.card.name!r}, endpoint={where!r})"

    # -- resources ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The local engine, loaded on first use."""
        with self._lock:
            if self._engine is None:
                self._engine = Engine(self.model, provider=self.provider)
            return self._engine

    def endpoint(self, url: str) -> Endpoint:
        with self._lock:
            if self._client is None:
                self._client = HttpClient(**self._client_options)
            if url not in self._endpoints:
                self._endpoints[url] = Endpoint(url, self._client, self.token)
            return self._endpoints[url]

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any] | range) -> list[T]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="vaelink")
            pool = self._pool
        return list(pool.map(fn, items))

    def close(self) -> None:
        """Stops the request threads; idle connections close with the client."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
            self._endpoints.clear()
            self._client = None

    def __enter__(self) -> VAE:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fallback -------------------------------------------------------------------------------

    def _ordered_targets(self) -> list[str]:
        now = time.monotonic()
        up = [t for t in self.targets if self._down_until.get(t, 0.0) <= now]
        return up + [t for t in self.targets if t not in up]

    def _first_answer(self, run: Callable[[str], T]) -> T:
        """`run` on each target in turn until one succeeds. Failures of an endpoint move on to the
        next one, except a request the endpoint refused as malformed (400, 422: it would fail
        everywhere); when every target failed, the last error is raised with the others noted."""
        failures: list[tuple[str, RemoteError]] = []
        for target in self._ordered_targets():
            try:
                result = run(target)
            except RemoteError as error:
                if isinstance(error, _DOWN):
                    self._down_until[target] = time.monotonic() + self.cooldown
                malformed = isinstance(error, RemoteRequestError) and error.status in (400, 422)
                failures.append((target, error))
                if malformed or len(failures) == len(self.targets):
                    break
                continue
            self._down_until.pop(target, None)
            return result
        target, last = failures[-1]
        for other, error in failures[:-1]:
            last.add_note(f"vaelink: {other} failed before: {error}")
        raise last

    # -- encode ---------------------------------------------------------------------------------

    def encode(
        self,
        images: Any,
        *,
        sample: bool = False,
        seed: int | None = None,
        fit: Fit | None = "crop",
        output: EncodeOutput | None = None,
    ) -> Any:
        """Images -> scaled latents `[B, C, H/8, W/8]` float32 (a torch tensor when given torch,
        or as `output` says). AutoencoderKL models give the posterior mean, or with `sample=True`
        a sample (`seed` makes it reproducible; the same as the local engine's when the batch goes
        in one request). Sides that are not multiples of 8 are cropped (`fit`)."""
        batch = prepare_images(images, self.card.spatial_factor, fit)
        latents = self._first_answer(
            lambda target: self._encode_on(target, batch, sample=sample, seed=seed)
        )
        return encode_output(latents, output, batch.like)

    def _encode_on(self, target: str, batch: Images, *, sample: bool, seed: int | None) -> Any:
        if target == LOCAL:
            return self.engine.encode(batch.engine_input(), sample=sample, seed=seed)
        endpoint = self.endpoint(target)
        info = endpoint.info() if self.fast_path else None
        url = endpoint.model_url(info, self.card.name, self.card.latent_channels)
        params = scaling_params(self.card.scaling_factor, self.card.shift_factor)
        if sample:
            params |= {"sample": True, "seed": seed}

        def post(tensor: np.ndarray, extra: dict[str, Any]) -> np.ndarray:
            # No Content-Type: as the diffusers client sends images and tensors to encode.
            wire = to_wire(tensor)
            query = params | {"shape": list(wire.shape), "dtype": wire.dtype} | extra
            headers, body = endpoint.post(query, wire.body, {"Accept": "tensor/binary"}, url)
            return to_float32(read_tensor(headers, body))

        def png(pixels: np.ndarray) -> np.ndarray:
            body = encode_image(pixels, "png")  # fast, lossless: the server sees these pixels
            headers, content = endpoint.post(params, body, {"Accept": "tensor/binary"}, url)
            return to_float32(read_tensor(headers, content))

        if batch.pixels is not None:
            pixels = batch.pixels
            if info is not None and info.uint8_images:
                size = info.batch_size(pixels[0].nbytes)
                pieces = self._map(lambda s: post(pixels[s], {}), list(split(len(pixels), size)))
            else:
                pieces = self._map(png, list(pixels))
        else:
            assert batch.floats is not None
            x = batch.floats
            if info is not None and info.float_images:
                size = info.batch_size(x[0].nbytes)
                chunks = list(split(len(x), size))
                pieces = self._map(lambda s: post(x[s], {"input_range": "-1,1"}), chunks)
            else:
                pieces = self._map(lambda i: post(_signed_range(x[i : i + 1]), {}), range(len(x)))
        return concat(pieces)

    # -- decode ---------------------------------------------------------------------------------

    def decode(
        self,
        latents: Any,
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
        (`bfloat16` halves the upload of float32 ones)."""
        if output is not None and output not in DECODE_OUTPUTS:
            raise ValueError(f"unknown output {output!r}; expected one of {DECODE_OUTPUTS}")
        like = latents if _is_torch(latents) else None
        kind: DecodeOutput = output or ("torch" if like is not None else "numpy")
        floats = kind == "float"
        images = self._first_answer(
            lambda target: self._decode_on(target, latents, height, width, floats, wire_dtype)
        )
        return decode_output(images, kind, like, quality)

    def _decode_on(
        self,
        target: str,
        latents: Any,
        height: int | None,
        width: int | None,
        floats: bool,
        wire_dtype: DTypeName | None,
    ) -> Any:
        if target == LOCAL:
            z = latents if wire_dtype is None else _latents_array(latents, wire_dtype)
            output = "float" if floats else "uint8"
            return self.engine.decode(z, height=height, width=width, output=output)
        z = _latents_array(latents, wire_dtype)
        if floats and wire_dtype is None:
            z = to_float32(z)  # endpoints answer in the latents' dtype: float32, as locally
        if z.ndim == 3 and (height is None or width is None):
            raise TensorError("packed 3-D latents need height and width (pixels)")
        endpoint = self.endpoint(target)
        info = endpoint.info() if self.fast_path else None
        url = endpoint.model_url(info, self.card.name, self.card.latent_channels)
        params: dict[str, Any] = {
            "output_type": "pt",
            "partial_postprocess": not floats,  # uint8 pixels, rounded as the engine rounds
            "image_format": "jpg",  # informational for pt; sent as the diffusers client does
            **scaling_params(self.card.scaling_factor, self.card.shift_factor),
        }
        if height is not None and width is not None:
            params |= {"height": height, "width": width}
        # A vaelink server takes batches; to others one latent per request (several in flight).
        size = info.batch_size(z[0].nbytes) if info is not None else 1

        def post(s: slice) -> np.ndarray:
            wire = to_wire(np.ascontiguousarray(z[s]))
            query = params | {"shape": list(wire.shape), "dtype": wire.dtype}
            headers, body = endpoint.post(query, wire.body, TENSOR_HEADERS, url)
            tensor = read_tensor(headers, body)
            return tensor if tensor.dtype == np.uint8 else to_float32(tensor)

        images = concat(self._map(post, list(split(len(z), size))))
        self._check_decoded(images, len(z), floats)
        return images

    @staticmethod
    def _check_decoded(images: np.ndarray, batch: int, floats: bool) -> None:
        expected = "[B, 3, H, W] floats" if floats else "[B, H, W, 3] uint8"
        ok = images.ndim == 4 and len(images) == batch
        ok = ok and (images.shape[1] == 3 if floats else images.shape[3] == 3)
        ok = ok and (images.dtype == np.float32 if floats else images.dtype == np.uint8)
        if not ok:
            raise TensorError(
                f"the endpoint answered {images.dtype} {list(images.shape)}, not {expected}"
            )

    # -- async ----------------------------------------------------------------------------------

    async def aencode(
        self,
        images: Any,
        *,
        sample: bool = False,
        seed: int | None = None,
        fit: Fit | None = "crop",
        output: EncodeOutput | None = None,
    ) -> Any:
        """`encode` in a worker thread (the request and the engine run without the GIL)."""
        return await asyncio.to_thread(
            self.encode, images, sample=sample, seed=seed, fit=fit, output=output
        )

    async def adecode(
        self,
        latents: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        output: DecodeOutput | None = None,
        quality: int = 90,
        wire_dtype: DTypeName | None = None,
    ) -> Any:
        """`decode` in a worker thread."""
        return await asyncio.to_thread(
            self.decode,
            latents,
            height=height,
            width=width,
            output=output,
            quality=quality,
            wire_dtype=wire_dtype,
        )


# -- one-call functions -------------------------------------------------------------------------

_SHARED: OrderedDict[tuple[Any, ...], VAE] = OrderedDict()
_SHARED_MAX = 8
_shared_lock = threading.Lock()


def shared_vae(
    model: str | os.PathLike[str],
    endpoint: str | Sequence[str] | None,
    token: str | None,
    options: dict[str, Any],
) -> VAE:
    """A `VAE` kept for the one-call functions, so that repeated calls reuse sessions and
    connections (the 8 most recently used configurations are kept)."""
    key = (os.fspath(model), _targets(endpoint), token, tuple(sorted(options.items())))
    with _shared_lock:
        vae = _SHARED.get(key)
        if vae is not None:
            _SHARED.move_to_end(key)
            return vae
    vae = VAE(model, endpoint, token=token, **options)
    with _shared_lock:
        vae = _SHARED.setdefault(key, vae)
        while len(_SHARED) > _SHARED_MAX:
            _, old = _SHARED.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
    return vae


def encode(
    images: Any,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    endpoint: str | Sequence[str] | None = None,
    *,
    token: str | None = None,
    sample: bool = False,
    seed: int | None = None,
    fit: Fit | None = "crop",
    output: EncodeOutput | None = None,
    **options: Any,
) -> Any:
    """Images -> scaled latents with `model`, locally (no endpoint), on an endpoint, or on the first
    of a list that answers (`[url, ..., "local"]`). `options` go to `VAE`. See `VAE.encode`."""
    vae = shared_vae(model, endpoint, token, options)
    return vae.encode(images, sample=sample, seed=seed, fit=fit, output=output)


def decode(
    latents: Any,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    endpoint: str | Sequence[str] | None = None,
    *,
    token: str | None = None,
    height: int | None = None,
    width: int | None = None,
    output: DecodeOutput | None = None,
    quality: int = 90,
    wire_dtype: DTypeName | None = None,
    **options: Any,
) -> Any:
    """Scaled latents -> images with `model`, locally or remotely as for `encode`. See
    `VAE.decode`."""
    vae = shared_vae(model, endpoint, token, options)
    return vae.decode(
        latents, height=height, width=width, output=output, quality=quality, wire_dtype=wire_dtype
    )
