//! Writes that only `pecgate reindex` makes: a letter restored from its
//! `dispatch.json` (the row, its recipients, documents and attempts as they
//! were recorded, not as the outbox and the sender would write them step by
//! step), and the durability switch of a database being rebuilt.
//!
//! Every restored row gets its event with cause `reindex` in the same
//! transaction, so the rebuilt log says where each row came from.

use jiff::Timestamp;
use rusqlite::params;
use serde_json::{Value, json};

use super::db::Db;
use super::error::{StoreError, sql};
use super::tx::{Tx, check_sha256};
use super::{ATTEMPT_STATES, NewDispatch, NewEvent, Result, check_name, time};
use crate::pec::ids::normalize_message_id;

/// One attempt as `dispatch.json` recorded it, to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredAttempt {
    /// 1, 2, … as recorded.
    pub n: u32,
    /// Its Message-ID (normalised on the way in).
    pub message_id: String,
    /// The state to store, one of [`ATTEMPT_STATES`] (the caller turns a
    /// recorded `sending` into `uncertain`, as a restart would).
    pub state: String,
    /// The state `dispatch.json` recorded, for the event.
    pub recorded_state: String,
    /// SHA-256 of the exact bytes sent (a `messages` row, recorded first).
    pub eml_sha256: String,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended, if it did.
    pub finished_at: Option<Timestamp>,
    /// The relay's reply.
    pub smtp_reply: Option<String>,
}

impl Tx<'_> {
    /// Restores a letter as `queued` with its recipients (`pending`) and
    /// documents, exactly like [`Tx::insert_dispatch`] checks them, and
    /// appends `dispatch.queued` with cause `reindex` (its detail repeats the
    /// letter and names the folder it was restored from).
    ///
    /// # Errors
    ///
    /// As [`Tx::insert_dispatch`].
    pub fn restore_dispatch(&self, d: &NewDispatch, restored_from: &str) -> Result<()> {
        self.queue_dispatch(d, "restore_dispatch", "reindex", Some(restored_from))
    }

    /// Restores one attempt row of a restored dispatch with its recorded
    /// times and reply, and appends `attempt.restored` (cause `reindex`). The
    /// dispatch's state is set afterwards by the caller
    /// ([`Tx::set_dispatch_state`]), from its last attempt.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for an unknown state, an empty Message-ID or a
    /// malformed hash; [`StoreError::Sqlite`] when the message is not
    /// recorded, the number or the Message-ID is taken.
    pub fn restore_attempt(
        &self,
        dispatch_id: &str,
        mailbox: &str,
        a: &RestoredAttempt,
    ) -> Result<()> {
        const OP: &str = "restore_attempt";
        check_name("attempt state", ATTEMPT_STATES, &a.state)?;
        // Empty: an attempt recovered from a receipt, whose bytes pecgate
        // never had (see [`Tx::recover_attempt`]); stored as NULL.
        let eml = (!a.eml_sha256.is_empty()).then_some(a.eml_sha256.as_str());
        if let Some(eml) = eml {
            check_sha256("message hash", eml)?;
        }
        let mid = normalize_message_id(&a.message_id).ok_or_else(|| {
            StoreError::Invalid(format!(
                "dispatch {dispatch_id}: attempt {} has no Message-ID",
                a.n
            ))
        })?;
        if a.n == 0 {
            return Err(StoreError::Invalid(format!(
                "dispatch {dispatch_id}: attempt number 0"
            )));
        }
        self.tx
            .prepare_cached(
                "INSERT INTO attempts (dispatch_id, n, message_id, state, eml_sha256, started_at, \
                 finished_at, smtp_reply) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    dispatch_id,
                    a.n,
                    mid,
                    a.state,
                    eml,
                    time::fmt(a.started_at),
                    a.finished_at.map(time::fmt),
                    a.smtp_reply
                ])
            })
            .map_err(sql(self.path, OP))?;
        self.append_event(&NewEvent {
            at: a.finished_at.unwrap_or(a.started_at),
            mailbox: Some(mailbox.to_owned()),
            dispatch_id: Some(dispatch_id.to_owned()),
            event: "attempt.restored".into(),
            cause: "reindex".into(),
            detail: json!({
                "attempt": a.n, "message_id": mid, "state": a.state,
                "recorded_state": a.recorded_state, "eml_sha256": a.eml_sha256,
                "started_at": time::fmt(a.started_at),
                "finished_at": a.finished_at.map(time::fmt), "smtp_reply": a.smtp_reply,
            }),
        })?;
        Ok(())
    }

    /// Records an attempt the store had lost (a restore from backup, a
    /// reindex from an outdated `dispatch.json`) but a signed receipt names:
    /// state `submitted` (the provider has it), started and finished `at`,
    /// no SMTP reply, and no `eml_sha256` (NULL: the exact bytes are not
    /// known). Its number is `n` (from its Message-ID,
    /// `<DISPATCHID.N.HEX@host>`) when free, else the next free one. Appends
    /// `attempt.recovered` (with `cause`) and `detail` merged into
    /// `{attempt, message_id, n_in_message_id}`. The dispatch state is the caller's business. Returns
    /// the number used.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for an empty Message-ID;
    /// [`StoreError::NotFound`] for an unknown dispatch; [`StoreError::Sqlite`]
    /// when the Message-ID is taken.
    pub fn recover_attempt(
        &self,
        dispatch_id: &str,
        n: u32,
        message_id: &str,
        at: Timestamp,
        cause: &str,
        detail: Value,
    ) -> Result<u32> {
        const OP: &str = "recover_attempt";
        let mid = normalize_message_id(message_id).ok_or_else(|| {
            StoreError::Invalid(format!(
                "dispatch {dispatch_id}: recovered attempt without Message-ID"
            ))
        })?;
        let (mailbox, taken, max): (Option<String>, bool, u32) = self
            .tx
            .prepare_cached(
                "SELECT (SELECT mailbox FROM dispatches WHERE id = ?1), \
                 coalesce(max(n = ?2), 0), coalesce(max(n), 0) FROM attempts \
                 WHERE dispatch_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![dispatch_id, n], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
            })
            .map_err(sql(self.path, OP))?;
        let mailbox =
            mailbox.ok_or_else(|| StoreError::NotFound(format!("dispatch {dispatch_id}")))?;
        let used = if n == 0 || taken { max + 1 } else { n };
        let ts = time::fmt(at);
        self.tx
            .prepare_cached(
                "INSERT INTO attempts (dispatch_id, n, message_id, state, eml_sha256, started_at, \
                 finished_at) VALUES (?1, ?2, ?3, 'submitted', NULL, ?4, ?4)",
            )
            .and_then(|mut s| s.execute(params![dispatch_id, used, mid, ts]))
            .map_err(sql(self.path, OP))?;
        let mut d = json!({
            "attempt": used, "message_id": mid, "n_in_message_id": n, "state": "submitted",
            "eml_sha256": null,
        });
        if let (Value::Object(m), Value::Object(extra)) = (&mut d, detail) {
            m.extend(extra);
        }
        self.append_event(&NewEvent {
            at,
            mailbox: Some(mailbox),
            dispatch_id: Some(dispatch_id.to_owned()),
            event: "attempt.recovered".into(),
            cause: cause.to_owned(),
            detail: d,
        })?;
        Ok(used)
    }
}

impl Db {
    /// Sets `PRAGMA synchronous` for a database that nobody else uses yet
    /// (`reindex` builds it under a temporary name): `false` = OFF while it
    /// is filled (a crash loses only the temporary file), `true` = FULL
    /// again before it is checkpointed and published.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn set_rebuild_durability(&self, full: bool) -> Result<()> {
        self.conn
            .pragma_update(None, "synchronous", if full { "FULL" } else { "OFF" })
            .map_err(sql(&self.path, "set_rebuild_durability"))
    }

    /// Every dispatch id with its sent folder, oldest first (for rewriting
    /// the status files after a rebuild).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn dispatch_folders(&self) -> Result<Vec<(String, String)>> {
        const OP: &str = "dispatch_folders";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, sent_dir FROM dispatches ORDER BY created_at, id")
            .map_err(sql(&self.path, OP))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(Iterator::collect)
            .map_err(sql(&self.path, OP))?;
        Ok(rows)
    }
}
