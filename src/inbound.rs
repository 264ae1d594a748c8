//! The inbound tasks of `pecgate run`, per mailbox (DESIGN.md, "Inbound"):
//!
//! - [`watch_task`]: the IMAP session ([`crate::imap::run_batched`]) feeding
//!   each fetched batch to [`crate::ingest`] on the store thread, and keeping the
//!   cursor (UIDVALIDITY, last UID, last sync, quota) in the store;
//! - [`timer_task`]: the deadlines of the pure core
//!   ([`crate::pec::policy::Deadlines`]): acceptance overdue (warning),
//!   stale recipients (error, a derived flag), and the one automatic resend
//!   of an `uncertain` letter once its grace has passed **and the mailbox
//!   was read past it** (never while the mailbox cannot be read);
//! - [`retention_task`]: server-side retention of messages archived and
//!   recorded long enough ago, on its own read-write session.
//!
//! [`decide`] applies a timer's or an operator's decision
//! (`GraceResend`, `ResolveResend`, `ResolveMarkSent`) through the pure
//! state machine and writes it in one store transaction; `pecgate resolve`
//! uses it too.
//!
//! Ordering: the cursor is saved after the messages it covers were
//! ingested (ingest archives and commits first), so a crash re-fetches at
//! most one batch ([`crate::imap::LARGE_BATCH`] messages, taken in by
//! [`crate::ingest::ingest_batch`] in one store transaction), which ingest
//! recognises by their SHA-256.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Config, MailboxConfig};
use crate::imap::{self, Cursor, SyncEvent};
use crate::ingest::{Ingest, IngestOutcome, Source, dispatch_from_store};
use crate::pec::policy::{self, Deadlines, Due};
use crate::pec::state::{AttemptState, Change, DispatchState, Event, Outcome};
use crate::store::{self, CursorUpdate, Db, DeadlineCutoffs, DispatchChange, NewEvent, Store};
use crate::telemetry::{event, field};

/// Longest sleep of the deadline timer.
const TIMER_MAX: Duration = Duration::from_secs(30);
/// Shortest sleep of the deadline timer.
const TIMER_MIN: Duration = Duration::from_secs(1);
/// UIDs handled per retention pass.
const RETENTION_BATCH: u32 = 500;

// ---------------------------------------------------------------------------
// IMAP → ingest

/// Watches `mailbox`'s IMAP folder until `cancel`, ingesting every message
/// on the store thread. `synced` is notified after every completed sync (the
/// timer uses it: a grace decision needs a fresh sync).
pub async fn watch_task(
    mailbox: MailboxConfig,
    store: Store,
    ingest: Ingest,
    synced: Arc<Notify>,
    cancel: CancellationToken,
) {
    let name = mailbox.name.clone();
    let key = name.clone();
    let cursor = match store.call(move |db| db.mailbox_state(&key)).await {
        Ok(Some(st)) => Cursor {
            uidvalidity: st.uidvalidity,
            last_uid: st.last_uid,
        },
        Ok(None) => Cursor::default(),
        Err(e) => {
            error!({ field::MAILBOX } = %name, { field::ERROR } = %e, "store: cannot read the imap cursor; inbound stopped");
            return;
        }
    };
    let mailbox = Arc::new(mailbox);
    let handler = {
        let mailbox = mailbox.clone();
        move |ev: SyncEvent| {
            let store = store.clone();
            let ingest = ingest.clone();
            let mailbox = mailbox.clone();
            let synced = synced.clone();
            async move {
                handle(&store, &ingest, &mailbox, ev, &synced)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    };
    let imap_cfg = mailbox.imap.clone();
    let end = imap::run_batched(&name, imap_cfg, cursor, handler, cancel).await;
    debug!({ field::MAILBOX } = %name, last_uid = end.last_uid, "imap watch ended");
}

async fn handle(
    store: &Store,
    ingest: &Ingest,
    mailbox: &Arc<MailboxConfig>,
    ev: SyncEvent,
    synced: &Notify,
) -> Result<(), String> {
    let name = mailbox.name.clone();
    let now = Timestamp::now();
    match ev {
        // `run_batched` hands over whole batches; a single message is a
        // batch of one.
        SyncEvent::Message(f) => ingest_fetched(store, ingest, mailbox, vec![f], now).await,
        SyncEvent::Messages(batch) => ingest_fetched(store, ingest, mailbox, batch, now).await,
        SyncEvent::UidValidityChanged { old, new } => store
            .call(move |db| {
                db.save_cursor(&CursorUpdate {
                    mailbox: &name,
                    uidvalidity: Some(new),
                    last_uid: None,
                    synced: false,
                    quota: None,
                    at: now,
                })?;
                db.append_event(&NewEvent {
                    at: now,
                    mailbox: Some(name.clone()),
                    dispatch_id: None,
                    event: event::MAILBOX_UIDVALIDITY_CHANGED.into(),
                    cause: "imap".into(),
                    detail: json!({"old": old, "new": new}),
                })?;
                Ok(())
            })
            .await
            .map_err(|e| format!("store: {e}")),
        SyncEvent::Quota { used, limit } => store
            .call(move |db| {
                db.save_cursor(&CursorUpdate {
                    mailbox: &name,
                    uidvalidity: None,
                    last_uid: None,
                    synced: false,
                    quota: Some((used, limit)),
                    at: now,
                })
            })
            .await
            .map_err(|e| format!("store: {e}")),
        SyncEvent::Synced {
            uidvalidity,
            last_uid,
            at,
        } => {
            let n = name.clone();
            store
                .call(move |db| {
                    db.save_cursor(&CursorUpdate {
                        mailbox: &n,
                        uidvalidity: Some(uidvalidity),
                        last_uid: (last_uid > 0).then_some(last_uid),
                        synced: true,
                        quota: None,
                        at,
                    })
                })
                .await
                .map_err(|e| format!("store: {e}"))?;
            debug!({ field::EVENT } = event::MAILBOX_SYNCED, { field::MAILBOX } = %name, { field::UID } = last_uid, "mailbox synced");
            synced.notify_waiters();
            Ok(())
        }
    }
}

/// Takes a fetched batch in (one store job, one transaction) and moves the
/// cursor past it after the commit.
async fn ingest_fetched(
    store: &Store,
    ingest: &Ingest,
    mailbox: &Arc<MailboxConfig>,
    batch: Vec<imap::Fetched>,
    now: Timestamp,
) -> Result<(), String> {
    let name = mailbox.name.clone();
    let Some(last) = batch.last() else {
        return Ok(());
    };
    let (last_uid, uidvalidity) = (last.uid, last.uidvalidity);
    let (first_uid, count) = (batch[0].uid, batch.len());
    let (ingest, mb) = (ingest.clone(), mailbox.clone());
    let outcomes = store
        .call(move |db| {
            let items: Vec<(&[u8], Source)> = batch
                .iter()
                .map(|f| {
                    let source = Source {
                        uid: Some(f.uid),
                        uidvalidity: Some(f.uidvalidity),
                    };
                    (f.bytes.as_slice(), source)
                })
                .collect();
            let out = ingest.ingest_batch(db, &mb, &items, now);
            if out.is_ok() {
                // After the batch's commit: a crash before this
                // line re-fetches the batch, which ingest
                // recognises by SHA-256.
                db.save_cursor(&CursorUpdate {
                    mailbox: &mb.name,
                    uidvalidity: Some(uidvalidity),
                    last_uid: Some(last_uid),
                    synced: false,
                    quota: None,
                    at: now,
                })?;
            }
            Ok(out.map(|o| batch.iter().map(|f| f.uid).zip(o).collect::<Vec<_>>()))
        })
        .await
        .map_err(|e| format!("store: {e}"))?
        .map_err(|e| format!("ingest of uids {first_uid}..{last_uid} ({count} messages): {e}"))?;
    for (uid, outcome) in &outcomes {
        log_outcome(&name, *uid, outcome);
    }
    Ok(())
}

fn log_outcome(mailbox: &str, uid: u32, o: &IngestOutcome) {
    // ingest logs the PEC-level events itself (receipt.*, signature.*);
    // this is the per-message trace.
    let what = match o {
        IngestOutcome::Applied { .. } => "applied",
        IngestOutcome::Duplicate { .. } => "duplicate",
        IngestOutcome::Quarantined { .. } => "quarantined",
        IngestOutcome::Orphan { .. } => "orphan",
        IngestOutcome::Incoming { .. } => "incoming",
        IngestOutcome::Anomaly { .. } => "anomaly",
        IngestOutcome::NotPec => "not-pec",
        IngestOutcome::Unreadable { .. } => "unreadable",
    };
    debug!({ field::MAILBOX } = %mailbox, { field::UID } = uid, outcome = what, "message taken in");
}

// ---------------------------------------------------------------------------
// Deadlines

/// What one timer pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TimerReport {
    /// Letters newly reported as lacking their acceptance.
    pub overdue: usize,
    /// Recipients newly flagged stale.
    pub stale: usize,
    /// Uncertain letters queued again by the grace rule.
    pub resent: usize,
}

/// One pass of the deadline rules over `mailbox` at `now` (blocking: the
/// store thread). Each deadline is reported once (an event in the store
/// and a log line); the grace resend happens only when the mailbox's last
/// completed sync is itself past the grace period, so a mailbox that cannot
/// be read never causes a resend.
///
/// # Errors
/// Store failures, or a stored state the core cannot read.
pub fn timer_pass(
    db: &mut Db,
    mailbox: &str,
    rules: &Deadlines,
    now: Timestamp,
) -> Result<TimerReport, String> {
    let mut report = TimerReport::default();
    let last_sync = db
        .mailbox_state(mailbox)
        .map_err(|e| e.to_string())?
        .and_then(|s| s.last_sync_at);
    let before = |d: SignedDuration| now.checked_sub(d).unwrap_or(now);
    let cut = DeadlineCutoffs {
        submitted_before: before(rules.acceptance),
        uncertain_before: before(rules.uncertain_grace),
        accepted_before: before(rules.delivery),
    };
    let ids = db
        .deadline_candidates(mailbox, &cut)
        .map_err(|e| e.to_string())?;
    for id in ids {
        let Some(detail) = db.get(&id).map_err(|e| e.to_string())? else {
            continue;
        };
        let events = db.events_for(&id).map_err(|e| e.to_string())?;
        let d = dispatch_from_store(&detail, &events).map_err(|e| format!("dispatch {id}: {e}"))?;
        let timer = TimerEvent {
            mailbox,
            id: &id,
            now,
        };
        for due in rules.due(&d, now) {
            match due {
                Due::AcceptanceOverdue { submitted_at } => {
                    let detail = json!({"submitted_at": crate::sent::ts(submitted_at),
                        "limit_seconds": rules.acceptance.as_secs()});
                    if !timer.log_once(db, event::DEADLINE_ACCEPTANCE_OVERDUE, None, detail)? {
                        continue;
                    }
                    warn!({ field::EVENT } = event::DEADLINE_ACCEPTANCE_OVERDUE, { field::DISPATCH_ID } = %id, { field::MAILBOX } = %mailbox, submitted_at = %submitted_at, "no acceptance receipt within the configured time");
                    report.overdue += 1;
                }
                Due::Stale { address } => {
                    let address = address.to_lowercase();
                    let detail = json!({"recipient": address,
                        "accepted_at": d.accepted_at.map(crate::sent::ts),
                        "limit_seconds": rules.delivery.as_secs()});
                    if !timer.log_once(db, event::DEADLINE_STALE, Some(&address), detail)? {
                        continue;
                    }
                    error!({ field::EVENT } = event::DEADLINE_STALE, { field::DISPATCH_ID } = %id, { field::MAILBOX } = %mailbox, { field::RECIPIENT } = %address, "no delivery or failure receipt within the configured hours: the recipient may have to be reached otherwise");
                    report.stale += 1;
                }
                Due::GraceExpired => {
                    // The acceptance may simply not have been read yet:
                    // judge the grace by the last completed sync, not by
                    // the clock.
                    let Some(sync) = last_sync else { continue };
                    if !policy::grace_expired(&d, sync, rules.uncertain_grace) {
                        continue;
                    }
                    match decide(db, &id, &Event::GraceResend, "timer.grace", now) {
                        Ok(_) => {
                            warn!({ field::EVENT } = event::DISPATCH_GRACE_RESEND, { field::DISPATCH_ID } = %id, { field::MAILBOX } = %mailbox, last_sync = %sync, "uncertain letter without acceptance after the grace period: sending it once more with a new Message-ID");
                            report.resent += 1;
                        }
                        Err(DecideError::Rejected(why)) => {
                            debug!({ field::DISPATCH_ID } = %id, reason = %why, "grace resend not applicable");
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
        }
    }
    Ok(report)
}

/// A deadline event the timer logs (cause `timer`) for one dispatch.
struct TimerEvent<'a> {
    mailbox: &'a str,
    id: &'a str,
    now: Timestamp,
}

impl TimerEvent<'_> {
    /// Appends `name` with `detail` unless the dispatch's log already has it
    /// (for `recipient`, when given): true when it was appended.
    fn log_once(
        &self,
        db: &mut Db,
        name: &str,
        recipient: Option<&str>,
        detail: serde_json::Value,
    ) -> Result<bool, String> {
        if db
            .has_event(self.id, name, recipient)
            .map_err(|e| e.to_string())?
        {
            return Ok(false);
        }
        db.append_event(&NewEvent {
            at: self.now,
            mailbox: Some(self.mailbox.to_owned()),
            dispatch_id: Some(self.id.to_owned()),
            event: name.into(),
            cause: "timer".into(),
            detail,
        })
        .map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// Runs [`timer_pass`] for `mailbox` until `cancel`: every few seconds
/// (a quarter of the shortest deadline, between 1 and 30 s) and after each
/// IMAP sync.
pub async fn timer_task(
    config: Arc<Config>,
    mailbox: MailboxConfig,
    store: Store,
    synced: Arc<Notify>,
    wake_sender: Arc<Notify>,
    cancel: CancellationToken,
) {
    let rules = config.deadlines.rules();
    let tick = (config.deadlines.shortest_std() / 4).clamp(TIMER_MIN, TIMER_MAX);
    loop {
        let name = mailbox.name.clone();
        let now = Timestamp::now();
        match store
            .call(move |db| Ok(timer_pass(db, &name, &rules, now)))
            .await
        {
            Ok(Ok(r)) => {
                if r.resent > 0 {
                    wake_sender.notify_one();
                }
            }
            Ok(Err(e)) | Err(store::StoreError::Invalid(e)) => {
                error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "deadline timer failed");
            }
            Err(e) => {
                error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "deadline timer: store failed");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
            () = synced.notified() => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Decisions (timer and operator)

/// Why [`decide`] did not change anything.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No such dispatch.
    #[error("no letter with id {0}")]
    NotFound(String),
    /// The state machine refused (wrong state, already sent ...).
    #[error("{0}")]
    Rejected(String),
    /// The store failed, or another writer kept changing the letter.
    #[error("store: {0}")]
    Store(String),
}

/// Applies a timer's or an operator's decision about `dispatch_id` through
/// the pure state machine and writes its changes in one transaction (states
/// and events, `cause` on each). Only `GraceResend`, `ResolveResend` and
/// `ResolveMarkSent` are meant here; receipts go through ingest.
///
/// # Errors
/// [`DecideError`]; nothing is written then.
pub fn decide(
    db: &mut Db,
    dispatch_id: &str,
    ev: &Event,
    cause: &str,
    now: Timestamp,
) -> Result<Outcome, DecideError> {
    let st = |e: store::StoreError| DecideError::Store(e.to_string());
    for _ in 0..5 {
        let detail = db
            .get(dispatch_id)
            .map_err(st)?
            .ok_or_else(|| DecideError::NotFound(dispatch_id.to_owned()))?;
        let events = db.events_for(dispatch_id).map_err(st)?;
        let before = dispatch_from_store(&detail, &events).map_err(DecideError::Store)?;
        let outcome = before
            .apply(ev, now)
            .map_err(|r| DecideError::Rejected(r.to_string()))?;
        let seen_state = detail.dispatch.state.clone();
        let written = db.write("decide", |tx| {
            // Another writer (ingest, the sender) changed the letter between
            // the read and this transaction: read again.
            let now_row = tx.dispatch(dispatch_id)?;
            if now_row.map(|r| r.state) != Some(seen_state.clone()) {
                return Ok(false);
            }
            for change in &outcome.changes {
                match change {
                    Change::DispatchChanged { to, .. } => {
                        let mut c = DispatchChange::new(to.as_str(), cause, now);
                        c.detail = json!({"decision": ev.cause().as_str()});
                        if *to == DispatchState::Queued {
                            c.error = Some(String::new());
                        }
                        tx.set_dispatch_state(dispatch_id, &c)?;
                    }
                    Change::AttemptChanged {
                        message_id,
                        from,
                        to,
                        ..
                    } => {
                        if *to == AttemptState::Submitted {
                            tx.attempt_proven(dispatch_id, message_id, now)?;
                        }
                        tx.append_event(&NewEvent {
                            at: now,
                            mailbox: Some(detail.dispatch.mailbox.clone()),
                            dispatch_id: Some(dispatch_id.to_owned()),
                            event: format!("attempt.{to}"),
                            cause: cause.to_owned(),
                            detail: json!({"message_id": message_id,
                                "from": from.map(AttemptState::as_str), "to": to.as_str(),
                                "change_cause": ev.cause().as_str()}),
                        })?;
                    }
                    _ => {}
                }
            }
            Ok(true)
        });
        match written {
            Ok(true) => return Ok(outcome),
            Ok(false) => {}
            Err(e) => return Err(st(e)),
        }
    }
    Err(DecideError::Store(format!(
        "dispatch {dispatch_id} kept changing while the decision was written; try again"
    )))
}

// ---------------------------------------------------------------------------
// Retention

/// Moves or expunges, on the server, the messages of `mailbox` archived and
/// recorded more than `retention.after_days` ago, every `every`, until
/// `cancel`. Uses its own read-write IMAP session, opened for each pass.
pub async fn retention_task(
    mailbox: MailboxConfig,
    store: Store,
    every: Duration,
    cancel: CancellationToken,
) {
    let Some(retention) = mailbox.retention.clone() else {
        return;
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match retention_pass(&mailbox, &retention, &store).await {
            Ok(0) => {}
            Ok(n) => {
                info!({ field::EVENT } = event::MAILBOX_RETENTION, { field::MAILBOX } = %mailbox.name, count = n, "old messages handled on the server");
            }
            Err(e) => {
                warn!({ field::EVENT } = event::MAILBOX_RETENTION, { field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "retention pass failed; retried later");
            }
        }
    }
}

/// One retention pass; returns how many messages were handled.
///
/// # Errors
/// IMAP or store failures, in words.
pub async fn retention_pass(
    mailbox: &MailboxConfig,
    retention: &crate::config::Retention,
    store: &Store,
) -> Result<usize, String> {
    let name = mailbox.name.clone();
    let Some(uidvalidity) = store
        .call(move |db| db.mailbox_state(&name))
        .await
        .map_err(|e| e.to_string())?
        .and_then(|s| s.uidvalidity)
    else {
        return Ok(0);
    };
    let age = SignedDuration::from_hours(24 * i64::from(retention.after_days));
    let cutoff = Timestamp::now().checked_sub(age).unwrap_or(Timestamp::MIN);
    let name = mailbox.name.clone();
    let uids = store
        .call(move |db| db.retention_candidates(&name, uidvalidity, cutoff, RETENTION_BATCH))
        .await
        .map_err(|e| e.to_string())?;
    if uids.is_empty() {
        return Ok(0);
    }
    let mut session = imap::connect(&mailbox.imap)
        .await
        .map_err(|e| e.to_string())?;
    let done = imap::apply_retention(&mut session, &mailbox.imap.folder, &uids, &retention.action)
        .await
        .map_err(|e| e.to_string());
    session.logout().await;
    let n = done?;
    let action = match &retention.action {
        crate::config::RetentionAction::Move { folder } => format!("move to {folder}"),
        crate::config::RetentionAction::Expunge => "expunge".to_owned(),
    };
    let name = mailbox.name.clone();
    store
        .call(move |db| db.mark_retained(&name, uidvalidity, &uids, &action, Timestamp::now()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(n)
}
