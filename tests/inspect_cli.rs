//! `pecgate inspect` as a user runs it: the real binary, its output format
//! and its exit status (0 all clean, 1 some problem, 2 some file unreadable or
//! not a mail message; 2 wins).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    DATICERT_KEYS, ERROR_KEYS, INSPECTION_KEYS, eml_files, fixtures_dir, keys, read_golden,
    relative, sorted,
};

fn pecgate(args: &[&Path]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pecgate"));
    cmd.env_remove("PECGATE_CONFIG")
        .env("PECGATE_LOG_LEVEL", "warn");
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("run pecgate")
}

fn inspect_json(paths: &[&Path]) -> Output {
    let mut args: Vec<&Path> = vec![Path::new("inspect"), Path::new("--json")];
    args.extend_from_slice(paths);
    pecgate(&args)
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

fn lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

/// Copies the `.eml` fixtures (except `broken/`) into `dst`, keeping their
/// relative paths; returns (copy, path relative to fixtures/).
fn copy_fixtures(dst: &Path, with_broken: bool) -> Vec<(PathBuf, String)> {
    let base = fixtures_dir();
    let mut out = Vec::new();
    for src in eml_files(&base) {
        let rel = relative(&src, &base);
        if rel.starts_with("broken/") && !with_broken {
            continue;
        }
        let to = dst.join(&rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&src, &to).expect("copy fixture");
        out.push((to, rel));
    }
    out
}

fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

fn golden(rel: &str) -> Value {
    read_golden(&fixture(rel)).unwrap_or_else(|| panic!("no golden file for {rel}"))
}

fn has_problems(v: &Value) -> bool {
    v["problems"].as_array().is_some_and(|p| !p.is_empty())
}

#[test]
fn json_over_the_fixture_tree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let copies = copy_fixtures(tmp.path(), false);
    let out = inspect_json(&[tmp.path()]);
    let objects = lines(&out);
    assert_eq!(
        objects.len(),
        copies.len(),
        "one line per file:\n{}",
        stdout(&out)
    );
    // Directories are walked recursively in name order.
    let mut expected_order: Vec<&(PathBuf, String)> = copies.iter().collect();
    expected_order.sort_by(|a, b| a.0.cmp(&b.0));
    for (obj, (copy, rel)) in objects.iter().zip(expected_order) {
        assert_eq!(
            obj["file"].as_str(),
            Some(copy.display().to_string().as_str())
        );
        assert_eq!(keys(obj), sorted(INSPECTION_KEYS), "{rel}: keys");
        if !obj["daticert"].is_null() {
            assert_eq!(
                keys(&obj["daticert"]),
                sorted(DATICERT_KEYS),
                "{rel}: daticert keys"
            );
        }
        // The binary says what the library says (the golden file).
        let mut want = golden(rel);
        want["file"] = obj["file"].clone();
        assert_eq!(*obj, want, "{rel}: binary and golden file differ");
    }
    assert!(
        objects.iter().any(has_problems),
        "the corpus has problem cases"
    );
    assert_eq!(code(&out), 1, "some problems, nothing unreadable: exit 1");
}

#[test]
fn clean_files_exit_zero() {
    let base = fixtures_dir();
    let clean: Vec<PathBuf> = eml_files(&base)
        .into_iter()
        .filter(|p| {
            let g = read_golden(p).expect("golden file");
            g.get("error").is_none() && !has_problems(&g)
        })
        .collect();
    assert!(clean.len() >= 30, "only {} clean fixtures", clean.len());
    let args: Vec<&Path> = clean.iter().map(PathBuf::as_path).collect();
    let out = inspect_json(&args);
    let objects = lines(&out);
    assert_eq!(objects.len(), clean.len());
    assert!(objects.iter().all(|o| !has_problems(o)));
    assert_eq!(code(&out), 0, "{}", stdout(&out));
}

#[test]
fn unreadable_or_not_a_message_wins() {
    let problem = fixture("synthetic/40-problem-tipo-mismatch.eml");
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("does-not-exist.eml");

    // A missing file after a problem file: 2, and the problem is still reported.
    let out = inspect_json(&[&problem, &missing]);
    let objects = lines(&out);
    assert_eq!(objects.len(), 2);
    assert!(has_problems(&objects[0]));
    assert_eq!(keys(&objects[1]), sorted(ERROR_KEYS));
    assert_eq!(
        objects[1]["file"].as_str(),
        Some(missing.display().to_string().as_str())
    );
    assert_eq!(code(&out), 2);

    // A file that is not a mail message before a problem file: 2.
    let empty = fixture("broken/01-empty.eml");
    let out = inspect_json(&[&empty, &problem]);
    let objects = lines(&out);
    assert_eq!(objects.len(), 2);
    assert_eq!(keys(&objects[0]), sorted(ERROR_KEYS));
    assert!(objects[0]["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(has_problems(&objects[1]));
    assert_eq!(code(&out), 2);

    // The whole tree, broken files included: 2, one line per file.
    let copies = copy_fixtures(tmp.path(), true);
    let out = inspect_json(&[tmp.path()]);
    assert_eq!(lines(&out).len(), copies.len());
    assert_eq!(code(&out), 2);
}

#[test]
fn human_output_has_a_block_per_file() {
    let rels = [
        "synthetic/01-accettazione.eml",
        "synthetic/16-busta-anomalia.eml",
        "synthetic/23-subject-rfc2047.eml",
        "synthetic/42-problem-daticert-truncated.eml",
        "public/fabioportieri-java-pec-parser/aruba-2023-busta.eml",
    ];
    let paths: Vec<PathBuf> = rels.iter().map(|r| fixture(r)).collect();
    let mut args: Vec<&Path> = vec![Path::new("inspect")];
    args.extend(paths.iter().map(PathBuf::as_path));
    let out = pecgate(&args);
    let text = stdout(&out);
    // A block starts with the file name on an unindented line.
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if line.starts_with(' ') {
            blocks.last_mut().expect("a block is open").push(line);
        } else {
            blocks.push(vec![line]);
        }
    }
    assert_eq!(blocks.len(), rels.len(), "{text}");
    for ((block, path), rel) in blocks.iter().zip(&paths).zip(rels) {
        assert_eq!(block[0], path.display().to_string());
        let kind = golden(rel)["kind"].as_str().expect("kind").to_owned();
        let kind_line = block.iter().find(|l| l.trim_start().starts_with("kind:"));
        assert_eq!(
            kind_line.map(|l| l.split_whitespace().nth(1)),
            Some(Some(kind.as_str())),
            "{rel}: {block:#?}"
        );
    }
    // The RFC 2047 subject is shown decoded.
    assert!(
        text.contains("ACCETTAZIONE: Attività di verifica: è già pronta la relazione?"),
        "{text}"
    );
    assert_eq!(code(&out), 1);
}

#[test]
fn many_files_are_streamed() {
    const COPIES: usize = 3_000;
    let src =
        std::fs::read(fixture("synthetic/07-avvenuta-consegna-sintetica.eml")).expect("fixture");
    let tmp = tempfile::tempdir().expect("tempdir");
    for i in 0..COPIES {
        std::fs::write(tmp.path().join(format!("m{i:05}.eml")), &src).expect("write copy");
    }
    let started = Instant::now();
    let out = inspect_json(&[tmp.path()]);
    let elapsed = started.elapsed();
    let text = stdout(&out);
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["kind"], "avvenuta-consegna");
        let want = tmp.path().join(format!("m{i:05}.eml"));
        assert_eq!(
            v["file"].as_str(),
            Some(want.display().to_string().as_str())
        );
        n += 1;
    }
    assert_eq!(n, COPIES);
    assert_eq!(code(&out), 0);
    eprintln!("inspect --json over {COPIES} files: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "too slow: {elapsed:?}");
}

/// Memory stays bounded by the largest file, not by the number of files: 300
/// links to the ~300 KB fixture (90 MB in all) are inspected with a peak
/// resident set far below their total size. Linux only (reads /proc).
#[cfg(target_os = "linux")]
#[test]
fn memory_is_bounded_by_the_largest_file() {
    use std::io::Read;
    use std::process::Stdio;

    const LINKS: usize = 300;
    const LIMIT_KB: u64 = 32 * 1024;
    let src = fixture("synthetic/60-avvenuta-consegna-completa-large.eml");
    let size = std::fs::metadata(&src).expect("fixture").len();
    let tmp = tempfile::tempdir().expect("tempdir");
    for i in 0..LINKS {
        let to = tmp.path().join(format!("big{i:03}.eml"));
        if std::fs::hard_link(&src, &to).is_err() {
            std::fs::copy(&src, &to).expect("copy fixture");
        }
    }
    let total_kb = size * LINKS as u64 / 1024;
    assert!(
        total_kb > 2 * LIMIT_KB,
        "the input must be much larger than the limit"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_pecgate"))
        .args(["inspect", "--json"])
        .arg(tmp.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn pecgate");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).expect("read stdout");
        s
    });
    // VmHWM is the peak resident set so far: the last value read before the
    // process exits is (a lower bound of) its peak.
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let exit = loop {
        if let Ok(status) = std::fs::read_to_string(&status_file) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(kb) = hwm {
                peak_kb = peak_kb.max(kb);
            }
        }
        if let Some(exit) = child.try_wait().expect("wait pecgate") {
            break exit;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let text = reader.join().expect("reader thread");
    assert_eq!(text.lines().count(), LINKS);
    assert_eq!(exit.code(), Some(0));
    assert!(peak_kb > 0, "could not read VmHWM from {status_file}");
    eprintln!("inspect --json over {total_kb} KB in {LINKS} files: peak RSS {peak_kb} KB");
    assert!(
        peak_kb < LIMIT_KB,
        "peak RSS {peak_kb} KB for {total_kb} KB of input: files are not processed one at a time"
    );
}

#[test]
fn missing_file_is_named_in_the_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("ricevuta-mancante.eml");
    let out = pecgate(&[Path::new("inspect"), &missing]);
    let all = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains(&missing.display().to_string()), "{all}");
    assert!(all.contains("error"), "{all}");
    assert_eq!(code(&out), 2);

    let out = inspect_json(&[&missing]);
    let objects = lines(&out);
    assert_eq!(objects.len(), 1);
    assert_eq!(keys(&objects[0]), sorted(ERROR_KEYS));
    assert_eq!(
        objects[0]["file"].as_str(),
        Some(missing.display().to_string().as_str())
    );
    assert_eq!(code(&out), 2);
}
