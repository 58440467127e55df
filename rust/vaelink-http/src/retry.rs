//! When to try a failed request again: exponential backoff with jitter, `Retry-After` honoured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection was made (the request never reached the server).
    Connect,
    /// The connection broke before a complete response.
    Transport,
    /// The read (or total) timeout expired.
    Timeout,
    /// A complete response with this error status.
    Status(u16),
    /// A 500 or 502 that is not the endpoint's own answer (no JSON error body): a proxy in front
    /// of it (a load balancer, Ray Serve's proxy) lost its upstream mid-request, as a broken
    /// connection would. Retried as one.
    Upstream,
    /// Something no retry can fix: a response over the size limit, a redirect loop, a request
    /// that cannot be built.
    Fatal,
}

/// When and how long to wait before trying a failed request again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: no retries).
    pub max_retries: u32,
    /// The wait before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// No backoff wait is longer than this.
    pub max_backoff: Duration,
    /// The share of each wait that is random, 0 to 1: the wait is drawn from
    /// `[(1 - jitter) * backoff, backoff]`, so that clients that failed together do not retry together.
    pub jitter: f64,
    /// Statuses worth retrying (by default 429 and 503: the server asks to come back later).
    pub retry_statuses: Vec<u16>,
    /// Connection errors and broken connections are retried (the requests are idempotent).
    pub retry_connect: bool,
    /// Timeouts are retried too (off by default: a slow answer would be asked for again).
    pub retry_timeouts: bool,
    /// A `Retry-After` longer than this is not waited for: the error is returned at once.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
            jitter: 0.5,
            retry_statuses: vec![429, 503],
            retry_connect: true,
            retry_timeouts: false,
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// Whether a failure of this kind is worth another attempt (retries left aside).
    pub fn is_retryable(&self, failure: Failure) -> bool {
        match failure {
            Failure::Connect | Failure::Transport | Failure::Upstream => self.retry_connect,
            Failure::Timeout => self.retry_timeouts,
            Failure::Status(status) => self.retry_statuses.contains(&status),
            Failure::Fatal => false,
        }
    }

    /// The backoff before retry number `retry` (0 for the first), with `unit` in [0, 1) choosing
    /// where in the jitter range it falls.
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let exponential = self
            .initial_backoff
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX));
        let capped = exponential.min(self.max_backoff);
        let jitter = self.jitter.clamp(0.0, 1.0);
        capped.mul_f64(1.0 - jitter * unit.clamp(0.0, 1.0))
    }

    /// How long to wait before the next attempt, or `None` to give up. `retries_done` counts the
    /// retries made so far; `retry_after` is the server's `Retry-After`, which is honoured (waited
    /// for at least) unless it is longer than `max_retry_after`.
    pub fn next_delay(
        &self,
        retries_done: u32,
        failure: Failure,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        if retries_done >= self.max_retries || !self.is_retryable(failure) {
            return None;
        }
        let backoff = self.backoff(retries_done, unit);
        match retry_after {
            Some(wait) if wait > self.max_retry_after => None,
            Some(wait) => Some(wait.max(backoff)),
            None => Some(backoff),
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds (`120`) or an HTTP date, relative to `now`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    if let Ok(seconds) = value.parse::<f64>() {
        // Not in the RFC, but some servers send fractions; negative or NaN mean "now".
        return Some(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::ZERO));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A uniform number in [0, 1) for jitter: splitmix64 over a process-wide counter seeded by the clock.
/// Not cryptographic; it only has to differ between clients and attempts.
pub(crate) fn random_unit() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.load(Ordering::Relaxed);
    if seed == 0 {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        seed = nanos ^ (u64::from(std::process::id()) << 32) | 1;
    }
    let next = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    STATE.store(next, Ordering::Relaxed);
    let mut z = next;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            jitter: 0.5,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_shortens_it() {
        let p = policy();
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(p.backoff(0, 0.0)), 100);
        assert_eq!(ms(p.backoff(1, 0.0)), 200);
        assert_eq!(ms(p.backoff(2, 0.0)), 400);
        assert_eq!(ms(p.backoff(4, 0.0)), 1000); // capped
        assert_eq!(ms(p.backoff(200, 0.0)), 1000); // no overflow
        assert_eq!(ms(p.backoff(1, 1.0)), 100); // half of it random: [100, 200]
        assert_eq!(ms(p.backoff(1, 0.5)), 150);
        let none = RetryPolicy {
            jitter: 0.0,
            ..policy()
        };
        assert_eq!(ms(none.backoff(1, 0.9)), 200);
    }

    #[test]
    fn random_units_are_in_range_and_vary() {
        let draws: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }

    #[test]
    fn what_is_retried() {
        let p = policy();
        assert!(p.next_delay(0, Failure::Connect, None, 0.0).is_some());
        assert!(p.next_delay(0, Failure::Transport, None, 0.0).is_some());
        assert!(p.next_delay(0, Failure::Status(503), None, 0.0).is_some());
        assert!(p.next_delay(0, Failure::Status(429), None, 0.0).is_some());
        assert!(p.next_delay(0, Failure::Timeout, None, 0.0).is_none());
        assert!(p.next_delay(0, Failure::Fatal, None, 0.0).is_none());
        for status in [400, 401, 404, 413, 500, 502] {
            assert!(p
                .next_delay(0, Failure::Status(status), None, 0.0)
                .is_none());
        }
        assert!(p.next_delay(2, Failure::Connect, None, 0.0).is_some());
        assert!(p.next_delay(3, Failure::Connect, None, 0.0).is_none()); // three retries done
        assert!(RetryPolicy::none()
            .next_delay(0, Failure::Connect, None, 0.0)
            .is_none());
        let timeouts = RetryPolicy {
            retry_timeouts: true,
            ..policy()
        };
        assert!(timeouts
            .next_delay(0, Failure::Timeout, None, 0.0)
            .is_some());
    }

    #[test]
    fn retry_after_is_honoured_within_its_limit() {
        let p = policy();
        let s = Duration::from_secs;
        assert_eq!(
            p.next_delay(0, Failure::Status(503), Some(s(3)), 0.0),
            Some(s(3))
        );
        // Never shorter than the backoff.
        let short = Some(Duration::from_millis(10));
        let delay = p.next_delay(0, Failure::Status(429), short, 0.0);
        assert_eq!(delay, Some(Duration::from_millis(100)));
        // Too long a wait: give up now and let the caller decide.
        assert_eq!(
            p.next_delay(0, Failure::Status(503), Some(s(61)), 0.0),
            None
        );
    }

    #[test]
    fn retry_after_values() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let parse = |v| parse_retry_after(v, now);
        assert_eq!(parse("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("-3"), Some(Duration::ZERO));
        let later = "Sun, 06 Nov 1994 08:50:07 GMT";
        assert_eq!(parse(later), Some(Duration::from_secs(30)));
        let earlier = "Sun, 06 Nov 1994 08:00:00 GMT";
        assert_eq!(parse(earlier), Some(Duration::ZERO));
        assert_eq!(parse("soon"), None);
    }
}
