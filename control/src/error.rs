//! Typed errors of the control plane.
//!
//! `ControlError` is what the appliance binary sees when it starts or stops the control thread:
//! every variant says whose fault it is (operator configuration, the environment, or a bug) so
//! `main` can print it and exit. Request-level failures never become a `ControlError`; they are
//! answered on the wire with the status codes of the wire reference.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Failure to configure, start or stop the control thread.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The configuration is invalid; each entry names the offending key.
    #[error("invalid control configuration: {}", .0.join("; "))]
    Config(Vec<String>),

    /// A file or directory could not be read, written or created.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A secret (shared key, KEK) could not be loaded.
    #[error("{0}")]
    Secret(String),

    /// A SQLite database could not be opened or migrated.
    #[error("database {path}: {message}")]
    Database { path: PathBuf, message: String },

    /// The key-encryption key is absent although the key store holds encrypted keys.
    #[error("key store {path}: {message}")]
    Kek { path: PathBuf, message: String },

    /// The HTTP listener could not be bound (address in use, permission denied, ...).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),

    /// The runtime or the thread could not be started, or the thread panicked.
    #[error("control thread: {0}")]
    Thread(String),
}

impl ControlError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ControlError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn db(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        ControlError::Database {
            path: path.into(),
            message: err.to_string(),
        }
    }
}
