//! The outbox folder: finding complete letters, claiming them, turning a
//! claim into letters or into a refusal, and cleaning up. Synchronous
//! (the daemon calls these from `spawn_blocking`); `now` is an argument.
//!
//! The life of a letter:
//!
//! ```text
//! outbox/NAME.toml + files           scan: complete when the envelope, its CSV and every
//!                                    file they name are present and unchanged for `settle`
//!   -> outbox/.processing/<claim-id>/ claim: mkdir, write .claim (which file is the
//!                                    envelope), rename the envelope (the atomic point),
//!                                    then its CSV and every file it names
//!   -> load -> Vec<Letter>           the caller stores them, copies the documents to sent/,
//!                                    then release() removes the claim folder
//!   or -> outbox/rejected/NAME/      reject(): every file moved untouched + NAME.error.txt
//! ```
//!
//! Never twice: renaming the envelope is the claim. Two daemons (or two
//! threads) racing for one letter both create their own claim folder; the
//! one whose rename fails with "not found" removes its folder and gets
//! [`ClaimError::Taken`].
//!
//! Never lost: a crash leaves a claim folder. [`recover`] finishes moving
//! the files the envelope names and hands the claim back; the caller
//! releases it if the store already has the letter, or loads it again.
//!
//! A file named by two envelopes goes with the first claim; the second
//! letter then sees it missing and waits, like any letter whose file is
//! missing, until `missing_grace` has passed since its envelope settled;
//! then it is claimed and refused, naming the missing file.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::envelope::{
    CsvTable, Envelope, column_of_field, expand_rows, is_literal_field, named_files_lenient,
};
use super::validate::{Context, check_os_name, duplicate_problem, validate};
use super::{Letter, Problem};
use crate::config::Limits;
use crate::telemetry::{event, field};

/// The folder (inside the outbox) holding claimed letters.
pub const PROCESSING_DIR: &str = ".processing";
/// The folder (inside the outbox) holding refused letters.
pub const REJECTED_DIR: &str = "rejected";
/// The file in a claim folder that names the envelope (and its CSV).
pub const CLAIM_MARKER: &str = ".claim";
/// How long a settled letter whose named files are still missing waits
/// before it is refused (naming them).
pub const DEFAULT_MISSING_GRACE: Duration = Duration::from_secs(60 * 60);

/// Mode of every file the gateway writes.
pub const FILE_MODE: u32 = 0o640;
/// Mode of every folder the gateway creates.
pub const DIR_MODE: u32 = 0o750;

/// The outbox could not be read or changed (not a problem of a letter).
#[derive(Debug, thiserror::Error)]
#[error("outbox: {action} {}: {source}", path.display())]
pub struct IntakeError {
    /// What was being done (`reading folder`, `moving`, ...).
    pub action: &'static str,
    /// The file or folder.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IntakeError + 'a {
    move |source| IntakeError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Why a letter could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another process (or thread) claimed it first: nothing to do.
    #[error("outbox: {} was claimed by another process", path.display())]
    Taken {
        /// The envelope that was there.
        path: PathBuf,
    },
    /// The outbox could not be changed.
    #[error(transparent)]
    Io(#[from] IntakeError),
}

impl ClaimError {
    /// Whether someone else has the letter (the normal outcome of a race).
    pub fn is_taken(&self) -> bool {
        matches!(self, ClaimError::Taken { .. })
    }
}

/// A refused letter (or batch): every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{letter}: refused ({} problem(s))", problems.len())]
pub struct Rejection {
    /// The envelope's file name.
    pub letter: String,
    /// What to fix.
    pub problems: Vec<Problem>,
}

/// A letter that [`scan`] found complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The envelope's file name in the outbox (bytes: it may not be UTF-8;
    /// then the letter is refused).
    pub envelope: OsString,
    /// The CSV of a mass mailing (`NAME.csv`), if there is one.
    pub csv: Option<OsString>,
    /// The files the envelope (and CSV) name that are present.
    pub files: Vec<String>,
    /// Files named but missing (the letter waited `missing_grace`).
    pub missing: Vec<String>,
    /// The newest modification time among its files.
    pub modified: SystemTime,
}

impl Candidate {
    /// The envelope's name, for logs and messages.
    pub fn name(&self) -> String {
        self.envelope.to_string_lossy().into_owned()
    }
}

/// A claimed letter: its files are in [`Claim::dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The claim id (sortable by time, unique: milliseconds + random).
    pub id: String,
    /// `outbox/.processing/<id>/`.
    pub dir: PathBuf,
    /// The envelope's file name.
    pub envelope: OsString,
    /// The CSV's file name, for a mass mailing.
    pub csv: Option<OsString>,
}

impl Claim {
    /// The envelope's name, for logs and messages.
    pub fn name(&self) -> String {
        self.envelope.to_string_lossy().into_owned()
    }

    /// The envelope's name without `.toml` (lossy).
    pub fn stem(&self) -> String {
        let b = self.envelope.as_bytes();
        let stem = &b[..b.len().saturating_sub(5)];
        String::from_utf8_lossy(stem).into_owned()
    }

    /// The outbox this claim belongs to.
    fn outbox(&self) -> Option<&Path> {
        self.dir.parent().and_then(Path::parent)
    }
}

// ---------------------------------------------------------------------------
// scan

#[derive(Debug, Clone, Copy)]
struct Entry {
    is_dir: bool,
    is_file_like: bool,
    mtime: SystemTime,
}

/// Whether a file name is a temporary or hidden file that never starts a
/// letter: dotfiles, Office lock files `~$x`, editor and download files
/// (`.swp`, `.part`, `.tmp`, `.crdownload`, `x~`).
pub fn is_ignored(name: &OsStr) -> bool {
    let b = name.as_bytes();
    let lower = b.to_ascii_lowercase();
    b.starts_with(b".")
        || b.starts_with(b"~$")
        || b.ends_with(b"~")
        || [".swp", ".part", ".partial", ".tmp", ".crdownload"]
            .iter()
            .any(|s| lower.ends_with(s.as_bytes()))
}

fn has_ext(name: &[u8], ext: &[u8]) -> bool {
    name.len() > ext.len() && name[name.len() - ext.len()..].eq_ignore_ascii_case(ext)
}

/// Finds the letters of `outbox` that are complete at `now`: the envelope
/// `NAME.toml` (and `NAME.csv`, if present) and every file they name exist
/// and none changed during the last `settle`. A letter with a named file
/// missing waits, until its envelope has been settled for `missing_grace`
/// (then it is returned, and refused by [`load`]). Hidden and temporary
/// files, `rejected/` and `.processing/` are ignored. Oldest first.
///
/// A modification time in the future counts as "just changed": with a file
/// server whose clock is ahead, letters wait that much longer.
///
/// # Errors
///
/// The outbox folder cannot be read.
pub fn scan(
    outbox: &Path,
    settle: Duration,
    missing_grace: Duration,
    now: SystemTime,
) -> Result<Vec<Candidate>, IntakeError> {
    let mut entries: HashMap<OsString, Entry> = HashMap::new();
    for e in fs::read_dir(outbox).map_err(io_err("reading folder", outbox))? {
        let e = e.map_err(io_err("reading folder", outbox))?;
        // DirEntry::metadata does not follow symbolic links.
        let Ok(m) = e.metadata() else { continue };
        let ft = m.file_type();
        entries.insert(
            e.file_name(),
            Entry {
                is_dir: ft.is_dir(),
                is_file_like: !ft.is_dir(),
                mtime: m.modified().unwrap_or(UNIX_EPOCH),
            },
        );
    }
    let settled_for = |e: &Entry, d: Duration| {
        now.duration_since(e.mtime)
            .map(|age| age >= d)
            .unwrap_or(false)
    };
    let mut out = Vec::new();
    // The CSV of each stem, found once (a lookup per envelope, not a scan:
    // an outbox may hold thousands of letters).
    let csv_by_stem: HashMap<&[u8], (&OsString, &Entry)> = entries
        .iter()
        .filter(|(n, e)| e.is_file_like && has_ext(n.as_bytes(), b".csv"))
        .map(|(n, e)| (&n.as_bytes()[..n.len() - 4], (n, e)))
        .collect();
    for (name, entry) in &entries {
        if !entry.is_file_like || is_ignored(name) || !has_ext(name.as_bytes(), b".toml") {
            continue;
        }
        if !settled_for(entry, settle) {
            continue;
        }
        let stem = &name.as_bytes()[..name.len() - 5];
        let csv = csv_by_stem.get(stem).copied();
        let mut modified = entry.mtime;
        if let Some((_, e)) = csv {
            if !settled_for(e, settle) {
                continue;
            }
            modified = modified.max(e.mtime);
        }
        let env_bytes = read_small(&outbox.join(name));
        let csv_bytes = csv.and_then(|(n, _)| read_small(&outbox.join(n)));
        let names = letter_files(env_bytes.as_deref(), csv_bytes.as_deref());
        let mut files = Vec::new();
        let mut missing = Vec::new();
        let mut busy = false;
        for n in names {
            match entries.get(OsStr::new(&n)) {
                Some(e) => {
                    busy |= !settled_for(e, settle);
                    modified = modified.max(e.mtime);
                    if !e.is_dir {
                        files.push(n);
                    }
                }
                None => missing.push(n),
            }
        }
        if busy {
            continue;
        }
        if !missing.is_empty() {
            let waited = settled_for(entry, missing_grace.max(settle))
                && csv.is_none_or(|(_, e)| settled_for(e, missing_grace.max(settle)));
            if !waited {
                continue;
            }
        }
        out.push(Candidate {
            envelope: name.clone(),
            csv: csv.map(|(n, _)| n.clone()),
            files,
            missing,
            modified,
        });
    }
    out.sort_by(|a, b| (a.modified, &a.envelope).cmp(&(b.modified, &b.envelope)));
    Ok(out)
}

/// The bytes of a file, if it is a regular file small enough to be an
/// envelope or a CSV (never follows a symbolic link).
fn read_small(path: &Path) -> Option<Vec<u8>> {
    let m = fs::symlink_metadata(path).ok()?;
    if !m.is_file() || m.len() > super::envelope::MAX_CSV_BYTES as u64 {
        return None;
    }
    fs::read(path).ok()
}

/// The plain file names (checked: nothing outside the folder, no hidden
/// file, never `rejected`) an envelope and its CSV name, found leniently.
fn letter_files(envelope: Option<&[u8]>, csv: Option<&[u8]>) -> Vec<String> {
    let Some(env) = envelope.and_then(Envelope::parse_lenient) else {
        return Vec::new();
    };
    let table = csv.and_then(CsvTable::parse_lenient);
    named_files_lenient(&env, table.as_ref())
        .into_iter()
        .filter(|n| check_os_name(OsStr::new(n)).is_ok())
        .filter(|n| n != REJECTED_DIR)
        .collect()
}

// ---------------------------------------------------------------------------
// claim

/// Claims a candidate: creates `outbox/.processing/<claim-id>/`, records
/// which file is the envelope, renames the envelope into it (the atomic
/// point), then its CSV and every file the claimed envelope names (files
/// missing by then are left for [`load`] to report). The claim is durable
/// when this returns. [`claim_group`] with one candidate.
///
/// # Errors
///
/// [`ClaimError::Taken`] when the envelope is gone (another process
/// claimed it; the claim folder is removed); [`ClaimError::Io`] when the
/// outbox cannot be changed.
pub fn claim(candidate: &Candidate, outbox: &Path, now: SystemTime) -> Result<Claim, ClaimError> {
    claim_group(std::slice::from_ref(candidate), outbox, now)
        .pop()
        .unwrap_or_else(|| {
            Err(ClaimError::Io(IntakeError {
                action: "claiming",
                path: outbox.join(&candidate.envelope),
                source: io::Error::other("no result"),
            }))
        })
}

/// Claims several candidates at once, as [`claim`] does one, with the
/// fsyncs of the whole group issued together (`archive::sync_all`): one
/// result per candidate, in order. Every claim returned `Ok` is durable.
///
/// The order that makes a claim safe, for the group as a whole:
/// 1. every claim folder is created and its `.claim` marker written, and
///    the markers are fsync'd: a marker must be complete on disk before the
///    envelope it names can be in the folder, or [`recover`] could not tell
///    which file is the envelope after a power cut;
/// 2. each envelope is renamed into its folder (the atomic point: a second
///    daemon racing for the letter gets [`ClaimError::Taken`]), then its CSV
///    and the files it names;
/// 3. the outbox (the files left it), `.processing/` (the new claim
///    folders) and every claim folder (the files arrived) are fsync'd: the
///    caller commits the letters to the store only after this, so a power
///    cut can never bring back into the outbox a letter the store already
///    has (it would be claimed again under a new claim id and sent twice).
pub fn claim_group(
    candidates: &[Candidate],
    outbox: &Path,
    now: SystemTime,
) -> Vec<Result<Claim, ClaimError>> {
    let processing = outbox.join(PROCESSING_DIR);
    if let Err(e) = ensure_dir(&processing) {
        return candidates
            .iter()
            .map(|_| {
                Err(ClaimError::Io(IntakeError {
                    action: e.action,
                    path: e.path.clone(),
                    source: io::Error::new(e.source.kind(), e.source.to_string()),
                }))
            })
            .collect();
    }
    // 1. Folders and markers.
    let mut prepared: Vec<Result<(String, PathBuf), ClaimError>> = Vec::new();
    let mut markers = Vec::new();
    for candidate in candidates {
        let id = claim_id(now);
        let dir = processing.join(&id);
        if let Err(e) = make_dir(&dir) {
            prepared.push(Err(io_err("creating folder", &dir)(e).into()));
            continue;
        }
        let mut marker = candidate.envelope.as_bytes().to_vec();
        if let Some(csv) = &candidate.csv {
            marker.push(0);
            marker.extend_from_slice(csv.as_bytes());
        }
        let path = dir.join(CLAIM_MARKER);
        if let Err(e) = write_file_unsynced(&path, &marker) {
            let _ = fs::remove_dir_all(&dir);
            prepared.push(Err(e.into()));
            continue;
        }
        markers.push(path);
        prepared.push(Ok((id, dir)));
    }
    if let Err(e) = crate::archive::sync_all(&markers) {
        // No envelope has moved: undo the folders, the letters stay in the
        // outbox for the next pass.
        for (_, dir) in prepared.iter().flatten() {
            let _ = fs::remove_dir_all(dir);
        }
        return candidates
            .iter()
            .map(|c| {
                Err(ClaimError::Io(IntakeError {
                    action: "syncing claim marker",
                    path: outbox.join(&c.envelope),
                    source: io::Error::new(e.source.kind(), e.to_string()),
                }))
            })
            .collect();
    }
    // 2. The atomic points, then the other files.
    let mut out = Vec::with_capacity(candidates.len());
    let mut to_sync = vec![outbox.to_path_buf(), processing.clone()];
    for (candidate, prep) in candidates.iter().zip(prepared) {
        let (id, dir) = match prep {
            Ok(p) => p,
            Err(e) => {
                out.push(Err(e));
                continue;
            }
        };
        let from = outbox.join(&candidate.envelope);
        if let Err(e) = fs::rename(&from, dir.join(&candidate.envelope)) {
            let _ = fs::remove_file(dir.join(CLAIM_MARKER));
            let _ = fs::remove_dir(&dir);
            if e.kind() == io::ErrorKind::NotFound {
                out.push(Err(ClaimError::Taken { path: from }));
            } else {
                out.push(Err(io_err("moving", &from)(e).into()));
            }
            continue;
        }
        let claim = Claim {
            id,
            dir,
            envelope: candidate.envelope.clone(),
            csv: candidate.csv.clone(),
        };
        // Past the atomic point the letter is ours: a file that cannot be
        // moved now is reported by load() (missing), never left half-claimed.
        if let Err(e) = gather_files(&claim, outbox) {
            warn!({ field::PATH } = %claim.dir.display(), { field::ERROR } = %e, "claim incomplete");
        }
        to_sync.push(claim.dir.clone());
        out.push(Ok(claim));
    }
    // 3. Durable before anything is stored.
    if let Err(e) = crate::archive::sync_all(&to_sync) {
        // The claims exist but may not be durable: the caller must not
        // store them now. They are taken up again by `recover` at the next
        // start (or fail again here).
        return out
            .into_iter()
            .map(|r| {
                r.and_then(|c| {
                    Err(ClaimError::Io(IntakeError {
                        action: "syncing claim",
                        path: c.dir,
                        source: io::Error::new(e.source.kind(), e.to_string()),
                    }))
                })
            })
            .collect();
    }
    for claim in out.iter().flatten() {
        info!(
            { field::EVENT } = event::LETTER_CLAIMED,
            { field::PATH } = %claim.dir.display(),
            letter = %claim.name(),
            "letter claimed"
        );
    }
    out
}

/// Moves into the claim folder the CSV and every file the claimed envelope
/// names that is still in the outbox (after a crash, too), and makes the
/// moves durable. Folders are never moved.
fn gather(claim: &Claim, outbox: &Path) -> Result<(), IntakeError> {
    gather_files(claim, outbox)?;
    sync_dir(outbox)?;
    sync_dir(&claim.dir)?;
    Ok(())
}

/// [`gather`] without the fsyncs (the caller syncs both folders).
fn gather_files(claim: &Claim, outbox: &Path) -> Result<(), IntakeError> {
    let mut names: Vec<OsString> = claim.csv.iter().cloned().collect();
    let env = read_small(&claim.dir.join(&claim.envelope));
    let csv = claim
        .csv
        .as_ref()
        .and_then(|c| read_small(&claim.dir.join(c)).or_else(|| read_small(&outbox.join(c))));
    names.extend(
        letter_files(env.as_deref(), csv.as_deref())
            .into_iter()
            .map(OsString::from),
    );
    for n in names {
        let to = claim.dir.join(&n);
        let from = outbox.join(&n);
        if fs::symlink_metadata(&to).is_ok() {
            continue;
        }
        match fs::symlink_metadata(&from) {
            Ok(m) if !m.is_dir() => {}
            _ => continue,
        }
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("moving", &from)(e)),
        }
    }
    Ok(())
}

fn claim_id(now: SystemTime) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let ms = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut r = [0u8; 6];
    if openssl::rand::rand_bytes(&mut r).is_err() {
        // Unique within this process anyway; other processes have another pid.
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let v = (u64::from(std::process::id()) << 24) ^ n;
        r.copy_from_slice(&v.to_be_bytes()[2..]);
    }
    format!("{ms:013}-{}", super::validate::hex(&r))
}

// ---------------------------------------------------------------------------
// load

/// Reads and validates a claimed letter (or every row of a mass mailing).
/// `is_duplicate` answers, for a content hash, the dispatch id of a letter
/// already sent with it.
///
/// # Errors
///
/// A [`Rejection`] with every problem found; one bad row refuses the whole
/// batch.
pub fn load(
    claim: &Claim,
    limits: &Limits,
    is_duplicate: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Letter>, Rejection> {
    let name = claim.name();
    let reject = |problems: Vec<Problem>| Rejection {
        letter: name.clone(),
        problems,
    };
    let mut problems = Vec::new();
    if let Err((it, en)) = check_os_name(&claim.envelope) {
        problems.push(Problem::new("envelope name", it, en));
    }
    let env_bytes = match read_claimed(&claim.dir, &claim.envelope) {
        Ok(b) => b,
        Err(p) => {
            problems.push(p.within("envelope"));
            return Err(reject(problems));
        }
    };
    // A defective envelope is still checked as far as it can be read, so
    // that the clerk learns everything at once; keys already reported are
    // not reported again (a `subject = 3` is not also "missing").
    let (envelope, flagged) = match Envelope::parse_bytes(&env_bytes) {
        Ok(e) => (Some(e), Vec::new()),
        Err(p) => {
            let flagged: Vec<String> = p.iter().map(|p| key_of(&p.field).to_owned()).collect();
            problems.extend(p);
            (Envelope::parse_lenient(&env_bytes), flagged)
        }
    };
    let Some(envelope) = envelope else {
        return Err(reject(problems));
    };
    let fresh = |p: &Problem| !flagged.iter().any(|k| k == key_of(&p.field));
    let hint = claim.outbox();
    let context = |reserved: Vec<String>| {
        let c = Context::new(&claim.dir, limits, is_duplicate).with_reserved(reserved);
        match hint {
            Some(o) => c.with_hint_dir(o),
            None => c,
        }
    };
    let mut letters = Vec::new();
    match &claim.csv {
        None => {
            let csv_name = format!("{}.csv", claim.stem());
            let p = envelope.check_placeholders(None, &csv_name);
            if !p.is_empty() {
                problems.extend(p);
                return Err(reject(problems));
            }
            // No placeholders: expanding only turns {{ and }} into braces.
            let Ok(envelope) = envelope.expand(&|_| None) else {
                return Err(reject(problems));
            };
            match validate(&name, &envelope, &context(vec![name.clone()])) {
                Ok(l) => letters.push(l),
                Err(p) => problems.extend(p.into_iter().filter(|p| fresh(p))),
            }
        }
        Some(csv) => {
            let csv_name = csv.to_string_lossy().into_owned();
            if let Err((it, en)) = check_os_name(csv) {
                problems.push(Problem::new("csv name", it, en));
            }
            let table = match read_claimed(&claim.dir, csv) {
                Ok(b) => match CsvTable::parse(&b) {
                    Ok(t) => Some(t),
                    Err(p) => {
                        problems.extend(p);
                        None
                    }
                },
                Err(p) => {
                    problems.push(p.within("csv"));
                    None
                }
            };
            let Some(table) = table else {
                return Err(reject(problems));
            };
            let (rows, p) = expand_rows(&envelope, &table, &csv_name);
            problems.extend(p);
            let ctx = context(vec![name.clone(), csv_name.clone()]);
            let mut by_hash: HashMap<String, u64> = HashMap::new();
            for row in rows {
                let context = format!("csv row {}", row.row);
                match validate(&row.name, &row.envelope, &ctx) {
                    Ok(l) => {
                        if let Some(first) = by_hash.get(&l.content_hash)
                            && !l.allow_duplicate
                        {
                            problems.push(
                                duplicate_problem(&format!("{csv_name}#{first}")).within(&context),
                            );
                        } else {
                            by_hash.insert(l.content_hash.clone(), row.row);
                        }
                        letters.push(l);
                    }
                    Err(p) => {
                        for mut p in p.into_iter().filter(|p| fresh(p)) {
                            if is_literal_field(&envelope, &p.field) {
                                // The template's own value: said once.
                                if !problems.contains(&p) {
                                    problems.push(p);
                                }
                                continue;
                            }
                            if let Some(c) = column_of_field(&envelope, &table, &p.field) {
                                p.field = format!("column {c}");
                            }
                            problems.push(p.within(&context));
                        }
                    }
                }
            }
            // Row by row, as the clerk reads the spreadsheet.
            problems.sort_by_key(|p| row_of(&p.field));
            problems = merge_rows(problems);
        }
    }
    if problems.is_empty() {
        Ok(letters)
    } else {
        Err(reject(problems))
    }
}

/// The CSV row a problem's field names (0 for the envelope's own).
fn row_of(field: &str) -> u64 {
    field
        .strip_prefix("csv row ")
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The envelope key a problem's field is about (`to[2]` -> `to`).
fn key_of(field: &str) -> &str {
    let field = match field.strip_prefix("csv row ") {
        Some(rest) => rest.split_once(", ").map_or("", |(_, f)| f),
        None => field,
    };
    let end = field.find(['[', ',', ' ']).unwrap_or(field.len());
    &field[..end]
}

/// Reads a claimed envelope or CSV (a regular file, not a link).
fn read_claimed(dir: &Path, name: &OsStr) -> Result<Vec<u8>, Problem> {
    let path = dir.join(name);
    let shown = name.to_string_lossy();
    match fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Problem::new(
                "",
                format!(
                    "\"{shown}\" è un collegamento simbolico: copiare nella cartella il file vero e proprio"
                ),
                format!("\"{shown}\" is a symbolic link: copy the actual file into the folder"),
            ));
        }
        Ok(m) if m.len() > super::envelope::MAX_CSV_BYTES as u64 => {
            return Err(Problem::new(
                "",
                format!("\"{shown}\" è troppo grande"),
                format!("\"{shown}\" is too big"),
            ));
        }
        _ => {}
    }
    fs::read(&path).map_err(|e| {
        Problem::new(
            "",
            format!("impossibile leggere \"{shown}\" ({e}): copiarlo di nuovo"),
            format!("\"{shown}\" cannot be read ({e}): copy it again"),
        )
    })
}

/// Merges the same problem repeated on many rows of a batch (a missing
/// template document, for instance) into one, listing the rows.
fn merge_rows(problems: Vec<Problem>) -> Vec<Problem> {
    let mut order: Vec<(String, String, String)> = Vec::new();
    let mut rows: HashMap<(String, String, String), Vec<String>> = HashMap::new();
    let mut out_plain = Vec::new();
    for p in problems {
        let Some(rest) = p.field.strip_prefix("csv row ") else {
            out_plain.push((order.len(), p));
            continue;
        };
        let (row, field) = match rest.split_once(", ") {
            Some((r, f)) => (r.to_owned(), f.to_owned()),
            None => (rest.to_owned(), String::new()),
        };
        // Only problems that do not depend on the row merge: same text.
        let key = (field, p.it, p.en);
        if !rows.contains_key(&key) {
            order.push(key.clone());
        }
        rows.entry(key).or_default().push(row);
    }
    let mut merged: Vec<Problem> = Vec::new();
    let mut plain = out_plain.into_iter().peekable();
    for (i, key) in order.into_iter().enumerate() {
        while plain.peek().is_some_and(|(at, _)| *at <= i) {
            if let Some((_, p)) = plain.next() {
                merged.push(p);
            }
        }
        let list = &rows[&key];
        let (field, it, en) = key;
        let where_ = if list.len() == 1 {
            format!("csv row {}", list[0])
        } else if list.len() <= 6 {
            format!("csv rows {}", list.join(", "))
        } else {
            format!(
                "csv rows {}, ... {} ({} rows)",
                list[..3].join(", "),
                list[list.len() - 1],
                list.len()
            )
        };
        merged.push(Problem { field, it, en }.within(&where_));
    }
    merged.extend(plain.map(|(_, p)| p));
    merged
}

// ---------------------------------------------------------------------------
// reject, release, recover

/// Moves every file of a claim, untouched, to `outbox/rejected/NAME/`
/// (NAME = the envelope's name without `.toml`, made safe; `NAME-2`, ...
/// when taken) and writes `NAME.error.txt` there: Italian, then English,
/// each problem with its field, then what to do. Removes the claim folder.
/// Returns the folder.
///
/// # Errors
///
/// The outbox cannot be changed (the claim folder is then left for
/// [`recover`]).
pub fn reject(claim: &Claim, outbox: &Path, problems: &[Problem]) -> Result<PathBuf, IntakeError> {
    let root = outbox.join(REJECTED_DIR);
    ensure_dir(&root)?;
    let base = safe_folder_name(&claim.stem());
    let mut target = root.join(&base);
    let mut n = 1;
    loop {
        match make_dir(&target) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100_000 => {
                n += 1;
                target = root.join(format!("{base}-{n}"));
            }
            Err(e) => return Err(io_err("creating folder", &target)(e)),
        }
    }
    let mut moved: Vec<String> = Vec::new();
    for e in fs::read_dir(&claim.dir).map_err(io_err("reading folder", &claim.dir))? {
        let e = e.map_err(io_err("reading folder", &claim.dir))?;
        let name = e.file_name();
        if name == CLAIM_MARKER {
            continue;
        }
        let to = target.join(&name);
        fs::rename(e.path(), &to).map_err(io_err("moving", &e.path()))?;
        moved.push(name.to_string_lossy().into_owned());
    }
    moved.sort();
    let mut report = format!("{base}.error.txt");
    let mut k = 1;
    while target.join(&report).exists() {
        k += 1;
        report = format!("{base}.error-{k}.txt");
    }
    let folder = format!(
        "{REJECTED_DIR}/{}",
        target.file_name().unwrap_or_default().to_string_lossy()
    );
    let letter = match &claim.csv {
        Some(csv) => format!("{} + {}", claim.name(), csv.to_string_lossy()),
        None => claim.name(),
    };
    let text = error_report(
        &letter,
        claim.csv.is_some(),
        &folder,
        &report,
        &moved,
        problems,
    );
    write_file_atomic(&target.join(&report), text.as_bytes())?;
    sync_dir(&target)?;
    let _ = fs::remove_file(claim.dir.join(CLAIM_MARKER));
    fs::remove_dir(&claim.dir).map_err(io_err("removing folder", &claim.dir))?;
    if let Some(p) = claim.dir.parent() {
        sync_dir(p)?;
    }
    // The caller logs `letter.rejected` (with the mailbox and the fields).
    Ok(target)
}

/// The text of `NAME.error.txt`.
fn error_report(
    letter: &str,
    is_batch: bool,
    folder: &str,
    report: &str,
    files: &[String],
    problems: &[Problem],
) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "pecgate: LETTERA NON INVIATA / LETTER NOT SENT: {letter}\n\n"
    ));
    s.push_str("=== ITALIANO ===\n\n");
    if is_batch {
        s.push_str(&format!(
            "La spedizione \"{letter}\" NON è stata inviata: nessuna lettera di questa spedizione è partita, neppure quelle delle righe corrette.\n"
        ));
    } else {
        s.push_str(&format!("La lettera \"{letter}\" NON è stata inviata.\n"));
    }
    s.push_str(&format!("Problemi da correggere ({}):\n\n", problems.len()));
    for (i, p) in problems.iter().enumerate() {
        s.push_str(&format!("{}. [{}] {}\n", i + 1, p.field, p.it));
    }
    s.push_str(&format!(
        "\nCosa fare: correggere i file in questa cartella ({folder}) e spostarli di nuovo nella cartella outbox (la busta .toml per ultima). Non spostare questo file ({report}). Nessun file è stato cancellato o modificato.\n"
    ));
    s.push_str("\n=== ENGLISH ===\n\n");
    if is_batch {
        s.push_str(&format!(
            "The mailing \"{letter}\" was NOT sent: no letter of this mailing has left, not even those of the correct rows.\n"
        ));
    } else {
        s.push_str(&format!("The letter \"{letter}\" was NOT sent.\n"));
    }
    s.push_str(&format!("Problems to fix ({}):\n\n", problems.len()));
    for (i, p) in problems.iter().enumerate() {
        s.push_str(&format!("{}. [{}] {}\n", i + 1, p.field, p.en));
    }
    s.push_str(&format!(
        "\nWhat to do: fix the files in this folder ({folder}) and move them back into the outbox folder (the .toml envelope last). Do not move this file ({report}). No file was deleted or changed.\n"
    ));
    s.push_str("\n=== FILE ===\n\n");
    for f in files {
        s.push_str(&format!("- {f}\n"));
    }
    s
}

/// A name usable as a folder on any clerk's computer: control and
/// Windows-forbidden characters and undecodable bytes become `_`, no
/// leading dot, no trailing dot or space, not a reserved device name, at
/// most 100 bytes; `lettera` if nothing is left.
pub fn safe_folder_name(stem: &str) -> String {
    let mut s: String = stem
        .chars()
        .map(|c| {
            if c.is_control() || "<>:\"/\\|?*\u{FFFD}".contains(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    while s.len() > 100 {
        s.pop();
    }
    let s2 = s
        .trim()
        .trim_start_matches('.')
        .trim_end_matches(['.', ' '])
        .to_owned();
    s = s2;
    if s.is_empty() {
        return "lettera".to_owned();
    }
    if super::validate::check_file_name(&s).is_err() {
        // A reserved device name (CON, LPT1...) or similar.
        s.push('_');
        if super::validate::check_file_name(&s).is_err() {
            return "lettera".to_owned();
        }
    }
    s
}

/// Removes a claim folder once the caller has stored its letters (and
/// copied their documents to the sent folder).
///
/// # Errors
///
/// The folder cannot be removed.
pub fn release(claim: &Claim) -> Result<(), IntakeError> {
    // The atomic point: once renamed, the claim is released. A crash while
    // the files are being deleted then leaves a `.released-` folder that
    // `recover` only deletes, never a half-emptied claim that would be
    // taken in again (and refused for missing documents).
    let parent = claim.dir.parent().unwrap_or(Path::new("."));
    let released = parent.join(format!("{RELEASED_PREFIX}{}", claim.id));
    match fs::rename(&claim.dir, &released) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("releasing folder", &claim.dir)(e)),
    }
    // No fsync here: the caller releases only letters already stored, and
    // taking a claim in again is idempotent (deterministic dispatch ids), so
    // a release lost in a power cut only repeats harmless work.
    match fs::remove_dir_all(&released) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing folder", &released)(e)),
    }
    Ok(())
}

/// Prefix of a released claim folder being deleted (see [`release`]).
const RELEASED_PREFIX: &str = ".released-";

/// The claims a crash left in `outbox/.processing/`, oldest first, each
/// completed (files the envelope names that were still in the outbox are
/// moved in). Claim folders without an envelope (the crash came before the
/// rename) are removed: their letter is still in the outbox. A folder that
/// cannot be understood is left alone and logged.
///
/// # Errors
///
/// The folder cannot be read or changed.
pub fn recover(outbox: &Path) -> Result<Vec<Claim>, IntakeError> {
    let processing = outbox.join(PROCESSING_DIR);
    let rd = match fs::read_dir(&processing) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("reading folder", &processing)(e)),
    };
    let mut claims = Vec::new();
    for e in rd {
        let e = e.map_err(io_err("reading folder", &processing))?;
        let dir = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let id = e.file_name().to_string_lossy().into_owned();
        if id.starts_with(RELEASED_PREFIX) {
            // Released before the crash: its letter is stored; finish deleting.
            if let Err(e) = fs::remove_dir_all(&dir) {
                warn!({ field::PATH } = %dir.display(), { field::ERROR } = %e, "released claim folder could not be removed");
            }
            continue;
        }
        let marker = match fs::read(dir.join(CLAIM_MARKER)) {
            Ok(m) => m,
            Err(_) => {
                if fs::remove_dir(&dir).is_err() {
                    warn!({ field::PATH } = %dir.display(), "claim folder without .claim left alone");
                }
                continue;
            }
        };
        let mut parts = marker.splitn(2, |&b| b == 0);
        let envelope = OsString::from_vec(parts.next().unwrap_or_default().to_vec());
        let csv = parts.next().map(|c| OsString::from_vec(c.to_vec()));
        if envelope.is_empty() {
            warn!({ field::PATH } = %dir.display(), "claim folder with an empty .claim left alone");
            continue;
        }
        if fs::symlink_metadata(dir.join(&envelope)).is_err() {
            // The crash came before the envelope's rename.
            let _ = fs::remove_file(dir.join(CLAIM_MARKER));
            if fs::remove_dir(&dir).is_err() {
                warn!({ field::PATH } = %dir.display(), "claim folder without its envelope left alone");
            }
            continue;
        }
        let claim = Claim {
            id,
            dir,
            envelope,
            csv,
        };
        if let Err(e) = gather(&claim, outbox) {
            warn!({ field::PATH } = %claim.dir.display(), { field::ERROR } = %e, "claim incomplete");
        }
        warn!(
            { field::PATH } = %claim.dir.display(),
            letter = %claim.name(),
            "claim left by an interrupted run taken up again"
        );
        claims.push(claim);
    }
    claims.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(claims)
}

// ---------------------------------------------------------------------------
// watch

/// Watches `outbox` (not its subfolders) and sends a tick on the returned
/// channel whenever something in it changes. Ticks coalesce: the channel
/// holds at most one, so a burst of changes (a clerk copying fifty files)
/// wakes the receiver once; the receiver then rescans (and waits `settle`
/// anyway). Keep the watcher alive as long as ticks are wanted. Changes
/// inside `.processing/` and `rejected/` (the gateway's own moves) do not
/// tick. The daemon also rescans periodically: notifications are not
/// delivered on every network file system.
///
/// # Errors
///
/// The watch cannot be set up (missing folder, inotify limits).
pub fn watch(
    outbox: &Path,
) -> Result<(notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>), notify::Error> {
    use notify::Watcher as _;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let root = outbox.to_path_buf();
    let own = [root.join(PROCESSING_DIR), root.join(REJECTED_DIR)];
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match &res {
            Ok(ev) => {
                !matches!(ev.kind, notify::EventKind::Access(_))
                    && (ev.paths.is_empty()
                        || ev
                            .paths
                            .iter()
                            .any(|p| !own.iter().any(|o| p.starts_with(o))))
            }
            // An error (queue overflow): a rescan is the safe answer.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(outbox, notify::RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}

// ---------------------------------------------------------------------------
// file system helpers

/// Creates a folder with mode 0750 (whatever the umask).
fn make_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(DIR_MODE).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Creates a folder if it does not exist.
fn ensure_dir(path: &Path) -> Result<(), IntakeError> {
    match make_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("creating folder", path)(e)),
    }
}

/// Writes a file with mode 0640: a temporary name in the same folder,
/// `fsync`, rename over the final name.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), IntakeError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("writing", path)(e)
    })
}

/// Writes a new file with mode 0640 under its final name, without fsync:
/// the caller fsyncs it (with others, `archive::sync_all`) before anything
/// depends on it.
fn write_file_unsynced(path: &Path, bytes: &[u8]) -> Result<(), IntakeError> {
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)?;
        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        f.write_all(bytes)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(path);
        io_err("writing", path)(e)
    })
}

/// `fsync` of a folder, so that renames into it survive a power cut.
fn sync_dir(path: &Path) -> Result<(), IntakeError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing folder", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_are_ignored() {
        for n in [
            ".x.toml",
            "~$lettera.toml",
            "a.toml.swp",
            "a.toml.part",
            "a.TMP",
            "a.toml~",
        ] {
            assert!(is_ignored(OsStr::new(n)), "{n}");
        }
        assert!(!is_ignored(OsStr::new("lettera.toml")));
    }

    #[test]
    fn folder_names_are_made_safe() {
        assert_eq!(safe_folder_name("lettera-1"), "lettera-1");
        assert_eq!(safe_folder_name("a\nb"), "a_b");
        assert_eq!(safe_folder_name("..x"), "x");
        assert_eq!(safe_folder_name("CON"), "CON_");
        assert_eq!(safe_folder_name("caf\u{FFFD}"), "caf_");
        assert_eq!(safe_folder_name(""), "lettera");
        assert_eq!(safe_folder_name("..."), "lettera");
    }

    #[test]
    fn rows_with_the_same_problem_merge() {
        let p = |f: &str| Problem::new(f, "manca", "missing");
        let merged = merge_rows(vec![
            p("subject"),
            p("csv row 2, attachments[0]"),
            p("csv row 3, attachments[0]"),
            Problem::new("csv row 3, to[0]", "x", "y"),
        ]);
        let fields: Vec<_> = merged.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "subject",
                "csv rows 2, 3, attachments[0]",
                "csv row 3, to[0]"
            ]
        );
    }

    #[test]
    fn claim_ids_sort_by_time() {
        let a = claim_id(UNIX_EPOCH + Duration::from_millis(5));
        let b = claim_id(UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        assert!(a < b, "{a} {b}");
        assert_ne!(claim_id(UNIX_EPOCH), claim_id(UNIX_EPOCH));
    }
}
