"""Drop-in replacements for diffusers' `remote_encode` and `remote_decode`
(`diffusers.utils.remote_utils`, diffusers 0.42): the same arguments, the same requests' meaning
and the same return types, over vaelink's transport - pooled keep-alive connections, retries on
connection errors, 429 and 503, `Authorization: Bearer` from `VAELINK_TOKEN`/`HF_TOKEN` - with a
fast PNG encoder instead of Pillow's, and against a vaelink server raw pixels instead of a PNG.

    from vaelink.compat import remote_decode, remote_encode

Errors are `vaelink.errors.RemoteError`s, which are `RuntimeError`s as diffusers raises; their
`status` and `message` carry the server's answer. Needs torch (the tensors it takes and returns)
and Pillow."""

from __future__ import annotations

import functools
import io
import warnings
from typing import Any, Literal

import numpy as np

from .dtypes import is_bfloat16, little_endian
from .frameworks import is_torch, pil_images, pil_open, pil_to_rgb, to_numpy, torch
from .image import encode_image, fit_to_multiple
from .remote import RemoteEndpoint
from .wire import read_tensor

__all__ = ["detect_image_type", "remote_decode", "remote_encode"]


@functools.lru_cache(maxsize=32)
def _endpoint(url: str) -> RemoteEndpoint:
    """One per URL, so that `/info` is asked once a minute, not on every call."""
    return RemoteEndpoint(url)


def detect_image_type(data: bytes | bytearray) -> str:
    """The format name diffusers puts in `Image.format` (the same checks)."""
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    return "unknown"


def _tensor_body(tensor: Any) -> tuple[bytes, list[int], str]:
    """A torch tensor as diffusers sends it: contiguous little-endian bytes, shape, dtype name."""
    dtype = str(tensor.dtype).split(".")[-1]
    return little_endian(to_numpy(tensor)).tobytes(), list(tensor.shape), dtype


def _response_tensor(headers: dict[str, str], body: bytearray) -> Any:
    """The response tensor, on the received buffer itself (a writable bytearray: no copy)."""
    array = read_tensor(headers, body)
    if is_bfloat16(array.dtype):  # torch reads the bits itself
        return torch().frombuffer(body, dtype=torch().bfloat16).reshape(array.shape)
    return torch().from_numpy(array)


def _is_video_processor(processor: Any) -> bool:
    return hasattr(processor, "postprocess_video")


def _is_processor(processor: Any) -> bool:
    return processor is not None and hasattr(processor, "postprocess")


def remote_decode(
    endpoint: str,
    tensor: Any,
    processor: Any = None,
    do_scaling: bool = True,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    output_type: Literal["mp4", "pil", "pt"] = "pil",
    return_type: Literal["mp4", "pil", "pt"] = "pil",
    image_format: Literal["png", "jpg"] = "jpg",
    partial_postprocess: bool = False,
    input_tensor_type: Literal["binary"] = "binary",
    output_tensor_type: Literal["binary"] = "binary",
    height: int | None = None,
    width: int | None = None,
) -> Any:
    """diffusers' `remote_decode`, the same in and out: see its documentation."""
    if tensor.ndim == 3 and height is None and width is None:
        raise ValueError("`height` and `width` required for packed latents.")
    if (
        output_type == "pt"
        and return_type == "pil"
        and not partial_postprocess
        and not _is_processor(processor)
    ):
        raise ValueError("`processor` is required.")
    if do_scaling and scaling_factor is None:
        warnings.warn(
            "`do_scaling` is deprecated, pass `scaling_factor` and `shift_factor` if required.",
            FutureWarning,
            stacklevel=2,
        )
    body, shape, dtype = _tensor_body(tensor)
    params: dict[str, Any] = {
        "image_format": image_format,
        "output_type": output_type,
        "partial_postprocess": partial_postprocess,
        "shape": shape,
        "dtype": dtype,
    }
    if do_scaling and scaling_factor is not None:
        params["scaling_factor"] = scaling_factor
    if do_scaling and shift_factor is not None:
        params["shift_factor"] = shift_factor
    if do_scaling and scaling_factor is None:
        params["do_scaling"] = do_scaling
    if height is not None and width is not None:
        params["height"] = height
        params["width"] = width
    accept = "tensor/binary"
    if output_type == "pil" and processor is None:
        accept = {"jpg": "image/jpeg", "png": "image/png"}.get(image_format, accept)
    elif output_type == "mp4":
        accept = "text/plain"
    headers = {"Content-Type": "tensor/binary", "Accept": accept}
    response_headers, content = _endpoint(endpoint).post(params, body, headers)
    return _decode_result(
        response_headers, content, processor, output_type, return_type, partial_postprocess
    )


def _decode_result(
    headers: dict[str, str],
    content: bytearray,
    processor: Any,
    output_type: str,
    return_type: str,
    partial_postprocess: bool,
) -> Any:
    """What diffusers' `postprocess_decode` returns for the same response."""
    tensor: Any = None
    if output_type == "pt" or (output_type == "pil" and processor is not None):
        tensor = _response_tensor(headers, content)
    output: Any = None
    if output_type == "pt":
        if partial_postprocess:
            if return_type == "pil":
                images = pil_images(tensor.numpy())
                output = images[0] if len(images) == 1 else images
            elif return_type == "pt":
                output = tensor
        elif processor is None or return_type == "pt":
            output = tensor
        elif _is_video_processor(processor):
            output = processor.postprocess_video(tensor, output_type="pil")[0]
        else:
            output = processor.postprocess(tensor, output_type="pil")[0]
    elif output_type == "pil" and return_type == "pil" and processor is None:
        output = pil_open(content).convert("RGB")
        output.format = detect_image_type(content)
    elif output_type == "pil" and processor is not None:
        if return_type == "pil":
            pixels = (tensor.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
            output = pil_images(pixels)
        elif return_type == "pt":
            output = tensor
    elif output_type == "mp4" and return_type == "mp4":
        output = bytes(content)
    return output


# PIL modes whose `convert("RGB")` gives the pixels a server decodes from the PNG diffusers sends.
_RGB_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1")


def _raw_pixels_factor(target: RemoteEndpoint) -> int | None:
    """The spatial factor of the model a vaelink server taking raw pixels answers with, if it is
    certain (None: send a PNG)."""
    info = target.info()
    if info is None or not info.uint8_images:
        return None
    factor = (info.model(target.url) or {}).get("spatial_factor")
    return int(factor) if factor else None


def remote_encode(
    endpoint: str,
    image: Any,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
) -> Any:
    """diffusers' `remote_encode`, the same in and out: see its documentation."""
    params: dict[str, Any] = {}
    if scaling_factor is not None:
        params["scaling_factor"] = scaling_factor
    if shift_factor is not None:
        params["shift_factor"] = shift_factor
    target = _endpoint(endpoint)
    if is_torch(image):
        body, shape, dtype = _tensor_body(image)
        params |= {"shape": shape, "dtype": dtype}
    elif getattr(image, "mode", None) in _RGB_MODES:
        pixels = pil_to_rgb(image)
        factor = _raw_pixels_factor(target)
        if factor is not None and min(pixels.shape[:2]) >= factor:
            # A vaelink server takes the pixels raw; it would crop a PNG's to the factor the same.
            fitted = pixels
            if pixels.shape[0] % factor or pixels.shape[1] % factor:
                fitted = fit_to_multiple(pixels, factor, "crop")
            body = np.ascontiguousarray(fitted).tobytes()
            params |= {"shape": list(fitted.shape), "dtype": "uint8"}
        else:
            body = encode_image(pixels, "png")
    else:  # other modes (I;16, F, CMYK): exactly what diffusers sends
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        body = buffer.getvalue()
    headers, content = target.post(params, body)
    return _response_tensor(headers, content)
