//! Authentication and authorisation in mosquitto's file formats: password files
//! (`passwd`) and ACL files (`acl`). Both are parsed whole, so a reload can refuse a broken file
//! and keep the old one.

pub mod acl;
pub mod passwd;

use std::path::PathBuf;

use thiserror::Error;

pub use acl::{Access, Acl};
pub use passwd::Passwords;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
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
