//! The one place where a message from a certified mailbox turns into state
//! changes (DESIGN.md, "Inbound"). The IMAP task, `reindex` and the tests
//! all go through [`ingest`].
//!
//! The steps, in this order, for every message:
//!
//! 1. the raw bytes are archived (content-addressed, fsync'd) and recorded
//!    in the store (`messages`, direction `in`) before anything else;
//! 2. the pure core classifies and parses it ([`crate::pec::inspect`]);
//! 3. [`Verifier::verify`] judges the signature: a message whose signature
//!    is not valid never changes a state (it is quarantined, recorded and
//!    logged at error level);
//! 4. a receipt is matched by what the provider signed (daticert `msgid`,
//!    `identificativo`, `consegna`), never by the unsigned outer headers
//!    alone; inconsistencies quarantine it;
//! 5. the dispatch is rebuilt from the store ([`dispatch_from_store`]), the
//!    pure state machine applies the receipt, and every change is written
//!    in **one** store transaction (states, events, the receipt row);
//! 6. after the commit the receipt is copied into the letter's sent folder
//!    (`NN-<kind>[-<recipient>].eml`) and its status files are rewritten.
//!
//! Incoming certified mail (`posta-certificata`) is unpacked into
//! `inbox/YYYY/MM/<identificativo>/`; anomaly envelopes into
//! `inbox/YYYY/MM/anomalia-<time>-<short hash>/`, plainly marked as not
//! certified.
//!
//! Ingesting the same bytes twice changes nothing the second time
//! ([`IngestOutcome::Duplicate`]).
//!
//! What the store has no column for is kept in the event log written here
//! and read back by [`dispatch_from_store`]: the daticert time of the
//! receipt that last set a recipient's state (`receipt_at` in `recipient.*`
//! events), letter-level conflicts (`dispatch.conflict`, `level: letter`)
//! and attempt states proven by receipts (`attempt.<state>`).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use jiff::Timestamp;
use serde_json::{Value, json};
use tracing::{debug, error, info, warn};

use crate::archive::{self, ArchiveError, write_durable};
use crate::config::MailboxConfig;
use crate::pec::daticert::Daticert;
use crate::pec::ids::{canonical_address, normalize_message_id, same_address};
use crate::pec::inspect::{Inspection, inspect};
use crate::pec::kind::Kind;
use crate::pec::state::{
    Attempt, AttemptState, Change, Dispatch, DispatchState, Event, Field as PecField, Outcome,
    ReceiptFacts, Recipient, RecipientState,
};
use crate::sent;
use crate::store::{
    self, Direction, DispatchChange, DispatchDetail, EventRow, IncomingRow, MessageRow, NewEvent,
    NewReceipt, RecipientChange, StoreError, Tx,
};
use crate::telemetry::{event, field};
use crate::verify::{Status, Verdict, Verifier};

/// File mode of everything ingest writes for clerks.
const FILE_MODE: u32 = 0o640;
/// Folder mode.
const DIR_MODE: u32 = 0o750;
/// The longest attachment name kept, in bytes.
const MAX_NAME_BYTES: usize = 150;
/// How often the store transaction is retried when another writer changed
/// the dispatch between reading it and writing it.
const MAX_RETRIES: usize = 5;

/// Name of the signed message as received, in an inbox folder.
pub const SIGNED_EML: &str = "messaggio-firmato.eml";
/// Name of the original message, in an inbox folder.
pub const POSTACERT_EML: &str = "postacert.eml";
/// Name of the certification data, in an inbox folder.
pub const DATICERT_XML: &str = "daticert.xml";
/// Name of the verification report, in an inbox folder.
pub const REPORT_TXT: &str = "verifica.txt";
/// Name of the anomaly envelope as received, in an anomaly folder.
pub const ANOMALY_EML: &str = "busta-anomalia.eml";
/// Name of the wrapped message, in an anomaly folder.
pub const ANOMALY_WRAPPED_EML: &str = "messaggio-non-certificato.eml";
/// Name of the notice that marks an anomaly folder as not certified.
pub const ANOMALY_NOTICE: &str = "NON-CERTIFICATO.txt";

/// What ingest needs to know about where a message goes.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The mailbox the message was fetched from.
    pub mailbox: &'a MailboxConfig,
    /// The archive root.
    pub archive: &'a Path,
    /// The signature verifier (PEC trust anchors).
    pub verifier: &'a Verifier,
    /// The right-hand side of the Message-IDs this gateway generates
    /// (`[gateway] hostname`): a receipt naming an unknown attempt
    /// `<DISPATCHID.N.HEX@hostname>` of a letter of this mailbox recovers
    /// that attempt (it was lost by a restore from backup). `None`: no
    /// recovery, such receipts are orphans.
    pub gateway_hostname: Option<&'a str>,
}

/// Where the message came from on the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Source {
    /// The IMAP UID; `None` for `reindex` and tests.
    pub uid: Option<u32>,
    /// The folder's UIDVALIDITY at that time.
    pub uidvalidity: Option<u32>,
}

/// What ingest did with a message. Data for the caller to count and log;
/// the store and the folders already reflect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// A receipt matched a dispatch and was applied (the changes may be a
    /// single `duplicate` or `ignored` when it carried nothing new).
    Applied {
        /// The dispatch.
        dispatch_id: String,
        /// The receipt's kind (wire name).
        kind: String,
        /// What changed, as the state machine reported it.
        changes: Vec<Change>,
    },
    /// These very bytes were ingested before: nothing changed.
    Duplicate {
        /// SHA-256 of the message.
        sha256: String,
    },
    /// Kept aside: archived and recorded, no state changed.
    Quarantined {
        /// The dispatch it seemed to concern, if any.
        dispatch_id: Option<String>,
        /// Why.
        reason: String,
    },
    /// A valid receipt for a letter pecgate did not send: archived and
    /// listed, nothing else.
    Orphan {
        /// The receipt's kind (wire name).
        kind: String,
    },
    /// Incoming certified mail, unpacked into this inbox folder.
    Incoming {
        /// The folder.
        folder: PathBuf,
    },
    /// An anomaly envelope (mail without legal value), unpacked into this
    /// inbox folder.
    Anomaly {
        /// The folder.
        folder: PathBuf,
    },
    /// Not a PEC message: archived and recorded only.
    NotPec,
    /// Not a mail message at all: archived and recorded only.
    Unreadable {
        /// Why it could not be read.
        reason: String,
    },
}

/// Ingest could not finish; nothing that depends on the failed step was
/// changed, and ingesting the same bytes again later is safe.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The archive or a clerk's folder could not be written.
    #[error(transparent)]
    Files(#[from] ArchiveError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The store holds a value this code cannot read back (a state name).
    #[error("dispatch {dispatch_id}: {reason}")]
    Corrupt {
        /// The dispatch.
        dispatch_id: String,
        /// What could not be read.
        reason: String,
    },
}

/// The ingest path with its long-lived parts, for the daemon.
#[derive(Debug, Clone)]
pub struct Ingest {
    verifier: Arc<Verifier>,
    archive_root: PathBuf,
    gateway_hostname: Option<String>,
}

impl Ingest {
    /// An ingest path archiving under `archive_root`.
    pub fn new(verifier: Arc<Verifier>, archive_root: impl Into<PathBuf>) -> Ingest {
        Ingest {
            verifier,
            archive_root: archive_root.into(),
            gateway_hostname: None,
        }
    }

    /// Recovers lost attempts whose Message-IDs end in `@hostname` (see
    /// [`Context::gateway_hostname`]).
    #[must_use]
    pub fn with_gateway_hostname(mut self, hostname: impl Into<String>) -> Ingest {
        self.gateway_hostname = Some(hostname.into());
        self
    }

    fn context<'a>(&'a self, mailbox: &'a MailboxConfig) -> Context<'a> {
        Context {
            mailbox,
            archive: &self.archive_root,
            verifier: &self.verifier,
            gateway_hostname: self.gateway_hostname.as_deref(),
        }
    }

    /// [`ingest`] with this path's verifier and archive. Blocking.
    ///
    /// # Errors
    ///
    /// As [`ingest`].
    pub fn ingest(
        &self,
        db: &mut store::Db,
        mailbox: &MailboxConfig,
        raw: &[u8],
        source: Source,
        now: Timestamp,
    ) -> Result<IngestOutcome, IngestError> {
        let ctx = self.context(mailbox);
        ingest(db, &ctx, raw, source, now)
    }

    /// [`ingest_batch`] with this path's verifier and archive. Blocking.
    ///
    /// # Errors
    ///
    /// As [`ingest_batch`].
    pub fn ingest_batch(
        &self,
        db: &mut store::Db,
        mailbox: &MailboxConfig,
        items: &[(&[u8], Source)],
        now: Timestamp,
    ) -> Result<Vec<IngestOutcome>, IngestError> {
        let ctx = self.context(mailbox);
        ingest_batch(db, &ctx, items, now)
    }
}

/// Takes one raw message in. Blocking (files, SQLite, openssl): call it on
/// the store thread.
///
/// # Errors
///
/// The archive, a folder or the store could not be written. The archive
/// step comes first, so a failure later leaves the evidence on disk and the
/// message can be ingested again.
pub fn ingest(
    db: &mut store::Db,
    ctx: &Context<'_>,
    raw: &[u8],
    source: Source,
    now: Timestamp,
) -> Result<IngestOutcome, IngestError> {
    let archived = archive::store(ctx.archive, raw)?;
    let sha = archived.sha256.clone();
    let mailbox = ctx.mailbox.name.clone();
    let row = MessageRow {
        sha256: sha.clone(),
        path: archived.relative.clone(),
        size: archived.size,
        direction: Direction::In,
        mailbox: mailbox.clone(),
        imap_uid: source.uid,
        imap_uidvalidity: source.uidvalidity,
        recorded_at: now,
    };
    let new = db.write("ingest.record_message", |tx| record(tx, &row))?;
    debug!(
        { field::EVENT } = event::MESSAGE_ARCHIVED,
        { field::MAILBOX } = %mailbox,
        { field::PATH } = %archived.path.display(),
        { field::UID } = source.uid,
        sha256 = %sha,
        new,
        "message archived"
    );

    let ins = match inspect(raw) {
        Ok(ins) => ins,
        Err(e) => {
            warn!(
                { field::EVENT } = event::MESSAGE_UNREADABLE,
                { field::MAILBOX } = %mailbox,
                { field::UID } = source.uid,
                { field::ERROR } = %e,
                sha256 = %sha,
                "not a mail message; archived only"
            );
            return Ok(IngestOutcome::Unreadable {
                reason: e.to_string(),
            });
        }
    };
    let kind = ins.kind().clone();
    debug!(
        { field::EVENT } = event::MESSAGE_INSPECTED,
        { field::MAILBOX } = %mailbox,
        { field::KIND } = %kind,
        sha256 = %sha,
        problems = ins.problems.len(),
        "message inspected"
    );
    let job = Job {
        ctx,
        sha: &sha,
        raw,
        ins: &ins,
        now,
    };
    match kind {
        Kind::NotPec => Ok(IngestOutcome::NotPec),
        Kind::Anomaly => job.anomaly(db),
        Kind::Transport => job.incoming(db),
        Kind::Acceptance
        | Kind::NonAcceptance
        | Kind::TakenInCharge
        | Kind::Delivery
        | Kind::DeliveryError
        | Kind::DeliveryTimeout
        | Kind::VirusDetected => job.receipt(db),
        Kind::Unknown(raw_kind) => {
            let verdict = ctx.verifier.verify(&ins, now);
            job.quarantine(
                db,
                &verdict,
                None,
                format!("unknown PEC message type \"{raw_kind}\""),
            )
        }
    }
}

/// Records a fetched message; one fetched again under a new UIDVALIDITY
/// takes its new UID ([`Tx::refresh_imap_source`]). `true`: a new row.
fn record(tx: &Tx<'_>, row: &MessageRow) -> store::Result<bool> {
    let new = tx.record_message(row)?;
    if !new && let (Some(uid), Some(v)) = (row.imap_uid, row.imap_uidvalidity) {
        tx.refresh_imap_source(&row.sha256, uid, v)?;
    }
    Ok(new)
}

/// One message on its way through ingest.
struct Job<'a, 'r> {
    ctx: &'a Context<'a>,
    sha: &'a str,
    raw: &'a [u8],
    ins: &'a Inspection<'r>,
    now: Timestamp,
}

/// How a receipt matches the letters in the store.
enum Match {
    /// One dispatch.
    Dispatch(String),
    /// One dispatch, through an attempt the store lost (see
    /// [`Context::gateway_hostname`]): recover it, then apply.
    Recover(Box<LostAttempt>),
    /// None: an orphan.
    Orphan,
    /// The signed fields contradict each other or the store.
    Problem(Option<String>, String),
}

/// An attempt a receipt names that the store does not know.
struct LostAttempt {
    dispatch_id: String,
    /// The attempt number in its Message-ID.
    n: u32,
    /// The Message-ID, normalised.
    message_id: String,
}

/// `DISPATCHID.N.HEX@hostname` (normalised, as outbound generates them):
/// the dispatch id (canonical) and N.
fn parse_gateway_message_id(mid: &str, hostname: &str) -> Option<(String, u32)> {
    let (local, host) = mid.rsplit_once('@')?;
    if !host.eq_ignore_ascii_case(hostname) {
        return None;
    }
    let mut parts = local.split('.');
    let (id, n, hex) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || hex.is_empty()
        || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        || !n.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let n: u32 = n.parse().ok().filter(|n| *n >= 1)?;
    let id = store::canonical_dispatch_id(id)?;
    Some((id, n))
}

fn verdict_name(v: &Verdict) -> &'static str {
    match v.status {
        Status::Valid => "valid",
        Status::Invalid => "invalid",
        Status::Unsigned => "unsigned",
    }
}

fn verdict_reason(v: &Verdict) -> String {
    match v.status {
        Status::Valid => "signature valid".to_owned(),
        Status::Unsigned => "the message is not signed".to_owned(),
        Status::Invalid => format!(
            "signature not valid: {}",
            v.reason.as_deref().unwrap_or("unknown reason")
        ),
    }
}

impl Job<'_, '_> {
    fn mailbox(&self) -> &str {
        &self.ctx.mailbox.name
    }

    fn cause(&self) -> String {
        format!("receipt:{}", self.sha)
    }

    fn new_receipt(
        &self,
        verdict: &Verdict,
        dispatch_id: Option<String>,
        disposition: &str,
        reason: Option<String>,
    ) -> NewReceipt {
        let d = self.ins.daticert.as_ref();
        NewReceipt {
            message_sha256: self.sha.to_owned(),
            kind: self.ins.kind().as_str().to_owned(),
            verdict: verdict_name(verdict).to_owned(),
            reason,
            dispatch_id,
            recipient: d.and_then(|d| d.consegna.clone()),
            identificativo: d.map(|d| d.identificativo.clone()),
            msgid: d.and_then(|d| d.msgid.clone()),
            disposition: disposition.to_owned(),
            created_at: self.now,
        }
    }

    /// Records the message as quarantined (no state changes) and logs it at
    /// error level.
    fn quarantine(
        &self,
        db: &mut store::Db,
        verdict: &Verdict,
        dispatch_id: Option<String>,
        reason: String,
    ) -> Result<IngestOutcome, IngestError> {
        let r = self.new_receipt(
            verdict,
            dispatch_id.clone(),
            "quarantined",
            Some(reason.clone()),
        );
        let id = db.write("ingest.quarantine", |tx| tx.record_receipt(&r))?;
        if id.is_none() {
            return Ok(self.duplicate());
        }
        Ok(self.log_quarantined(verdict, dispatch_id, reason))
    }

    fn duplicate(&self) -> IngestOutcome {
        IngestOutcome::Duplicate {
            sha256: self.sha.to_owned(),
        }
    }

    /// The error line of a quarantined message (after its row is committed).
    fn log_quarantined(
        &self,
        verdict: &Verdict,
        dispatch_id: Option<String>,
        reason: String,
    ) -> IngestOutcome {
        let d = self.ins.daticert.as_ref();
        error!(
            { field::EVENT } = event::RECEIPT_QUARANTINED,
            { field::MAILBOX } = %self.mailbox(),
            { field::KIND } = %self.ins.kind(),
            { field::DISPATCH_ID } = dispatch_id.as_deref(),
            { field::IDENTIFICATIVO } = d.map(|d| d.identificativo.as_str()),
            { field::MESSAGE_ID } = d.and_then(|d| d.msgid.as_deref()),
            { field::ERROR } = %reason,
            sha256 = %self.sha,
            verdict = verdict_name(verdict),
            "message quarantined: no state changed"
        );
        IngestOutcome::Quarantined {
            dispatch_id,
            reason,
        }
    }

    // -- Receipts -------------------------------------------------------------

    /// What to do with a receipt, judged from the store as `r` sees it.
    fn plan<R: Reads>(&self, r: &R, verdict: &Verdict) -> Result<Plan, IngestError> {
        let Some(d) = self.ins.daticert.as_ref() else {
            let why = self.ins.daticert_error.as_ref().map_or_else(
                || "no daticert.xml".to_owned(),
                |e| format!("daticert: {e}"),
            );
            return Ok(Plan::Quarantine(None, why));
        };
        let matched = match_receipt(r, self.ctx, self.ins, d)?;
        if !verdict.is_valid() {
            let id = match &matched {
                Match::Dispatch(id) => Some(id.clone()),
                Match::Recover(lost) => Some(lost.dispatch_id.clone()),
                Match::Problem(id, _) => id.clone(),
                Match::Orphan => None,
            };
            return Ok(Plan::Quarantine(id, verdict_reason(verdict)));
        }
        // The header and the signed daticert must agree on what this is.
        if let Some(dk) = d.kind()
            && dk != *self.ins.kind()
        {
            return Ok(Plan::Quarantine(
                None,
                format!("header says {} but daticert says {dk}", self.ins.kind()),
            ));
        }
        let (dispatch_id, lost) = match matched {
            Match::Dispatch(id) => (id, None),
            Match::Recover(lost) => (lost.dispatch_id.clone(), Some(lost)),
            Match::Problem(id, why) => return Ok(Plan::Quarantine(id, why)),
            Match::Orphan => return Ok(Plan::Orphan),
        };
        let facts = ReceiptFacts::from_daticert(
            self.ins.kind().clone(),
            d,
            self.ins.message.classification.virus,
        );
        let detail = r.get(&dispatch_id)?.ok_or_else(|| IngestError::Corrupt {
            dispatch_id: dispatch_id.clone(),
            reason: "matched but not found".into(),
        })?;
        let events = r.events_for(&dispatch_id)?;
        let before =
            dispatch_from_store(&detail, &events).map_err(|reason| IngestError::Corrupt {
                dispatch_id: dispatch_id.clone(),
                reason,
            })?;
        // A lost attempt is recorded first; the receipt applies after it.
        let recovered = match lost {
            None => None,
            Some(lost) => {
                let ev = Event::AttemptRecovered {
                    message_id: lost.message_id.clone(),
                };
                match before.apply(&ev, self.now) {
                    Ok(outcome) => Some(Recovered {
                        n: lost.n,
                        message_id: lost.message_id,
                        outcome,
                    }),
                    Err(rejected) => {
                        return Ok(Plan::Quarantine(
                            Some(dispatch_id),
                            format!("the lost attempt cannot be recovered: {rejected}"),
                        ));
                    }
                }
            }
        };
        let receipt_before = recovered.as_ref().map_or(&before, |r| &r.outcome.dispatch);
        match receipt_before.apply(&Event::Receipt(facts.clone()), self.now) {
            Ok(outcome) => Ok(Plan::Apply(Box::new(Apply {
                dispatch_id,
                detail,
                before,
                recovered,
                outcome,
                facts,
            }))),
            Err(rejected) => Ok(Plan::Quarantine(
                Some(dispatch_id),
                format!("the state machine refused it: {rejected}"),
            )),
        }
    }

    /// Writes an applied receipt inside `tx`: the receipt row, then every
    /// change. `false`: these bytes were recorded before (nothing written).
    fn write_apply(&self, tx: &Tx<'_>, verdict: &Verdict, a: &Apply) -> store::Result<bool> {
        let noop = a.outcome.is_noop();
        let reason = a.outcome.changes.iter().find_map(|c| match c {
            Change::Ignored { reason, .. } => Some(reason.clone()),
            _ => None,
        });
        let r = self.new_receipt(
            verdict,
            Some(a.dispatch_id.clone()),
            if noop { "duplicate" } else { "applied" },
            reason,
        );
        if tx.record_receipt(&r)?.is_none() {
            return Ok(false);
        }
        let w = WriteCtx {
            dispatch_id: &a.dispatch_id,
            mailbox: self.mailbox(),
            cause: &self.cause(),
            facts: &a.facts,
            now: self.now,
        };
        let mut before = &a.before;
        if let Some(rec) = &a.recovered {
            let d = self.ins.daticert.as_ref();
            tx.recover_attempt(
                &a.dispatch_id,
                rec.n,
                &rec.message_id,
                self.now,
                w.cause,
                json!({
                    "kind": self.ins.kind().as_str(),
                    "identificativo": d.map(|d| d.identificativo.as_str()),
                    "daticert_at": d.map(|d| sent::ts(d.data)),
                    "receipt_sha256": self.sha,
                    "why": "a signed receipt names this attempt, which the store did not know \
                            (restored from a backup taken before it?)",
                }),
            )?;
            write_outcome(tx, &w, before, &rec.outcome)?;
            before = &rec.outcome.dispatch;
        }
        write_outcome(tx, &w, before, &a.outcome)?;
        Ok(true)
    }

    fn receipt(&self, db: &mut store::Db) -> Result<IngestOutcome, IngestError> {
        let verdict = self.ctx.verifier.verify(self.ins, self.now);
        let mut last_id = None;
        for _ in 0..MAX_RETRIES {
            let a = match self.plan(db, &verdict)? {
                Plan::Quarantine(id, why) => return self.quarantine(db, &verdict, id, why),
                Plan::Orphan => return self.orphan(db, &verdict),
                Plan::Apply(a) => a,
            };
            let written = db.write("ingest.apply", |tx| {
                // Another writer (a CLI command) may have changed the
                // dispatch since it was read: start again.
                if tx.ingest_get(&a.dispatch_id)?.as_ref() != Some(&a.detail) {
                    return Ok(Written::Stale);
                }
                if !self.write_apply(tx, &verdict, &a)? {
                    return Ok(Written::AlreadyDone);
                }
                Ok(Written::Done)
            })?;
            match written {
                Written::Stale => {
                    last_id = Some(a.dispatch_id);
                    continue;
                }
                Written::AlreadyDone => return Ok(self.duplicate()),
                Written::Done => {}
            }
            return Ok(self.finish_applied(db, *a));
        }
        Err(IngestError::Corrupt {
            dispatch_id: last_id.unwrap_or_default(),
            reason: "the dispatch kept changing while the receipt was applied".into(),
        })
    }

    /// After the commit of an applied receipt: its log lines, the copy in
    /// the sent folder and the status files.
    fn finish_applied(&self, db: &store::Db, a: Apply) -> IngestOutcome {
        let filing = self.filing(&a);
        file_receipts(db, self.ctx, std::slice::from_ref(&filing), self.now);
        self.applied_outcome(a)
    }

    /// The log lines of an applied receipt (after its commit) and its outcome.
    fn applied_outcome(&self, a: Apply) -> IngestOutcome {
        if let Some(rec) = &a.recovered {
            warn!(
                { field::EVENT } = event::ATTEMPT_RECOVERED,
                { field::MAILBOX } = %self.mailbox(),
                { field::DISPATCH_ID } = %a.dispatch_id,
                { field::MESSAGE_ID } = %rec.message_id,
                { field::KIND } = %self.ins.kind(),
                sha256 = %self.sha,
                "a receipt names an attempt the store had lost: recorded as submitted"
            );
        }
        if let Some(d) = self.ins.daticert.as_ref() {
            self.log_applied(&a.dispatch_id, d, &a.outcome);
        }
        let mut changes = a.recovered.map(|r| r.outcome.changes).unwrap_or_default();
        changes.extend(a.outcome.changes);
        IngestOutcome::Applied {
            dispatch_id: a.dispatch_id,
            kind: self.ins.kind().as_str().to_owned(),
            changes,
        }
    }

    /// What the sent folder needs of an applied receipt.
    fn filing(&self, a: &Apply) -> Filing<'_> {
        Filing {
            dispatch_id: a.dispatch_id.clone(),
            dir: PathBuf::from(&a.detail.dispatch.sent_dir),
            kind: self.ins.kind().clone(),
            consegna: self.ins.daticert.as_ref().and_then(|d| d.consegna.clone()),
            raw: self.raw,
        }
    }

    fn orphan_row(&self, verdict: &Verdict) -> NewReceipt {
        self.new_receipt(
            verdict,
            None,
            "orphan",
            Some("no letter sent by pecgate matches its msgid or identificativo".into()),
        )
    }

    fn orphan(&self, db: &mut store::Db, verdict: &Verdict) -> Result<IngestOutcome, IngestError> {
        let r = self.orphan_row(verdict);
        if db
            .write("ingest.orphan", |tx| tx.record_receipt(&r))?
            .is_none()
        {
            return Ok(self.duplicate());
        }
        Ok(self.log_orphan())
    }

    fn log_orphan(&self) -> IngestOutcome {
        let d = self.ins.daticert.as_ref();
        warn!(
            { field::EVENT } = event::RECEIPT_UNMATCHED,
            { field::MAILBOX } = %self.mailbox(),
            { field::KIND } = %self.ins.kind(),
            { field::IDENTIFICATIVO } = d.map(|d| d.identificativo.as_str()),
            { field::MESSAGE_ID } = d.and_then(|d| d.msgid.as_deref()),
            sha256 = %self.sha,
            "receipt for a letter pecgate did not send (orphan)"
        );
        IngestOutcome::Orphan {
            kind: self.ins.kind().as_str().to_owned(),
        }
    }

    fn log_applied(&self, dispatch_id: &str, d: &Daticert, outcome: &Outcome) {
        let kind = self.ins.kind();
        let changes = outcome.changes.len();
        let state = outcome.dispatch.state.as_str();
        let recipient = d.consegna.as_deref();
        macro_rules! log {
            ($level:ident, $ev:expr, $msg:literal) => {
                $level!(
                    { field::EVENT } = $ev,
                    { field::MAILBOX } = %self.mailbox(),
                    { field::DISPATCH_ID } = %dispatch_id,
                    { field::KIND } = %kind,
                    { field::IDENTIFICATIVO } = %d.identificativo,
                    { field::MESSAGE_ID } = d.msgid.as_deref(),
                    { field::RECIPIENT } = recipient.as_deref(),
                    state,
                    changes,
                    $msg
                )
            };
        }
        match kind {
            Kind::Acceptance => log!(info, event::RECEIPT_ACCEPTED, "letter accepted"),
            Kind::NonAcceptance => log!(error, event::RECEIPT_NOT_ACCEPTED, "letter NOT accepted"),
            Kind::Delivery => log!(info, event::RECEIPT_DELIVERED, "letter delivered"),
            Kind::DeliveryError | Kind::VirusDetected => {
                log!(error, event::RECEIPT_FAILED, "letter not delivered");
            }
            Kind::DeliveryTimeout => log!(warn, event::RECEIPT_WARNING, "delivery time-out notice"),
            _ => log!(debug, event::RECEIPT_TAKEN_IN_CHARGE, "taken in charge"),
        }
        if outcome.dispatch.is_final() && !outcome.is_noop() {
            info!(
                { field::EVENT } = event::DISPATCH_FINAL,
                { field::MAILBOX } = %self.mailbox(),
                { field::DISPATCH_ID } = %dispatch_id,
                state,
                "every recipient has a final outcome"
            );
        }
    }

    // -- Incoming certified mail ---------------------------------------------

    fn incoming(&self, db: &mut store::Db) -> Result<IngestOutcome, IngestError> {
        if db.incoming(self.sha)?.is_some() {
            return Ok(IngestOutcome::Duplicate {
                sha256: self.sha.to_owned(),
            });
        }
        let verdict = self.ctx.verifier.verify(self.ins, self.now);
        if !verdict.is_valid() {
            return self.quarantine(db, &verdict, None, verdict_reason(&verdict));
        }
        let Some(d) = self.ins.daticert.as_ref() else {
            return self.quarantine(
                db,
                &verdict,
                None,
                "posta-certificata without a readable daticert.xml".into(),
            );
        };
        let Some(postacert) = self.ins.message.postacert.as_deref() else {
            return self.quarantine(
                db,
                &verdict,
                None,
                "posta-certificata without postacert.eml".into(),
            );
        };
        let inbox = &self.ctx.mailbox.inbox;
        let month = month_dir(inbox, d.data);
        let base = {
            let s = sanitize_component(&d.identificativo);
            if s.is_empty() {
                format!("busta-{}", &self.sha[..12])
            } else {
                s
            }
        };
        let files = self.incoming_files(d, postacert, &verdict);
        let folder = place_folder(inbox, &month, &base, self.sha, SIGNED_EML, self.raw, &files)?;
        let row = IncomingRow {
            message_sha256: self.sha.to_owned(),
            mailbox: self.mailbox().to_owned(),
            identificativo: Some(d.identificativo.clone()),
            mittente: d.mittente.clone(),
            oggetto: d.oggetto.clone(),
            folder: Some(folder.display().to_string()),
            created_at: self.now,
        };
        if !db.write("ingest.incoming", |tx| tx.record_incoming(&row))? {
            return Ok(IngestOutcome::Duplicate {
                sha256: self.sha.to_owned(),
            });
        }
        info!(
            { field::EVENT } = event::MESSAGE_RECEIVED,
            { field::MAILBOX } = %self.mailbox(),
            { field::IDENTIFICATIVO } = %d.identificativo,
            { field::PATH } = %folder.display(),
            sha256 = %self.sha,
            "certified mail received"
        );
        Ok(IngestOutcome::Incoming { folder })
    }

    /// The files of an inbox folder: name and bytes.
    fn incoming_files(
        &self,
        d: &Daticert,
        postacert: &[u8],
        verdict: &Verdict,
    ) -> Vec<(String, Vec<u8>)> {
        let mut files = vec![
            (SIGNED_EML.to_owned(), self.raw.to_vec()),
            (POSTACERT_EML.to_owned(), postacert.to_vec()),
        ];
        if let Some(xml) = &self.ins.message.daticert_xml {
            files.push((DATICERT_XML.to_owned(), xml.clone()));
        }
        files.push((
            REPORT_TXT.to_owned(),
            report(self.ins, d, verdict, self.sha).into_bytes(),
        ));
        let mut taken: HashSet<String> = files.iter().map(|(n, _)| n.to_lowercase()).collect();
        if let Some(msg) = crate::pec::classify::parser().parse(postacert) {
            for part in msg.attachments() {
                let name = mail_parser::MimeHeaders::attachment_name(part).unwrap_or("allegato");
                let safe = sanitize_file_name(name, &mut taken);
                files.push((safe, part.contents().to_vec()));
            }
        }
        files
    }

    // -- Anomalies ----------------------------------------------------------------

    fn anomaly(&self, db: &mut store::Db) -> Result<IngestOutcome, IngestError> {
        if db.incoming(self.sha)?.is_some() {
            return Ok(IngestOutcome::Duplicate {
                sha256: self.sha.to_owned(),
            });
        }
        let verdict = self.ctx.verifier.verify(self.ins, self.now);
        let at = self.ins.message.date.unwrap_or(self.now);
        let inbox = &self.ctx.mailbox.inbox;
        let month = month_dir(inbox, at);
        let base = format!(
            "anomalia-{}-{}",
            at.strftime("%Y%m%dT%H%M%SZ"),
            &self.sha[..12]
        );
        let m = &self.ins.message;
        let sender = anomaly_sender(m);
        let notice = format!(
            "ATTENZIONE: MESSAGGIO NON CERTIFICATO\n\
             Questo messaggio e' arrivato in una busta di anomalia: il gestore PEC non ne \
             certifica ne' l'origine ne' il contenuto. Non ha valore legale di posta certificata.\n\n\
             WARNING: NOT CERTIFIED MAIL\n\
             This message arrived in an anomaly envelope: the PEC provider certifies neither \
             its origin nor its content. It has no legal value as certified mail.\n\n\
             Da / From: {}\nOggetto / Subject: {}\nRicevuto / Received: {}\n\
             Firma della busta / Envelope signature: {}\nSHA-256: {}\n",
            sender.as_ref().map_or("-", |s| s.shown.as_str()),
            m.subject.as_deref().unwrap_or("-"),
            sent::ts(self.now),
            verdict_reason(&verdict),
            self.sha,
        );
        let mut files = vec![
            (ANOMALY_NOTICE.to_owned(), notice.into_bytes()),
            (ANOMALY_EML.to_owned(), self.raw.to_vec()),
        ];
        if let Some(w) = &m.postacert {
            files.push((ANOMALY_WRAPPED_EML.to_owned(), w.clone()));
        }
        let folder = place_folder(
            inbox,
            &month,
            &base,
            self.sha,
            ANOMALY_EML,
            self.raw,
            &files,
        )?;
        let row = IncomingRow {
            message_sha256: self.sha.to_owned(),
            mailbox: self.mailbox().to_owned(),
            identificativo: None,
            mittente: sender.map(|s| s.address),
            oggetto: m
                .subject
                .clone()
                .map(|s| format!("[ANOMALIA, non certificato] {s}")),
            folder: Some(folder.display().to_string()),
            created_at: self.now,
        };
        if !db.write("ingest.anomaly", |tx| tx.record_incoming(&row))? {
            return Ok(IngestOutcome::Duplicate {
                sha256: self.sha.to_owned(),
            });
        }
        warn!(
            { field::EVENT } = event::MESSAGE_RECEIVED,
            { field::MAILBOX } = %self.mailbox(),
            { field::KIND } = %self.ins.kind(),
            { field::PATH } = %folder.display(),
            sha256 = %self.sha,
            "anomaly envelope received: NOT certified mail"
        );
        Ok(IngestOutcome::Anomaly { folder })
    }
}

/// The real sender of an anomaly envelope (whose `From` is the provider's
/// service address).
struct AnomalySender {
    /// The address, lower case.
    address: String,
    /// As shown to clerks: `Name <address>` or the address.
    shown: String,
}

/// The sender of an anomaly envelope: the wrapped message's `From`; else
/// the envelope's display name `Per conto di: <address>`; else its `From`.
/// Unsigned in every case (that is what an anomaly is): for the clerks only.
fn anomaly_sender(m: &crate::pec::envelope::PecMessage<'_>) -> Option<AnomalySender> {
    let parser = crate::pec::classify::parser();
    let first = |raw: &[u8]| -> Option<(Option<String>, Option<String>)> {
        let msg = parser.parse_headers(raw)?;
        let a = msg.from()?.first()?;
        Some((
            a.name()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty()),
            a.address().map(canonical_address).filter(|a| !a.is_empty()),
        ))
    };
    let shown = |name: Option<String>, address: String| AnomalySender {
        shown: match name {
            Some(n) => format!("{n} <{address}>"),
            None => address.clone(),
        },
        address,
    };
    if let Some((name, Some(address))) = m.postacert.as_deref().and_then(first) {
        return Some(shown(name, address));
    }
    let outer = first(m.raw);
    if let Some((Some(name), _)) = &outer {
        let prefix = crate::pec::wire::PER_CONTO_DI.trim_end();
        if let Some(rest) = name
            .get(..prefix.len())
            .filter(|p| p.eq_ignore_ascii_case(prefix))
            .map(|_| name[prefix.len()..].trim())
            .filter(|r| !r.is_empty())
        {
            let address = canonical_address(rest.trim_matches(['<', '>']));
            return Some(shown(None, address));
        }
    }
    m.from.clone().map(|a| shown(None, canonical_address(&a)))
}

/// What to do with a receipt ([`Job::plan`]).
enum Plan {
    /// Keep it aside: the dispatch it seemed to concern, and why.
    Quarantine(Option<String>, String),
    /// A valid receipt for no letter of ours.
    Orphan,
    /// Apply it to this dispatch.
    Apply(Box<Apply>),
}

/// A receipt the state machine accepted, ready to be written.
struct Apply {
    dispatch_id: String,
    /// The dispatch as read (the single-message path re-checks it in its
    /// write transaction).
    detail: DispatchDetail,
    before: Dispatch,
    /// The lost attempt the receipt names, recovered before it applies.
    recovered: Option<Recovered>,
    /// The receipt's outcome (after the recovery, if any).
    outcome: Outcome,
    facts: ReceiptFacts,
}

/// A lost attempt and what recording it changes.
struct Recovered {
    n: u32,
    message_id: String,
    outcome: Outcome,
}

/// What matching and rebuilding a dispatch read: the store, or an open
/// transaction (a batch applies each receipt after the previous ones).
trait Reads {
    /// The dispatch whose attempt has this normalised Message-ID.
    fn by_message_id(&self, message_id: &str) -> store::Result<Option<String>>;
    /// The dispatches with this identificativo, oldest first.
    fn by_identificativo(&self, ident: &str) -> store::Result<Vec<String>>;
    fn get(&self, dispatch_id: &str) -> store::Result<Option<DispatchDetail>>;
    fn events_for(&self, dispatch_id: &str) -> store::Result<Vec<EventRow>>;
}

macro_rules! reads {
    ($t:ty) => {
        impl Reads for $t {
            fn by_message_id(&self, message_id: &str) -> store::Result<Option<String>> {
                self.ingest_dispatch_of_message_id(message_id)
            }
            fn by_identificativo(&self, ident: &str) -> store::Result<Vec<String>> {
                self.ingest_dispatches_of_identificativo(ident)
            }
            fn get(&self, dispatch_id: &str) -> store::Result<Option<DispatchDetail>> {
                self.ingest_get(dispatch_id)
            }
            fn events_for(&self, dispatch_id: &str) -> store::Result<Vec<EventRow>> {
                self.ingest_events_for(dispatch_id)
            }
        }
    };
}
reads!(store::Db);
reads!(Tx<'_>);

/// A receipt to copy into its letter's sent folder.
struct Filing<'r> {
    dispatch_id: String,
    dir: PathBuf,
    kind: Kind,
    consegna: Option<String>,
    raw: &'r [u8],
}

/// Runs `f` over `items` on up to [`archive::SYNC_THREADS`] threads (the
/// disk serves concurrent fsyncs together); returns the first error.
fn parallel<T: Sync, E: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let threads = archive::SYNC_THREADS.min(items.len());
    if threads <= 1 {
        return items.iter().try_for_each(f);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first: std::sync::Mutex<Option<E>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if let Err(e) = f(item)
                        && let Ok(mut slot) = first.lock()
                    {
                        slot.get_or_insert(e);
                    }
                }
            });
        }
    });
    match first.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Copies applied receipts into their letters' sent folders
/// (`NN-<kind>[-<recipient>].eml`, in order within a letter, letters in
/// parallel; each file fsync'd before its rename, the folders once at the
/// end), then rewrites each letter's status files once. Failures are
/// logged, not returned: the states are committed and the receipts are in
/// the archive.
fn file_receipts(db: &store::Db, ctx: &Context<'_>, filings: &[Filing<'_>], now: Timestamp) {
    let mailbox = ctx.mailbox.name.as_str();
    let sent_root = &ctx.mailbox.sent;
    // Receipts of one letter, in order.
    let mut groups: Vec<Vec<&Filing<'_>>> = Vec::new();
    for f in filings {
        match groups
            .iter_mut()
            .find(|g| g[0].dispatch_id == f.dispatch_id)
        {
            Some(g) => g.push(f),
            None => groups.push(vec![f]),
        }
    }
    let to_sync: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let _ = parallel(&groups, |group| -> Result<(), ()> {
        let dir = &group[0].dir;
        let result = (|| -> Result<(), ArchiveError> {
            let mut dirs = archive::create_folder_unsynced(sent_root, dir)?;
            for f in group {
                let name = receipt_file_name(dir, &f.kind, f.consegna.as_deref(), f.raw).map_err(
                    |source| ArchiveError {
                        path: dir.clone(),
                        source,
                    },
                )?;
                if let Some(name) = name {
                    archive::write_synced(&dir.join(name), f.raw, FILE_MODE)?;
                    dirs.push(dir.clone());
                }
            }
            if let Ok(mut v) = to_sync.lock() {
                v.extend(dirs);
            }
            Ok(())
        })();
        if let Err(e) = result {
            error!(
                { field::EVENT } = event::RECEIPT_QUARANTINED,
                { field::MAILBOX } = %mailbox,
                { field::DISPATCH_ID } = %group[0].dispatch_id,
                { field::PATH } = %dir.display(),
                { field::ERROR } = %e,
                "cannot copy the receipt into the sent folder (it is in the archive)"
            );
        }
        Ok(())
    });
    let dirs = to_sync.into_inner().unwrap_or_default();
    if let Err(e) = archive::sync_all(&dirs) {
        error!(
            { field::EVENT } = event::RECEIPT_QUARANTINED,
            { field::MAILBOX } = %mailbox,
            { field::PATH } = %e.path.display(),
            { field::ERROR } = %e,
            "cannot copy the receipt into the sent folder (it is in the archive)"
        );
    }
    for group in &groups {
        let (id, dir) = (&group[0].dispatch_id, &group[0].dir);
        let result = match db.ingest_get(id) {
            Ok(Some(detail)) => sent::write_status(dir, &detail, now).map_err(|e| e.to_string()),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            error!(
                { field::MAILBOX } = %mailbox,
                { field::DISPATCH_ID } = %id,
                { field::PATH } = %dir.display(),
                { field::ERROR } = %e,
                "cannot write the status files"
            );
        }
    }
}

/// Archives several messages: each new file written and fsync'd before its
/// rename (in parallel), then every folder that gained an entry fsync'd
/// once. Returns when all are durable, in the order of `raws`.
fn archive_many(root: &Path, raws: &[&[u8]]) -> Result<Vec<archive::Archived>, ArchiveError> {
    let archived: Vec<archive::Archived> = raws
        .iter()
        .map(|raw| {
            let sha = store::sha256_hex(raw);
            let relative = format!("{}/{}/{sha}.eml", &sha[..2], &sha[2..4]);
            archive::Archived {
                path: root.join(&relative),
                sha256: sha,
                relative,
                size: raw.len() as u64,
            }
        })
        .collect();
    let mut seen = HashSet::new();
    let mut to_write = Vec::new();
    let mut dirs = Vec::new();
    for (a, raw) in archived.iter().zip(raws) {
        if !seen.insert(a.sha256.as_str()) || a.path.exists() {
            continue;
        }
        let dir = a.path.parent().unwrap_or(root).to_owned();
        dirs.extend(archive::create_folder_unsynced(root, &dir)?);
        dirs.push(dir);
        to_write.push((a.path.as_path(), *raw));
    }
    parallel(&to_write, |(path, raw)| {
        archive::write_synced(path, raw, FILE_MODE)
    })?;
    archive::sync_all(&dirs)?;
    Ok(archived)
}

/// The kinds a batch applies inside its transaction; the others (incoming
/// mail, anomalies) take the single-message path after it.
fn applied_in_batch(kind: &Kind) -> bool {
    kind.is_receipt() || matches!(kind, Kind::Unknown(_) | Kind::NotPec)
}

/// What the batch transaction did with one message; logged and filed after
/// the commit.
enum Staged {
    Unreadable(String),
    NotPec,
    /// Incoming mail or an anomaly: [`ingest`] after the commit.
    Later,
    Duplicate,
    Quarantined(Option<String>, String),
    Orphan,
    Applied(Box<Apply>),
}

/// Takes several raw messages in (a fetched batch, in UID order), with the
/// same result as [`ingest`] on each in turn, but with the durable steps
/// grouped: every message is archived first (files fsync'd in parallel,
/// each folder once), then recorded, matched and applied in **one** store
/// transaction (each receipt sees the changes of the ones before it), then
/// logged, copied into the sent folders and the status files rewritten
/// once per letter. Incoming certified mail and anomaly envelopes are
/// recorded in the transaction and unpacked by [`ingest`] after it.
/// Blocking: call it on the store thread.
///
/// The outcomes are in the order of `items`.
///
/// # Errors
///
/// As [`ingest`]. When the transaction fails nothing of it is committed;
/// the archived files stay and the whole batch can be ingested again.
pub fn ingest_batch(
    db: &mut store::Db,
    ctx: &Context<'_>,
    items: &[(&[u8], Source)],
    now: Timestamp,
) -> Result<Vec<IngestOutcome>, IngestError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let raws: Vec<&[u8]> = items.iter().map(|(raw, _)| *raw).collect();
    let archived = archive_many(ctx.archive, &raws)?;
    let mailbox = ctx.mailbox.name.as_str();
    let inspections: Vec<Result<Inspection<'_>, String>> = raws
        .iter()
        .map(|raw| inspect(raw).map_err(|e| e.to_string()))
        .collect();
    let verdicts: Vec<Option<Verdict>> = inspections
        .iter()
        .map(|ins| match ins {
            Ok(ins) if applied_in_batch(ins.kind()) && *ins.kind() != Kind::NotPec => {
                Some(ctx.verifier.verify(ins, now))
            }
            _ => None,
        })
        .collect();
    let job = |i: usize| -> Option<Job<'_, '_>> {
        let ins = inspections[i].as_ref().ok()?;
        Some(Job {
            ctx,
            sha: &archived[i].sha256,
            raw: raws[i],
            ins,
            now,
        })
    };
    let mut failure: Option<IngestError> = None;
    let written = db.write("ingest.batch", |tx| {
        let mut staged = Vec::with_capacity(items.len());
        for (i, (_, source)) in items.iter().enumerate() {
            let a = &archived[i];
            let new = record(
                tx,
                &MessageRow {
                    sha256: a.sha256.clone(),
                    path: a.relative.clone(),
                    size: a.size,
                    direction: Direction::In,
                    mailbox: mailbox.to_owned(),
                    imap_uid: source.uid,
                    imap_uidvalidity: source.uidvalidity,
                    recorded_at: now,
                },
            )?;
            let st = match (&inspections[i], job(i), verdicts[i].as_ref()) {
                (Err(reason), _, _) => Staged::Unreadable(reason.clone()),
                (Ok(ins), _, _) if *ins.kind() == Kind::NotPec => Staged::NotPec,
                (Ok(ins), Some(job), Some(verdict)) if applied_in_batch(ins.kind()) => {
                    let plan = if let Kind::Unknown(raw_kind) = ins.kind() {
                        Ok(Plan::Quarantine(
                            None,
                            format!("unknown PEC message type \"{raw_kind}\""),
                        ))
                    } else {
                        job.plan(tx, verdict)
                    };
                    match plan {
                        Err(e) => {
                            failure = Some(e);
                            return Err(StoreError::Invalid(
                                "ingest batch abandoned (nothing written)".into(),
                            ));
                        }
                        Ok(Plan::Quarantine(id, why)) => {
                            let r = job.new_receipt(
                                verdict,
                                id.clone(),
                                "quarantined",
                                Some(why.clone()),
                            );
                            if tx.record_receipt(&r)?.is_some() {
                                Staged::Quarantined(id, why)
                            } else {
                                Staged::Duplicate
                            }
                        }
                        Ok(Plan::Orphan) => {
                            if tx.record_receipt(&job.orphan_row(verdict))?.is_some() {
                                Staged::Orphan
                            } else {
                                Staged::Duplicate
                            }
                        }
                        Ok(Plan::Apply(a)) => {
                            if job.write_apply(tx, verdict, &a)? {
                                Staged::Applied(a)
                            } else {
                                Staged::Duplicate
                            }
                        }
                    }
                }
                _ => Staged::Later,
            };
            staged.push((new, st));
        }
        Ok(staged)
    });
    let staged = match (written, failure) {
        (_, Some(e)) => return Err(e),
        (Err(e), None) => return Err(e.into()),
        (Ok(s), None) => s,
    };
    let mut outcomes = Vec::with_capacity(items.len());
    let mut filings = Vec::new();
    for (i, (new, st)) in staged.into_iter().enumerate() {
        let (raw, source) = items[i];
        debug!(
            { field::EVENT } = event::MESSAGE_ARCHIVED,
            { field::MAILBOX } = %mailbox,
            { field::PATH } = %archived[i].path.display(),
            { field::UID } = source.uid,
            sha256 = %archived[i].sha256,
            new,
            "message archived"
        );
        if let Ok(ins) = &inspections[i] {
            debug!(
                { field::EVENT } = event::MESSAGE_INSPECTED,
                { field::MAILBOX } = %mailbox,
                { field::KIND } = %ins.kind(),
                sha256 = %archived[i].sha256,
                problems = ins.problems.len(),
                "message inspected"
            );
        }
        let outcome = match (st, job(i), verdicts[i].as_ref()) {
            (Staged::Unreadable(reason), _, _) => {
                warn!(
                    { field::EVENT } = event::MESSAGE_UNREADABLE,
                    { field::MAILBOX } = %mailbox,
                    { field::UID } = source.uid,
                    { field::ERROR } = %reason,
                    sha256 = %archived[i].sha256,
                    "not a mail message; archived only"
                );
                IngestOutcome::Unreadable { reason }
            }
            (Staged::NotPec, _, _) => IngestOutcome::NotPec,
            (Staged::Duplicate, _, _) => IngestOutcome::Duplicate {
                sha256: archived[i].sha256.clone(),
            },
            (Staged::Quarantined(id, why), Some(job), Some(verdict)) => {
                job.log_quarantined(verdict, id, why)
            }
            (Staged::Orphan, Some(job), _) => job.log_orphan(),
            (Staged::Applied(a), Some(job), _) => {
                filings.push(Filing {
                    raw: raws[i],
                    ..job.filing(&a)
                });
                job.applied_outcome(*a)
            }
            // Later, or (impossible) a staged receipt without inspection.
            _ => ingest(db, ctx, raw, source, now)?,
        };
        outcomes.push(outcome);
    }
    file_receipts(db, ctx, &filings, now);
    Ok(outcomes)
}

enum Written {
    Done,
    AlreadyDone,
    Stale,
}

/// The short human report kept next to incoming mail.
fn report(ins: &Inspection<'_>, d: &Daticert, v: &Verdict, sha: &str) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "Verifica del messaggio PEC / PEC message verification");
    let _ = writeln!(s, "Tipo / Kind: {}", ins.kind());
    let _ = writeln!(s, "Identificativo: {}", d.identificativo);
    let _ = writeln!(
        s,
        "Data (certificata) / Certified time: {}",
        sent::ts(d.data)
    );
    if let Some(m) = &d.mittente {
        let _ = writeln!(s, "Mittente / Sender: {m}");
    }
    for x in &d.destinatari {
        let _ = writeln!(s, "Destinatario / Recipient: {} ({})", x.address, x.tipo);
    }
    if let Some(o) = &d.oggetto {
        let _ = writeln!(s, "Oggetto / Subject: {o}");
    }
    if let Some(g) = &d.gestore_emittente {
        let _ = writeln!(s, "Gestore / Provider: {g}");
    }
    let esito = if v.is_valid() {
        "VALIDA / VALID"
    } else {
        "NON VALIDA / NOT VALID"
    };
    let _ = writeln!(s, "Firma / Signature: {esito}");
    if let Some(r) = &v.reason {
        let _ = writeln!(s, "  motivo / reason: {r}");
    }
    if let Some(x) = &v.signer_cn {
        let _ = writeln!(s, "  firmatario / signer: {x}");
    }
    if let Some(x) = &v.signer_email {
        let _ = writeln!(s, "  indirizzo / address: {x}");
    }
    if let Some(x) = &v.issuer_cn {
        let _ = writeln!(s, "  emesso da / issuer: {x}");
    }
    if let Some(x) = v.signed_at {
        let _ = writeln!(s, "  firmato il / signed at: {}", sent::ts(x));
    }
    let _ = writeln!(s, "  revoca / revocation: {}", v.revocation);
    for p in &ins.problems {
        let _ = writeln!(s, "Problema / Problem: {p}");
    }
    let _ = writeln!(s, "SHA-256: {sha}");
    s
}

// ---------------------------------------------------------------------------
// Matching

/// Matches a receipt by its signed daticert: `msgid` → an attempt's
/// Message-ID, `identificativo` → an accepted dispatch; both must agree,
/// the outer `X-Riferimento-Message-ID` must agree with the msgid, and
/// `consegna` must be a recipient of the letter.
fn match_receipt<R: Reads>(
    db: &R,
    ctx: &Context<'_>,
    ins: &Inspection<'_>,
    d: &Daticert,
) -> Result<Match, IngestError> {
    let mailbox = ctx.mailbox;
    let msgid = d.msgid.as_deref().and_then(normalize_message_id);
    if let Some(h) = ins.message.classification.refers_to.as_deref() {
        let h = normalize_message_id(h);
        if h.is_some() && h != msgid {
            return Ok(Match::Problem(
                None,
                format!(
                    "X-Riferimento-Message-ID <{}> differs from the signed daticert msgid <{}>",
                    h.unwrap_or_default(),
                    msgid.clone().unwrap_or_default()
                ),
            ));
        }
    }
    let by_msgid: Option<String> = match &msgid {
        Some(m) => db.by_message_id(m)?,
        None => None,
    };
    let ident = d.identificativo.trim();
    let by_ident: Option<String> = if ident.is_empty() {
        None
    } else {
        db.by_identificativo(ident)?.into_iter().next()
    };
    // A msgid of ours that names no known attempt, of a letter of this
    // mailbox: an attempt the store lost.
    let lost = match (&by_msgid, &msgid, ctx.gateway_hostname) {
        (None, Some(m), Some(host)) => match parse_gateway_message_id(m, host) {
            Some((id, n)) => db
                .get(&id)?
                .filter(|det| det.dispatch.mailbox == mailbox.name)
                .map(|_| LostAttempt {
                    dispatch_id: id,
                    n,
                    message_id: m.clone(),
                }),
            None => None,
        },
        _ => None,
    };
    let by_msgid = by_msgid.or_else(|| lost.as_ref().map(|l| l.dispatch_id.clone()));
    let id = match (by_msgid, by_ident) {
        (None, None) => return Ok(Match::Orphan),
        (Some(a), Some(b)) if a != b => {
            return Ok(Match::Problem(
                None,
                format!(
                    "the signed msgid names letter {a} but the identificativo names letter {b}"
                ),
            ));
        }
        (None, Some(b)) if msgid.is_some() => {
            return Ok(Match::Problem(
                Some(b.clone()),
                format!(
                    "the signed msgid <{}> names no letter, but the identificativo names letter {b}",
                    msgid.unwrap_or_default()
                ),
            ));
        }
        (Some(a), _) | (None, Some(a)) => a,
    };
    let Some(det) = db.get(&id)? else {
        return Ok(Match::Orphan);
    };
    if det.dispatch.mailbox != mailbox.name {
        return Ok(Match::Problem(
            Some(id.clone()),
            format!(
                "the receipt arrived in mailbox {} but letter {id} was sent from {}",
                mailbox.name, det.dispatch.mailbox
            ),
        ));
    }
    let per_recipient = matches!(
        ins.kind(),
        Kind::Delivery | Kind::DeliveryError | Kind::DeliveryTimeout | Kind::VirusDetected
    );
    if per_recipient {
        match d.consegna.as_deref() {
            None => {
                return Ok(Match::Problem(
                    Some(id),
                    "a per-recipient receipt without consegna".into(),
                ));
            }
            Some(c) if !det.recipients.iter().any(|r| same_address(&r.address, c)) => {
                return Ok(Match::Problem(
                    Some(id.clone()),
                    format!("consegna {c} is not a recipient of letter {id}"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(match lost {
        Some(lost) => Match::Recover(Box::new(lost)),
        None => Match::Dispatch(id),
    })
}

// ---------------------------------------------------------------------------
// Store rows <-> the pure dispatch

fn parse_detail(ev: &EventRow) -> Value {
    serde_json::from_str(&ev.detail).unwrap_or(Value::Null)
}

/// Rebuilds the pure [`Dispatch`] of the state machine from the store's
/// rows and the dispatch's events (for what has no column: the daticert
/// time of each recipient's receipt, letter-level conflicts, attempt states
/// proven by receipts).
///
/// # Errors
///
/// A state name the state machine does not know.
pub fn dispatch_from_store(
    detail: &DispatchDetail,
    events: &[EventRow],
) -> Result<Dispatch, String> {
    let row = &detail.dispatch;
    let state = DispatchState::from_str(&row.state).map_err(|e| e.to_string())?;
    let mut attempts = Vec::with_capacity(detail.attempts.len());
    for a in &detail.attempts {
        attempts.push(Attempt {
            message_id: a.message_id.clone(),
            state: AttemptState::from_str(&a.state).map_err(|e| e.to_string())?,
            started_at: a.started_at,
            changed_at: a.finished_at.unwrap_or(a.started_at),
            reply: a.smtp_reply.clone(),
        });
    }
    let mut recipients = Vec::with_capacity(detail.recipients.len());
    for r in &detail.recipients {
        recipients.push(Recipient {
            address: r.address.clone(),
            field: match r.field {
                store::Field::To => PecField::To,
                store::Field::Cc => PecField::Cc,
            },
            certified: r.certified,
            state: RecipientState::from_str(&r.state).map_err(|e| e.to_string())?,
            at: None,
            detail: r.detail.clone(),
            conflict: r.conflict.is_some(),
        });
    }
    let mut submitted_at = detail
        .attempts
        .iter()
        .filter(|a| a.state == "submitted")
        .filter_map(|a| a.finished_at)
        .max();
    let mut conflict = None;
    for ev in events {
        let v = parse_detail(ev);
        if ev.event == "dispatch.submitted" {
            submitted_at = Some(ev.at);
        } else if ev.event == "dispatch.conflict" && v["level"] == "letter" {
            conflict = v["detail"].as_str().map(str::to_owned);
        } else if let Some(st) = ev.event.strip_prefix("attempt.")
            && let (Some(mid), Ok(st)) = (v["message_id"].as_str(), AttemptState::from_str(st))
            && let Some(a) = attempts.iter_mut().find(|a| a.message_id == mid)
        {
            a.state = st;
            a.changed_at = ev.at;
        } else if ev.event.starts_with("recipient.")
            && let (Some(addr), Some(at)) = (v["recipient"].as_str(), v["receipt_at"].as_str())
            && let Some(r) = recipients
                .iter_mut()
                .find(|r| same_address(&r.address, addr))
            && let Ok(at) = at.parse::<Timestamp>()
        {
            r.at = Some(at);
        }
    }
    let reason = match state {
        DispatchState::NotAccepted | DispatchState::Refused => row.error.clone(),
        _ => None,
    };
    Ok(Dispatch {
        state,
        attempts,
        submitted_at,
        accepted_at: row.accepted_at,
        identificativo: row.identificativo.clone(),
        reason,
        conflict,
        recipients,
    })
}

struct WriteCtx<'a> {
    dispatch_id: &'a str,
    mailbox: &'a str,
    cause: &'a str,
    facts: &'a ReceiptFacts,
    now: Timestamp,
}

/// Writes an outcome's changes, in order, inside the caller's transaction.
fn write_outcome(
    tx: &Tx<'_>,
    w: &WriteCtx<'_>,
    before: &Dispatch,
    outcome: &Outcome,
) -> store::Result<()> {
    let after = &outcome.dispatch;
    let kind = w.facts.kind.as_str();
    let receipt_at = sent::ts(w.facts.at);
    let base_detail = || json!({"kind": kind, "daticert_at": receipt_at});
    let mut dispatch_extra_pending = true;
    let new_ident = (after.identificativo != before.identificativo)
        .then(|| after.identificativo.clone())
        .flatten();
    let new_accepted = (after.accepted_at != before.accepted_at)
        .then_some(after.accepted_at)
        .flatten();
    let new_reason =
        (after.reason != before.reason).then(|| after.reason.clone().unwrap_or_default());
    // The last RecipientChanged per address carries the final columns.
    let last_change_of = |address: &str| {
        outcome.changes.iter().rposition(|c| {
            matches!(c, Change::RecipientChanged { address: a, .. } if same_address(a, address))
        })
    };
    let recipient_change = |r_after: &Recipient,
                            r_before: Option<&Recipient>,
                            state: RecipientState,
                            change_cause: &str| {
        let mut c = RecipientChange::new(state.as_str(), w.cause, w.now);
        let mut detail = base_detail();
        detail["change_cause"] = json!(change_cause);
        if r_after.at != r_before.and_then(|r| r.at)
            && let Some(at) = r_after.at
        {
            detail["receipt_at"] = json!(sent::ts(at));
        }
        c.detail = detail;
        if r_before.map(|r| r.certified) != Some(r_after.certified) {
            c.certified = r_after.certified;
        }
        if r_before.map(|r| &r.detail) != Some(&r_after.detail) {
            c.note = Some(r_after.detail.clone().unwrap_or_default());
        }
        if r_after.conflict
            && (r_before.map(|r| (r.conflict, &r.detail)) != Some((true, &r_after.detail)))
        {
            c.conflict = r_after.detail.clone();
        }
        c
    };
    let mut recipients_written: HashSet<String> = HashSet::new();
    for (i, change) in outcome.changes.iter().enumerate() {
        match change {
            Change::DispatchChanged { to, cause, .. } => {
                let mut c = DispatchChange::new(to.as_str(), w.cause, w.now);
                let mut detail = base_detail();
                detail["change_cause"] = json!(cause.as_str());
                c.detail = detail;
                if dispatch_extra_pending {
                    c.identificativo = new_ident.clone();
                    c.accepted_at = new_accepted;
                    c.error = new_reason.clone();
                    dispatch_extra_pending = false;
                }
                tx.set_dispatch_state(w.dispatch_id, &c)?;
            }
            Change::RecipientChanged {
                address, to, cause, ..
            } => {
                let Some(r_after) = after.recipient(address) else {
                    continue;
                };
                let r_before = before.recipient(address);
                let mut c = recipient_change(r_after, r_before, *to, cause.as_str());
                if last_change_of(address) != Some(i) {
                    // An intermediate step: only the state.
                    c = RecipientChange {
                        certified: None,
                        note: None,
                        conflict: None,
                        ..c
                    };
                    if let Value::Object(m) = &mut c.detail {
                        m.remove("receipt_at");
                    }
                } else {
                    recipients_written.insert(canonical_address(address));
                }
                tx.set_recipient_state(w.dispatch_id, address, &c)?;
            }
            // A new attempt is written by its own store call
            // (`Tx::recover_attempt`, with its `attempt.recovered` event).
            Change::AttemptChanged { from: None, .. } => {}
            Change::AttemptChanged {
                message_id,
                from,
                to,
                cause,
            } => {
                if *to == AttemptState::Submitted {
                    // The attempts table follows, so that the SMTP edge's late
                    // outcome and the start-up recovery see the proof.
                    tx.attempt_proven(w.dispatch_id, message_id, w.now)?;
                }
                tx.append_event(&NewEvent {
                    at: w.now,
                    mailbox: Some(w.mailbox.to_owned()),
                    dispatch_id: Some(w.dispatch_id.to_owned()),
                    event: format!("attempt.{to}"),
                    cause: w.cause.to_owned(),
                    detail: json!({
                        "message_id": normalize_message_id(message_id).unwrap_or_else(|| message_id.clone()),
                        "from": from.map(AttemptState::as_str), "to": to.as_str(),
                        "change_cause": cause.as_str(), "kind": kind,
                    }),
                })?;
            }
            Change::Conflict {
                address,
                detail,
                cause,
            } => {
                let letter = after.conflict.as_deref() == Some(detail.as_str())
                    && before.conflict.as_deref() != Some(detail.as_str());
                tx.append_event(&NewEvent {
                    at: w.now,
                    mailbox: Some(w.mailbox.to_owned()),
                    dispatch_id: Some(w.dispatch_id.to_owned()),
                    event: if letter {
                        "dispatch.conflict"
                    } else {
                        "recipient.conflict"
                    }
                    .to_owned(),
                    cause: w.cause.to_owned(),
                    detail: json!({
                        "level": if letter { "letter" } else { "recipient" },
                        "recipient": address.as_deref().map(canonical_address),
                        "detail": detail, "change_cause": cause.as_str(), "kind": kind,
                    }),
                })?;
            }
            Change::Duplicate { .. } | Change::Ignored { .. } => {}
        }
    }
    // Columns that changed without a state change (the acceptance's
    // classification, a conflict, a new detail).
    for r_after in &after.recipients {
        if recipients_written.contains(&canonical_address(&r_after.address)) {
            continue;
        }
        let r_before = before.recipient(&r_after.address);
        if r_before == Some(r_after) {
            continue;
        }
        let c = recipient_change(r_after, r_before, r_after.state, kind);
        tx.set_recipient_state(w.dispatch_id, &r_after.address, &c)?;
    }
    if dispatch_extra_pending
        && (new_ident.is_some() || new_accepted.is_some() || new_reason.is_some())
    {
        let mut c = DispatchChange::new(after.state.as_str(), w.cause, w.now);
        c.detail = base_detail();
        c.identificativo = new_ident;
        c.accepted_at = new_accepted;
        c.error = new_reason;
        tx.set_dispatch_state(w.dispatch_id, &c)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Files

/// `inbox/YYYY/MM` for `at` (month in Europe/Rome, the clerks' calendar).
fn month_dir(inbox: &Path, at: Timestamp) -> PathBuf {
    let tz = jiff::tz::TimeZone::get("Europe/Rome").unwrap_or(jiff::tz::TimeZone::UTC);
    let local = at.to_zoned_datetime(tz);
    inbox
        .join(format!("{:04}", local.year()))
        .join(format!("{:02}", local.month()))
}

/// A folder name made from untrusted text: safe characters only.
fn sanitize_component(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while out.starts_with('.') {
        out.remove(0);
    }
    out.truncate(MAX_NAME_BYTES);
    out
}

/// Writes `files` into a new folder `month/base` (or `base-2`, ... when a
/// folder of that name holds another message), atomically: a temporary
/// folder is filled and renamed. A folder that already holds this very
/// message (`marker` with the same bytes, after a crash) is reused.
fn place_folder(
    root: &Path,
    month: &Path,
    base: &str,
    sha: &str,
    marker: &str,
    raw: &[u8],
    files: &[(String, Vec<u8>)],
) -> Result<PathBuf, ArchiveError> {
    crate::archive::create_folder(root, month)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ArchiveError { path, source }
    };
    let mut n = 1;
    let target = loop {
        let name = if n == 1 {
            base.to_owned()
        } else {
            format!("{base}-{n}")
        };
        let candidate = month.join(&name);
        if !candidate.exists() {
            break candidate;
        }
        if fs::read(candidate.join(marker)).is_ok_and(|b| b == raw) {
            return Ok(candidate);
        }
        n += 1;
    };
    let tmp = month.join(format!(".tmp-{}", &sha[..16]));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let _ = fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(DIR_MODE));
    for (name, bytes) in files {
        let path = tmp.join(name);
        // Names are sanitised; this is a last guard against escaping.
        if path.parent() != Some(tmp.as_path()) {
            continue;
        }
        write_durable(&path, bytes, FILE_MODE)?;
    }
    fs::rename(&tmp, &target).map_err(io(&target))?;
    fs::File::open(month)
        .and_then(|d| d.sync_all())
        .map_err(io(month))?;
    Ok(target)
}

/// The name of a receipt in the sent folder, `NN-<kind>[-<recipient>].eml`
/// with the next free `NN`; `None` when the folder already holds these
/// bytes (a crash after the commit, before the copy).
fn receipt_file_name(
    dir: &Path,
    kind: &Kind,
    recipient: Option<&str>,
    raw: &[u8],
) -> std::io::Result<Option<String>> {
    let mut max = 0u32;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .get(..2)
            .filter(|_| name.as_bytes().get(2) == Some(&b'-') && name.ends_with(".eml"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if n == 0 {
            continue; // 00-inviato*.eml: the letter itself
        }
        max = max.max(n);
        if entry.metadata().map(|m| m.len()).ok() == Some(raw.len() as u64)
            && fs::read(entry.path()).is_ok_and(|b| b == raw)
        {
            return Ok(None);
        }
    }
    let mut name = format!("{:02}-{}", max + 1, kind.as_str());
    if let Some(r) = recipient {
        let r = sanitize_component(&canonical_address(r));
        if !r.is_empty() {
            name.push('-');
            name.push_str(&r);
        }
    }
    name.push_str(".eml");
    Ok(Some(name))
}

/// Names Windows refuses, whatever the extension.
const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// Makes an attachment name from a message safe to create in a clerk's
/// folder: only the last path component (no traversal), no control or
/// Windows-reserved characters, no leading dots, no trailing dots or
/// spaces, no reserved device names, at most 150 bytes (the extension
/// kept), and distinct (case-insensitively) from every name in `taken`
/// (`name-2.pdf`, `name-3.pdf`, ...); the result is added to `taken`.
pub fn sanitize_file_name(name: &str, taken: &mut HashSet<String>) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut s: String = last
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') {
                '_'
            } else {
                c
            }
        })
        .collect();
    s = s
        .trim_start_matches(['.', ' '])
        .trim_end_matches(['.', ' '])
        .to_owned();
    if s.is_empty() {
        s = "allegato".to_owned();
    }
    let (stem, ext) = match s.rfind('.') {
        Some(i) if i > 0 && s.len() - i <= 16 => (s[..i].to_owned(), s[i..].to_owned()),
        _ => (s.clone(), String::new()),
    };
    let mut stem = stem;
    let stem_upper = stem.trim_end_matches(['.', ' ']).to_ascii_uppercase();
    if RESERVED.contains(&stem_upper.as_str()) {
        stem = format!("_{stem}");
    }
    let limit = MAX_NAME_BYTES.saturating_sub(ext.len() + 4);
    if stem.len() > limit {
        let mut cut = limit;
        while !stem.is_char_boundary(cut) {
            cut -= 1;
        }
        stem.truncate(cut);
    }
    let mut candidate = format!("{stem}{ext}");
    let mut n = 2;
    while taken.contains(&candidate.to_lowercase()) {
        candidate = format!("{stem}-{n}{ext}");
        n += 1;
    }
    taken.insert(candidate.to_lowercase());
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_made_safe() {
        let mut taken = HashSet::new();
        assert_eq!(sanitize_file_name("../../etc/passwd", &mut taken), "passwd");
        assert_eq!(sanitize_file_name("a\u{7}b.pdf", &mut taken), "a_b.pdf");
        assert_eq!(sanitize_file_name("CON", &mut taken), "_CON");
        assert_eq!(sanitize_file_name("con.txt", &mut taken), "_con.txt");
        assert_eq!(sanitize_file_name("doc.pdf", &mut taken), "doc.pdf");
        assert_eq!(sanitize_file_name("DOC.pdf", &mut taken), "DOC-2.pdf");
        assert_eq!(sanitize_file_name("..", &mut taken), "allegato");
        assert_eq!(sanitize_file_name("C:\\x\\.hidden", &mut taken), "hidden");
        let long = "x".repeat(400) + ".pdf";
        let s = sanitize_file_name(&long, &mut taken);
        assert!(s.len() <= MAX_NAME_BYTES && s.ends_with(".pdf"));
    }
}
