//! The evidence archive: every raw message sent or received, stored once,
//! named by its SHA-256 (`archive/ab/cd/<sha256>.eml`), written with
//! fsync before anything is changed because of it, mode 0640.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    /// Path relative to the archive root (`ab/cd/<sha256>.eml`).
    pub relative: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// The archive could not be written.
#[derive(Debug, thiserror::Error)]
#[error("archive {path}: {source}")]
pub struct ArchiveError {
    /// The file or folder.
    pub path: PathBuf,
    /// The I/O error.
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError {
        path: path.to_owned(),
        source,
    }
}

/// Stores `bytes` under `root` (idempotent: an existing file with this name
/// is left as it is) and makes it durable: file and folder fsync'd.
///
/// # Errors
/// Any file-system failure.
pub fn store(root: &Path, bytes: &[u8]) -> Result<Archived, ArchiveError> {
    let sha = crate::store::sha256_hex(bytes);
    let relative = format!("{}/{}/{sha}.eml", &sha[..2], &sha[2..4]);
    let path = root.join(&relative);
    let size = bytes.len() as u64;
    if path.exists() {
        return Ok(Archived {
            sha256: sha,
            relative,
            path,
            size,
        });
    }
    let dir = path.parent().unwrap_or(root).to_owned();
    create_folder(root, &dir)?;
    write_durable(&path, bytes, 0o640)?;
    Ok(Archived {
        sha256: sha,
        relative,
        path,
        size,
    })
}

/// Creates a folder (and its parents under `root`) with mode 0750, and makes
/// every new level durable in its parent.
///
/// # Errors
/// File-system failures.
pub fn create_folder(root: &Path, dir: &Path) -> Result<(), ArchiveError> {
    for parent in create_folder_unsynced(root, dir)? {
        sync_folder(&parent)?;
    }
    Ok(())
}

/// Creates a folder (and its parents under `root`) with mode 0750 like
/// [`create_folder`], but returns the folders that must be fsync'd to make
/// the new levels durable (the parent of each new level) instead of syncing
/// them: a caller creating many folders syncs each parent once
/// ([`sync_all`]) before anything depends on them.
///
/// # Errors
/// File-system failures.
pub fn create_folder_unsynced(root: &Path, dir: &Path) -> Result<Vec<PathBuf>, ArchiveError> {
    if dir.is_dir() {
        return Ok(Vec::new());
    }
    // The levels that do not exist yet, deepest first.
    let mut new_levels = Vec::new();
    let mut d = dir.to_path_buf();
    while d.starts_with(root) && !d.is_dir() {
        new_levels.push(d.clone());
        if !d.pop() {
            break;
        }
    }
    fs::create_dir_all(dir).map_err(|e| ArchiveError {
        path: dir.to_owned(),
        source: e,
    })?;
    let mut parents = Vec::new();
    for level in &new_levels {
        let _ = fs::set_permissions(level, fs::Permissions::from_mode(0o750));
        // The new entry must be made durable in its parent: without that a
        // power cut could lose a whole sent folder whose store row is
        // committed.
        if let Some(parent) = level.parent() {
            parents.push(parent.to_owned());
        }
    }
    Ok(parents)
}

/// How many fsyncs [`sync_all`] issues at once. The file system's journal
/// (or the virtual disk's queue) serves concurrent fsyncs together: on the
/// benchmark VM eight at once cost 0.14 ms each instead of 0.31 ms.
pub const SYNC_THREADS: usize = 8;

/// Fsyncs every file and folder of `paths` (each once, duplicates skipped),
/// up to [`SYNC_THREADS`] at a time, and returns when all are durable. The
/// order among them does not matter: callers depend on the set as a whole
/// only after this returns.
///
/// # Errors
/// The first file or folder that could not be opened or synced (the others
/// are still tried).
pub fn sync_all(paths: &[PathBuf]) -> Result<(), ArchiveError> {
    let mut unique: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    unique.sort_unstable();
    unique.dedup();
    let threads = SYNC_THREADS.min(unique.len());
    if threads <= 1 {
        return unique.iter().try_for_each(|p| sync_path(p));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_error: std::sync::Mutex<Option<ArchiveError>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(path) = unique.get(i) else { break };
                    if let Err(e) = sync_path(path)
                        && let Ok(mut slot) = first_error.lock()
                    {
                        slot.get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(ArchiveError {
            path: PathBuf::from(unique[0]),
            source: std::io::Error::other("fsync worker failed"),
        }),
    }
}

/// Fsyncs one file or folder (opened read-only: Linux syncs the inode
/// whatever the open mode).
fn sync_path(path: &Path) -> Result<(), ArchiveError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(err(path))
}

/// Writes a file durably: temporary file, write_all, fsync, rename, fsync
/// of the folder. The file gets `mode`.
///
/// # Errors
/// Any file-system failure.
pub fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ArchiveError> {
    write_file(path, bytes, mode, Durability::FileAndFolder)
}

/// Writes a file atomically and fsyncs it, but not its folder: for several
/// files written into one folder, followed by one [`sync_folder`].
///
/// # Errors
/// Any file-system failure.
pub fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ArchiveError> {
    write_file(path, bytes, mode, Durability::File)
}

/// Fsyncs a folder (makes the entries created in it durable).
///
/// # Errors
/// The folder cannot be opened or synced.
pub fn sync_folder(dir: &Path) -> Result<(), ArchiveError> {
    sync_path(dir)
}

/// Writes a file atomically (temporary file, rename) with `mode`, without
/// fsync: for files derived from durable state (status files).
///
/// # Errors
/// Any file-system failure.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ArchiveError> {
    write_file(path, bytes, mode, Durability::None)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    None,
    File,
    FileAndFolder,
}

fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> Result<(), ArchiveError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut suffix = [0u8; 6];
    let _ = openssl::rand::rand_bytes(&mut suffix);
    let tmp = dir.join(format!(
        ".{name}.{}.tmp",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err(&tmp))?;
    let result = f
        .write_all(bytes)
        .and_then(|()| {
            if durability == Durability::None {
                Ok(())
            } else {
                f.sync_all()
            }
        })
        .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(path)(e));
    }
    if durability != Durability::FileAndFolder {
        return Ok(());
    }
    sync_folder(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_once_by_hash_with_restrictive_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = store(dir.path(), b"hello").unwrap();
        assert_eq!(
            a.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(a.relative, format!("2c/f2/{}.eml", a.sha256));
        assert_eq!(fs::read(&a.path).unwrap(), b"hello");
        let mode = fs::metadata(&a.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let b = store(dir.path(), b"hello").unwrap();
        assert_eq!(a, b);
        // No temporary file is left behind.
        let leftovers: Vec<_> = fs::read_dir(a.path.parent().unwrap())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
