//! Golden tests of `pecgate inspect --json` over every `.eml` under
//! `fixtures/` (public upstream samples, the synthetic corpus, broken files).
//!
//! Each `X.eml` has a sibling `X.json` with the expected object, `"file"`
//! being the path relative to `fixtures/`. On a mismatch the actual object is
//! written to `X.failed` (git-ignored) for diffing, and the test lists every
//! mismatching file. `PECGATE_BLESS=1 cargo test --test golden` rewrites the
//! `.json` files instead: review the diff by hand before committing, a golden
//! file that records a bug is worse than none.
//!
//! The synthetic corpus also has a hand-written oracle,
//! `fixtures/synthetic/manifest.json` (written by
//! `scripts/make-synthetic-fixtures.py`, with the UTC times computed in
//! Python), checked here independently of the golden files.
//!
//! The real OCA messages (AGPL, personal data) are not in the repository: they
//! are read from `$PECGATE_SHARED_DIR/fixtures/public/OCA-l10n-italy/` and only
//! non-personal fields are asserted.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};
use support::{
    DATICERT_KEYS, ERROR_KEYS, INSPECTION_KEYS, eml_files, fixtures_dir, golden_path, keys,
    library_json, pretty, read_golden, relative, shared_dir, sorted,
};

/// Fixtures whose golden file holds the CORRECT expectation while the code
/// still gets them wrong (reported bugs). They are not blessed over, a
/// mismatch is only reported, and a match fails the test so that the entry is
/// removed once the bug is fixed.
const KNOWN_BUGS: &[(&str, &str)] = &[];

fn known_bug(rel: &str) -> Option<&'static str> {
    KNOWN_BUGS
        .iter()
        .find(|(f, _)| *f == rel)
        .map(|(_, why)| *why)
}

fn blessing() -> bool {
    std::env::var("PECGATE_BLESS").is_ok_and(|v| v == "1")
}

#[test]
fn golden_inspect_json() {
    let base = fixtures_dir();
    let files = eml_files(&base);
    assert!(
        files.len() >= 50,
        "only {} fixtures found under {}",
        files.len(),
        base.display()
    );
    let bless = blessing();
    let mut mismatches = Vec::new();
    let mut missing = Vec::new();
    let mut fixed_bugs = Vec::new();
    for path in &files {
        let rel = relative(path, &base);
        let actual = library_json(path, &rel);
        let failed = path.with_extension("failed");
        let bug = known_bug(&rel);
        if bless && bug.is_none() {
            std::fs::write(golden_path(path), pretty(&actual)).expect("write golden file");
            let _ = std::fs::remove_file(&failed);
            continue;
        }
        let Some(expected) = read_golden(path) else {
            missing.push(rel);
            continue;
        };
        if actual == expected {
            let _ = std::fs::remove_file(&failed);
            if bug.is_some() {
                fixed_bugs.push(rel);
            }
            continue;
        }
        std::fs::write(&failed, pretty(&actual)).expect("write .failed file");
        match bug {
            Some(why) => eprintln!(
                "KNOWN BUG (not failing): {rel}: {why}; actual in {}",
                failed.display()
            ),
            None => mismatches.push(rel),
        }
    }
    assert!(
        missing.is_empty(),
        "fixtures without a golden .json (run PECGATE_BLESS=1 cargo test --test golden, then review): {missing:#?}"
    );
    assert!(
        mismatches.is_empty(),
        "inspect --json differs from the golden file for (actual output in <name>.failed): {mismatches:#?}"
    );
    assert!(
        fixed_bugs.is_empty(),
        "these KNOWN_BUGS now pass: remove them from the list in tests/golden.rs: {fixed_bugs:#?}"
    );
}

/// The golden files are well formed: pretty-printed, with the specified keys,
/// errors exactly for `broken/`, and no `.json` without its `.eml`.
#[test]
fn golden_files_are_well_formed() {
    let base = fixtures_dir();
    for path in eml_files(&base) {
        let rel = relative(&path, &base);
        let Some(v) = read_golden(&path) else {
            continue;
        };
        let text = std::fs::read_to_string(golden_path(&path)).expect("golden readable");
        assert_eq!(
            text,
            pretty(&v),
            "{rel}: golden file not pretty-printed (2-space indent, final newline)"
        );
        assert_eq!(
            v["file"],
            json!(rel),
            "{rel}: \"file\" must be the path relative to fixtures/"
        );
        if rel.starts_with("broken/") {
            assert_eq!(
                keys(&v),
                sorted(ERROR_KEYS),
                "{rel}: a broken file gives an error object"
            );
            continue;
        }
        assert_eq!(keys(&v), sorted(INSPECTION_KEYS), "{rel}: keys");
        if !v["daticert"].is_null() {
            assert_eq!(
                keys(&v["daticert"]),
                sorted(DATICERT_KEYS),
                "{rel}: daticert keys"
            );
        }
    }
    // No orphan golden file.
    let mut stack = vec![base.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "json")
                && p.file_name().is_some_and(|n| n != "manifest.json")
            {
                assert!(
                    p.with_extension("eml").is_file(),
                    "{} has no .eml next to it",
                    p.display()
                );
            }
        }
    }
}

/// The hand-written expectations of the synthetic corpus (manifest.json) hold.
#[test]
fn synthetic_manifest_expectations() {
    let base = fixtures_dir();
    let dir = base.join("synthetic");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json readable"),
    )
    .expect("manifest.json is JSON");
    let entries = manifest["files"].as_array().expect("manifest files");
    let listed: BTreeSet<String> = entries
        .iter()
        .map(|e| e["file"].as_str().expect("file name").to_owned())
        .collect();
    let on_disk: BTreeSet<String> = eml_files(&dir).iter().map(|p| relative(p, &dir)).collect();
    assert_eq!(
        listed, on_disk,
        "manifest.json and fixtures/synthetic/*.eml disagree"
    );

    let mut failures = Vec::new();
    for e in entries {
        let name = e["file"].as_str().expect("file");
        let rel = format!("synthetic/{name}");
        let bug = known_bug(&rel);
        let actual = library_json(&dir.join(name), &rel);
        let want = &e["expect"];
        let mut why = Vec::new();
        for key in ["kind", "x_ricevuta", "refers_to"] {
            if actual[key] != want[key] {
                why.push(format!("{key}: got {} want {}", actual[key], want[key]));
            }
        }
        match (&actual["daticert"], &want["daticert"]) {
            (Value::Null, Value::Null) => {}
            (got, Value::Null) => why.push(format!("daticert: got {got}, want null")),
            (Value::Null, _) => why.push("daticert: got null".to_owned()),
            (got, w) => {
                for key in ["tipo", "identificativo", "data"] {
                    if got[key] != w[key] {
                        why.push(format!("daticert.{key}: got {} want {}", got[key], w[key]));
                    }
                }
            }
        }
        let problems: Vec<&str> = actual["problems"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let wanted: Vec<&str> = want["problems"]
            .as_array()
            .expect("expect.problems")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if problems.len() != wanted.len()
            || !wanted
                .iter()
                .all(|w| problems.iter().any(|p| p.contains(w)))
        {
            why.push(format!(
                "problems: got {problems:?}, want one matching each of {wanted:?}"
            ));
        }
        match (why.is_empty(), bug) {
            (true, _) | (false, Some(_)) => {}
            (false, None) => failures.push(format!("{rel}: {}", why.join("; "))),
        }
    }
    assert!(
        failures.is_empty(),
        "manifest expectations not met:\n{}",
        failures.join("\n")
    );
}

/// What is asserted about one real OCA message (no personal data).
struct Real {
    path: &'static str,
    kind: &'static str,
    /// `None`: no daticert expected.
    tipo: Option<&'static str>,
    identificativo: &'static str,
    data: &'static str,
    gestore: &'static str,
    ricevuta: Option<&'static str>,
    problems: &'static [&'static str],
}

const FATTURAPA: &str = "l10n_it_fatturapa_pec/tests/data";
const PEC_MESSAGES: &str = "l10n_it_pec_messages/tests/data";

const OCA: &[Real] = &[
    Real {
        path: "l10n_it_fatturapa_pec/tests/data/ACCETTAZIONE_ IT03339130126_00009.xml.txt",
        kind: "accettazione",
        tipo: Some("accettazione"),
        identificativo: "opec288.20181113163926.01838.310.1.63@pec.aruba.it",
        data: "2018-11-13T15:39:26Z",
        gestore: "ARUBA PEC S.p.A.",
        ricevuta: None,
        problems: &[],
    },
    Real {
        path: "l10n_it_fatturapa_pec/tests/data/CONSEGNA_ IT03339130126_00009.xml.txt",
        kind: "avvenuta-consegna",
        tipo: Some("avvenuta-consegna"),
        identificativo: "opec288.20181113163926.01838.310.1.63@pec.aruba.it",
        data: "2018-11-13T15:39:27Z",
        gestore: "ARUBA PEC S.p.A.",
        ricevuta: Some("completa"),
        problems: &[],
    },
    Real {
        path: "l10n_it_fatturapa_pec/tests/data/POSTA CERTIFICATA_ Invio File 7339338.txt",
        kind: "posta-certificata",
        tipo: Some("posta-certificata"),
        identificativo: "opec288.20181208122618.17535.2665.1.3@pcert.sogei.it",
        data: "2018-12-08T11:26:18Z",
        gestore: "Sogei SpA",
        ricevuta: Some("breve"),
        problems: &[],
    },
    Real {
        path: "l10n_it_fatturapa_pec/tests/data/POSTA CERTIFICATA_ Invio File 7339338 (base64).txt",
        kind: "posta-certificata",
        tipo: Some("posta-certificata"),
        identificativo: "opec288.20181208122618.17535.2665.1.3@pcert.sogei.it",
        data: "2018-12-08T11:26:18Z",
        gestore: "Sogei SpA",
        ricevuta: Some("breve"),
        problems: &[],
    },
    Real {
        path: "l10n_it_fatturapa_pec/tests/data/POSTA CERTIFICATA_ Invio File 7339338 (broken XML).txt",
        kind: "posta-certificata",
        tipo: Some("posta-certificata"),
        identificativo: "opec288.20181208122618.17535.2665.1.3@pcert.sogei.it",
        data: "2018-12-08T11:26:18Z",
        gestore: "Sogei SpA",
        ricevuta: Some("breve"),
        problems: &[],
    },
    Real {
        path: "l10n_it_fatturapa_pec/tests/data/POSTA CERTIFICATA_ Ricevuta di consegna 6782414.txt",
        kind: "posta-certificata",
        tipo: Some("posta-certificata"),
        identificativo: "opec288.20181113164732.05177.8374.1.1@pcert.sogei.it",
        data: "2018-11-13T15:47:32Z",
        gestore: "Sogei SpA",
        ricevuta: Some("breve"),
        problems: &[],
    },
    Real {
        path: "l10n_it_fatturapa_pec/tests/data/POSTA CERTIFICATA_mancata_consegna.txt",
        kind: "posta-certificata",
        tipo: None,
        identificativo: "",
        data: "",
        gestore: "",
        ricevuta: None,
        problems: &["posta-certificata without daticert.xml"],
    },
    Real {
        path: "l10n_it_pec_messages/tests/data/message1",
        kind: "posta-certificata",
        tipo: Some("posta-certificata"),
        identificativo: "opec275.20141107165200.03048.08.1.17@pec.aruba.it",
        data: "2014-11-07T15:52:00Z",
        gestore: "ARUBA PEC S.p.A.",
        ricevuta: Some("completa"),
        problems: &[],
    },
    Real {
        path: "l10n_it_pec_messages/tests/data/message2",
        kind: "posta-certificata",
        tipo: Some("posta-certificata"),
        identificativo: "opec275.20141127151216.06559.08.1.17@pec.aruba.it",
        data: "2014-11-27T14:12:16Z",
        gestore: "ARUBA PEC S.p.A.",
        ricevuta: Some("completa"),
        problems: &[],
    },
    Real {
        path: "l10n_it_pec_messages/tests/data/message2_accettazione",
        kind: "accettazione",
        tipo: Some("accettazione"),
        identificativo: "opec275.20141114182632.23219.07.1.48@pec.aruba.it",
        data: "2014-11-14T17:26:32Z",
        gestore: "ARUBA PEC S.p.A.",
        ricevuta: None,
        problems: &[],
    },
    Real {
        path: "l10n_it_pec_messages/tests/data/message2_consegna",
        kind: "avvenuta-consegna",
        tipo: Some("avvenuta-consegna"),
        identificativo: "opec275.20141114182632.23219.07.1.48@pec.aruba.it",
        data: "2014-11-14T17:26:32Z",
        gestore: "ARUBA PEC S.p.A.",
        ricevuta: Some("completa"),
        problems: &[],
    },
];

/// The real (AGPL) OCA l10n-italy messages, read from the shared directory.
#[test]
fn real_oca_messages() {
    let dir = shared_dir().join("fixtures/public/OCA-l10n-italy");
    if !dir.is_dir() {
        eprintln!(
            "real_oca_messages: NOT RUN: {} does not exist (set PECGATE_SHARED_DIR); \
             the {} real OCA l10n-italy cases were skipped",
            dir.display(),
            OCA.len()
        );
        return;
    }
    // Every file of the two OCA data folders is covered by the table.
    for folder in [FATTURAPA, PEC_MESSAGES] {
        for entry in std::fs::read_dir(dir.join(folder)).expect("OCA data folder") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            let path = format!("{folder}/{name}");
            assert!(
                OCA.iter().any(|r| r.path == path),
                "OCA file not covered: {path}"
            );
        }
    }
    let mut failures = Vec::new();
    for r in OCA {
        let path = dir.join(r.path);
        let v = library_json(&path, r.path);
        let mut why = Vec::new();
        if v["kind"] != json!(r.kind) {
            why.push(format!("kind {}", v["kind"]));
        }
        let d = &v["daticert"];
        match r.tipo {
            None if !d.is_null() => why.push(format!("daticert should be null: {d}")),
            None => {}
            Some(tipo) => {
                let checks = [
                    ("tipo", json!(tipo)),
                    ("identificativo", json!(r.identificativo)),
                    ("data", json!(r.data)),
                    ("gestore_emittente", json!(r.gestore)),
                    ("ricevuta", json!(r.ricevuta)),
                    ("errore", json!("nessuno")),
                ];
                for (key, want) in checks {
                    if d[key] != want {
                        why.push(format!("daticert.{key}: got {} want {want}", d[key]));
                    }
                }
            }
        }
        if v["problems"] != json!(r.problems) {
            why.push(format!("problems {}", v["problems"]));
        }
        if !why.is_empty() {
            failures.push(format!("{}: {}", r.path, why.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "real OCA messages:\n{}",
        failures.join("\n")
    );
}

/// The public samples keep their upstream LICENSE next to them.
#[test]
fn public_samples_keep_their_licence() {
    let public = fixtures_dir().join("public");
    for entry in std::fs::read_dir(&public).expect("fixtures/public") {
        let dir = entry.expect("entry").path();
        if dir.is_dir() {
            assert!(
                Path::new(&dir.join("LICENSE")).is_file(),
                "{} has no LICENSE",
                dir.display()
            );
        }
    }
}
