//! Authentication and authorisation in mosquitto's file formats: password files
//! (`passwd`) and ACL files (`acl`). Both are parsed whole, so a reload can refuse a broken file
//! and keep the old one.

pub mod acl;
pub mod cert;
pub mod passwd;

use std::path::PathBuf;

use thiserror::Error;

pub use acl::{Access, Acl};
pub use passwd::Passwords;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        /// The error (shown in the message, so not also a `source`).
        error: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("the system random number generator failed")]
    Random,
}

/// Reads `path` and parses it with `parse`, naming the file in any error.
fn load_with<T>(
    path: &std::path::Path,
    parse: impl FnOnce(&str) -> Result<T, (usize, String)>,
) -> Result<T, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        error: source,
    })?;
    parse(&text).map_err(|(line, message)| AuthError::Invalid {
        path: path.to_owned(),
        line,
        message,
    })
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Credentials were given and are wrong (v5 0x86, 3.1.1 code 4).
    BadCredentials,
    /// None were given where they are required (v5 0x87, 3.1.1 code 5).
    NotAuthorized,
    /// The source's queue of attempts is full; not checked at all (v5 0x89 Server busy,
    /// 3.1.1 code 3 Server unavailable).
    Busy,
}

impl Refusal {
    /// The CONNACK code for `v5` or 3.1/3.1.1.
    pub fn code(self, v5: bool) -> u8 {
        match (self, v5) {
            (Refusal::BadCredentials, true) => 0x86,
            (Refusal::BadCredentials, false) => 4,
            (Refusal::NotAuthorized, true) => 0x87,
            (Refusal::NotAuthorized, false) => 5,
            (Refusal::Busy, true) => 0x89,
            (Refusal::Busy, false) => 3,
        }
    }
}

/// Whether a CONNECT may log in, as mosquitto decides: a user name is checked against the
/// password file whenever there is one; without a user name, only where anonymous access is
/// allowed. Without a password file any user name is taken as given (there is nothing to check
/// it against), unless the listener refuses anonymous clients, which config validation forbids.
pub fn decide(
    passwords: Option<&Passwords>,
    allow_anonymous: bool,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> Result<(), Refusal> {
    match (username, passwords) {
        (Some(u), Some(p)) => {
            if p.verify(u, password.unwrap_or_default()) {
                Ok(())
            } else {
                Err(Refusal::BadCredentials)
            }
        }
        (Some(_), None) if allow_anonymous => Ok(()),
        (Some(_), None) => Err(Refusal::BadCredentials),
        (None, _) if allow_anonymous => Ok(()),
        (None, _) => Err(Refusal::NotAuthorized),
    }
}

/// Slows down a source address that keeps failing to log in: after the n-th failure in a row
/// its attempts are looked at no more often than one per `BASE << (n-1)` (at most `MAX`),
/// however many connections it opens at once: each attempt reserves the next slot before its
/// password is checked. A success clears it. Sans-IO: time is an argument.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Failures in a row, when the next attempt may be looked at, and attempts booked and not
    /// yet decided.
    sources: std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant, u32)>,
}

impl Throttle {
    pub const BASE: std::time::Duration = std::time::Duration::from_millis(250);
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(30);
    /// Sources remembered; past it the table starts afresh (an attacker with that many
    /// addresses is not slowed by a table anyway).
    const CAPACITY: usize = 10_000;

    fn delay(failures: u32) -> std::time::Duration {
        if failures == 0 {
            return std::time::Duration::ZERO;
        }
        Self::BASE
            .checked_mul(1u32 << (failures - 1).min(16))
            .unwrap_or(Self::MAX)
            .min(Self::MAX)
    }

    /// Books an attempt from `ip` at `now`: returns when it may be looked at, if it must wait,
    /// and moves the source's next slot on. A booked attempt counts as the failure it will
    /// most likely be, so attempts booked together are spaced by the doubling delay, exactly
    /// as one socket trying again after each failure would be: opening more sockets buys no
    /// more guesses. The queue reaches at most `MAX` ahead: past that the attempt is refused
    /// unbooked (`Err(Refusal::Busy)`), so a failing source cannot hold connections waiting.
    pub fn reserve(
        &mut self,
        ip: std::net::IpAddr,
        now: std::time::Instant,
    ) -> Result<Option<std::time::Instant>, Refusal> {
        let Some((failures, next, booked)) = self.sources.get_mut(&ip) else {
            return Ok(None);
        };
        let at = (*next).max(now);
        if at > now + Self::MAX {
            return Err(Refusal::Busy);
        }
        *booked = booked.saturating_add(1);
        *next = at + Self::delay(failures.saturating_add(*booked));
        Ok((at > now).then_some(at))
    }

    /// Records a failure at `now`; returns the failures in a row.
    pub fn failed(&mut self, ip: std::net::IpAddr, now: std::time::Instant) -> u32 {
        if self.sources.len() >= Self::CAPACITY && !self.sources.contains_key(&ip) {
            self.sources.clear();
        }
        let e = self.sources.entry(ip).or_insert((0, now, 0));
        e.0 = e.0.saturating_add(1);
        e.2 = e.2.saturating_sub(1);
        e.1 = e.1.max(now + Self::delay(e.0));
        e.0
    }

    pub fn succeeded(&mut self, ip: std::net::IpAddr) {
        self.sources.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn decisions() {
        let p = Passwords::parse(
            "alice:$7$101$c+xQm/sooJXcEdfU$v6DWKsp9tYxjIMvjSOcdkBA0Ezha/bQvfk3YgLlAX65A/p1hTZP0WdV98skmko24jlRrQAKRCdtKJYe6VtvIVg==\n",
        )
        .unwrap();
        let ok = Some(&b"secret"[..]);
        assert_eq!(decide(Some(&p), false, Some("alice"), ok), Ok(()));
        assert_eq!(decide(Some(&p), true, Some("alice"), ok), Ok(()));
        let bad = Err(Refusal::BadCredentials);
        assert_eq!(decide(Some(&p), true, Some("alice"), Some(b"x")), bad);
        assert_eq!(decide(Some(&p), true, Some("alice"), None), bad);
        assert_eq!(decide(Some(&p), true, Some("mallory"), ok), bad);
        assert_eq!(decide(Some(&p), true, None, None), Ok(()));
        assert_eq!(
            decide(Some(&p), false, None, None),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(decide(None, true, Some("anyone"), None), Ok(()));
        assert_eq!(Refusal::BadCredentials.code(true), 0x86);
        assert_eq!(Refusal::NotAuthorized.code(false), 5);
        assert_eq!(Refusal::Busy.code(true), 0x89);
    }

    #[test]
    fn throttle_doubles_and_clears() {
        let t0 = Instant::now();
        let ip = "10.0.0.9".parse().unwrap();
        let mut t = Throttle::default();
        assert_eq!(t.reserve(ip, t0), Ok(None));
        t.failed(ip, t0);
        assert_eq!(t.reserve(ip, t0), Ok(Some(t0 + Duration::from_millis(250))));
        t.failed(ip, t0);
        t.failed(ip, t0);
        // Three failures: one attempt per second from here.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(t.reserve(ip, t1), Ok(None));
        for _ in 0..40 {
            t.failed(ip, t1);
        }
        assert_eq!(t.reserve(ip, t1), Ok(Some(t1 + Throttle::MAX)));
        // One attempt already waits the whole MAX: the next is refused, not queued.
        assert_eq!(t.reserve(ip, t1), Err(Refusal::Busy));
        t.succeeded(ip);
        assert_eq!(t.reserve(ip, t1), Ok(None));
    }

    #[test]
    fn parallel_attempts_are_spaced_by_the_doubling_delay() {
        let t0 = Instant::now();
        let ip = "10.0.0.7".parse().unwrap();
        let other = "10.0.0.8".parse().unwrap();
        let mut t = Throttle::default();
        t.failed(ip, t0);
        t.failed(ip, t0);
        // Two failures: the next attempt after 500 ms; the ones booked with it as if each
        // before it had failed (issue 18: 8 sockets got 14 guesses in 12 s, one socket 6).
        let slots: Vec<_> = (0..5).map(|_| t.reserve(ip, t0)).collect();
        let want: Vec<_> = [500, 1500, 3500, 7500, 15500]
            .into_iter()
            .map(|ms| Ok(Some(t0 + Duration::from_millis(ms))))
            .collect();
        assert_eq!(slots, want);
        assert_eq!(
            t.reserve(ip, t0),
            Err(Refusal::Busy),
            "the next would wait past MAX"
        );
        // Sixteen sockets at once get no more checks in 20 s than one socket failing in turn.
        let mut t = Throttle::default();
        t.failed(ip, t0);
        let checked = (0..16)
            .filter_map(|_| t.reserve(ip, t0).ok())
            .filter(|at| at.map_or(true, |at| at <= t0 + Duration::from_secs(20)))
            .count();
        assert!(checked <= 6, "{checked} attempts checked within 20 s");
        // A failure in the meantime never pulls the queue forward.
        let before = t.reserve(ip, t0 + Duration::from_secs(40));
        t.failed(ip, t0);
        assert!(t.reserve(ip, t0 + Duration::from_secs(40)).unwrap() > before.unwrap());
        // Other sources are not held up.
        assert_eq!(t.reserve(other, t0), Ok(None));
    }

    #[test]
    fn a_one_socket_guesser_still_doubles() {
        let t0 = Instant::now();
        let ip = "10.0.0.6".parse().unwrap();
        let mut t = Throttle::default();
        let mut now = t0;
        let mut checks = 0;
        while now < t0 + Duration::from_secs(12) {
            if let Ok(at) = t.reserve(ip, now) {
                now = at.unwrap_or(now);
                checks += 1;
                t.failed(ip, now);
            }
        }
        assert!((5..=7).contains(&checks), "{checks} checks in 12 s");
    }
}
