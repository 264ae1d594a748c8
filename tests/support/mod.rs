//! Helpers shared by the integration tests: where the fixtures are, how to
//! walk them, and what `pecgate inspect --json` says about one of them,
//! computed with the library (the oracle the golden files are compared to).
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pecgate::cli::{inspection_json, read_message_file, render_error};
use pecgate::pec::inspect::inspect;
use serde_json::Value;

/// The keys of an `inspect --json` object for a message.
pub const INSPECTION_KEYS: &[&str] = &[
    "file",
    "kind",
    "x_ricevuta",
    "refers_to",
    "daticert",
    "problems",
];

/// The keys of an `inspect --json` object for a file that could not be read.
pub const ERROR_KEYS: &[&str] = &["file", "error"];

/// The keys of the `daticert` object.
pub const DATICERT_KEYS: &[&str] = &[
    "tipo",
    "errore",
    "mittente",
    "destinatari",
    "risposte",
    "oggetto",
    "gestore_emittente",
    "data",
    "identificativo",
    "msgid",
    "ricevuta",
    "consegna",
    "ricezione",
    "errore_esteso",
    "errore_code",
];

/// `<crate>/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The shared directory holding the fixtures that stay outside the repository
/// (AGPL, personal data): `$PECGATE_SHARED_DIR`, else `<crate>/../shared`.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("PECGATE_SHARED_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("shared"),
    }
}

/// Every `.eml` file below `dir`, recursively, sorted by path.
pub fn eml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .unwrap_or_else(|e| panic!("cannot read directory {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "eml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `path` relative to `base`, with forward slashes.
pub fn relative(path: &Path, base: &Path) -> String {
    let rel = path
        .strip_prefix(base)
        .unwrap_or_else(|_| panic!("{} is not below {}", path.display(), base.display()));
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// What `pecgate inspect --json` prints for the file at `path`, computed with
/// the library, with `"file"` set to `name`.
pub fn library_json(path: &Path, name: &str) -> Value {
    let shown = Path::new(name);
    let line = match read_message_file(path) {
        Err(e) => render_error(shown, &e, true),
        Ok(raw) => match inspect(&raw) {
            Ok(ins) => return inspection_json(shown, &ins),
            Err(e) => render_error(shown, &e.to_string(), true),
        },
    };
    serde_json::from_str(&line).expect("render_error gives JSON")
}

/// The golden file of a fixture: the `.json` next to the `.eml`.
pub fn golden_path(eml: &Path) -> PathBuf {
    eml.with_extension("json")
}

/// Reads and parses a golden file.
pub fn read_golden(eml: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(golden_path(eml)).ok()?;
    Some(
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", golden_path(eml).display())),
    )
}

/// The golden form of a value: pretty JSON (2-space indent) and a final newline.
pub fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("a Value serialises");
    s.push('\n');
    s
}

/// The sorted key names of a JSON object (panics on anything else).
pub fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

/// `wanted`, sorted, for comparison with [`keys`].
pub fn sorted(wanted: &[&'static str]) -> Vec<&'static str> {
    let mut k = wanted.to_vec();
    k.sort_unstable();
    k
}
