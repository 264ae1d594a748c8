//! Disaster recovery: `pecgate backup DEST`, `pecgate restore SRC`, and the scheduled
//! backups of `[backup]` ([`run_scheduled`], called by the daemon).
//!
//! A backup is one directory that alone restores everything:
//!
//! ```text
//! DEST/pecgate.db                      the database: a consistent online snapshot
//! DEST/archive/...                     [store] archive (every raw message, the evidence)
//! DEST/mailbox/<name>/sent/...         each mailbox's sent folder (documents, dispatch.json, receipts)
//! DEST/mailbox/<name>/inbox/...        each mailbox's inbox folder
//! DEST/backup.json                     when, which pecgate, which schema, from which paths
//! DEST/MANIFEST.jsonl                  one line per file above: {"path","size","sha256"}; written last
//! ```
//!
//! Order and consistency: the database snapshot is taken first (one read transaction
//! of SQLite's online backup API; the daemon keeps writing), then the trees are copied.
//! pecgate writes a file (archive, sent folder) before the database row that names it,
//! so every file the snapshot refers to is in the backup; files written after the
//! snapshot may be there too, and do no harm (`reindex` can take them in). The manifest
//! is written last, through a temporary file and a rename: a directory without it is an
//! incomplete backup and `restore` refuses it.
//!
//! DEST must be new or empty: a backup is never written over another one (scheduled
//! backups each get their own `pecgate-YYYYMMDDTHHMMSSZ` directory). Everything is
//! written with mode 0600 (folders 0700): the backup holds personal data.
//!
//! `restore` checks every manifest line (size and SHA-256) before it writes anything,
//! refuses while another process has the database open (the daemon: stop it first),
//! refuses to replace an existing database without `--force`, never deletes a file, and
//! puts the database back last.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead as _, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::config::Config;
use crate::store::{Db, StoreError, hex};
use crate::telemetry::{event, field};

/// The manifest's file name.
pub const MANIFEST: &str = "MANIFEST.jsonl";
/// The database copy's file name.
pub const DATABASE: &str = "pecgate.db";
/// The description's file name.
pub const INFO: &str = "backup.json";
/// The archive tree's folder.
pub const ARCHIVE_DIR: &str = "archive";
/// The folder holding one folder per mailbox (`sent/`, `inbox/`).
pub const MAILBOX_DIR: &str = "mailbox";
/// Prefix of the scheduled backups' directories (`pecgate-20260301T020000Z`).
pub const SCHEDULED_PREFIX: &str = "pecgate-";
/// Prefix of a scheduled backup being written.
const PARTIAL_PREFIX: &str = ".partial-";
/// The format of [`INFO`].
pub const FORMAT: u32 = 1;

/// Mode of the files a backup writes.
const BACKUP_FILE_MODE: u32 = 0o600;
/// Mode of its folders.
const BACKUP_DIR_MODE: u32 = 0o700;
/// Mode of the files restore puts back (the daemon's).
const RESTORE_FILE_MODE: u32 = 0o640;
/// Mode of the folders restore creates.
const RESTORE_DIR_MODE: u32 = 0o750;

/// One line of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Relative to the backup directory, `/`-separated.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// Where a mailbox's trees came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxPaths {
    /// The sent folder.
    pub sent: String,
    /// The inbox folder.
    pub inbox: String,
}

/// `backup.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    /// [`FORMAT`].
    pub format: u32,
    /// When the snapshot was taken.
    pub created_at: String,
    /// The pecgate that wrote it.
    pub pecgate_version: String,
    /// The database's schema version.
    pub schema_version: u32,
    /// The database it came from.
    pub database: String,
    /// The archive it came from.
    pub archive: String,
    /// The mailboxes' folders it came from, by name.
    pub mailboxes: BTreeMap<String, MailboxPaths>,
}

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The backup directory.
    pub dest: PathBuf,
    /// Files in the manifest.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreSummary {
    /// Files written (the database included).
    pub written: u64,
    /// Files already in place with the same content.
    pub unchanged: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Why a backup or restore did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// A file-system operation failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The database could not be read or copied.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operation was refused; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// The backup does not match its manifest (or has none): nothing was touched.
    #[error("backup {}: {file}: {problem}; nothing was restored", src.display())]
    Corrupt {
        /// The backup directory.
        src: PathBuf,
        /// The file (relative to the backup), or the manifest line.
        file: String,
        /// What is wrong.
        problem: String,
    },
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> BackupError + 'a {
    move |source| BackupError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

// ---------------------------------------------------------------------------
// backup

/// Writes a complete backup of `config`'s database and trees into `dest` (a new or
/// empty directory). Safe while the daemon runs.
///
/// # Errors
///
/// `dest` not empty, the database missing or unreadable, a file-system failure.
pub fn backup(config: &Config, dest: &Path, now: Timestamp) -> Result<BackupSummary, BackupError> {
    if dest.exists() {
        let mut rd = fs::read_dir(dest).map_err(io_err(dest, "reading the destination"))?;
        if rd.next().is_some() {
            return Err(BackupError::Refused(format!(
                "{}: not empty; a backup goes into a new or empty directory (it never \
                 writes over another backup)",
                dest.display()
            )));
        }
        fs::set_permissions(dest, fs::Permissions::from_mode(BACKUP_DIR_MODE))
            .map_err(io_err(dest, "setting permissions"))?;
    } else {
        make_dirs(dest, BACKUP_DIR_MODE)?;
    }
    let db = Db::open_read_only(&config.store.database)?;
    let schema_version = db.schema_version()?;
    let mut w = Writer {
        root: dest.to_owned(),
        entries: Vec::new(),
    };
    let db_copy = dest.join(DATABASE);
    db.snapshot_to(&db_copy)?;
    drop(db);
    fs::set_permissions(&db_copy, fs::Permissions::from_mode(BACKUP_FILE_MODE))
        .map_err(io_err(&db_copy, "setting permissions"))?;
    let (size, sha256) = hash_file(&db_copy)?;
    w.entries.push(ManifestEntry {
        path: DATABASE.to_owned(),
        size,
        sha256,
    });
    w.copy_tree(&config.store.archive, ARCHIVE_DIR)?;
    let mut mailboxes = BTreeMap::new();
    for (name, mb) in &config.mailboxes {
        w.copy_tree(&mb.sent, &format!("{MAILBOX_DIR}/{name}/sent"))?;
        w.copy_tree(&mb.inbox, &format!("{MAILBOX_DIR}/{name}/inbox"))?;
        mailboxes.insert(
            name.clone(),
            MailboxPaths {
                sent: mb.sent.display().to_string(),
                inbox: mb.inbox.display().to_string(),
            },
        );
    }
    let info = BackupInfo {
        format: FORMAT,
        created_at: crate::sent::ts(now),
        pecgate_version: env!("CARGO_PKG_VERSION").to_owned(),
        schema_version,
        database: config.store.database.display().to_string(),
        archive: config.store.archive.display().to_string(),
        mailboxes,
    };
    let info = serde_json::to_vec_pretty(&info).unwrap_or_default();
    w.write_file(INFO, &info)?;
    // Manifest last: its presence marks a complete backup.
    let mut manifest = Vec::new();
    let (mut files, mut bytes) = (0, 0);
    w.entries.sort_by(|a, b| a.path.cmp(&b.path));
    for e in &w.entries {
        // Serialising plain data cannot fail.
        manifest.extend(serde_json::to_vec(e).unwrap_or_default());
        manifest.push(b'\n');
        files += 1;
        bytes += e.size;
    }
    crate::archive::write_durable(&dest.join(MANIFEST), &manifest, BACKUP_FILE_MODE).map_err(
        |e| BackupError::Io {
            path: e.path,
            what: "writing the manifest",
            source: e.source,
        },
    )?;
    Ok(BackupSummary {
        dest: dest.to_owned(),
        files,
        bytes,
    })
}

/// Collects the manifest while files are copied into a backup.
struct Writer {
    root: PathBuf,
    entries: Vec<ManifestEntry>,
}

impl Writer {
    /// Copies every regular file under `src` (recursively, symbolic links skipped) to
    /// `root/rel`. A missing `src` is an empty tree.
    fn copy_tree(&mut self, src: &Path, rel: &str) -> Result<(), BackupError> {
        if !src.is_dir() {
            return Ok(());
        }
        let mut stack = vec![(src.to_owned(), rel.to_owned())];
        while let Some((dir, rel)) = stack.pop() {
            let target = self.root.join(&rel);
            make_dirs(&target, BACKUP_DIR_MODE)?;
            let mut entries: Vec<fs::DirEntry> = fs::read_dir(&dir)
                .map_err(io_err(&dir, "reading folder"))?
                .collect::<Result<_, _>>()
                .map_err(io_err(&dir, "reading folder"))?;
            entries.sort_by_key(fs::DirEntry::file_name);
            for e in entries {
                let path = e.path();
                let name = e.file_name();
                let Some(name) = name.to_str() else {
                    return Err(BackupError::Refused(format!(
                        "{}: the file name is not UTF-8; rename it, then back up again",
                        path.display()
                    )));
                };
                let ft = e.file_type().map_err(io_err(&path, "reading file type"))?;
                let child = format!("{rel}/{name}");
                if ft.is_dir() {
                    stack.push((path, child));
                } else if ft.is_file() {
                    let (size, sha256) = copy_file(&path, &self.root.join(&child))?;
                    self.entries.push(ManifestEntry {
                        path: child,
                        size,
                        sha256,
                    });
                }
            }
            sync_dir(&target)?;
        }
        Ok(())
    }

    fn write_file(&mut self, rel: &str, bytes: &[u8]) -> Result<(), BackupError> {
        let path = self.root.join(rel);
        crate::archive::write_durable(&path, bytes, BACKUP_FILE_MODE).map_err(|e| {
            BackupError::Io {
                path: e.path,
                what: "writing",
                source: e.source,
            }
        })?;
        self.entries.push(ManifestEntry {
            path: rel.to_owned(),
            size: bytes.len() as u64,
            sha256: crate::store::sha256_hex(bytes),
        });
        Ok(())
    }
}

/// Copies `src` to the new file `dst` (mode 0600, fsync'd), hashing what was written.
fn copy_file(src: &Path, dst: &Path) -> Result<(u64, String), BackupError> {
    let mut input = fs::File::open(src).map_err(io_err(src, "opening"))?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(BACKUP_FILE_MODE)
        .open(dst)
        .map_err(io_err(dst, "creating"))?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io_err(src, "reading"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(dst, "writing"))?;
        size += n as u64;
    }
    out.sync_all().map_err(io_err(dst, "syncing"))?;
    Ok((size, hex(&hasher.finish())))
}

/// Size and SHA-256 of a file.
fn hash_file(path: &Path) -> Result<(u64, String), BackupError> {
    let mut input = fs::File::open(path).map_err(io_err(path, "opening"))?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io_err(path, "reading"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&hasher.finish())))
}

fn make_dirs(dir: &Path, mode: u32) -> Result<(), BackupError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err(dir, "creating folder"))
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "syncing folder"))
}

// ---------------------------------------------------------------------------
// verify and restore

/// Reads `src`'s manifest and checks every file it lists (size and SHA-256), and that
/// the database and `backup.json` are among them.
///
/// # Errors
///
/// [`BackupError::Corrupt`] naming the first bad file or line.
pub fn verify(src: &Path) -> Result<Vec<ManifestEntry>, BackupError> {
    let corrupt = |file: &str, problem: String| BackupError::Corrupt {
        src: src.to_owned(),
        file: file.to_owned(),
        problem,
    };
    let manifest_path = src.join(MANIFEST);
    let file = fs::File::open(&manifest_path).map_err(|e| {
        corrupt(
            MANIFEST,
            format!("cannot be read ({e}): not a complete pecgate backup"),
        )
    })?;
    let mut entries = Vec::new();
    for (i, line) in io::BufReader::new(file).lines().enumerate() {
        let where_ = format!("{MANIFEST} line {}", i + 1);
        let line = line.map_err(|e| corrupt(&where_, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let e: ManifestEntry =
            serde_json::from_str(&line).map_err(|e| corrupt(&where_, e.to_string()))?;
        if !safe_relative(&e.path) {
            return Err(corrupt(&where_, format!("unsafe path {:?}", e.path)));
        }
        entries.push(e);
    }
    for required in [DATABASE, INFO] {
        if !entries.iter().any(|e| e.path == required) {
            return Err(corrupt(required, format!("missing from {MANIFEST}")));
        }
    }
    for e in &entries {
        let path = src.join(&e.path);
        let (size, sha) = hash_file(&path).map_err(|err| corrupt(&e.path, err.to_string()))?;
        if size != e.size {
            return Err(corrupt(
                &e.path,
                format!("{size} bytes, the manifest says {}", e.size),
            ));
        }
        if sha != e.sha256 {
            return Err(corrupt(
                &e.path,
                format!("SHA-256 {sha}, the manifest says {}", e.sha256),
            ));
        }
    }
    Ok(entries)
}

/// A relative path of normal components only (no `..`, no root, no `.`).
fn safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\\')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Where a backup file goes back to, by the configuration; `None` for the database
/// and `backup.json` (handled apart).
fn target(config: &Config, rel: &str) -> Result<Option<PathBuf>, String> {
    if rel == DATABASE || rel == INFO {
        return Ok(None);
    }
    if let Some(rest) = rel.strip_prefix(&format!("{ARCHIVE_DIR}/")) {
        return Ok(Some(config.store.archive.join(rest)));
    }
    if let Some(rest) = rel.strip_prefix(&format!("{MAILBOX_DIR}/")) {
        let mut parts = rest.splitn(3, '/');
        let (Some(name), Some(tree), Some(rest)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("{rel}: not in a mailbox's sent or inbox folder"));
        };
        let Some(mb) = config.mailboxes.get(name) else {
            return Err(format!(
                "{rel}: mailbox {name:?} is not in the configuration (add [mailbox.{name}] \
                 with its folders, then restore)"
            ));
        };
        return match tree {
            "sent" => Ok(Some(mb.sent.join(rest))),
            "inbox" => Ok(Some(mb.inbox.join(rest))),
            other => Err(format!("{rel}: unknown mailbox folder {other:?}")),
        };
    }
    Err(format!("{rel}: not a file pecgate backs up"))
}

/// Whether another process has the SQLite database open (the daemon, or a command):
/// an exclusive lock is tried without waiting.
///
/// # Errors
///
/// The file cannot be opened at all.
pub fn database_in_use(path: &Path) -> Result<bool, BackupError> {
    let p = path.display().to_string();
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Sqlite {
        path: p.clone(),
        op: "lock probe: open",
        source,
    })?;
    let probe = conn
        .busy_timeout(std::time::Duration::ZERO)
        .and_then(|()| conn.pragma_update(None, "locking_mode", "EXCLUSIVE"))
        .and_then(|()| conn.execute_batch("BEGIN EXCLUSIVE; ROLLBACK;"));
    let _ = conn.close();
    match probe {
        Ok(()) => Ok(false),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Ok(true)
        }
        Err(source) => Err(StoreError::Sqlite {
            path: p,
            op: "lock probe",
            source,
        }
        .into()),
    }
}

/// Puts the backup in `src` back to the paths of `config`: checks every file first,
/// refuses while the database is in use, refuses to replace an existing database or a
/// different file without `force`, never deletes anything, writes the trees, then the
/// database.
///
/// # Errors
///
/// [`BackupError::Corrupt`] (nothing touched), [`BackupError::Refused`], file-system
/// failures.
pub fn restore(config: &Config, src: &Path, force: bool) -> Result<RestoreSummary, BackupError> {
    let entries = verify(src)?;
    let info_path = src.join(INFO);
    let info: BackupInfo = fs::read(&info_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|problem| BackupError::Corrupt {
            src: src.to_owned(),
            file: INFO.to_owned(),
            problem,
        })?;
    if info.format != FORMAT {
        return Err(BackupError::Refused(format!(
            "{}: backup format {} is unknown to this pecgate (it knows {FORMAT})",
            info_path.display(),
            info.format
        )));
    }
    if i64::from(info.schema_version) > i64::from(crate::store::SCHEMA_VERSION) {
        return Err(BackupError::Refused(format!(
            "{}: the database has schema version {}, newer than this pecgate knows ({}); \
             restore with the pecgate that wrote it ({})",
            info_path.display(),
            info.schema_version,
            crate::store::SCHEMA_VERSION,
            info.pecgate_version
        )));
    }
    let database = &config.store.database;
    let wal = sidecar(database, "-wal");
    let shm = sidecar(database, "-shm");
    if database.exists() {
        if database_in_use(database)? {
            return Err(BackupError::Refused(format!(
                "database {}: in use by another process (the daemon?); stop it first \
                 (systemctl stop pecgate), then restore",
                database.display()
            )));
        }
        if !force {
            return Err(BackupError::Refused(format!(
                "database {} exists; restoring replaces it: stop the daemon, make sure it is \
                 the database you mean to replace, then run restore with --force",
                database.display()
            )));
        }
    }
    // Plan every file before writing any.
    let mut plan = Vec::new();
    let mut unchanged = 0;
    for e in &entries {
        let Some(dst) = target(config, &e.path).map_err(BackupError::Refused)? else {
            continue;
        };
        if dst.exists() {
            let same = hash_file(&dst)
                .map(|(size, sha)| size == e.size && sha == e.sha256)
                .unwrap_or(false);
            if same {
                unchanged += 1;
                continue;
            }
            if !force {
                return Err(BackupError::Refused(format!(
                    "{}: exists with other content than the backup's {}; nothing was restored \
                     (--force replaces it)",
                    dst.display(),
                    e.path
                )));
            }
        }
        plan.push((e, dst));
    }
    let mut summary = RestoreSummary {
        unchanged,
        ..RestoreSummary::default()
    };
    let mut folders = std::collections::BTreeSet::new();
    for (e, dst) in plan {
        put_back(src, &dst, e)?;
        if let Some(parent) = dst.parent() {
            folders.insert(parent.to_owned());
        }
        summary.written += 1;
        summary.bytes += e.size;
    }
    // The new entries are durable once their folders are synced (once each).
    for folder in &folders {
        sync_dir(folder)?;
    }
    // The database last.
    let db_entry =
        entries
            .iter()
            .find(|e| e.path == DATABASE)
            .ok_or_else(|| BackupError::Corrupt {
                src: src.to_owned(),
                file: DATABASE.to_owned(),
                problem: format!("missing from {MANIFEST}"),
            })?;
    if let Some(parent) = database.parent() {
        make_dirs(parent, RESTORE_DIR_MODE)?;
    }
    let tmp = sidecar(database, &format!(".restore-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let (size, sha) = copy_file(&src.join(DATABASE), &tmp)?;
    if size != db_entry.size || sha != db_entry.sha256 {
        let _ = fs::remove_file(&tmp);
        return Err(BackupError::Corrupt {
            src: src.to_owned(),
            file: DATABASE.to_owned(),
            problem: "changed while it was being restored".into(),
        });
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(RESTORE_FILE_MODE))
        .map_err(io_err(&tmp, "setting permissions"))?;
    // Letters `queued` in the backup may have been sent after it: the
    // restored database holds sending until every mailbox has been read
    // again (the acceptances of such letters then mark them accepted).
    // Written into the copy before it is put in place, so that a restored
    // database never lacks it.
    let held = (|| -> Result<(), StoreError> {
        let mut db = crate::store::Db::open(&tmp)?;
        crate::outbound::hold_until_sync(&mut db, config, "restore", Timestamp::now())?;
        db.close()
    })();
    if let Err(e) = held {
        for p in [sidecar(&tmp, "-wal"), sidecar(&tmp, "-shm"), tmp.clone()] {
            let _ = fs::remove_file(p);
        }
        return Err(e.into());
    }
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp, "syncing the restored database"))?;
    for side in [&wal, &shm] {
        match fs::remove_file(side) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(side, "removing the old database's journal")(e)),
        }
    }
    fs::rename(&tmp, database).map_err(io_err(database, "putting the database in place"))?;
    if let Some(parent) = database.parent() {
        sync_dir(parent)?;
    }
    summary.written += 1;
    summary.bytes += size;
    Ok(summary)
}

/// `<path><suffix>`, e.g. the `-wal` file of a database.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Copies one verified backup file (of the backup `src`) to its place: temporary file,
/// fsync, rename (the caller syncs the folder).
fn put_back(src: &Path, dst: &Path, e: &ManifestEntry) -> Result<(), BackupError> {
    let parent = dst.parent().unwrap_or(Path::new("."));
    make_dirs(parent, RESTORE_DIR_MODE)?;
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.restore-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let (size, sha) = copy_file(&src.join(&e.path), &tmp)?;
    if size != e.size || sha != e.sha256 {
        let _ = fs::remove_file(&tmp);
        return Err(BackupError::Corrupt {
            src: src.to_owned(),
            file: e.path.clone(),
            problem: "changed while it was being restored".into(),
        });
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(RESTORE_FILE_MODE))
        .map_err(io_err(&tmp, "setting permissions"))?;
    fs::rename(&tmp, dst).map_err(io_err(dst, "putting in place"))
}

// ---------------------------------------------------------------------------
// scheduled backups

/// What [`run_scheduled`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheduled {
    /// The configuration has no `[backup]`.
    NotConfigured,
    /// The newest backup is recent enough; the next one is due at `next`.
    NotDue {
        /// When the next backup is due.
        next: Timestamp,
    },
    /// A backup was written and old ones removed.
    Done {
        /// The new backup.
        summary: BackupSummary,
        /// Backups deleted by retention (`keep`).
        removed: Vec<PathBuf>,
    },
}

/// The complete scheduled backups in `dir` (those with a manifest), oldest first,
/// with the time in their name.
///
/// # Errors
///
/// `dir` exists but cannot be read.
pub fn scheduled_backups(dir: &Path) -> Result<Vec<(Timestamp, PathBuf)>, BackupError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir, "reading the backup folder")(e)),
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(stamp) = name.to_str().and_then(|n| n.strip_prefix(SCHEDULED_PREFIX)) else {
            continue;
        };
        let Ok(at) = jiff::fmt::strtime::parse("%Y%m%dT%H%M%SZ", stamp)
            .and_then(|t| t.to_datetime())
            .and_then(|d| d.in_tz("UTC"))
        else {
            continue;
        };
        if e.path().join(MANIFEST).is_file() {
            out.push((at.timestamp(), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The scheduled backup: when `[backup]` is configured and the newest complete backup
/// in `[backup] dir` is at least `every_hours` old (or there is none), writes a new
/// one into `dir/pecgate-YYYYMMDDTHHMMSSZ/` (through a `.partial-…` directory renamed
/// when complete), then keeps only the newest `keep`. Blocking and slow (it copies the
/// trees): the daemon calls it from a blocking thread, e.g. every 10 minutes; it opens
/// its own read-only connection, never the store thread's.
///
/// # Errors
///
/// Any backup failure (logged at error level as `backup.failed` too); the incomplete
/// directory is removed.
pub fn run_scheduled(config: &Config, now: Timestamp) -> Result<Scheduled, BackupError> {
    let Some(cfg) = &config.backup else {
        return Ok(Scheduled::NotConfigured);
    };
    let result = scheduled(config, &cfg.dir, cfg.every, cfg.keep, now);
    match &result {
        Ok(Scheduled::Done { summary, removed }) => info!(
            { field::EVENT } = event::BACKUP_COMPLETED,
            { field::PATH } = %summary.dest.display(),
            files = summary.files,
            bytes = summary.bytes,
            removed = removed.len(),
            "backup written"
        ),
        Ok(_) => {}
        Err(e) => error!(
            { field::EVENT } = event::BACKUP_FAILED,
            { field::PATH } = %cfg.dir.display(),
            { field::ERROR } = %e,
            "scheduled backup failed"
        ),
    }
    result
}

fn scheduled(
    config: &Config,
    dir: &Path,
    every: std::time::Duration,
    keep: u32,
    now: Timestamp,
) -> Result<Scheduled, BackupError> {
    let every = SignedDuration::try_from(every).unwrap_or(SignedDuration::MAX);
    let existing = scheduled_backups(dir)?;
    if let Some((last, _)) = existing.last()
        && let Ok(next) = last.checked_add(every)
        && now < next
    {
        return Ok(Scheduled::NotDue { next });
    }
    make_dirs(dir, BACKUP_DIR_MODE)?;
    // Leftovers of an interrupted run (ours only: the prefix).
    for e in fs::read_dir(dir)
        .map_err(io_err(dir, "reading the backup folder"))?
        .filter_map(Result::ok)
    {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PARTIAL_PREFIX))
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let stamp = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let partial = dir.join(format!("{PARTIAL_PREFIX}{stamp}"));
    let done = dir.join(format!("{SCHEDULED_PREFIX}{stamp}"));
    let summary = match backup(config, &partial, now) {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    fs::rename(&partial, &done).map_err(io_err(&done, "naming the finished backup"))?;
    sync_dir(dir)?;
    let summary = BackupSummary {
        dest: done,
        ..summary
    };
    let all = scheduled_backups(dir)?;
    let excess = all.len().saturating_sub(keep as usize);
    let mut removed = Vec::new();
    for (_, old) in all.into_iter().take(excess) {
        fs::remove_dir_all(&old).map_err(io_err(&old, "removing an old backup"))?;
        removed.push(old);
    }
    Ok(Scheduled::Done { summary, removed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_must_stay_inside() {
        assert!(safe_relative("archive/ab/cd/x.eml"));
        assert!(safe_relative(DATABASE));
        for bad in ["", "/etc/passwd", "../x", "archive/../../x", "./x", "a\\b"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }
}
