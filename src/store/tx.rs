//! [`Tx`]: the write operations, inside one transaction opened by [`super::Db::write`].

use jiff::Timestamp;
use rusqlite::{OptionalExtension, params};
use serde_json::{Value, json};

use super::db;
use super::error::{StoreError, sql};
use super::{
    DISPATCH_STATES, DISPOSITIONS, DispatchChange, DispatchDetail, DispatchRow, EventRow,
    IncomingRow, MailboxState, MessageRow, NewDispatch, NewEvent, NewReceipt, RECIPIENT_STATES,
    RecipientChange, Result, VERDICTS, chain, check_name, time,
};
use crate::pec::ids::{canonical_address, normalize_message_id};

/// One open `BEGIN IMMEDIATE` transaction. Every method writes its event (if it changes
/// a state) in this same transaction; nothing is on disk until [`super::Db::write`]
/// commits, and nothing is if the closure returns `Err`.
pub struct Tx<'a> {
    pub(super) tx: rusqlite::Transaction<'a>,
    pub(super) path: &'a str,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// An attempt's outcome after the SMTP transaction.
struct Finish<'a> {
    attempt_state: &'static str,
    dispatch_state: &'static str,
    reply: Option<&'a str>,
    /// The dispatch's `error` column: `Some(None)` clears it.
    error: Option<Option<&'a str>>,
    cause: &'a str,
    op: &'static str,
}

impl<'a> Tx<'a> {
    pub(crate) fn new(tx: rusqlite::Transaction<'a>, path: &'a str) -> Self {
        Tx { tx, path }
    }

    pub(crate) fn commit(self, op: &'static str) -> Result<()> {
        self.tx.commit().map_err(sql(self.path, op))
    }

    fn err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        sql(self.path, op)
    }

    /// Appends an event to the hash-chained log (see `chain.rs` for the encoding).
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for an empty event name; [`StoreError::Sqlite`] (e.g. an
    /// unknown `dispatch_id`).
    pub fn append_event(&self, ev: &NewEvent) -> Result<EventRow> {
        chain::append(&self.tx, self.path, ev)
    }

    /// A dispatch, as this transaction sees it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn dispatch(&self, dispatch_id: &str) -> Result<Option<DispatchRow>> {
        db::dispatch(&self.tx, self.path, dispatch_id)
    }

    /// A dispatch with everything that hangs off it, as this transaction sees it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn get(&self, dispatch_id: &str) -> Result<Option<DispatchDetail>> {
        db::get(&self.tx, self.path, dispatch_id)
    }

    /// [`super::Db::find`] inside this transaction.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn find(&self, key: &str) -> Result<Vec<DispatchRow>> {
        db::find(&self.tx, self.path, key)
    }

    /// [`super::Db::events_for`] inside this transaction (ingest applies a
    /// batch of receipts in one transaction, each seeing the previous ones).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn events_for(&self, dispatch_id: &str) -> Result<Vec<EventRow>> {
        db::events_for(&self.tx, self.path, dispatch_id)
    }

    /// [`super::Db::find_by_content_hash`] inside this transaction (the outbox checks
    /// for a duplicate and inserts under one lock).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn find_by_content_hash(
        &self,
        mailbox: &str,
        content_hash: &str,
    ) -> Result<Option<DispatchRow>> {
        db::find_by_content_hash(&self.tx, self.path, mailbox, content_hash)
    }

    /// An archived message, as this transaction sees it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn message(&self, sha256: &str) -> Result<Option<MessageRow>> {
        db::message(&self.tx, self.path, sha256)
    }

    fn require_dispatch(&self, dispatch_id: &str) -> Result<DispatchRow> {
        self.dispatch(dispatch_id)?
            .ok_or_else(|| StoreError::NotFound(format!("dispatch {dispatch_id}")))
    }

    /// Records a new letter: the dispatch as `queued`, its recipients as `pending` (in
    /// order, lower case), its documents, and the `dispatch.queued` event whose detail
    /// repeats all of it (the log alone tells what was asked).
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] when the id is not a canonical ULID, a hash is not
    /// SHA-256 hex, there is no recipient, or an address or document name repeats;
    /// [`StoreError::Sqlite`] when the id is already taken ([`StoreError::is_constraint`]).
    pub fn insert_dispatch(&self, d: &NewDispatch) -> Result<()> {
        self.queue_dispatch(d, "insert_dispatch", "outbox", None)
    }

    /// What [`Tx::insert_dispatch`] and [`Tx::restore_dispatch`] share: the
    /// checks, the `queued` dispatch row with its recipients and documents,
    /// and the `dispatch.queued` event (with `restored_from` after `to` when
    /// the letter is restored).
    pub(super) fn queue_dispatch(
        &self,
        d: &NewDispatch,
        op: &'static str,
        cause: &str,
        restored_from: Option<&str>,
    ) -> Result<()> {
        if super::canonical_dispatch_id(&d.id).as_deref() != Some(d.id.as_str()) {
            return Err(StoreError::Invalid(format!(
                "dispatch id {:?} is not a ULID",
                d.id
            )));
        }
        check_sha256("content hash", &d.content_hash)?;
        if d.recipients.is_empty() {
            return Err(StoreError::Invalid(format!(
                "dispatch {}: no recipient",
                d.id
            )));
        }
        let mut addresses: Vec<String> = Vec::with_capacity(d.recipients.len());
        for r in &d.recipients {
            let a = canonical_address(&r.address);
            if a.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "dispatch {}: empty address",
                    d.id
                )));
            }
            if addresses.contains(&a) {
                return Err(StoreError::Invalid(format!(
                    "dispatch {}: recipient {a} listed twice",
                    d.id
                )));
            }
            addresses.push(a);
        }
        for (i, doc) in d.documents.iter().enumerate() {
            check_sha256("document hash", &doc.sha256)?;
            if d.documents[..i].iter().any(|o| o.name == doc.name) {
                return Err(StoreError::Invalid(format!(
                    "dispatch {}: document {:?} listed twice",
                    d.id, doc.name
                )));
            }
        }
        let at = time::fmt(d.created_at);
        self.tx
            .prepare_cached(
                "INSERT INTO dispatches (id, mailbox, kind, protocol, reference, subject, \
                 receipt_type, in_reply_to, state, content_hash, source, sent_dir, created_at, \
                 updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'queued', ?9, ?10, ?11, \
                 ?12, ?12)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    d.id,
                    d.mailbox,
                    d.kind,
                    d.protocol,
                    d.reference,
                    d.subject,
                    d.receipt_type,
                    d.in_reply_to,
                    d.content_hash,
                    d.source,
                    d.sent_dir,
                    at
                ])
            })
            .map_err(self.err(op))?;
        {
            let mut stmt = self
                .tx
                .prepare_cached(
                    "INSERT INTO recipients (dispatch_id, address, position, field, state, \
                     updated_at) VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                )
                .map_err(self.err(op))?;
            for (i, (r, a)) in d.recipients.iter().zip(&addresses).enumerate() {
                stmt.execute(params![d.id, a, i as i64, r.field.as_str(), at])
                    .map_err(self.err(op))?;
            }
            let mut stmt = self
                .tx
                .prepare_cached(
                    "INSERT INTO documents (dispatch_id, position, name, sha256, size) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(self.err(op))?;
            for (i, doc) in d.documents.iter().enumerate() {
                stmt.execute(params![
                    d.id,
                    i as i64,
                    doc.name,
                    doc.sha256,
                    size(doc.size)?
                ])
                .map_err(self.err(op))?;
            }
        }
        let recipients: Vec<Value> = d
            .recipients
            .iter()
            .zip(&addresses)
            .map(|(r, a)| json!({"address": a, "field": r.field.as_str()}))
            .collect();
        let documents: Vec<Value> = d
            .documents
            .iter()
            .map(|doc| json!({"name": doc.name, "sha256": doc.sha256, "size": doc.size}))
            .collect();
        let mut detail = serde_json::Map::new();
        detail.insert("to".into(), json!("queued"));
        if let Some(from) = restored_from {
            detail.insert("restored_from".into(), json!(from));
        }
        for (key, value) in [
            ("source", json!(d.source)),
            ("content_hash", json!(d.content_hash)),
            ("kind", json!(d.kind)),
            ("protocol", json!(d.protocol)),
            ("reference", json!(d.reference)),
            ("subject", json!(d.subject)),
            ("receipt_type", json!(d.receipt_type)),
            ("in_reply_to", json!(d.in_reply_to)),
            ("sent_dir", json!(d.sent_dir)),
            ("recipients", Value::Array(recipients)),
            ("documents", Value::Array(documents)),
        ] {
            detail.insert(key.into(), value);
        }
        self.append_event(&NewEvent {
            at: d.created_at,
            mailbox: Some(d.mailbox.clone()),
            dispatch_id: Some(d.id.clone()),
            event: "dispatch.queued".into(),
            cause: cause.into(),
            detail: Value::Object(detail),
        })?;
        Ok(())
    }

    /// Commits attempt `n` (the next number) as `sending` with its Message-ID and the
    /// SHA-256 of the exact bytes about to be sent (recorded first with
    /// [`Tx::record_message`]), and the dispatch as `sending`. Call it, and let it
    /// commit, *before* the SMTP transaction starts.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown dispatch; [`StoreError::Invalid`] when
    /// the dispatch is not `queued` or the Message-ID is empty; [`StoreError::Sqlite`]
    /// when the message was not recorded or the Message-ID was used before.
    pub fn begin_attempt(
        &self,
        dispatch_id: &str,
        message_id: &str,
        eml_sha256: &str,
        at: Timestamp,
    ) -> Result<u32> {
        const OP: &str = "begin_attempt";
        let d = self.require_dispatch(dispatch_id)?;
        if d.state != "queued" {
            return Err(StoreError::Invalid(format!(
                "dispatch {dispatch_id} is {}: only a queued dispatch can be sent",
                d.state
            )));
        }
        let mid = normalize_message_id(message_id)
            .ok_or_else(|| StoreError::Invalid("empty message id".into()))?;
        check_sha256("message hash", eml_sha256)?;
        let n: u32 = self
            .tx
            .prepare_cached("SELECT coalesce(max(n), 0) + 1 FROM attempts WHERE dispatch_id = ?1")
            .and_then(|mut s| s.query_row([dispatch_id], |r| r.get(0)))
            .map_err(self.err(OP))?;
        let ts = time::fmt(at);
        self.tx
            .prepare_cached(
                "INSERT INTO attempts (dispatch_id, n, message_id, state, eml_sha256, started_at) \
                 VALUES (?1, ?2, ?3, 'sending', ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![dispatch_id, n, mid, eml_sha256, ts]))
            .map_err(self.err(OP))?;
        self.update_dispatch_state(&d, "sending", &ts, None, OP)?;
        self.append_event(&NewEvent {
            at,
            mailbox: Some(d.mailbox.clone()),
            dispatch_id: Some(d.id.clone()),
            event: "dispatch.sending".into(),
            cause: "smtp".into(),
            detail: json!({
                "from": d.state, "to": "sending", "attempt": n, "message_id": mid,
                "eml_sha256": eml_sha256,
            }),
        })?;
        Ok(n)
    }

    /// The relay answered 250 to DATA: attempt `n` and the dispatch become `submitted`
    /// (the dispatch's `error` is cleared).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown attempt; [`StoreError::Invalid`] when it
    /// is not `sending`; [`StoreError::Sqlite`].
    pub fn attempt_submitted(
        &self,
        dispatch_id: &str,
        n: u32,
        reply: &str,
        at: Timestamp,
    ) -> Result<()> {
        self.finish_attempt(
            dispatch_id,
            n,
            at,
            Finish {
                attempt_state: "submitted",
                dispatch_state: "submitted",
                reply: Some(reply),
                error: Some(None),
                cause: "smtp",
                op: "attempt_submitted",
            },
        )
    }

    /// A transient failure the relay reported before accepting DATA (4xx, connection
    /// refused): attempt `n` becomes `failed-transient`, the dispatch `queued` again
    /// with `reply` as its error.
    ///
    /// # Errors
    ///
    /// As [`Tx::attempt_submitted`].
    pub fn attempt_transient(
        &self,
        dispatch_id: &str,
        n: u32,
        reply: &str,
        at: Timestamp,
    ) -> Result<()> {
        self.finish_attempt(
            dispatch_id,
            n,
            at,
            Finish {
                attempt_state: "failed-transient",
                dispatch_state: "queued",
                reply: Some(reply),
                error: Some(Some(reply)),
                cause: "smtp",
                op: "attempt_transient",
            },
        )
    }

    /// The relay refused the letter for good (5xx): attempt `n` and the dispatch become
    /// `refused`, with `reply` as the error.
    ///
    /// # Errors
    ///
    /// As [`Tx::attempt_submitted`].
    pub fn attempt_refused(
        &self,
        dispatch_id: &str,
        n: u32,
        reply: &str,
        at: Timestamp,
    ) -> Result<()> {
        self.finish_attempt(
            dispatch_id,
            n,
            at,
            Finish {
                attempt_state: "refused",
                dispatch_state: "refused",
                reply: Some(reply),
                error: Some(Some(reply)),
                cause: "smtp",
                op: "attempt_refused",
            },
        )
    }

    /// Nobody knows whether the relay took attempt `n` (found `sending` at start-up, or
    /// the connection broke after DATA): it and the dispatch become `uncertain`, never
    /// to be resent blindly. `cause` is the event's cause and the dispatch's error.
    ///
    /// # Errors
    ///
    /// As [`Tx::attempt_submitted`].
    pub fn mark_uncertain(
        &self,
        dispatch_id: &str,
        n: u32,
        cause: &str,
        at: Timestamp,
    ) -> Result<()> {
        self.finish_attempt(
            dispatch_id,
            n,
            at,
            Finish {
                attempt_state: "uncertain",
                dispatch_state: "uncertain",
                reply: None,
                error: Some(Some(cause)),
                cause,
                op: "mark_uncertain",
            },
        )
    }

    /// A receipt from the provider proved that the attempt with `message_id` reached
    /// it: a `sending` or `uncertain` attempt becomes `submitted` (the dispatch's
    /// state is the receipt's business: [`Tx::set_dispatch_state`]). Returns whether a
    /// row changed. The event is written by the caller, with the receipt's detail.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn attempt_proven(
        &self,
        dispatch_id: &str,
        message_id: &str,
        at: Timestamp,
    ) -> Result<bool> {
        const OP: &str = "attempt_proven";
        let mid = normalize_message_id(message_id).unwrap_or_else(|| message_id.to_owned());
        let n = self
            .tx
            .prepare_cached(
                "UPDATE attempts SET state = 'submitted', finished_at = coalesce(finished_at, ?3) \
                 WHERE dispatch_id = ?1 AND message_id = ?2 AND state IN ('sending', 'uncertain')",
            )
            .and_then(|mut s| s.execute(params![dispatch_id, mid, time::fmt(at)]))
            .map_err(self.err(OP))?;
        Ok(n > 0)
    }

    fn finish_attempt(
        &self,
        dispatch_id: &str,
        n: u32,
        at: Timestamp,
        f: Finish<'_>,
    ) -> Result<()> {
        let op = f.op;
        let attempt: Option<(String, String, Option<String>)> = self
            .tx
            .prepare_cached(
                "SELECT state, message_id, smtp_reply FROM attempts \
                 WHERE dispatch_id = ?1 AND n = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![dispatch_id, n], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
            })
            .map_err(self.err(op))?;
        let (state, message_id, earlier_reply) = attempt.ok_or_else(|| {
            StoreError::NotFound(format!("attempt {n} of dispatch {dispatch_id}"))
        })?;
        let d = self.require_dispatch(dispatch_id)?;
        let ts = time::fmt(at);
        // `submitted` without an SMTP reply: proven by a receipt
        // ([`Tx::attempt_proven`]); with one, already finished by SMTP.
        if state == "submitted" && earlier_reply.is_none() {
            // A receipt from the provider (ingested while the SMTP reply was
            // still on its way) already proved this attempt reached it, and
            // the receipt's state stands: the SMTP outcome is only recorded.
            self.tx
                .prepare_cached(
                    "UPDATE attempts SET smtp_reply = coalesce(?3, smtp_reply) \
                     WHERE dispatch_id = ?1 AND n = ?2",
                )
                .and_then(|mut s| s.execute(params![dispatch_id, n, f.reply]))
                .map_err(self.err(op))?;
            self.append_event(&NewEvent {
                at,
                mailbox: Some(d.mailbox.clone()),
                dispatch_id: Some(d.id.clone()),
                event: "attempt.smtp_outcome".into(),
                cause: f.cause.to_owned(),
                detail: json!({
                    "attempt": n, "message_id": message_id, "smtp_outcome": f.attempt_state,
                    "smtp_reply": f.reply, "kept": "submitted (proven by a receipt)",
                }),
            })?;
            return Ok(());
        }
        if state != "sending" {
            return Err(StoreError::Invalid(format!(
                "attempt {n} of dispatch {dispatch_id} is {state}, not sending"
            )));
        }
        self.tx
            .prepare_cached(
                "UPDATE attempts SET state = ?3, finished_at = ?4, \
                 smtp_reply = coalesce(?5, smtp_reply) WHERE dispatch_id = ?1 AND n = ?2",
            )
            .and_then(|mut s| s.execute(params![dispatch_id, n, f.attempt_state, ts, f.reply]))
            .map_err(self.err(op))?;
        self.update_dispatch_state(&d, f.dispatch_state, &ts, f.error, op)?;
        self.append_event(&NewEvent {
            at,
            mailbox: Some(d.mailbox.clone()),
            dispatch_id: Some(d.id.clone()),
            event: format!("dispatch.{}", f.dispatch_state),
            cause: f.cause.to_owned(),
            detail: json!({
                "from": d.state, "to": f.dispatch_state, "attempt": n,
                "attempt_state": f.attempt_state, "message_id": message_id,
                "smtp_reply": f.reply,
            }),
        })?;
        Ok(())
    }

    /// Sets state, `updated_at` and (when `error` is `Some`) the error column.
    fn update_dispatch_state(
        &self,
        d: &DispatchRow,
        state: &str,
        ts: &str,
        error: Option<Option<&str>>,
        op: &'static str,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE dispatches SET state = ?2, updated_at = ?3, \
                 error = CASE WHEN ?4 THEN ?5 ELSE error END WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![d.id, state, ts, error.is_some(), error.flatten()]))
            .map_err(self.err(op))?;
        Ok(())
    }

    /// Records an archived message in the index; `Ok(false)` (and no change) when its
    /// SHA-256 is already there: content-addressed, the first record stands.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for a malformed SHA-256; [`StoreError::Sqlite`].
    pub fn record_message(&self, m: &MessageRow) -> Result<bool> {
        const OP: &str = "record_message";
        check_sha256("message hash", &m.sha256)?;
        let sz = size(m.size)?;
        let n = self
            .tx
            .prepare_cached(
                "INSERT INTO messages (sha256, path, size, direction, mailbox, imap_uid, \
                 imap_uidvalidity, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (sha256) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    m.sha256,
                    m.path,
                    sz,
                    m.direction.as_str(),
                    m.mailbox,
                    m.imap_uid,
                    m.imap_uidvalidity,
                    time::fmt(m.recorded_at)
                ])
            })
            .map_err(self.err(OP))?;
        Ok(n == 1)
    }

    /// Sets a dispatch's state (any of [`DISPATCH_STATES`]; the transition itself is
    /// `pec::state`'s decision) and the optional columns in `change`, and appends
    /// `dispatch.<state>` with `{from, to}` merged into `change.detail`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for an unknown state; [`StoreError::NotFound`] for an
    /// unknown dispatch; [`StoreError::Sqlite`].
    pub fn set_dispatch_state(&self, dispatch_id: &str, change: &DispatchChange) -> Result<()> {
        const OP: &str = "set_dispatch_state";
        check_name("dispatch state", DISPATCH_STATES, &change.state)?;
        let d = self.require_dispatch(dispatch_id)?;
        let ts = time::fmt(change.at);
        self.tx
            .prepare_cached(
                "UPDATE dispatches SET state = ?2, updated_at = ?3, \
                 identificativo = coalesce(?4, identificativo), \
                 accepted_at = coalesce(?5, accepted_at), \
                 error = CASE WHEN ?6 IS NULL THEN error ELSE nullif(?6, '') END \
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    d.id,
                    change.state,
                    ts,
                    change.identificativo,
                    change.accepted_at.map(time::fmt),
                    change.error
                ])
            })
            .map_err(self.err(OP))?;
        let mut detail = object(&change.detail);
        detail.insert("from".into(), json!(d.state));
        detail.insert("to".into(), json!(change.state));
        if let Some(i) = &change.identificativo {
            detail.insert("identificativo".into(), json!(i));
        }
        if let Some(e) = &change.error {
            detail.insert("error".into(), json!(e));
        }
        self.append_event(&NewEvent {
            at: change.at,
            mailbox: Some(d.mailbox),
            dispatch_id: Some(d.id),
            event: format!("dispatch.{}", change.state),
            cause: change.cause.clone(),
            detail: Value::Object(detail),
        })?;
        Ok(())
    }

    /// Sets a recipient's state (any of [`RECIPIENT_STATES`]) and the optional columns
    /// in `change`, and appends `recipient.<state>` with `{recipient, from, to}` merged
    /// into `change.detail`. `address` is matched case-insensitively.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for an unknown state; [`StoreError::NotFound`] for an
    /// unknown dispatch or recipient; [`StoreError::Sqlite`].
    pub fn set_recipient_state(
        &self,
        dispatch_id: &str,
        address: &str,
        change: &RecipientChange,
    ) -> Result<()> {
        const OP: &str = "set_recipient_state";
        check_name("recipient state", RECIPIENT_STATES, &change.state)?;
        let d = self.require_dispatch(dispatch_id)?;
        let address = canonical_address(address);
        let from: String = self
            .tx
            .prepare_cached("SELECT state FROM recipients WHERE dispatch_id = ?1 AND address = ?2")
            .and_then(|mut s| {
                s.query_row([dispatch_id, &address], |r| r.get(0))
                    .optional()
            })
            .map_err(self.err(OP))?
            .ok_or_else(|| {
                StoreError::NotFound(format!("recipient {address} of dispatch {dispatch_id}"))
            })?;
        self.tx
            .prepare_cached(
                "UPDATE recipients SET state = ?3, updated_at = ?4, \
                 certified = coalesce(?5, certified), \
                 detail = CASE WHEN ?6 IS NULL THEN detail ELSE nullif(?6, '') END, \
                 conflict = CASE WHEN ?7 IS NULL THEN conflict ELSE nullif(?7, '') END \
                 WHERE dispatch_id = ?1 AND address = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    dispatch_id,
                    address,
                    change.state,
                    time::fmt(change.at),
                    change.certified,
                    change.note,
                    change.conflict
                ])
            })
            .map_err(self.err(OP))?;
        let mut detail = object(&change.detail);
        detail.insert("recipient".into(), json!(address));
        detail.insert("from".into(), json!(from));
        detail.insert("to".into(), json!(change.state));
        if let Some(c) = change.certified {
            detail.insert("certified".into(), json!(c));
        }
        if let Some(n) = &change.note {
            detail.insert("note".into(), json!(n));
        }
        if let Some(c) = &change.conflict {
            detail.insert("conflict".into(), json!(c));
        }
        self.append_event(&NewEvent {
            at: change.at,
            mailbox: Some(d.mailbox),
            dispatch_id: Some(d.id),
            event: format!("recipient.{}", change.state),
            cause: change.cause.clone(),
            detail: Value::Object(detail),
        })?;
        Ok(())
    }

    /// Records a receipt (its message recorded first) and appends
    /// `receipt.<disposition>`; `Ok(None)` and no change when that message already has
    /// a receipt row. Returns the new row id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for an unknown verdict or disposition;
    /// [`StoreError::NotFound`] when the message is not recorded; [`StoreError::Sqlite`]
    /// (e.g. an unknown dispatch).
    pub fn record_receipt(&self, r: &NewReceipt) -> Result<Option<i64>> {
        const OP: &str = "record_receipt";
        check_name("verdict", VERDICTS, &r.verdict)?;
        check_name("disposition", DISPOSITIONS, &r.disposition)?;
        let m = self
            .message(&r.message_sha256)?
            .ok_or_else(|| StoreError::NotFound(format!("message {}", r.message_sha256)))?;
        let recipient = r.recipient.as_deref().map(canonical_address);
        let msgid = r.msgid.as_deref().and_then(normalize_message_id);
        let n = self
            .tx
            .prepare_cached(
                "INSERT INTO receipts (message_sha256, kind, verdict, reason, dispatch_id, \
                 recipient, identificativo, msgid, disposition, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (message_sha256) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    r.message_sha256,
                    r.kind,
                    r.verdict,
                    r.reason,
                    r.dispatch_id,
                    recipient,
                    r.identificativo,
                    msgid,
                    r.disposition,
                    time::fmt(r.created_at)
                ])
            })
            .map_err(self.err(OP))?;
        if n == 0 {
            return Ok(None);
        }
        let id = self.tx.last_insert_rowid();
        self.append_event(&NewEvent {
            at: r.created_at,
            mailbox: Some(m.mailbox),
            dispatch_id: r.dispatch_id.clone(),
            event: format!("receipt.{}", r.disposition),
            cause: "ingest".into(),
            detail: json!({
                "receipt": id, "message_sha256": r.message_sha256, "kind": r.kind,
                "verdict": r.verdict, "reason": r.reason, "recipient": recipient,
                "identificativo": r.identificativo, "msgid": msgid,
            }),
        })?;
        Ok(Some(id))
    }

    /// Records incoming certified mail (its envelope recorded first) and appends
    /// `incoming.received`; `Ok(false)` and no change when already recorded.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] (e.g. the message is not recorded).
    pub fn record_incoming(&self, i: &IncomingRow) -> Result<bool> {
        const OP: &str = "record_incoming";
        let n = self
            .tx
            .prepare_cached(
                "INSERT INTO incoming (message_sha256, mailbox, identificativo, mittente, \
                 oggetto, folder, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (message_sha256) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    i.message_sha256,
                    i.mailbox,
                    i.identificativo,
                    i.mittente,
                    i.oggetto,
                    i.folder,
                    time::fmt(i.created_at)
                ])
            })
            .map_err(self.err(OP))?;
        if n == 0 {
            return Ok(false);
        }
        self.append_event(&NewEvent {
            at: i.created_at,
            mailbox: Some(i.mailbox.clone()),
            dispatch_id: None,
            event: "incoming.received".into(),
            cause: "ingest".into(),
            detail: json!({
                "message_sha256": i.message_sha256, "identificativo": i.identificativo,
                "mittente": i.mittente, "oggetto": i.oggetto, "folder": i.folder,
            }),
        })?;
        Ok(true)
    }

    /// Writes a mailbox's IMAP state (insert or replace every column). A change of
    /// suspension appends `mailbox.suspended` or `mailbox.resumed` with `cause`; cursor
    /// and quota updates write no event (they are bookkeeping, not state).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn set_mailbox_state(&self, st: &MailboxState, cause: &str) -> Result<()> {
        const OP: &str = "set_mailbox_state";
        let before = db::mailbox_state(&self.tx, self.path, &st.mailbox)?;
        let was = before.and_then(|b| b.suspended_reason);
        self.tx
            .prepare_cached(
                "INSERT INTO mailbox_state (mailbox, uidvalidity, last_uid, last_sync_at, \
                 suspended_reason, quota_used, quota_limit, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (mailbox) DO UPDATE SET uidvalidity = excluded.uidvalidity, \
                 last_uid = excluded.last_uid, last_sync_at = excluded.last_sync_at, \
                 suspended_reason = excluded.suspended_reason, \
                 quota_used = excluded.quota_used, quota_limit = excluded.quota_limit, \
                 updated_at = excluded.updated_at",
            )
            .and_then(|mut s| {
                let conv = |v: Option<u64>| {
                    v.map(|v| {
                        i64::try_from(v)
                            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))
                    })
                    .transpose()
                };
                s.execute(params![
                    st.mailbox,
                    st.uidvalidity,
                    st.last_uid,
                    st.last_sync_at.map(time::fmt),
                    st.suspended_reason,
                    conv(st.quota_used)?,
                    conv(st.quota_limit)?,
                    time::fmt(st.updated_at)
                ])
            })
            .map_err(self.err(OP))?;
        let event = match (&was, &st.suspended_reason) {
            (None, Some(_)) => Some("mailbox.suspended"),
            (Some(a), Some(b)) if a != b => Some("mailbox.suspended"),
            (Some(_), None) => Some("mailbox.resumed"),
            _ => None,
        };
        if let Some(event) = event {
            self.append_event(&NewEvent {
                at: st.updated_at,
                mailbox: Some(st.mailbox.clone()),
                dispatch_id: None,
                event: event.into(),
                cause: cause.into(),
                detail: json!({"reason": st.suspended_reason, "previous_reason": was}),
            })?;
        }
        Ok(())
    }
}

/// `detail` as a JSON object: an object is copied, `null` is empty, anything else is
/// kept under `"detail"`.
fn object(detail: &Value) -> serde_json::Map<String, Value> {
    match detail {
        Value::Object(m) => m.clone(),
        Value::Null => serde_json::Map::new(),
        other => {
            let mut m = serde_json::Map::new();
            m.insert("detail".into(), other.clone());
            m
        }
    }
}

pub(super) fn check_sha256(what: &str, s: &str) -> Result<()> {
    if s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} {s:?} is not a lowercase hex SHA-256"
        )))
    }
}

fn size(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| StoreError::Invalid(format!("size {n} too large")))
}
