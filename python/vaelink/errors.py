"""Every exception vaelink raises, in one module. Bad-input errors are also `ValueError`s, so code
that already catches `ValueError` keeps working; failures of a remote endpoint are `RuntimeError`s,
as diffusers' own remote functions raise.

    VaelinkError
    ├── DecodeError (ValueError)             image bytes that cannot be decoded
    │   └── ImageTooLargeError               more pixels than allowed, from the header
    ├── EncodeError (ValueError)             pixels that cannot be encoded
    ├── TensorError (ValueError)             a bad shape, dtype, layout or byte length
    ├── FormatError (ValueError)             a malformed compressed tensor or safetensors file
    ├── InvalidEndpointError (ValueError)    a URL that cannot be requested
    ├── ModelError                           finding and loading a model
    │   ├── UnknownModelError (KeyError)     a name with no model card
    │   ├── ModelNotExportedError (FileNotFoundError)
    │   ├── CorruptExportError (ValueError)  an export that does not match its manifest
    │   └── EngineError (RuntimeError)       ONNX Runtime could not load or run a model
    ├── RemoteError (RuntimeError)           an endpoint failed; `status`, `url`, `retry_after`
    │   ├── RemoteConnectionError            no connection, or it broke
    │   ├── RemoteTimeoutError               no answer in time
    │   ├── RemoteRequestError (ValueError)  the endpoint refused the request (400, 413, ...)
    │   ├── RemoteAuthError                  401, 403
    │   └── RemoteUnavailableError           429, 503 after the retries
    └── ServerError                          raised inside `vaelink serve`, answered as HTTP
        ├── RejectedRequestError (ValueError)  a request refused with its `status`
        ├── QueueFullError                   too many requests waiting (503, Retry-After)
        └── ShuttingDownError                the server stopped before the request ran
"""

from __future__ import annotations

__all__ = [
    "CorruptExportError",
    "DecodeError",
    "EncodeError",
    "EngineError",
    "FormatError",
    "ImageTooLargeError",
    "InvalidEndpointError",
    "ModelError",
    "ModelNotExportedError",
    "QueueFullError",
    "RejectedRequestError",
    "RemoteAuthError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteRequestError",
    "RemoteTimeoutError",
    "RemoteUnavailableError",
    "ServerError",
    "ShuttingDownError",
    "TensorError",
    "UnknownModelError",
    "VaelinkError",
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


class EngineError(ModelError, RuntimeError):
    """ONNX Runtime could not load or run a model."""


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
    `status`, `connect`, `timeout`, `invalid_url`, `too_large` or `config`."""
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
