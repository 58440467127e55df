//! What can go wrong with a request, and the words for it: the server's own message from an error
//! body, the chain of causes of a transport error.

use std::time::Duration;

/// What can go wrong with a request. `attempts` counts the tries made (retries included).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A URL that cannot be requested (bad syntax, or a scheme other than http/https).
    #[error("invalid URL {url:?}: {message}")]
    InvalidUrl { url: String, message: String },
    /// The client could not be built (TLS setup, runtime).
    #[error("cannot set up the HTTP client: {0}")]
    Config(String),
    /// No connection: refused, unreachable, DNS, TLS handshake, connect timeout.
    #[error("cannot connect to {url}: {message} (after {attempts} attempt{})", plural(*attempts))]
    Connect {
        url: String,
        message: String,
        attempts: u32,
    },
    /// The connection broke before the whole response arrived.
    #[error("connection to {url} failed: {message} (after {attempts} attempt{})", plural(*attempts))]
    Transport {
        url: String,
        message: String,
        attempts: u32,
    },
    /// No answer within the read timeout (or the total timeout).
    #[error("{url} did not answer in time: {message}")]
    Timeout {
        url: String,
        message: String,
        attempts: u32,
    },
    /// The endpoint answered with an error status; `message` is its own words.
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
        retry_after: Option<Duration>,
        attempts: u32,
    },
    /// A response body larger than the limit (the request's, or the client's).
    #[error("the response from {url} exceeds {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    /// Redirected more times than allowed: most likely a loop. Not retried.
    #[error("{url}: too many redirects (a loop?): {message}")]
    Redirect { url: String, message: String },
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

impl HttpError {
    /// The HTTP status, for errors that have one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn with_attempts(mut self, n: u32) -> Self {
        match &mut self {
            Self::Connect { attempts, .. }
            | Self::Transport { attempts, .. }
            | Self::Timeout { attempts, .. }
            | Self::Status { attempts, .. } => *attempts = n,
            _ => {}
        }
        self
    }
}

pub type HttpResult<T> = std::result::Result<T, HttpError>;

/// Longest server text kept in an error message.
const MAX_MESSAGE_CHARS: usize = 1000;

/// The server's own words for an error response: the protocol's `{"error": "..."}` (also FastAPI's
/// `detail` and a generic `message`), else a short text body, else the status's reason phrase.
pub fn error_message(status: u16, body: &[u8]) -> String {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) {
        for key in ["error", "detail", "message"] {
            match map.get(key) {
                Some(serde_json::Value::String(text)) => return truncate(text),
                Some(serde_json::Value::Null) | None => {}
                Some(other) => return truncate(&other.to_string()),
            }
        }
    }
    match std::str::from_utf8(body) {
        Ok(text) if !text.trim().is_empty() && !text.trim_start().starts_with('<') => {
            truncate(text.trim())
        }
        _ => reason(status),
    }
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

fn reason(status: u16) -> String {
    let phrase = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error");
    format!("{status} {phrase}")
}

/// An error with its sources, e.g. "error sending request: client error (Connect): Connection refused".
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(400, br#"{"error": "bad shape"}"#),
            "bad shape"
        );
        assert_eq!(
            error_message(422, br#"{"detail": [{"loc": 1}]}"#),
            r#"[{"loc":1}]"#
        );
        assert_eq!(error_message(500, br#"{"message": "boom"}"#), "boom");
        assert_eq!(error_message(502, b"upstream gone\n"), "upstream gone");
        assert_eq!(error_message(503, b""), "503 Service Unavailable");
        assert_eq!(
            error_message(404, b"<html><body>Not Found</body></html>"),
            "404 Not Found"
        );
        assert_eq!(
            error_message(500, &[0xff, 0xfe, 0x00]),
            "500 Internal Server Error"
        );
        assert_eq!(error_message(599, b""), "599 error");
        let long = format!(r#"{{"error": "{}"}}"#, "x".repeat(5000));
        let message = error_message(400, long.as_bytes());
        assert_eq!(message.len(), MAX_MESSAGE_CHARS + 3);
    }
}
