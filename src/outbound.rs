//! The outbound pipeline of one mailbox: taking claimed letters into the
//! store (with their sent folder), and sending queued dispatches over SMTP
//! without ever sending one twice.
//!
//! Blocking work (files, SQLite through `Db`) runs on the store thread or
//! in `spawn_blocking`; the async tasks only orchestrate.
//!
//! Invariants:
//! - a letter leaves the outbox claim folder only after its dispatch row
//!   and its sent folder exist (a crash in between re-takes the claim, and
//!   the deterministic dispatch id makes that idempotent);
//! - the exact bytes of an attempt are archived and the attempt committed
//!   as `sending` with its Message-ID before the SMTP transaction starts; it
//!   becomes `submitted` only after the 250 reply; a `sending` found at
//!   start-up or a connection lost after DATA is `uncertain`, never resent
//!   blindly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, MailboxConfig};
use crate::outbox::{Letter, intake};
use crate::sent::{self, AttemptRecord, DispatchRecord, DocumentRecord, EnvelopeRecord};
use crate::smtp::{self, Draft, Pacer, SubmitOutcome, Submitter};
use crate::store::{
    self, Direction, Field, MessageRow, NewDispatch, NewDocument, NewRecipient, Store,
};
use crate::telemetry::{event, field};

/// The dispatch id of a letter taken from a claim: the claim's time and a
/// hash of the claim id and the letter's name, so that taking the same
/// claim again after a crash gives the same ids (and inserts nothing twice).
pub fn dispatch_id_for(claim_id: &str, letter_name: &str) -> String {
    let ms: u64 = claim_id
        .split('-')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let digest = openssl::sha::sha256(format!("{claim_id}\0{letter_name}").as_bytes());
    let mut random = [0u8; 10];
    random.copy_from_slice(&digest[..10]);
    store::dispatch_id_from_parts(ms, random)
}

/// The current time as a `SystemTime` (file times are compared with it),
/// read through jiff like every clock reading of the daemon.
pub fn system_now() -> SystemTime {
    let ms = u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0);
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

/// What happened to one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntakeOutcome {
    /// Letters stored as dispatches (ids).
    Stored(Vec<String>),
    /// Rejected into this folder.
    Rejected(PathBuf),
}

/// Takes a claimed letter (or mass mailing) in: validation, sent folders,
/// dispatch rows, then the claim folder is released. Blocking.
///
/// # Errors
/// File-system or database failures (the claim stays, and is taken again
/// later: nothing is lost).
pub fn take_in(
    db: &mut store::Db,
    mailbox: &MailboxConfig,
    claim: &intake::Claim,
    now: Timestamp,
) -> Result<IntakeOutcome, String> {
    let claim_id = claim.id.clone();
    let mailbox_name = mailbox.name.clone();
    let is_dup = |hash: &str| -> Option<String> {
        let found = db
            .find_by_content_hash(&mailbox_name, hash)
            .ok()
            .flatten()?;
        // A letter of this very claim stored before a crash is not a duplicate.
        (found.id != dispatch_id_for(&claim_id, &found.source)).then_some(found.id)
    };
    let letters = match intake::load(claim, &mailbox.limits, &is_dup) {
        Ok(l) => l,
        Err(rejection) => {
            let folder = intake::reject(claim, &mailbox.outbox, &rejection.problems)
                .map_err(|e| e.to_string())?;
            let fields: Vec<&str> = rejection
                .problems
                .iter()
                .map(|p| p.field.as_str())
                .collect();
            warn!(
                { field::EVENT } = event::LETTER_REJECTED,
                { field::MAILBOX } = %mailbox.name,
                { field::PATH } = %folder.display(),
                letter = %rejection.letter,
                problems = %fields.join(", "),
                "letter rejected"
            );
            let _ = db.append_event(&store::NewEvent {
                at: now,
                mailbox: Some(mailbox.name.clone()),
                dispatch_id: None,
                event: event::LETTER_REJECTED.to_owned(),
                cause: "validation".to_owned(),
                detail: serde_json::json!({
                    "letter": rejection.letter,
                    "folder": folder.display().to_string(),
                    "problems": rejection.problems.iter().map(|p| serde_json::json!({"field": p.field, "en": p.en})).collect::<Vec<_>>(),
                }),
            });
            return Ok(IntakeOutcome::Rejected(folder));
        }
    };
    let mut ids = Vec::new();
    for letter in &letters {
        let id = dispatch_id_for(&claim.id, &letter.name);
        if db.get(&id).map_err(|e| e.to_string())?.is_some() {
            ids.push(id);
            continue;
        }
        let dir = sent::folder(&mailbox.sent, now, &id);
        prepare_sent_folder(mailbox, &id, letter, &dir, now)?;
        let new = NewDispatch {
            id: id.clone(),
            mailbox: mailbox.name.clone(),
            kind: letter.kind.as_str().to_owned(),
            protocol: letter.protocol.clone(),
            reference: letter.reference.clone(),
            subject: letter.subject.clone(),
            receipt_type: letter.receipt.as_str().to_owned(),
            in_reply_to: letter.in_reply_to.clone(),
            content_hash: letter.content_hash.clone(),
            source: letter.name.clone(),
            sent_dir: dir.display().to_string(),
            created_at: now,
            recipients: letter
                .to
                .iter()
                .map(|a| NewRecipient {
                    address: a.clone(),
                    field: Field::To,
                })
                .chain(letter.cc.iter().map(|a| NewRecipient {
                    address: a.clone(),
                    field: Field::Cc,
                }))
                .collect(),
            documents: letter
                .attachments
                .iter()
                .map(|d| NewDocument {
                    name: d.name.clone(),
                    sha256: d.sha256.clone(),
                    size: d.size,
                })
                .collect(),
        };
        db.insert_dispatch(&new).map_err(|e| e.to_string())?;
        if let Ok(Some(detail)) = db.get(&id) {
            let _ = sent::write_status(&dir, &detail, now);
        }
        info!(
            { field::EVENT } = event::DISPATCH_QUEUED,
            { field::DISPATCH_ID } = %id,
            { field::MAILBOX } = %mailbox.name,
            { field::PATH } = %dir.display(),
            letter = %letter.name,
            "letter queued"
        );
        ids.push(id);
    }
    intake::release(claim).map_err(|e| e.to_string())?;
    Ok(IntakeOutcome::Stored(ids))
}

fn prepare_sent_folder(
    mailbox: &MailboxConfig,
    id: &str,
    letter: &Letter,
    dir: &Path,
    now: Timestamp,
) -> Result<(), String> {
    crate::archive::create_folder(&mailbox.sent, dir).map_err(|e| e.to_string())?;
    for doc in &letter.attachments {
        let bytes = std::fs::read(&doc.path).map_err(|e| format!("{}: {e}", doc.path.display()))?;
        crate::archive::write_synced(&dir.join(&doc.name), &bytes, 0o640)
            .map_err(|e| e.to_string())?;
    }
    let record = DispatchRecord {
        dispatch_id: id.to_owned(),
        mailbox: mailbox.name.clone(),
        from: mailbox.address.clone(),
        source: letter.name.clone(),
        created_at: sent::ts(now),
        content_hash: letter.content_hash.clone(),
        envelope: EnvelopeRecord {
            to: letter.to.clone(),
            cc: letter.cc.clone(),
            subject: letter.subject.clone(),
            body: letter.body.clone(),
            attachments: letter
                .attachments
                .iter()
                .map(|d| DocumentRecord {
                    name: d.name.clone(),
                    sha256: d.sha256.clone(),
                    size: d.size,
                })
                .collect(),
            kind: letter.kind.as_str().to_owned(),
            protocol: letter.protocol.clone(),
            reference: letter.reference.clone(),
            receipt: letter.receipt.as_str().to_owned(),
            in_reply_to: letter.in_reply_to.clone(),
            allow_duplicate: letter.allow_duplicate,
        },
        attempts: Vec::new(),
    };
    sent::write_record(dir, &record).map_err(|e| e.to_string())?;
    // One folder fsync for the documents and dispatch.json together.
    crate::archive::sync_folder(dir).map_err(|e| e.to_string())
}

/// One pass over the outbox: recovers claims left by a crash (first pass
/// only), scans, claims and takes in every complete letter. Blocking.
pub fn intake_pass(
    db: &mut store::Db,
    config: &Config,
    mailbox: &MailboxConfig,
    recover: bool,
    cancel: &CancellationToken,
) -> usize {
    let mut stored = 0;
    let mut claims = Vec::new();
    if recover {
        match intake::recover(&mailbox.outbox) {
            Ok(c) => claims.extend(c),
            Err(e) => {
                error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "outbox recovery failed")
            }
        }
    }
    match intake::scan(
        &mailbox.outbox,
        config.outbox.settle,
        intake::DEFAULT_MISSING_GRACE,
        system_now(),
    ) {
        Ok(candidates) => {
            for c in candidates {
                if cancel.is_cancelled() {
                    break;
                }
                // A candidate with files missing is returned by the scan only
                // once it has waited `missing_grace`: it is claimed, and
                // `load` refuses it naming the missing files.
                match intake::claim(&c, &mailbox.outbox, system_now()) {
                    Ok(claim) => claims.push(claim),
                    Err(e) if e.is_taken() => {}
                    Err(e) => {
                        error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "claim failed")
                    }
                }
            }
        }
        Err(e) => {
            error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "outbox scan failed")
        }
    }
    for claim in claims {
        if cancel.is_cancelled() {
            // A claim not taken in stays in .processing/ and is recovered
            // at the next start.
            break;
        }
        match take_in(db, mailbox, &claim, Timestamp::now()) {
            Ok(IntakeOutcome::Stored(ids)) => stored += ids.len(),
            Ok(IntakeOutcome::Rejected(_)) => {}
            Err(e) => error!(
                { field::MAILBOX } = %mailbox.name,
                { field::PATH } = %claim.dir.display(),
                { field::ERROR } = %e,
                "letter could not be taken in; it stays claimed and is retried"
            ),
        }
    }
    stored
}

/// The sender of one mailbox.
pub struct Sender {
    mailbox: MailboxConfig,
    hostname: String,
    submitter: Submitter,
    pacer: Pacer,
    store: Store,
    archive: PathBuf,
    /// Dispatches waiting after a transient failure: when they may be tried
    /// again and how many times they failed.
    backoff: HashMap<String, (Instant, u32)>,
    /// Base of the retry backoff.
    retry_base: Duration,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("mailbox", &self.mailbox.name)
            .finish_non_exhaustive()
    }
}

/// What one sending pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendPass {
    /// Submissions attempted.
    pub attempted: usize,
    /// The mailbox was suspended (authentication refused).
    pub suspended: bool,
    /// Nothing could be sent now; try again after this long.
    pub wait: Option<Duration>,
}

impl Sender {
    /// A sender for this mailbox.
    ///
    /// # Errors
    /// TLS setup failures (CA file).
    pub fn new(config: &Config, mailbox: &MailboxConfig, store: Store) -> Result<Sender, String> {
        let submitter =
            Submitter::new(&mailbox.smtp, &config.gateway.hostname).map_err(|e| e.to_string())?;
        Ok(Sender {
            mailbox: mailbox.clone(),
            hostname: config.gateway.hostname.clone(),
            submitter,
            pacer: Pacer::new(mailbox.pace.per_minute, mailbox.pace.per_day),
            store,
            archive: config.store.archive.clone(),
            backoff: HashMap::new(),
            retry_base: Duration::from_secs(5),
        })
    }

    /// Sends what is queued, paced, until nothing is left or `cancel` fires
    /// between two letters (a transaction in progress is never cut).
    pub async fn pass(&mut self, cancel: &CancellationToken) -> SendPass {
        let mut out = SendPass::default();
        let name = self.mailbox.name.clone();
        let queued = match self.store.call(move |db| db.next_queued(&name, 50)).await {
            Ok(q) => q,
            Err(e) => {
                error!({ field::MAILBOX } = %self.mailbox.name, { field::ERROR } = %e, "store: cannot read the queue");
                out.wait = Some(Duration::from_secs(5));
                return out;
            }
        };
        for row in queued {
            if cancel.is_cancelled() {
                break;
            }
            if let Some((at, _)) = self.backoff.get(&row.id)
                && *at > Instant::now()
            {
                let left = at.duration_since(Instant::now());
                out.wait = Some(out.wait.map_or(left, |w| w.min(left)));
                continue;
            }
            let wait = self.pacer.wait(Timestamp::now());
            if !wait.is_zero() {
                out.wait = Some(wait);
                break;
            }
            self.pacer.record(Timestamp::now());
            out.attempted += 1;
            match self.send_one(&row.id).await {
                Ok(true) => {}
                Ok(false) => {
                    out.suspended = true;
                    break;
                }
                Err(e) => {
                    error!({ field::DISPATCH_ID } = %row.id, { field::MAILBOX } = %self.mailbox.name, { field::ERROR } = %e, "sending failed");
                    self.schedule_retry(&row.id);
                }
            }
        }
        out
    }

    fn schedule_retry(&mut self, id: &str) {
        let entry = self
            .backoff
            .entry(id.to_owned())
            .or_insert((Instant::now(), 0));
        entry.1 += 1;
        let mut r = [0u8; 1];
        let _ = openssl::rand::rand_bytes(&mut r);
        let delay = smtp::backoff(
            entry.1,
            self.retry_base,
            Duration::from_secs(30 * 60),
            f64::from(r[0]) / 256.0,
        );
        entry.0 = Instant::now() + delay;
    }

    /// One attempt of one dispatch. `Ok(false)` when the mailbox must be
    /// suspended (authentication refused).
    async fn send_one(&mut self, id: &str) -> Result<bool, String> {
        let key = id.to_owned();
        let detail = self
            .store
            .call(move |db| db.get(&key))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("dispatch {id} vanished"))?;
        let dir = PathBuf::from(&detail.dispatch.sent_dir);
        let record = sent::read_record(&dir)?;
        let n = u32::try_from(detail.attempts.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let mut rnd = [0u8; 6];
        openssl::rand::rand_bytes(&mut rnd).map_err(|e| e.to_string())?;
        let rnd = store::hex(&rnd);
        let message_id = format!("{id}.{n}.{rnd}@{}", self.hostname);
        let mut documents = Vec::new();
        for d in &record.envelope.attachments {
            let bytes = std::fs::read(dir.join(&d.name))
                .map_err(|e| format!("{}: {e}", dir.join(&d.name).display()))?;
            documents.push(smtp::Document {
                name: d.name.clone(),
                bytes,
            });
        }
        let in_reply_to: Vec<String> = record.envelope.in_reply_to.iter().cloned().collect();
        let now = Timestamp::now();
        let bytes = smtp::compose(&Draft {
            from: &self.mailbox.address,
            to: &record.envelope.to,
            cc: &record.envelope.cc,
            subject: &record.envelope.subject,
            body: &record.envelope.body,
            documents: &documents,
            receipt: &record.envelope.receipt,
            message_id: &message_id,
            in_reply_to: &in_reply_to,
            date: std::time::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(now.as_second()).unwrap_or(0)),
        })
        .map_err(|e| e.to_string())?;
        // The exact bytes go to the archive and the sent folder first.
        let archived = crate::archive::store(&self.archive, &bytes).map_err(|e| e.to_string())?;
        crate::archive::write_durable(&dir.join(sent::eml_name(n)), &bytes, 0o640)
            .map_err(|e| e.to_string())?;
        let row = MessageRow {
            sha256: archived.sha256.clone(),
            path: archived.relative.clone(),
            size: archived.size,
            direction: Direction::Out,
            mailbox: self.mailbox.name.clone(),
            imap_uid: None,
            imap_uidvalidity: None,
            recorded_at: now,
        };
        let (key, mid, sha) = (id.to_owned(), message_id.clone(), archived.sha256.clone());
        // The commit that guards the send: `sending` with the Message-ID.
        let n = self
            .store
            .call(move |db| {
                db.record_message(&row)?;
                db.begin_attempt(&key, &mid, &sha, now)
            })
            .await
            .map_err(|e| e.to_string())?;
        self.update_record(&dir, &record, id).await;
        let rcpts: Vec<String> = record
            .envelope
            .to
            .iter()
            .chain(record.envelope.cc.iter())
            .cloned()
            .collect();
        let outcome = self
            .submitter
            .submit(&self.mailbox.address, &rcpts, &bytes)
            .await;
        let at = Timestamp::now();
        let key = id.to_owned();
        let mut keep_going = true;
        let result = match &outcome {
            SubmitOutcome::Accepted { reply } => {
                let reply = reply.clone();
                self.backoff.remove(id);
                info!({ field::EVENT } = event::DISPATCH_SUBMITTED, { field::DISPATCH_ID } = %id, { field::MAILBOX } = %self.mailbox.name, { field::MESSAGE_ID } = %message_id, "letter submitted");
                self.store
                    .call(move |db| db.attempt_submitted(&key, n, &reply, at))
                    .await
            }
            SubmitOutcome::NotSent { reason } => {
                let reason = reason.clone();
                warn!({ field::EVENT } = event::DISPATCH_RETRY, { field::DISPATCH_ID } = %id, { field::MAILBOX } = %self.mailbox.name, { field::ERROR } = %reason, "submission failed; will retry");
                self.schedule_retry(id);
                self.store
                    .call(move |db| db.attempt_transient(&key, n, &reason, at))
                    .await
            }
            SubmitOutcome::Refused { reply } => {
                let reply = reply.clone();
                error!({ field::EVENT } = event::DISPATCH_REFUSED, { field::DISPATCH_ID } = %id, { field::MAILBOX } = %self.mailbox.name, { field::ERROR } = %reply, "letter refused by the provider");
                self.store
                    .call(move |db| db.attempt_refused(&key, n, &reply, at))
                    .await
            }
            SubmitOutcome::AuthRefused { reply } => {
                let reply = reply.clone();
                error!({ field::EVENT } = event::MAILBOX_AUTH_REFUSED, { field::MAILBOX } = %self.mailbox.name, { field::ERROR } = %reply, "authentication refused: mailbox suspended, no further attempts until the configuration is fixed");
                keep_going = false;
                let mailbox = self.mailbox.name.clone();
                self.store
                    .call(move |db| {
                        db.attempt_transient(&key, n, &reply, at)?;
                        let mut st = db
                            .mailbox_state(&mailbox)?
                            .unwrap_or_else(|| store::MailboxState::new(&mailbox, at));
                        st.suspended_reason = Some(format!("authentication refused: {reply}"));
                        st.updated_at = at;
                        db.set_mailbox_state(&st, "smtp.auth_refused")
                    })
                    .await
            }
            SubmitOutcome::Uncertain { reason } => {
                let reason = reason.clone();
                error!({ field::EVENT } = event::DISPATCH_UNCERTAIN, { field::DISPATCH_ID } = %id, { field::MAILBOX } = %self.mailbox.name, { field::MESSAGE_ID } = %message_id, { field::ERROR } = %reason, "connection lost after the message was sent: outcome uncertain, not resent");
                self.store
                    .call(move |db| {
                        db.mark_uncertain(
                            &key,
                            n,
                            &format!("connection lost after DATA: {reason}"),
                            at,
                        )
                    })
                    .await
            }
        };
        result.map_err(|e| e.to_string())?;
        self.update_record(&dir, &record, id).await;
        Ok(keep_going)
    }

    /// Rewrites `dispatch.json` (attempts) and the status files from the store.
    async fn update_record(&self, dir: &Path, record: &DispatchRecord, id: &str) {
        let key = id.to_owned();
        let Ok(Some(detail)) = self.store.call(move |db| db.get(&key)).await else {
            return;
        };
        let mut record = record.clone();
        record.attempts = detail
            .attempts
            .iter()
            .map(|a| AttemptRecord {
                n: a.n,
                message_id: a.message_id.clone(),
                state: a.state.clone(),
                started_at: sent::ts(a.started_at),
                finished_at: a.finished_at.map(sent::ts),
                smtp_reply: a.smtp_reply.clone(),
                eml: sent::eml_name(a.n),
                eml_sha256: a.eml_sha256.clone(),
            })
            .collect();
        if let Err(e) =
            sent::write_record(dir, &record).and_then(|()| crate::archive::sync_folder(dir))
        {
            warn!({ field::DISPATCH_ID } = %id, { field::ERROR } = %e, "cannot update dispatch.json");
        }
        if let Err(e) = sent::write_status(dir, &detail, Timestamp::now()) {
            warn!({ field::DISPATCH_ID } = %id, { field::ERROR } = %e, "cannot update status files");
        }
    }
}

/// Marks every attempt left `sending` by a crash as `uncertain` (never
/// resent blindly). Returns how many.
///
/// # Errors
/// Store failures.
pub async fn recover_sending(store: &Store) -> Result<usize, String> {
    store
        .call(|db| {
            let found = db.sending_at_startup()?;
            let now = Timestamp::now();
            for (id, n) in &found {
                db.mark_uncertain(id, *n, "found sending at start-up (crash or kill during submission)", now)?;
                warn!({ field::EVENT } = event::DISPATCH_UNCERTAIN, { field::DISPATCH_ID } = %id, "attempt found in progress at start-up: outcome uncertain, not resent");
            }
            Ok(found.len())
        })
        .await
        .map_err(|e| e.to_string())
}
