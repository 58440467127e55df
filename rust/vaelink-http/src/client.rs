//! The client: requests and responses, the pooled reqwest client on its own tokio runtime, and the
//! attempt loop that applies the retry policy.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER};

use crate::error::{error_chain, error_message, HttpError, HttpResult};
use crate::retry::{parse_retry_after, random_unit, Failure, RetryPolicy};

// -- requests and responses -----------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// One request: the query is appended to the URL (form-encoded, as Python's `requests` does).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Sent as `Authorization: Bearer <token>`, unless `headers` carry an Authorization already.
    pub token: Option<String>,
    /// When the whole request - every attempt, backoff and `Retry-After` wait - must be over. An
    /// attempt still running then is cut ([`HttpError::Timeout`]); a retry whose wait would end
    /// after it is not started (the last attempt's error is returned).
    pub deadline: Option<Instant>,
    /// A limit on the response body for this request (what it can legitimately return); the
    /// client's [`ClientConfig::max_response_bytes`] stays the upper bound.
    pub max_response_bytes: Option<u64>,
}

impl Request {
    pub fn get(url: impl Into<String>) -> Self {
        Self {
            method: Method::Get,
            url: url.into(),
            query: Vec::new(),
            headers: Vec::new(),
            body: Bytes::new(),
            token: None,
            deadline: None,
            max_response_bytes: None,
        }
    }

    pub fn post(url: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            method: Method::Post,
            body: body.into(),
            ..Self::get(url)
        }
    }

    pub fn query(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.query.push((key.into(), value.into()));
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The whole request must be over within `timeout` from now (see [`Request::deadline`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        // An absurdly long timeout (an overflowing Instant) is no deadline.
        self.deadline = Instant::now().checked_add(timeout);
        self
    }

    pub fn max_response_bytes(mut self, limit: u64) -> Self {
        self.max_response_bytes = Some(limit);
        self
    }
}

/// A successful (2xx) response. Header names are lower case, in the order received.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Attempts it took (1 when the first one succeeded).
    pub attempts: u32,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

// -- the client -----------------------------------------------------------------------------------

/// How a [`Client`] connects, waits and retries.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response (`None`: no limit).
    pub read_timeout: Option<Duration>,
    /// Longest time for one whole attempt (`None`: no limit).
    pub total_timeout: Option<Duration>,
    /// Idle keep-alive connections are closed after this.
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Speak HTTP/2 from the first byte (h2c to a plain-HTTP server that supports it). Over TLS,
    /// HTTP/2 is negotiated (ALPN) without this.
    pub http2_prior_knowledge: bool,
    /// Send every request through this proxy (`http://host:port`, credentials allowed in the URL).
    pub proxy: Option<String>,
    /// Otherwise use `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY` from the environment.
    pub proxy_from_env: bool,
    pub user_agent: String,
    pub retry: RetryPolicy,
    /// Larger response bodies are an error (a protection against a misbehaving server).
    pub max_response_bytes: u64,
    /// Threads of the runtime that drives connections.
    pub worker_threads: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Some(Duration::from_secs(300)),
            total_timeout: None,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 32,
            http2_prior_knowledge: false,
            proxy: None,
            proxy_from_env: true,
            user_agent: concat!("vaelink/", env!("CARGO_PKG_VERSION")).to_string(),
            retry: RetryPolicy::default(),
            max_response_bytes: 4 << 30,
            worker_threads: 2,
        }
    }
}

struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
}

/// A pooled HTTP client with retries. Cheap to share: clone it or put it in an `Arc`; requests may
/// be made from many threads at once. Must not be used from inside another tokio runtime.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Installs ring as rustls' process-wide crypto provider, unless one is installed already.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may win the race; either way a provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> HttpResult<Self> {
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .user_agent(config.user_agent.clone())
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::limited(5));
        if let Some(timeout) = config.read_timeout {
            builder = builder.read_timeout(timeout);
        }
        if let Some(timeout) = config.total_timeout {
            builder = builder.timeout(timeout);
        }
        if config.http2_prior_knowledge {
            builder = builder.http2_prior_knowledge();
        }
        if let Some(proxy) = &config.proxy {
            let proxy = reqwest::Proxy::all(proxy).map_err(|e| HttpError::InvalidUrl {
                url: proxy.clone(),
                message: error_chain(&e),
            })?;
            builder = builder.proxy(proxy);
        } else if !config.proxy_from_env {
            builder = builder.no_proxy();
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads.max(1))
            .thread_name("vaelink-http")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| HttpError::Config(e.to_string()))?;
        // Built inside the runtime: reqwest's connector may need its handle.
        let http = runtime
            .block_on(async { builder.build() })
            .map_err(|e| HttpError::Config(error_chain(&e)))?;
        Ok(Self {
            inner: Arc::new(Inner { http, config }),
            runtime: Arc::new(runtime),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Sends `request` (retrying as the policy says) and waits for the outcome.
    pub fn execute(&self, request: Request) -> HttpResult<Response> {
        self.start(request).wait()
    }

    /// Starts `request` on the client's runtime; the [`Pending`] handle waits for it (in slices, so
    /// that a caller can check for interruptions) or cancels it.
    pub fn start(&self, request: Request) -> Pending {
        let (tx, rx) = mpsc::sync_channel(1);
        let inner = Arc::clone(&self.inner);
        let task = self.runtime.spawn(async move {
            let _ = tx.send(inner.run(request).await);
        });
        Pending {
            rx,
            task,
            _runtime: Arc::clone(&self.runtime),
        }
    }
}

/// A request in flight. Dropping it cancels the request.
pub struct Pending {
    rx: mpsc::Receiver<HttpResult<Response>>,
    task: tokio::task::JoinHandle<()>,
    /// Keeps the runtime alive while the request is in flight, even if the client is dropped.
    _runtime: Arc<tokio::runtime::Runtime>,
}

impl Pending {
    /// Blocks until the request is done.
    pub fn wait(self) -> HttpResult<Response> {
        self.rx.recv().unwrap_or_else(|_| {
            Err(HttpError::Config(
                "the request task ended without an answer".into(),
            ))
        })
    }

    /// The outcome if it arrives within `timeout`; `None` to wait again (or cancel).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<HttpResult<Response>> {
        match self.rx.recv_timeout(timeout) {
            Ok(result) => Some(result),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(HttpError::Config(
                "the request task ended without an answer".into(),
            ))),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A URL for messages: without its query (long, and it may carry parameters nobody needs to read).
fn display_url(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// The attempt cut (or not started) because the request's deadline passed.
fn deadline_passed(url: &reqwest::Url) -> Attempt {
    Attempt {
        error: HttpError::Timeout {
            url: display_url(url),
            message: "the request's time limit passed".into(),
            attempts: 1,
        },
        failure: Failure::Timeout,
        retry_after: None,
    }
}

/// How an error answer counts for retrying: an upstream failure when a proxy, not the endpoint,
/// wrote it (a 500 or 502 without a JSON error body - every protocol endpoint answers JSON).
fn status_failure(status: u16, body: &[u8]) -> Failure {
    let from_endpoint =
        serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|value| value.is_object());
    if matches!(status, 500 | 502) && !from_endpoint {
        Failure::Upstream
    } else {
        Failure::Status(status)
    }
}

/// An attempt that went wrong, with what the retry policy needs to know about it.
struct Attempt {
    error: HttpError,
    failure: Failure,
    retry_after: Option<Duration>,
}

impl Inner {
    async fn run(&self, request: Request) -> HttpResult<Response> {
        let (url, headers) = self.prepare(&request)?;
        let limit = request
            .max_response_bytes
            .map_or(self.config.max_response_bytes, |n| {
                n.min(self.config.max_response_bytes)
            });
        let mut retries = 0;
        loop {
            let attempt = self.attempt(&request, &url, &headers, limit);
            let outcome = match request.deadline {
                // Checked first: `timeout_at` would still start an attempt past its deadline.
                Some(deadline) if Instant::now() >= deadline => Err(deadline_passed(&url)),
                // Dropping the cut attempt closes its connection.
                Some(deadline) => tokio::time::timeout_at(deadline.into(), attempt)
                    .await
                    .unwrap_or_else(|_| Err(deadline_passed(&url))),
                None => attempt.await,
            };
            match outcome {
                Ok(mut response) => {
                    response.attempts = retries + 1;
                    return Ok(response);
                }
                Err(attempt) => {
                    let delay = self
                        .config
                        .retry
                        .next_delay(retries, attempt.failure, attempt.retry_after, random_unit())
                        // A wait that ends past the deadline would only end in a timeout.
                        .filter(|delay| {
                            request
                                .deadline
                                .is_none_or(|deadline| Instant::now() + *delay < deadline)
                        });
                    match delay {
                        Some(delay) => tokio::time::sleep(delay).await,
                        None => return Err(attempt.error.with_attempts(retries + 1)),
                    }
                    retries += 1;
                }
            }
        }
    }

    /// The full URL and headers, built once for all attempts.
    fn prepare(&self, request: &Request) -> HttpResult<(reqwest::Url, HeaderMap)> {
        let invalid = |message: String| HttpError::InvalidUrl {
            url: request.url.clone(),
            message,
        };
        let mut url = reqwest::Url::parse(&request.url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!(
                "the scheme must be http or https, not {:?}",
                url.scheme()
            )));
        }
        if !request.query.is_empty() {
            url.query_pairs_mut().extend_pairs(&request.query);
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("bad header name {name:?}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid(format!("bad value for header {name}")))?;
            headers.append(name, value);
        }
        if let Some(token) = request.token.as_deref().filter(|t| !t.is_empty()) {
            if !headers.contains_key(AUTHORIZATION) {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                        invalid("the token has characters a header cannot carry".into())
                    })?;
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
        }
        Ok((url, headers))
    }

    async fn attempt(
        &self,
        request: &Request,
        url: &reqwest::Url,
        headers: &HeaderMap,
        limit: u64,
    ) -> Result<Response, Attempt> {
        let builder = match request.method {
            Method::Get => self.http.get(url.clone()),
            Method::Post => self.http.post(url.clone()).body(request.body.clone()),
        };
        let response = builder
            .headers(headers.clone())
            .send()
            .await
            .map_err(|e| self.transport_error(url, e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let header_list = response
            .headers()
            .iter()
            .map(|(name, value)| {
                let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_string(), text)
            })
            .collect();
        let body = self.read_body(url, response, limit).await?;
        if !(200..300).contains(&status) {
            return Err(Attempt {
                error: HttpError::Status {
                    url: display_url(url),
                    status,
                    message: error_message(status, &body),
                    retry_after,
                    attempts: 1,
                },
                failure: status_failure(status, &body),
                retry_after,
            });
        }
        Ok(Response {
            status,
            headers: header_list,
            body,
            attempts: 1,
        })
    }

    async fn read_body(
        &self,
        url: &reqwest::Url,
        mut response: reqwest::Response,
        limit: u64,
    ) -> Result<Bytes, Attempt> {
        // Checked before buffering: a declared length from the header, chunk by chunk otherwise,
        // so at most `limit` bytes plus one chunk are ever held.
        let too_large = || Attempt {
            error: HttpError::TooLarge {
                url: display_url(url),
                limit,
            },
            failure: Failure::Fatal,
            retry_after: None,
        };
        let declared = response.content_length();
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        // One allocation when the length is known (the common case); chunks appended otherwise.
        let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit) as usize);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(url, e))?
        {
            if body.is_empty() && declared == Some(chunk.len() as u64) {
                return Ok(chunk); // the whole body in one chunk: no copy
            }
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }

    fn transport_error(&self, url: &reqwest::Url, error: reqwest::Error) -> Attempt {
        let url = display_url(url);
        let (connect, timeout, builder, redirect) = (
            error.is_connect(),
            error.is_timeout(),
            error.is_builder(),
            error.is_redirect(),
        );
        let message = error_chain(&error.without_url());
        // Before `connect`: a redirect loop is a misconfigured endpoint, not a network failure.
        let (error, failure) = if redirect {
            (HttpError::Redirect { url, message }, Failure::Fatal)
        } else if connect {
            let e = HttpError::Connect {
                url,
                message,
                attempts: 1,
            };
            (e, Failure::Connect)
        } else if timeout {
            let e = HttpError::Timeout {
                url,
                message,
                attempts: 1,
            };
            (e, Failure::Timeout)
        } else if builder {
            (HttpError::InvalidUrl { url, message }, Failure::Fatal)
        } else {
            let e = HttpError::Transport {
                url,
                message,
                attempts: 1,
            };
            (e, Failure::Transport)
        };
        Attempt {
            error,
            failure,
            retry_after: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Mutex;
    use std::thread;

    // -- a loopback server answering canned responses ---------------------------------------------

    /// What the fake server saw of one request.
    #[derive(Debug, Clone)]
    struct Seen {
        request_line: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        connection: usize,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// A canned answer: status, headers, body.
    type Canned = (u16, Vec<(&'static str, String)>, Vec<u8>);

    /// Serves `responses` in order (raw HTTP/1.1 without the Content-Length, which is added), on
    /// keep-alive connections; records each request.
    struct FakeServer {
        url: String,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    fn read_request(reader: &mut BufReader<TcpStream>, connection: usize) -> Option<Seen> {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).ok()? == 0 {
            return None;
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).ok()?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':')?;
            headers.push((name.trim().to_lowercase(), value.trim().to_string()));
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        Some(Seen {
            request_line: request_line.trim_end().to_string(),
            headers,
            body,
            connection,
        })
    }

    impl FakeServer {
        fn start(responses: Vec<Canned>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/", listener.local_addr().unwrap());
            let seen = Arc::new(Mutex::new(Vec::new()));
            let responses = Arc::new(Mutex::new(responses.into_iter()));
            let log = Arc::clone(&seen);
            thread::spawn(move || {
                for (connection, stream) in listener.incoming().enumerate() {
                    let Ok(stream) = stream else { break };
                    let (log, responses) = (Arc::clone(&log), Arc::clone(&responses));
                    thread::spawn(move || {
                        let mut writer = stream.try_clone().unwrap();
                        let mut reader = BufReader::new(stream);
                        while let Some(seen) = read_request(&mut reader, connection) {
                            log.lock().unwrap().push(seen);
                            let next = responses.lock().unwrap().next();
                            let Some((status, headers, body)) = next else {
                                return; // out of answers: close the connection
                            };
                            let mut head = format!("HTTP/1.1 {status} X\r\n");
                            for (name, value) in headers {
                                head.push_str(&format!("{name}: {value}\r\n"));
                            }
                            head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                            writer.write_all(head.as_bytes()).unwrap();
                            writer.write_all(&body).unwrap();
                        }
                    });
                }
            });
            Self { url, seen }
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    fn fast_client() -> Client {
        Client::new(ClientConfig {
            retry: RetryPolicy {
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(20),
                ..RetryPolicy::default()
            },
            ..ClientConfig::default()
        })
        .unwrap()
    }

    fn ok(body: &[u8]) -> Canned {
        (200, vec![("shape", "[1,2]".into())], body.to_vec())
    }

    fn error(
        status: u16,
        extra: Vec<(&'static str, String)>,
    ) -> (u16, Vec<(&'static str, String)>, Vec<u8>) {
        let mut headers = vec![("content-type", "application/json".to_string())];
        headers.extend(extra);
        (status, headers, br#"{"error": "busy now"}"#.to_vec())
    }

    #[test]
    fn post_sends_query_headers_body_and_token_on_one_connection() {
        let server = FakeServer::start(vec![ok(b"abc"), ok(b"def")]);
        let client = Client::new(ClientConfig::default()).unwrap();
        let mut request = Request::post(server.url.clone(), b"\x00\x01body".to_vec())
            .query("shape", "1")
            .query("shape", "4")
            .query("scaling_factor", "0.18215")
            .query("note", "a b&c")
            .header("Content-Type", "tensor/binary");
        request.token = Some("s3cret".into());
        let response = client.execute(request.clone()).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(&response.body[..], b"abc");
        assert_eq!(response.header("Shape"), Some("[1,2]"));
        assert_eq!(response.attempts, 1);
        let second = client.execute(request).unwrap();
        assert_eq!(&second.body[..], b"def");
        let seen = server.seen();
        assert_eq!(
            seen[0].request_line,
            "POST /?shape=1&shape=4&scaling_factor=0.18215&note=a+b%26c HTTP/1.1"
        );
        assert_eq!(seen[0].body, b"\x00\x01body");
        assert_eq!(seen[0].header("content-type"), Some("tensor/binary"));
        assert_eq!(seen[0].header("authorization"), Some("Bearer s3cret"));
        assert!(seen[0]
            .header("user-agent")
            .unwrap()
            .starts_with("vaelink/"));
        assert_eq!(seen[1].connection, seen[0].connection, "keep-alive");
    }

    #[test]
    fn a_token_is_sent_only_with_the_requests_that_carry_one() {
        let server = FakeServer::start(vec![ok(b""), ok(b"")]);
        let client = fast_client();
        client.execute(Request::get(server.url.clone())).unwrap();
        let mut request = Request::get(server.url.clone());
        request.token = Some("per-call".into());
        client.execute(request).unwrap();
        let seen = server.seen();
        assert_eq!(seen[0].header("authorization"), None);
        assert_eq!(seen[1].header("authorization"), Some("Bearer per-call"));
    }

    #[test]
    fn retries_503_and_429_then_succeeds() {
        let server = FakeServer::start(vec![
            error(503, vec![]),
            error(429, vec![("retry-after", "0".into())]),
            ok(b"done"),
        ]);
        let response = fast_client()
            .execute(Request::post(server.url.clone(), b"x".to_vec()))
            .unwrap();
        assert_eq!(&response.body[..], b"done");
        assert_eq!(response.attempts, 3);
        let seen = server.seen();
        assert_eq!(seen.len(), 3);
        assert!(
            seen.iter().all(|s| s.body == b"x"),
            "the body is sent again"
        );
    }

    #[test]
    fn a_proxys_500_or_502_is_retried_the_endpoints_own_500_is_not() {
        let proxy = |status| {
            (
                status,
                vec![("content-type", "text/plain".to_string())],
                b"Internal Server Error".to_vec(),
            )
        };
        let server = FakeServer::start(vec![proxy(500), proxy(502), ok(b"done")]);
        let response = fast_client()
            .execute(Request::post(server.url.clone(), b"x".to_vec()))
            .unwrap();
        assert_eq!((&response.body[..], response.attempts), (&b"done"[..], 3));

        let server = FakeServer::start(vec![error(500, vec![]), ok(b"never")]);
        let err = fast_client()
            .execute(Request::post(server.url.clone(), b"x".to_vec()))
            .unwrap_err();
        assert!(
            matches!(
                err,
                HttpError::Status {
                    status: 500,
                    attempts: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(server.seen().len(), 1);
    }

    #[test]
    fn gives_up_after_the_retries_with_the_servers_message() {
        let server = FakeServer::start(vec![error(503, vec![]); 10]);
        let err = fast_client()
            .execute(Request::post(server.url.clone(), Vec::new()))
            .unwrap_err();
        match &err {
            HttpError::Status {
                status,
                message,
                attempts,
                ..
            } => {
                assert_eq!((*status, message.as_str(), *attempts), (503, "busy now", 4));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.status(), Some(503));
        assert_eq!(server.seen().len(), 4);
    }

    #[test]
    fn client_errors_are_not_retried() {
        let server = FakeServer::start(vec![error(400, vec![]), ok(b"")]);
        let request = Request::post(server.url.clone(), Vec::new()).query("shape", "1");
        let err = fast_client().execute(request).unwrap_err();
        assert_eq!(err.status(), Some(400));
        match &err {
            HttpError::Status { url, .. } => assert_eq!(url, &server.url, "no query in messages"),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().ends_with("answered 400: busy now"), "{err}");
        assert_eq!(server.seen().len(), 1);
    }

    #[test]
    fn a_long_retry_after_is_not_waited_for() {
        let server = FakeServer::start(vec![error(503, vec![("retry-after", "3600".into())])]);
        let start = std::time::Instant::now();
        let err = fast_client()
            .execute(Request::post(server.url.clone(), Vec::new()))
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        match err {
            HttpError::Status { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(3600)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_closed_port_is_a_connect_error_after_the_retries() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // the listener is dropped: nothing listens there now
        let err = fast_client()
            .execute(Request::get(format!("http://127.0.0.1:{port}/")))
            .unwrap_err();
        match err {
            HttpError::Connect { attempts, .. } => assert_eq!(attempts, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_connection_closed_without_an_answer_is_retried() {
        // The first connection is closed without an answer, the next one answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        thread::spawn(move || {
            let (first, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(first);
            read_request(&mut reader, 0);
            drop(reader);
            let (second, _) = listener.accept().unwrap();
            let mut writer = second.try_clone().unwrap();
            let mut reader = BufReader::new(second);
            read_request(&mut reader, 1);
            writer
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
        });
        let response = fast_client().execute(Request::get(url)).unwrap();
        assert_eq!(&response.body[..], b"ok");
        assert_eq!(response.attempts, 2);
    }

    #[test]
    fn read_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (done_tx, done_rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let _ = done_rx.recv(); // hold the connection open, answer nothing
            drop(stream);
        });
        let client = Client::new(ClientConfig {
            read_timeout: Some(Duration::from_millis(200)),
            ..ClientConfig::default()
        })
        .unwrap();
        let err = client.execute(Request::get(url)).unwrap_err();
        assert!(
            matches!(err, HttpError::Timeout { attempts: 1, .. }),
            "{err:?}"
        );
        done_tx.send(()).unwrap();
    }

    #[test]
    fn oversized_responses_are_refused() {
        let server = FakeServer::start(vec![ok(&[7; 100])]);
        let client = Client::new(ClientConfig {
            max_response_bytes: 99,
            ..ClientConfig::default()
        })
        .unwrap();
        let err = client
            .execute(Request::get(server.url.clone()))
            .unwrap_err();
        assert!(
            matches!(err, HttpError::TooLarge { limit: 99, .. }),
            "{err:?}"
        );
    }

    /// A loopback server that hands every connection to `handle` on its own thread.
    fn serve_raw(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let handle = Arc::new(handle);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let handle = Arc::clone(&handle);
                thread::spawn(move || handle(stream));
            }
        });
        url
    }

    #[test]
    fn the_deadline_cuts_a_trickling_answer() {
        // One byte a second never trips the read timeout; the deadline bounds the whole call.
        let url = serve_raw(|stream| {
            let mut writer = stream.try_clone().unwrap();
            read_request(&mut BufReader::new(stream), 0);
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n");
            for _ in 0..100 {
                if writer.write_all(b"x").is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        let client = Client::new(ClientConfig {
            read_timeout: Some(Duration::from_secs(1)),
            ..ClientConfig::default()
        })
        .unwrap();
        let start = Instant::now();
        let request = Request::get(url).timeout(Duration::from_millis(700));
        let err = client.execute(request).unwrap_err();
        let elapsed = start.elapsed();
        assert!(
            matches!(err, HttpError::Timeout { attempts: 1, .. }),
            "{err:?}"
        );
        assert!(elapsed >= Duration::from_millis(650), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn no_retry_is_started_that_would_end_past_the_deadline() {
        let server = FakeServer::start(vec![error(503, vec![("retry-after", "2".into())]); 5]);
        let start = Instant::now();
        let request = Request::get(server.url.clone()).timeout(Duration::from_secs(1));
        let err = fast_client().execute(request).unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(900));
        assert!(
            matches!(
                err,
                HttpError::Status {
                    status: 503,
                    attempts: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(server.seen().len(), 1);
        // Backoffs that fit are waited for, and the deadline still ends the call.
        let server = FakeServer::start(vec![error(503, vec![]); 1000]);
        let client = Client::new(ClientConfig {
            retry: RetryPolicy {
                max_retries: 1000,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(50),
                jitter: 0.0,
                ..RetryPolicy::default()
            },
            ..ClientConfig::default()
        })
        .unwrap();
        let start = Instant::now();
        let request = Request::get(server.url.clone()).timeout(Duration::from_millis(500));
        let err = client.execute(request).unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(600));
        assert_eq!(err.status(), Some(503));
        assert!(
            (3..=11).contains(&server.seen().len()),
            "{}",
            server.seen().len()
        );
    }

    #[test]
    fn a_passed_deadline_sends_nothing() {
        let server = FakeServer::start(vec![ok(b"")]);
        let request = Request::get(server.url.clone()).timeout(Duration::ZERO);
        let err = fast_client().execute(request).unwrap_err();
        assert!(matches!(err, HttpError::Timeout { .. }), "{err:?}");
        assert!(server.seen().is_empty());
    }

    #[test]
    fn a_request_can_lower_the_response_limit_but_not_raise_it() {
        let server = FakeServer::start(vec![ok(&[7; 100]); 3]);
        let client = Client::new(ClientConfig {
            max_response_bytes: 150,
            ..ClientConfig::default()
        })
        .unwrap();
        let small = Request::get(server.url.clone()).max_response_bytes(99);
        let err = client.execute(small).unwrap_err();
        assert!(
            matches!(err, HttpError::TooLarge { limit: 99, .. }),
            "{err:?}"
        );
        let exact = Request::get(server.url.clone()).max_response_bytes(100);
        assert_eq!(client.execute(exact).unwrap().body.len(), 100);
        let big = Request::get(server.url.clone()).max_response_bytes(1 << 40);
        assert_eq!(client.execute(big).unwrap().body.len(), 100);
        assert_eq!(server.seen().len(), 3, "not retried");
    }

    #[test]
    fn an_endless_body_is_cut_at_the_limit_without_reading_on() {
        // Chunked, no declared length: the client must stop at the limit, not buffer it all.
        let written = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&written);
        let url = serve_raw(move |stream| {
            let mut writer = stream.try_clone().unwrap();
            read_request(&mut BufReader::new(stream), 0);
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            writer.write_all(head).unwrap();
            let chunk = [b'x'; 1 << 16];
            let mut total = 0u64;
            while total < 1 << 30 {
                let framed = writer
                    .write_all(b"10000\r\n")
                    .and_then(|()| writer.write_all(&chunk))
                    .and_then(|()| writer.write_all(b"\r\n"));
                if framed.is_err() {
                    break;
                }
                total += chunk.len() as u64;
            }
            log.lock().unwrap().push(total);
        });
        let start = Instant::now();
        let request = Request::get(url).max_response_bytes(1 << 20);
        let err = fast_client().execute(request).unwrap_err();
        assert!(
            matches!(err, HttpError::TooLarge { limit, .. } if limit == 1 << 20),
            "{err:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        // The server finds the connection closed after the limit plus the socket buffers.
        let deadline = Instant::now() + Duration::from_secs(10);
        while written.lock().unwrap().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let written = written.lock().unwrap().clone();
        assert_eq!(written.len(), 1, "one connection: not retried");
        assert!(
            written[0] < 64 << 20,
            "the server wrote {} bytes",
            written[0]
        );
    }

    #[test]
    fn a_redirect_loop_is_its_own_error_and_not_retried() {
        let server =
            FakeServer::start(vec![(302, vec![("location", "/".into())], Vec::new()); 100]);
        let err = fast_client()
            .execute(Request::post(server.url.clone(), b"x".to_vec()))
            .unwrap_err();
        assert!(matches!(err, HttpError::Redirect { .. }), "{err:?}");
        assert!(err.to_string().contains("too many redirects"), "{err}");
        assert_eq!(
            server.seen().len(),
            6,
            "the request and five redirects, once"
        );
    }

    #[test]
    fn the_token_is_not_sent_to_another_origin_on_a_redirect() {
        let other = FakeServer::start(vec![ok(b"moved")]);
        let first = FakeServer::start(vec![(307, vec![("location", other.url.clone())], vec![])]);
        let mut request = Request::get(first.url.clone());
        request.token = Some("s3cret".into());
        let response = fast_client().execute(request).unwrap();
        assert_eq!(&response.body[..], b"moved");
        assert_eq!(
            first.seen()[0].header("authorization"),
            Some("Bearer s3cret")
        );
        assert_eq!(other.seen()[0].header("authorization"), None);
    }

    #[test]
    fn bad_urls() {
        let client = fast_client();
        for url in ["not a url", "ftp://example.com/", "file:///etc/passwd"] {
            let err = client.execute(Request::get(url)).unwrap_err();
            assert!(
                matches!(err, HttpError::InvalidUrl { .. }),
                "{url}: {err:?}"
            );
        }
        let bad_header = Request::get("http://127.0.0.1:1/").header("bad name", "x");
        assert!(matches!(
            client.execute(bad_header).unwrap_err(),
            HttpError::InvalidUrl { .. }
        ));
        let mut bad_token = Request::get("http://127.0.0.1:1/");
        bad_token.token = Some("line\nbreak".into());
        assert!(matches!(
            client.execute(bad_token).unwrap_err(),
            HttpError::InvalidUrl { .. }
        ));
    }

    #[test]
    fn requests_go_through_a_configured_proxy() {
        let proxy = FakeServer::start(vec![ok(b"via proxy")]);
        let client = Client::new(ClientConfig {
            proxy: Some(proxy.url.clone()),
            ..ClientConfig::default()
        })
        .unwrap();
        let request = Request::get("http://vae.example.invalid:8000/info").query("a", "1");
        let response = client.execute(request).unwrap();
        assert_eq!(&response.body[..], b"via proxy");
        let seen = proxy.seen();
        assert_eq!(
            seen[0].request_line,
            "GET http://vae.example.invalid:8000/info?a=1 HTTP/1.1"
        );
        let bad = ClientConfig {
            proxy: Some("::not a proxy".into()),
            ..ClientConfig::default()
        };
        assert!(matches!(
            Client::new(bad).unwrap_err(),
            HttpError::InvalidUrl { .. }
        ));
    }

    #[test]
    fn tls_is_set_up_and_a_failed_handshake_is_a_connect_error() {
        // A plain-HTTP server answering a TLS client hello: the handshake fails cleanly.
        let server = FakeServer::start(vec![]);
        let url = server.url.replace("http://", "https://");
        let client = Client::new(ClientConfig {
            retry: RetryPolicy::none(),
            ..ClientConfig::default()
        })
        .unwrap();
        let err = client.execute(Request::get(url)).unwrap_err();
        assert!(matches!(err, HttpError::Connect { .. }), "{err:?}");
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[test]
    fn pending_requests_can_be_polled_and_cancelled() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (closed_tx, closed_rx) = mpsc::channel::<usize>();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            read_request(&mut reader, 0);
            // Never answers; reports when the client has gone away.
            let mut rest = Vec::new();
            let n = reader.read_to_end(&mut rest).unwrap_or(0);
            let _ = closed_tx.send(n);
        });
        let client = fast_client();
        let pending = client.start(Request::get(url));
        assert!(pending.wait_timeout(Duration::from_millis(50)).is_none());
        drop(pending); // cancels: the connection is closed
        assert_eq!(closed_rx.recv_timeout(Duration::from_secs(5)), Ok(0));
    }
}
