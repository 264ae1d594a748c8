//! Queries and writes of the inbound side (issue 6): the deadline timer's
//! candidates, server-side retention, and the IMAP cursor.

use rusqlite::params;
use serde_json::json;

use super::db::{self, Db};
use super::error::sql;
use super::{MailboxState, NewEvent, Result, time};
use jiff::Timestamp;

/// Times before which a dispatch may have a deadline due (see
/// [`Db::deadline_candidates`]).
#[derive(Debug, Clone, Copy)]
pub struct DeadlineCutoffs {
    /// `submitted` letters submitted at or before this.
    pub submitted_before: Timestamp,
    /// `uncertain` letters whose attempt became uncertain at or before this.
    pub uncertain_before: Timestamp,
    /// `accepted` letters with an open recipient, accepted at or before this.
    pub accepted_before: Timestamp,
}

impl Db {
    /// Ids of the dispatches of `mailbox` for which a deadline may be due:
    /// submitted without acceptance since `submitted_before`, uncertain since
    /// `uncertain_before`, accepted since `accepted_before` with a recipient
    /// still `pending` or `warned`. The pure core decides; this only keeps
    /// the timer from reading every letter at every tick.
    ///
    /// # Errors
    ///
    /// [`super::StoreError::Sqlite`].
    pub fn deadline_candidates(&self, mailbox: &str, c: &DeadlineCutoffs) -> Result<Vec<String>> {
        const OP: &str = "deadline_candidates";
        let mut stmt = self
            .conn
            .prepare_cached(
                // One branch per state, each through the (mailbox, state, ...) index
                // (delivered letters are never visited), and the attempts of one
                // dispatch through its primary key: the unary `+` keeps SQLite
                // from using attempts_by_state instead, which made the query
                // quadratic in the number of submitted letters (about 1 s per
                // timer pass with 5,000 of them, see docs/BENCHMARKS.md).
                "SELECT id FROM ( \
                   SELECT d.id, d.created_at FROM dispatches d \
                     WHERE d.mailbox = ?1 AND d.state = 'submitted' AND EXISTS (SELECT 1 \
                       FROM attempts a WHERE a.dispatch_id = d.id AND +a.state = 'submitted' \
                       AND a.finished_at <= ?2) \
                   UNION ALL \
                   SELECT d.id, d.created_at FROM dispatches d \
                     WHERE d.mailbox = ?1 AND d.state = 'uncertain' AND EXISTS (SELECT 1 \
                       FROM attempts a WHERE a.dispatch_id = d.id AND +a.state = 'uncertain' \
                       AND a.finished_at <= ?3) \
                   UNION ALL \
                   SELECT d.id, d.created_at FROM dispatches d \
                     WHERE d.mailbox = ?1 AND d.state = 'accepted' AND d.accepted_at <= ?4 \
                     AND EXISTS (SELECT 1 FROM recipients r WHERE r.dispatch_id = d.id \
                       AND +r.state IN ('pending', 'warned')) \
                 ) ORDER BY created_at, id",
            )
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map(
                params![
                    mailbox,
                    time::fmt(c.submitted_before),
                    time::fmt(c.uncertain_before),
                    time::fmt(c.accepted_before)
                ],
                |r| r.get(0),
            )
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Whether `dispatch_id` has an event named `event` (whose detail's
    /// `recipient` is `recipient`, when given): deadlines are reported once.
    ///
    /// # Errors
    ///
    /// [`super::StoreError::Sqlite`].
    pub fn has_event(
        &self,
        dispatch_id: &str,
        event: &str,
        recipient: Option<&str>,
    ) -> Result<bool> {
        const OP: &str = "has_event";
        let n: i64 = self
            .conn
            .prepare_cached(
                "SELECT count(*) FROM events WHERE dispatch_id = ?1 AND event = ?2 \
                 AND (?3 IS NULL OR json_extract(detail, '$.recipient') = ?3)",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![dispatch_id, event, recipient.map(str::to_lowercase)],
                    |r| r.get(0),
                )
            })
            .map_err(sql(&self.path, OP))?;
        Ok(n > 0)
    }

    /// UIDs (of the folder's current `uidvalidity`) of messages of `mailbox`
    /// fetched over IMAP, archived and recorded at or before `recorded_before`,
    /// not yet handled by retention; at most `limit`, oldest first.
    ///
    /// # Errors
    ///
    /// [`super::StoreError::Sqlite`].
    pub fn retention_candidates(
        &self,
        mailbox: &str,
        uidvalidity: u32,
        recorded_before: Timestamp,
        limit: u32,
    ) -> Result<Vec<u32>> {
        const OP: &str = "retention_candidates";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT imap_uid FROM messages WHERE mailbox = ?1 AND imap_uidvalidity = ?2 \
                 AND imap_uid IS NOT NULL AND retained_at IS NULL AND direction = 'in' \
                 AND recorded_at <= ?3 ORDER BY imap_uid LIMIT ?4",
            )
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map(
                params![mailbox, uidvalidity, time::fmt(recorded_before), limit],
                |r| r.get(0),
            )
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }

    /// Records that retention moved or expunged these UIDs on the server
    /// (one event for the batch, with the action).
    ///
    /// # Errors
    ///
    /// [`super::StoreError::Sqlite`].
    pub fn mark_retained(
        &mut self,
        mailbox: &str,
        uidvalidity: u32,
        uids: &[u32],
        action: &str,
        at: Timestamp,
    ) -> Result<()> {
        const OP: &str = "mark_retained";
        let ts = time::fmt(at);
        self.write(OP, |tx| {
            for uid in uids {
                tx.tx
                    .prepare_cached(
                        "UPDATE messages SET retained_at = ?4 WHERE mailbox = ?1 \
                         AND imap_uidvalidity = ?2 AND imap_uid = ?3",
                    )
                    .and_then(|mut s| s.execute(params![mailbox, uidvalidity, uid, ts]))
                    .map_err(sql(tx.path, OP))?;
            }
            tx.append_event(&NewEvent {
                at,
                mailbox: Some(mailbox.to_owned()),
                dispatch_id: None,
                event: "mailbox.retention".into(),
                cause: "retention".into(),
                detail: json!({"action": action, "uidvalidity": uidvalidity, "count": uids.len(),
                    "first_uid": uids.first(), "last_uid": uids.last()}),
            })?;
            Ok(())
        })
    }

    /// Moves the IMAP cursor of `mailbox` (and, when given, its last sync time
    /// and quota), keeping the other columns (suspension) as they are.
    ///
    /// # Errors
    ///
    /// [`super::StoreError::Sqlite`].
    pub fn save_cursor(&mut self, update: &CursorUpdate<'_>) -> Result<()> {
        let mut st = self
            .mailbox_state(update.mailbox)?
            .unwrap_or_else(|| MailboxState::new(update.mailbox, update.at));
        if let Some(v) = update.uidvalidity {
            if st.uidvalidity != Some(v) {
                st.last_uid = None;
            }
            st.uidvalidity = Some(v);
        }
        if update.last_uid.is_some() {
            st.last_uid = update.last_uid;
        }
        if update.synced {
            st.last_sync_at = Some(update.at);
            if st.suspended_reason.as_deref() == Some(super::HOLD_UNTIL_SYNC) {
                // Read completely once after a restore: sending may resume.
                st.suspended_reason = None;
            }
        }
        if let Some((used, limit)) = update.quota {
            st.quota_used = Some(used);
            st.quota_limit = Some(limit);
        }
        st.updated_at = update.at;
        self.set_mailbox_state(&st, "imap")
    }
}

/// What [`Db::save_cursor`] changes.
#[derive(Debug, Clone, Copy)]
pub struct CursorUpdate<'a> {
    /// The mailbox.
    pub mailbox: &'a str,
    /// The folder's UIDVALIDITY (a new value resets `last_uid` unless
    /// `last_uid` is given too).
    pub uidvalidity: Option<u32>,
    /// The highest UID handled.
    pub last_uid: Option<u32>,
    /// Set `last_sync_at` to `at`.
    pub synced: bool,
    /// Quota (used, limit) in bytes.
    pub quota: Option<(u64, u64)>,
    /// When.
    pub at: Timestamp,
}

impl super::Tx<'_> {
    /// A message fetched again with a new `(uid, uidvalidity)` (a resync
    /// after a UIDVALIDITY change) takes its new place on the server, so
    /// that retention finds it under the current UIDVALIDITY. Only for an
    /// incoming message, only when the stored UIDVALIDITY differs (or is
    /// unknown: recorded by `reindex`), and never once retention has handled
    /// it (`retained_at`). `true` when the row changed.
    ///
    /// # Errors
    ///
    /// [`super::StoreError::Sqlite`].
    pub fn refresh_imap_source(&self, sha256: &str, uid: u32, uidvalidity: u32) -> Result<bool> {
        const OP: &str = "refresh_imap_source";
        let n = self
            .tx
            .prepare_cached(
                "UPDATE messages SET imap_uid = ?2, imap_uidvalidity = ?3 \
                 WHERE sha256 = ?1 AND direction = 'in' AND retained_at IS NULL \
                 AND imap_uidvalidity IS NOT ?3",
            )
            .and_then(|mut s| s.execute(params![sha256, uid, uidvalidity]))
            .map_err(sql(self.path, OP))?;
        Ok(n > 0)
    }
}

// ---------------------------------------------------------------------------
// The reads of the ingest path.
//
// Ingest reads a dispatch, its rows and its events for every receipt. These
// statements carry no ORDER BY (the rows are sorted here): SQLite expires a
// prepared statement with `WHERE col = ?1 ... ORDER BY` at every new binding
// and compiles it again (measured: about a tenth of the daemon's CPU time on
// a receipt backlog went into re-preparing `Db::get` and `Db::events_for`,
// see docs/BENCHMARKS.md "Inbound"). The results equal those of
// [`Db::get`], [`Db::events_for`].

use rusqlite::{Connection, OptionalExtension};

use super::{AttemptRow, DispatchDetail, DocumentRow, EventRow, RecipientRow};

/// The dispatch whose attempt has this (normalised) Message-ID.
pub(crate) fn dispatch_of_message_id(
    conn: &Connection,
    path: &str,
    message_id: &str,
) -> Result<Option<String>> {
    conn.prepare_cached("SELECT dispatch_id FROM attempts WHERE message_id = ?1")
        .and_then(|mut s| s.query_row([message_id], |r| r.get(0)).optional())
        .map_err(sql(path, "dispatch_of_message_id"))
}

/// The dispatches with this identificativo, oldest first.
pub(crate) fn dispatches_of_identificativo(
    conn: &Connection,
    path: &str,
    identificativo: &str,
) -> Result<Vec<String>> {
    let mut rows: Vec<(String, String)> = conn
        .prepare_cached("SELECT id, created_at FROM dispatches WHERE identificativo = ?1")
        .and_then(|mut s| {
            s.query_map([identificativo], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql(path, "dispatches_of_identificativo"))?;
    rows.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    Ok(rows.into_iter().map(|(id, _)| id).collect())
}

/// [`Db::get`], for ingest.
pub(crate) fn detail(conn: &Connection, path: &str, id: &str) -> Result<Option<DispatchDetail>> {
    const OP: &str = "get dispatch detail (ingest)";
    let Some(d) = super::db::dispatch(conn, path, id)? else {
        return Ok(None);
    };
    let mut recipients: Vec<(i64, RecipientRow)> = conn
        .prepare_cached(
            "SELECT dispatch_id, address, field, certified, state, detail, conflict, updated_at, \
             position FROM recipients WHERE dispatch_id = ?1",
        )
        .and_then(|mut s| {
            s.query_map([&d.id], |r| Ok((r.get(8)?, db::recipient_from_row(r)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql(path, OP))?;
    recipients.sort_by_key(|(position, _)| *position);
    let mut attempts: Vec<AttemptRow> = conn
        .prepare_cached(
            "SELECT dispatch_id, n, message_id, state, eml_sha256, started_at, finished_at, \
             smtp_reply FROM attempts WHERE dispatch_id = ?1",
        )
        .and_then(|mut s| {
            s.query_map([&d.id], db::attempt_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql(path, OP))?;
    attempts.sort_by_key(|a| a.n);
    let mut documents: Vec<(i64, DocumentRow)> = conn
        .prepare_cached("SELECT name, sha256, size, position FROM documents WHERE dispatch_id = ?1")
        .and_then(|mut s| {
            s.query_map([&d.id], |r| Ok((r.get(3)?, db::document_from_row(r)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql(path, OP))?;
    documents.sort_by_key(|(position, _)| *position);
    Ok(Some(DispatchDetail {
        dispatch: d,
        recipients: recipients.into_iter().map(|(_, r)| r).collect(),
        attempts,
        documents: documents.into_iter().map(|(_, d)| d).collect(),
    }))
}

/// [`Db::events_for`], for ingest.
pub(crate) fn events(conn: &Connection, path: &str, dispatch_id: &str) -> Result<Vec<EventRow>> {
    let mut rows: Vec<EventRow> = conn
        .prepare_cached(
            "SELECT seq, at, mailbox, dispatch_id, event, cause, detail, prev_hash, hash \
             FROM events WHERE dispatch_id = ?1",
        )
        .and_then(|mut s| {
            s.query_map([dispatch_id], db::event_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql(path, "events_for (ingest)"))?;
    rows.sort_by_key(|e| e.seq);
    Ok(rows)
}

macro_rules! ingest_reads {
    ($t:ty, $conn:ident, $path:ident) => {
        impl $t {
            /// The dispatch whose attempt has this Message-ID (normalised),
            /// for ingest.
            ///
            /// # Errors
            ///
            /// [`StoreError::Sqlite`].
            pub fn ingest_dispatch_of_message_id(
                &self,
                message_id: &str,
            ) -> Result<Option<String>> {
                dispatch_of_message_id(&self.$conn, &self.$path, message_id)
            }

            /// The dispatches with this identificativo, oldest first, for ingest.
            ///
            /// # Errors
            ///
            /// [`StoreError::Sqlite`].
            pub fn ingest_dispatches_of_identificativo(&self, ident: &str) -> Result<Vec<String>> {
                dispatches_of_identificativo(&self.$conn, &self.$path, ident)
            }

            /// `get`, with statements that SQLite does not re-prepare at
            /// every binding (see the comment above), for ingest.
            ///
            /// # Errors
            ///
            /// [`StoreError::Sqlite`].
            pub fn ingest_get(&self, dispatch_id: &str) -> Result<Option<DispatchDetail>> {
                detail(&self.$conn, &self.$path, dispatch_id)
            }

            /// `events_for`, likewise, for ingest.
            ///
            /// # Errors
            ///
            /// [`StoreError::Sqlite`].
            pub fn ingest_events_for(&self, dispatch_id: &str) -> Result<Vec<EventRow>> {
                events(&self.$conn, &self.$path, dispatch_id)
            }
        }
    };
}
ingest_reads!(Db, conn, path);
ingest_reads!(super::Tx<'_>, tx, path);
