//! `pecgate reindex`: a database lost after real letters went through the
//! sandbox and the daemon is rebuilt from the sent folders and the archive
//! alone, and the daemon carries on from it without sending anything again.
//!
//! Dovecot must be installed (see tests/sandbox_support).

mod outbound_support;
#[path = "sandbox_support/mod.rs"]
mod sandbox_support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outbound_support::*;
use sandbox_support::{Env, GIULIA, LUCA, Letter, MARIO, OFFICE, PAOLO, within};
use serde_json::Value;

/// A certified address of provider due that has no mailbox (`no-dest`).
const NOBODY: &str = "nessuno@pec.cittadini.sandbox.test";
/// How long receipts may take to reach their final states.
const RECEIPTS: Duration = Duration::from_secs(40);
/// The sandbox's grace period for uncertain letters (0.1 min), and a sync.
const GRACE_AND_SYNC: Duration = Duration::from_secs(6 + 6);

/// Drops `STEM.toml` with one document.
fn post(gw: &Gateway, stem: &str, to: &[&str], cc: &[&str], subject: &str) {
    let doc = document(&format!("{stem}.pdf"));
    let envelope = format!(
        "to = {}\ncc = {}\nsubject = \"{subject}\"\nbody = \"Gentile destinatario, {subject}.\"\n\
         receipt = \"completa\"\nkind = \"raccomandata\"\nprotocol = \"2026/{stem}\"\n\
         attachments = [\"{stem}.pdf\"]\n",
        serde_json::to_string(to).unwrap(),
        serde_json::to_string(cc).unwrap(),
    );
    drop_letter(
        &gw.outbox(),
        &format!("{stem}.toml"),
        &envelope,
        &[(&format!("{stem}.pdf"), &doc)],
    );
}

/// What must survive a rebuild, per letter: everything `list --json` shows
/// but `updated_at`.
fn letters(list: &[Value]) -> BTreeMap<String, Value> {
    list.iter()
        .map(|d| {
            let mut d = d.clone();
            d.as_object_mut().unwrap().remove("updated_at");
            (s(&d["dispatch_id"]).to_owned(), d)
        })
        .collect()
}

/// Every file under `root` (relative path → SHA-256), but the status files
/// (rewritten with the time of writing).
fn files(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == "status.txt" || name == "status.json" {
                    continue;
                }
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, sha256_hex(&fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Rows of the store that must be the same after a rebuild: attempts,
/// receipts (with their verdict and disposition) and incoming mail.
/// Rows of one table, every column as text.
type Rows = Vec<Vec<String>>;

/// A letter expected at the end: subject, state, (recipient, state) in
/// envelope order, receipt files in its sent folder.
type Expected<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], usize);

fn rows(db_path: &Path) -> (Rows, Rows, Rows) {
    let conn =
        rusqlite::Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let q = |sql: &str, n: usize| -> Rows {
        let mut stmt = conn.prepare(sql).unwrap();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| {
                    r.get::<_, Option<String>>(i)
                        .map(|v| v.unwrap_or_else(|| "NULL".into()))
                })
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    };
    (
        q(
            "SELECT dispatch_id, CAST(n AS TEXT), message_id, state, eml_sha256, started_at \
             FROM attempts ORDER BY dispatch_id, n",
            6,
        ),
        q(
            "SELECT message_sha256, kind, verdict, dispatch_id, recipient, identificativo, \
             msgid, disposition FROM receipts ORDER BY message_sha256",
            8,
        ),
        q(
            "SELECT message_sha256, mailbox, identificativo, mittente, oggetto, folder \
             FROM incoming ORDER BY message_sha256",
            6,
        ),
    )
}

/// The number of `NN-*.eml` receipt files in a letter's sent folder.
fn receipt_files(d: &Value) -> usize {
    entries(&PathBuf::from(s(&d["sent_dir"])))
        .iter()
        .filter(|n| n.ends_with(".eml") && !n.starts_with("00-"))
        .count()
}

fn remove_database(dir: &Path) {
    for name in ["pecgate.db", "pecgate.db-wal", "pecgate.db-shm"] {
        let p = dir.join(name);
        if p.exists() {
            fs::remove_file(&p).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_rebuilt_with_the_same_letters_in_the_same_states() {
    within(240, async {
        // The first submission loses its connection after DATA (the
        // provider took the letter): uncertain until its acceptance.
        let env = Env::start(
            1.0,
            Some("[smtp]\ndrop_after_data = \"accepted\"\ndrop_count = 1\n"),
        )
        .await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        post(&gw, "incerta", &[MARIO], &[], "Lettera dall'esito incerto");
        let incerta = gw
            .wait_list("the uncertain letter delivered", RECEIPTS, |l| {
                l.iter().any(|d| d["state"] == "delivered")
            })
            .await;
        let incerta_id =
            s(&by_subject(&incerta, "Lettera dall'esito incerto")["dispatch_id"]).to_owned();
        assert!(
            gw.db()
                .events_for(&incerta_id)
                .unwrap()
                .iter()
                .any(|e| e.event == "dispatch.uncertain"),
            "the first letter was uncertain before its acceptance"
        );
        post(&gw, "consegnata", &[LUCA], &[], "Certificato consegnato");
        post(&gw, "mista", &[GIULIA], &[PAOLO], "Certificata e ordinaria");
        post(&gw, "parziale", &[MARIO, NOBODY], &[], "Consegna parziale");
        post(&gw, "fallita", &[NOBODY], &[], "Indirizzo inesistente");
        // Certified mail from a citizen.
        env.send(
            MARIO,
            &Letter::new(MARIO, &[OFFICE], "Istanza di accesso agli atti"),
        )
        .await
        .expect("submission");

        let expected: &[Expected<'_>] = &[
            (
                "Lettera dall'esito incerto",
                "delivered",
                &[(MARIO, "delivered")],
                2,
            ),
            (
                "Certificato consegnato",
                "delivered",
                &[(LUCA, "delivered")],
                2,
            ),
            (
                "Certificata e ordinaria",
                "delivered",
                &[(GIULIA, "delivered"), (PAOLO, "external")],
                2,
            ),
            (
                "Consegna parziale",
                "partially-delivered",
                &[(MARIO, "delivered"), (NOBODY, "failed")],
                3,
            ),
            ("Indirizzo inesistente", "failed", &[(NOBODY, "failed")], 2),
        ];
        let settled = |l: &[Value]| {
            l.len() == expected.len()
                && expected.iter().all(|(subject, state, rs, n)| {
                    l.iter().any(|d| {
                        d["subject"] == *subject
                            && d["state"] == *state
                            && d["identificativo"].is_string()
                            && receipt_files(d) == *n
                            && d["recipients"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|r| (s(&r["address"]), s(&r["state"])))
                                .eq(rs.iter().copied())
                    })
                })
        };
        gw.wait_list("every letter final, receipts filed", RECEIPTS, settled)
            .await;
        eventually("the citizen's letter unpacked", RECEIPTS, || {
            files(&gw.dir.join("inbox"))
                .keys()
                .any(|k| k.ends_with("messaggio-firmato.eml"))
                .then_some(())
        })
        .await;
        tokio::time::sleep(QUIET).await;
        let before = letters(&gw.list(None).await);
        let recipients = [MARIO, LUCA, GIULIA, PAOLO];
        let mut delivered = Vec::new();
        for a in recipients {
            delivered.push((a, mailbox(&env, a).await.len()));
        }
        gw.stop_cleanly().await;
        let db_path = gw.dir.join("pecgate.db");
        let rows_before = rows(&db_path);
        assert_eq!(
            rows_before.2.len(),
            1,
            "one incoming letter: {:?}",
            rows_before.2
        );
        let sent_before = files(&gw.sent());
        let inbox_before = files(&gw.dir.join("inbox"));
        let archive_before = files(&gw.dir.join("archive"));

        // The database is lost.
        remove_database(&gw.dir);
        let started = std::time::Instant::now();
        let (code, out, err) = gw.cli(&["reindex"]).await;
        eprintln!(
            "reindex of 5 letters, 11 receipts, 1 incoming: {:?}",
            started.elapsed()
        );
        assert_eq!(code, Some(0), "reindex: {out}\n{err}");
        assert!(out.contains("letters restored: 5"), "{out}");
        assert!(out.contains("everything was restored"), "{out}");

        // The same letters, in the same states, with the same recipients'
        // states and identificativi; the same attempts, receipts (verdicts,
        // dispositions) and incoming mail.
        let after = letters(&gw.list(None).await);
        assert_eq!(after, before);
        let rows_after = rows(&db_path);
        assert_eq!(rows_after.0, rows_before.0, "attempts");
        assert_eq!(rows_after.1, rows_before.1, "receipts");
        assert_eq!(rows_after.2, rows_before.2, "incoming mail");
        // Nothing was filed twice; no evidence was added or changed.
        assert_eq!(files(&gw.sent()), sent_before, "sent folders");
        assert_eq!(files(&gw.dir.join("inbox")), inbox_before, "inbox folders");
        assert_eq!(files(&gw.dir.join("archive")), archive_before, "archive");
        // A new log, hash-chained, saying where it came from.
        let db = gw.db();
        assert!(db.verify_chain().unwrap().is_intact());
        let ev = db.events_for(&incerta_id).unwrap();
        assert_eq!(ev[0].event, "dispatch.queued");
        assert_eq!(ev[0].cause, "reindex");
        drop(db);

        // A second reindex refuses: there is a database now.
        let (code, _, err) = gw.cli(&["reindex"]).await;
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("exists") && err.contains("--force"), "{err}");

        // The daemon carries on from the rebuilt database: it reads the
        // whole mailbox again, and sends nothing again.
        gw.spawn();
        gw.ready().await;
        // Not while it runs, even with --force.
        let (code, _, err) = gw.cli(&["reindex", "--force"]).await;
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("stop it first"), "{err}");
        tokio::time::sleep(GRACE_AND_SYNC).await;
        let expected_boxes: Vec<(&str, usize)> = delivered.clone();
        mailboxes_exactly(&env, &expected_boxes).await;
        assert_eq!(letters(&gw.list(None).await), before, "nothing changed");
        assert!(gw.events("dispatch.grace_resend").is_empty());
        gw.stop_cleanly().await;
        assert_eq!(
            files(&gw.sent()),
            sent_before,
            "sent folders after the restart"
        );
        assert_eq!(
            files(&gw.dir.join("inbox")),
            inbox_before,
            "inbox folders after the restart"
        );

        // A damaged record and a letter folder without one: reported, the
        // rest restored; --force moves the database aside.
        let failed = before
            .values()
            .find(|d| d["subject"] == "Indirizzo inesistente")
            .unwrap();
        let failed_dir = PathBuf::from(s(&failed["sent_dir"]));
        fs::write(failed_dir.join("dispatch.json"), b"{ not json").unwrap();
        let stray = failed_dir
            .parent()
            .unwrap()
            .join("01ARZ3NDEKTSV4RRFFQ69G5FAV");
        fs::create_dir(&stray).unwrap();
        let (code, out, err) = gw.cli(&["reindex", "--force", "--json"]).await;
        assert_eq!(code, Some(1), "{out}\n{err}");
        let summary: Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(summary["letters"], 4);
        assert_eq!(summary["orphans"], 2, "the unrestored letter's receipts");
        let problems: Vec<String> = summary["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| s(&p["path"]).to_owned())
            .collect();
        assert_eq!(problems.len(), 2, "{summary}");
        assert!(
            problems.iter().all(|p| p.ends_with("dispatch.json")),
            "{problems:?}"
        );
        let moved = summary["moved_aside"].as_array().unwrap();
        assert!(!moved.is_empty());
        assert!(
            Path::new(s(&moved[0])).is_file(),
            "moved aside, not deleted"
        );
        let again = letters(&gw.list(None).await);
        assert_eq!(again.len(), 4);
        for (id, d) in &again {
            assert_eq!(d, &before[id]);
        }

        env.shutdown().await;
    })
    .await;
}
