//! [`Db`]: the synchronous store over one SQLite connection.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::error::{StoreError, display_path, sql};
use super::tx::Tx;
use super::{
    AttemptRow, DISPATCH_STATES, DispatchChange, DispatchDetail, DispatchRow, DocumentRow,
    EventRow, IncomingRow, MailboxState, MessageRow, NewDispatch, NewEvent, NewReceipt, ReceiptRow,
    RecipientChange, RecipientRow, Result, StateCount, chain, check_name, time,
};

/// The migrations, in order: `(name, SQL)`. Migration `i` (1-based) takes the file from
/// `user_version = i - 1` to `i`. Forward only: never edit or remove one that shipped;
/// add the next instead. A migration that rebuilds a table must keep foreign keys valid
/// (they stay ON; `PRAGMA foreign_key_check` runs after each migration).
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_schema", include_str!("migrations/0001_schema.sql")),
    (
        "0002_events_by_mailbox",
        include_str!("migrations/0002_events_by_mailbox.sql"),
    ),
    (
        "0003_retention",
        include_str!("migrations/0003_retention.sql"),
    ),
    (
        "0004_queue_order",
        include_str!("migrations/0004_queue_order.sql"),
    ),
    (
        "0005_recovered_attempts",
        include_str!("migrations/0005_recovered_attempts.sql"),
    ),
];

/// The schema version this binary writes: the number of [`MIGRATIONS`].
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// How long a writer waits for another connection's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection settings as SQLite reports them (for `pecgate status` and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pragmas {
    /// `wal`.
    pub journal_mode: String,
    /// 2 = FULL.
    pub synchronous: i64,
    /// Whether foreign keys are enforced.
    pub foreign_keys: bool,
    /// Milliseconds a writer waits for a lock.
    pub busy_timeout_ms: i64,
    /// The schema version (`PRAGMA user_version`).
    pub user_version: i64,
}

/// The store's synchronous API over one `rusqlite::Connection`.
///
/// Blocking: call it from the store thread ([`super::Store`]) or from a CLI command,
/// never from a tokio worker thread. Reads take `&self`; writes take `&mut self` and are
/// each one `BEGIN IMMEDIATE` transaction.
pub struct Db {
    /// The only connection this value uses.
    pub(super) conn: Connection,
    /// For error messages.
    pub(super) path: String,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Opens (creating if needed) the database at `path`, sets the connection up (WAL,
    /// `synchronous=FULL`, foreign keys, 5 s busy timeout) and applies every migration
    /// it lacks. Safe while another process has the same file open.
    ///
    /// # Errors
    ///
    /// [`StoreError::TooNew`] when the file's schema is newer than this binary;
    /// [`StoreError::Sqlite`] when it cannot be opened, is not a database, or WAL
    /// cannot be used there; [`StoreError::Invalid`] when WAL is refused.
    pub fn open(path: impl AsRef<Path>) -> Result<Db> {
        Self::open_at(path.as_ref(), SCHEMA_VERSION)
    }

    /// Like [`Db::open`] but migrates only up to `version` (which may be 0: an empty
    /// file with the pragmas set). Exists so that tests can build a file as an older
    /// pecgate left it; the typed operations assume the latest schema.
    ///
    /// # Errors
    ///
    /// As [`Db::open`]; [`StoreError::Invalid`] when `version` is above
    /// [`SCHEMA_VERSION`].
    pub fn open_at_version_for_tests(path: impl AsRef<Path>, version: u32) -> Result<Db> {
        if version > SCHEMA_VERSION {
            return Err(StoreError::Invalid(format!(
                "schema version {version} is above the latest ({SCHEMA_VERSION})"
            )));
        }
        Self::open_at(path.as_ref(), version)
    }

    fn open_at(path: &Path, target: u32) -> Result<Db> {
        let p = display_path(path);
        let conn = Connection::open(path).map_err(sql(&p, "open"))?;
        // First, so that the pragmas and migrations below wait for another process.
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql(&p, "open: busy_timeout"))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sql(&p, "open: journal_mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Invalid(format!(
                "database {p}: journal_mode WAL refused (SQLite kept {mode:?})"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql(&p, "open: synchronous"))?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(sql(&p, "open: foreign_keys"))?;
        let mut db = Db { conn, path: p };
        db.migrate(target)?;
        Ok(db)
    }

    /// Applies migrations until `user_version == target`, each in its own IMMEDIATE
    /// transaction that re-reads the version under the write lock (two processes opening
    /// an old file at once both succeed; the second finds nothing to do).
    fn migrate(&mut self, target: u32) -> Result<()> {
        const OP: &str = "migrate";
        let known = i64::from(SCHEMA_VERSION);
        loop {
            let path = &self.path;
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql(path, OP))?;
            let version: i64 = tx
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(sql(path, OP))?;
            if version > known {
                return Err(StoreError::TooNew {
                    path: path.clone(),
                    found: version,
                    known,
                });
            }
            if version >= i64::from(target) {
                tx.commit().map_err(sql(path, OP))?;
                return Ok(());
            }
            // 0 <= version < target <= MIGRATIONS.len(), so the index is in range.
            let (name, script) = MIGRATIONS[version as usize];
            tx.execute_batch(script)
                .map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    op: "migrate: apply",
                    source: with_name(source, name),
                })?;
            let dangling: Option<String> = tx
                .query_row(
                    "SELECT \"table\" FROM pragma_foreign_key_check LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql(path, OP))?;
            if let Some(table) = dangling {
                return Err(StoreError::Invalid(format!(
                    "database {path}: migration {name} leaves dangling foreign keys in {table}"
                )));
            }
            tx.pragma_update(None, "user_version", version + 1)
                .map_err(sql(path, OP))?;
            tx.commit().map_err(sql(path, OP))?;
        }
    }

    /// The database file's path as given to [`Db::open`].
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `PRAGMA user_version`: how many migrations the file has.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn schema_version(&self) -> Result<u32> {
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql(&self.path, "schema_version"))?;
        u32::try_from(v).map_err(|_| StoreError::Invalid(format!("user_version {v}")))
    }

    /// The connection's settings as SQLite reports them.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn pragmas(&self) -> Result<Pragmas> {
        let e = || sql(&self.path, "pragmas");
        let q = |name: &str| -> rusqlite::Result<i64> {
            self.conn.pragma_query_value(None, name, |r| r.get(0))
        };
        Ok(Pragmas {
            journal_mode: self
                .conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .map_err(e())?,
            synchronous: q("synchronous").map_err(e())?,
            foreign_keys: q("foreign_keys").map_err(e())? == 1,
            busy_timeout_ms: q("busy_timeout").map_err(e())?,
            user_version: q("user_version").map_err(e())?,
        })
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction and commits if it returns `Ok`;
    /// anything `f` wrote is rolled back if it returns `Err` (or panics). `op` names the
    /// operation in errors. This is how the ingest path makes several changes (states,
    /// receipts, events) atomically.
    ///
    /// # Errors
    ///
    /// `f`'s error, or [`StoreError::Sqlite`] from `BEGIN`/`COMMIT` (e.g. busy after
    /// 5 s).
    pub fn write<R>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&Tx<'_>) -> Result<R>,
    ) -> Result<R> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(&self.path, op))?;
        let tx = Tx::new(tx, &self.path);
        let out = f(&tx)?;
        tx.commit(op)?;
        Ok(out)
    }

    /// Records a new letter as `queued` with its recipients (`pending`) and documents,
    /// and the `dispatch.queued` event. See [`Tx::insert_dispatch`].
    ///
    /// # Errors
    ///
    /// See [`Tx::insert_dispatch`].
    pub fn insert_dispatch(&mut self, d: &NewDispatch) -> Result<()> {
        self.write("insert_dispatch", |tx| tx.insert_dispatch(d))
    }

    /// Commits attempt `n` as `sending` and the dispatch as `sending`. See
    /// [`Tx::begin_attempt`].
    ///
    /// # Errors
    ///
    /// See [`Tx::begin_attempt`].
    pub fn begin_attempt(
        &mut self,
        dispatch_id: &str,
        message_id: &str,
        eml_sha256: &str,
        at: jiff::Timestamp,
    ) -> Result<u32> {
        self.write("begin_attempt", |tx| {
            tx.begin_attempt(dispatch_id, message_id, eml_sha256, at)
        })
    }

    /// The relay answered 250: attempt and dispatch become `submitted`.
    ///
    /// # Errors
    ///
    /// See [`Tx::attempt_submitted`].
    pub fn attempt_submitted(
        &mut self,
        dispatch_id: &str,
        n: u32,
        reply: &str,
        at: jiff::Timestamp,
    ) -> Result<()> {
        self.write("attempt_submitted", |tx| {
            tx.attempt_submitted(dispatch_id, n, reply, at)
        })
    }

    /// A transient failure before DATA was accepted: the attempt becomes
    /// `failed-transient` and the dispatch `queued` again.
    ///
    /// # Errors
    ///
    /// See [`Tx::attempt_transient`].
    pub fn attempt_transient(
        &mut self,
        dispatch_id: &str,
        n: u32,
        reply: &str,
        at: jiff::Timestamp,
    ) -> Result<()> {
        self.write("attempt_transient", |tx| {
            tx.attempt_transient(dispatch_id, n, reply, at)
        })
    }

    /// The relay refused the letter (5xx): attempt and dispatch become `refused`.
    ///
    /// # Errors
    ///
    /// See [`Tx::attempt_refused`].
    pub fn attempt_refused(
        &mut self,
        dispatch_id: &str,
        n: u32,
        reply: &str,
        at: jiff::Timestamp,
    ) -> Result<()> {
        self.write("attempt_refused", |tx| {
            tx.attempt_refused(dispatch_id, n, reply, at)
        })
    }

    /// Nobody knows whether the relay took it: attempt and dispatch become `uncertain`.
    ///
    /// # Errors
    ///
    /// See [`Tx::mark_uncertain`].
    pub fn mark_uncertain(
        &mut self,
        dispatch_id: &str,
        n: u32,
        cause: &str,
        at: jiff::Timestamp,
    ) -> Result<()> {
        self.write("mark_uncertain", |tx| {
            tx.mark_uncertain(dispatch_id, n, cause, at)
        })
    }

    /// Records an archived message; `Ok(false)` when its SHA-256 was already recorded
    /// (the first record is kept).
    ///
    /// # Errors
    ///
    /// See [`Tx::record_message`].
    pub fn record_message(&mut self, m: &MessageRow) -> Result<bool> {
        self.write("record_message", |tx| tx.record_message(m))
    }

    /// Sets a dispatch's state (and the optional columns in `change`), with its event.
    ///
    /// # Errors
    ///
    /// See [`Tx::set_dispatch_state`].
    pub fn set_dispatch_state(&mut self, dispatch_id: &str, change: &DispatchChange) -> Result<()> {
        self.write("set_dispatch_state", |tx| {
            tx.set_dispatch_state(dispatch_id, change)
        })
    }

    /// Sets a recipient's state (and the optional columns in `change`), with its event.
    ///
    /// # Errors
    ///
    /// See [`Tx::set_recipient_state`].
    pub fn set_recipient_state(
        &mut self,
        dispatch_id: &str,
        address: &str,
        change: &RecipientChange,
    ) -> Result<()> {
        self.write("set_recipient_state", |tx| {
            tx.set_recipient_state(dispatch_id, address, change)
        })
    }

    /// Records a receipt; `Ok(None)` when that message already has one.
    ///
    /// # Errors
    ///
    /// See [`Tx::record_receipt`].
    pub fn record_receipt(&mut self, r: &NewReceipt) -> Result<Option<i64>> {
        self.write("record_receipt", |tx| tx.record_receipt(r))
    }

    /// Records incoming certified mail; `Ok(false)` when already recorded.
    ///
    /// # Errors
    ///
    /// See [`Tx::record_incoming`].
    pub fn record_incoming(&mut self, i: &IncomingRow) -> Result<bool> {
        self.write("record_incoming", |tx| tx.record_incoming(i))
    }

    /// Writes a mailbox's IMAP state (insert or replace).
    ///
    /// # Errors
    ///
    /// See [`Tx::set_mailbox_state`].
    pub fn set_mailbox_state(&mut self, state: &MailboxState, cause: &str) -> Result<()> {
        self.write("set_mailbox_state", |tx| tx.set_mailbox_state(state, cause))
    }

    /// Appends one event in its own transaction (inside a larger one, use
    /// [`Tx::append_event`]).
    ///
    /// # Errors
    ///
    /// See [`Tx::append_event`].
    pub fn append_event(&mut self, ev: &NewEvent) -> Result<EventRow> {
        self.write("append_event", |tx| tx.append_event(ev))
    }

    /// A dispatch with its recipients, attempts and documents.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn get(&self, dispatch_id: &str) -> Result<Option<DispatchDetail>> {
        get(&self.conn, &self.path, dispatch_id)
    }

    /// The newest dispatch of `mailbox` with this content hash (duplicate detection).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn find_by_content_hash(
        &self,
        mailbox: &str,
        content_hash: &str,
    ) -> Result<Option<DispatchRow>> {
        find_by_content_hash(&self.conn, &self.path, mailbox, content_hash)
    }

    /// Dispatches matching `key`: a dispatch id (any case), the Message-ID of any of
    /// their attempts (with or without brackets/whitespace), a protocol number, or the
    /// provider's identificativo. Oldest first, each once.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn find(&self, key: &str) -> Result<Vec<DispatchRow>> {
        find(&self.conn, &self.path, key)
    }

    /// Up to `limit` `queued` dispatches of `mailbox`, oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn next_queued(&self, mailbox: &str, limit: u32) -> Result<Vec<DispatchRow>> {
        const OP: &str = "next_queued";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {DISPATCH_COLS} FROM dispatches \
                 WHERE mailbox = ?1 AND state = 'queued' ORDER BY created_at, id LIMIT ?2"
            ))
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map(params![mailbox, limit], dispatch_from_row)
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Attempts left `sending` (the process stopped between the two commits around an
    /// SMTP submission): `(dispatch_id, n)`, to be turned into `uncertain` at start-up.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn sending_at_startup(&self) -> Result<Vec<(String, u32)>> {
        const OP: &str = "sending_at_startup";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT dispatch_id, n FROM attempts WHERE state = 'sending' \
                 ORDER BY started_at, dispatch_id, n",
            )
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Calls `each` with every dispatch (and its recipients, attempts, documents) in
    /// `state` and/or `mailbox`, oldest first, one at a time (nothing accumulates), from
    /// one consistent snapshot. `each` returns [`ControlFlow::Break`] to stop early.
    /// Returns how many were passed to `each`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for an unknown state name; [`StoreError::Sqlite`].
    pub fn list(
        &self,
        state: Option<&str>,
        mailbox: Option<&str>,
        mut each: impl FnMut(DispatchDetail) -> ControlFlow<()>,
    ) -> Result<u64> {
        const OP: &str = "list";
        if let Some(s) = state {
            check_name("dispatch state", DISPATCH_STATES, s)?;
        }
        let path = &self.path;
        let snapshot = self.conn.unchecked_transaction().map_err(sql(path, OP))?;
        let filter = match (state, mailbox) {
            (None, None) => "",
            (Some(_), None) => "WHERE state = ?1",
            (None, Some(_)) => "WHERE mailbox = ?2",
            (Some(_), Some(_)) => "WHERE state = ?1 AND mailbox = ?2",
        };
        let mut stmt = snapshot
            .prepare(&format!(
                "SELECT {DISPATCH_COLS} FROM dispatches {filter} ORDER BY created_at, id"
            ))
            .map_err(sql(path, OP))?;
        let mut args: Vec<(&str, &dyn rusqlite::ToSql)> = Vec::new();
        if let Some(s) = &state {
            args.push(("?1", s));
        }
        if let Some(m) = &mailbox {
            args.push(("?2", m));
        }
        let mut rows = stmt.query(args.as_slice()).map_err(sql(path, OP))?;
        let mut n = 0;
        while let Some(row) = rows.next().map_err(sql(path, OP))? {
            let d = dispatch_from_row(row).map_err(sql(path, OP))?;
            let detail = load_detail(&snapshot, path, d)?;
            n += 1;
            if each(detail).is_break() {
                break;
            }
        }
        drop(rows);
        drop(stmt);
        snapshot.commit().map_err(sql(path, OP))?;
        Ok(n)
    }

    /// Dispatch counts by mailbox and state.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn state_counts(&self) -> Result<Vec<StateCount>> {
        const OP: &str = "state_counts";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT mailbox, state, count(*) FROM dispatches \
                 GROUP BY mailbox, state ORDER BY mailbox, state",
            )
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StateCount {
                    mailbox: r.get(0)?,
                    state: r.get(1)?,
                    count: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                })
            })
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// The events of one dispatch, in order.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn events_for(&self, dispatch_id: &str) -> Result<Vec<EventRow>> {
        const OP: &str = "events_for";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {EVENT_COLS} FROM events WHERE dispatch_id = ?1 ORDER BY seq"
            ))
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map([dispatch_id], event_from_row)
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Walks the whole event log and checks the hash chain (see [`super::ChainReport`]).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]. A broken chain is a result, not an error.
    pub fn verify_chain(&self) -> Result<super::ChainReport> {
        chain::verify(&self.conn, &self.path)
    }

    /// An archived message by SHA-256.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn message(&self, sha256: &str) -> Result<Option<MessageRow>> {
        message(&self.conn, &self.path, sha256)
    }

    /// The receipts recorded for a dispatch, in order.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn receipts_for(&self, dispatch_id: &str) -> Result<Vec<ReceiptRow>> {
        const OP: &str = "receipts_for";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {RECEIPT_COLS} FROM receipts WHERE dispatch_id = ?1 ORDER BY id"
            ))
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map([dispatch_id], receipt_from_row)
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Incoming certified mail by the envelope's SHA-256.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn incoming(&self, message_sha256: &str) -> Result<Option<IncomingRow>> {
        const OP: &str = "incoming";
        self.conn
            .prepare_cached(
                "SELECT message_sha256, mailbox, identificativo, mittente, oggetto, folder, \
                 created_at FROM incoming WHERE message_sha256 = ?1",
            )
            .and_then(|mut s| {
                s.query_row([message_sha256], |r| {
                    Ok(IncomingRow {
                        message_sha256: r.get(0)?,
                        mailbox: r.get(1)?,
                        identificativo: r.get(2)?,
                        mittente: r.get(3)?,
                        oggetto: r.get(4)?,
                        folder: r.get(5)?,
                        created_at: time::col(r, 6)?,
                    })
                })
                .optional()
            })
            .map_err(sql(&self.path, OP))
    }

    /// A mailbox's IMAP state, if it was ever written.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn mailbox_state(&self, mailbox: &str) -> Result<Option<MailboxState>> {
        mailbox_state(&self.conn, &self.path, mailbox)
    }

    /// Every mailbox's IMAP state, by name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn mailbox_states(&self) -> Result<Vec<MailboxState>> {
        const OP: &str = "mailbox_states";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {MAILBOX_COLS} FROM mailbox_state ORDER BY mailbox"
            ))
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map([], mailbox_from_row)
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Copies the open database, consistently, to a new file at `dest` (SQLite's online
    /// backup; other connections may keep writing).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn backup_to(&self, dest: impl AsRef<Path>) -> Result<()> {
        self.conn
            .backup(
                rusqlite::MAIN_DB,
                dest,
                None::<fn(rusqlite::backup::Progress)>,
            )
            .map_err(sql(&self.path, "backup"))
    }

    /// Copies the WAL back into the database file and truncates it. Returns `false` when
    /// another connection's readers kept it from completing (not an error).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn checkpoint(&self) -> Result<bool> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(sql(&self.path, "checkpoint"))?;
        Ok(busy == 0)
    }

    /// Checkpoints the WAL and closes the connection.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`]; the connection is closed anyway.
    pub fn close(self) -> Result<()> {
        let checkpoint = self.checkpoint();
        let Db { conn, path } = self;
        conn.close().map_err(|(_, e)| sql(&path, "close")(e))?;
        checkpoint.map(drop)
    }
}

/// Adds the migration's name to a failure message.
fn with_name(e: rusqlite::Error, name: &str) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => rusqlite::Error::SqliteFailure(
            code,
            Some(format!("migration {name}: {}", msg.unwrap_or_default())),
        ),
        other => other,
    }
}

// ---- shared row readers (used by Db and Tx) ----

pub(crate) const DISPATCH_COLS: &str = "id, mailbox, kind, protocol, reference, subject, \
    receipt_type, in_reply_to, state, identificativo, accepted_at, content_hash, source, \
    sent_dir, created_at, updated_at, error";

pub(crate) fn dispatch_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DispatchRow> {
    Ok(DispatchRow {
        id: r.get(0)?,
        mailbox: r.get(1)?,
        kind: r.get(2)?,
        protocol: r.get(3)?,
        reference: r.get(4)?,
        subject: r.get(5)?,
        receipt_type: r.get(6)?,
        in_reply_to: r.get(7)?,
        state: r.get(8)?,
        identificativo: r.get(9)?,
        accepted_at: time::col_opt(r, 10)?,
        content_hash: r.get(11)?,
        source: r.get(12)?,
        sent_dir: r.get(13)?,
        created_at: time::col(r, 14)?,
        updated_at: time::col(r, 15)?,
        error: r.get(16)?,
    })
}

/// A `recipients` row from the columns `dispatch_id, address, field, certified,
/// state, detail, conflict, updated_at` (in that order, first).
pub(super) fn recipient_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RecipientRow> {
    let field: String = r.get(2)?;
    Ok(RecipientRow {
        dispatch_id: r.get(0)?,
        address: r.get(1)?,
        field: field.parse().map_err(|e: StoreError| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
        })?,
        certified: r.get::<_, Option<i64>>(3)?.map(|c| c != 0),
        state: r.get(4)?,
        detail: r.get(5)?,
        conflict: r.get(6)?,
        updated_at: time::col(r, 7)?,
    })
}

/// An `attempts` row from the columns `dispatch_id, n, message_id, state,
/// eml_sha256, started_at, finished_at, smtp_reply` (in that order, first).
pub(super) fn attempt_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AttemptRow> {
    Ok(AttemptRow {
        dispatch_id: r.get(0)?,
        n: r.get(1)?,
        message_id: r.get(2)?,
        state: r.get(3)?,
        eml_sha256: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
        started_at: time::col(r, 5)?,
        finished_at: time::col_opt(r, 6)?,
        smtp_reply: r.get(7)?,
    })
}

/// A `documents` row from the columns `name, sha256, size` (in that order, first).
pub(super) fn document_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DocumentRow> {
    Ok(DocumentRow {
        name: r.get(0)?,
        sha256: r.get(1)?,
        size: u64_col(r, 2)?,
    })
}

const EVENT_COLS: &str = "seq, at, mailbox, dispatch_id, event, cause, detail, prev_hash, hash";

pub(super) fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        seq: r.get(0)?,
        at: time::col(r, 1)?,
        mailbox: r.get(2)?,
        dispatch_id: r.get(3)?,
        event: r.get(4)?,
        cause: r.get(5)?,
        detail: r.get(6)?,
        prev_hash: r.get(7)?,
        hash: r.get(8)?,
    })
}

const RECEIPT_COLS: &str = "id, message_sha256, kind, verdict, reason, dispatch_id, recipient, \
    identificativo, msgid, disposition, created_at";

fn receipt_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReceiptRow> {
    Ok(ReceiptRow {
        id: r.get(0)?,
        receipt: NewReceipt {
            message_sha256: r.get(1)?,
            kind: r.get(2)?,
            verdict: r.get(3)?,
            reason: r.get(4)?,
            dispatch_id: r.get(5)?,
            recipient: r.get(6)?,
            identificativo: r.get(7)?,
            msgid: r.get(8)?,
            disposition: r.get(9)?,
            created_at: time::col(r, 10)?,
        },
    })
}

const MAILBOX_COLS: &str = "mailbox, uidvalidity, last_uid, last_sync_at, suspended_reason, \
    quota_used, quota_limit, updated_at";

fn mailbox_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MailboxState> {
    Ok(MailboxState {
        mailbox: r.get(0)?,
        uidvalidity: r.get(1)?,
        last_uid: r.get(2)?,
        last_sync_at: time::col_opt(r, 3)?,
        suspended_reason: r.get(4)?,
        quota_used: opt_u64(r, 5)?,
        quota_limit: opt_u64(r, 6)?,
        updated_at: time::col(r, 7)?,
    })
}

fn opt_u64(r: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    r.get::<_, Option<i64>>(idx)?
        .map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v)))
        .transpose()
}

fn u64_col(r: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

pub(crate) fn dispatch(conn: &Connection, path: &str, id: &str) -> Result<Option<DispatchRow>> {
    conn.prepare_cached(&format!(
        "SELECT {DISPATCH_COLS} FROM dispatches WHERE id = ?1"
    ))
    .and_then(|mut s| s.query_row([id], dispatch_from_row).optional())
    .map_err(sql(path, "get dispatch"))
}

pub(crate) fn get(conn: &Connection, path: &str, id: &str) -> Result<Option<DispatchDetail>> {
    match dispatch(conn, path, id)? {
        None => Ok(None),
        Some(d) => load_detail(conn, path, d).map(Some),
    }
}

fn load_detail(conn: &Connection, path: &str, d: DispatchRow) -> Result<DispatchDetail> {
    const OP: &str = "get dispatch detail";
    let recipients = conn
        .prepare_cached(
            "SELECT dispatch_id, address, field, certified, state, detail, conflict, updated_at \
             FROM recipients WHERE dispatch_id = ?1 ORDER BY position",
        )
        .and_then(|mut s| {
            s.query_map([&d.id], recipient_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql(path, OP))?;
    let attempts = conn
        .prepare_cached(
            "SELECT dispatch_id, n, message_id, state, eml_sha256, started_at, finished_at, \
             smtp_reply FROM attempts WHERE dispatch_id = ?1 ORDER BY n",
        )
        .and_then(|mut s| {
            s.query_map([&d.id], attempt_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql(path, OP))?;
    let documents = conn
        .prepare_cached(
            "SELECT name, sha256, size FROM documents WHERE dispatch_id = ?1 ORDER BY position",
        )
        .and_then(|mut s| {
            s.query_map([&d.id], document_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql(path, OP))?;
    Ok(DispatchDetail {
        dispatch: d,
        recipients,
        attempts,
        documents,
    })
}

pub(crate) fn find_by_content_hash(
    conn: &Connection,
    path: &str,
    mailbox: &str,
    content_hash: &str,
) -> Result<Option<DispatchRow>> {
    conn.prepare_cached(&format!(
        "SELECT {DISPATCH_COLS} FROM dispatches WHERE mailbox = ?1 AND content_hash = ?2 \
         ORDER BY created_at DESC, id DESC LIMIT 1"
    ))
    .and_then(|mut s| {
        s.query_row([mailbox, content_hash], dispatch_from_row)
            .optional()
    })
    .map_err(sql(path, "find_by_content_hash"))
}

pub(crate) fn find(conn: &Connection, path: &str, key: &str) -> Result<Vec<DispatchRow>> {
    let key = key.trim();
    if key.is_empty() {
        return Ok(Vec::new());
    }
    let id = super::canonical_dispatch_id(key);
    let message_id = crate::pec::ids::normalize_message_id(key);
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {DISPATCH_COLS} FROM dispatches WHERE id = ?1 \
             OR id IN (SELECT dispatch_id FROM attempts WHERE message_id = ?2) \
             OR protocol = ?3 OR identificativo = ?3 \
             ORDER BY created_at, id"
        ))
        .map_err(sql(path, "find"))?;
    let rows = stmt
        .query_map(params![id, message_id, key], dispatch_from_row)
        .and_then(Iterator::collect)
        .map_err(sql(path, "find"))?;
    Ok(rows)
}

/// The events of one dispatch, in order (for [`Db::events_for`] and
/// [`super::Tx::events_for`]).
pub(crate) fn events_for(
    conn: &Connection,
    path: &str,
    dispatch_id: &str,
) -> Result<Vec<EventRow>> {
    const OP: &str = "events_for";
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {EVENT_COLS} FROM events WHERE dispatch_id = ?1 ORDER BY seq"
        ))
        .map_err(sql(path, OP))?;
    let rows = stmt
        .query_map([dispatch_id], event_from_row)
        .and_then(Iterator::collect)
        .map_err(sql(path, OP))?;
    Ok(rows)
}

pub(crate) fn message(conn: &Connection, path: &str, sha256: &str) -> Result<Option<MessageRow>> {
    conn.prepare_cached(
        "SELECT sha256, path, size, direction, mailbox, imap_uid, imap_uidvalidity, recorded_at \
         FROM messages WHERE sha256 = ?1",
    )
    .and_then(|mut s| {
        s.query_row([sha256], |r| {
            let direction: String = r.get(3)?;
            Ok(MessageRow {
                sha256: r.get(0)?,
                path: r.get(1)?,
                size: u64_col(r, 2)?,
                direction: direction.parse().map_err(|e: StoreError| {
                    rusqlite::Error::FromSqlConversionFailure(
                        3,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?,
                mailbox: r.get(4)?,
                imap_uid: r.get(5)?,
                imap_uidvalidity: r.get(6)?,
                recorded_at: time::col(r, 7)?,
            })
        })
        .optional()
    })
    .map_err(sql(path, "message"))
}

pub(crate) fn mailbox_state(
    conn: &Connection,
    path: &str,
    mailbox: &str,
) -> Result<Option<MailboxState>> {
    conn.prepare_cached(&format!(
        "SELECT {MAILBOX_COLS} FROM mailbox_state WHERE mailbox = ?1"
    ))
    .and_then(|mut s| s.query_row([mailbox], mailbox_from_row).optional())
    .map_err(sql(path, "mailbox_state"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, (name, script)) in MIGRATIONS.iter().enumerate() {
            assert!(name.starts_with(&format!("{:04}_", i + 1)), "{name}");
            assert!(!script.trim().is_empty(), "{name}");
        }
    }

    #[test]
    fn state_lists_match_the_lookup_tables() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("s.db")).unwrap();
        for (table, list) in [
            ("dispatch_states", super::super::DISPATCH_STATES),
            ("recipient_states", super::super::RECIPIENT_STATES),
            ("attempt_states", super::super::ATTEMPT_STATES),
        ] {
            let mut names: Vec<String> = db
                .conn
                .prepare(&format!("SELECT name FROM {table}"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            names.sort();
            let mut expected: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
            expected.sort();
            assert_eq!(names, expected, "{table}");
        }
    }
}
