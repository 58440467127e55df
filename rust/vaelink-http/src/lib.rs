//! The HTTP transport vaelink's client uses to reach remote-VAE endpoints.
//!
//! A [`Client`] owns a small tokio runtime and a pooled reqwest client: keep-alive connections,
//! HTTP/1.1 and HTTP/2 (ALPN over TLS, or prior knowledge), TLS with rustls and the ring provider,
//! connect/read timeouts and the proxy environment variables (`HTTPS_PROXY`, `HTTP_PROXY`,
//! `ALL_PROXY`, `NO_PROXY`). Encode and decode requests are idempotent, so failed attempts are
//! retried by a [`RetryPolicy`]: exponential backoff with jitter on connection errors and on the
//! statuses that mean "try again later" (429, 503), honouring `Retry-After`.
//!
//! Every call returns a [`Response`] with a 2xx status or an [`HttpError`]; an error status carries
//! the server's message, parsed from the protocol's JSON error body (`{"error": "..."}`).
//!
//! A request carries its own bearer token ([`Request::token`]); which token goes to which endpoint is
//! the caller's policy (the Python package's), not the transport's.

mod client;
mod error;
mod retry;

pub use bytes::Bytes;
pub use client::{Client, ClientConfig, Method, Pending, Request, Response};
pub use error::{error_message, HttpError, HttpResult};
pub use retry::{parse_retry_after, Failure, RetryPolicy};
