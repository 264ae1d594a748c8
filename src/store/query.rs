//! Read-only queries of the operator commands (issue 8): `pecgate status`,
//! `pecgate report`, and the consistent snapshot behind `pecgate backup`.
//!
//! [`Db::open_read_only`] opens the file without writing to it (no migration, `query_only`):
//! safe while the daemon runs, since WAL readers never block the writer.

use std::path::Path;
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags, params};

use super::db::Db;
use super::error::{StoreError, display_path, sql};
use super::{Result, SCHEMA_VERSION, time};
use jiff::Timestamp;

/// How long a reader waits for a lock (a checkpoint in progress).
const READ_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often [`Db::snapshot_to`] retries a step the source's lock refused.
const SNAPSHOT_RETRIES: u32 = 100;

/// Receipts of one mailbox with one disposition (`quarantined`, `orphan`…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptCount {
    /// The mailbox (of the archived message the receipt came in).
    pub mailbox: String,
    /// One of [`super::DISPOSITIONS`].
    pub disposition: String,
    /// How many.
    pub count: u64,
    /// When the newest was taken in.
    pub latest: Option<Timestamp>,
}

/// One recipient of a [`ReportLetter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRecipient {
    /// Lower case.
    pub address: String,
    /// One of [`super::RECIPIENT_STATES`].
    pub state: String,
    /// Whether the address is a PEC mailbox, when a receipt said so.
    pub certified: Option<bool>,
    /// Why, in words (the provider's error).
    pub detail: Option<String>,
}

/// A letter as `pecgate report` needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportLetter {
    /// The dispatch id.
    pub dispatch_id: String,
    /// The mailbox's short name.
    pub mailbox: String,
    /// The document kind.
    pub kind: String,
    /// The protocol number.
    pub protocol: Option<String>,
    /// One of [`super::DISPATCH_STATES`].
    pub state: String,
    /// When its first SMTP attempt started (the month of submission).
    pub submitted_at: Timestamp,
    /// In envelope order.
    pub recipients: Vec<ReportRecipient>,
}

impl Db {
    /// Opens an existing database for reading only: no migration, no write, `query_only`.
    /// Safe while the daemon runs. The file must have exactly this binary's schema.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when the file does not exist; [`StoreError::TooNew`]
    /// for a newer schema; [`StoreError::Invalid`] for an older one (the daemon
    /// migrates it when it starts); [`StoreError::Sqlite`] otherwise.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Db> {
        let path = path.as_ref();
        let p = display_path(path);
        if !path.is_file() {
            return Err(StoreError::NotFound(format!("database {p}")));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(&p, "open read-only"))?;
        conn.busy_timeout(READ_BUSY_TIMEOUT)
            .map_err(sql(&p, "open read-only: busy_timeout"))?;
        conn.pragma_update(None, "query_only", true)
            .map_err(sql(&p, "open read-only: query_only"))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql(&p, "open read-only: user_version"))?;
        let known = i64::from(SCHEMA_VERSION);
        if version > known {
            return Err(StoreError::TooNew {
                path: p,
                found: version,
                known,
            });
        }
        if version < known {
            return Err(StoreError::Invalid(format!(
                "database {p}: schema version {version} is older than this pecgate's \
                 ({known}); start the daemon once (it migrates the file), then retry"
            )));
        }
        Ok(Db { conn, path: p })
    }

    /// Writes a consistent copy of the whole database to the new file `dest` with
    /// SQLite's online backup API, in **one** step: the copy is the database as of one
    /// read transaction, and other connections (the daemon) keep writing meanwhile (WAL
    /// readers do not block writers, and a one-step copy is never restarted by them).
    /// The copy is switched to a rollback journal (one self-contained file) and checked
    /// with `PRAGMA quick_check`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] when `dest` exists or the copy fails its check;
    /// [`StoreError::Sqlite`] otherwise.
    pub fn snapshot_to(&self, dest: impl AsRef<Path>) -> Result<()> {
        const OP: &str = "snapshot";
        let dest = dest.as_ref();
        let d = display_path(dest);
        if dest.exists() {
            return Err(StoreError::Invalid(format!(
                "backup copy {d} already exists (refusing to overwrite it)"
            )));
        }
        let mut dst = Connection::open(dest).map_err(sql(&d, OP))?;
        {
            let backup = Backup::new(&self.conn, &mut dst).map_err(sql(&self.path, OP))?;
            let mut refused = 0;
            loop {
                match backup.step(-1).map_err(sql(&self.path, OP))? {
                    StepResult::Done => break,
                    StepResult::More => {}
                    _ => {
                        refused += 1;
                        if refused > SNAPSHOT_RETRIES {
                            return Err(StoreError::Invalid(format!(
                                "database {}: snapshot: still locked after {SNAPSHOT_RETRIES} \
                                 tries",
                                self.path
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        let mode: String = dst
            .pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
            .map_err(sql(&d, OP))?;
        if !mode.eq_ignore_ascii_case("delete") {
            return Err(StoreError::Invalid(format!(
                "backup copy {d}: journal_mode DELETE refused (kept {mode:?})"
            )));
        }
        let check: String = dst
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(sql(&d, OP))?;
        if check != "ok" {
            return Err(StoreError::Invalid(format!(
                "backup copy {d}: quick_check says {check:?}"
            )));
        }
        dst.close().map_err(|(_, e)| sql(&d, OP)(e))
    }

    /// Receipts by mailbox and disposition (for quarantined messages and orphans).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn receipt_counts(&self) -> Result<Vec<ReceiptCount>> {
        const OP: &str = "receipt_counts";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT m.mailbox, r.disposition, count(*), max(r.created_at) \
                 FROM receipts r JOIN messages m ON m.sha256 = r.message_sha256 \
                 GROUP BY m.mailbox, r.disposition ORDER BY m.mailbox, r.disposition",
            )
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ReceiptCount {
                    mailbox: r.get(0)?,
                    disposition: r.get(1)?,
                    count: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    latest: time::col_opt(r, 3)?,
                })
            })
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Ids of the dispatches of `mailbox` in `state`, oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn ids_in_state(&self, mailbox: &str, state: &str) -> Result<Vec<String>> {
        const OP: &str = "ids_in_state";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id FROM dispatches WHERE mailbox = ?1 AND state = ?2 \
                 ORDER BY created_at, id",
            )
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map([mailbox, state], |r| r.get(0))
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Every letter whose first SMTP attempt started in `[from, to)`, with its
    /// recipients, oldest first, from one consistent snapshot. Letters never submitted
    /// (still `queued`) are not in it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn report_letters(&self, from: Timestamp, to: Timestamp) -> Result<Vec<ReportLetter>> {
        const OP: &str = "report_letters";
        let path = &self.path;
        let snapshot = self.conn.unchecked_transaction().map_err(sql(path, OP))?;
        let mut out: Vec<ReportLetter> = Vec::new();
        {
            let mut stmt = snapshot
                .prepare(
                    "WITH first AS (SELECT dispatch_id, min(started_at) AS at FROM attempts \
                       GROUP BY dispatch_id) \
                     SELECT d.id, d.mailbox, d.kind, d.protocol, d.state, f.at, \
                            r.address, r.state, r.certified, r.detail \
                     FROM dispatches d JOIN first f ON f.dispatch_id = d.id \
                     LEFT JOIN recipients r ON r.dispatch_id = d.id \
                     WHERE f.at >= ?1 AND f.at < ?2 \
                     ORDER BY f.at, d.id, r.position",
                )
                .map_err(sql(path, OP))?;
            let mut rows = stmt
                .query(params![time::fmt(from), time::fmt(to)])
                .map_err(sql(path, OP))?;
            while let Some(r) = rows.next().map_err(sql(path, OP))? {
                let id: String = r.get(0).map_err(sql(path, OP))?;
                if out.last().is_none_or(|l| l.dispatch_id != id) {
                    out.push(ReportLetter {
                        dispatch_id: id,
                        mailbox: r.get(1).map_err(sql(path, OP))?,
                        kind: r.get(2).map_err(sql(path, OP))?,
                        protocol: r.get(3).map_err(sql(path, OP))?,
                        state: r.get(4).map_err(sql(path, OP))?,
                        submitted_at: time::col(r, 5).map_err(sql(path, OP))?,
                        recipients: Vec::new(),
                    });
                }
                let address: Option<String> = r.get(6).map_err(sql(path, OP))?;
                if let (Some(address), Some(letter)) = (address, out.last_mut()) {
                    letter.recipients.push(ReportRecipient {
                        address,
                        state: r.get(7).map_err(sql(path, OP))?,
                        certified: r
                            .get::<_, Option<i64>>(8)
                            .map_err(sql(path, OP))?
                            .map(|c| c != 0),
                        detail: r.get(9).map_err(sql(path, OP))?,
                    });
                }
            }
        }
        snapshot.commit().map_err(sql(path, OP))?;
        Ok(out)
    }
}
