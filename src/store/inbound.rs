//! Queries and writes of the inbound side (issue 6): the deadline timer's
//! candidates, server-side retention, and the IMAP cursor.

use rusqlite::params;
use serde_json::json;

use super::db::Db;
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
                "SELECT d.id FROM dispatches d WHERE d.mailbox = ?1 AND ( \
                   (d.state = 'submitted' AND EXISTS (SELECT 1 FROM attempts a \
                      WHERE a.dispatch_id = d.id AND a.state = 'submitted' AND a.finished_at <= ?2)) \
                   OR (d.state = 'uncertain' AND EXISTS (SELECT 1 FROM attempts a \
                      WHERE a.dispatch_id = d.id AND a.state = 'uncertain' AND a.finished_at <= ?3)) \
                   OR (d.state = 'accepted' AND d.accepted_at <= ?4 AND EXISTS (SELECT 1 FROM \
                      recipients r WHERE r.dispatch_id = d.id AND r.state IN ('pending', 'warned'))) \
                 ) ORDER BY d.created_at, d.id",
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
