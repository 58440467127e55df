//! `HttpClient`: vaelink-http's pooled, retrying HTTP client. Requests run with the GIL released; the
//! wait is sliced so that Ctrl-C interrupts it (and cancels the request).

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyByteArray, PyDict};
use vaelink_http::{Bytes, Client, ClientConfig, HttpError, Method, Request, RetryPolicy};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HttpClient>()
}

/// How often a waiting request checks for signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| PyValueError::new_err(format!("{name} must be seconds >= 0, got {value}")))
}

fn optional_seconds(name: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
    value.map(|v| seconds(name, v)).transpose()
}

/// The Python exception for a transport failure, built by `vaelink.errors.remote_error` (which holds
/// the status -> exception class table).
fn to_py(py: Python<'_>, error: HttpError) -> PyErr {
    let plural = |n: u32| if n == 1 { "" } else { "s" };
    let (kind, message, status, url, retry_after, attempts) = match error {
        HttpError::Status {
            url,
            status,
            message,
            retry_after,
            attempts,
        } => {
            let retry_after = retry_after.map(|d| d.as_secs_f64());
            (
                "status",
                message,
                Some(status),
                Some(url),
                retry_after,
                attempts,
            )
        }
        HttpError::Connect {
            url,
            message,
            attempts,
        } => {
            let text = format!(
                "cannot connect ({message}; {attempts} attempt{})",
                plural(attempts)
            );
            ("connect", text, None, Some(url), None, attempts)
        }
        HttpError::Transport {
            url,
            message,
            attempts,
        } => {
            let text = format!(
                "the connection failed ({message}; {attempts} attempt{})",
                plural(attempts)
            );
            ("connect", text, None, Some(url), None, attempts)
        }
        HttpError::Timeout {
            url,
            message,
            attempts,
        } => {
            let text = format!("no answer in time ({message})");
            ("timeout", text, None, Some(url), None, attempts)
        }
        HttpError::TooLarge { url, limit } => {
            let text = format!("the response exceeds {limit} bytes");
            ("too_large", text, None, Some(url), None, 1)
        }
        HttpError::Redirect { url, message } => {
            let text = format!("too many redirects (a loop?): {message}");
            ("redirect", text, None, Some(url), None, 1)
        }
        error @ HttpError::InvalidUrl { .. } => {
            ("invalid_url", error.to_string(), None, None, None, 1)
        }
        error @ HttpError::Config(_) => ("config", error.to_string(), None, None, None, 1),
    };
    let built = py
        .import("vaelink.errors")
        .and_then(|m| m.getattr("remote_error"))
        .and_then(|f| f.call1((kind, message, status, url, retry_after, attempts)));
    match built {
        Ok(exception) => PyErr::from_value(exception),
        Err(err) => err,
    }
}

/// A pooled HTTP/1.1 + HTTP/2 client with TLS (rustls), timeouts and retries. Thread-safe: share one.
#[pyclass(frozen, module = "vaelink._native")]
pub struct HttpClient {
    client: Client,
}

#[pymethods]
impl HttpClient {
    #[new]
    #[pyo3(signature = (
        *,
        connect_timeout = 10.0,
        read_timeout = Some(300.0),
        timeout = None,
        retries = 3,
        backoff = 0.25,
        max_backoff = 8.0,
        jitter = 0.5,
        retry_statuses = vec![429, 503],
        retry_timeouts = false,
        max_retry_after = 60.0,
        http2_prior_knowledge = false,
        proxy = None,
        proxy_from_env = true,
        pool_idle_timeout = 90.0,
        pool_max_idle_per_host = 32,
        max_response_bytes = 4 << 30,
        user_agent = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        connect_timeout: f64,
        read_timeout: Option<f64>,
        timeout: Option<f64>,
        retries: u32,
        backoff: f64,
        max_backoff: f64,
        jitter: f64,
        retry_statuses: Vec<u16>,
        retry_timeouts: bool,
        max_retry_after: f64,
        http2_prior_knowledge: bool,
        proxy: Option<String>,
        proxy_from_env: bool,
        pool_idle_timeout: f64,
        pool_max_idle_per_host: usize,
        max_response_bytes: u64,
        user_agent: Option<String>,
    ) -> PyResult<Self> {
        if !(0.0..=1.0).contains(&jitter) {
            return Err(PyValueError::new_err(format!(
                "jitter must be 0 to 1, got {jitter}"
            )));
        }
        let defaults = ClientConfig::default();
        let config = ClientConfig {
            connect_timeout: seconds("connect_timeout", connect_timeout)?,
            read_timeout: optional_seconds("read_timeout", read_timeout)?,
            total_timeout: optional_seconds("timeout", timeout)?,
            pool_idle_timeout: seconds("pool_idle_timeout", pool_idle_timeout)?,
            pool_max_idle_per_host,
            http2_prior_knowledge,
            proxy,
            proxy_from_env,
            user_agent: user_agent.unwrap_or(defaults.user_agent),
            retry: RetryPolicy {
                max_retries: retries,
                initial_backoff: seconds("backoff", backoff)?,
                max_backoff: seconds("max_backoff", max_backoff)?,
                jitter,
                retry_statuses,
                retry_connect: true,
                retry_timeouts,
                max_retry_after: seconds("max_retry_after", max_retry_after)?,
            },
            max_response_bytes,
            worker_threads: defaults.worker_threads,
        };
        let client = py
            .detach(|| Client::new(config))
            .map_err(|e| to_py(py, e))?;
        Ok(Self { client })
    }

    /// Sends one request; returns `(status, headers, body)` for a 2xx answer (header names lower
    /// case, repeated ones joined with ", "; the body a `bytearray`), raises `vaelink.errors.Remote*`
    /// otherwise. `token` is sent as `Authorization: Bearer <token>`. `timeout`: seconds the whole
    /// call may take, every attempt and wait included (0: none left, nothing is sent).
    /// `max_response_bytes`: a lower limit than the client's for this response body.
    #[pyo3(signature = (
        method, url, query = Vec::new(), headers = Vec::new(), body = None, token = None,
        *, timeout = None, max_response_bytes = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn request<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        url: String,
        query: Vec<(String, String)>,
        headers: Vec<(String, String)>,
        body: Option<PyBackedBytes>,
        token: Option<String>,
        timeout: Option<f64>,
        max_response_bytes: Option<u64>,
    ) -> PyResult<(u16, Bound<'py, PyDict>, Bound<'py, PyByteArray>)> {
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            other => {
                return Err(PyValueError::new_err(format!(
                    "method must be GET or POST, got {other}"
                )))
            }
        };
        let request = Request {
            method,
            url,
            query,
            headers,
            // The Python bytes object itself backs the body: no copy.
            body: body.map(Bytes::from_owner).unwrap_or_default(),
            token,
            deadline: None,
            max_response_bytes,
        };
        let request = match optional_seconds("timeout", timeout)? {
            Some(timeout) => request.timeout(timeout),
            None => request,
        };
        let mut pending = self.client.start(request);
        let outcome = loop {
            let (back, outcome) = py.detach(move || {
                let outcome = pending.wait_timeout(SIGNAL_CHECK);
                (pending, outcome)
            });
            pending = back;
            if let Some(outcome) = outcome {
                break outcome;
            }
            py.check_signals()?; // KeyboardInterrupt: `pending` is dropped, the request cancelled
        };
        let response = outcome.map_err(|e| to_py(py, e))?;
        let headers = PyDict::new(py);
        for (name, value) in &response.headers {
            let joined = match headers.get_item(name)? {
                Some(previous) => format!("{}, {value}", previous.extract::<String>()?),
                None => value.clone(),
            };
            headers.set_item(name, joined)?;
        }
        let body = PyByteArray::new(py, &response.body);
        Ok((response.status, headers, body))
    }

    fn __repr__(&self) -> String {
        let c = self.client.config();
        format!(
            "HttpClient(connect_timeout={:?}, read_timeout={:?}, retries={}, http2_prior_knowledge={})",
            c.connect_timeout.as_secs_f64(),
            c.read_timeout.map(|d| d.as_secs_f64()),
            c.retry.max_retries,
            c.http2_prior_knowledge
        )
    }
}
