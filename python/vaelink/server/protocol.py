"""The Hugging Face remote-VAE protocol, server side: query parsing, request validation and the
conversion between request bodies, engine arrays and response bodies.

Pure functions over bytes and numpy arrays (no HTTP here), so that each rule is easy to test; the
conversions are run in worker threads by the app. Errors are `RejectedRequestError`s carrying their
status.

The latents' scaling is the request's own (`Scaling`): applied here to what the engine computes
unscaled, so that requests with any factors share engine batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np

from .. import image, processing, wire
from ..cards import ModelCard, Scaling
from ..dtypes import WIRE_DTYPES, DTypeName
from ..errors import ImageTooLargeError, RejectedRequestError

__all__ = [
    "DecodeRequest",
    "EncodeRequest",
    "Limits",
    "TensorResponse",
    "decode_request",
    "decode_response",
    "decode_size",
    "encode_request",
    "encode_response",
    "encode_size",
    "operation",
    "parse_query",
    "read_images",
    "read_latents",
]

Query = dict[str, Any]
Body = bytes | bytearray
"""A request body (the server reads it into one bytearray)."""
Operation = Literal["decode", "encode"]
DecodeOutput = Literal["jpeg", "png", "webp", "raw", "uint8", "unit"]
"""jpeg/png/webp: one encoded image; raw: decoder output [B,3,H,W]; uint8: [B,H,W,3] pixels
(partial_postprocess); unit: [B,3,H,W] in [0, 1] (`pil` for a client holding a processor)."""

JPEG_QUALITY = 75  # what the public endpoints send
FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def too_large(message: str) -> RejectedRequestError:
    return RejectedRequestError(message, 413)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Images above `tile_above_pixels` are encoded/decoded tiled."""

    max_body_bytes: int = 256 << 20
    max_pixels: int = 4096 * 4096
    tile_above_pixels: int = 2048 * 2048
    max_batch: int = 16
    """Images (or latents) in one request."""
    max_request_pixels: int = 32_000_000
    """Pixels of all images of one request together: the cost of a request is linear in them."""


# -- query parsing ------------------------------------------------------------------------------


def _convert(value: str) -> Any:
    """The endpoint runtime's conversion: numeric -> int, true/false -> bool, else the string."""
    if value.isnumeric():
        try:
            return int(value)
        except ValueError:  # other Unicode numerals ("½") are numeric but not ints
            return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_query(query: str) -> Query:
    """A query string as the endpoint runtime sees it: repeated keys become lists, one value stays
    bare, each value converted as `_convert` does."""
    grouped: dict[str, list[Any]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        grouped.setdefault(key, []).append(_convert(value))
    return {key: values[0] if len(values) == 1 else values for key, values in grouped.items()}


def _scalar(query: Query, name: str) -> Any:
    value = query.get(name)
    if isinstance(value, list):
        raise RejectedRequestError(f"{name} must be one value, got {len(value)}")
    return value


def get_int(query: Query, name: str, *, minimum: int | None = None) -> int | None:
    value = _scalar(query, name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise RejectedRequestError(f"{name} must be an integer, got {value}")
    try:
        number = int(value)  # "-3" stays a string in the runtime's conversion
    except (TypeError, ValueError):
        raise RejectedRequestError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise RejectedRequestError(f"{name} must be at least {minimum}, got {number}")
    return number


def get_float(query: Query, name: str) -> float | None:
    value = _scalar(query, name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise RejectedRequestError(f"{name} must be a number, got {value}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RejectedRequestError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RejectedRequestError(f"{name} must be finite, got {value!r}")
    return number


def get_bool(query: Query, name: str, default: bool) -> bool:
    value = _scalar(query, name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise RejectedRequestError(f"{name} must be True or False, got {value!r}")


def get_str(query: Query, name: str, choices: tuple[str, ...], default: str | None = None) -> str:
    value = _scalar(query, name)
    if value is None:
        if default is None:
            raise RejectedRequestError(f"missing query parameter {name}")
        return default
    if not isinstance(value, str) or value.lower() not in choices:
        raise RejectedRequestError(
            f"unknown {name} {value!r}; expected one of {', '.join(choices)}"
        )
    return value.lower()


def get_shape(query: Query) -> tuple[int, ...]:
    value = query.get("shape")
    if value is None:
        raise RejectedRequestError("missing query parameter shape")
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RejectedRequestError(f"shape must be non-negative integers, got {values!r}")
    return tuple(values)


def get_dtype(query: Query) -> DTypeName:
    return get_str(query, "dtype", tuple(WIRE_DTYPES))  # type: ignore[return-value]


def operation(query: Query, content_type: str | None) -> Operation:
    """Decode and encode share `/`: a request is a decode when it carries `output_type` (the
    diffusers client always sends it) or `Content-Type: tensor/binary`, an encode otherwise."""
    media = (content_type or "").split(";")[0].strip().lower()
    return "decode" if "output_type" in query or media == "tensor/binary" else "encode"


def _media_types(accept: str | None) -> list[str]:
    return [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]


def _scaling(query: Query, card: ModelCard) -> Scaling:
    """The request's latent scaling, for decode and encode alike.

    Factors sent are applied as sent (a missing one is the identity). With none sent,
    `do_scaling=True` (the diffusers client's deprecated default) means the model's own factors;
    otherwise nothing is applied - the diffusers client sends nothing at all for
    `do_scaling=False`, whose documented meaning is "no scaling"."""
    scale, shift = get_float(query, "scaling_factor"), get_float(query, "shift_factor")
    if scale == 0:
        raise RejectedRequestError("scaling_factor must not be zero")
    if scale is not None or shift is not None:
        return Scaling(1.0 if scale is None else scale, 0.0 if shift is None else shift)
    if get_bool(query, "do_scaling", False):
        return card.scaling
    return Scaling()


# -- decode ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeRequest:
    shape: tuple[int, ...]
    dtype: DTypeName
    output: DecodeOutput
    scaling: Scaling
    height: int | None
    width: int | None


def _decode_output(query: Query, accept: str | None) -> DecodeOutput:
    types = _media_types(accept)
    wants_image = any(t.startswith("image/") for t in types)
    output_type = get_str(
        query, "output_type", ("pil", "pt", "mp4"), "pil" if wants_image else "pt"
    )
    if output_type == "mp4":
        raise RejectedRequestError("video (output_type=mp4) is not supported by this server")
    if output_type == "pt":
        return "uint8" if get_bool(query, "partial_postprocess", False) else "raw"
    for media, output in (
        ("tensor/binary", "unit"),
        ("image/jpeg", "jpeg"),
        ("image/png", "png"),
        ("image/webp", "webp"),
    ):
        if media in types:
            return output  # type: ignore[return-value]
    fmt = get_str(query, "image_format", ("jpg", "jpeg", "png", "webp"), "jpg")
    return "jpeg" if fmt == "jpg" else fmt  # type: ignore[return-value]


def decode_request(query: Query, accept: str | None, card: ModelCard) -> DecodeRequest:
    """Validates a decode request's parameters (not yet its body)."""
    req = DecodeRequest(
        shape=get_shape(query),
        dtype=get_dtype(query),
        output=_decode_output(query, accept),
        scaling=_scaling(query, card),
        height=get_int(query, "height", minimum=1),
        width=get_int(query, "width", minimum=1),
    )
    if req.output in ("jpeg", "png", "webp") and req.shape and req.shape[0] > 1:
        raise RejectedRequestError(
            f"output_type=pil returns one image; got a batch of {req.shape[0]} "
            "(send one latent per request, or use output_type=pt)"
        )
    return req


def decode_size(req: DecodeRequest, card: ModelCard, limits: Limits) -> tuple[int, int, int]:
    """(batch, height, width) of the images a decode request asks for, from its parameters alone
    (before its body is read); refused when beyond the limits."""
    shape, f = req.shape, card.spatial_factor
    if len(shape) == 5:
        raise RejectedRequestError("video latents (5-D) are not supported by this server")
    if len(shape) not in (3, 4):
        raise RejectedRequestError(
            f"latents must be 4-D [B, C, H, W] or packed 3-D, got shape {shape}"
        )
    if 0 in shape:
        raise RejectedRequestError(f"empty latents, shape {list(shape)}")
    if len(shape) == 3:
        if req.height is None or req.width is None:
            raise RejectedRequestError("packed 3-D latents need height and width")
        height, width = 16 * (req.height // 16), 16 * (req.width // 16)
        if height == 0 or width == 0:
            raise RejectedRequestError(
                f"height and width must be at least 16, got {req.height}x{req.width}"
            )
    else:
        if shape[1] != card.latent_channels:
            raise RejectedRequestError(
                f"{card.name} latents have {card.latent_channels} channels, got shape {list(shape)}"
            )
        height, width = shape[2] * f, shape[3] * f
    check_size(shape[0], height, width, limits)
    return shape[0], height, width


def check_size(batch: int, height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_pixels:
        raise too_large(
            f"{width}x{height} images exceed this server's limit of {limits.max_pixels} pixels"
        )
    if batch > limits.max_batch:
        raise too_large(f"batch of {batch} exceeds this server's limit of {limits.max_batch}")
    if batch * height * width > limits.max_request_pixels:
        raise too_large(
            f"{batch} images of {width}x{height} are {batch * height * width / 1e6:.1f} "
            f"megapixels, beyond this server's limit of {limits.max_request_pixels / 1e6:g} "
            "per request; send fewer or smaller images"
        )


def read_latents(body: Body, req: DecodeRequest, card: ModelCard, limits: Limits) -> np.ndarray:
    """The request's latents as float32 `[B, C, h, w]`, unscaled (as the decoder takes them),
    validated so that a bad request never reaches a shared batch."""
    decode_size(req, card, limits)
    if req.dtype not in FLOAT_DTYPES:
        raise RejectedRequestError(f"latents must be float16, bfloat16 or float32, got {req.dtype}")
    latents = wire.from_wire(body, req.shape, req.dtype)
    if latents.ndim == 3:
        latents = processing.unpack_latents(latents, req.height or 0, req.width or 0)
        if latents.shape[1] != card.latent_channels:
            raise RejectedRequestError(
                f"{card.name} latents have {card.latent_channels} channels, "
                f"packed ones {4 * card.latent_channels}; got shape {list(req.shape)}"
            )
    z = latents.astype(np.float32)  # a writable copy, also of read-only wire buffers
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
        z = np.asarray(req.scaling.invert(z))
    if not np.isfinite(z).all():  # checked here so that one bad request never spoils a batch
        raise RejectedRequestError("latents contain NaN or infinity (after scaling)")
    return z


@dataclass(frozen=True)
class TensorResponse:
    body: bytes
    media_type: str
    headers: dict[str, str]


def _tensor(array: np.ndarray, dtype: DTypeName) -> TensorResponse:
    tensor = wire.to_wire(array, dtype)
    headers = {"shape": tensor.shape_header(), "dtype": tensor.dtype}
    return TensorResponse(tensor.body, "tensor/binary", headers)


def decode_response(images: np.ndarray, req: DecodeRequest) -> TensorResponse:
    """The engine's float32 `[B, 3, H, W]` output as the response the request asked for."""
    float_dtype = req.dtype  # the "model dtype" of the public endpoints: the latents' own
    if req.output == "raw":
        return _tensor(images, float_dtype)
    if req.output == "unit":
        return _tensor(np.clip(images / 2 + 0.5, 0, 1), float_dtype)
    pixels = processing.postprocess(images)
    if req.output == "uint8":
        return _tensor(pixels, "uint8")
    body = image.encode_image(pixels[0], req.output, quality=JPEG_QUALITY)
    return TensorResponse(body, f"image/{req.output}", {})


# -- encode ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeRequest:
    shape: tuple[int, ...] | None
    """None: the body is an encoded image."""
    dtype: DTypeName | None
    scaling: Scaling
    sample: bool
    seed: int | None
    moments: bool
    """The encoder's output unscaled - an AutoencoderKL's posterior moments `[B, 2C, h, w]`, mean
    then log-variance - instead of latents (vaelink's own parameter: other servers ignore it)."""
    output_dtype: DTypeName | None
    input_range: Literal["auto", "0,1", "-1,1"]
    fit: Literal["crop", "resize", "none"]


def encode_request(query: Query, card: ModelCard) -> EncodeRequest:
    tensor = "shape" in query or "dtype" in query
    output_dtype = query.get("output_dtype")
    return EncodeRequest(
        shape=get_shape(query) if tensor else None,
        dtype=get_dtype(query) if tensor else None,
        scaling=_scaling(query, card),
        sample=get_bool(query, "sample", False),
        seed=get_int(query, "seed", minimum=0),
        moments=get_bool(query, "moments", False),
        output_dtype=get_str(query, "output_dtype", FLOAT_DTYPES) if output_dtype else None,  # type: ignore[arg-type]
        input_range=get_str(query, "input_range", ("auto", "0,1", "-1,1"), "auto"),  # type: ignore[arg-type]
        fit=get_str(query, "fit", ("crop", "resize", "none"), "crop"),  # type: ignore[arg-type]
    )


def _fit(pixels: np.ndarray, req: EncodeRequest, f: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    if h % f == 0 and w % f == 0:
        return pixels
    if req.fit == "none" or h < f or w < f:
        raise RejectedRequestError(
            f"image size {w}x{h} must be a multiple of {f} (at least {f}x{f})"
        )
    return image.fit_to_multiple(pixels, f, req.fit)


def _tensor_size(req: EncodeRequest, f: int, limits: Limits) -> tuple[int, int, int]:
    shape, dtype = req.shape or (), req.dtype or "float32"
    if dtype == "uint8":
        if len(shape) not in (3, 4) or shape[-1] != 3:
            raise RejectedRequestError(
                f"uint8 images must be HWC or NHWC RGB, got shape {list(shape)}"
            )
        batch, height, width = (1, *shape[:2]) if len(shape) == 3 else shape[:3]
    else:
        if len(shape) not in (3, 4) or shape[-3] != 3:
            raise RejectedRequestError(
                f"float images must be CHW or NCHW RGB, got shape {list(shape)}"
            )
        batch, height, width = (1, *shape[1:]) if len(shape) == 3 else (shape[0], *shape[2:])
    if 0 in shape:
        raise RejectedRequestError(f"empty image tensor, shape {list(shape)}")
    check_size(batch, height, width, limits)
    if height % f or width % f:
        raise RejectedRequestError(f"image size {width}x{height} must be a multiple of {f}")
    return batch, height, width


def encode_size(
    body: Body | None, req: EncodeRequest, card: ModelCard, limits: Limits
) -> tuple[int, int, int] | None:
    """(batch, height, width) of the images of an encode request: from the parameters of a tensor
    (`body` may be None: not read yet), from an image's header otherwise (None when unreadable:
    `read_images` says why). Refused when beyond the limits."""
    if req.shape is not None:
        return _tensor_size(req, card.spatial_factor, limits)
    if body is None:
        return None
    try:  # the header is near the start; probing the prefix avoids copying a large body
        info = image.probe_image(memoryview(body)[: 1 << 20])
    except ValueError:
        try:
            info = image.probe_image(body)
        except ValueError:
            return None
    check_size(1, info.height, info.width, limits)
    return 1, info.height, info.width


def _image_tensor(body: Body, req: EncodeRequest, f: int, limits: Limits) -> np.ndarray:
    shape, dtype = req.shape or (), req.dtype or "float32"
    batch, height, width = _tensor_size(req, f, limits)
    array = wire.from_wire(body, shape, dtype)
    if dtype == "uint8":
        return processing.preprocess(array)
    x = array.astype(np.float32).reshape(batch, 3, height, width)
    if not np.isfinite(x).all():
        raise RejectedRequestError("image tensor contains NaN or infinity")
    if req.input_range == "0,1" or (req.input_range == "auto" and x.min() >= 0):
        x = x * 2 - 1  # [0, 1] as torchvision and PIL-to-tensor give it
    return x


def read_images(body: Body, req: EncodeRequest, card: ModelCard, limits: Limits) -> np.ndarray:
    """The request's images as float32 NCHW in [-1, 1], sides multiples of the spatial factor."""
    f = card.spatial_factor
    if req.shape is not None:
        return _image_tensor(body, req, f, limits)
    try:
        pixels = image.decode_image(body, max_pixels=limits.max_pixels)
    except ImageTooLargeError as e:
        raise too_large(str(e)) from None
    return processing.preprocess(_fit(pixels, req, f))


def noise(req: EncodeRequest, shape: tuple[int, ...]) -> np.ndarray:
    """The posterior noise the engine draws for `seed` (numpy's generator), for one request."""
    return np.random.default_rng(req.seed).standard_normal(shape, np.float32)


def encode_response(latents: np.ndarray, req: EncodeRequest) -> TensorResponse:
    """Unscaled engine latents, scaled as the request asked (moments are never scaled)."""
    with np.errstate(over="ignore"):  # huge factors give inf, as the caller asked
        latents = latents if req.moments else req.scaling.apply(latents)
    dtype = req.output_dtype or (req.dtype if req.dtype in FLOAT_DTYPES else "float32")
    return _tensor(latents, dtype)
