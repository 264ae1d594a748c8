//! Acceptance tests of the outbound path (issue 5): the real `pecgate run`
//! binary against an in-process sandbox in a temporary directory. Letters
//! are dropped into the outbox as a clerk would; the results are read from
//! `pecgate list --json`, the daemon's JSON log, the store, the sent
//! folders and the sandbox mailboxes (IMAP).
//!
//! Receipts are not processed yet (issue 6): dispatch states stop at
//! submitted / uncertain / refused, and delivery is checked in the
//! recipients' mailboxes, acceptance in the office mailbox.
//!
//! Dovecot must be installed (see tests/sandbox_support).

mod outbound_support;
#[path = "sandbox_support/mod.rs"]
mod sandbox_support;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outbound_support::*;
use pecgate::pec::kind::Kind;
use sandbox_support::{
    ANAGRAFE, ANNA, Env, GIULIA, LUCA, MARIO, OFFICE, PAOLO, attachments, within,
};
use serde_json::Value;

// ---------------------------------------------------------------------------
// 1. End to end

/// What a letter should look like once sent.
struct Expect {
    subject: String,
    source: String,
    kind: &'static str,
    protocol: Option<&'static str>,
    reference: Option<String>,
    receipt: &'static str,
    to: Vec<&'static str>,
    cc: Vec<&'static str>,
    /// (file name, bytes), in envelope order.
    documents: Vec<(String, Vec<u8>)>,
}

impl Expect {
    fn recipients(&self) -> Vec<&'static str> {
        self.to.iter().chain(&self.cc).copied().collect()
    }
}

fn is_ordinary(address: &str) -> bool {
    address.ends_with("@posta.sandbox.test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_reach_each_recipient_once_and_are_filed() {
    within(240, async {
        let env = Env::start(1.0, None).await;
        let mut gw = Gateway::start(&env, &[]).await;
        let outbox = gw.outbox();
        let mut expected = Vec::new();

        // A single letter with a document, protocol, reference and kind.
        let cert = document("certificato-residenza-rossi.pdf");
        drop_letter(
            &outbox,
            "certificato-77.toml",
            &format!(
                r#"to = ["{MARIO}"]
cc = []
subject = "Certificato di residenza"
body = """
Gentile signor Rossi,

come richiesto, Le trasmettiamo in allegato il certificato di residenza.

Cordiali saluti
Ufficio Anagrafe
"""
attachments = ["certificato-residenza-rossi.pdf"]
kind = "certificato"
protocol = "2026/0001234"
reference = "pratica-77"
receipt = "completa"
allow_duplicate = false
"#
            ),
            &[("certificato-residenza-rossi.pdf", &cert)],
        );
        expected.push(Expect {
            subject: "Certificato di residenza".into(),
            source: "certificato-77.toml".into(),
            kind: "certificato",
            protocol: Some("2026/0001234"),
            reference: Some("pratica-77".into()),
            receipt: "completa",
            to: vec![MARIO],
            cc: vec![],
            documents: vec![("certificato-residenza-rossi.pdf".into(), cert.clone())],
        });

        // To + Cc, receipt breve.
        let det = document("determina-2026-123.pdf");
        drop_letter(
            &outbox,
            "comunicazione.toml",
            &format!(
                r#"to = "{MARIO}"
cc = ["{ANAGRAFE}"]
subject = "Comunicazione di avvio del procedimento"
body = "Si comunica l'avvio del procedimento."
attachments = ["determina-2026-123.pdf"]
kind = "raccomandata"
receipt = "breve"
"#
            ),
            &[("determina-2026-123.pdf", &det)],
        );
        expected.push(Expect {
            subject: "Comunicazione di avvio del procedimento".into(),
            source: "comunicazione.toml".into(),
            kind: "raccomandata",
            protocol: None,
            reference: None,
            receipt: "breve",
            to: vec![MARIO],
            cc: vec![ANAGRAFE],
            documents: vec![("determina-2026-123.pdf".into(), det.clone())],
        });

        // A certified and an ordinary recipient, text only.
        drop_letter(
            &outbox,
            "avviso-misto.toml",
            &format!(
                r#"to = ["{GIULIA}", "{ANNA}"]
subject = "Avviso di chiusura degli uffici"
body = "Gli uffici resteranno chiusi il 2 giugno."
kind = "avviso"
"#
            ),
            &[],
        );
        expected.push(Expect {
            subject: "Avviso di chiusura degli uffici".into(),
            source: "avviso-misto.toml".into(),
            kind: "avviso",
            protocol: None,
            reference: None,
            receipt: "completa",
            to: vec![GIULIA, ANNA],
            cc: vec![],
            documents: vec![],
        });

        // A mass mailing of five rows (template + CSV + documents).
        let informativa = document("informativa-tari-2026.pdf");
        let rows: [(&str, &str, &str); 5] = [
            (LUCA, "Luca Verdi", "000123"),
            (GIULIA, "Giulia Bianchi", "000124"),
            (MARIO, "Mario Rossi", "000125"),
            (ANAGRAFE, "Verdi S.r.l.; sede di Lucca", "000126"),
            (PAOLO, "Paolo Gialli", "000127"),
        ];
        let mut csv = String::from("to;nominativo;numero;scadenza;attachment\n");
        let mut files: Vec<(String, Vec<u8>)> =
            vec![("informativa-tari-2026.pdf".into(), informativa.clone())];
        for (i, (to, name, n)) in rows.iter().enumerate() {
            let quoted = if name.contains(';') {
                format!("\"{name}\"")
            } else {
                (*name).to_owned()
            };
            csv.push_str(&format!(
                "{to};{quoted};{n};16 maggio 2026;avviso-{n}.pdf\n"
            ));
            let avviso = document(&format!("avviso-{n}.pdf"));
            files.push((format!("avviso-{n}.pdf"), avviso.clone()));
            expected.push(Expect {
                subject: format!("Avviso di pagamento TARI 2026 n. {n}"),
                source: format!("avvisi-tari.csv#{}", i + 2),
                kind: "tributi",
                protocol: None,
                reference: Some(format!("tari-2026-{n}")),
                receipt: "completa",
                to: vec![to],
                cc: vec![],
                documents: vec![
                    ("informativa-tari-2026.pdf".into(), informativa.clone()),
                    (format!("avviso-{n}.pdf"), avviso),
                ],
            });
        }
        let template = r#"subject = "Avviso di pagamento TARI 2026 n. {numero}"
body = """
Gentile {nominativo},

in allegato l'avviso di pagamento n. {numero} della TARI 2026, con
scadenza {scadenza}, e l'informativa del Comune.

Ufficio Tributi
"""
attachments = ["informativa-tari-2026.pdf"]
kind = "tributi"
reference = "tari-2026-{numero}"
receipt = "completa"
"#;
        files.push(("avvisi-tari.csv".into(), csv.into_bytes()));
        files.push(("avvisi-tari.toml".into(), template.as_bytes().to_vec()));
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        drop_files(&outbox, &refs);

        // Every letter is submitted, with the right fields.
        let list = gw
            .wait_settled(expected.len(), Duration::from_secs(60))
            .await;
        let db = gw.db();
        let mut message_ids: HashMap<String, String> = HashMap::new();
        for e in &expected {
            let d = by_subject(&list, &e.subject);
            let id = s(&d["dispatch_id"]).to_owned();
            assert_eq!(d["state"], "submitted", "{}", e.subject);
            assert_eq!(d["mailbox"], MAILBOX);
            assert_eq!(d["kind"], e.kind, "{}", e.subject);
            assert_eq!(d["protocol"].as_str(), e.protocol, "{}", e.subject);
            assert_eq!(
                d["reference"].as_str(),
                e.reference.as_deref(),
                "{}",
                e.subject
            );
            assert_eq!(
                d["identificativo"],
                Value::Null,
                "no receipt is processed yet"
            );
            assert_eq!(id.len(), 26, "a ULID: {id}");
            let mid = s(&d["message_id"]).to_owned();
            let (prefix, host) = mid.split_once('@').expect("message id with @");
            assert_eq!(host, GATEWAY_HOST, "{mid}");
            let parts: Vec<&str> = prefix.split('.').collect();
            assert_eq!(parts.len(), 3, "{mid}");
            assert_eq!((parts[0], parts[1]), (id.as_str(), "1"), "{mid}");
            assert_eq!(parts[2].len(), 12, "{mid}");
            let recipients: Vec<(String, String, Value, String)> = d["recipients"]
                .as_array()
                .expect("recipients")
                .iter()
                .map(|r| {
                    (
                        s(&r["address"]).to_owned(),
                        s(&r["field"]).to_owned(),
                        r["certified"].clone(),
                        s(&r["state"]).to_owned(),
                    )
                })
                .collect();
            let want: Vec<(String, String, Value, String)> =
                e.to.iter()
                    .map(|a| {
                        (
                            (*a).to_owned(),
                            "to".to_owned(),
                            Value::Null,
                            "pending".to_owned(),
                        )
                    })
                    .chain(e.cc.iter().map(|a| {
                        (
                            (*a).to_owned(),
                            "cc".to_owned(),
                            Value::Null,
                            "pending".to_owned(),
                        )
                    }))
                    .collect();
            assert_eq!(recipients, want, "{}", e.subject);
            let sent_dir = PathBuf::from(s(&d["sent_dir"]));
            let created: jiff::Timestamp = s(&d["created_at"]).parse().expect("created_at");
            assert_eq!(
                sent_dir,
                pecgate::sent::folder(&gw.sent(), created, &id),
                "sent/YYYY/MM/<dispatch-id>"
            );
            // The store agrees, and has one attempt.
            let detail = db.get(&id).expect("get").expect("dispatch in the store");
            assert_eq!(detail.dispatch.source, e.source);
            assert_eq!(detail.dispatch.receipt_type, e.receipt);
            assert_eq!(detail.attempts.len(), 1);
            assert_eq!(detail.attempts[0].state, "submitted");
            assert_eq!(detail.attempts[0].message_id, mid);
            message_ids.insert(e.subject.clone(), mid);
        }

        // The sent folders.
        for e in &expected {
            let d = by_subject(&list, &e.subject);
            check_sent_folder(d, e).await;
        }

        // The mailboxes: each letter exactly once in each recipient's
        // mailbox, one acceptance per letter, one delivery receipt per
        // certified recipient.
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for e in &expected {
            for r in e.recipients() {
                *counts.entry(r).or_default() += 1;
            }
        }
        let deliveries: usize = expected
            .iter()
            .map(|e| e.recipients().iter().filter(|r| !is_ordinary(r)).count())
            .sum();
        let mut wanted: Vec<(&str, usize)> = counts.iter().map(|(a, n)| (*a, *n)).collect();
        wanted.sort();
        wanted.push((OFFICE, expected.len() + deliveries));
        let boxes = mailboxes_exactly(&env, &wanted).await;
        let by_address: HashMap<&str, &Vec<sandbox_support::Sys>> =
            wanted.iter().map(|(a, _)| *a).zip(boxes.iter()).collect();
        let office = by_address[OFFICE];
        for e in &expected {
            let d = by_subject(&list, &e.subject);
            let mid = &message_ids[&e.subject];
            let inviato = fs::read(Path::new(s(&d["sent_dir"])).join("00-inviato.eml"))
                .expect("00-inviato.eml");
            for r in e.recipients() {
                let got = referring(by_address[r], &Kind::Transport, mid);
                assert_eq!(got.len(), 1, "{} -> {r}: envelopes", e.subject);
                let env_msg = got[0];
                assert_eq!(
                    env_msg.subject.as_deref(),
                    Some(format!("POSTA CERTIFICATA: {}", e.subject).as_str())
                );
                let postacert = env_msg.postacert.as_ref().expect("postacert.eml");
                // Byte-identical but for the two header fields the provider
                // rewrites.
                assert_eq!(
                    String::from_utf8_lossy(&without_fields(
                        postacert,
                        &["Message-ID", "X-Riferimento-Message-ID"]
                    )),
                    String::from_utf8_lossy(&without_fields(&inviato, &["Message-ID"])),
                    "{} -> {r}: postacert.eml is 00-inviato.eml",
                    e.subject
                );
                assert_eq!(
                    sandbox_support::header(postacert, "X-Riferimento-Message-ID").as_deref(),
                    Some(format!("<{mid}>").as_str())
                );
                let docs = attachments(postacert);
                assert_eq!(docs, e.documents, "{} -> {r}: documents", e.subject);
                let delivered = referring(office, &Kind::Delivery, mid)
                    .into_iter()
                    .filter(|x| x.d().consegna.as_deref() == Some(r))
                    .count();
                let want = usize::from(!is_ordinary(r));
                assert_eq!(delivered, want, "{} -> {r}: delivery receipts", e.subject);
            }
            let acc = referring(office, &Kind::Acceptance, mid);
            assert_eq!(acc.len(), 1, "{}: acceptances", e.subject);
            let daticert = acc[0].d();
            assert_eq!(daticert.msgid.as_deref(), Some(mid.as_str()));
            let listed: Vec<(String, String)> = daticert
                .destinatari
                .iter()
                .map(|x| (x.address.clone(), x.tipo.clone()))
                .collect();
            let want: Vec<(String, String)> = e
                .recipients()
                .iter()
                .map(|r| {
                    let tipo = if is_ordinary(r) {
                        "esterno"
                    } else {
                        "certificato"
                    };
                    ((*r).to_owned(), tipo.to_owned())
                })
                .collect();
            assert_eq!(listed, want, "{}: acceptance recipients", e.subject);
        }
        // Nothing else reached anyone (every message is accounted for).
        for (address, list) in &by_address {
            for m in list.iter() {
                let mid = m.refers_to.clone().unwrap_or_default();
                assert!(
                    message_ids.values().any(|x| *x == mid),
                    "{address}: unexpected {} {:?}",
                    m.kind,
                    m.subject
                );
            }
        }

        assert_outbox_drained(&outbox, false);
        gw.stop_cleanly().await;
        drop(db);
        env.shutdown().await;
    })
    .await;
}

/// The sent folder of one letter: documents, the exact message, dispatch.json
/// and the status files.
async fn check_sent_folder(d: &Value, e: &Expect) {
    let id = s(&d["dispatch_id"]);
    let mid = s(&d["message_id"]);
    let dir = PathBuf::from(s(&d["sent_dir"]));
    // dispatch.json and the status files are rewritten right after the
    // commit that `list` shows: wait for them.
    let record: Value = eventually(
        &format!("{}: dispatch.json with the submitted attempt", e.subject),
        Duration::from_secs(10),
        || {
            let v: Value =
                serde_json::from_slice(&fs::read(dir.join("dispatch.json")).ok()?).ok()?;
            (v["attempts"][0]["state"] == "submitted").then_some(v)
        },
    )
    .await;
    let status: Value = eventually(
        &format!("{}: status.json submitted", e.subject),
        Duration::from_secs(10),
        || {
            let v: Value = serde_json::from_slice(&fs::read(dir.join("status.json")).ok()?).ok()?;
            (v["state"] == "submitted").then_some(v)
        },
    )
    .await;
    let mut want_files: Vec<String> = e.documents.iter().map(|(n, _)| n.clone()).collect();
    want_files.extend(
        [
            "00-inviato.eml",
            "dispatch.json",
            "status.json",
            "status.txt",
        ]
        .map(String::from),
    );
    want_files.sort();
    assert_eq!(entries(&dir), want_files, "{}: sent folder", e.subject);
    for (name, bytes) in &e.documents {
        assert_eq!(
            &fs::read(dir.join(name)).expect("document"),
            bytes,
            "{}: {name}",
            e.subject
        );
    }
    let eml = fs::read(dir.join("00-inviato.eml")).expect("00-inviato.eml");
    let h = |n: &str| sandbox_support::header(&eml, n);
    assert_eq!(h("Message-ID"), Some(format!("<{mid}>")));
    assert_eq!(h("From").as_deref(), Some(OFFICE));
    assert_eq!(h("To").as_deref(), Some(e.to.join(", ").as_str()));
    assert_eq!(
        h("Cc").as_deref(),
        (!e.cc.is_empty()).then(|| e.cc.join(", ")).as_deref()
    );
    assert_eq!(h("Bcc"), None);
    assert_eq!(h("X-TipoRicevuta").as_deref(), Some(e.receipt));
    assert_eq!(
        attachments(&eml),
        e.documents,
        "{}: 00-inviato.eml documents",
        e.subject
    );

    assert_eq!(record["dispatch_id"], id);
    assert_eq!(record["mailbox"], MAILBOX);
    assert_eq!(record["from"], OFFICE);
    assert_eq!(record["source"], e.source.as_str());
    let env_rec = &record["envelope"];
    assert_eq!(env_rec["to"], serde_json::json!(e.to));
    assert_eq!(env_rec["cc"], serde_json::json!(e.cc));
    assert_eq!(env_rec["subject"], e.subject.as_str());
    assert_eq!(env_rec["kind"], e.kind);
    assert_eq!(env_rec["protocol"].as_str(), e.protocol);
    assert_eq!(env_rec["reference"].as_str(), e.reference.as_deref());
    assert_eq!(env_rec["receipt"], e.receipt);
    assert_eq!(env_rec["allow_duplicate"], false);
    let docs: Vec<(String, String, u64)> = env_rec["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .map(|a| {
            (
                s(&a["name"]).to_owned(),
                s(&a["sha256"]).to_owned(),
                a["size"].as_u64().expect("size"),
            )
        })
        .collect();
    let want_docs: Vec<(String, String, u64)> = e
        .documents
        .iter()
        .map(|(n, b)| (n.clone(), sha256_hex(b), b.len() as u64))
        .collect();
    assert_eq!(docs, want_docs, "{}: dispatch.json documents", e.subject);
    let attempts = record["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["n"], 1);
    assert_eq!(attempts[0]["message_id"], mid);
    assert_eq!(attempts[0]["eml"], "00-inviato.eml");
    assert_eq!(attempts[0]["eml_sha256"], sha256_hex(&eml).as_str());
    assert!(
        s(&attempts[0]["smtp_reply"]).starts_with("250"),
        "{}",
        attempts[0]["smtp_reply"]
    );

    assert_eq!(status["dispatch_id"], id);
    assert_eq!(status["subject"], e.subject.as_str());
    assert_eq!(status["attempts"][0]["message_id"], mid);
    let txt = fs::read_to_string(dir.join("status.txt")).expect("status.txt");
    assert!(txt.contains(&format!("Lettera / Letter: {id}\n")), "{txt}");
    assert!(
        txt.contains(&format!("Oggetto / Subject: {}\n", e.subject)),
        "{txt}"
    );
    assert!(txt.contains("(submitted)"), "{txt}");
    for r in e.recipients() {
        assert!(txt.contains(r), "{txt}");
    }
}

// ---------------------------------------------------------------------------
// 2. Rejections

/// Waits for `outbox/rejected/STEM/STEM.error.txt` and checks the folder:
/// exactly the letter's files, untouched, plus the error file, which names
/// `field` with `it` in the Italian part and `en` in the English part (one
/// problem). Returns the error text.
async fn check_rejected(
    outbox: &Path,
    stem: &str,
    files: &[(&str, &[u8])],
    field: &str,
    it: &str,
    en: &str,
) -> String {
    let dir = outbox.join("rejected").join(stem);
    let report = dir.join(format!("{stem}.error.txt"));
    let text = eventually(
        &format!("{} written", report.display()),
        Duration::from_secs(30),
        || fs::read_to_string(&report).ok(),
    )
    .await;
    let mut want: Vec<String> = files.iter().map(|(n, _)| (*n).to_owned()).collect();
    want.push(format!("{stem}.error.txt"));
    want.sort();
    assert_eq!(entries(&dir), want, "{stem}: rejected folder");
    for (name, bytes) in files {
        assert_eq!(
            fs::read(dir.join(name)).expect("rejected file"),
            *bytes,
            "{stem}: {name} untouched"
        );
    }
    let (italian, english) = text
        .split_once("=== ENGLISH ===")
        .unwrap_or_else(|| panic!("{stem}: no English part:\n{text}"));
    assert!(
        text.starts_with(&format!(
            "pecgate: LETTERA NON INVIATA / LETTER NOT SENT: {stem}.toml\n"
        )),
        "{text}"
    );
    assert!(italian.contains("=== ITALIANO ==="), "{text}");
    assert!(italian.contains("Problemi da correggere (1):"), "{text}");
    assert!(english.contains("Problems to fix (1):"), "{text}");
    assert!(
        italian.contains(&format!("1. [{field}] ")) && italian.contains(it),
        "{stem}: Italian part names [{field}] and says {it:?}:\n{text}"
    );
    let english = english.split("=== FILE ===").next().unwrap_or_default();
    assert!(
        english.contains(&format!("1. [{field}] ")) && english.contains(en),
        "{stem}: English part names [{field}] and says {en:?}:\n{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_reason_is_explained_and_the_files_are_kept() {
    within(240, async {
        let env = Env::start(1.0, None).await;
        let mut gw = Gateway::start(
            &env,
            &[("PECGATE__MAILBOX__PROTOCOLLO__LIMITS__MAX_RECIPIENTS", "2")],
        )
        .await;
        let outbox = gw.outbox();

        let bad_address = String::from(
            "to = [\"mario.rossi.pec.cittadini.sandbox.test\"]\nsubject = \"Indirizzo errato\"\nbody = \"Testo.\"\n",
        );
        let missing = format!(
            "to = [\"{MARIO}\"]\nsubject = \"Delibera\"\nbody = \"In allegato.\"\nattachments = [\"delibera-45.pdf\"]\n"
        );
        let exe = format!(
            "to = [\"{MARIO}\"]\nsubject = \"Programma\"\nbody = \"In allegato.\"\nattachments = [\"programma.exe\"]\n"
        );
        let exe_bytes = b"MZ\x90\x00\x03\x00\x00\x00 not really a program".to_vec();
        let unknown_key = format!(
            "to = [\"{MARIO}\"]\nsubject = \"Richiesta\"\nprotocolo = \"2026/0000001\"\nbody = \"Testo.\"\n"
        );
        let empty_subject = format!("to = [\"{MARIO}\"]\nsubject = \"\"\nbody = \"Testo.\"\n");
        let too_many = format!(
            "to = [\"{MARIO}\", \"{GIULIA}\"]\ncc = [\"{LUCA}\"]\nsubject = \"A tre\"\nbody = \"Testo.\"\n"
        );
        let doc = document("modulo.pdf");
        drop_letter(&outbox, "indirizzo-errato.toml", &bad_address, &[]);
        drop_letter(
            &outbox,
            "eseguibile.toml",
            &exe,
            &[("programma.exe", &exe_bytes)],
        );
        drop_letter(&outbox, "chiave-sconosciuta.toml", &unknown_key, &[]);
        drop_letter(&outbox, "oggetto-vuoto.toml", &empty_subject, &[]);
        drop_letter(&outbox, "troppi-destinatari.toml", &too_many, &[]);
        // A letter whose document never came: it waits (an hour) for the
        // document, then is refused. Its envelope is made two hours old.
        drop_letter(
            &outbox,
            "allegato-mancante.toml",
            &missing,
            &[("modulo.pdf", &doc)],
        );
        age_file(&outbox.join("allegato-mancante.toml"), Duration::from_secs(7200));

        check_rejected(
            &outbox,
            "indirizzo-errato",
            &[("indirizzo-errato.toml", bad_address.as_bytes())],
            "to[0]",
            "manca la @",
            "the @ is missing",
        )
        .await;
        check_rejected(
            &outbox,
            "eseguibile",
            &[
                ("eseguibile.toml", exe.as_bytes()),
                ("programma.exe", &exe_bytes),
            ],
            "attachments[0]",
            "i file .exe non si possono inviare da questa casella (\"programma.exe\")",
            ".exe files cannot be sent from this mailbox (\"programma.exe\")",
        )
        .await;
        check_rejected(
            &outbox,
            "chiave-sconosciuta",
            &[("chiave-sconosciuta.toml", unknown_key.as_bytes())],
            "protocolo",
            "chiave sconosciuta \"protocolo\"",
            "unknown key \"protocolo\"",
        )
        .await;
        let text = fs::read_to_string(
            outbox.join("rejected/chiave-sconosciuta/chiave-sconosciuta.error.txt"),
        )
        .expect("error file");
        assert!(text.contains("(forse \"protocol\"?)"), "{text}");
        assert!(text.contains("(did you mean \"protocol\"?)"), "{text}");
        check_rejected(
            &outbox,
            "oggetto-vuoto",
            &[("oggetto-vuoto.toml", empty_subject.as_bytes())],
            "subject",
            "l'oggetto è vuoto",
            "the subject is empty",
        )
        .await;
        check_rejected(
            &outbox,
            "troppi-destinatari",
            &[("troppi-destinatari.toml", too_many.as_bytes())],
            "to",
            "troppi destinatari: 3 (to + cc), la casella ne ammette al massimo 2",
            "too many recipients: 3 (to + cc), the mailbox allows at most 2",
        )
        .await;
        check_rejected(
            &outbox,
            "allegato-mancante",
            &[("allegato-mancante.toml", missing.as_bytes())],
            "attachments[0]",
            "il file \"delibera-45.pdf\" non è nella cartella outbox",
            "the file \"delibera-45.pdf\" is not in the outbox folder",
        )
        .await;
        // The document it did not name stays in the outbox, untouched.
        assert_eq!(fs::read(outbox.join("modulo.pdf")).expect("modulo.pdf"), doc);
        fs::remove_file(outbox.join("modulo.pdf")).expect("remove modulo.pdf");

        // Each refusal is logged with the fields named.
        for (stem, field) in [
            ("indirizzo-errato", "to[0]"),
            ("eseguibile", "attachments[0]"),
            ("chiave-sconosciuta", "protocolo"),
            ("oggetto-vuoto", "subject"),
            ("troppi-destinatari", "to"),
            ("allegato-mancante", "attachments[0]"),
        ] {
            // The error file is written before the refusal is logged: wait
            // for the log line.
            let lines: Vec<Value> = eventually(
                &format!("{stem}: letter.rejected logged"),
                Duration::from_secs(30),
                || {
                    let lines: Vec<Value> = gw
                        .events("letter.rejected")
                        .into_iter()
                        // (intake logs the refusal too, with the number of problems)
                        .filter(|l| {
                            l["letter"] == format!("{stem}.toml") && l["problems"].is_string()
                        })
                        .collect();
                    (!lines.is_empty()).then_some(lines)
                },
            )
            .await;
            assert_eq!(lines.len(), 1, "{stem}: letter.rejected log lines");
            assert_eq!(lines[0]["problems"], field, "{stem}");
            assert_eq!(lines[0]["mailbox"], MAILBOX);
        }
        // Nothing was stored for them.
        assert!(gw.list(None).await.is_empty(), "no dispatch for a refused letter");

        // A duplicate: the same letter again is refused, naming the first;
        // with allow_duplicate = true it is sent.
        let dup = format!(
            "to = [\"{ANAGRAFE}\"]\nsubject = \"Convocazione\"\nbody = \"Lei e' convocato.\"\nattachments = [\"convocazione.pdf\"]\n"
        );
        let convocazione = document("convocazione.pdf");
        drop_letter(
            &outbox,
            "convocazione.toml",
            &dup,
            &[("convocazione.pdf", &convocazione)],
        );
        let list = gw.wait_settled(1, Duration::from_secs(30)).await;
        assert_eq!(list[0]["state"], "submitted");
        let first = s(&list[0]["dispatch_id"]).to_owned();
        drop_letter(
            &outbox,
            "convocazione.toml",
            &dup,
            &[("convocazione.pdf", &convocazione)],
        );
        check_rejected(
            &outbox,
            "convocazione",
            &[
                ("convocazione.toml", dup.as_bytes()),
                ("convocazione.pdf", &convocazione),
            ],
            "allow_duplicate",
            &format!("è già stata inviata: spedizione {first}. Se va davvero inviata di nuovo, aggiungere alla busta la riga allow_duplicate = true"),
            &format!("was already sent: dispatch {first}. If it really must be sent again, add the line allow_duplicate = true"),
        )
        .await;
        assert_eq!(gw.list(None).await.len(), 1, "the duplicate was not stored");
        let again = format!("{dup}allow_duplicate = true\n");
        drop_letter(
            &outbox,
            "convocazione.toml",
            &again,
            &[("convocazione.pdf", &convocazione)],
        );
        let list = gw.wait_settled(2, Duration::from_secs(30)).await;
        assert!(list.iter().all(|d| d["state"] == "submitted"), "{list:?}");
        assert!(list.iter().all(|d| d["subject"] == "Convocazione"));
        let second = list
            .iter()
            .map(|d| s(&d["dispatch_id"]).to_owned())
            .find(|id| *id != first)
            .expect("a second dispatch");
        let db = gw.db();
        let detail = db.get(&second).expect("get").expect("second dispatch");
        assert_eq!(
            detail.dispatch.content_hash,
            db.get(&first).expect("get").expect("first").dispatch.content_hash,
            "the same letter"
        );
        let record: Value = serde_json::from_slice(
            &fs::read(Path::new(&detail.dispatch.sent_dir).join("dispatch.json")).expect("dispatch.json"),
        )
        .expect("dispatch.json is JSON");
        assert_eq!(record["envelope"]["allow_duplicate"], true);
        // Both reached the recipient, each once.
        let boxes = mailboxes_exactly(&env, &[(ANAGRAFE, 2), (OFFICE, 4)]).await;
        for d in &list {
            let mid = s(&d["message_id"]);
            assert_eq!(referring(&boxes[0], &Kind::Transport, mid).len(), 1, "{mid}");
            assert_eq!(referring(&boxes[1], &Kind::Acceptance, mid).len(), 1, "{mid}");
            assert_eq!(referring(&boxes[1], &Kind::Delivery, mid).len(), 1, "{mid}");
        }

        assert_outbox_drained(&outbox, true);
        gw.stop_cleanly().await;
        drop(db);
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. Crash safety

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_no_letter_is_sent_twice_or_lost() {
    within(300, async {
        const LETTERS: usize = 200;
        let seed = test_seed();
        let mut rng = Rng::new(seed);
        let citizens = [ANAGRAFE, MARIO, GIULIA, LUCA];
        let recipient = |n: usize| citizens[n % citizens.len()];
        let env = Env::start(1.0, None).await;
        let vars = [("PECGATE__MAILBOX__PROTOCOLLO__PACE__PER_MINUTE", "100000")];
        let mut gw = Gateway::start(&env, &vars).await;
        let outbox = gw.outbox();

        // 200 letters at once.
        drop_numbered_letters(&outbox, LETTERS, recipient);

        // Killed (SIGKILL) at random moments, restarted each time.
        let kills = rng.range(3, 5);
        let started = Instant::now();
        for k in 1..=kills {
            let delay = Duration::from_millis(rng.range(200, 2000));
            tokio::time::sleep(delay).await;
            gw.kill();
            let counts = gw.db().state_counts().expect("state counts");
            let pending = entries(&outbox).iter().filter(|n| n.ends_with(".toml")).count();
            let claimed = entries(&outbox.join(".processing")).len();
            eprintln!(
                "kill {k}/{kills} (seed {seed:#x}) after {delay:?}: {pending} envelopes in the outbox, \
                 {claimed} claims, states {:?}",
                counts
                    .iter()
                    .map(|c| format!("{}={}", c.state, c.count))
                    .collect::<Vec<_>>()
            );
            gw.spawn();
        }

        // Left to run until everything is taken in and nothing is queued
        // or in flight.
        gw.wait_list(
            "200 letters, none queued or sending, outbox drained",
            Duration::from_secs(150),
            |l| {
                l.len() == LETTERS
                    && l.iter().all(|d| d["state"] != "queued" && d["state"] != "sending")
                    && !entries(&outbox).iter().any(|n| n.ends_with(".toml"))
                    && entries(&outbox.join(".processing")).is_empty()
            },
        )
        .await;
        eprintln!("drained {:?} after the letters were dropped", started.elapsed());
        gw.stop_cleanly().await;
        assert_outbox_drained(&outbox, false);

        // The store: every letter exactly once, with its one recipient.
        let db = gw.db();
        let dispatches = all_dispatches(&db);
        assert_eq!(dispatches.len(), LETTERS, "one dispatch per letter");
        let mut by_letter: HashMap<usize, &pecgate::store::DispatchDetail> = HashMap::new();
        for d in &dispatches {
            let n: usize = d
                .dispatch
                .source
                .strip_prefix("lettera-")
                .and_then(|x| x.strip_suffix(".toml"))
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("unexpected source {}", d.dispatch.source));
            assert_eq!(d.dispatch.subject, format!("Lettera {n}"));
            assert!(by_letter.insert(n, d).is_none(), "letter {n} stored twice");
            let rcpts: Vec<&str> = d.recipients.iter().map(|r| r.address.as_str()).collect();
            assert_eq!(rcpts, [recipient(n)], "letter {n}: recipients");
            assert!(!d.attempts.is_empty(), "letter {n}: never attempted");
        }
        assert_eq!(by_letter.len(), LETTERS);

        // The mailboxes: wait for every submitted letter, then a little more
        // for anything that should not be there.
        let mut want: HashMap<&str, usize> = HashMap::new();
        for (n, d) in &by_letter {
            if d.dispatch.state == "submitted" {
                *want.entry(recipient(*n)).or_default() += 1;
            }
        }
        for a in citizens {
            sandbox_support::wait_for(
                &env.info,
                a,
                want.get(a).copied().unwrap_or(0),
                Duration::from_secs(60),
            )
            .await;
        }
        let submitted = want.values().sum::<usize>();
        sandbox_support::wait_for(&env.info, OFFICE, submitted * 2, Duration::from_secs(60)).await;
        tokio::time::sleep(QUIET).await;
        let mut envelopes_of: HashMap<&str, Vec<sandbox_support::Sys>> = HashMap::new();
        for a in citizens {
            envelopes_of.insert(a, mailbox(&env, a).await);
        }
        let office = mailbox(&env, OFFICE).await;

        let (mut uncertain, mut uncertain_delivered) = (0, 0);
        for n in 1..=LETTERS {
            let d = by_letter[&n];
            let id = &d.dispatch.id;
            let mids: Vec<&str> = d.attempts.iter().map(|a| a.message_id.as_str()).collect();
            let inbox = &envelopes_of[recipient(n)];
            let by_mid = inbox
                .iter()
                .filter(|m| m.kind == Kind::Transport && mids.contains(&m.refers_to.as_deref().unwrap_or("")))
                .count();
            let subject = format!("POSTA CERTIFICATA: Lettera {n}");
            let by_subject = inbox
                .iter()
                .filter(|m| m.subject.as_deref() == Some(subject.as_str()))
                .count();
            assert_eq!(by_mid, by_subject, "letter {n}: envelopes by msgid and by subject");
            let accepted = office
                .iter()
                .filter(|m| m.kind == Kind::Acceptance && mids.contains(&m.refers_to.as_deref().unwrap_or("")))
                .count();
            assert!(by_mid <= 1, "letter {n} ({id}) reached {} {by_mid} times", recipient(n));
            assert!(accepted <= 1, "letter {n} ({id}) accepted {accepted} times");
            let events: Vec<String> = db
                .events_for(id)
                .expect("events")
                .into_iter()
                .map(|e| e.event)
                .collect();
            match d.dispatch.state.as_str() {
                "submitted" => {
                    assert_eq!(by_mid, 1, "letter {n} ({id}) submitted: delivered once");
                    assert_eq!(accepted, 1, "letter {n} ({id}) submitted: accepted once");
                    let states: Vec<&str> = d.attempts.iter().map(|a| a.state.as_str()).collect();
                    assert_eq!(
                        states.iter().filter(|s| **s == "submitted").count(),
                        1,
                        "letter {n}: attempts {states:?}"
                    );
                    assert!(
                        !states.contains(&"uncertain") && !states.contains(&"sending"),
                        "letter {n}: attempts {states:?}"
                    );
                }
                "uncertain" => {
                    uncertain += 1;
                    uncertain_delivered += by_mid;
                    assert_eq!(accepted, by_mid, "letter {n}: accepted iff delivered");
                    assert_eq!(
                        d.attempts.last().map(|a| a.state.as_str()),
                        Some("uncertain"),
                        "letter {n}"
                    );
                    assert!(
                        events.iter().any(|e| e == "dispatch.uncertain"),
                        "letter {n} ({id}): events {events:?}"
                    );
                }
                other => panic!("letter {n} ({id}) ended {other}: events {events:?}"),
            }
        }
        // Nothing reached anyone that is not one of these letters.
        let all_mids: Vec<&str> = dispatches
            .iter()
            .flat_map(|d| d.attempts.iter().map(|a| a.message_id.as_str()))
            .collect();
        for (a, list) in &envelopes_of {
            for m in list {
                assert!(
                    all_mids.contains(&m.refers_to.as_deref().unwrap_or("")),
                    "{a}: stray {} {:?}",
                    m.kind,
                    m.subject
                );
            }
        }
        eprintln!(
            "seed {seed:#x}: {kills} kills, {submitted} submitted, {uncertain} uncertain \
             ({uncertain_delivered} of them delivered)"
        );
        drop(db);
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. 451: the provider's pacing

/// The dispatch with this subject, from the store.
fn detail_by_subject(db: &pecgate::store::Db, subject: &str) -> pecgate::store::DispatchDetail {
    let mut found: Vec<_> = all_dispatches(db)
        .into_iter()
        .filter(|d| d.dispatch.subject == subject)
        .collect();
    assert_eq!(found.len(), 1, "dispatches with subject {subject:?}");
    found.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_451_is_retried_with_backoff_and_never_refused() {
    within(240, async {
        let env = Env::start(1.0, Some("[smtp]\nrate_limit_per_minute = 3\n")).await;
        let mut gw = Gateway::start(&env, &[]).await;
        let outbox = gw.outbox();
        let subjects: Vec<String> = (1..=6).map(|n| format!("Ritmo {n}")).collect();
        let envelopes: Vec<(String, String)> = subjects
            .iter()
            .enumerate()
            .map(|(i, subj)| {
                (
                    format!("ritmo-{}.toml", i + 1),
                    format!("to = [\"{MARIO}\"]\nsubject = \"{subj}\"\nbody = \"Testo.\"\n"),
                )
            })
            .collect();
        let files: Vec<(&str, &[u8])> = envelopes
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_bytes()))
            .collect();
        drop_files(&outbox, &files);

        // Three go at once; the other three are told 451 and wait.
        let list = gw
            .wait_list("3 submitted and 3 queued", Duration::from_secs(30), |l| {
                l.len() == 6
                    && l.iter().filter(|d| d["state"] == "submitted").count() == 3
                    && l.iter().filter(|d| d["state"] == "queued").count() == 3
            })
            .await;
        let waiting: Vec<String> = list
            .iter()
            .filter(|d| d["state"] == "queued")
            .map(|d| s(&d["dispatch_id"]).to_owned())
            .collect();
        let db = gw.db();
        let failed_attempts = |id: &str| -> Vec<pecgate::store::AttemptRow> {
            db.get(id).expect("get").expect("dispatch").attempts
        };
        for id in &waiting {
            let attempts = eventually(
                &format!("{id}: a failed-transient attempt"),
                Duration::from_secs(10),
                || {
                    let a = failed_attempts(id);
                    (!a.is_empty() && a.iter().all(|x| x.state == "failed-transient")).then_some(a)
                },
            )
            .await;
            let reply = attempts[0].smtp_reply.clone().unwrap_or_default();
            assert!(
                reply.contains("451") && reply.contains("4.7.0"),
                "{id}: {reply}"
            );
            gw.wait_log(
                &format!("dispatch.retry for {id}"),
                Duration::from_secs(10),
                |l| l["event"] == "dispatch.retry" && l["dispatch_id"] == id.as_str(),
            )
            .await;
        }
        // They are retried after a backoff (5 s, doubling), still 451, still
        // queued, never refused.
        let (id, attempts) = eventually(
            "a second attempt after the backoff",
            Duration::from_secs(20),
            || {
                waiting.iter().find_map(|id| {
                    let a = failed_attempts(id);
                    (a.len() >= 2).then(|| (id.clone(), a))
                })
            },
        )
        .await;
        let gap = attempts[1]
            .started_at
            .duration_since(attempts[0].started_at);
        assert!(
            gap >= jiff::SignedDuration::from_secs(3) && gap <= jiff::SignedDuration::from_secs(8),
            "{id}: second attempt {gap:?} after the first (backoff 5 s ± 20 %, times in seconds)"
        );
        let list = gw.list(None).await;
        assert_eq!(list.iter().filter(|d| d["state"] == "submitted").count(), 3);
        // (a retry may be in flight at this very moment: `sending`)
        let waiting_states: Vec<&str> = list
            .iter()
            .filter(|d| waiting.iter().any(|w| d["dispatch_id"] == w.as_str()))
            .map(|d| s(&d["state"]))
            .collect();
        assert_eq!(waiting_states.len(), 3);
        assert!(
            waiting_states
                .iter()
                .all(|x| *x == "queued" || *x == "sending"),
            "{waiting_states:?}"
        );
        assert!(
            gw.events("dispatch.refused").is_empty(),
            "a 451 is not a refusal"
        );

        // The provider lifts the limit: all are submitted within the backoff.
        env.write_faults("");
        env.sandbox().reload_faults().await.expect("reload faults");
        let lifted = Instant::now();
        let list = gw
            .wait_list("all 6 submitted", Duration::from_secs(40), |l| {
                l.len() == 6 && l.iter().all(|d| d["state"] == "submitted")
            })
            .await;
        eprintln!(
            "all submitted {:?} after the limit was lifted",
            lifted.elapsed()
        );

        let boxes = mailboxes_exactly(&env, &[(MARIO, 6), (OFFICE, 12)]).await;
        for subj in &subjects {
            let d = detail_by_subject(&db, subj);
            let last = d.attempts.last().expect("an attempt");
            assert_eq!(last.state, "submitted", "{subj}");
            assert!(
                d.attempts[..d.attempts.len() - 1]
                    .iter()
                    .all(|a| a.state == "failed-transient"),
                "{subj}: {:?}",
                d.attempts
            );
            if waiting.contains(&d.dispatch.id) {
                assert!(d.attempts.len() >= 2, "{subj}: retried");
            } else {
                assert_eq!(d.attempts.len(), 1, "{subj}: sent at once");
            }
            let by_d: Vec<&pecgate::store::AttemptRow> = d.attempts.iter().collect();
            let mut delivered = 0;
            for a in &by_d {
                delivered += referring(&boxes[0], &Kind::Transport, &a.message_id).len();
            }
            assert_eq!(delivered, 1, "{subj}: delivered once");
            assert_eq!(
                referring(&boxes[0], &Kind::Transport, &last.message_id).len(),
                1
            );
            assert_eq!(
                referring(&boxes[1], &Kind::Acceptance, &last.message_id).len(),
                1
            );
            // Every attempt's exact bytes are filed, and dispatch.json lists them.
            let dir = PathBuf::from(&d.dispatch.sent_dir);
            let record: Value = eventually(
                &format!("{subj}: dispatch.json with every attempt"),
                Duration::from_secs(10),
                || {
                    let v: Value =
                        serde_json::from_slice(&fs::read(dir.join("dispatch.json")).ok()?).ok()?;
                    (v["attempts"].as_array()?.len() == d.attempts.len()
                        && v["attempts"][d.attempts.len() - 1]["state"] == "submitted")
                        .then_some(v)
                },
            )
            .await;
            for (i, a) in d.attempts.iter().enumerate() {
                let name = pecgate::sent::eml_name(a.n);
                let bytes =
                    fs::read(dir.join(&name)).unwrap_or_else(|e| panic!("{subj}: {name}: {e}"));
                assert_eq!(sha256_hex(&bytes), a.eml_sha256, "{subj}: {name}");
                assert_eq!(record["attempts"][i]["message_id"], a.message_id.as_str());
                assert_eq!(record["attempts"][i]["state"], a.state.as_str());
                assert_eq!(record["attempts"][i]["eml"], name.as_str());
            }
        }
        drop(list);
        assert_outbox_drained(&outbox, false);
        gw.stop_cleanly().await;
        drop(db);
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 5. A connection dropped after DATA

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_after_data_is_uncertain_and_not_resent() {
    within(240, async {
        let env = Env::start(
            1.0,
            Some("[smtp]\ndrop_after_data = \"accepted\"\ndrop_count = 1\n"),
        )
        .await;
        let mut gw = Gateway::start(&env, &[]).await;
        let outbox = gw.outbox();
        let letter = |subject: &str| {
            format!("to = [\"{MARIO}\"]\nsubject = \"{subject}\"\nbody = \"Testo.\"\n")
        };

        // The provider took the letter but the reply never came.
        drop_letter(
            &outbox,
            "caduta-1.toml",
            &letter("Caduta dopo DATA, accettata"),
            &[],
        );
        let list = gw.wait_settled(1, Duration::from_secs(40)).await;
        assert_eq!(list[0]["state"], "uncertain", "{list:?}");
        let first = s(&list[0]["dispatch_id"]).to_owned();
        let first_mid = s(&list[0]["message_id"]).to_owned();
        let uncertain = gw.list(Some("uncertain")).await;
        assert_eq!(uncertain.len(), 1);
        assert_eq!(uncertain[0]["dispatch_id"], first.as_str());
        gw.wait_log("dispatch.uncertain", Duration::from_secs(10), |l| {
            l["event"] == "dispatch.uncertain"
                && l["dispatch_id"] == first.as_str()
                && l["level"] == "ERROR"
        })
        .await;
        let boxes = mailboxes_exactly(&env, &[(MARIO, 1), (OFFICE, 2)]).await;
        assert_eq!(referring(&boxes[0], &Kind::Transport, &first_mid).len(), 1);
        assert_eq!(referring(&boxes[1], &Kind::Acceptance, &first_mid).len(), 1);

        // The provider dropped the letter and the reply: the gateway cannot
        // know, so it is uncertain too, and nothing is delivered.
        env.write_faults("[smtp]\ndrop_after_data = \"not-accepted\"\ndrop_count = 1\n");
        env.sandbox().reload_faults().await.expect("reload faults");
        drop_letter(
            &outbox,
            "caduta-2.toml",
            &letter("Caduta dopo DATA, non accettata"),
            &[],
        );
        let list = gw.wait_settled(2, Duration::from_secs(40)).await;
        let second = by_subject(&list, "Caduta dopo DATA, non accettata");
        assert_eq!(second["state"], "uncertain", "{list:?}");
        let second_id = s(&second["dispatch_id"]).to_owned();
        let second_mid = s(&second["message_id"]).to_owned();

        // A letter after the faults goes normally (and shows that the
        // gateway carries on): when it has arrived, nothing else did.
        drop_letter(&outbox, "dopo.toml", &letter("Lettera dopo le cadute"), &[]);
        let list = gw.wait_settled(3, Duration::from_secs(40)).await;
        let after = by_subject(&list, "Lettera dopo le cadute");
        assert_eq!(after["state"], "submitted");
        let after_mid = s(&after["message_id"]).to_owned();
        let boxes = mailboxes_exactly(&env, &[(MARIO, 2), (OFFICE, 4)]).await;
        assert_eq!(
            referring(&boxes[0], &Kind::Transport, &first_mid).len(),
            1,
            "not resent"
        );
        assert_eq!(referring(&boxes[0], &Kind::Transport, &after_mid).len(), 1);
        assert_eq!(referring(&boxes[1], &Kind::Acceptance, &after_mid).len(), 1);
        for b in &boxes {
            assert!(
                b.iter()
                    .all(|m| m.refers_to.as_deref() != Some(second_mid.as_str())),
                "the dropped letter was not delivered"
            );
        }

        let uncertain = gw.list(Some("uncertain")).await;
        let ids: Vec<&str> = uncertain.iter().map(|d| s(&d["dispatch_id"])).collect();
        assert_eq!(ids, [first.as_str(), second_id.as_str()]);
        let db = gw.db();
        for id in [&first, &second_id] {
            let d = db.get(id).expect("get").expect("dispatch");
            let states: Vec<&str> = d.attempts.iter().map(|a| a.state.as_str()).collect();
            assert_eq!(states, ["uncertain"], "{id}: one attempt, never resent");
            assert!(
                d.dispatch
                    .error
                    .as_deref()
                    .unwrap_or_default()
                    .starts_with("connection lost after DATA"),
                "{id}: {:?}",
                d.dispatch.error
            );
            let events: Vec<String> = db
                .events_for(id)
                .expect("events")
                .into_iter()
                .map(|e| e.event)
                .collect();
            assert_eq!(
                events,
                ["dispatch.queued", "dispatch.sending", "dispatch.uncertain"],
                "{id}"
            );
            let status: Value = eventually(
                &format!("{id}: status.json uncertain"),
                Duration::from_secs(10),
                || {
                    let v: Value = serde_json::from_slice(
                        &fs::read(Path::new(&d.dispatch.sent_dir).join("status.json")).ok()?,
                    )
                    .ok()?;
                    (v["state"] == "uncertain").then_some(v)
                },
            )
            .await;
            assert_eq!(status["attempts"][0]["state"], "uncertain");
        }
        gw.stop_cleanly().await;
        drop(db);
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 6. Authentication refused

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_suspends_the_mailbox() {
    within(240, async {
        let env = Env::start(1.0, Some("[smtp]\nrefuse_auth = [\"protocollo@*\"]\n")).await;
        let mut gw = Gateway::start(&env, &[]).await;
        let outbox = gw.outbox();
        let letter = |subject: &str| {
            format!("to = [\"{MARIO}\"]\nsubject = \"{subject}\"\nbody = \"Testo.\"\n")
        };
        drop_letter(&outbox, "bloccata.toml", &letter("Password rifiutata"), &[]);
        gw.wait_log(
            "mailbox.auth_refused (error)",
            Duration::from_secs(30),
            |l| {
                l["event"] == "mailbox.auth_refused"
                    && l["level"] == "ERROR"
                    && l["mailbox"] == MAILBOX
            },
        )
        .await;
        let list = gw
            .wait_list("the letter queued", Duration::from_secs(10), |l| {
                l.len() == 1 && l[0]["state"] == "queued"
            })
            .await;
        let id = s(&list[0]["dispatch_id"]).to_owned();
        // A letter that comes later is taken in, and waits too.
        drop_letter(&outbox, "seconda.toml", &letter("Dopo la sospensione"), &[]);
        gw.wait_list("the second letter queued", Duration::from_secs(20), |l| {
            l.len() == 2 && l.iter().all(|d| d["state"] == "queued")
        })
        .await;
        // No further attempt, for longer than the first retry would take.
        tokio::time::sleep(Duration::from_secs(7)).await;
        let db = gw.db();
        let d = db.get(&id).expect("get").expect("dispatch");
        assert_eq!(d.dispatch.state, "queued");
        let states: Vec<&str> = d.attempts.iter().map(|a| a.state.as_str()).collect();
        assert_eq!(states, ["failed-transient"], "exactly one attempt");
        let reply = d.attempts[0].smtp_reply.clone().unwrap_or_default();
        assert!(reply.contains("5.7.8"), "{reply}");
        let second = detail_by_subject(&db, "Dopo la sospensione");
        assert_eq!(second.dispatch.state, "queued");
        assert!(second.attempts.is_empty(), "{:?}", second.attempts);
        let state = db
            .mailbox_state(MAILBOX)
            .expect("mailbox state")
            .expect("a mailbox_state row");
        assert!(
            state
                .suspended_reason
                .as_deref()
                .unwrap_or_default()
                .starts_with("authentication refused"),
            "{state:?}"
        );
        let refused = gw.events("mailbox.auth_refused");
        assert!(refused.iter().all(|l| l["level"] == "ERROR"), "{refused:?}");
        assert!(gw.events("dispatch.submitted").is_empty());
        assert!(gw.events("dispatch.refused").is_empty());
        assert!(mailbox(&env, MARIO).await.is_empty(), "nothing was sent");
        assert!(mailbox(&env, OFFICE).await.is_empty(), "nothing was sent");
        gw.stop_cleanly().await;
        drop(db);
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 7. SIGTERM

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_the_chain_verifies() {
    within(120, async {
        let env = Env::start(1.0, None).await;
        let mut gw = Gateway::start(&env, &[]).await;
        drop_letter(
            &gw.outbox(),
            "prima.toml",
            &format!("to = [\"{GIULIA}\"]\nsubject = \"Prima di fermarsi\"\nbody = \"Testo.\"\n"),
            &[],
        );
        let list = gw.wait_settled(1, Duration::from_secs(30)).await;
        assert_eq!(list[0]["state"], "submitted");
        let id = s(&list[0]["dispatch_id"]).to_owned();
        // Idle now: SIGTERM ends it at once, with status 0.
        let t = Instant::now();
        let status = gw.terminate(Duration::from_secs(5)).await;
        assert_eq!(status.code(), Some(0), "{}", gw.log_text());
        eprintln!("stopped {:?} after SIGTERM", t.elapsed());
        assert_eq!(gw.events("daemon.stopping").len(), 1);
        assert_eq!(gw.events("daemon.stopped").len(), 1);
        let db = gw.db();
        let report = db.verify_chain().expect("verify_chain");
        assert!(report.is_intact(), "{report:?}");
        let events: Vec<String> = db
            .events_for(&id)
            .expect("events")
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(
            events,
            ["dispatch.queued", "dispatch.sending", "dispatch.submitted"]
        );
        assert!(report.events >= 3, "{report:?}");
        drop(db);
        // Started again, it finds nothing to recover or resend.
        gw.spawn();
        gw.ready().await;
        let started = gw.events("daemon.started");
        assert_eq!(started.last().expect("started")["uncertain_found"], 0);
        let list = gw.list(None).await;
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["state"], "submitted");
        gw.stop_cleanly().await;
        let boxes = mailboxes_exactly(&env, &[(GIULIA, 1)]).await;
        assert_eq!(
            referring(&boxes[0], &Kind::Transport, s(&list[0]["message_id"])).len(),
            1
        );
        env.shutdown().await;
    })
    .await;
}
