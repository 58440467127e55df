"""Type stubs for `vaelink._native`, the compiled Rust core. Use the typed wrappers in `vaelink.*`;
these functions expect contiguous arrays and pass bfloat16 as its uint16 bits."""

from collections.abc import Sequence
from typing import Self, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_ZSTD_LEVEL",
    "HttpClient",
    "bf16_to_f32",
    "check_wire_tensor",
    "compress_tensor",
    "decode_image",
    "decompress_tensor",
    "deserialize_safetensors",
    "encode_image",
    "f32_to_bf16",
    "fit_to_multiple",
    "group_stats",
    "pack_latents",
    "postprocess",
    "preprocess",
    "probe_image",
    "resize_image",
    "serialize_safetensors",
    "unpack_latents",
]

DEFAULT_MAX_PIXELS: int
DEFAULT_ZSTD_LEVEL: int

def decode_image(
    data: bytes, max_pixels: int, background: tuple[int, int, int] | None = None
) -> npt.NDArray[np.uint8]: ...
def probe_image(data: bytes) -> tuple[str, int, int]: ...
def encode_image(
    pixels: npt.NDArray[np.uint8],
    format: str,
    quality: int,
    png_level: int | None,
    subsampling: str = "4:2:0",
) -> bytes: ...
def fit_to_multiple(
    pixels: npt.NDArray[np.uint8], multiple: int, mode: str
) -> npt.NDArray[np.uint8]: ...
def preprocess(images: npt.NDArray[np.uint8], dtype: str) -> np.ndarray: ...
def resize_image(
    pixels: npt.NDArray[np.uint8], width: int, height: int
) -> npt.NDArray[np.uint8]: ...
def postprocess(tensor: np.ndarray) -> npt.NDArray[np.uint8]: ...
def f32_to_bf16(array: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]: ...
def bf16_to_f32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]: ...
def check_wire_tensor(shape: list[int], dtype: str, nbytes: int) -> list[int]: ...
def pack_latents(latents: np.ndarray) -> np.ndarray: ...
def unpack_latents(latents: np.ndarray, height: int, width: int) -> np.ndarray: ...
def compress_tensor(
    data: npt.NDArray[np.uint8], shape: list[int], dtype: str, level: int
) -> bytes: ...
def decompress_tensor(
    data: bytes, max_bytes: int
) -> tuple[npt.NDArray[np.uint8], list[int], str]: ...
def serialize_safetensors(
    tensors: Sequence[tuple[str, npt.NDArray[np.uint8], Sequence[int], str]],
    metadata: dict[str, str] | None = None,
) -> bytes: ...
def deserialize_safetensors(
    data: bytes,
) -> tuple[list[tuple[str, npt.NDArray[np.uint8], list[int], str]], dict[str, str]]: ...
def group_stats(
    x: npt.NDArray[np.float32], groups: int, eps: float, rows: tuple[int, int] | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...

@final
class HttpClient:
    """A pooled HTTP/1.1 + HTTP/2 client (rustls TLS, proxies from the environment) with
    retries: exponential backoff with jitter on connection errors, on a proxy's 500/502 (no JSON
    error body: its upstream was lost) and on `retry_statuses`, honouring `Retry-After` up to
    `max_retry_after` seconds. Thread-safe; requests release the GIL."""

    def __new__(
        cls,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float | None = ...,  # 300 s
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        jitter: float = 0.5,
        retry_statuses: list[int] = ...,
        retry_timeouts: bool = False,
        max_retry_after: float = 60.0,
        http2_prior_knowledge: bool = False,
        proxy: str | None = None,
        proxy_from_env: bool = True,
        pool_idle_timeout: float = 90.0,
        pool_max_idle_per_host: int = 32,
        max_response_bytes: int = ...,
        user_agent: str | None = None,
    ) -> Self: ...
    def request(
        self,
        method: str,
        url: str,
        query: list[tuple[str, str]] = ...,
        headers: list[tuple[str, str]] = ...,
        body: bytes | bytearray | None = None,
        token: str | None = None,
        *,
        timeout: float | None = None,
        max_response_bytes: int | None = None,
    ) -> tuple[int, dict[str, str], bytearray]:
        """`(status, headers, body)` of a 2xx answer; raises `vaelink.errors.RemoteError` (and
        subclasses) for error statuses and transport failures. `timeout`: seconds the whole call
        may take, every attempt and wait included (an attempt still running then is cut,
        `RemoteTimeoutError`; a retry that would end later is not started). `max_response_bytes`:
        a lower limit than the client's on this answer's body, checked before it is read
        (`RemoteResponseError`). A redirect loop is a `RemoteRedirectError`, not retried."""
        ...
