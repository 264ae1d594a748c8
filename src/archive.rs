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

/// Creates a folder (and its parents under `root`) with mode 0750.
///
/// # Errors
/// File-system failures.
pub fn create_folder(root: &Path, dir: &Path) -> Result<(), ArchiveError> {
    if dir.is_dir() {
        return Ok(());
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
    for level in &new_levels {
        let _ = fs::set_permissions(level, fs::Permissions::from_mode(0o750));
        // Make the new entry durable in its parent: without this a power
        // cut could lose a whole sent folder whose store row is committed.
        if let Some(parent) = level.parent() {
            fs::File::open(parent)
                .and_then(|f| f.sync_all())
                .map_err(|e| ArchiveError {
                    path: parent.to_owned(),
                    source: e,
                })?;
        }
    }
    Ok(())
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
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir))
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
