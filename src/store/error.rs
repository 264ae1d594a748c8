//! The store's error type: "could not find out / could not record", never an outcome.

use std::path::Path;

/// Why a store operation failed.
///
/// An outcome (a refused letter, an invalid receipt) is data in the tables, never one of
/// these. Messages are lower case and name the database file where it is known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite refused or failed; `op` says which store operation was running.
    #[error("database {path}: {op}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// The store operation, e.g. `"begin_attempt"`.
        op: &'static str,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer pecgate: its schema version is unknown here.
    #[error(
        "database {path}: schema version {found} is newer than this pecgate knows ({known}); \
         run the newer pecgate or restore a backup"
    )]
    TooNew {
        /// The database file.
        path: String,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// The number of migrations this binary has.
        known: i64,
    },
    /// The thing asked for does not exist (e.g. `dispatch 01J...`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request makes no sense for the data (unknown state name, a dispatch that is
    /// not in the state the operation needs, a malformed id).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store thread has stopped (closed, or its database could not be kept open).
    #[error("store is closed")]
    Closed,
    /// An operation sent to the store thread panicked; its transaction was rolled back.
    #[error("store operation panicked: {0}")]
    Panicked(String),
    /// The store thread could not be started.
    #[error("database {path}: starting the store thread: {source}")]
    Thread {
        /// The database file.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether SQLite gave up waiting for another connection's lock (after the 5 s busy
    /// timeout). Worth retrying later; nothing was written.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. }
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }

    /// Whether SQLite refused the write because it breaks a constraint (foreign key,
    /// uniqueness, CHECK, or the append-only triggers on `events`).
    pub fn is_constraint(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. }
                if e.code == rusqlite::ErrorCode::ConstraintViolation
        )
    }
}

/// Builds the `map_err` closure that adds the database path and the operation name.
pub(crate) fn sql(path: &str, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        op,
        source,
    }
}

/// The display form of a database path used in errors.
pub(crate) fn display_path(path: &Path) -> String {
    path.display().to_string()
}
