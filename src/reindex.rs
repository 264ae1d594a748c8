//! `pecgate reindex`: rebuilds a lost database from the evidence alone — the
//! `dispatch.json` record of every letter in the mailboxes' sent folders and
//! the content-addressed archive of every raw message (see `docs/reindex.md`).
//!
//! What it owns: deciding where the new database goes (never over an
//! existing one, never while another process holds it), restoring each
//! letter with its recipients, documents and attempts as recorded, and
//! feeding every other archived message through the one ingest path
//! ([`crate::ingest::ingest`]), oldest first, so that receipts and incoming
//! mail end in the states the daemon had given them.
//!
//! What it must never do: delete a database (an existing one is moved aside
//! with `--force`), resend or mark anything sendable that may have left (an
//! attempt recorded `sending` becomes `uncertain`, as at a restart), write
//! `dispatch.json`, or panic on a bad file (every bad file is a
//! [`Problem`] naming it, and the rest goes on).
//!
//! Invariants: the new database is built under a temporary name with
//! `synchronous=OFF` and published by a hard link (which fails rather than
//! replace a database that appeared meanwhile) only once it is complete,
//! checkpointed and fsync'd; a failed or interrupted reindex leaves no
//! database behind.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

use crate::config::{Config, MailboxConfig};
use crate::ingest::{self, Context, IngestOutcome, Source};
use crate::pec::ids::{normalize_message_id, same_address};
use crate::pec::inspect::inspect;
use crate::pec::kind::Kind;
use crate::sent::{self, DispatchRecord};
use crate::store::{
    self, Db, Direction, DispatchChange, MessageRow, NewDispatch, NewDocument, NewEvent,
    NewRecipient, RestoredAttempt, StoreError,
};
use crate::telemetry::{event, field};
use crate::verify::Verifier;

/// The cause written on every event the rebuild itself makes.
pub const CAUSE: &str = "reindex";

/// How to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Move an existing database (and its `-wal`/`-shm`) aside to
    /// `<db>.before-reindex-<time>` instead of refusing.
    pub force: bool,
}

/// Something that could not be restored as recorded: the file or folder,
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file or folder concerned.
    pub path: String,
    /// What is wrong, and what was done about it.
    pub problem: String,
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The database written.
    pub database: String,
    /// Files moved aside (`--force`).
    pub moved_aside: Vec<String>,
    /// Letters restored from their `dispatch.json`.
    pub letters: u64,
    /// Their attempts.
    pub attempts: u64,
    /// Attempts recorded `sending` (the outcome never recorded), restored
    /// as `uncertain`.
    pub uncertain: u64,
    /// Sent messages (the exact bytes of each attempt) recorded.
    pub sent_messages: u64,
    /// `00-inviato*.eml` copies no attempt names (written just before a
    /// crash, never submitted): left alone.
    pub unsent_copies: u64,
    /// Receipts matched to a letter and applied (including those that
    /// changed nothing).
    pub receipts_applied: u64,
    /// Receipts for letters pecgate did not send.
    pub orphans: u64,
    /// Messages kept aside (bad signature, inconsistent data).
    pub quarantined: u64,
    /// Incoming certified mail.
    pub incoming: u64,
    /// Anomaly envelopes (mail without legal value).
    pub anomalies: u64,
    /// Archived messages that are not PEC (or not mail).
    pub other_messages: u64,
    /// Archived messages ingest found already taken in.
    pub duplicates: u64,
    /// Everything that could not be restored as recorded.
    pub problems: Vec<Problem>,
}

impl Summary {
    /// Whether everything was restored.
    pub fn is_complete(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, path: impl AsRef<Path>, problem: impl Into<String>) {
        let p = Problem {
            path: path.as_ref().display().to_string(),
            problem: problem.into(),
        };
        warn!(
            { field::EVENT } = event::REINDEX_PROBLEM,
            { field::PATH } = %p.path,
            { field::ERROR } = %p.problem,
            "reindex: not restored as recorded"
        );
        self.problems.push(p);
    }
}

/// Why a rebuild did not run or could not finish (no database is left
/// behind then).
#[derive(Debug, thiserror::Error)]
pub enum ReindexError {
    /// Refused: a database exists, or another process holds it.
    #[error("{0}")]
    Refused(String),
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The new database could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReindexError + '_ {
    move |source| ReindexError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `<db><suffix>`, e.g. `pecgate.db-wal`.
fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Rebuilds `config.store.database` from the sent folders and the archive.
/// Blocking (files, SQLite, openssl); `now` names the moved-aside files and
/// dates the rebuild's own events.
///
/// # Errors
///
/// [`ReindexError::Refused`] when a database (or its `-wal`/`-shm`) exists
/// and `force` is not set, or another process holds it; I/O or store
/// failures that stop the whole rebuild. Problems with single files are in
/// the [`Summary`], not errors.
pub fn reindex(
    config: &Config,
    verifier: &Verifier,
    options: Options,
    now: Timestamp,
) -> Result<Summary, ReindexError> {
    let db_path = config.store.database.clone();
    let stamp = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut summary = Summary {
        database: db_path.display().to_string(),
        ..Summary::default()
    };
    if let Some(parent) = db_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    summary.moved_aside = prepare_target(&db_path, options.force, &stamp)?;
    let tmp = sidecar(&db_path, &format!(".reindex-{stamp}.tmp"));
    if [&tmp, &sidecar(&tmp, "-wal")].iter().any(|p| p.exists()) {
        return Err(ReindexError::Refused(format!(
            "{}: another reindex is running (or was interrupted in this very second); \
             try again",
            tmp.display()
        )));
    }
    let built = (|| -> Result<(), ReindexError> {
        let mut db = Db::open(&tmp)?;
        db.set_rebuild_durability(false)?;
        build(&mut db, config, verifier, now, &mut summary)?;
        // Letters whose last attempt was not recorded in their folder may
        // have left: nothing is sent before the mailboxes were read again.
        crate::outbound::hold_until_sync(&mut db, config, "reindex", now)?;
        db.set_rebuild_durability(true)?;
        db.close()?;
        let wal = sidecar(&tmp, "-wal");
        if fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
            return Err(ReindexError::Refused(format!(
                "{}: the rebuilt database could not be checkpointed; nothing was published",
                wal.display()
            )));
        }
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&tmp))
    })();
    if let Err(e) = built {
        // Our own temporary files: an unfinished database must not stay.
        for p in [sidecar(&tmp, "-wal"), sidecar(&tmp, "-shm"), tmp.clone()] {
            let _ = fs::remove_file(p);
        }
        return Err(e);
    }
    publish(&tmp, &db_path)?;
    info!(
        { field::EVENT } = event::STORE_REINDEXED,
        { field::PATH } = %db_path.display(),
        letters = summary.letters,
        receipts = summary.receipts_applied,
        incoming = summary.incoming,
        problems = summary.problems.len(),
        "database rebuilt from the sent folders and the archive"
    );
    Ok(summary)
}

/// Refuses while another process holds the database; moves an existing one
/// aside when `force` (returns the new names), refuses otherwise.
fn prepare_target(db: &Path, force: bool, stamp: &str) -> Result<Vec<String>, ReindexError> {
    let files = [db.to_owned(), sidecar(db, "-wal"), sidecar(db, "-shm")];
    let holders = holders_of(&files);
    if !holders.is_empty() {
        return Err(ReindexError::Refused(format!(
            "database {}: open by process {} (the daemon?); stop it first \
             (systemctl stop pecgate), then reindex",
            db.display(),
            holders
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if db.exists() && matches!(crate::backup::database_in_use(db), Ok(true)) {
        return Err(ReindexError::Refused(format!(
            "database {}: in use by another process (the daemon?); stop it first \
             (systemctl stop pecgate), then reindex",
            db.display()
        )));
    }
    let present: Vec<&PathBuf> = files.iter().filter(|p| p.exists()).collect();
    if present.is_empty() {
        return Ok(Vec::new());
    }
    if !force {
        return Err(ReindexError::Refused(format!(
            "database {} (or its -wal/-shm) exists: reindex only builds a database where \
             there is none; to rebuild anyway, run it with --force, which moves the existing \
             files aside to {}.before-reindex-<time> (nothing is deleted)",
            db.display(),
            db.display()
        )));
    }
    let mut base = sidecar(db, &format!(".before-reindex-{stamp}"));
    let mut n = 2;
    while [&base, &sidecar(&base, "-wal"), &sidecar(&base, "-shm")]
        .iter()
        .any(|p| p.exists())
    {
        base = sidecar(db, &format!(".before-reindex-{stamp}-{n}"));
        n += 1;
    }
    let mut moved = Vec::new();
    for (from, suffix) in files.iter().zip(["", "-wal", "-shm"]) {
        if !from.exists() {
            continue;
        }
        let to = sidecar(&base, suffix);
        fs::rename(from, &to).map_err(io_err(from))?;
        info!({ field::PATH } = %to.display(), from = %from.display(), "existing database file moved aside");
        moved.push(to.display().to_string());
    }
    sync_parent(db)?;
    Ok(moved)
}

/// Puts the finished temporary database at `db` without ever replacing a
/// file there (a hard link fails if the name exists), then drops the
/// temporary name.
fn publish(tmp: &Path, db: &Path) -> Result<(), ReindexError> {
    let files = [db.to_owned(), sidecar(db, "-wal"), sidecar(db, "-shm")];
    let taken = files.iter().any(|p| p.exists()) || !holders_of(&files).is_empty();
    let linked = if taken {
        Err(io::Error::from(io::ErrorKind::AlreadyExists))
    } else {
        fs::hard_link(tmp, db)
    };
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(ReindexError::Refused(format!(
                "database {} appeared while reindex ran (was the daemon started?); the rebuilt \
                 database is kept at {} and nothing was replaced",
                db.display(),
                tmp.display()
            )));
        }
        Err(source) => {
            return Err(ReindexError::Io {
                path: db.to_owned(),
                source,
            });
        }
    }
    fs::remove_file(tmp).map_err(io_err(tmp))?;
    sync_parent(db)
}

fn sync_parent(path: &Path) -> Result<(), ReindexError> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(io_err(parent))
}

/// The processes (other than this one) that have one of `files` open, even
/// deleted: a daemon whose database was removed under it keeps writing to
/// it, and a new database next to it would be a second truth. Read from
/// `/proc/<pid>/fd` (Linux); processes of other users are visible to root
/// only, which is why the SQLite lock is tried as well.
pub fn holders_of(files: &[PathBuf]) -> Vec<u32> {
    let wanted: Vec<String> = files
        .iter()
        .map(|f| absolute(f).display().to_string())
        .collect();
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.display().to_string();
            let t = t.strip_suffix(" (deleted)").unwrap_or(&t);
            if wanted.iter().any(|w| w == t) {
                found.push(pid);
                break;
            }
        }
    }
    found
}

/// `path` made absolute with its folder resolved (the way `/proc` shows
/// an open file).
fn absolute(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_owned())
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(abs),
        _ => abs,
    }
}

// ---------------------------------------------------------------------------
// The rebuild

/// What the letters tell about the archive.
#[derive(Debug, Default)]
struct Index {
    /// Message-ID of every restored attempt → its mailbox.
    message_ids: HashMap<String, String>,
    /// SHA-256 of every sent message (attempts and unsent copies): not
    /// ingested.
    sent: HashSet<String>,
    /// Restored dispatch ids.
    ids: HashSet<String>,
}

fn build(
    db: &mut Db,
    config: &Config,
    verifier: &Verifier,
    now: Timestamp,
    summary: &mut Summary,
) -> Result<(), ReindexError> {
    let mut index = Index::default();
    let mut seen_trees: HashSet<PathBuf> = HashSet::new();
    for mailbox in config.mailboxes.values() {
        let tree = absolute(&mailbox.sent);
        if !seen_trees.insert(tree) {
            continue; // two mailboxes sharing one sent folder: walked once
        }
        let folders = letter_folders(&mailbox.sent, summary);
        info!({ field::MAILBOX } = %mailbox.name, { field::PATH } = %mailbox.sent.display(), letters = folders.len(), "reindex: restoring letters");
        for dir in folders {
            restore_letter(db, config, mailbox, &dir, now, &mut index, summary);
        }
    }
    let entries = archive_entries(&config.store.archive, &index, now, summary);
    info!({ field::PATH } = %config.store.archive.display(), messages = entries.len(), "reindex: taking in archived messages");
    for e in &entries {
        take_in(db, config, verifier, e, &index, summary);
    }
    // The clerks' status files, from the rebuilt store.
    for (id, dir) in db.dispatch_folders()? {
        let dir = PathBuf::from(dir);
        if let Some(detail) = db.get(&id)?
            && let Err(e) = sent::write_status(&dir, &detail, now)
        {
            summary.problem(&dir, format!("status files not rewritten: {e}"));
        }
    }
    let mut detail = serde_json::to_value(&*summary).unwrap_or_default();
    if let Some(m) = detail.as_object_mut() {
        m.remove("problems");
        m.insert("problems".into(), json!(summary.problems.len()));
    }
    db.append_event(&NewEvent {
        at: now,
        mailbox: None,
        dispatch_id: None,
        event: event::STORE_REINDEXED.into(),
        cause: CAUSE.into(),
        detail,
    })?;
    Ok(())
}

/// The entries of `dir` (only its subfolders, not followed through links,
/// when `dirs_only`) as (name, path), in name order; a folder that cannot be
/// read is a problem and lists nothing.
fn sorted_entries(dir: &Path, dirs_only: bool, summary: &mut Summary) -> Vec<(String, PathBuf)> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<(String, PathBuf)> = rd
                .flatten()
                .filter(|e| !dirs_only || e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect();
            v.sort();
            v
        }
        Err(e) => {
            summary.problem(dir, format!("cannot read the folder: {e}"));
            Vec::new()
        }
    }
}

/// `sent/YYYY/MM/<dispatch-id>/` folders, in name order (= time order).
/// Folders at that depth that are not letters are skipped; a missing tree
/// is a problem only when the mailbox has one configured (always).
fn letter_folders(root: &Path, summary: &mut Summary) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let digits = |name: &str, n: usize| name.len() == n && name.bytes().all(|b| b.is_ascii_digit());
    let dirs = |dir: &Path, summary: &mut Summary| sorted_entries(dir, true, summary);
    if !root.is_dir() {
        summary.problem(
            root,
            "sent folder missing: no letter of this mailbox restored",
        );
        return out;
    }
    for (year, ydir) in dirs(root, summary) {
        if !digits(&year, 4) {
            continue;
        }
        for (month, mdir) in dirs(&ydir, summary) {
            if !digits(&month, 2) {
                continue;
            }
            for (name, dir) in dirs(&mdir, summary) {
                if store::is_dispatch_id(&name) || dir.join(sent::DISPATCH_JSON).exists() {
                    out.push(dir);
                }
            }
        }
    }
    out
}

fn parse_time(text: &str, file: &Path, field_name: &str) -> Result<Timestamp, String> {
    text.parse::<Timestamp>().map_err(|e| {
        format!(
            "{}: field {field_name}: {text:?} is not an RFC 3339 time: {e}",
            file.display()
        )
    })
}

/// Restores one letter; a bad folder is a problem, never an error.
fn restore_letter(
    db: &mut Db,
    config: &Config,
    mailbox: &MailboxConfig,
    dir: &Path,
    now: Timestamp,
    index: &mut Index,
    summary: &mut Summary,
) {
    let json_path = dir.join(sent::DISPATCH_JSON);
    // Every copy of a sent letter in the folder is kept out of ingest.
    let mut copies: Vec<String> = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("00-inviato")
                && name.ends_with(".eml")
                && let Ok(bytes) = fs::read(e.path())
            {
                let sha = store::sha256_hex(&bytes);
                index.sent.insert(sha.clone());
                copies.push(sha);
            }
        }
    }
    let record = match sent::read_record(dir) {
        Ok(r) => r,
        Err(e) => {
            summary.problem(
                &json_path,
                format!("letter not restored: {e} (its receipts will be orphans)"),
            );
            return;
        }
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if record.dispatch_id != name {
        summary.problem(
            &json_path,
            format!(
                "letter not restored: field dispatch_id {:?} differs from the folder name {name:?}",
                record.dispatch_id
            ),
        );
        return;
    }
    if !index.ids.insert(record.dispatch_id.clone()) {
        summary.problem(
            &json_path,
            format!(
                "letter {} found twice: this copy is not restored",
                record.dispatch_id
            ),
        );
        return;
    }
    // The folder's mailbox decides: the letter is where that mailbox keeps
    // its letters (dispatch.json may name a mailbox since renamed).
    let mb = config
        .mailboxes
        .get(&record.mailbox)
        .filter(|m| absolute(&m.sent) == absolute(&mailbox.sent))
        .unwrap_or(mailbox);
    match plan_letter(
        &record,
        mb,
        dir,
        &config.store.archive,
        &json_path,
        now,
        summary,
    ) {
        Ok(plan) => {
            let sent_count = plan.messages.len() as u64;
            let written = db.write("reindex.restore_letter", |tx| {
                for m in &plan.messages {
                    tx.record_message(m)?;
                }
                tx.restore_dispatch(&plan.dispatch, &dir.display().to_string())?;
                for a in &plan.attempts {
                    tx.restore_attempt(&plan.dispatch.id, &mb.name, a)?;
                }
                if let Some(change) = &plan.state {
                    tx.set_dispatch_state(&plan.dispatch.id, change)?;
                }
                Ok(())
            });
            match written {
                Ok(()) => {
                    summary.letters += 1;
                    summary.attempts += plan.attempts.len() as u64;
                    summary.uncertain += plan.was_sending;
                    summary.sent_messages += sent_count;
                    for a in &plan.attempts {
                        if let Some(mid) = normalize_message_id(&a.message_id) {
                            index.message_ids.insert(mid, mb.name.clone());
                        }
                        index.sent.insert(a.eml_sha256.clone());
                    }
                    summary.unsent_copies += copies
                        .iter()
                        .filter(|c| !plan.attempts.iter().any(|a| &a.eml_sha256 == *c))
                        .count() as u64;
                }
                Err(e) => {
                    index.ids.remove(&record.dispatch_id);
                    summary.problem(&json_path, format!("letter not restored: {e}"));
                }
            }
        }
        Err(p) => {
            index.ids.remove(&record.dispatch_id);
            summary.problem(&json_path, format!("letter not restored: {p}"));
        }
    }
}

/// The rows of one letter, ready to write.
struct Plan {
    dispatch: NewDispatch,
    messages: Vec<MessageRow>,
    attempts: Vec<RestoredAttempt>,
    /// The dispatch's state after its attempts (`None`: queued).
    state: Option<DispatchChange>,
    /// Attempts recorded `sending`.
    was_sending: u64,
}

fn plan_letter(
    record: &DispatchRecord,
    mailbox: &MailboxConfig,
    dir: &Path,
    archive: &Path,
    json_path: &Path,
    now: Timestamp,
    summary: &mut Summary,
) -> Result<Plan, String> {
    let created_at = parse_time(&record.created_at, json_path, "created_at")?;
    let env = &record.envelope;
    let recipients = NewRecipient::to_and_cc(&env.to, &env.cc);
    for d in &env.attachments {
        let path = dir.join(&d.name);
        let ok = Path::new(&d.name).file_name() == Some(std::ffi::OsStr::new(&d.name))
            && fs::read(&path)
                .is_ok_and(|b| b.len() as u64 == d.size && store::sha256_hex(&b) == d.sha256);
        if !ok {
            summary.problem(
                &path,
                "document missing or different from dispatch.json (the letter is restored; \
                 it cannot be sent again without it)",
            );
        }
    }
    let dispatch = NewDispatch {
        id: record.dispatch_id.clone(),
        mailbox: mailbox.name.clone(),
        kind: env.kind.clone(),
        protocol: env.protocol.clone(),
        reference: env.reference.clone(),
        subject: env.subject.clone(),
        receipt_type: env.receipt.clone(),
        in_reply_to: env.in_reply_to.clone(),
        content_hash: record.content_hash.clone(),
        source: record.source.clone(),
        sent_dir: dir.display().to_string(),
        created_at,
        recipients,
        documents: env
            .attachments
            .iter()
            .map(|d| NewDocument {
                name: d.name.clone(),
                sha256: d.sha256.clone(),
                size: d.size,
            })
            .collect(),
    };
    let mut recorded = record.attempts.clone();
    recorded.sort_by_key(|a| a.n);
    let mut attempts = Vec::with_capacity(recorded.len());
    let mut messages = Vec::with_capacity(recorded.len());
    let mut was_sending = 0;
    for (i, a) in recorded.iter().enumerate() {
        let field_of = |f: &str| format!("attempts[{i}].{f}");
        let started_at = parse_time(&a.started_at, json_path, &field_of("started_at"))?;
        let finished_at = match &a.finished_at {
            Some(t) => Some(parse_time(t, json_path, &field_of("finished_at"))?),
            None => None,
        };
        let sha = a.eml_sha256.to_ascii_lowercase();
        // Empty: an attempt recovered from a receipt, bytes never known.
        if !sha.is_empty() {
            messages.push(sent_message(
                &sha, a.n, &a.eml, dir, archive, mailbox, started_at, summary,
            ));
        }
        // An attempt whose outcome was never recorded may have left: never
        // sendable again without a decision, exactly as at a restart.
        let (state, finished_at) = match a.state.as_str() {
            "submitted" | "uncertain" | "refused" | "failed-transient" => {
                (a.state.clone(), finished_at)
            }
            "sending" => {
                was_sending += 1;
                ("uncertain".to_owned(), Some(now))
            }
            other => {
                summary.problem(
                    json_path,
                    format!(
                        "field {}: unknown attempt state {other:?}, restored as uncertain",
                        field_of("state")
                    ),
                );
                ("uncertain".to_owned(), Some(finished_at.unwrap_or(now)))
            }
        };
        attempts.push(RestoredAttempt {
            n: a.n,
            message_id: a.message_id.clone(),
            state,
            recorded_state: a.state.clone(),
            eml_sha256: sha,
            started_at,
            finished_at,
            smtp_reply: a.smtp_reply.clone(),
        });
    }
    let state = attempts.last().and_then(|last| {
        let at = last.finished_at.unwrap_or(last.started_at);
        let (to, error) = match last.state.as_str() {
            "submitted" => ("submitted", None),
            "refused" => ("refused", last.smtp_reply.clone()),
            "failed-transient" => ("queued", last.smtp_reply.clone()),
            _ => (
                "uncertain",
                Some(if last.recorded_state == "sending" {
                    "outcome unknown: the attempt was in progress when last recorded \
                     (restored by reindex)"
                        .to_owned()
                } else {
                    "outcome uncertain (restored by reindex)".to_owned()
                }),
            ),
        };
        if to == "queued" && error.is_none() {
            return None;
        }
        let mut c = DispatchChange::new(to, CAUSE, at);
        c.error = error;
        c.detail = json!({"restored_from": last.recorded_state, "attempt": last.n});
        Some(c)
    });
    Ok(Plan {
        dispatch,
        messages,
        attempts,
        state,
        was_sending,
    })
}

/// The `messages` row of an attempt's exact bytes. The archive copy is
/// checked, and put back from the sent folder's copy when it is missing;
/// when neither holds the bytes the row is still written — the attempt
/// must be known, or the letter would look unsent — and it is a problem.
#[allow(clippy::too_many_arguments)]
fn sent_message(
    sha: &str,
    n: u32,
    eml: &str,
    dir: &Path,
    archive: &Path,
    mailbox: &MailboxConfig,
    started_at: Timestamp,
    summary: &mut Summary,
) -> MessageRow {
    let relative = if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("{}/{}/{sha}.eml", &sha[..2], &sha[2..4])
    } else {
        format!("{sha}.eml")
    };
    let row = |size: u64| MessageRow {
        sha256: sha.to_owned(),
        path: relative.clone(),
        size,
        direction: Direction::Out,
        mailbox: mailbox.name.clone(),
        imap_uid: None,
        imap_uidvalidity: None,
        recorded_at: started_at,
    };
    let name = if Path::new(eml).file_name() == Some(std::ffi::OsStr::new(eml)) {
        eml.to_owned()
    } else {
        sent::eml_name(n)
    };
    let copy = dir.join(&name);
    let intact = |p: &Path| fs::read(p).ok().filter(|b| store::sha256_hex(b) == sha);
    if let Some(b) = intact(&archive.join(&relative)) {
        return row(b.len() as u64);
    }
    if let Some(b) = intact(&copy) {
        if let Err(e) = crate::archive::store(archive, &b) {
            summary.problem(
                &copy,
                format!("attempt {n}: cannot be put back into the archive: {e}"),
            );
        }
        return row(b.len() as u64);
    }
    summary.problem(
        &copy,
        format!(
            "attempt {n}: the exact bytes sent (SHA-256 {sha}) are neither in the archive nor \
             in the sent folder; the attempt is restored without them (never resent)"
        ),
    );
    row(0)
}

/// One archived message to take in.
#[derive(Debug)]
struct Entry {
    /// The time it is taken in at: the daticert's, else its Date, else the
    /// file's (never later than now).
    at: Timestamp,
    /// Receipts of one instant in the order providers issue them.
    rank: u8,
    sha: String,
    path: PathBuf,
    /// The daticert msgid (normalised).
    msgid: Option<String>,
    /// The daticert identificativo.
    identificativo: Option<String>,
    /// Addresses that may name its mailbox, best first.
    addresses: Vec<String>,
}

fn rank(kind: &Kind) -> u8 {
    match kind {
        Kind::Acceptance | Kind::NonAcceptance => 0,
        Kind::TakenInCharge => 1,
        Kind::Delivery | Kind::DeliveryError | Kind::VirusDetected => 2,
        Kind::DeliveryTimeout => 3,
        _ => 4,
    }
}

/// Every archived message that is not a sent letter, oldest first.
fn archive_entries(
    root: &Path,
    index: &Index,
    now: Timestamp,
    summary: &mut Summary,
) -> Vec<Entry> {
    let mut out = Vec::new();
    if !root.is_dir() {
        summary.problem(
            root,
            "archive folder missing: no receipt or incoming mail restored",
        );
        return out;
    }
    let hex2 = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let sorted_dir = |dir: &Path, summary: &mut Summary| sorted_entries(dir, false, summary);
    for (a, adir) in sorted_dir(root, summary) {
        if !hex2(&a) || !adir.is_dir() {
            continue;
        }
        for (b, bdir) in sorted_dir(&adir, summary) {
            if !hex2(&b) || !bdir.is_dir() {
                continue;
            }
            for (name, path) in sorted_dir(&bdir, summary) {
                let Some(sha) = name.strip_suffix(".eml") else {
                    continue; // temporary files (".x.tmp") and strangers
                };
                if sha.len() != 64 || !sha.bytes().all(|c| c.is_ascii_hexdigit()) {
                    continue;
                }
                if index.sent.contains(sha) {
                    continue;
                }
                if let Some(e) = entry(sha, &path, now, summary) {
                    out.push(e);
                }
            }
        }
    }
    out.sort_by(|x, y| (x.at, x.rank, &x.sha).cmp(&(y.at, y.rank, &y.sha)));
    out
}

fn entry(sha: &str, path: &Path, now: Timestamp, summary: &mut Summary) -> Option<Entry> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            summary.problem(path, format!("cannot read the archived message: {e}"));
            return None;
        }
    };
    if store::sha256_hex(&bytes) != sha {
        summary.problem(
            path,
            "archived message damaged: its content does not match its SHA-256 name; not taken in",
        );
        return None;
    }
    let mtime = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| Timestamp::from_second(i64::try_from(d.as_secs()).unwrap_or(0)).ok())
        .unwrap_or(now);
    let mut e = Entry {
        at: mtime,
        rank: 4,
        sha: sha.to_owned(),
        path: path.to_owned(),
        msgid: None,
        identificativo: None,
        addresses: Vec::new(),
    };
    if let Ok(ins) = inspect(&bytes) {
        e.rank = rank(ins.kind());
        let receipt = e.rank < 4;
        if let Some(d) = &ins.daticert {
            e.at = d.data;
            e.msgid = d.msgid.as_deref().and_then(normalize_message_id);
            e.identificativo = Some(d.identificativo.clone()).filter(|s| !s.trim().is_empty());
            if receipt {
                e.addresses.extend(d.mittente.clone());
            } else {
                e.addresses
                    .extend(d.destinatari.iter().map(|x| x.address.clone()));
            }
        } else if let Some(date) = ins.message.date {
            e.at = date;
        }
        e.addresses.extend(ins.message.to.iter().cloned());
    }
    e.at = e.at.min(now);
    Some(e)
}

/// The mailbox an archived message belongs to: the letter its msgid or
/// identificativo names, else a configured address among its addresses,
/// else the only mailbox.
fn mailbox_for<'c>(
    db: &Db,
    config: &'c Config,
    e: &Entry,
    index: &Index,
) -> Result<Option<&'c MailboxConfig>, StoreError> {
    if let Some(m) = e.msgid.as_ref().and_then(|m| index.message_ids.get(m))
        && let Some(mb) = config.mailboxes.get(m)
    {
        return Ok(Some(mb));
    }
    if let Some(ident) = &e.identificativo {
        for row in db.find(ident)? {
            if row.identificativo.as_deref() == Some(ident.as_str())
                && let Some(mb) = config.mailboxes.get(&row.mailbox)
            {
                return Ok(Some(mb));
            }
        }
    }
    for a in &e.addresses {
        if let Some(mb) = config
            .mailboxes
            .values()
            .find(|mb| same_address(&mb.address, a))
        {
            return Ok(Some(mb));
        }
    }
    if config.mailboxes.len() == 1 {
        return Ok(config.mailboxes.values().next());
    }
    Ok(None)
}

fn take_in(
    db: &mut Db,
    config: &Config,
    verifier: &Verifier,
    e: &Entry,
    index: &Index,
    summary: &mut Summary,
) {
    let mailbox = match mailbox_for(db, config, e, index) {
        Ok(Some(mb)) => mb,
        Ok(None) => {
            summary.problem(
                &e.path,
                "no configured mailbox matches its letter or addresses: not taken in",
            );
            return;
        }
        Err(err) => {
            summary.problem(&e.path, format!("not taken in: {err}"));
            return;
        }
    };
    let raw = match fs::read(&e.path) {
        Ok(b) => b,
        Err(err) => {
            summary.problem(&e.path, format!("cannot read the archived message: {err}"));
            return;
        }
    };
    let ctx = Context {
        mailbox,
        archive: &config.store.archive,
        verifier,
        gateway_hostname: Some(&config.gateway.hostname),
    };
    match ingest::ingest(db, &ctx, &raw, Source::default(), e.at) {
        Ok(IngestOutcome::Applied { .. }) => summary.receipts_applied += 1,
        Ok(IngestOutcome::Duplicate { .. }) => summary.duplicates += 1,
        Ok(IngestOutcome::Quarantined { .. }) => summary.quarantined += 1,
        Ok(IngestOutcome::Orphan { .. }) => summary.orphans += 1,
        Ok(IngestOutcome::Incoming { .. }) => summary.incoming += 1,
        Ok(IngestOutcome::Anomaly { .. }) => summary.anomalies += 1,
        Ok(IngestOutcome::NotPec | IngestOutcome::Unreadable { .. }) => {
            summary.other_messages += 1;
        }
        Err(err) => summary.problem(&e.path, format!("not taken in: {err}")),
    }
}
