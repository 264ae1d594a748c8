//! The PEC core stays pure: nothing under `src/pec/` may name an I/O crate
//! or the file system / network modules of std (STYLE.md §2).

use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "tokio",
    "openssl",
    "rusqlite",
    "lettre",
    "async_imap",
    "std::fs",
    "std::net",
    "SystemTime::now",
    "Timestamp::now",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/pec is readable") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn pec_core_names_no_io() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/pec");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() >= 5,
        "expected the pec modules under {}",
        root.display()
    );
    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            // Documentation may say what the core must not use.
            if line.trim_start().starts_with("//") {
                continue;
            }
            for word in FORBIDDEN {
                if line.contains(word) {
                    offences.push(format!("{}:{}: names `{word}`", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "the PEC core must stay pure:\n{}",
        offences.join("\n")
    );
}
