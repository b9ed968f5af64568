//! Password files in mosquitto's format, one `user:hash` per line:
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 (mosquitto 2.x), salt and 64-byte hash in
//!   standard base64;
//! - `$6$<salt>$<hash>`: SHA-512 of the password then the salt (mosquitto 1.x files).
//!
//! A file written by `mosquitto_passwd` works unchanged, and `outpost passwd` writes entries
//! mosquitto reads. Verification is constant-time in the hash, and an unknown user costs the
//! same PBKDF2 as a known one, so timing tells nothing about which users exist.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, pbkdf2, rand::SecureRandom};

use super::AuthError;

/// The iterations `outpost passwd` uses. mosquitto_passwd's default is 101; more costs a
/// login on a Pi about a millisecond and costs a stolen file's attacker 10x.
pub const ITERATIONS: u32 = 1000;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// A loaded password file.
#[derive(Debug, Clone, Default)]
pub struct Passwords {
    users: HashMap<String, Hash>,
    /// Checked for an unknown user: the kind and cost of the file's own entries (the most
    /// common), so that a wrong name takes as long as a wrong password.
    dummy: Option<Hash>,
}

impl Passwords {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        super::load_with(path, Self::parse)
    }

    /// Parses a file's text; an error names the 1-based line.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, entry) = line
                .split_once(':')
                .ok_or((n + 1, "expected `user:hash`".to_owned()))?;
            if user.is_empty() {
                return Err((n + 1, "empty user name".into()));
            }
            let hash = parse_hash(entry).map_err(|m| (n + 1, format!("user `{user}`: {m}")))?;
            users.insert(user.to_owned(), hash);
        }
        let dummy = dummy_like(users.values());
        Ok(Passwords { users, dummy })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. An empty password is never anyone's, as with
    /// mosquitto; every refusal costs what a real check costs.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match (self.users.get(user), &self.dummy) {
            (Some(h), _) => check(h, password) && !password.is_empty(),
            (None, Some(d)) => {
                let _ = check(d, password);
                false
            }
            (None, None) => false,
        }
    }
}

fn parse_hash(entry: &str) -> Result<Hash, String> {
    let parts: Vec<&str> = entry.split('$').collect();
    let b64 = |s: &str, what: &str| {
        B64.decode(s)
            .map_err(|e| format!("{what} is not base64: {e}"))
    };
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => {
            let iterations = iterations
                .parse::<u32>()
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or("iterations must be a positive number")?;
            let salt = b64(salt, "salt")?;
            let hash = b64(hash, "hash")?;
            if hash.len() != HASH_LEN {
                return Err(format!("a $7$ hash has {HASH_LEN} bytes, this one {}", hash.len()));
            }
            Ok(Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            })
        }
        ["", "6", salt, hash] => {
            let salt = b64(salt, "salt")?;
            let hash = b64(hash, "hash")?;
            if hash.len() != HASH_LEN {
                return Err(format!("a $6$ hash has {HASH_LEN} bytes, this one {}", hash.len()));
            }
            Ok(Hash::Sha512 { salt, hash })
        }
        _ => Err("not a mosquitto hash ($7$... or $6$...); plain-text files must go through mosquitto_passwd -U first".into()),
    }
}

/// A hash no password matches, as costly to check as the most common kind in `hashes`.
fn dummy_like<'a>(hashes: impl Iterator<Item = &'a Hash>) -> Option<Hash> {
    let mut costs: HashMap<Option<NonZeroU32>, usize> = HashMap::new();
    for h in hashes {
        let cost = match h {
            Hash::Pbkdf2 { iterations, .. } => Some(*iterations),
            Hash::Sha512 { .. } => None,
        };
        *costs.entry(cost).or_default() += 1;
    }
    let (cost, _) = costs.into_iter().max_by_key(|(c, n)| (*n, *c))?;
    Some(match cost {
        Some(iterations) => Hash::Pbkdf2 {
            iterations,
            salt: vec![0; SALT_LEN],
            hash: vec![0; HASH_LEN],
        },
        None => Hash::Sha512 {
            salt: vec![0; SALT_LEN],
            hash: vec![0; HASH_LEN],
        },
    })
}

fn check(h: &Hash, password: &[u8]) -> bool {
    match h {
        Hash::Pbkdf2 {
            iterations,
            salt,
            hash,
        } => pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA512,
            *iterations,
            salt,
            password,
            hash,
        )
        .is_ok(),
        Hash::Sha512 { salt, hash } => {
            let mut ctx = digest::Context::new(&digest::SHA512);
            ctx.update(password);
            ctx.update(salt);
            let got = ctx.finish();
            constant_eq(got.as_ref(), hash)
        }
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new `$7$` entry for `password`.
pub fn hash_entry(password: &[u8], rng: &dyn SecureRandom) -> Result<String, AuthError> {
    let mut salt = [0u8; SALT_LEN];
    rng.fill(&mut salt).map_err(|_| AuthError::Random)?;
    let mut hash = [0u8; HASH_LEN];
    let iterations = NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        &salt,
        password,
        &mut hash,
    );
    Ok(format!(
        "$7${ITERATIONS}${}${}",
        B64.encode(salt),
        B64.encode(hash)
    ))
}

/// `text` with `user`'s entry set to `entry`: replaced in place if present, else appended.
/// Other lines, comments included, are kept as they were.
pub fn set_user(text: &str, user: &str, entry: &str) -> String {
    let mut out = String::with_capacity(text.len() + entry.len() + user.len() + 2);
    let mut found = false;
    for line in text.lines() {
        if line.split_once(':').is_some_and(|(u, _)| u == user) && !line.starts_with('#') {
            if !found {
                out.push_str(&format!("{user}:{entry}\n"));
            }
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        out.push_str(&format!("{user}:{entry}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by mosquitto_passwd 2.0.11 (`-c -b pw alice secret`, then `-b pw bob 'p:ss wörd'`).
    const MOSQUITTO: &str = "alice:$7$101$c+xQm/sooJXcEdfU$v6DWKsp9tYxjIMvjSOcdkBA0Ezha/bQvfk3YgLlAX65A/p1hTZP0WdV98skmko24jlRrQAKRCdtKJYe6VtvIVg==\n\
bob:$7$101$A7UX1vIx8YNH1cmM$XPwBS6OPZXsKhoSeXGFn4Fs+gkiPVDl4IQZs19j445pysRsYjDYWJUZxFthRTwebunM/nFWCsPCRgefOuOrXIQ==\n";

    #[test]
    fn mosquitto_passwd_files_verify() {
        let p = Passwords::parse(MOSQUITTO).unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.verify("alice", b"secret"));
        assert!(!p.verify("alice", b"Secret"));
        assert!(!p.verify("alice", b""));
        assert!(p.verify("bob", "p:ss wörd".as_bytes()));
        assert!(!p.verify("carol", b"secret"));
    }

    /// Issue 18: an unknown user cost 1,000 iterations against the file's 101, so timing told
    /// which names exist. The dummy now has the file's own cost.
    #[test]
    fn an_unknown_user_costs_what_the_files_entries_cost() {
        let p = Passwords::parse(MOSQUITTO).unwrap();
        assert_eq!(
            p.dummy,
            Some(Hash::Pbkdf2 {
                iterations: NonZeroU32::new(101).unwrap(),
                salt: vec![0; SALT_LEN],
                hash: vec![0; HASH_LEN],
            })
        );
        let rng = ring::rand::SystemRandom::new();
        let mine = format!("x:{}\n", hash_entry(b"pw", &rng).unwrap());
        let p = Passwords::parse(&format!("{MOSQUITTO}{mine}")).unwrap();
        assert!(
            matches!(p.dummy, Some(Hash::Pbkdf2 { iterations, .. }) if iterations.get() == 101),
            "the most common cost"
        );
        let p =
            Passwords::parse(&format!("{mine}{}{}", mine.replace("x:", "y:"), MOSQUITTO)).unwrap();
        assert!(
            matches!(p.dummy, Some(Hash::Pbkdf2 { iterations, .. }) if iterations.get() == ITERATIONS),
            "a tie goes to the costlier"
        );
    }

    #[test]
    fn an_empty_password_is_refused_even_when_it_matches() {
        let rng = ring::rand::SystemRandom::new();
        let p = Passwords::parse(&format!("e:{}\n", hash_entry(b"", &rng).unwrap())).unwrap();
        assert!(!p.verify("e", b""));
    }

    #[test]
    fn old_sha512_entries_verify() {
        let salt = b"0123456789ab";
        let mut ctx = digest::Context::new(&digest::SHA512);
        ctx.update(b"pw");
        ctx.update(salt);
        let line = format!(
            "old:$6${}${}\n",
            B64.encode(salt),
            B64.encode(ctx.finish().as_ref())
        );
        let p = Passwords::parse(&line).unwrap();
        assert!(p.verify("old", b"pw"));
        assert!(!p.verify("old", b"pW"));
    }

    #[test]
    fn our_entries_round_trip_and_update_in_place() {
        let rng = ring::rand::SystemRandom::new();
        let e = hash_entry(b"hunter2", &rng).unwrap();
        assert!(e.starts_with("$7$1000$"));
        let text = set_user(MOSQUITTO, "alice", &e);
        let text = set_user(&text, "dave", &hash_entry(b"x", &rng).unwrap());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("alice:$7$1000$"), "updated in place");
        assert!(lines[1].starts_with("bob:$7$101$"), "others kept");
        let p = Passwords::parse(&text).unwrap();
        assert!(p.verify("alice", b"hunter2"));
        assert!(!p.verify("alice", b"secret"));
        assert!(p.verify("dave", b"x"));
        assert!(p.verify("bob", "p:ss wörd".as_bytes()));
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, line, needle) in [
            ("alice\n", 1, "user:hash"),
            ("# c\n\nbob:plain\n", 3, "not a mosquitto hash"),
            ("a:$7$0$AA==$AA==\n", 1, "iterations"),
            ("a:$7$101$!!$AA==\n", 1, "base64"),
            ("a:$7$101$AA==$AA==\n", 1, "64 bytes"),
            (":$7$101$AA==$AA==\n", 1, "empty user"),
        ] {
            let (l, m) = Passwords::parse(text).unwrap_err();
            assert_eq!(l, line, "{text:?}: {m}");
            assert!(m.contains(needle), "{text:?}: {m}");
        }
    }
}
