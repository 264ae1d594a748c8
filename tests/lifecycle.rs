//! Acceptance tests of the whole loop (issue 6): the real `pecgate run`
//! binary against an in-process sandbox, sending letters dropped into the
//! outbox and taking in, over IMAP, every receipt the sandbox's providers
//! issue, with the sandbox's faults producing each case. What a clerk or an
//! operator relies on is checked: the states in `pecgate list --json`, the
//! receipts filed in the letter's sent folder (`NN-<kind>[-<recipient>].eml`),
//! `status.json`, the timeline of `pecgate show --json` (events, receipts
//! with their verdicts) and the JSON log.
//!
//! Dovecot must be installed (see tests/sandbox_support).

mod outbound_support;
#[path = "sandbox_support/mod.rs"]
mod sandbox_support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::TryStreamExt;
use jiff::{SignedDuration, Timestamp};
use outbound_support::*;
use pecgate::pec::compose::{self, DeliveryContent, ReceiptType, Transaction};
use pecgate::pec::kind::Kind;
use pecgate::pki::{self, CertKey, Digest, ProviderProfile, SignOptions, Validity};
use pecgate::verify::Status;
use sandbox_support::{
    ANAGRAFE, ANNA, DUE, DUE_GESTORE, EICAR, Env, Fetched, GIULIA, LUCA, MARIO, OFFICE, PAOLO, Sys,
    examine, imap_login, within,
};
use serde_json::Value;

/// A certified address of provider due that has no mailbox (`no-dest`).
const NOBODY: &str = "nessuno@pec.cittadini.sandbox.test";
/// How long a receipt may take to change a state (IDLE, at worst a poll).
const RECEIPTS: Duration = Duration::from_secs(25);

// ---------------------------------------------------------------------------
// Helpers

/// A TOML array of strings.
fn toml_list(items: &[&str]) -> String {
    serde_json::to_string(items).expect("a list of strings")
}

/// Drops `STEM.toml` (to, cc, subject and `extra` TOML lines, e.g.
/// `receipt`, whose default is `completa`) with its documents into the
/// outbox.
fn post(
    gw: &Gateway,
    stem: &str,
    to: &[&str],
    cc: &[&str],
    subject: &str,
    extra: &str,
    documents: &[(&str, &[u8])],
) {
    let names: Vec<&str> = documents.iter().map(|(n, _)| *n).collect();
    let envelope = format!(
        "to = {}\ncc = {}\nsubject = \"{subject}\"\nbody = \"Gentile destinatario, {subject}.\"\nattachments = {}\n{extra}\n",
        toml_list(to),
        toml_list(cc),
        toml_list(&names),
    );
    drop_letter(&gw.outbox(), &format!("{stem}.toml"), &envelope, documents);
}

/// Waits until the letter with `subject` satisfies `pred`; returns it.
async fn wait_letter(
    gw: &Gateway,
    subject: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let list = gw
        .wait_list(subject, limit, |l| {
            l.iter().any(|d| d["subject"] == subject && pred(d))
        })
        .await;
    by_subject(&list, subject).clone()
}

/// Waits until the letter with `subject` is in `state` with these recipient
/// states (address, state), in envelope order.
async fn wait_final(
    gw: &Gateway,
    subject: &str,
    state: &str,
    recipients: &[(&str, &str)],
) -> Value {
    let want: Vec<(String, String)> = recipients
        .iter()
        .map(|(a, s)| ((*a).to_owned(), (*s).to_owned()))
        .collect();
    wait_letter(gw, subject, RECEIPTS, |d| {
        d["state"] == state && recipient_states(d) == want
    })
    .await;
    // Nothing more happens to it.
    tokio::time::sleep(QUIET).await;
    let again = by_subject(&gw.list(None).await, subject).clone();
    assert_eq!(again["state"], state, "{subject}: state changed again");
    assert_eq!(
        recipient_states(&again),
        want,
        "{subject}: recipients changed again"
    );
    again
}

/// (address, state) of each recipient in `list --json` order.
fn recipient_states(d: &Value) -> Vec<(String, String)> {
    d["recipients"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| (s(&r["address"]).to_owned(), s(&r["state"]).to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// (address, certified) of each recipient.
fn certified(d: &Value) -> Vec<(String, Value)> {
    d["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .map(|r| (s(&r["address"]).to_owned(), r["certified"].clone()))
        .collect()
}

/// The receipt files of a sent folder (`NN-*.eml` but the letter itself),
/// in order.
fn receipt_files(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.ends_with(".eml") && !n.starts_with("00-"))
        .collect()
}

/// Waits until the sent folder of `d` holds receipt files named (without
/// the `NN-` prefix) exactly `want`, numbered 01, 02, … without gaps;
/// returns the file names in order.
async fn wait_receipt_files(d: &Value, want: &[String]) -> Vec<String> {
    let dir = PathBuf::from(s(&d["sent_dir"]));
    let want: BTreeSet<String> = want.iter().cloned().collect();
    let names = eventually(
        &format!("{}: receipt files {want:?}", d["subject"]),
        Duration::from_secs(10),
        || {
            let names = receipt_files(&dir);
            let got: BTreeSet<String> = names.iter().map(|n| n[3..].to_owned()).collect();
            (got == want).then_some(names)
        },
    )
    .await;
    for (i, n) in names.iter().enumerate() {
        assert!(
            n.starts_with(&format!("{:02}-", i + 1)),
            "receipt files numbered without gaps: {names:?}"
        );
    }
    // No second copy of anything arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receipt_files(&dir),
        names,
        "{}: receipt files",
        d["subject"]
    );
    names
}

/// `avvenuta-consegna-<address>.eml` etc.
fn file(kind: &str, recipient: Option<&str>) -> String {
    match recipient {
        Some(r) => format!("{kind}-{r}.eml"),
        None => format!("{kind}.eml"),
    }
}

/// A receipt file of `d`'s sent folder, inspected and verified with the
/// sandbox CA (the signature must be valid: it is evidence).
fn filed(env: &Env, d: &Value, suffix: &str) -> Sys {
    let dir = PathBuf::from(s(&d["sent_dir"]));
    let name = receipt_files(&dir)
        .into_iter()
        .find(|n| n[3..] == *suffix)
        .unwrap_or_else(|| panic!("{}: no receipt file *{suffix}", d["subject"]));
    let raw = fs::read(dir.join(&name)).expect("receipt file");
    let sys = examine(&env.verifier, &Fetched { uid: 0, raw });
    assert_eq!(
        sys.verdict.status,
        Status::Valid,
        "{name}: {:?}",
        sys.verdict
    );
    sys
}

/// `status.json` of `d` once it shows `state`.
async fn status_json(d: &Value, state: &str) -> Value {
    let dir = PathBuf::from(s(&d["sent_dir"]));
    eventually(
        &format!("{}: status.json {state}", d["subject"]),
        Duration::from_secs(10),
        || {
            let v: Value = serde_json::from_slice(&fs::read(dir.join("status.json")).ok()?).ok()?;
            (v["state"] == state).then_some(v)
        },
    )
    .await
}

/// The `detail` of one recipient in `status.json` (a string).
fn status_detail(status: &Value, address: &str) -> String {
    let detail = status["recipients"]
        .as_array()
        .expect("status.json recipients")
        .iter()
        .find(|r| r["address"] == address)
        .map(|r| &r["detail"])
        .unwrap_or_else(|| panic!("status.json without {address}: {status}"));
    s(detail).to_owned()
}

/// `pecgate show KEY --json`: (exit code, one object per letter, stderr).
async fn show(gw: &Gateway, key: &str) -> (Option<i32>, Vec<Value>, String) {
    let (code, out, err) = gw.cli(&["show", key, "--json"]).await;
    let letters = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("show line {l:?}: {e}")))
        .collect();
    (code, letters, err)
}

/// The one timeline `show --json KEY` prints.
async fn timeline(gw: &Gateway, key: &str) -> Value {
    let (code, mut letters, err) = show(gw, key).await;
    assert_eq!(code, Some(0), "pecgate show {key}: {err}");
    assert_eq!(letters.len(), 1, "pecgate show {key}: {letters:?}");
    letters.remove(0)
}

/// A receipt of a timeline: (kind, recipient, verdict, disposition).
type Receipt = (String, Option<String>, String, String);

/// A [`Receipt`] from borrowed parts.
fn receipt(kind: &str, recipient: Option<&str>, verdict: &str, disposition: &str) -> Receipt {
    (
        kind.to_owned(),
        recipient.map(str::to_owned),
        verdict.to_owned(),
        disposition.to_owned(),
    )
}

/// The receipts of a timeline.
fn receipts_of(t: &Value) -> Vec<Receipt> {
    t["receipts"]
        .as_array()
        .expect("receipts")
        .iter()
        .map(|r| {
            (
                s(&r["kind"]).to_owned(),
                r["recipient"].as_str().map(str::to_owned),
                s(&r["verdict"]).to_owned(),
                s(&r["disposition"]).to_owned(),
            )
        })
        .collect()
}

/// The names of the events of a timeline.
fn event_names(t: &Value) -> Vec<String> {
    t["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| s(&e["event"]).to_owned())
        .collect()
}

/// The log lines of `event` about the letter `id`.
fn events_of(gw: &Gateway, event: &str, id: &str) -> Vec<Value> {
    gw.events(event)
        .into_iter()
        .filter(|l| l["dispatch_id"] == id)
        .collect()
}

/// Asserts that the log has no line of `event` (showing the log if it has).
fn assert_no_event(gw: &Gateway, event: &str) {
    assert!(gw.events(event).is_empty(), "{event}: {}", gw.log_text());
}

/// Every log line at ERROR level.
fn error_lines(gw: &Gateway) -> Vec<Value> {
    gw.log_lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect()
}

/// Appends `raw` to `address`'s INBOX, as a provider's delivery would.
async fn append(env: &Env, address: &str, raw: &[u8]) {
    let mut session = imap_login(&env.info, address)
        .await
        .unwrap_or_else(|e| panic!("IMAP login {address}: {e}"));
    session
        .append("INBOX", None, None, raw)
        .await
        .unwrap_or_else(|e| panic!("IMAP APPEND to {address}: {e}"));
    let _ = session.logout().await;
}

/// Removes the messages with these UIDs from `address`'s INBOX.
async fn expunge(env: &Env, address: &str, uids: &[u32]) {
    let mut session = imap_login(&env.info, address)
        .await
        .unwrap_or_else(|e| panic!("IMAP login {address}: {e}"));
    session.select("INBOX").await.expect("SELECT INBOX");
    let set: Vec<String> = uids.iter().map(u32::to_string).collect();
    let _: Vec<_> = session
        .uid_store(set.join(","), "+FLAGS (\\Deleted)")
        .await
        .expect("UID STORE")
        .try_collect()
        .await
        .expect("UID STORE responses");
    let _: Vec<_> = session
        .expunge()
        .await
        .expect("EXPUNGE")
        .try_collect()
        .await
        .expect("EXPUNGE responses");
    let _ = session.logout().await;
}

/// The transaction of a letter as its acceptance certifies it, issued again
/// by provider due (gestore, service address) at `at`: what a delivery
/// receipt for one of its recipients is built from.
fn transaction_of(acceptance: &Sys, at: Timestamp) -> Transaction {
    let d = acceptance.d();
    let rome = jiff::tz::TimeZone::get("Europe/Rome").expect("Europe/Rome");
    Transaction {
        identificativo: d.identificativo.clone(),
        time: at.to_zoned_datetime(rome),
        mittente: d.mittente.clone().unwrap_or_else(|| OFFICE.to_owned()),
        destinatari: d.destinatari.clone(),
        risposte: d.risposte.clone().unwrap_or_else(|| OFFICE.to_owned()),
        oggetto: d.oggetto.clone().unwrap_or_default(),
        msgid: d.msgid.clone(),
        gestore: DUE_GESTORE.to_owned(),
        service_address: DUE.to_owned(),
        ricevuta: ReceiptType::Sintetica,
    }
}

/// A signed ricevuta di avvenuta consegna (sintetica) for `consegna`,
/// issued at `at` for the letter `acceptance` is about, signed by `signer`.
fn delivery_receipt(acceptance: &Sys, consegna: &str, at: Timestamp, signer: &CertKey) -> Vec<u8> {
    let tx = transaction_of(acceptance, at);
    let c = compose::delivery(&tx, consegna, DeliveryContent::Sintetica);
    pki::sign_detached(
        &c.outer_headers,
        &c.entity,
        signer,
        &[],
        &SignOptions {
            digest: Digest::Sha256,
            signing_time: Some(at),
            x_protocol: true,
        },
    )
    .expect("sign a delivery receipt")
}

/// Provider due's real signing certificate and key (`DIR/pki/due.*`).
fn sandbox_signer_due(env: &Env) -> CertKey {
    let pki_dir = env.dir().join("pki");
    let cert = openssl::x509::X509::from_pem(&fs::read(pki_dir.join("due.pem")).expect("due.pem"))
        .expect("due.pem");
    let key = openssl::pkey::PKey::private_key_from_pem(
        &fs::read(pki_dir.join("due.key")).expect("due.key"),
    )
    .expect("due.key");
    CertKey { cert, key }
}

/// A certificate that looks exactly like provider due's (same names, SAN,
/// PEC policy) but issued by a CA nobody trusts.
fn rogue_signer_due() -> CertKey {
    let now = Timestamp::now();
    let validity = Validity {
        not_before: now - SignedDuration::from_hours(24),
        not_after: now + SignedDuration::from_hours(24 * 365),
    };
    let ca = pki::make_ca("Sandbox PEC CA", "pecgate sandbox", validity, 2048).expect("rogue CA");
    pki::make_provider_cert(
        &ca,
        &ProviderProfile {
            organization: DUE_GESTORE.to_owned(),
            common_name: format!("Posta Certificata {DUE_GESTORE}"),
            email: DUE.to_owned(),
            validity,
            pec_policy: true,
            key_bits: 2048,
        },
    )
    .expect("rogue provider certificate")
}

/// The system messages of the office mailbox of `kind` about `message_id`.
async fn office_receipts(env: &Env, kind: &Kind, message_id: &str) -> Vec<Sys> {
    mailbox(env, OFFICE)
        .await
        .into_iter()
        .filter(|m| m.kind == *kind && m.refers_to.as_deref() == Some(message_id))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Every receipt kind

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_receipt_kind_gives_its_final_state_and_is_filed() {
    within(120, async {
        let faults = format!(
            r#"[[recipient]]
pattern = "virus*@pec.cittadini.sandbox.test"
virus = true

[[recipient]]
pattern = "{LUCA}"
mailbox_full = true
"#
        );
        let env = Env::start(1.0, Some(&faults)).await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        let cert = document("certificato-residenza.pdf");
        post(
            &gw,
            "consegnata",
            &[MARIO],
            &[],
            "Certificato di residenza",
            "protocol = \"2026/0004242\"\nkind = \"certificato\"",
            &[("certificato-residenza.pdf", &cert)],
        );
        let mut eicar = b"Allegato di prova\r\n".to_vec();
        eicar.extend_from_slice(EICAR);
        post(
            &gw,
            "infetta",
            &[MARIO],
            &[],
            "Allegato infetto",
            "",
            &[("verbale.txt", &eicar)],
        );
        post(
            &gw,
            "nodest",
            &[NOBODY],
            &[],
            "Indirizzo inesistente",
            "",
            &[],
        );
        let virus_addr = "virus.rossi@pec.cittadini.sandbox.test";
        post(
            &gw,
            "virus",
            &[virus_addr],
            &[],
            "Virus dal destinatario",
            "",
            &[],
        );
        post(&gw, "piena", &[LUCA], &[], "Casella piena", "", &[]);

        // accettazione + avvenuta-consegna → delivered.
        let d = wait_final(
            &gw,
            "Certificato di residenza",
            "delivered",
            &[(MARIO, "delivered")],
        )
        .await;
        assert_eq!(certified(&d), vec![(MARIO.to_owned(), Value::Bool(true))]);
        let id = s(&d["dispatch_id"]).to_owned();
        let mid = s(&d["message_id"]).to_owned();
        let ident = s(&d["identificativo"]).to_owned();
        assert!(
            ident.starts_with("opec."),
            "identificativo from the acceptance: {ident}"
        );
        let names = wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("avvenuta-consegna", Some(MARIO)),
            ],
        )
        .await;
        assert_eq!(
            names[0], "01-accettazione.eml",
            "the acceptance comes first"
        );
        let acc = filed(&env, &d, "accettazione.eml");
        assert_eq!(acc.kind, Kind::Acceptance);
        assert_eq!(acc.d().msgid.as_deref(), Some(mid.as_str()));
        assert_eq!(acc.d().identificativo, ident);
        let del = filed(&env, &d, &file("avvenuta-consegna", Some(MARIO)));
        assert_eq!(del.kind, Kind::Delivery);
        assert_eq!(del.d().consegna.as_deref(), Some(MARIO));
        assert_eq!(del.d().ricevuta.as_deref(), Some("completa"));
        let postacert = del
            .postacert
            .as_ref()
            .expect("a completa receipt carries the letter");
        assert_eq!(
            sandbox_support::attachments(postacert),
            vec![("certificato-residenza.pdf".to_owned(), cert.clone())],
            "the letter's document inside the completa receipt"
        );
        let st = status_json(&d, "delivered").await;
        assert_eq!(st["identificativo"], ident.as_str());
        assert_eq!(st["recipients"][0]["state"], "delivered");
        let t = timeline(&gw, &id).await;
        assert_eq!(t["state"], "delivered");
        assert_eq!(
            receipts_of(&t),
            vec![
                receipt("accettazione", None, "valid", "applied"),
                receipt("avvenuta-consegna", Some(MARIO), "valid", "applied"),
            ]
        );
        let evs = event_names(&t);
        for want in [
            "dispatch.queued",
            "dispatch.submitted",
            "dispatch.accepted",
            "dispatch.delivered",
            "recipient.delivered",
        ] {
            assert!(
                evs.iter().any(|e| e == want),
                "{want} in the timeline: {evs:?}"
            );
        }
        assert_eq!(events_of(&gw, "receipt.accepted", &id).len(), 1);
        assert_eq!(events_of(&gw, "receipt.delivered", &id).len(), 1);
        let finals = events_of(&gw, "dispatch.final", &id);
        assert_eq!(finals.len(), 1, "dispatch.final once");
        assert_eq!(finals[0]["state"], "delivered");

        // non-accettazione (a virus in the letter) → not-accepted, with the
        // provider's reason.
        let d = wait_final(
            &gw,
            "Allegato infetto",
            "not-accepted",
            &[(MARIO, "pending")],
        )
        .await;
        let nid = s(&d["dispatch_id"]).to_owned();
        assert_eq!(
            d["identificativo"],
            Value::Null,
            "no acceptance, no identificativo"
        );
        wait_receipt_files(&d, &[file("non-accettazione", None)]).await;
        let na = filed(&env, &d, "non-accettazione.eml");
        assert!(na.virus, "X-VerificaSicurezza: errore");
        let st = status_json(&d, "not-accepted").await;
        assert!(
            st["error"].as_str().is_some_and(|e| e.contains("virus")),
            "status.json names the reason: {st}"
        );
        let t = timeline(&gw, &nid).await;
        assert!(
            t["error"]
                .as_str()
                .is_some_and(|e| e.contains("virus rilevato")),
            "show names the reason: {}",
            t["error"]
        );
        assert_eq!(
            receipts_of(&t),
            vec![receipt("non-accettazione", None, "valid", "applied")]
        );
        let lines = events_of(&gw, "receipt.not_accepted", &nid);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["level"], "ERROR", "a refused letter is an error");

        // errore-consegna no-dest → failed, with the provider's error.
        let d = wait_final(
            &gw,
            "Indirizzo inesistente",
            "failed",
            &[(NOBODY, "failed")],
        )
        .await;
        wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("errore-consegna", Some(NOBODY)),
            ],
        )
        .await;
        let st = status_json(&d, "failed").await;
        let detail = status_detail(&st, NOBODY);
        assert!(
            detail.contains("no-dest") && detail.contains("5.1.1"),
            "detail: {detail}"
        );
        let fid = s(&d["dispatch_id"]).to_owned();
        let lines = events_of(&gw, "receipt.failed", &fid);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["recipient"], NOBODY);

        // A virus found at the recipient's provider → failed, virus named.
        let d = wait_final(
            &gw,
            "Virus dal destinatario",
            "failed",
            &[(virus_addr, "failed")],
        )
        .await;
        wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("errore-consegna", Some(virus_addr)),
            ],
        )
        .await;
        let ev = filed(&env, &d, &file("errore-consegna", Some(virus_addr)));
        assert_eq!(ev.d().errore, "virus");
        let st = status_json(&d, "failed").await;
        let detail = status_detail(&st, virus_addr);
        assert!(detail.contains("virus"), "detail names the virus: {detail}");

        // Mailbox full → failed with 5.2.2.
        let d = wait_final(&gw, "Casella piena", "failed", &[(LUCA, "failed")]).await;
        wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("errore-consegna", Some(LUCA)),
            ],
        )
        .await;
        let st = status_json(&d, "failed").await;
        let detail = status_detail(&st, LUCA);
        assert!(detail.contains("5.2.2"), "detail: {detail}");
        let txt = fs::read_to_string(PathBuf::from(s(&d["sent_dir"])).join("status.txt"))
            .expect("status.txt");
        assert!(txt.contains("5.2.2") && txt.contains("(failed)"), "{txt}");

        // Nothing was quarantined or left unmatched.
        assert_no_event(&gw, "receipt.quarantined");
        assert_no_event(&gw, "receipt.unmatched");

        // 5. `pecgate show` by every key.
        let by_id = timeline(&gw, &id).await;
        assert_eq!(by_id["dispatch_id"], id.as_str());
        for key in [
            mid.clone(),
            format!("<{mid}>"),
            "2026/0004242".to_owned(),
            ident.clone(),
            id.to_lowercase(),
        ] {
            let t = timeline(&gw, &key).await;
            assert_eq!(t["dispatch_id"], id.as_str(), "show {key}");
            assert_eq!(t["events"], by_id["events"], "show {key}: same timeline");
        }
        let (code, letters, err) = show(&gw, "01ARZ3NDEKTSV4RRFFQ69G5FAV").await;
        assert_eq!(
            (code, letters.len()),
            (Some(1), 0),
            "unknown key: exit 1, nothing printed"
        );
        assert!(err.contains("no letter matches"), "{err}");
        let (code, human, _) = gw.cli(&["show", "2026/0004242"]).await;
        assert_eq!(code, Some(0));
        assert!(
            human.contains(&id) && human.contains("delivered"),
            "{human}"
        );
        assert!(human.contains("verdict valid"), "{human}");

        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Time-out notices, and a delivery after the time-out

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_notices_warn_then_time_out_and_a_late_delivery_wins() {
    within(120, async {
        // 3600: the 12-hour notice comes after 12 s, the 24-hour one after 24 s.
        let lento = "lento@pec.cittadini.sandbox.test";
        let faults = format!("[[recipient]]\npattern = \"{lento}\"\nno_delivery = true\n");
        let env = Env::start(3600.0, Some(&faults)).await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        post(
            &gw,
            "lenta",
            &[MARIO, lento],
            &[],
            "Consegna lenta",
            "",
            &[],
        );
        let subject = "Consegna lenta";

        let d = wait_final(
            &gw,
            subject,
            "accepted",
            &[(MARIO, "delivered"), (lento, "pending")],
        )
        .await;
        let id = s(&d["dispatch_id"]).to_owned();
        let mid = s(&d["message_id"]).to_owned();

        // The 12-hour notice: warned, the letter still open.
        let d = wait_letter(&gw, subject, Duration::from_secs(25), |d| {
            recipient_states(d).contains(&(lento.to_owned(), "warned".to_owned()))
        })
        .await;
        assert_eq!(
            d["state"], "accepted",
            "a warning does not close the letter"
        );
        let st = eventually(
            "status.json shows the warning",
            Duration::from_secs(5),
            || {
                let v: Value = serde_json::from_slice(
                    &fs::read(PathBuf::from(s(&d["sent_dir"])).join("status.json")).ok()?,
                )
                .ok()?;
                let warned = v["recipients"]
                    .as_array()?
                    .iter()
                    .any(|r| r["address"] == lento && r["state"] == "warned");
                warned.then_some(v)
            },
        )
        .await;
        let detail = status_detail(&st, lento);
        assert!(
            detail.contains("4.4.7"),
            "the warning's errore-esteso: {detail}"
        );
        let warn = events_of(&gw, "receipt.warning", &id);
        assert_eq!(warn.len(), 1, "one warning logged");
        assert_eq!(warn[0]["level"], "WARN");

        // The 24-hour notice: timed-out → every recipient final.
        let d = wait_final(
            &gw,
            subject,
            "partially-delivered",
            &[(MARIO, "delivered"), (lento, "timed-out")],
        )
        .await;
        let notices = office_receipts(&env, &Kind::DeliveryTimeout, &mid).await;
        assert_eq!(
            notices.len(),
            2,
            "12 h and 24 h notices in the office mailbox"
        );
        let names = wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("avvenuta-consegna", Some(MARIO)),
                file("preavviso-errore-consegna", Some(lento)),
                // The second notice: same kind and recipient, next number.
                file("preavviso-errore-consegna", Some(lento)),
            ],
        )
        .await;
        assert_eq!(names.len(), 4, "both notices filed: {names:?}");
        let st = status_json(&d, "partially-delivered").await;
        let detail = status_detail(&st, lento);
        assert!(
            detail.contains("5.4.1"),
            "the final notice's errore-esteso: {detail}"
        );

        // A delivery receipt arrives after the time-out (signed by the
        // recipient's provider, an hour after the final notice): delivered,
        // and the contradiction kept.
        let acceptance = office_receipts(&env, &Kind::Acceptance, &mid).await;
        assert_eq!(acceptance.len(), 1);
        let last_notice = notices.iter().map(Sys::data_secs).max().expect("notices");
        let at = Timestamp::from_second(last_notice + 3600).expect("time");
        let late = delivery_receipt(&acceptance[0], lento, at, &sandbox_signer_due(&env));
        append(&env, OFFICE, &late).await;
        let d = wait_final(
            &gw,
            subject,
            "delivered",
            &[(MARIO, "delivered"), (lento, "delivered")],
        )
        .await;
        let detail = gw
            .db()
            .get(&id)
            .expect("get")
            .expect("letter")
            .recipients
            .into_iter()
            .find(|r| r.address == lento)
            .expect("recipient");
        assert!(
            detail.conflict.is_some(),
            "the delivery after the time-out is a recorded conflict: {detail:?}"
        );
        let t = timeline(&gw, &id).await;
        assert!(
            event_names(&t).iter().any(|e| e == "recipient.conflict"),
            "conflict in the timeline: {:?}",
            event_names(&t)
        );
        let kinds: Vec<Receipt> = receipts_of(&t);
        assert_eq!(kinds.len(), 5, "{kinds:?}");
        assert!(
            kinds.iter().all(|k| k.2 == "valid" && k.3 == "applied"),
            "{kinds:?}"
        );
        status_json(&d, "delivered").await;
        assert_no_event(&gw, "receipt.quarantined");

        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// To + Cc, certified and ordinary recipients, receipt types

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_and_cc_certified_and_ordinary_recipients_and_receipt_types() {
    within(120, async {
        let env = Env::start(1.0, None).await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        let doc = document("delibera-15.pdf");
        post(
            &gw,
            "misto",
            &[GIULIA, ANNA],
            &[ANAGRAFE, PAOLO],
            "Delibera di giunta n. 15",
            "receipt = \"breve\"",
            &[("delibera-15.pdf", &doc)],
        );
        post(
            &gw,
            "ordinaria",
            &[ANNA],
            &[PAOLO],
            "Solo posta ordinaria",
            "",
            &[],
        );
        post(
            &gw,
            "parziale",
            &[MARIO],
            &[NOBODY],
            "Consegna parziale",
            "",
            &[],
        );
        post(
            &gw,
            "sintetica",
            &[LUCA],
            &[],
            "Ricevuta sintetica",
            "receipt = \"sintetica\"",
            &[],
        );

        // Certified To and Cc delivered, ordinary ones external → delivered.
        let d = wait_final(
            &gw,
            "Delibera di giunta n. 15",
            "delivered",
            &[
                (GIULIA, "delivered"),
                (ANNA, "external"),
                (ANAGRAFE, "delivered"),
                (PAOLO, "external"),
            ],
        )
        .await;
        assert_eq!(
            certified(&d),
            vec![
                (GIULIA.to_owned(), Value::Bool(true)),
                (ANNA.to_owned(), Value::Bool(false)),
                (ANAGRAFE.to_owned(), Value::Bool(true)),
                (PAOLO.to_owned(), Value::Bool(false)),
            ]
        );
        let fields: Vec<&str> = d["recipients"]
            .as_array()
            .expect("recipients")
            .iter()
            .map(|r| s(&r["field"]))
            .collect();
        assert_eq!(fields, ["to", "to", "cc", "cc"]);
        wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("avvenuta-consegna", Some(GIULIA)),
                file("avvenuta-consegna", Some(ANAGRAFE)),
            ],
        )
        .await;
        // The To recipient's receipt is breve (documents replaced by their
        // hashes), the Cc recipient's sintetica (no copy of the letter).
        let breve = filed(&env, &d, &file("avvenuta-consegna", Some(GIULIA)));
        assert_eq!(breve.d().ricevuta.as_deref(), Some("breve"));
        let pc = breve
            .postacert
            .as_ref()
            .expect("a breve receipt carries the letter");
        let parts = sandbox_support::attachments(pc);
        assert!(
            parts.iter().all(|(n, _)| n != "delibera-15.pdf"),
            "breve: the document itself is not there: {:?}",
            parts.iter().map(|p| &p.0).collect::<Vec<_>>()
        );
        let hash_part = String::from_utf8_lossy(pc).contains(&sandbox_support::sha1_hex(&doc));
        assert!(hash_part, "breve: the document's SHA-1 is there");
        let sint = filed(&env, &d, &file("avvenuta-consegna", Some(ANAGRAFE)));
        assert_eq!(sint.d().ricevuta.as_deref(), Some("sintetica"));
        assert!(sint.postacert.is_none(), "sintetica: no copy of the letter");
        let st = status_json(&d, "delivered").await;
        assert_eq!(st["recipients"].as_array().map(Vec::len), Some(4));

        // Only ordinary recipients: accepted is final.
        let d = wait_final(
            &gw,
            "Solo posta ordinaria",
            "accepted",
            &[(ANNA, "external"), (PAOLO, "external")],
        )
        .await;
        let oid = s(&d["dispatch_id"]).to_owned();
        wait_receipt_files(&d, &[file("accettazione", None)]).await;
        let finals = events_of(&gw, "dispatch.final", &oid);
        assert_eq!(
            finals.len(),
            1,
            "accepted with external recipients only is final"
        );
        assert_eq!(finals[0]["state"], "accepted");

        // One delivered, one failed → partially-delivered.
        let d = wait_final(
            &gw,
            "Consegna parziale",
            "partially-delivered",
            &[(MARIO, "delivered"), (NOBODY, "failed")],
        )
        .await;
        wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("avvenuta-consegna", Some(MARIO)),
                file("errore-consegna", Some(NOBODY)),
            ],
        )
        .await;
        status_json(&d, "partially-delivered").await;

        // A sintetica receipt asked for the To recipient.
        let d = wait_final(
            &gw,
            "Ricevuta sintetica",
            "delivered",
            &[(LUCA, "delivered")],
        )
        .await;
        wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("avvenuta-consegna", Some(LUCA)),
            ],
        )
        .await;
        let sint = filed(&env, &d, &file("avvenuta-consegna", Some(LUCA)));
        assert_eq!(sint.d().ricevuta.as_deref(), Some("sintetica"));
        assert!(sint.postacert.is_none());

        assert!(
            error_lines(&gw)
                .iter()
                .all(|l| l["event"] == "receipt.failed"),
            "no error but the expected failure: {:?}",
            error_lines(&gw)
        );
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. Out of order and duplicated receipts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_duplicated_receipts_give_the_same_result() {
    within(120, async {
        let faults = format!(
            r#"[[recipient]]
pattern = "{MARIO}"
out_of_order = true

[[recipient]]
pattern = "{GIULIA}"
duplicate_receipts = true
"#
        );
        let env = Env::start(1.0, Some(&faults)).await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        post(
            &gw,
            "disordine",
            &[MARIO],
            &[],
            "Ricevute in disordine",
            "",
            &[],
        );
        post(&gw, "doppie", &[GIULIA], &[], "Ricevute doppie", "", &[]);
        post(
            &gw,
            "entrambe",
            &[MARIO],
            &[GIULIA],
            "Disordine e doppioni",
            "",
            &[],
        );
        post(&gw, "normale", &[LUCA], &[], "Senza anomalie", "", &[]);

        let cases: [(&str, Vec<(&str, &str)>); 4] = [
            ("Ricevute in disordine", vec![(MARIO, "delivered")]),
            ("Ricevute doppie", vec![(GIULIA, "delivered")]),
            (
                "Disordine e doppioni",
                vec![(MARIO, "delivered"), (GIULIA, "delivered")],
            ),
            ("Senza anomalie", vec![(LUCA, "delivered")]),
        ];
        for (subject, recipients) in &cases {
            let d = wait_final(&gw, subject, "delivered", recipients).await;
            let id = s(&d["dispatch_id"]).to_owned();
            let mid = s(&d["message_id"]).to_owned();
            let mut want = vec![file("accettazione", None)];
            want.extend(
                recipients
                    .iter()
                    .map(|(a, _)| file("avvenuta-consegna", Some(a))),
            );
            wait_receipt_files(&d, &want).await;
            status_json(&d, "delivered").await;
            // Each receipt recorded once, applied, valid.
            let t = timeline(&gw, &id).await;
            let mut got = receipts_of(&t);
            got.sort();
            let mut expect: Vec<Receipt> = vec![receipt("accettazione", None, "valid", "applied")];
            expect.extend(
                recipients
                    .iter()
                    .map(|(a, _)| receipt("avvenuta-consegna", Some(*a), "valid", "applied")),
            );
            expect.sort();
            assert_eq!(got, expect, "{subject}: receipts recorded once");
            assert_eq!(
                events_of(&gw, "receipt.accepted", &id).len(),
                1,
                "{subject}"
            );
            assert_eq!(
                events_of(&gw, "receipt.delivered", &id).len(),
                recipients.len(),
                "{subject}"
            );
            // What the office mailbox really holds.
            let office = mailbox(&env, OFFICE).await;
            let acc = referring(&office, &Kind::Acceptance, &mid);
            let del = referring(&office, &Kind::Delivery, &mid);
            let dup = recipients.iter().any(|(a, _)| *a == GIULIA);
            assert_eq!(
                acc.len(),
                if dup { 2 } else { 1 },
                "{subject}: acceptances in the mailbox"
            );
            let giulia_dels = del
                .iter()
                .filter(|m| m.d().consegna.as_deref() == Some(GIULIA))
                .count();
            if dup {
                assert_eq!(
                    giulia_dels, 2,
                    "{subject}: the delivery receipt twice in the mailbox"
                );
            }
            if recipients.iter().any(|(a, _)| *a == MARIO) {
                let mario_del = del
                    .iter()
                    .find(|m| m.d().consegna.as_deref() == Some(MARIO))
                    .expect("mario's receipt");
                assert!(
                    mario_del.uid < acc[0].uid,
                    "{subject}: the delivery receipt reached the mailbox before the acceptance"
                );
                // Still filed in its own name, and the letter went through
                // `submitted` (a receipt before the acceptance), then accepted.
                let evs = event_names(&t);
                assert!(evs.iter().any(|e| e == "dispatch.accepted"), "{evs:?}");
            }
        }
        assert!(
            error_lines(&gw).is_empty(),
            "no error: {:?}",
            error_lines(&gw)
        );
        assert_no_event(&gw, "receipt.quarantined");
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. Forged and tampered receipts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_tampered_receipts_change_nothing_and_are_quarantined() {
    within(120, async {
        let env = Env::start(1.0, None).await;
        // First the outbound half only: the letter is sent and its receipts
        // wait in the office mailbox.
        let mut gw = Gateway::start(&env, &[]).await;
        post(
            &gw,
            "contraffatta",
            &[MARIO],
            &[],
            "Ricevuta contraffatta",
            "",
            &[],
        );
        let d = wait_letter(&gw, "Ricevuta contraffatta", Duration::from_secs(30), |d| {
            d["state"] == "submitted"
        })
        .await;
        let id = s(&d["dispatch_id"]).to_owned();
        let mid = s(&d["message_id"]).to_owned();
        let office = sandbox_support::wait_for(&env.info, OFFICE, 2, Duration::from_secs(20)).await;
        assert_eq!(office.len(), 2, "acceptance and delivery receipt");
        gw.stop_cleanly().await;
        drop(gw);
        let office: Vec<Sys> = office.iter().map(|f| examine(&env.verifier, f)).collect();
        let acceptance = office
            .iter()
            .find(|m| m.kind == Kind::Acceptance)
            .expect("acceptance")
            .clone();
        let genuine = office
            .iter()
            .find(|m| m.kind == Kind::Delivery)
            .expect("delivery receipt")
            .clone();
        assert_eq!(genuine.refers_to.as_deref(), Some(mid.as_str()));
        // Take the genuine delivery receipt out of the mailbox; in its place
        // a copy with one byte of its signed text changed, and a receipt
        // made and signed by a CA nobody trusts.
        expunge(&env, OFFICE, &[genuine.uid]).await;
        let mut tampered = genuine.raw.clone();
        let boundary_end = tampered
            .windows(4)
            .position(|w| w == b"\r\n--")
            .expect("first MIME boundary");
        let needle = b"correttamente consegnato";
        let at = tampered[boundary_end..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + boundary_end)
            .expect("the receipt's text in the signed part");
        tampered[at] = b'C';
        let tampered_view = examine(
            &env.verifier,
            &Fetched {
                uid: 0,
                raw: tampered.clone(),
            },
        );
        assert_eq!(
            tampered_view.verdict.status,
            Status::Invalid,
            "{:?}",
            tampered_view.verdict
        );
        assert_eq!(
            tampered_view.d().consegna.as_deref(),
            Some(MARIO),
            "still readable"
        );
        let forged = delivery_receipt(&acceptance, MARIO, Timestamp::now(), &rogue_signer_due());
        let forged_view = examine(
            &env.verifier,
            &Fetched {
                uid: 0,
                raw: forged.clone(),
            },
        );
        assert_eq!(forged_view.kind, Kind::Delivery);
        assert_ne!(
            forged_view.verdict.status,
            Status::Valid,
            "{:?}",
            forged_view.verdict
        );
        append(&env, OFFICE, &tampered).await;
        append(&env, OFFICE, &forged).await;

        // The whole loop: the acceptance is applied, the two fakes are not.
        let mut gw = Gateway::start_full(&env, &[]).await;
        eventually("the second run started", Duration::from_secs(30), || {
            (gw.events("daemon.started").len() >= 2).then_some(())
        })
        .await;
        let quarantined = eventually("two receipts quarantined", RECEIPTS, || {
            let q = events_of(&gw, "receipt.quarantined", &id);
            (q.len() >= 2).then_some(q)
        })
        .await;
        let d = wait_final(
            &gw,
            "Ricevuta contraffatta",
            "accepted",
            &[(MARIO, "pending")],
        )
        .await;
        assert_eq!(quarantined.len(), 2, "{quarantined:?}");
        for q in &quarantined {
            assert_eq!(q["level"], "ERROR", "{q}");
            assert_eq!(q["verdict"], "invalid", "{q}");
            assert_eq!(q["kind"], "avvenuta-consegna", "{q}");
            assert_eq!(q["message_id"], mid.as_str(), "{q}");
        }
        let t = timeline(&gw, &id).await;
        let mut got = receipts_of(&t);
        got.sort();
        assert_eq!(
            got,
            vec![
                receipt("accettazione", None, "valid", "applied"),
                receipt("avvenuta-consegna", Some(MARIO), "invalid", "quarantined"),
                receipt("avvenuta-consegna", Some(MARIO), "invalid", "quarantined"),
            ],
            "both fakes recorded as quarantined"
        );
        for r in t["receipts"].as_array().expect("receipts") {
            if r["disposition"] == "quarantined" {
                assert!(
                    r["reason"]
                        .as_str()
                        .is_some_and(|x| x.contains("signature not valid")),
                    "the reason says why: {r}"
                );
            }
        }
        let evs = event_names(&t);
        assert!(
            !evs.iter().any(|e| e == "recipient.delivered"),
            "no state change: {evs:?}"
        );
        // Nothing filed as evidence in the letter's folder.
        wait_receipt_files(&d, &[file("accettazione", None)]).await;
        let st = status_json(&d, "accepted").await;
        assert_eq!(st["recipients"][0]["state"], "pending");

        // The genuine receipt, appended again, is applied.
        append(&env, OFFICE, &genuine.raw).await;
        let d = wait_final(
            &gw,
            "Ricevuta contraffatta",
            "delivered",
            &[(MARIO, "delivered")],
        )
        .await;
        wait_receipt_files(
            &d,
            &[
                file("accettazione", None),
                file("avvenuta-consegna", Some(MARIO)),
            ],
        )
        .await;
        assert_eq!(
            events_of(&gw, "receipt.quarantined", &id).len(),
            2,
            "no new quarantine"
        );
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. Deadlines

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_acceptance_and_stale_recipient_are_reported_without_state_change() {
    within(120, async {
        let faults = format!(
            r#"[[recipient]]
pattern = "{ANAGRAFE}"
missing_receipts = ["accettazione"]

[[recipient]]
pattern = "{GIULIA}"
delay_seconds = 600
"#
        );
        let env = Env::start(1.0, Some(&faults)).await;
        // Acceptance overdue after 3 s, a recipient stale 3.6 s after the
        // acceptance.
        let mut gw = Gateway::start_full(
            &env,
            &[
                ("PECGATE__DEADLINES__ACCEPTANCE_MINUTES", "0.05"),
                ("PECGATE__DEADLINES__DELIVERY_HOURS", "0.001"),
            ],
        )
        .await;
        post(
            &gw,
            "senza-accettazione",
            &[ANAGRAFE],
            &[],
            "Accettazione mancante",
            "",
            &[],
        );
        post(
            &gw,
            "ritardo",
            &[GIULIA],
            &[],
            "Consegna in ritardo",
            "",
            &[],
        );

        // No acceptance: a warning, once; the letter stays submitted.
        let d = wait_letter(&gw, "Accettazione mancante", Duration::from_secs(30), |d| {
            d["state"] == "submitted"
        })
        .await;
        let id = s(&d["dispatch_id"]).to_owned();
        let overdue = eventually(
            "deadline.acceptance_overdue",
            Duration::from_secs(20),
            || {
                let v = events_of(&gw, "deadline.acceptance_overdue", &id);
                (!v.is_empty()).then_some(v)
            },
        )
        .await;
        assert_eq!(overdue[0]["level"], "WARN");

        // Accepted, its recipient without receipt: stale, once, error level.
        let d = wait_letter(&gw, "Consegna in ritardo", Duration::from_secs(30), |d| {
            d["state"] == "accepted"
        })
        .await;
        let sid = s(&d["dispatch_id"]).to_owned();
        let stale = eventually("deadline.stale", Duration::from_secs(20), || {
            let v = events_of(&gw, "deadline.stale", &sid);
            (!v.is_empty()).then_some(v)
        })
        .await;
        assert_eq!(stale[0]["level"], "ERROR");
        assert_eq!(stale[0]["recipient"], GIULIA);

        // Several timer passes later: still once each, and no state changed.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(events_of(&gw, "deadline.acceptance_overdue", &id).len(), 1);
        assert_eq!(events_of(&gw, "deadline.stale", &sid).len(), 1);
        let list = gw.list(None).await;
        let a = by_subject(&list, "Accettazione mancante");
        assert_eq!(a["state"], "submitted", "a deadline changes no state");
        let b = by_subject(&list, "Consegna in ritardo");
        assert_eq!(b["state"], "accepted", "a deadline changes no state");
        assert_eq!(
            recipient_states(b),
            vec![(GIULIA.to_owned(), "pending".to_owned())]
        );

        let t = timeline(&gw, &id).await;
        let n = event_names(&t)
            .iter()
            .filter(|e| *e == "deadline.acceptance_overdue")
            .count();
        assert_eq!(n, 1, "the overdue acceptance in the timeline");
        assert_eq!(t["stale"], serde_json::json!([]));
        let t = timeline(&gw, &sid).await;
        assert_eq!(
            t["stale"],
            serde_json::json!([GIULIA]),
            "show flags the stale recipient"
        );
        let n = event_names(&t)
            .iter()
            .filter(|e| *e == "deadline.stale")
            .count();
        assert_eq!(n, 1, "the stale recipient in the timeline");
        let (_, human, _) = gw.cli(&["show", &sid]).await;
        assert!(human.contains("STALE"), "{human}");

        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}
