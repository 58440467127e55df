"""Type stubs for `vaelink._native`, the compiled Rust core. Use the typed wrappers in `vaelink.*`;
these functions expect contiguous arrays and pass bfloat16 as its uint16 bits."""

import numpy as np
import numpy.typing as npt

DEFAULT_MAX_PIXELS: int
DEFAULT_ZSTD_LEVEL: int

def decode_image(
    data: bytes, max_pixels: int, background: tuple[int, int, int] | None = None
) -> npt.NDArray[np.uint8]: ...
def probe_image(data: bytes) -> tuple[str, int, int]: ...
def encode_image(
    pixels: npt.NDArray[np.uint8], format: str, quality: int, png_level: int | None
) -> bytes: ...
def fit_to_multiple(
    pixels: npt.NDArray[np.uint8], multiple: int, mode: str
) -> npt.NDArray[np.uint8]: ...
def preprocess(images: npt.NDArray[np.uint8], dtype: str) -> np.ndarray: ...
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
    tensors: list[tuple[str, npt.NDArray[np.uint8], list[int], str]],
    metadata: dict[str, str] | None = None,
) -> bytes: ...
def deserialize_safetensors(
    data: bytes,
) -> tuple[list[tuple[str, npt.NDArray[np.uint8], list[int], str]], dict[str, str]]: ...

class HttpClient:
    """A pooled HTTP/1.1 + HTTP/2 client (rustls TLS, proxies from the environment) with
    retries: exponential backoff with jitter on connection errors and `retry_statuses`, honouring
    `Retry-After` up to `max_retry_after` seconds. Thread-safe; requests release the GIL."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float | None = 300.0,
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
        token: str | None = None,
        token_from_env: bool = True,
        pool_idle_timeout: float = 90.0,
        pool_max_idle_per_host: int = 32,
        max_response_bytes: int = ...,
        user_agent: str | None = None,
    ) -> None: ...
    def request(
        self,
        method: str,
        url: str,
        query: list[tuple[str, str]] = ...,
        headers: list[tuple[str, str]] = ...,
        body: bytes | bytearray | None = None,
        token: str | None = None,
    ) -> tuple[int, dict[str, str], bytearray]:
        """`(status, headers, body)` of a 2xx answer; raises `vaelink.errors.RemoteError` (and
        subclasses) for error statuses and transport failures."""
        ...
