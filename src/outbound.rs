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
use tracing::{debug, error, info, warn};

use crate::config::{Config, MailboxConfig};
use crate::outbox::{Letter, intake};
use crate::sent::{self, AttemptRecord, DispatchRecord, DocumentRecord, EnvelopeRecord};
use crate::smtp::{self, Draft, Pacer, SubmitOutcome, Submitter};
use crate::store::{self, Direction, MessageRow, NewDispatch, NewDocument, NewRecipient, Store};
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

/// How many claims are made and taken in together: their fsyncs are issued
/// at once and their dispatch rows share one store transaction. Bounds the
/// time one intake job holds the store thread (about 30 to 60 ms), so that
/// the sender's jobs run in between.
pub const INTAKE_GROUP: usize = 48;

/// At most this many letters per store transaction (a mass mailing is one
/// claim but may hold thousands of letters).
const COMMIT_LETTERS: usize = 256;

/// Takes a claimed letter (or mass mailing) in: validation, sent folders,
/// dispatch rows, then the claim folder is released. Blocking.
/// [`take_in_group`] with one claim.
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
    take_in_group(db, mailbox, std::slice::from_ref(claim), now)
        .pop()
        .unwrap_or_else(|| Err("no result".to_owned()))
}

/// A letter whose sent folder is written (not yet durable) and whose row is
/// not yet committed.
struct Pending {
    /// Index of its claim in the group.
    claim: usize,
    dir: PathBuf,
    new: NewDispatch,
}

/// Takes several claims in together, one result per claim, in order.
/// Blocking; runs on the store thread.
///
/// For each claim: validation (a refused letter goes to `rejected/` at
/// once), then the sent folder of each of its letters is written without
/// fsync. Then, for the whole group:
/// 1. every new file and folder is fsync'd, concurrently
///    (`archive::sync_all`): the documents, `dispatch.json`, each dispatch
///    folder and its month folder; the sender reads them once the row
///    exists, so they must be durable before it is committed;
/// 2. one store transaction inserts every dispatch row (`synchronous=FULL`:
///    one WAL fsync for the group);
/// 3. the status files are written (derived from the store, not fsync'd)
///    and each claim whose letters are all stored is released. A crash
///    anywhere before the release takes the claim in again at the next
///    start: the dispatch ids are derived from the claim id and the letter,
///    so rows already committed are found and nothing is inserted twice;
///    files of uncommitted letters are simply written again.
pub fn take_in_group(
    db: &mut store::Db,
    mailbox: &MailboxConfig,
    claims: &[intake::Claim],
    now: Timestamp,
) -> Vec<Result<IntakeOutcome, String>> {
    let mut results: Vec<Option<Result<IntakeOutcome, String>>> = vec![None; claims.len()];
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); claims.len()];
    // Content hashes of the letters of this group, so that two identical
    // letters in one group are caught as they would be one after the other.
    let mut in_group: HashMap<String, String> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut to_sync: Vec<PathBuf> = Vec::new();
    for (i, claim) in claims.iter().enumerate() {
        let loaded = {
            let claim_id = claim.id.clone();
            let db_ref: &store::Db = db;
            let seen = &in_group;
            let is_dup = |hash: &str| -> Option<String> {
                if let Some(id) = seen.get(hash) {
                    return Some(id.clone());
                }
                let found = db_ref
                    .find_by_content_hash(&mailbox.name, hash)
                    .ok()
                    .flatten()?;
                // A letter of this very claim stored before a crash is not a duplicate.
                (found.id != dispatch_id_for(&claim_id, &found.source)).then_some(found.id)
            };
            intake::load(claim, &mailbox.limits, &is_dup)
        };
        let letters = match loaded {
            Ok(l) => l,
            Err(rejection) => {
                results[i] = Some(reject_claim(db, mailbox, claim, &rejection, now));
                continue;
            }
        };
        for letter in &letters {
            let id = dispatch_id_for(&claim.id, &letter.name);
            ids[i].push(id.clone());
            in_group.insert(letter.content_hash.clone(), id.clone());
            match db.get(&id) {
                Ok(Some(_)) => continue, // stored before a crash
                Ok(None) => {}
                Err(e) => {
                    results[i] = Some(Err(e.to_string()));
                    break;
                }
            }
            let dir = sent::folder(&mailbox.sent, now, &id);
            match prepare_sent_folder(mailbox, &id, letter, &dir, now, &mut to_sync) {
                Ok(()) => pending.push(Pending {
                    claim: i,
                    new: new_dispatch(mailbox, &id, letter, &dir, now),
                    dir,
                }),
                Err(e) => {
                    results[i] = Some(Err(e));
                    break;
                }
            }
        }
        if pending.len() >= COMMIT_LETTERS {
            commit(db, mailbox, &mut pending, &mut to_sync, &mut results, now);
        }
    }
    commit(db, mailbox, &mut pending, &mut to_sync, &mut results, now);
    // Only now, with every row committed, may a claim go.
    claims
        .iter()
        .zip(results)
        .zip(ids)
        .map(|((claim, result), ids)| match result {
            Some(r) => r,
            None => intake::release(claim)
                .map(|()| IntakeOutcome::Stored(ids))
                .map_err(|e| e.to_string()),
        })
        .collect()
}

/// Makes the pending letters' files durable, commits their rows in one
/// transaction (one by one if the group's transaction fails, so that one
/// bad row does not hold back the others), then writes their status files.
/// A failure is recorded against the letter's claim, which then stays.
fn commit(
    db: &mut store::Db,
    mailbox: &MailboxConfig,
    pending: &mut Vec<Pending>,
    to_sync: &mut Vec<PathBuf>,
    results: &mut [Option<Result<IntakeOutcome, String>>],
    now: Timestamp,
) {
    let batch = std::mem::take(pending);
    let paths = std::mem::take(to_sync);
    if let Err(e) = crate::archive::sync_all(&paths) {
        for p in &batch {
            results[p.claim].get_or_insert_with(|| Err(e.to_string()));
        }
        return;
    }
    if batch.is_empty() {
        return;
    }
    let together = db.write("intake_group", |tx| {
        batch.iter().try_for_each(|p| tx.insert_dispatch(&p.new))
    });
    let stored: Vec<bool> = match together {
        Ok(()) => vec![true; batch.len()],
        Err(_) => batch
            .iter()
            .map(|p| match db.insert_dispatch(&p.new) {
                Ok(()) => true,
                Err(e) => {
                    results[p.claim].get_or_insert_with(|| Err(e.to_string()));
                    false
                }
            })
            .collect(),
    };
    for (p, ok) in batch.iter().zip(stored) {
        if !ok {
            continue;
        }
        if let Ok(Some(detail)) = db.get(&p.new.id) {
            let _ = sent::write_status(&p.dir, &detail, now);
        }
        info!(
            { field::EVENT } = event::DISPATCH_QUEUED,
            { field::DISPATCH_ID } = %p.new.id,
            { field::MAILBOX } = %mailbox.name,
            { field::PATH } = %p.dir.display(),
            letter = %p.new.source,
            "letter queued"
        );
    }
}

/// Moves a refused claim to `rejected/` and records why.
fn reject_claim(
    db: &mut store::Db,
    mailbox: &MailboxConfig,
    claim: &intake::Claim,
    rejection: &intake::Rejection,
    now: Timestamp,
) -> Result<IntakeOutcome, String> {
    let folder =
        intake::reject(claim, &mailbox.outbox, &rejection.problems).map_err(|e| e.to_string())?;
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
    Ok(IntakeOutcome::Rejected(folder))
}

fn new_dispatch(
    mailbox: &MailboxConfig,
    id: &str,
    letter: &Letter,
    dir: &Path,
    now: Timestamp,
) -> NewDispatch {
    NewDispatch {
        id: id.to_owned(),
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
        recipients: NewRecipient::to_and_cc(&letter.to, &letter.cc),
        documents: letter
            .attachments
            .iter()
            .map(|d| NewDocument {
                name: d.name.clone(),
                sha256: d.sha256.clone(),
                size: d.size,
            })
            .collect(),
    }
}

/// Writes a letter's sent folder (documents and `dispatch.json`) without
/// fsync, and adds to `to_sync` what must be fsync'd before its row is
/// committed: each file, the folder, and the parent of every folder level
/// created.
fn prepare_sent_folder(
    mailbox: &MailboxConfig,
    id: &str,
    letter: &Letter,
    dir: &Path,
    now: Timestamp,
    to_sync: &mut Vec<PathBuf>,
) -> Result<(), String> {
    to_sync.extend(
        crate::archive::create_folder_unsynced(&mailbox.sent, dir).map_err(|e| e.to_string())?,
    );
    for doc in &letter.attachments {
        let bytes = std::fs::read(&doc.path).map_err(|e| format!("{}: {e}", doc.path.display()))?;
        let path = dir.join(&doc.name);
        crate::archive::write_atomic(&path, &bytes, 0o640).map_err(|e| e.to_string())?;
        to_sync.push(path);
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
    to_sync.push(sent::write_record_unsynced(dir, &record).map_err(|e| e.to_string())?);
    to_sync.push(dir.to_path_buf());
    Ok(())
}

/// Claims in groups of [`INTAKE_GROUP`] and hands each group to `take`
/// (which returns false to stop): first the claims a crash left (when
/// `recover`), then the letters the scan finds complete. Stops between two
/// groups when `cancel` fires: a group claimed but not taken in stays in
/// `.processing/` and is recovered at the next start. Blocking.
fn claim_groups(
    config: &Config,
    mailbox: &MailboxConfig,
    recover: bool,
    cancel: &CancellationToken,
    mut take: impl FnMut(Vec<intake::Claim>) -> bool,
) {
    if recover {
        match intake::recover(&mailbox.outbox) {
            Ok(claims) => {
                let mut claims = claims.into_iter().peekable();
                while claims.peek().is_some() {
                    if cancel.is_cancelled() {
                        return;
                    }
                    if !take(claims.by_ref().take(INTAKE_GROUP).collect()) {
                        return;
                    }
                }
            }
            Err(e) => {
                error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "outbox recovery failed")
            }
        }
    }
    let candidates = match intake::scan(
        &mailbox.outbox,
        config.outbox.settle,
        intake::DEFAULT_MISSING_GRACE,
        system_now(),
    ) {
        Ok(c) => c,
        Err(e) => {
            error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "outbox scan failed");
            return;
        }
    };
    // A candidate with files missing is returned by the scan only once it
    // has waited `missing_grace`: it is claimed, and `load` refuses it
    // naming the missing files.
    for group in candidates.chunks(INTAKE_GROUP) {
        if cancel.is_cancelled() {
            return;
        }
        let mut claims = Vec::with_capacity(group.len());
        for result in intake::claim_group(group, &mailbox.outbox, system_now()) {
            match result {
                Ok(claim) => claims.push(claim),
                Err(e) if e.is_taken() => {}
                Err(e) => {
                    error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "claim failed")
                }
            }
        }
        if !claims.is_empty() && !take(claims) {
            return;
        }
    }
}

/// Takes a group in and logs the claims that could not be; returns how many
/// letters were stored.
fn take_in_logged(db: &mut store::Db, mailbox: &MailboxConfig, claims: &[intake::Claim]) -> usize {
    let mut stored = 0;
    let results = take_in_group(db, mailbox, claims, Timestamp::now());
    for (claim, result) in claims.iter().zip(results) {
        match result {
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

/// One pass over the outbox: recovers claims left by a crash (first pass
/// only), scans, claims and takes in every complete letter, in groups.
/// While one group is taken in (on this thread, which owns `db`) the next
/// is claimed on a helper thread, so that the two wait for the disk at the
/// same time. Blocking. Returns how many letters were stored.
///
/// The daemon uses [`intake_round`], which does the same without holding
/// the store thread between groups.
pub fn intake_pass(
    db: &mut store::Db,
    config: &Config,
    mailbox: &MailboxConfig,
    recover: bool,
    cancel: &CancellationToken,
) -> usize {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<intake::Claim>>(1);
    std::thread::scope(|s| {
        s.spawn(move || claim_groups(config, mailbox, recover, cancel, |g| tx.send(g).is_ok()));
        let mut stored = 0;
        for group in rx {
            // Once cancelled, claims not taken in stay in .processing/ and
            // are recovered at the next start.
            if cancel.is_cancelled() {
                break;
            }
            stored += take_in_logged(db, mailbox, &group);
        }
        stored
    })
}

/// One pass over the outbox for the daemon, as [`intake_pass`], but each
/// group is a separate job on the store thread, so that the sender's jobs
/// run in between; `queued` is notified after every group that stored
/// letters, so the sender starts on the first group while the rest are
/// being taken in. The next group is claimed (on a blocking thread) while
/// the store takes the current one in. Returns how many letters were
/// stored.
///
/// daemon.rs calls it from the intake task in place of the
/// `store.call(... intake_pass ...)`:
/// `let n = outbound::intake_round(&store, &config, &mailbox, recover, &cancel, &wake).await;`
pub async fn intake_round(
    store: &Store,
    config: &std::sync::Arc<Config>,
    mailbox: &MailboxConfig,
    recover: bool,
    cancel: &CancellationToken,
    queued: &tokio::sync::Notify,
) -> usize {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<intake::Claim>>(1);
    let (cfg, mb, token) = (config.clone(), mailbox.clone(), cancel.clone());
    let claimer = tokio::task::spawn_blocking(move || {
        claim_groups(&cfg, &mb, recover, &token, |g| tx.blocking_send(g).is_ok());
    });
    let mut stored = 0;
    while let Some(group) = rx.recv().await {
        if cancel.is_cancelled() {
            break;
        }
        let mb = mailbox.clone();
        match store
            .call(move |db| Ok(take_in_logged(db, &mb, &group)))
            .await
        {
            Ok(n) => {
                stored += n;
                if n > 0 {
                    queued.notify_one();
                }
            }
            Err(e) => {
                error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "intake failed")
            }
        }
    }
    drop(rx);
    let _ = claimer.await;
    stored
}

pub use crate::store::HOLD_UNTIL_SYNC;

/// Puts [`HOLD_UNTIL_SYNC`] on every configured mailbox (`cause` names the
/// command in the event log).
///
/// # Errors
/// Store failures.
pub fn hold_until_sync(
    db: &mut store::Db,
    config: &Config,
    cause: &str,
    now: Timestamp,
) -> store::Result<()> {
    for name in config.mailboxes.keys() {
        let mut st = db
            .mailbox_state(name)?
            .unwrap_or_else(|| store::MailboxState::new(name, now));
        st.suspended_reason = Some(HOLD_UNTIL_SYNC.to_owned());
        st.updated_at = now;
        db.set_mailbox_state(&st, cause)?;
    }
    Ok(())
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
        match self.store.call(move |db| db.mailbox_state(&name)).await {
            Ok(Some(st)) if st.suspended_reason.as_deref() == Some(HOLD_UNTIL_SYNC) => {
                debug!({ field::MAILBOX } = %self.mailbox.name, "sending held until the mailbox has been read completely (after a restore)");
                out.wait = Some(Duration::from_secs(2));
                return out;
            }
            Ok(_) => {}
            Err(e) => {
                error!({ field::MAILBOX } = %self.mailbox.name, { field::ERROR } = %e, "store: cannot read the mailbox state");
                out.wait = Some(Duration::from_secs(5));
                return out;
            }
        }
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
        // The SMTP connection is kept from one letter to the next while the
        // queue is busy (`Submitter::submit` drops it after KEEP_IDLE), and
        // closed once a pass finds nothing to send, or the daemon stops.
        if out.attempted == 0 || out.suspended || cancel.is_cancelled() {
            self.submitter.close().await;
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
                db.write("begin_attempt", |tx| {
                    tx.record_message(&row)?;
                    tx.begin_attempt(&key, &mid, &sha, now)
                })
            })
            .await
            .map_err(|e| e.to_string())?;
        // dispatch.json names the attempt durably before the transaction:
        // a store rebuilt from the sent folders then knows the letter may
        // have left (uncertain), never that it is still to send.
        if !self.update_record(&dir, &record, id, true).await {
            // Not sent: without the record, a store rebuilt from the sent
            // folders would not know this attempt and could send the letter
            // again. The attempt ends as a transient failure (nothing left).
            let reason =
                "dispatch.json could not be updated before sending: not sent, retried later"
                    .to_owned();
            warn!({ field::EVENT } = event::DISPATCH_RETRY, { field::DISPATCH_ID } = %id, { field::MAILBOX } = %self.mailbox.name, { field::ERROR } = %reason, "submission postponed");
            self.schedule_retry(id);
            let key = id.to_owned();
            let at = Timestamp::now();
            self.store
                .call(move |db| db.attempt_transient(&key, n, &reason, at))
                .await
                .map_err(|e| e.to_string())?;
            return Ok(true);
        }
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
        // Not fsync'd: losing this update in a power cut leaves the attempt
        // `sending` in dispatch.json, which a rebuild treats as uncertain
        // (never resent); the store has the outcome.
        let _ = self.update_record(&dir, &record, id, false).await;
        Ok(keep_going)
    }

    /// Rewrites `dispatch.json` (attempts) and the status files from the store.
    /// Returns whether `dispatch.json` was written (and, when `durable`,
    /// made durable).
    async fn update_record(
        &self,
        dir: &Path,
        record: &DispatchRecord,
        id: &str,
        durable: bool,
    ) -> bool {
        let key = id.to_owned();
        let Ok(Some(detail)) = self.store.call(move |db| db.get(&key)).await else {
            return false;
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
        let written = if durable {
            sent::write_record(dir, &record).and_then(|()| crate::archive::sync_folder(dir))
        } else {
            sent::write_record_unsynced(dir, &record).map(|_| ())
        };
        let ok = match written {
            Ok(()) => true,
            Err(e) => {
                warn!({ field::DISPATCH_ID } = %id, { field::ERROR } = %e, "cannot update dispatch.json");
                false
            }
        };
        if let Err(e) = sent::write_status(dir, &detail, Timestamp::now()) {
            warn!({ field::DISPATCH_ID } = %id, { field::ERROR } = %e, "cannot update status files");
        }
        ok
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
