"""The exceptions vaelink raises. Every one derives from `VaelinkError`; bad-input errors are also
`ValueError`s, so code that already catches `ValueError` keeps working."""

from __future__ import annotations

__all__ = [
    "DecodeError",
    "EncodeError",
    "FormatError",
    "ImageTooLargeError",
    "InvalidEndpointError",
    "RemoteAuthError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteRequestError",
    "RemoteTimeoutError",
    "RemoteUnavailableError",
    "TensorError",
    "VaelinkError",
]


class VaelinkError(Exception):
    """Base class of every vaelink error."""


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


class RemoteError(VaelinkError, RuntimeError):
    """A remote endpoint failed: it could not be reached, did not answer in time, or answered with
    an error. `status` is the HTTP status (None when there was no answer), `message` the server's
    own words (the `error` of its JSON body) or the transport's, `url` the endpoint, `retry_after`
    the seconds the server asked to wait (429/503), `attempts` the tries made, retries included.

    A `RuntimeError` too, as diffusers' `remote_encode`/`remote_decode` raise."""

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
    """The endpoint did not answer within the read timeout."""


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

_KIND_ERRORS: dict[str, type[VaelinkError]] = {
    "connect": RemoteConnectionError,
    "timeout": RemoteTimeoutError,
    "invalid_url": InvalidEndpointError,
}


def remote_error(
    kind: str,
    message: str,
    status: int | None = None,
    url: str | None = None,
    retry_after: float | None = None,
    attempts: int = 1,
) -> VaelinkError:
    """The exception for a failure of the HTTP transport (called by the Rust core): `kind` is
    `status`, `connect`, `timeout`, `invalid_url`, `too_large` or `config`."""
    if kind == "status" and status is not None:
        cls: type[VaelinkError] = _STATUS_ERRORS.get(status, RemoteError)
    elif kind == "config":
        return VaelinkError(message)
    else:
        cls = _KIND_ERRORS.get(kind, RemoteError)
    if cls is InvalidEndpointError:
        return InvalidEndpointError(message)
    return cls(message, status, url, retry_after, attempts)  # type: ignore[call-arg]
