//! The ingest path against a real store in a temporary directory, with
//! receipts composed by `pec::compose` and signed at test time by a test CA.

mod ingest_support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use ingest_support::*;
use jiff::{SignedDuration, Timestamp};
use pecgate::config::{Config, MailboxConfig};
use pecgate::ingest::{Context, IngestOutcome, Source, ingest, ingest_batch, sanitize_file_name};
use pecgate::pec::compose::{
    self, Composed, DeliveryContent, Destinatario, Errore, ReceiptType, Transaction,
};
use pecgate::store::{self, Db, Field, MessageRow, NewDispatch, NewRecipient};
use pecgate::verify::{TrustAnchors, Verifier};

/// `[gateway] hostname` of the tests' gateway.
const GATEWAY: &str = "gw.example.it";

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    db: Db,
    mailbox: MailboxConfig,
    verifier: Verifier,
    now: Timestamp,
}

struct Letter {
    id: String,
    mid: String,
    recipients: Vec<(String, Field)>,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let toml = format!(
            r#"
[store]
database = "{r}/db.sqlite"
archive = "{r}/archive"
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
        std::fs::write(root.join("pecgate.toml"), toml).unwrap();
        let config = Config::load_with_env(
            &root.join("pecgate.toml"),
            [("PW".to_string(), "pw".to_string())],
        )
        .unwrap();
        let mailbox = config.mailbox("protocollo").unwrap().clone();
        let db = Db::open(root.join("db.sqlite")).unwrap();
        let verifier =
            Verifier::new(TrustAnchors::from_certs(vec![keys().ca.cert.clone()]).unwrap());
        let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
        Env {
            _dir: dir,
            root,
            db,
            mailbox,
            verifier,
            now,
        }
    }

    /// A letter as outbound records it: queued, attempt sending, submitted
    /// (or uncertain).
    fn letter(&mut self, recipients: &[(&str, Field)], uncertain: bool) -> Letter {
        let id = self.queued_dispatch(recipients);
        let eml = format!("Message-ID: <{id}.x@gw.example.it>\r\n\r\nciao\r\n");
        let a = pecgate::archive::store(&self.root.join("archive"), eml.as_bytes()).unwrap();
        self.db
            .record_message(&MessageRow {
                sha256: a.sha256.clone(),
                path: a.relative,
                size: a.size,
                direction: store::Direction::Out,
                mailbox: "protocollo".into(),
                imap_uid: None,
                imap_uidvalidity: None,
                recorded_at: self.now,
            })
            .unwrap();
        let mid = format!("{id}.x@gw.example.it");
        let n = self
            .db
            .begin_attempt(&id, &format!("<{mid}>"), &a.sha256, self.now)
            .unwrap();
        if uncertain {
            self.db
                .mark_uncertain(&id, n, "connection-lost-after-data", self.now)
                .unwrap();
        } else {
            self.db
                .attempt_submitted(&id, n, "250 ok", self.now)
                .unwrap();
        }
        Letter {
            id,
            mid,
            recipients: owned(recipients),
        }
    }

    /// Records a `queued` dispatch to `recipients`, with its sent folder;
    /// returns its id.
    fn queued_dispatch(&mut self, recipients: &[(&str, Field)]) -> String {
        let id = store::new_dispatch_id(self.now.as_millisecond() as u64);
        let sent_dir = pecgate::sent::folder(&self.mailbox.sent, self.now, &id);
        pecgate::archive::create_folder(&self.mailbox.sent, &sent_dir).unwrap();
        self.db
            .insert_dispatch(&NewDispatch {
                id: id.clone(),
                mailbox: "protocollo".into(),
                kind: "lettera".into(),
                protocol: None,
                reference: None,
                subject: "Prova".into(),
                receipt_type: "completa".into(),
                in_reply_to: None,
                content_hash: pecgate::store::sha256_hex(id.as_bytes()),
                source: "prova.toml".into(),
                sent_dir: sent_dir.display().to_string(),
                created_at: self.now,
                recipients: recipients
                    .iter()
                    .map(|(a, f)| NewRecipient {
                        address: a.to_string(),
                        field: *f,
                    })
                    .collect(),
                documents: vec![],
            })
            .unwrap();
        id
    }

    fn ingest(&mut self, raw: &[u8]) -> IngestOutcome {
        self.ingest_from(raw, Source::default())
    }

    fn state(&self, l: &Letter) -> String {
        self.db.get(&l.id).unwrap().unwrap().dispatch.state
    }

    fn recipient(&self, l: &Letter, a: &str) -> store::RecipientRow {
        self.db
            .get(&l.id)
            .unwrap()
            .unwrap()
            .recipients
            .into_iter()
            .find(|r| r.address == a)
            .unwrap()
    }

    fn sent_files(&self, l: &Letter) -> Vec<String> {
        let d = self.db.get(&l.id).unwrap().unwrap();
        let mut v: Vec<String> = std::fs::read_dir(&d.dispatch.sent_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// `recipients` as a `Letter` keeps them.
fn owned(recipients: &[(&str, Field)]) -> Vec<(String, Field)> {
    recipients
        .iter()
        .map(|(a, f)| (a.to_string(), *f))
        .collect()
}

fn tx_for(l: &Letter, at: Timestamp, external: &[&str]) -> Transaction {
    let recipients = l.recipients.iter().map(|(a, _)| a.as_str());
    transaction(&l.id, &l.mid, recipients, external, at)
}

fn signed(c: &Composed, tx: &Transaction) -> Vec<u8> {
    sign_with(c, &keys().provider, tx.time.timestamp())
}

fn acceptance(l: &Letter, at: Timestamp) -> Vec<u8> {
    let tx = tx_for(l, at, &[X]);
    signed(&compose::acceptance(&tx), &tx)
}

fn delivery(l: &Letter, at: Timestamp, to: &str) -> Vec<u8> {
    let tx = tx_for(l, at, &[X]);
    signed(&compose::delivery(&tx, to, DeliveryContent::Sintetica), &tx)
}

fn timeout(l: &Letter, at: Timestamp, to: &str, esteso: &str) -> Vec<u8> {
    let tx = tx_for(l, at, &[X]);
    signed(&compose::timeout_notice(&tx, to, esteso), &tx)
}

fn applied(o: &IngestOutcome) {
    assert!(matches!(o, IngestOutcome::Applied { .. }), "{o:?}");
}

fn quarantined(o: &IngestOutcome) {
    assert!(matches!(o, IngestOutcome::Quarantined { .. }), "{o:?}");
}

#[test]
fn acceptance_then_deliveries() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To), (X, Field::To), (B, Field::Cc)], false);
    let t0 = env.now - hours(1);
    let raw = acceptance(&l, t0);
    applied(&env.ingest(&raw));
    let d = env.db.get(&l.id).unwrap().unwrap();
    assert_eq!(d.dispatch.state, "accepted");
    assert!(
        d.dispatch
            .identificativo
            .as_deref()
            .unwrap()
            .starts_with("opec.")
    );
    assert_eq!(d.dispatch.accepted_at, Some(t0));
    assert_eq!(env.recipient(&l, A).certified, Some(true));
    assert_eq!(env.recipient(&l, X).state, "external");
    assert_eq!(env.recipient(&l, X).certified, Some(false));
    // The same bytes again: nothing changes.
    let events = env.db.events_for(&l.id).unwrap().len();
    assert!(matches!(env.ingest(&raw), IngestOutcome::Duplicate { .. }));
    assert_eq!(env.db.events_for(&l.id).unwrap().len(), events);

    applied(&env.ingest(&delivery(&l, t0 + hours(1), A)));
    assert_eq!(env.recipient(&l, A).state, "delivered");
    assert_eq!(env.state(&l), "accepted");
    // Addresses compare case-insensitively.
    applied(&env.ingest(&delivery(&l, t0 + hours(1), &B.to_uppercase())));
    assert_eq!(env.recipient(&l, B).state, "delivered");
    assert_eq!(env.state(&l), "delivered");

    let files = env.sent_files(&l);
    assert!(
        files.contains(&"01-accettazione.eml".to_string()),
        "{files:?}"
    );
    assert!(
        files.contains(&format!("02-avvenuta-consegna-{A}.eml")),
        "{files:?}"
    );
    assert!(
        files.contains(&format!("03-avvenuta-consegna-{B}.eml")),
        "{files:?}"
    );
    assert!(files.contains(&"status.txt".to_string()));
    let status = std::fs::read_to_string(
        Path::new(&env.db.get(&l.id).unwrap().unwrap().dispatch.sent_dir).join("status.json"),
    )
    .unwrap();
    assert!(status.contains("\"delivered\""));
    assert!(env.db.verify_chain().unwrap().first_bad.is_none());
}

#[test]
fn errors_timeouts_and_late_delivery() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To), (B, Field::Cc)], false);
    let t0 = env.now - hours(30);
    applied(&env.ingest(&acceptance(&l, t0)));
    let tx = tx_for(&l, t0 + hours(1), &[]);
    let err = signed(
        &compose::delivery_error(&tx, B, Errore::NoDest, "5.1.1 - indirizzo non valido"),
        &tx,
    );
    applied(&env.ingest(&err));
    let b = env.recipient(&l, B);
    assert_eq!(b.state, "failed");
    assert!(b.detail.unwrap().contains("5.1.1"));

    applied(&env.ingest(&timeout(&l, t0 + hours(12), A, "4.4.7 - ritardo")));
    assert_eq!(env.recipient(&l, A).state, "warned");
    applied(&env.ingest(&timeout(&l, t0 + hours(13), A, "5.4.1 - tempo scaduto")));
    assert_eq!(env.recipient(&l, A).state, "timed-out");
    assert_eq!(env.state(&l), "failed");
    applied(&env.ingest(&delivery(&l, t0 + hours(25), A)));
    let a = env.recipient(&l, A);
    assert_eq!(a.state, "delivered");
    assert!(a.conflict.is_some(), "{a:?}");
    assert_eq!(env.state(&l), "partially-delivered");
    assert!(env.db.verify_chain().unwrap().first_bad.is_none());
}

#[test]
fn timeout_without_code_after_22_hours_is_final_even_read_before_acceptance() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To)], false);
    let t0 = env.now - hours(30);
    // Out of order: the notice first (judged by its code: a warning).
    applied(&env.ingest(&timeout(&l, t0 + hours(23), A, "ritardo nella consegna")));
    assert_eq!(env.recipient(&l, A).state, "warned");
    applied(&env.ingest(&acceptance(&l, t0)));
    assert_eq!(env.recipient(&l, A).state, "timed-out");
    assert_eq!(env.state(&l), "failed");
}

#[test]
fn out_of_order_delivery_before_acceptance() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To), (B, Field::Cc)], false);
    let t0 = env.now - hours(2);
    applied(&env.ingest(&delivery(&l, t0 + hours(1), A)));
    applied(&env.ingest(&delivery(&l, t0 + hours(1), B)));
    assert_eq!(env.state(&l), "submitted");
    applied(&env.ingest(&acceptance(&l, t0)));
    assert_eq!(env.state(&l), "delivered");
}

#[test]
fn to_and_cc_partially_delivered() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To), (B, Field::Cc)], false);
    let t0 = env.now - hours(2);
    applied(&env.ingest(&acceptance(&l, t0)));
    applied(&env.ingest(&delivery(&l, t0 + hours(1), B)));
    let tx = tx_for(&l, t0 + hours(1), &[]);
    let err = signed(
        &compose::delivery_error(&tx, A, Errore::Virus, "5.7.1 virus"),
        &tx,
    );
    applied(&env.ingest(&err));
    assert_eq!(env.state(&l), "partially-delivered");
}

#[test]
fn non_acceptance_records_the_reason() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To)], false);
    let tx = tx_for(&l, env.now, &[]);
    let raw = signed(
        &compose::non_acceptance(&tx, "destinatari troppi", false),
        &tx,
    );
    applied(&env.ingest(&raw));
    let d = env.db.get(&l.id).unwrap().unwrap().dispatch;
    assert_eq!(d.state, "not-accepted");
    assert!(d.error.is_some());
}

#[test]
fn uncertain_attempt_is_resolved_by_its_acceptance() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To)], true);
    assert_eq!(env.state(&l), "uncertain");
    applied(&env.ingest(&acceptance(&l, env.now)));
    assert_eq!(env.state(&l), "accepted");
    let events = env.db.events_for(&l.id).unwrap();
    assert!(events.iter().any(|e| e.event == "attempt.submitted"));
    assert!(env.db.verify_chain().unwrap().first_bad.is_none());
}

#[test]
fn bad_signatures_and_inconsistencies_are_quarantined() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To)], false);
    let tx = tx_for(&l, env.now, &[]);
    let c = compose::acceptance(&tx);
    // Another CA.
    let forged = sign_with(&c, &keys().forged, env.now);
    quarantined(&env.ingest(&forged));
    // Tampered after signing.
    let good = signed(&c, &tx);
    let text = String::from_utf8(good.clone()).unwrap();
    let tampered = text
        .replacen("accettato dal", "rifiutato dal", 1)
        .into_bytes();
    assert!(tampered != good, "nothing tampered");
    quarantined(&env.ingest(&tampered));
    // Unsigned.
    quarantined(&env.ingest(&c.unsigned()));
    // X-Riferimento-Message-ID that disagrees with the daticert.
    let mut c2 = c.clone();
    c2.outer_headers = c2
        .outer_headers
        .replace(&l.mid, "someone-else@gw.example.it");
    assert_ne!(c2.outer_headers, c.outer_headers);
    quarantined(&env.ingest(&signed(&c2, &tx)));
    assert_eq!(env.state(&l), "submitted");
    // consegna that is not a recipient of the letter.
    let other = delivery(&l, env.now, "nobody@pec.example.it");
    quarantined(&env.ingest(&other));
    assert_eq!(env.recipient(&l, A).state, "pending");
    let receipts = env.db.receipts_for(&l.id).unwrap();
    assert!(
        receipts
            .iter()
            .all(|r| r.receipt.disposition == "quarantined")
    );
    // The genuine acceptance still applies.
    applied(&env.ingest(&good));
    assert_eq!(env.state(&l), "accepted");
}

#[test]
fn msgid_and_identificativo_of_different_letters_are_quarantined() {
    let mut env = Env::new();
    let l1 = env.letter(&[(A, Field::To)], false);
    let l2 = env.letter(&[(A, Field::To)], false);
    applied(&env.ingest(&acceptance(&l1, env.now)));
    // A delivery naming l2's msgid with l1's identificativo.
    let mut tx = tx_for(&l2, env.now, &[]);
    tx.identificativo = tx_for(&l1, env.now, &[]).identificativo;
    let raw = signed(&compose::delivery(&tx, A, DeliveryContent::Sintetica), &tx);
    quarantined(&env.ingest(&raw));
    assert_eq!(env.recipient(&l1, A).state, "pending");
    assert_eq!(env.recipient(&l2, A).state, "pending");
}

#[test]
fn orphans_are_listed_not_applied() {
    let mut env = Env::new();
    let ghost = Letter {
        id: "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
        mid: "ghost@elsewhere.example.it".into(),
        recipients: vec![(A.into(), Field::To)],
    };
    let raw = acceptance(&ghost, env.now);
    assert!(matches!(env.ingest(&raw), IngestOutcome::Orphan { .. }));
    assert!(matches!(env.ingest(&raw), IngestOutcome::Duplicate { .. }));
}

fn letter_with_attachments() -> Vec<u8> {
    let mut m = String::new();
    m.push_str("From: mittente@pec.altro.it\r\nTo: protocollo@pec.comune.example.it\r\n");
    m.push_str("Subject: Documenti\r\nMessage-ID: <orig.1@pec.altro.it>\r\nMIME-Version: 1.0\r\n");
    m.push_str("Content-Type: multipart/mixed; boundary=\"BB\"\r\n\r\n");
    m.push_str("--BB\r\nContent-Type: text/plain\r\n\r\nIn allegato.\r\n");
    for name in [
        "../../etc/passwd",
        "a\u{7}b.pdf",
        "CON",
        "doc.pdf",
        "doc.pdf",
        "postacert.eml",
    ] {
        m.push_str(&format!(
            "--BB\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\r\ndata of {}\r\n",
            name.len()
        ));
    }
    m.push_str("--BB--\r\n");
    m.into_bytes()
}

#[test]
fn incoming_mail_is_unpacked_with_safe_names() {
    let mut env = Env::new();
    let at = env.now;
    let tx = Transaction {
        identificativo: "opec.in.1@pec.altro.it".into(),
        time: at.in_tz("Europe/Rome").unwrap(),
        mittente: "mittente@pec.altro.it".into(),
        destinatari: vec![Destinatario {
            address: FROM.into(),
            tipo: "certificato".into(),
        }],
        risposte: "mittente@pec.altro.it".into(),
        oggetto: "Documenti".into(),
        msgid: Some("orig.1@pec.altro.it".into()),
        gestore: "Esempio PEC".into(),
        service_address: SERVICE.into(),
        ricevuta: ReceiptType::Completa,
    };
    let raw = signed(
        &compose::transport_envelope(&tx, &letter_with_attachments()),
        &tx,
    );
    let IngestOutcome::Incoming { folder } = env.ingest(&raw) else {
        panic!("not incoming")
    };
    let inbox = env.root.join("inbox");
    assert!(folder.starts_with(&inbox));
    assert!(folder.ends_with("opec.in.1@pec.altro.it"));
    let mut names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in [
        "messaggio-firmato.eml",
        "postacert.eml",
        "daticert.xml",
        "verifica.txt",
        "passwd",
        "a_b.pdf",
        "_CON",
        "doc.pdf",
        "doc-2.pdf",
        "postacert-2.eml",
    ] {
        assert!(names.contains(&n.to_string()), "{n} missing in {names:?}");
    }
    assert!(!env.root.join("etc").exists());
    assert_eq!(
        std::fs::read(folder.join("messaggio-firmato.eml")).unwrap(),
        raw
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(folder.join("passwd"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640);
    let dmode = std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o750);
    assert!(
        std::fs::read_to_string(folder.join("verifica.txt"))
            .unwrap()
            .contains("VALIDA")
    );
    let sha = pecgate::store::sha256_hex(&raw);
    assert!(env.db.incoming(&sha).unwrap().is_some());
    assert!(matches!(env.ingest(&raw), IngestOutcome::Duplicate { .. }));
    // Forged incoming mail is quarantined, not unpacked.
    let forged = sign_with(
        &compose::transport_envelope(&tx, b"Subject: x\r\n\r\nforged\r\n"),
        &keys().forged,
        at,
    );
    quarantined(&env.ingest(&forged));
    assert!(env.db.verify_chain().unwrap().first_bad.is_none());
}

#[test]
fn anomaly_envelopes_are_marked_not_certified() {
    let mut env = Env::new();
    let wrapped = b"From: someone@example.com\r\nTo: protocollo@pec.comune.example.it\r\nSubject: ciao\r\nMessage-ID: <a.1@example.com>\r\n\r\nhello\r\n";
    let (raw, folder) = env.anomaly(wrapped);
    let name = folder.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("anomalia-"), "{name}");
    assert!(folder.join("NON-CERTIFICATO.txt").exists());
    assert_eq!(
        std::fs::read(folder.join("messaggio-non-certificato.eml")).unwrap(),
        wrapped
    );
    assert!(matches!(env.ingest(&raw), IngestOutcome::Duplicate { .. }));
}

#[test]
fn sanitize_never_escapes() {
    let mut taken = HashSet::new();
    for hostile in [
        "../../x",
        "/abs",
        "a/../../b",
        "\u{0}",
        "..\\..\\win",
        "   ",
        "NUL.txt",
    ] {
        let s = sanitize_file_name(hostile, &mut taken);
        assert!(!s.is_empty() && !s.contains('/') && !s.contains('\\') && !s.starts_with('.'));
        assert!(!s.chars().any(char::is_control));
    }
}

// ---------------------------------------------------------------------------
// Receipts for attempts the store lost, anomaly senders, resync UIDs, batches

impl Env {
    fn ctx(&self) -> (PathBuf, MailboxConfig) {
        (self.root.join("archive"), self.mailbox.clone())
    }

    fn ingest_batch(&mut self, items: &[(&[u8], Source)]) -> Result<Vec<IngestOutcome>, String> {
        let (archive, mailbox) = self.ctx();
        let ctx = Context {
            mailbox: &mailbox,
            archive: &archive,
            verifier: &self.verifier,
            gateway_hostname: Some(GATEWAY),
        };
        ingest_batch(&mut self.db, &ctx, items, self.now).map_err(|e| e.to_string())
    }

    /// Takes in `wrapped` inside an anomaly envelope signed by the
    /// provider: it must be filed as an anomaly; returns the envelope and
    /// its folder.
    fn anomaly(&mut self, wrapped: &[u8]) -> (Vec<u8>, PathBuf) {
        let time = self.now.in_tz("Europe/Rome").unwrap();
        let c = compose::anomaly_envelope(wrapped, SERVICE, &time, "non certificato");
        let raw = sign_with(&c, &keys().provider, self.now);
        let IngestOutcome::Anomaly { folder } = self.ingest(&raw) else {
            panic!("not an anomaly")
        };
        (raw, folder)
    }

    fn ingest_from(&mut self, raw: &[u8], source: Source) -> IngestOutcome {
        let (archive, mailbox) = self.ctx();
        let ctx = Context {
            mailbox: &mailbox,
            archive: &archive,
            verifier: &self.verifier,
            gateway_hostname: Some(GATEWAY),
        };
        ingest(&mut self.db, &ctx, raw, source, self.now).unwrap()
    }

    /// A letter as a restore from backup leaves it: `queued`, no attempt;
    /// the attempt `n` the store lost had this Message-ID (pecgate's shape).
    fn restored_letter(&mut self, recipients: &[(&str, Field)], n: u32, host: &str) -> Letter {
        let id = self.queued_dispatch(recipients);
        Letter {
            mid: format!("{id}.{n}.0a1b2c3d4e5f@{host}"),
            id,
            recipients: owned(recipients),
        }
    }

    fn sql(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.root.join("db.sqlite")).unwrap()
    }

    fn count(&self, table: &str) -> i64 {
        self.sql()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }
}

fn events_named(env: &Env, l: &Letter, name: &str) -> Vec<serde_json::Value> {
    env.db
        .events_for(&l.id)
        .unwrap()
        .into_iter()
        .filter(|e| e.event == name)
        .map(|e| serde_json::from_str(&e.detail).unwrap())
        .collect()
}

#[test]
fn a_receipt_for_an_attempt_the_store_lost_recovers_it_and_applies() {
    let mut env = Env::new();
    let l = env.restored_letter(&[(A, Field::To), (X, Field::To)], 2, GATEWAY);
    assert_eq!(env.state(&l), "queued");
    let t0 = env.now - hours(1);
    let o = env.ingest(&acceptance(&l, t0));
    let IngestOutcome::Applied { changes, .. } = &o else {
        panic!("{o:?}")
    };
    assert!(changes.iter().any(|c| matches!(
        c,
        pecgate::pec::state::Change::AttemptChanged {
            from: None,
            cause: pecgate::pec::state::Cause::AttemptRecovered,
            ..
        }
    )));
    // Accepted: the sender will not send it again.
    let d = env.db.get(&l.id).unwrap().unwrap();
    assert_eq!(d.dispatch.state, "accepted");
    assert_eq!(d.dispatch.accepted_at, Some(t0));
    assert_eq!(d.attempts.len(), 1);
    let a = &d.attempts[0];
    assert_eq!((a.n, a.state.as_str()), (2, "submitted"));
    assert_eq!(a.message_id, l.mid);
    assert_eq!(a.eml_sha256, "", "the bytes sent are not known: no hash");
    let rec = events_named(&env, &l, "attempt.recovered");
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0]["message_id"], l.mid.as_str());
    assert_eq!(rec[0]["attempt"], 2);
    assert_eq!(rec[0]["kind"], "accettazione");
    assert_eq!(rec[0]["eml_sha256"], serde_json::Value::Null);
    assert_eq!(events_named(&env, &l, "dispatch.submitted").len(), 1);
    assert_eq!(events_named(&env, &l, "dispatch.accepted").len(), 1);
    // The rest of its receipts match the recovered attempt.
    applied(&env.ingest(&delivery(&l, t0 + hours(1), A)));
    assert_eq!(env.state(&l), "delivered");
    assert!(matches!(
        env.ingest(&acceptance(&l, t0)),
        IngestOutcome::Duplicate { .. }
    ));
    assert_eq!(events_named(&env, &l, "attempt.recovered").len(), 1);
    assert!(env.db.verify_chain().unwrap().first_bad.is_none());
}

#[test]
fn lost_attempts_are_recovered_only_from_valid_receipts_of_our_gateway() {
    let mut env = Env::new();
    // Another host name: an orphan, nothing recorded.
    let other = env.restored_letter(&[(A, Field::To)], 1, "elsewhere.example.it");
    let o = env.ingest(&acceptance(&other, env.now));
    assert!(matches!(o, IngestOutcome::Orphan { .. }), "{o:?}");
    assert_eq!(env.state(&other), "queued");
    // Our host name but a dispatch this store does not have: an orphan.
    let ghost = Letter {
        id: store::new_dispatch_id(1),
        mid: format!("{}.1.abcdef@{GATEWAY}", store::new_dispatch_id(1)),
        recipients: vec![(A.into(), Field::To)],
    };
    let o = env.ingest(&acceptance(&ghost, env.now));
    assert!(matches!(o, IngestOutcome::Orphan { .. }), "{o:?}");
    // A forged signature never recovers anything.
    let l = env.restored_letter(&[(A, Field::To)], 1, GATEWAY);
    let tx = tx_for(&l, env.now, &[]);
    let forged = sign_with(&compose::acceptance(&tx), &keys().forged, env.now);
    quarantined(&env.ingest(&forged));
    let d = env.db.get(&l.id).unwrap().unwrap();
    assert_eq!(d.dispatch.state, "queued");
    assert!(d.attempts.is_empty());
    assert!(events_named(&env, &l, "attempt.recovered").is_empty());
    // The genuine one does, also through a batch.
    let raw = acceptance(&l, env.now);
    let out = env.ingest_batch(&[(&raw, Source::default())]).unwrap();
    applied(&out[0]);
    assert_eq!(env.state(&l), "accepted");
    assert_eq!(env.db.get(&l.id).unwrap().unwrap().attempts[0].n, 1);
}

#[test]
fn anomaly_notice_names_the_real_sender() {
    let mut env = Env::new();
    let wrapped = b"From: Anna Neri <anna.neri@posta.sandbox.test>\r\nTo: protocollo@pec.comune.example.it\r\nSubject: Messaggio da casella ordinaria\r\nMessage-ID: <a.2@posta.sandbox.test>\r\n\r\nbuongiorno\r\n";
    let (raw, folder) = env.anomaly(wrapped);
    let notice = std::fs::read_to_string(folder.join("NON-CERTIFICATO.txt")).unwrap();
    assert!(
        notice.contains("Da / From: Anna Neri <anna.neri@posta.sandbox.test>\n"),
        "{notice}"
    );
    assert!(!notice.contains(SERVICE), "{notice}");
    let row = env.db.incoming(&store::sha256_hex(&raw)).unwrap().unwrap();
    assert_eq!(
        row.mittente.as_deref(),
        Some("anna.neri@posta.sandbox.test")
    );
}

#[test]
fn a_resync_under_a_new_uidvalidity_moves_messages_for_retention() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To)], false);
    let acc = acceptance(&l, env.now);
    let dlv = delivery(&l, env.now, A);
    let at = |uid, v| Source {
        uid: Some(uid),
        uidvalidity: Some(v),
    };
    applied(&env.ingest_from(&acc, at(5, 100)));
    applied(&env.ingest_batch(&[(&dlv, at(6, 100))]).unwrap()[0]);
    let later = env.now + SignedDuration::from_secs(1);
    assert_eq!(
        env.db
            .retention_candidates("protocollo", 100, later, 10)
            .unwrap(),
        vec![5, 6]
    );
    // The folder was recreated: both fetched again, one by each path.
    assert!(matches!(
        env.ingest_from(&acc, at(1, 200)),
        IngestOutcome::Duplicate { .. }
    ));
    assert!(matches!(
        env.ingest_batch(&[(&dlv, at(2, 200))]).unwrap()[0],
        IngestOutcome::Duplicate { .. }
    ));
    assert!(
        env.db
            .retention_candidates("protocollo", 100, later, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        env.db
            .retention_candidates("protocollo", 200, later, 10)
            .unwrap(),
        vec![1, 2]
    );
    // Same UIDVALIDITY, another UID (not a resync): the row stays.
    env.ingest_from(&acc, at(9, 200));
    assert_eq!(
        env.db
            .retention_candidates("protocollo", 200, later, 10)
            .unwrap(),
        vec![1, 2]
    );
    // Once retention handled it, a later resync does not bring it back.
    env.db
        .mark_retained("protocollo", 200, &[1], "expunge", later)
        .unwrap();
    env.ingest_from(&acc, at(3, 300));
    assert!(
        env.db
            .retention_candidates("protocollo", 300, later, 10)
            .unwrap()
            .is_empty()
    );
    let (uid, v): (i64, i64) = env
        .sql()
        .query_row(
            "SELECT imap_uid, imap_uidvalidity FROM messages WHERE sha256 = ?1",
            [store::sha256_hex(&acc)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((uid, v), (1, 200));
}

#[test]
fn batch_duplicates_within_one_batch_apply_once() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To), (B, Field::Cc)], false);
    let acc = acceptance(&l, env.now);
    let dlv = delivery(&l, env.now, A);
    let src = Source::default();
    let out = env
        .ingest_batch(&[(&acc, src), (&dlv, src), (&acc, src), (&dlv, src)])
        .unwrap();
    applied(&out[0]);
    applied(&out[1]);
    assert!(matches!(out[2], IngestOutcome::Duplicate { .. }), "{out:?}");
    assert!(matches!(out[3], IngestOutcome::Duplicate { .. }), "{out:?}");
    assert_eq!(env.recipient(&l, A).state, "delivered");
    assert_eq!(env.db.receipts_for(&l.id).unwrap().len(), 2);
    assert_eq!(env.count("messages") - 1, 2, "one row per distinct message");
    // Filed once each in the sent folder.
    let files = env.sent_files(&l);
    assert_eq!(
        files.iter().filter(|f| f.ends_with(".eml")).count(),
        2,
        "{files:?}"
    );
}

#[test]
fn batch_applies_valid_receipts_and_quarantines_forged_ones_beside_incoming_mail() {
    let mut env = Env::new();
    let l1 = env.letter(&[(A, Field::To)], false);
    let l2 = env.letter(&[(B, Field::To)], false);
    let acc1 = acceptance(&l1, env.now);
    let tx2 = tx_for(&l2, env.now, &[]);
    let forged = sign_with(&compose::acceptance(&tx2), &keys().forged, env.now);
    let tx_in = Transaction {
        identificativo: "opec.in.9@pec.altro.it".into(),
        msgid: Some("orig.9@pec.altro.it".into()),
        mittente: "mittente@pec.altro.it".into(),
        destinatari: vec![Destinatario {
            address: FROM.into(),
            tipo: "certificato".into(),
        }],
        ..tx_for(&l1, env.now, &[])
    };
    let incoming = signed(
        &compose::transport_envelope(&tx_in, &letter_with_attachments()),
        &tx_in,
    );
    let dlv1 = delivery(&l1, env.now, A);
    let src = Source::default();
    let out = env
        .ingest_batch(&[(&acc1, src), (&forged, src), (&incoming, src), (&dlv1, src)])
        .unwrap();
    applied(&out[0]);
    quarantined(&out[1]);
    assert!(matches!(out[2], IngestOutcome::Incoming { .. }), "{out:?}");
    applied(&out[3]);
    assert_eq!(env.state(&l1), "delivered");
    assert_eq!(
        env.state(&l2),
        "submitted",
        "a forged receipt changes nothing"
    );
    let r2 = env.db.receipts_for(&l2.id).unwrap();
    assert_eq!(r2.len(), 1);
    assert_eq!(r2[0].receipt.disposition, "quarantined");
    assert!(
        env.db
            .incoming(&store::sha256_hex(&incoming))
            .unwrap()
            .is_some()
    );
    assert!(env.db.verify_chain().unwrap().first_bad.is_none());
}

#[test]
fn a_failed_batch_leaves_nothing_half_applied_and_can_be_ingested_again() {
    let mut env = Env::new();
    let l = env.letter(&[(A, Field::To)], false);
    let acc = acceptance(&l, env.now);
    let dlv = delivery(&l, env.now, A);
    let before = (
        env.count("messages"),
        env.count("receipts"),
        env.count("events"),
    );
    // A real SQLite failure at the second receipt of the batch.
    env.sql()
        .execute_batch(
            "CREATE TRIGGER fail_delivery BEFORE INSERT ON receipts \
             WHEN NEW.kind = 'avvenuta-consegna' \
             BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;",
        )
        .unwrap();
    let src = Source {
        uid: Some(1),
        uidvalidity: Some(7),
    };
    let err = env.ingest_batch(&[(&acc, src), (&dlv, src)]).unwrap_err();
    assert!(err.contains("disk trouble"), "{err}");
    assert_eq!(
        (
            env.count("messages"),
            env.count("receipts"),
            env.count("events")
        ),
        before,
        "nothing of the batch is committed"
    );
    assert_eq!(env.state(&l), "submitted");
    assert!(env.sent_files(&l).iter().all(|f| !f.ends_with(".eml")));
    // The evidence is archived already.
    for raw in [&acc, &dlv] {
        let sha = store::sha256_hex(raw);
        let path = env
            .root
            .join("archive")
            .join(&sha[..2])
            .join(&sha[2..4])
            .join(format!("{sha}.eml"));
        assert!(path.exists(), "{}", path.display());
    }
    // Once the store works again the same batch goes through.
    env.sql()
        .execute_batch("DROP TRIGGER fail_delivery;")
        .unwrap();
    let out = env.ingest_batch(&[(&acc, src), (&dlv, src)]).unwrap();
    applied(&out[0]);
    applied(&out[1]);
    assert_eq!(env.state(&l), "delivered");
    assert_eq!(env.db.receipts_for(&l.id).unwrap().len(), 2);
    assert!(env.db.verify_chain().unwrap().first_bad.is_none());
}
