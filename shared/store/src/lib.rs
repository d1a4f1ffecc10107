//! Kindred's storage: the ports every adapter implements, the rules that
//! assemble what they read, and the identity pipeline that drives the
//! domain's resolution against any identity graph. The embedded (SQLite)
//! adapters are the `kindred-sqlite` crate, the DynamoDB ones `kindred-aws`.
//!
//! Data model: the DynamoDB single-table design of `ARCHITECTURE.md`;
//! the SQLite adapter keeps one table per item type of it.

pub mod accounts;
pub mod audit;
pub mod compute;
pub mod emf;
pub mod identity;
pub mod metrics;
pub mod ports;
pub mod priority;
pub mod privacy;
pub mod profile;
pub mod secret;
pub mod space;
pub mod sync;
pub mod token;

pub use ports::*;
pub use sync::*;

/// What can go wrong in a store. Internal details stay in the `source`
/// chain for logs; clients only ever see a generic message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A condition of a conditional write did not hold: re-read and re-plan.
    #[error("a condition of the write did not hold")]
    Conflict,
    #[error("already exists")]
    AlreadyExists,
    #[error("not found")]
    NotFound,
    /// The embedded store (SQLite) failed: only with the `sqlite` feature,
    /// which the `kindred-sqlite` adapter turns on.
    #[cfg(feature = "sqlite")]
    #[error("storage failure")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data could not be decoded")]
    Corrupt(#[from] serde_json::Error),
    #[error("stored data could not be decoded: {0}")]
    Undecodable(String),
    #[error("the store is shutting down")]
    Closed,
    /// A write failed a condition that was checked just before it in the
    /// same transaction: a bug, never retried.
    #[error("store invariant broken: {0}")]
    Invariant(&'static str),
    /// The client's request is wrong (names what): a 400, never retried.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The deployment lacks something it needs (a key, a setting): the
    /// operator's to fix, shown to the admin API's caller.
    #[error("not configured: {0}")]
    Config(String),
    /// The data directory is in a layout this build cannot use (written
    /// by a newer Kindred): says what to run instead.
    #[error("{0}")]
    DataFormat(String),
    /// A local file or thread could not be used.
    #[error("I/O failure")]
    Io(#[from] std::io::Error),
    /// A request the server built broke a limit of a storage service
    /// (too many writes for one transaction, a message SQS refused): a
    /// bug or a missing split, never the client's input.
    #[error("internal limit: {0}")]
    Internal(String),
    /// A definition that does not validate (names the bad field).
    #[error(transparent)]
    Definition(#[from] kindred_domain::compute::DefinitionError),
    /// A storage service (DynamoDB, SQS) failed or throttled: retryable.
    #[error("storage service failure: {0}")]
    Service(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A space id: 1-64 characters of `[A-Za-z0-9_-]`.
pub fn valid_space_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Wall-clock milliseconds, read only by adapters and binaries.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
