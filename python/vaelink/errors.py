"""Every exception vaelink raises, in one module. Bad-input errors are also `ValueError`s, so code
that already catches `ValueError` keeps working; failures of a remote endpoint are `RuntimeError`s,
as diffusers' own remote functions raise.

    VaelinkError
    ├── DecodeError (ValueError)             image bytes that cannot be decoded
    │   └── ImageTooLargeError               more pixels than allowed, from the header
    ├── EncodeError (ValueError)             pixels that cannot be encoded
    ├── TensorError (ValueError)             a bad shape, dtype, layout or byte length
    ├── NonFiniteOutputError (ValueError)    finite input the model turned into NaN or infinity
    ├── FormatError (ValueError)             a malformed compressed tensor or safetensors file
    ├── InvalidEndpointError (ValueError)    a URL that cannot be requested
    ├── OperationCancelledError              an engine call stopped by its `cancel` event
    ├── ModelError                           finding and loading a model
    │   ├── UnknownModelError (KeyError)     a name with no model card
    │   ├── ModelNotExportedError (FileNotFoundError)
    │   ├── CorruptExportError (ValueError)  an export that does not match its manifest
    │   ├── ModelMismatchError (ValueError)  a VAE that does not fit the card it is exported as
    │   ├── HubError                         the Hugging Face Hub could not give or take a repo's files
    │   └── EngineError (RuntimeError)       ONNX Runtime could not load or run a model
    │       ├── RuntimeMissingError (ImportError)  no ONNX Runtime (vaelink[cpu] or vaelink[gpu]),
    │       │                                or no OpenVINO for bfloat16 (vaelink[openvino])
    │       └── ProviderUnavailableError     provider="cuda" asked for and CUDA did not load, or
    │                                        dtype="bfloat16" on a CPU without it
    ├── RemoteError (RuntimeError)           an endpoint failed; `status`, `url`, `retry_after`
    │   ├── RemoteConnectionError            no connection, or it broke
    │   ├── RemoteTimeoutError               no answer in time
    │   ├── RemoteRequestError (ValueError)  the endpoint refused the request (400, 413, ...)
    │   ├── RemoteAuthError                  401, 403
    │   ├── RemoteUnavailableError           429, 503 after the retries
    │   ├── RemoteResponseError              a 2xx answer that is no valid answer, or too large
    │   └── RemoteRedirectError              too many redirects (a loop?)
    └── ServerError                          raised inside `vaelink serve`, answered as HTTP
        ├── RejectedRequestError (ValueError)  a request refused with its `status`
        ├── QueueFullError                   too many requests waiting (503, Retry-After)
        ├── ServerBusyError                  memory or work budget full for now (503, Retry-After)
        └── ShuttingDownError                the server stopped before the request ran

    VaelinkWarning (UserWarning)             worth knowing, not an error: a card and its source disagree
"""

from __future__ import annotations

__all__ = [
    "CorruptExportError",
    "DecodeError",
    "EncodeError",
    "EngineError",
    "FormatError",
    "HubError",
    "ImageTooLargeError",
    "InvalidEndpointError",
    "ModelError",
    "ModelMismatchError",
    "ModelNotExportedError",
    "NonFiniteOutputError",
    "OperationCancelledError",
    "ProviderUnavailableError",
    "QueueFullError",
    "RejectedRequestError",
    "RemoteAuthError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteRedirectError",
    "RemoteRequestError",
    "RemoteResponseError",
    "RemoteTimeoutError",
    "RemoteUnavailableError",
    "RuntimeMissingError",
    "ServerBusyError",
    "ServerError",
    "ShuttingDownError",
    "TensorError",
    "UnknownModelError",
    "VaelinkError",
    "VaelinkWarning",
]


class VaelinkError(Exception):
    """Base class of every vaelink error."""


# -- data -----------------------------------------------------------------------------------------


class DecodeError(VaelinkError, ValueError):
    """Image bytes that are empty, truncated, corrupt or of an unsupported format."""


class ImageTooLargeError(DecodeError):
    """An image whose header declares more pixels than `max_pixels` (checked before decoding)."""


class EncodeError(VaelinkError, ValueError):
    """Pixels that cannot be encoded with the requested format or settings."""


class TensorError(VaelinkError, ValueError):
    """A tensor with an inconsistent or unsupported shape, dtype, layout or byte length."""


class FormatError(VaelinkError, ValueError):
    """A compressed tensor or safetensors file that is malformed."""


class InvalidEndpointError(VaelinkError, ValueError):
    """An endpoint that cannot be requested: a malformed URL, a scheme other than http/https."""


# -- models ---------------------------------------------------------------------------------------


class ModelError(VaelinkError):
    """A model that cannot be found, loaded or run."""


class UnknownModelError(ModelError, KeyError):
    """A model name with no card."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelNotExportedError(ModelError, FileNotFoundError):
    """The model has a card but no export on this machine."""


class CorruptExportError(ModelError, ValueError):
    """An export whose files are missing, changed or not what the manifest says."""


class ModelMismatchError(ModelError, ValueError):
    """A VAE that does not fit the card it is exported or imported as: another architecture, other
    latent channels or another spatial factor (checked before anything is exported)."""


class HubError(ModelError):
    """The Hugging Face Hub could not give (or take) a repository's files: no such repository or
    revision, a gated or private one without a token, offline without a cached copy, a repository
    without the files vaelink needs, or an upload refused."""


class EngineError(ModelError, RuntimeError):
    """ONNX Runtime could not load or run a model."""


class RuntimeMissingError(EngineError, ImportError):
    """ONNX Runtime is not installed: the base install is the client, and the local engine needs
    one runtime, `pip install 'vaelink[cpu]'` (onnxruntime) or `'vaelink[gpu]'` (onnxruntime-gpu);
    or OpenVINO, for bfloat16 on the CPU, is not (`'vaelink[openvino]'`). `name` is the missing
    package, as for the ImportError it stands for."""

    def __init__(self, message: str, name: str = "onnxruntime") -> None:
        super().__init__(message)
        self.name = name


class ProviderUnavailableError(EngineError):
    """The CUDA execution provider was asked for and did not load: onnxruntime-gpu is missing, or
    ONNX Runtime could not load the CUDA or cuDNN libraries, or sees no GPU (`vaelink doctor` tells
    which). With `provider="auto"` the engine warns and runs on the CPU instead. Also raised for
    `dtype="bfloat16"` on a CPU without native bfloat16 (AVX512-BF16 or AMX)."""


# -- remote endpoints -----------------------------------------------------------------------------


class RemoteError(VaelinkError, RuntimeError):
    """A remote endpoint failed: it could not be reached, did not answer in time, or answered with
    an error. `status` is the HTTP status (None when there was no answer), `message` the server's
    own words (the `error` of its JSON body) or the transport's, `url` the endpoint, `retry_after`
    the seconds the server asked to wait (429/503), `attempts` the tries made, retries included."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        url: str | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, status, url, retry_after, attempts)
        self.message = message
        self.status = status
        self.url = url
        self.retry_after = retry_after
        self.attempts = attempts

    def __str__(self) -> str:
        where = f"{self.url} " if self.url else ""
        if self.status is not None:
            return f"{where}answered {self.status}: {self.message}"
        return f"{where.rstrip()}: {self.message}" if where else self.message


class RemoteConnectionError(RemoteError):
    """No connection could be made (refused, unreachable, DNS, TLS), or it broke mid-answer."""


class RemoteTimeoutError(RemoteError):
    """The endpoint did not answer in time."""


class RemoteRequestError(RemoteError, ValueError):
    """The endpoint refused the request itself (400, 413, 415, 422): bad or too large input."""


class RemoteAuthError(RemoteError):
    """The endpoint wants a (different) token: 401 or 403."""


class RemoteUnavailableError(RemoteError):
    """The endpoint is overloaded or down for now (429, 503), still so after the retries."""


class RemoteResponseError(RemoteError):
    """The endpoint answered 200 with something that is not a valid answer: no tensor (an HTML
    page), a body that does not match its shape header, a wrong shape or dtype, or a body larger
    than the request can legitimately return. Another endpoint may do better."""


class RemoteRedirectError(RemoteError):
    """The endpoint redirected more times than allowed: most likely a loop. Not retried."""


_STATUS_ERRORS: dict[int, type[RemoteError]] = {
    400: RemoteRequestError,
    401: RemoteAuthError,
    403: RemoteAuthError,
    413: RemoteRequestError,
    415: RemoteRequestError,
    422: RemoteRequestError,
    429: RemoteUnavailableError,
    503: RemoteUnavailableError,
}

_KIND_ERRORS: dict[str, type[RemoteError]] = {
    "connect": RemoteConnectionError,
    "timeout": RemoteTimeoutError,
    "too_large": RemoteResponseError,
    "redirect": RemoteRedirectError,
}


def remote_error(
    kind: str,
    message: str,
    status: int | None = None,
    url: str | None = None,
    retry_after: float | None = None,
    attempts: int = 1,
) -> VaelinkError:
    """The exception for a failure of the HTTP transport (called by the Rust bindings): `kind` is
    `status`, `connect`, `timeout`, `invalid_url`, `too_large`, `redirect` or `config`."""
    if kind == "invalid_url":
        return InvalidEndpointError(message)
    if kind == "config":
        return VaelinkError(message)
    if kind == "status" and status is not None:
        cls = _STATUS_ERRORS.get(status, RemoteError)
    else:
        cls = _KIND_ERRORS.get(kind, RemoteError)
    return cls(message, status, url, retry_after, attempts)


# -- the server -----------------------------------------------------------------------------------


class ServerError(VaelinkError):
    """Raised inside `vaelink serve` and answered as an HTTP error."""


class RejectedRequestError(ServerError, ValueError):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class QueueFullError(ServerError):
    """Too many requests are waiting; try again after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int = 1) -> None:
        super().__init__(f"server busy: {depth} requests waiting; retry later")
        self.retry_after = retry_after


class ShuttingDownError(ServerError):
    """The server stopped before the request ran."""


class NonFiniteOutputError(VaelinkError, ValueError):
    """Finite input that the model turns into NaN or infinity (latents far outside the range the
    model was trained on, say): an answer that would be garbage is refused instead."""


class OperationCancelledError(VaelinkError):
    """An engine call stopped between tiles or batch slices because its `cancel` event was set."""


class ServerBusyError(ServerError):
    """The server's memory or work budget is full for now; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class VaelinkWarning(UserWarning):
    """Something worth knowing that is not an error: a card whose constants disagree with its
    source's `config.json` (the source's are used)."""
