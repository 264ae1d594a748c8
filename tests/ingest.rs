//! The ingest path against a real store in a temporary directory, with
//! receipts composed by `pec::compose` and signed at test time by a test CA.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use jiff::{SignedDuration, Timestamp};
use pecgate::config::{Config, MailboxConfig};
use pecgate::ingest::{Context, IngestOutcome, Source, ingest, sanitize_file_name};
use pecgate::pec::compose::{
    self, Composed, DeliveryContent, Destinatario, Errore, ReceiptType, Transaction,
};
use pecgate::pki::{self, CertKey, Digest, ProviderProfile, SignOptions, Validity};
use pecgate::store::{self, Db, Field, MessageRow, NewDispatch, NewRecipient};
use pecgate::verify::{TrustAnchors, Verifier};

const SERVICE: &str = "posta-certificata@pec.example.it";
const FROM: &str = "protocollo@pec.comune.example.it";
const A: &str = "alfa@pec.example.it";
const B: &str = "beta@pec.example.it";
const X: &str = "info@example.com";

struct Keys {
    ca: CertKey,
    provider: CertKey,
    forged: CertKey,
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let now = Timestamp::now();
        let v = Validity {
            not_before: now - SignedDuration::from_hours(24 * 400),
            not_after: now + SignedDuration::from_hours(24 * 400),
        };
        let profile = ProviderProfile {
            organization: "Esempio PEC S.p.A.".into(),
            common_name: "Posta Certificata ESEMPIO".into(),
            email: SERVICE.into(),
            validity: v,
            pec_policy: true,
            key_bits: 2048,
        };
        let ca = pki::make_ca("PEC Test CA", "Test", v, 2048).unwrap();
        let provider = pki::make_provider_cert(&ca, &profile).unwrap();
        let other = pki::make_ca("PEC Test CA", "Test", v, 2048).unwrap();
        let forged = pki::make_provider_cert(&other, &profile).unwrap();
        Keys {
            ca,
            provider,
            forged,
        }
    })
}

fn sign_with(c: &Composed, key: &CertKey, at: Timestamp) -> Vec<u8> {
    let opts = SignOptions {
        digest: Digest::Sha256,
        signing_time: Some(at),
        x_protocol: true,
    };
    pki::sign_detached(&c.outer_headers, &c.entity, key, &[], &opts).unwrap()
}

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
        let id = store::new_dispatch_id(self.now.as_millisecond() as u64);
        let sent_dir = pecgate::sent::folder(&self.mailbox.sent, self.now, &id);
        pecgate::archive::create_folder(&self.mailbox.sent, &sent_dir).unwrap();
        let content_hash = pecgate::store::sha256_hex(id.as_bytes());
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
                content_hash,
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
            recipients: recipients
                .iter()
                .map(|(a, f)| (a.to_string(), *f))
                .collect(),
        }
    }

    fn ingest(&mut self, raw: &[u8]) -> IngestOutcome {
        let archive = self.root.join("archive");
        let ctx = Context {
            mailbox: &self.mailbox,
            archive: &archive,
            verifier: &self.verifier,
        };
        ingest(&mut self.db, &ctx, raw, Source::default(), self.now).unwrap()
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

fn tx_for(l: &Letter, at: Timestamp, external: &[&str]) -> Transaction {
    Transaction {
        identificativo: format!("opec.{}@pec.example.it", l.id.to_lowercase()),
        time: at.in_tz("Europe/Rome").unwrap(),
        mittente: FROM.into(),
        destinatari: l
            .recipients
            .iter()
            .map(|(a, _)| Destinatario {
                address: a.clone(),
                tipo: if external.contains(&a.as_str()) {
                    "esterno".into()
                } else {
                    "certificato".into()
                },
            })
            .collect(),
        risposte: FROM.into(),
        oggetto: "Prova".into(),
        msgid: Some(l.mid.clone()),
        gestore: "Esempio PEC".into(),
        service_address: SERVICE.into(),
        ricevuta: ReceiptType::Completa,
    }
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

fn hours(h: i64) -> SignedDuration {
    SignedDuration::from_hours(h)
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
    let time = env.now.in_tz("Europe/Rome").unwrap();
    let c = compose::anomaly_envelope(wrapped, SERVICE, &time, "non certificato");
    let raw = sign_with(&c, &keys().provider, env.now);
    let IngestOutcome::Anomaly { folder } = env.ingest(&raw) else {
        panic!("not an anomaly")
    };
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
