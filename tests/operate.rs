//! The operator commands against a real store: `pecgate status`, `report`, `backup`
//! and `restore` (the real binary), on letters recorded through the store API and
//! receipts taken in through the real ingest path (composed by `pec::compose`, signed
//! at test time by a test CA, verified with openssl).

mod ingest_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use ingest_support::*;
use jiff::{SignedDuration, Timestamp};
use pecgate::config::{Config, MailboxConfig};
use pecgate::ingest::{Context, IngestOutcome, Source, ingest};
use pecgate::pec::compose::{self, DeliveryContent, Errore, Transaction};
use pecgate::store::{self, Db, Field, MessageRow, NewDispatch, NewRecipient};
use pecgate::verify::{TrustAnchors, Verifier};
use serde_json::Value;

const C: &str = "gamma@pec.example.it";

/// How a test letter's first SMTP attempt ended.
#[derive(Clone, Copy)]
enum Smtp {
    /// Never attempted (`queued`).
    None,
    Submitted,
    Uncertain,
    Refused,
}

struct Letter {
    id: String,
    mid: String,
    recipients: Vec<String>,
}

struct Env {
    dir: tempfile::TempDir,
    root: PathBuf,
    config_path: PathBuf,
    config: Config,
    db: Db,
    verifier: Verifier,
    now: Timestamp,
}

fn write_config(root: &Path) -> PathBuf {
    let toml = format!(
        r#"
[store]
database = "{r}/var/pecgate.db"
archive = "{r}/var/archive"
[deadlines]
delivery_hours = 26
[report]
unit_price_eur = 6.50
[mailbox.protocollo]
address = "{FROM}"
outbox = "{r}/outbox"
sent = "{r}/sent"
inbox = "{r}/inbox"
smtp = {{ host = "smtps.pec.example.it", password_env = "PW" }}
imap = {{ host = "imaps.pec.example.it", password_env = "PW" }}
"#,
        r = root.display()
    );
    let path = root.join("pecgate.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn load_config(path: &Path) -> Config {
    Config::load_with_env(path, [("PW".to_string(), "pw".to_string())]).unwrap()
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("site");
        for d in ["var", "outbox", "sent", "inbox"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let config_path = write_config(&root);
        let config = load_config(&config_path);
        let db = Db::open(&config.store.database).unwrap();
        let verifier =
            Verifier::new(TrustAnchors::from_certs(vec![keys().ca.cert.clone()]).unwrap());
        let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
        Env {
            dir,
            root,
            config_path,
            config,
            db,
            verifier,
            now,
        }
    }

    fn mailbox(&self) -> &MailboxConfig {
        self.config.mailbox("protocollo").unwrap()
    }

    fn letter(&mut self, kind: &str, recipients: &[&str], at: Timestamp, smtp: Smtp) -> Letter {
        let mailbox = self.mailbox().clone();
        record_letter(
            &mut self.db,
            &self.config,
            &mailbox,
            kind,
            recipients,
            at,
            smtp,
        )
    }

    fn ingest(&mut self, raw: &[u8]) -> IngestOutcome {
        let mailbox = self.mailbox().clone();
        let ctx = Context {
            mailbox: &mailbox,
            archive: &self.config.store.archive,
            verifier: &self.verifier,
            gateway_hostname: None,
        };
        ingest(&mut self.db, &ctx, raw, Source::default(), self.now).unwrap()
    }

    fn applied(&mut self, raw: &[u8]) {
        let o = self.ingest(raw);
        assert!(matches!(o, IngestOutcome::Applied { .. }), "{o:?}");
    }

    /// Closes the store (checkpointing its WAL); `env.db` then points to a scratch file.
    fn close_db(&mut self) {
        let scratch = Db::open(self.dir.path().join("scratch.db")).unwrap();
        std::mem::replace(&mut self.db, scratch).close().unwrap();
    }

    fn pecgate(&self, args: &[&str]) -> Output {
        pecgate(&self.config_path, args)
    }
}

fn pecgate(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pecgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("PW", "pw")
        .env_remove("PECGATE_CONFIG")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// A letter as outbound records it: queued, then (maybe) one attempt and its end,
/// its sent folder and the archived bytes of the attempt.
fn record_letter(
    db: &mut Db,
    config: &Config,
    mailbox: &MailboxConfig,
    kind: &str,
    recipients: &[&str],
    at: Timestamp,
    smtp: Smtp,
) -> Letter {
    let id = store::new_dispatch_id(at.as_millisecond() as u64);
    let sent_dir = pecgate::sent::folder(&mailbox.sent, at, &id);
    pecgate::archive::create_folder(&mailbox.sent, &sent_dir).unwrap();
    std::fs::write(sent_dir.join("lettera.pdf"), format!("%PDF-1.4 {id}")).unwrap();
    db.insert_dispatch(&NewDispatch {
        id: id.clone(),
        mailbox: mailbox.name.clone(),
        kind: kind.into(),
        protocol: Some(format!("P-{id}")),
        reference: None,
        subject: "Prova".into(),
        receipt_type: "completa".into(),
        in_reply_to: None,
        content_hash: store::sha256_hex(id.as_bytes()),
        source: "prova.toml".into(),
        sent_dir: sent_dir.display().to_string(),
        created_at: at,
        recipients: recipients
            .iter()
            .map(|a| NewRecipient {
                address: a.to_string(),
                field: Field::To,
            })
            .collect(),
        documents: vec![],
    })
    .unwrap();
    let mid = format!("{id}.x@gw.example.it");
    if !matches!(smtp, Smtp::None) {
        let eml = format!("Message-ID: <{mid}>\r\n\r\nciao {id}\r\n");
        let a = pecgate::archive::store(&config.store.archive, eml.as_bytes()).unwrap();
        db.record_message(&MessageRow {
            sha256: a.sha256.clone(),
            path: a.relative,
            size: a.size,
            direction: store::Direction::Out,
            mailbox: mailbox.name.clone(),
            imap_uid: None,
            imap_uidvalidity: None,
            recorded_at: at,
        })
        .unwrap();
        let n = db
            .begin_attempt(&id, &format!("<{mid}>"), &a.sha256, at)
            .unwrap();
        match smtp {
            Smtp::Submitted => db.attempt_submitted(&id, n, "250 ok", at).unwrap(),
            Smtp::Uncertain => db
                .mark_uncertain(&id, n, "connection-lost-after-data", at)
                .unwrap(),
            Smtp::Refused => db
                .attempt_refused(&id, n, "550 5.7.1 relay refused", at)
                .unwrap(),
            Smtp::None => {}
        }
    }
    Letter {
        id,
        mid,
        recipients: recipients.iter().map(|a| a.to_string()).collect(),
    }
}

fn tx_for(l: &Letter, at: Timestamp) -> Transaction {
    let recipients = l.recipients.iter().map(String::as_str);
    transaction(&l.id, &l.mid, recipients, &[X], at)
}

fn acceptance(l: &Letter, at: Timestamp) -> Vec<u8> {
    sign_with(&compose::acceptance(&tx_for(l, at)), &keys().provider, at)
}

fn delivery(l: &Letter, at: Timestamp, to: &str) -> Vec<u8> {
    let c = compose::delivery(&tx_for(l, at), to, DeliveryContent::Sintetica);
    sign_with(&c, &keys().provider, at)
}

fn failure(l: &Letter, at: Timestamp, to: &str) -> Vec<u8> {
    let c = compose::delivery_error(
        &tx_for(l, at),
        to,
        Errore::NoDest,
        "5.1.1 - indirizzo non valido",
    );
    sign_with(&c, &keys().provider, at)
}

fn timeout(l: &Letter, at: Timestamp, to: &str) -> Vec<u8> {
    let c = compose::timeout_notice(&tx_for(l, at), to, "5.4.1 - tempo scaduto");
    sign_with(&c, &keys().provider, at)
}

fn mins(m: i64) -> SignedDuration {
    SignedDuration::from_mins(m)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn status_counts_match_list_and_flag_what_needs_an_operator() {
    let mut env = Env::new();
    let now = env.now;
    let delivered = env.letter("certificato", &[A, B, X], now - hours(3), Smtp::Submitted);
    env.applied(&acceptance(&delivered, now - hours(2)));
    env.applied(&delivery(&delivered, now - hours(2) + mins(1), A));
    env.applied(&delivery(&delivered, now - hours(2) + mins(2), B));
    let stale = env.letter("avviso", &[A, C], now - hours(31), Smtp::Submitted);
    env.applied(&acceptance(&stale, now - hours(30)));
    env.applied(&delivery(&stale, now - hours(29), A));
    let uncertain = env.letter("avviso", &[A], now - mins(5), Smtp::Uncertain);
    let _queued = env.letter("avviso", &[B], now, Smtp::None);
    let failed = env.letter("avviso", &[B], now - hours(4), Smtp::Submitted);
    env.applied(&acceptance(&failed, now - hours(4)));
    env.applied(&failure(&failed, now - hours(4) + mins(1), B));
    // A forged receipt (another CA) is quarantined; a receipt for a letter pecgate
    // never sent is an orphan.
    let forged = sign_with(
        &compose::delivery(
            &tx_for(&failed, now - hours(1)),
            B,
            DeliveryContent::Sintetica,
        ),
        &keys().forged,
        now - hours(1),
    );
    let o = env.ingest(&forged);
    assert!(matches!(o, IngestOutcome::Quarantined { .. }), "{o:?}");
    let ghost = Letter {
        id: "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
        mid: "ghost@elsewhere.example.it".into(),
        recipients: vec![A.into()],
    };
    let o = env.ingest(&acceptance(&ghost, now - hours(1)));
    assert!(matches!(o, IngestOutcome::Orphan { .. }), "{o:?}");
    // One letter waiting in the outbox.
    std::fs::write(env.mailbox().outbox.join("nuova.toml"), "subject = \"x\"\n").unwrap();

    let list = ok(&env.pecgate(&["list", "--json"]));
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for line in list.lines() {
        *by_state
            .entry(json(line)["state"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(by_state.values().sum::<u64>(), 5, "{list}");

    let status = json(&ok(&env.pecgate(&["status", "--json"])));
    let m = &status["mailboxes"][0];
    assert_eq!(m["name"], "protocollo");
    for (state, n) in m["states"].as_object().unwrap() {
        assert_eq!(
            n.as_u64().unwrap(),
            by_state.get(state).copied().unwrap_or(0),
            "state {state}: {status}"
        );
    }
    assert_eq!(m["letters"], 5);
    assert_eq!(m["states"]["delivered"], 1);
    assert_eq!(m["states"]["failed"], 1);
    assert_eq!(m["stale"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(m["stale"][0]["dispatch_id"], stale.id.as_str());
    assert_eq!(m["stale"][0]["recipients"], serde_json::json!([C]));
    assert_eq!(m["uncertain"], serde_json::json!([uncertain.id]));
    assert_eq!(m["quarantined"], 1);
    assert_eq!(m["orphans"], 1);
    assert_eq!(m["backlog"]["waiting"], 1);
    assert_eq!(m["backlog"]["queued"], 1);
    assert_eq!(m["last_sync_at"], Value::Null);
    assert_eq!(m["quota"], Value::Null);

    // The table says the same, and the command wrote nothing.
    let events = env.db.verify_chain().unwrap().events;
    let table = ok(&env.pecgate(&["status"]));
    assert!(
        table.contains("mailbox protocollo <protocollo@pec.comune.example.it>"),
        "{table}"
    );
    assert!(
        table.contains(&format!("stale:               1: {}", stale.id)),
        "{table}"
    );
    assert!(table.contains("quarantined:         1"), "{table}");
    assert!(
        table.contains("1 waiting, 0 being taken in, 1 queued to send"),
        "{table}"
    );
    assert_eq!(env.db.verify_chain().unwrap().events, events);
}

#[test]
fn report_counts_a_month_of_submission_in_rome_time() {
    let mut env = Env::new();
    // A month well inside the test certificates' validity.
    let rome = (env.now - hours(24 * 45)).in_tz("Europe/Rome").unwrap();
    let month = format!("{:04}-{:02}", rome.year(), rome.month());
    let start = jiff::civil::date(rome.year(), rome.month(), 1)
        .in_tz("Europe/Rome")
        .unwrap()
        .timestamp();
    let base = start + hours(24 * 14 + 10);

    // Just after midnight in Rome on the 1st (still the previous day in UTC): counted.
    let first = env.letter("certificato", &[A], start + mins(30), Smtp::Submitted);
    env.applied(&acceptance(&first, start + mins(31)));
    env.applied(&delivery(&first, start + mins(32), A));
    // Just before it: the previous month.
    let before = env.letter("certificato", &[A], start - mins(30), Smtp::Submitted);
    env.applied(&acceptance(&before, start - mins(29)));
    env.applied(&delivery(&before, start - mins(28), A));
    // Two certified recipients delivered, one ordinary e-mail address.
    let r1 = env.letter("certificato", &[A, B, X], base, Smtp::Submitted);
    env.applied(&acceptance(&r1, base + mins(1)));
    env.applied(&delivery(&r1, base + mins(2), A));
    env.applied(&delivery(&r1, base + mins(3), B));
    // One delivered, one failed.
    let r2 = env.letter("avviso", &[A, B], base + mins(10), Smtp::Submitted);
    env.applied(&acceptance(&r2, base + mins(11)));
    env.applied(&delivery(&r2, base + mins(12), A));
    env.applied(&failure(&r2, base + mins(13), B));
    // Refused by the relay.
    let r3 = env.letter("avviso", &[C], base + mins(20), Smtp::Refused);
    // Timed out (the final notice, 23 hours after the acceptance).
    let r4 = env.letter("avviso", &[A], base + mins(30), Smtp::Submitted);
    env.applied(&acceptance(&r4, base + mins(31)));
    env.applied(&timeout(&r4, base + mins(31) + hours(23), A));
    // Never submitted: in no month.
    let _queued = env.letter("avviso", &[B], base + mins(40), Smtp::None);

    let r = json(&ok(&env.pecgate(&["report", "--month", &month, "--json"])));
    assert_eq!(r["month"], month.as_str());
    assert_eq!(r["unit_price_eur"], 6.5);
    let m = &r["mailboxes"][0];
    assert_eq!(m["name"], "protocollo");
    assert_eq!(
        (&m["letters"], &m["delivered"], &m["failed"], &m["external"]),
        (
            &Value::from(5),
            &Value::from(4),
            &Value::from(3),
            &Value::from(1)
        ),
        "{r}"
    );
    assert_eq!(m["by_kind"]["certificato"]["letters"], 2);
    assert_eq!(m["by_kind"]["certificato"]["delivered"], 3);
    assert_eq!(m["by_kind"]["certificato"]["external"], 1);
    assert_eq!(m["by_kind"]["avviso"]["letters"], 3);
    assert_eq!(m["by_kind"]["avviso"]["delivered"], 1);
    assert_eq!(m["by_kind"]["avviso"]["failed"], 3);
    assert_eq!(r["raccomandate_replaced"], 4);
    assert_eq!(r["savings_eur"], 26.0);
    let fallback: Vec<(String, String, String)> = r["paper_fallback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["dispatch_id"].as_str().unwrap().to_owned(),
                p["recipient"].as_str().unwrap().to_owned(),
                p["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let s = |a: &str| a.to_owned();
    assert_eq!(
        fallback,
        [
            (s(&r1.id), s(X), s("external")),
            (s(&r2.id), s(B), s("failed")),
            (s(&r3.id), s(C), s("refused")),
            (s(&r4.id), s(A), s("timed-out")),
        ]
    );
    let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "month",
            "unit_price_eur",
            "mailboxes",
            "paper_fallback",
            "raccomandate_replaced",
            "savings_eur"
        ]
    );

    let csv = ok(&env.pecgate(&["report", "--month", &month, "--csv"]));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[0].starts_with("month,dispatch_id,mailbox,kind,protocol,recipient,reason"));
    assert!(lines[3].contains(&format!(
        "{},protocollo,avviso,P-{},{C},refused",
        r3.id, r3.id
    )));
    let table = ok(&env.pecgate(&["report", "--month", &month]));
    assert!(
        table.contains("raccomandate A/R replaced: 4 × € 6.50 = € 26.00"),
        "{table}"
    );
    // The previous month has the letter sent just before midnight.
    let prev = rome.first_of_month().unwrap().yesterday().unwrap();
    let prev = format!("{:04}-{:02}", prev.year(), prev.month());
    let p = json(&ok(&env.pecgate(&["report", "--month", &prev, "--json"])));
    assert_eq!(p["mailboxes"][0]["letters"], 1);
    assert_eq!(p["raccomandate_replaced"], 1);
    let bad = env.pecgate(&["report", "--month", "2026-13"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("YYYY-MM"));
}

/// Letters with receipts, sent folders and archive files, plus some bulk in the archive
/// so that a backup takes a while.
fn populate(env: &mut Env) {
    let now = env.now;
    for i in 0..6 {
        let l = env.letter(
            "avviso",
            &[A, B, X],
            now - hours(5) + mins(i),
            Smtp::Submitted,
        );
        env.applied(&acceptance(&l, now - hours(4) + mins(i)));
        env.applied(&delivery(&l, now - hours(3) + mins(i), A));
        if i % 2 == 0 {
            env.applied(&failure(&l, now - hours(3) + mins(i), B));
        }
    }
    let mut bulk = vec![0u8; 256 * 1024];
    for i in 0..40u32 {
        bulk[..4].copy_from_slice(&i.to_be_bytes());
        pecgate::archive::store(&env.config.store.archive, &bulk).unwrap();
    }
    std::fs::create_dir_all(env.mailbox().inbox.join("2026/11/opec.1")).unwrap();
    std::fs::write(
        env.mailbox().inbox.join("2026/11/opec.1/postacert.eml"),
        "Subject: ciao\r\n\r\nciao\r\n",
    )
    .unwrap();
}

fn all_ids(db: &Db) -> Vec<String> {
    let mut ids = Vec::new();
    db.list(None, None, |d| {
        ids.push(d.dispatch.id);
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    ids
}

fn manifest(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("MANIFEST.jsonl"))
        .unwrap()
        .lines()
        .map(json)
        .collect()
}

/// Where a backup file belongs under the test's configuration.
fn restored_path(env: &Env, rel: &str) -> Option<PathBuf> {
    if let Some(r) = rel.strip_prefix("archive/") {
        return Some(env.config.store.archive.join(r));
    }
    if let Some(r) = rel.strip_prefix("mailbox/protocollo/sent/") {
        return Some(env.mailbox().sent.join(r));
    }
    if let Some(r) = rel.strip_prefix("mailbox/protocollo/inbox/") {
        return Some(env.mailbox().inbox.join(r));
    }
    None
}

#[test]
fn backup_while_letters_are_written_then_restore_on_a_new_machine() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut env = Env::new();
    populate(&mut env);
    let ids_before = all_ids(&env.db);

    // Another connection keeps writing letters, as the daemon would.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        let config = env.config.clone();
        let now = env.now;
        std::thread::spawn(move || {
            let mut db = Db::open(&config.store.database).unwrap();
            let mailbox = config.mailbox("protocollo").unwrap().clone();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                record_letter(
                    &mut db,
                    &config,
                    &mailbox,
                    "avviso",
                    &[C],
                    now + mins(i),
                    Smtp::Submitted,
                );
                i += 1;
                written.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    while written.load(Ordering::SeqCst) < 3 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let dest = env.dir.path().join("backup");
    let at_start = written.load(Ordering::SeqCst);
    let t = Instant::now();
    let out = ok(&env.pecgate(&["backup", dest.to_str().unwrap()]));
    let backup_time = t.elapsed();
    let during = written.load(Ordering::SeqCst) - at_start;
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(out.contains("backup written to"), "{out}");
    assert!(during > 0, "no letter was written while the backup ran");

    // Restrictive permissions.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dest), 0o700);
    assert_eq!(mode(&dest.join("pecgate.db")), 0o600);
    assert_eq!(mode(&dest.join("MANIFEST.jsonl")), 0o600);
    let lines = manifest(&dest);
    assert!(lines.iter().all(|l| {
        let keys: Vec<&String> = l.as_object().unwrap().keys().collect();
        keys == ["path", "size", "sha256"]
    }));
    // A second backup into the same directory is refused.
    let again = env.pecgate(&["backup", dest.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    // Keep what the original says, then lose the machine.
    let original: BTreeMap<String, store::DispatchDetail> = all_ids(&env.db)
        .into_iter()
        .map(|id| (id.clone(), env.db.get(&id).unwrap().unwrap()))
        .collect();
    env.close_db();
    std::fs::remove_dir_all(&env.root).unwrap();
    std::fs::create_dir_all(&env.root).unwrap();
    let config_path = write_config(&env.root);
    assert_eq!(config_path, env.config_path);

    let t = Instant::now();
    let out = ok(&pecgate(&config_path, &["restore", dest.to_str().unwrap()]));
    let restore_time = t.elapsed();
    assert!(out.contains("restored from"), "{out}");
    let files: u64 = lines.len() as u64;
    let bytes: u64 = lines.iter().map(|l| l["size"].as_u64().unwrap()).sum();
    eprintln!(
        "measured: backup {backup_time:?} with {during} letters written meanwhile; restore \
         {restore_time:?} for {files} files, {bytes} bytes"
    );

    let restored = Db::open(&env.config.store.database).unwrap();
    let chain = restored.verify_chain().unwrap();
    assert!(chain.is_intact(), "{chain:?}");
    let ids_after = all_ids(&restored);
    for id in &ids_before {
        assert!(ids_after.contains(id), "{id} lost");
    }
    assert!(
        ids_after.len() > ids_before.len(),
        "no concurrent letter in the snapshot"
    );
    for id in &ids_after {
        let d = restored.get(id).unwrap().unwrap();
        let o = &original[id];
        if ids_before.contains(id) {
            assert_eq!(&d, o, "{id}");
        } else {
            // Written while the backup ran: the snapshot holds it as it was at one
            // commit (queued, sending or submitted), never half a transaction.
            assert_eq!(d.recipients, o.recipients, "{id}");
            // The same attempts so far (their state may be older).
            let ids = |a: &[pecgate::store::AttemptRow]| {
                a.iter()
                    .map(|x| (x.n, x.message_id.clone()))
                    .collect::<Vec<_>>()
            };
            assert!(
                ids(&o.attempts).starts_with(&ids(&d.attempts)),
                "{id}: {:?} vs {:?}",
                d.attempts,
                o.attempts
            );
            match d.dispatch.state.as_str() {
                "queued" => assert!(d.attempts.is_empty(), "{id}"),
                "sending" => assert_eq!(d.attempts[0].state, "sending", "{id}"),
                "submitted" => assert_eq!(d, *o, "{id}"),
                other => panic!("{id}: {other}"),
            }
        }
        assert!(
            Path::new(&d.dispatch.sent_dir)
                .join("lettera.pdf")
                .is_file(),
            "{id}"
        );
        for a in &d.attempts {
            let m = restored.message(&a.eml_sha256).unwrap().unwrap();
            let bytes = std::fs::read(env.config.store.archive.join(&m.path)).unwrap();
            assert_eq!(store::sha256_hex(&bytes), m.sha256);
        }
    }
    for l in &lines {
        let rel = l["path"].as_str().unwrap();
        if let Some(p) = restored_path(&env, rel) {
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(bytes.len() as u64, l["size"].as_u64().unwrap(), "{rel}");
            assert_eq!(
                store::sha256_hex(&bytes),
                l["sha256"].as_str().unwrap(),
                "{rel}"
            );
        }
    }

    // Restoring again: refused while the database is open (the daemon), even with
    // --force; once it is closed, refused without --force, done with it.
    let busy = pecgate(
        &config_path,
        &["restore", "--force", dest.to_str().unwrap()],
    );
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use by another process"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    restored.close().unwrap();
    let again = pecgate(&config_path, &["restore", dest.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    ok(&pecgate(
        &config_path,
        &["restore", "--force", dest.to_str().unwrap()],
    ));
    let again = Db::open(&env.config.store.database).unwrap();
    assert_eq!(all_ids(&again), ids_after);
}

#[test]
fn a_corrupted_backup_is_refused_and_names_the_file() {
    let mut env = Env::new();
    populate(&mut env);
    let dest = env.dir.path().join("backup");
    ok(&env.pecgate(&["backup", dest.to_str().unwrap()]));
    let victim = manifest(&dest)
        .into_iter()
        .map(|l| l["path"].as_str().unwrap().to_owned())
        .find(|p| p.starts_with("mailbox/protocollo/sent/") && p.ends_with(".eml"))
        .unwrap();
    let path = dest.join(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();

    env.close_db();
    std::fs::remove_dir_all(&env.root).unwrap();
    std::fs::create_dir_all(&env.root).unwrap();
    write_config(&env.root);
    let out = pecgate(&env.config_path, &["restore", dest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&victim), "{err}");
    assert!(err.contains("SHA-256"), "{err}");
    assert!(err.contains("nothing was restored"), "{err}");
    assert!(!env.config.store.database.exists());
    assert!(!env.config.store.archive.exists());
    assert!(!env.mailbox().sent.exists());

    // A backup without its manifest (interrupted) is refused too.
    std::fs::remove_file(dest.join("MANIFEST.jsonl")).unwrap();
    let out = pecgate(&env.config_path, &["restore", dest.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MANIFEST.jsonl"));
}

#[test]
fn scheduled_backups_keep_the_newest() {
    let mut env = Env::new();
    populate(&mut env);
    let dir = env.dir.path().join("backups");
    let mut config = env.config.clone();
    config.backup = Some(pecgate::config::BackupConfig {
        dir: dir.clone(),
        every: std::time::Duration::from_secs(3600),
        keep: 2,
    });
    use pecgate::backup::{Scheduled, run_scheduled, scheduled_backups};
    let t0 = env.now;
    for (i, expect_done) in [(0, true), (1, false), (61, true), (130, true), (200, true)] {
        let r = run_scheduled(&config, t0 + mins(i)).unwrap();
        assert_eq!(
            matches!(r, Scheduled::Done { .. }),
            expect_done,
            "{i}: {r:?}"
        );
    }
    let kept = scheduled_backups(&dir).unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[1].0, t0 + mins(200));
    assert_eq!(kept[0].0, t0 + mins(130));
    // Each is a complete backup that verifies.
    for (_, b) in &kept {
        pecgate::backup::verify(b).unwrap();
    }
    match run_scheduled(&config, t0 + mins(210)).unwrap() {
        Scheduled::NotDue { next } => assert_eq!(next, t0 + mins(260)),
        other => panic!("{other:?}"),
    }
}
