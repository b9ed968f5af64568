//! Pacing for the uplink, sans-IO: the reconnect backoff and the rate limit. Time is passed in.

use std::time::{Duration, Instant};

/// Exponential backoff with full jitter between reconnect attempts, for ever: a bridge that
/// gives up is the failure users complain about most. Each delay is drawn from
/// [base/2, base], base = min * 2^attempt capped at max, so a fleet of gateways that lost the
/// same broker does not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let span = (base - half).as_millis() as u64;
        let jitter = if span == 0 {
            0
        } else {
            self.random() % (span + 1)
        };
        half + Duration::from_millis(jitter)
    }

    /// A connection succeeded: start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn random(&mut self) -> u64 {
        // xorshift64: jitter needs spread, not secrecy.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// A token bucket on messages and bytes per second; 0 is unlimited. The bucket holds one
/// second's worth, so a drain after an outage starts at the configured rate, not in a burst.
#[derive(Debug, Clone)]
pub struct RateLimit {
    msgs_per_s: f64,
    bytes_per_s: f64,
    msgs: f64,
    bytes: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(messages_per_s: u32, bytes_per_s: u64, now: Instant) -> Self {
        RateLimit {
            msgs_per_s: messages_per_s as f64,
            bytes_per_s: bytes_per_s as f64,
            msgs: messages_per_s as f64,
            bytes: bytes_per_s as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.msgs = (self.msgs + dt * self.msgs_per_s).min(self.msgs_per_s.max(1.0));
        self.bytes = (self.bytes + dt * self.bytes_per_s).min(self.bytes_per_s.max(1.0));
    }

    /// Takes one message of `len` bytes if the budget allows; otherwise says when it will.
    /// A message larger than a second's byte budget goes once the bucket is full, so it is
    /// slowed, never stuck.
    pub fn take(&mut self, now: Instant, len: usize) -> Result<(), Instant> {
        self.refill(now);
        let mut wait: f64 = 0.0;
        if self.msgs_per_s > 0.0 && self.msgs < 1.0 {
            wait = wait.max((1.0 - self.msgs) / self.msgs_per_s);
        }
        if self.bytes_per_s > 0.0 {
            let need = (len as f64).min(self.bytes_per_s);
            if self.bytes < need {
                wait = wait.max((need - self.bytes) / self.bytes_per_s);
            }
        }
        if wait > 0.0 {
            return Err(now + Duration::from_secs_f64(wait.max(0.001)));
        }
        if self.msgs_per_s > 0.0 {
            self.msgs -= 1.0;
        }
        if self.bytes_per_s > 0.0 {
            self.bytes -= (len as f64).min(self.bytes_per_s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300), 42);
        let d: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(500) && d[0] <= Duration::from_secs(1));
        assert!(d[3] >= Duration::from_secs(4) && d[3] <= Duration::from_secs(8));
        for x in &d[9..] {
            assert!(
                *x >= Duration::from_secs(150) && *x <= Duration::from_secs(300),
                "{x:?}"
            );
        }
        let mut other = Backoff::new(Duration::from_secs(1), Duration::from_secs(300), 7);
        let e: Vec<Duration> = (0..12).map(|_| other.next_delay()).collect();
        assert_ne!(d, e, "two gateways do not retry in lockstep");
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn rate_limit_paces_messages_and_bytes() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 0, t0);
        let sent = (0..100).filter(|_| r.take(t0, 100).is_ok()).count();
        assert_eq!(sent, 10, "one second's worth at once");
        let wake = r.take(t0, 100).unwrap_err();
        assert!(wake > t0 && wake <= t0 + Duration::from_millis(101));
        // Over 10 simulated seconds: 100 more.
        let mut n = 0;
        let mut t = t0;
        while t < t0 + Duration::from_secs(10) {
            t += Duration::from_millis(10);
            while r.take(t, 100).is_ok() {
                n += 1;
            }
        }
        assert!((99..=101).contains(&n), "{n}");
        let mut b = RateLimit::new(0, 1000, t0);
        assert!(b.take(t0, 600).is_ok());
        assert!(b.take(t0, 600).is_err());
        assert!(b.take(t0 + Duration::from_millis(300), 600).is_ok());
        let mut big = RateLimit::new(0, 1000, t0);
        assert!(
            big.take(t0, 5000).is_ok(),
            "an oversized message is slowed, not stuck"
        );
        let mut free = RateLimit::new(0, 0, t0);
        assert!((0..10_000).all(|_| free.take(t0, 1 << 20).is_ok()));
    }
}
