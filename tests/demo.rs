//! `pecgate demo` (issue 8, the README's first command): the real binary,
//! `--exit-when-done`, twice in the same directory. Each run must exit 0
//! with every sample letter in its expected final state — read back with
//! `pecgate list --json` from the demo's own store — its receipts filed in
//! its sent folder, the refused letter in `outbox/rejected/`, and nothing
//! left running.
//!
//! Dovecot must be installed (see tests/sandbox_support).

#[path = "sandbox_support/mod.rs"]
mod sandbox_support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sandbox_support::{GIULIA, MARIO, PAOLO, dovecot_instance, processes_mentioning};
use serde_json::Value;

/// Runs `pecgate demo --dir DIR --exit-when-done --timeout 120`.
fn run_demo(dir: &Path) -> Output {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_pecgate"))
        .args(["demo", "--dir"])
        .arg(dir)
        .args(["--exit-when-done", "--timeout", "120"])
        .env_remove("PECGATE_CONFIG")
        .env_remove("PECGATE_LOG_LEVEL")
        .env_remove("PECGATE_LOG_FORMAT")
        .stdin(Stdio::null())
        .output()
        .expect("run pecgate demo");
    eprintln!("pecgate demo took {:?}", started.elapsed());
    out
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The run's tag, from the first line (`pecgate demo TAG: ...`).
fn tag_of(stdout: &str) -> String {
    let first = stdout.lines().next().unwrap_or_default();
    first
        .strip_prefix("pecgate demo ")
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("first line names the run: {first:?}"))
        .to_owned()
}

/// `pecgate --config DIR/pecgate.toml list --json`, by reference.
fn letters(dir: &Path) -> BTreeMap<String, Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_pecgate"))
        .arg("--config")
        .arg(dir.join("pecgate.toml"))
        .args(["list", "--json"])
        .env_remove("PECGATE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run pecgate list");
    assert!(out.status.success(), "pecgate list: {}", text(&out));
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .map(|v| (v["reference"].as_str().unwrap_or_default().to_owned(), v))
        .collect()
}

fn recipient_state(letter: &Value, address: &str) -> String {
    letter["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .find(|r| r["address"] == address)
        .unwrap_or_else(|| panic!("{address} in {letter}"))["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn receipts(letter: &Value) -> Vec<String> {
    let dir = Path::new(letter["sent_dir"].as_str().expect("sent_dir"));
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".eml") && !n.starts_with("00-"))
        .collect();
    names.sort();
    names
}

/// Checks one run's letters, refusal, table and log.
fn check_run(dir: &Path, out: &Output) -> String {
    let all = text(out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tag = tag_of(&stdout);
    assert!(stdout.contains("every letter is final"), "{all}");
    let by_ref = letters(dir);
    let get = |suffix: &str| {
        by_ref
            .get(&format!("demo-{tag}-{suffix}"))
            .unwrap_or_else(|| panic!("letter {suffix} of run {tag} in the store: {all}"))
    };

    // The certificate: delivered, acceptance and delivery receipt filed,
    // the PDF copied to the sent folder.
    let cert = get("certificato");
    assert_eq!(cert["state"], "delivered", "{cert}");
    assert_eq!(recipient_state(cert, MARIO), "delivered");
    assert_eq!(
        receipts(cert),
        [
            "01-accettazione.eml".to_owned(),
            format!("02-avvenuta-consegna-{MARIO}.eml")
        ]
    );
    let pdf = Path::new(cert["sent_dir"].as_str().unwrap())
        .join(format!("demo-{tag}-certificato-residenza-rossi.pdf"));
    assert!(
        fs::read(&pdf).unwrap_or_default().starts_with(b"%PDF-1.4"),
        "{}",
        pdf.display()
    );

    // The registered letter: the ordinary cc is external and does not
    // count, so the letter is delivered (docs/state-machine.md, aggregation).
    let racc = get("raccomandata");
    assert_eq!(racc["kind"], "raccomandata");
    assert_eq!(recipient_state(racc, GIULIA), "delivered");
    assert_eq!(recipient_state(racc, PAOLO), "external");
    assert_eq!(racc["state"], "delivered", "{racc}");
    assert!(receipts(racc).contains(&format!("02-avvenuta-consegna-{GIULIA}.eml")));

    // The unknown address: errore-consegna, failed.
    let unknown = get("sconosciuto");
    assert_eq!(unknown["state"], "failed", "{unknown}");
    assert!(
        receipts(unknown)
            .iter()
            .any(|n| n.contains("errore-consegna")),
        "{:?}",
        receipts(unknown)
    );

    // The mass mailing: three letters, all delivered.
    for n in ["000123", "000124", "000125"] {
        let l = get(&format!("tari-{n}"));
        assert_eq!(l["state"], "delivered", "{l}");
        assert_eq!(l["kind"], "tributi");
        assert!(l["subject"].as_str().unwrap().contains(n), "{l}");
    }
    let ours = by_ref
        .keys()
        .filter(|r| r.starts_with(&format!("demo-{tag}-")))
        .count();
    assert_eq!(ours, 6, "exactly the six letters of this run: {all}");

    // The refused letter: untouched in outbox/rejected/NAME/ with its error
    // file, which names the missing document; the table shows its first line.
    let stem = format!("demo-{tag}-mancante");
    let folder = dir.join("outbox").join("rejected").join(&stem);
    let error = fs::read_to_string(folder.join(format!("{stem}.error.txt")))
        .unwrap_or_else(|e| panic!("{}: {e}\n{all}", folder.display()));
    let first = error.lines().next().unwrap();
    assert!(first.contains("LETTER NOT SENT"), "{first}");
    assert!(
        error.contains(&format!("demo-{tag}-determina.pdf")),
        "{error}"
    );
    assert!(folder.join(format!("{stem}.toml")).is_file());
    assert!(
        stdout.contains(first),
        "the table shows the error's first line: {all}"
    );

    // The table names each letter with its state and proof files.
    for (label, state) in [
        ("certificato", "delivered"),
        ("raccomandata", "delivered"),
        ("sconosciuto", "failed"),
        ("tari 000124", "delivered"),
        ("mancante", "rejected"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(label) && l.contains(state)),
            "table line {label} {state}: {all}"
        );
    }
    assert!(stdout.contains("receipt: 01-accettazione.eml"), "{all}");
    assert!(stdout.contains("sent folder: sent/"), "{all}");
    tag
}

#[test]
fn demo_runs_to_the_end_twice_in_the_same_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");

    let first = run_demo(&dir);
    let dir = dir.canonicalize().expect("the demo made its directory");
    let tag1 = check_run(&dir, &first);

    // A second run in the same directory: the sandbox reuses its
    // certificates, the letters are new (no duplicate refusal).
    let second = run_demo(&dir);
    let tag2 = check_run(&dir, &second);
    assert_ne!(tag1, tag2);
    assert_eq!(letters(&dir).len(), 12, "both runs' letters are kept");

    // Stopped cleanly both times: the daemon logged its stop, and no
    // process of this directory is left (gateway, Dovecot).
    let log = fs::read_to_string(dir.join("pecgate.log")).expect("DIR/pecgate.log");
    let stopped = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["event"] == "daemon.stopped")
        .count();
    assert_eq!(stopped, 2, "the gateway stopped cleanly twice:\n{log}");
    let instance = dovecot_instance(&dir);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = processes_mentioning(&dir.display().to_string())
            .into_iter()
            .chain(processes_mentioning(&instance))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
