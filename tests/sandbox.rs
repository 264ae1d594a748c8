//! Acceptance tests of `pecgate sandbox` (docs/sandbox.md): each test starts
//! its own sandbox in a temporary directory (real Dovecot, the simulated
//! providers' SMTP service), submits letters with lettre, reads the
//! mailboxes with async-imap, and checks every message found: its PEC kind,
//! its signature (valid with the sandbox CA as the only anchor), the
//! absence of inspection problems, and the certified data.
//!
//! Dovecot must be installed (`apt-get install dovecot-imapd`, done by
//! scripts/setup): without it every test FAILS with that command in its
//! message. The openssl test needs the `openssl` program.

mod sandbox_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::Mechanism;
use pecgate::config::{Config, TlsMode};
use pecgate::pec::kind::Kind;
use pecgate::verify::{Failure, Status};
use sandbox_support::*;

/// `(address, tipo)` of every daticert `destinatari`.
fn destinatari(s: &Sys) -> Vec<(String, String)> {
    s.d()
        .destinatari
        .iter()
        .map(|d| (d.address.clone(), d.tipo.clone()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, t)| ((*a).to_owned(), (*t).to_owned()))
        .collect()
}

/// Every message of `address`, inspected and verified.
async fn certified_box(env: &Env, address: &str, n: usize) -> Vec<Sys> {
    env.wait(address, n)
        .await
        .iter()
        .map(|f| env.certified(f))
        .collect()
}

/// After a short settling time, asserts that each mailbox holds exactly
/// this many messages.
async fn assert_counts(env: &Env, expected: &[(&str, usize)]) {
    tokio::time::sleep(SETTLE).await;
    for (address, n) in expected {
        let got = env.fetch(address).await;
        assert_eq!(
            got.len(),
            *n,
            "{address}: expected exactly {n} message(s), found {:?}",
            got.iter().map(|f| describe(&f.raw)).collect::<Vec<_>>()
        );
    }
}

/// Checks an envelope's postacert.eml: Message-ID = identificativo,
/// X-Riferimento-Message-ID = the client's msgid.
fn assert_postacert_ids(postacert: &[u8], identificativo: &str, msgid: &str) {
    assert_eq!(
        header(postacert, "Message-ID").as_deref(),
        Some(format!("<{identificativo}>").as_str()),
        "postacert.eml Message-ID"
    );
    assert_eq!(
        header(postacert, "X-Riferimento-Message-ID").as_deref(),
        Some(format!("<{msgid}>").as_str()),
        "postacert.eml X-Riferimento-Message-ID"
    );
}

/// The provider service address and gestore of a certified address.
fn provider_of(address: &str) -> (&'static str, &'static str) {
    if address.ends_with("@pec.comune.sandbox.test") {
        (UNO, UNO_GESTORE)
    } else if address.ends_with("@pec.cittadini.sandbox.test") {
        (DUE, DUE_GESTORE)
    } else {
        panic!("{address} is not certified")
    }
}

// ---------------------------------------------------------------------------
// 1. The happy path

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_receipts_envelopes_and_correlation() {
    let env = Env::start(1.0, None).await;
    within(60, async {
        let attachment = pdf();
        let letter = Letter::new(
            OFFICE,
            &[MARIO, GIULIA],
            "Comunicazione di avvio del procedimento",
        )
        .cc(&[ANAGRAFE, ANNA])
        .tipo("completa")
        .attach(attachment.clone());
        let msgid = letter.message_id.clone();
        let reply = env.send(OFFICE, &letter).await.expect("submission");
        assert_eq!(u16::from(reply.code()), 250, "{reply:?}");

        let office = certified_box(&env, OFFICE, 4).await;
        let mut envelopes = BTreeMap::new();
        for rcpt in [MARIO, GIULIA, ANAGRAFE, ANNA] {
            envelopes.insert(rcpt, certified_box(&env, rcpt, 1).await);
        }
        assert_counts(
            &env,
            &[
                (OFFICE, 4),
                (MARIO, 1),
                (GIULIA, 1),
                (ANAGRAFE, 1),
                (ANNA, 1),
            ],
        )
        .await;

        // The office: one acceptance, three delivery receipts, nothing else.
        let acc = one(&office, &Kind::Acceptance);
        let deliveries = of_kind(&office, &Kind::Delivery);
        assert_eq!(deliveries.len(), 3, "{office:?}");
        let ident = acc.d().identificativo.clone();
        assert!(!ident.is_empty());

        // The acceptance.
        assert_eq!(acc.from.as_deref(), Some(UNO));
        assert_eq!(acc.to, vec![OFFICE.to_owned()]);
        assert_eq!(
            acc.subject.as_deref(),
            Some("ACCETTAZIONE: Comunicazione di avvio del procedimento")
        );
        assert_eq!(acc.header("X-Ricevuta").as_deref(), Some("accettazione"));
        assert_eq!(acc.refers_to.as_deref(), Some(msgid.as_str()));
        assert!(acc.postacert.is_none(), "acceptance carries no original");
        let d = acc.d();
        assert_eq!(d.tipo, "accettazione");
        assert_eq!(d.errore, "nessuno");
        assert_eq!(d.mittente.as_deref(), Some(OFFICE));
        assert_eq!(d.gestore_emittente.as_deref(), Some(UNO_GESTORE));
        assert_eq!(d.msgid.as_deref(), Some(msgid.as_str()));
        assert_eq!(
            d.oggetto.as_deref(),
            Some("Comunicazione di avvio del procedimento")
        );
        assert_eq!(d.consegna, None);
        let expected_dest = pairs(&[
            (MARIO, "certificato"),
            (GIULIA, "certificato"),
            (ANAGRAFE, "certificato"),
            (ANNA, "esterno"),
        ]);
        assert_eq!(destinatari(acc), expected_dest);
        assert_eq!(acc.verdict.signer_email.as_deref(), Some(UNO));
        assert_eq!(
            acc.verdict.signed_at,
            Some(d.data),
            "signingTime = daticert data"
        );

        // The delivery receipts: one per certified recipient, from the
        // recipient's provider, completa for To, sintetica for Cc.
        let mut consegne: Vec<&str> = deliveries
            .iter()
            .map(|s| s.d().consegna.as_deref().expect("consegna"))
            .collect();
        consegne.sort_unstable();
        let mut want = vec![MARIO, GIULIA, ANAGRAFE];
        want.sort_unstable();
        assert_eq!(consegne, want);
        for r in &deliveries {
            let d = r.d();
            let consegna = d.consegna.as_deref().unwrap();
            let (service, gestore) = provider_of(consegna);
            assert_eq!(
                r.from.as_deref(),
                Some(service),
                "From of receipt for {consegna}"
            );
            assert_eq!(r.verdict.signer_email.as_deref(), Some(service));
            assert_eq!(d.gestore_emittente.as_deref(), Some(gestore));
            assert_eq!(d.tipo, "avvenuta-consegna");
            assert_eq!(d.errore, "nessuno");
            assert_eq!(d.identificativo, ident, "correlation of {consegna}");
            assert_eq!(d.msgid.as_deref(), Some(msgid.as_str()));
            assert_eq!(d.mittente.as_deref(), Some(OFFICE));
            assert_eq!(destinatari(r), expected_dest);
            assert_eq!(r.to, vec![OFFICE.to_owned()]);
            assert_eq!(
                r.subject.as_deref(),
                Some("CONSEGNA: Comunicazione di avvio del procedimento")
            );
            assert!(d.data >= acc.d().data, "delivery before acceptance");
            if consegna == ANAGRAFE {
                assert_eq!(
                    d.ricevuta.as_deref(),
                    Some("sintetica"),
                    "Cc gets sintetica"
                );
                assert!(r.postacert.is_none(), "sintetica carries no original");
            } else {
                assert_eq!(d.ricevuta.as_deref(), Some("completa"));
                let p = r
                    .postacert
                    .as_deref()
                    .expect("completa carries postacert.eml");
                assert_postacert_ids(p, &ident, &msgid);
                let att = attachments(p);
                assert!(
                    att.iter()
                        .any(|(n, c)| *n == attachment.name && *c == attachment.data),
                    "completa receipt keeps the attachment: {:?}",
                    att.iter().map(|a| &a.0).collect::<Vec<_>>()
                );
            }
        }

        // The envelopes: one per recipient (the ordinary one included),
        // from provider uno, with the one time of issue.
        for (rcpt, list) in &envelopes {
            let e = one(list, &Kind::Transport);
            let d = e.d();
            assert_eq!(e.from.as_deref(), Some(UNO), "envelope From for {rcpt}");
            assert_eq!(e.verdict.signer_email.as_deref(), Some(UNO));
            assert_eq!(
                e.header("From").as_deref(),
                Some(format!("\"Per conto di: {OFFICE}\" <{UNO}>").as_str())
            );
            assert_eq!(e.x_trasporto.as_deref(), Some("posta-certificata"));
            assert_eq!(e.tipo_ricevuta.as_deref(), Some("completa"));
            assert_eq!(
                e.subject.as_deref(),
                Some("POSTA CERTIFICATA: Comunicazione di avvio del procedimento")
            );
            assert_eq!(e.message_id.as_deref(), Some(ident.as_str()));
            assert_eq!(e.refers_to.as_deref(), Some(msgid.as_str()));
            assert_eq!(d.tipo, "posta-certificata");
            assert_eq!(d.identificativo, ident);
            assert_eq!(d.msgid.as_deref(), Some(msgid.as_str()));
            assert_eq!(d.gestore_emittente.as_deref(), Some(UNO_GESTORE));
            assert_eq!(d.ricevuta.as_deref(), Some("completa"));
            assert_eq!(destinatari(e), expected_dest);
            assert_eq!(d.data, acc.d().data, "one time of issue ({rcpt})");
            assert_eq!(e.verdict.signed_at, acc.verdict.signed_at);
            let p = e.postacert.as_deref().expect("postacert.eml");
            assert_postacert_ids(p, &ident, &msgid);
            assert!(
                attachments(p)
                    .iter()
                    .any(|(n, c)| *n == attachment.name && *c == attachment.data),
                "the envelope carries the attachment intact"
            );
        }
    })
    .await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------
// 2. breve and sintetica

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breve_and_sintetica_receipts() {
    let env = Env::start(1.0, None).await;
    within(60, async {
        let attachment = pdf();
        let breve = Letter::new(OFFICE, &[MARIO], "Ricevuta breve")
            .tipo("breve")
            .attach(attachment.clone());
        let sintetica = Letter::new(OFFICE, &[GIULIA], "Ricevuta sintetica")
            .tipo("sintetica")
            .attach(attachment.clone());
        env.send(OFFICE, &breve).await.expect("breve submission");
        // The second one over implicit TLS with AUTH LOGIN.
        let mut s = Submit::new(OFFICE, &env.password(OFFICE), &sintetica);
        s.via = Via::Implicit;
        s.mechanism = Mechanism::Login;
        submit(&env.info, &s).await.expect("sintetica submission");

        let office = certified_box(&env, OFFICE, 4).await;
        let mario = certified_box(&env, MARIO, 1).await;
        let giulia = certified_box(&env, GIULIA, 1).await;
        assert_counts(&env, &[(OFFICE, 4), (MARIO, 1), (GIULIA, 1)]).await;
        assert_eq!(of_kind(&office, &Kind::Acceptance).len(), 2);
        let by_msgid = |m: &str| -> &Sys {
            let found: Vec<&Sys> = of_kind(&office, &Kind::Delivery)
                .into_iter()
                .filter(|s| s.d().msgid.as_deref() == Some(m))
                .collect();
            assert_eq!(found.len(), 1, "one delivery receipt for {m}");
            found[0]
        };

        // breve: the original with the attachment replaced by its SHA-1.
        let r = by_msgid(&breve.message_id);
        assert_eq!(r.d().ricevuta.as_deref(), Some("breve"));
        assert_eq!(r.d().consegna.as_deref(), Some(MARIO));
        let p = r.postacert.as_deref().expect("breve carries postacert.eml");
        let att = attachments(p);
        let names: Vec<&str> = att.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(names, vec!["determina-2026-123.pdf.hash"], "breve parts");
        assert_eq!(
            String::from_utf8_lossy(&att[0].1).trim(),
            sha1_hex(&attachment.data),
            "the .hash part holds the SHA-1 of the attachment"
        );
        assert!(
            String::from_utf8_lossy(p).contains("Ricevuta breve."),
            "the text stays"
        );
        let ident = r.d().identificativo.clone();
        assert_postacert_ids(p, &ident, &breve.message_id);
        let e = one(&mario, &Kind::Transport);
        assert_eq!(e.tipo_ricevuta.as_deref(), Some("breve"));
        assert_eq!(e.d().ricevuta.as_deref(), Some("breve"));
        assert_eq!(e.d().identificativo, ident);
        assert_eq!(
            attachments(e.postacert.as_deref().unwrap())[0].1,
            attachment.data,
            "the envelope itself carries the full attachment"
        );

        // sintetica: no original at all.
        let r = by_msgid(&sintetica.message_id);
        assert_eq!(r.d().ricevuta.as_deref(), Some("sintetica"));
        assert_eq!(r.d().consegna.as_deref(), Some(GIULIA));
        assert!(r.postacert.is_none(), "sintetica carries no postacert.eml");
        assert!(
            r.other_parts.iter().all(|n| n.is_none()),
            "no attachment at all: {:?}",
            r.other_parts
        );
        let e = one(&giulia, &Kind::Transport);
        assert_eq!(e.tipo_ricevuta.as_deref(), Some("sintetica"));
        assert_eq!(e.d().ricevuta.as_deref(), Some("sintetica"));
    })
    .await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. Unknown mailbox, unknown domain

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_mailbox_gets_no_dest_and_unknown_domain_is_esterno() {
    let env = Env::start(1.0, None).await;
    within(60, async {
        let nessuno_due = "nessuno@pec.cittadini.sandbox.test";
        let nessuno_uno = "ignoto@pec.comune.sandbox.test";
        let esterno = "someone@example.org";
        let letter = Letter::new(
            OFFICE,
            &[MARIO, nessuno_due, nessuno_uno, esterno],
            "Indirizzi",
        );
        env.send(OFFICE, &letter).await.expect("submission");
        let office = certified_box(&env, OFFICE, 4).await;
        certified_box(&env, MARIO, 1).await;
        assert_counts(&env, &[(OFFICE, 4), (MARIO, 1)]).await;

        let acc = one(&office, &Kind::Acceptance);
        assert_eq!(
            destinatari(acc),
            pairs(&[
                (MARIO, "certificato"),
                (nessuno_due, "certificato"),
                (nessuno_uno, "certificato"),
                (esterno, "esterno"),
            ])
        );
        let delivery = one(&office, &Kind::Delivery);
        assert_eq!(delivery.d().consegna.as_deref(), Some(MARIO));
        let errors = of_kind(&office, &Kind::DeliveryError);
        assert_eq!(errors.len(), 2);
        for (who, service, gestore) in [
            (nessuno_due, DUE, DUE_GESTORE),
            (nessuno_uno, UNO, UNO_GESTORE),
        ] {
            let e = errors
                .iter()
                .find(|e| e.d().consegna.as_deref() == Some(who))
                .unwrap_or_else(|| panic!("no errore-consegna for {who}"));
            let d = e.d();
            assert_eq!(d.tipo, "errore-consegna");
            assert_eq!(d.errore, "no-dest");
            assert_eq!(d.errore_code.as_deref(), Some("5.1.1"));
            assert!(
                d.errore_esteso
                    .as_deref()
                    .unwrap()
                    .ends_with("indirizzo non valido"),
                "{:?}",
                d.errore_esteso
            );
            assert_eq!(
                e.from.as_deref(),
                Some(service),
                "issued by {who}'s provider"
            );
            assert_eq!(d.gestore_emittente.as_deref(), Some(gestore));
            assert_eq!(d.identificativo, acc.d().identificativo);
            assert_eq!(d.msgid.as_deref(), Some(letter.message_id.as_str()));
            assert!(!e.virus);
            assert!(e.postacert.is_none());
            assert_eq!(
                e.subject.as_deref(),
                Some("AVVISO DI MANCATA CONSEGNA: Indirizzi")
            );
        }
        assert!(
            office
                .iter()
                .all(|s| s.d().consegna.as_deref() != Some(esterno)),
            "no receipt is issued for an esterno recipient"
        );
    })
    .await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------
// 4. Formal exceptions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formal_exceptions_give_signed_non_acceptance() {
    let env = Env::start(1.0, None).await;
    within(60, async {
        let pw = env.password(OFFICE);
        // From differs from the login.
        let from_other = Letter::new(ANAGRAFE, &[MARIO], "Mittente diverso");
        let s1 = Submit::new(OFFICE, &pw, &from_other);
        // A RCPT that is neither in To nor in Cc.
        let hidden = Letter::new(OFFICE, &[MARIO], "Destinatario nascosto");
        let mut s2 = Submit::new(OFFICE, &pw, &hidden);
        s2.rcpts.push(GIULIA.to_owned());
        // A Bcc header.
        let mut bcc = Letter::new(OFFICE, &[MARIO], "Copia nascosta");
        bcc.bcc.push(GIULIA.to_owned());
        let s3 = Submit::new(OFFICE, &pw, &bcc);
        // A blocked attachment.
        let exe = Letter::new(OFFICE, &[MARIO], "Allegato eseguibile").attach(Attachment {
            name: "programma.exe".into(),
            content_type: "application/octet-stream".into(),
            data: b"MZ\x90\x00\x03\x00\x00\x00".to_vec(),
        });
        let s4 = Submit::new(OFFICE, &pw, &exe);
        // A virus (EICAR), over implicit TLS.
        let virus = Letter::new(OFFICE, &[MARIO], "Allegato infetto").attach(Attachment {
            name: "leggimi.txt".into(),
            content_type: "text/plain".into(),
            data: EICAR.to_vec(),
        });
        let mut s5 = Submit::new(OFFICE, &pw, &virus);
        s5.via = Via::Implicit;

        for s in [&s1, &s2, &s3, &s4, &s5] {
            let reply = submit(&env.info, s).await.expect("taken in charge");
            assert_eq!(u16::from(reply.code()), 250);
        }
        let office = certified_box(&env, OFFICE, 5).await;
        assert_counts(&env, &[(OFFICE, 5), (MARIO, 0), (GIULIA, 0), (ANAGRAFE, 0)]).await;
        assert_eq!(
            of_kind(&office, &Kind::NonAcceptance).len(),
            5,
            "{office:?}"
        );

        let cases: [(&Letter, &str, bool); 5] = [
            (
                &from_other,
                "il mittente anagrafe@pec.comune.sandbox.test non corrisponde all'utente \
                 autenticato protocollo@pec.comune.sandbox.test",
                false,
            ),
            (
                &hidden,
                "il destinatario giulia.bianchi@pec.cittadini.sandbox.test non è nei campi To o \
                 Cc (destinatario nascosto)",
                false,
            ),
            (&bcc, "il campo Bcc non è ammesso", false),
            (
                &exe,
                "allegato di tipo non ammesso (.exe): programma.exe",
                false,
            ),
            (&virus, "virus rilevato nel messaggio", true),
        ];
        for (letter, reason, is_virus) in cases {
            let n = office
                .iter()
                .find(|s| s.d().msgid.as_deref() == Some(letter.message_id.as_str()))
                .unwrap_or_else(|| panic!("no notice for \"{}\"", letter.subject));
            let d = n.d();
            assert_eq!(n.kind, Kind::NonAcceptance, "{}", letter.subject);
            assert_eq!(n.from.as_deref(), Some(UNO));
            assert_eq!(n.to, vec![OFFICE.to_owned()]);
            assert!(n.postacert.is_none(), "no original in a non-acceptance");
            assert_eq!(d.tipo, "non-accettazione");
            assert_eq!(d.gestore_emittente.as_deref(), Some(UNO_GESTORE));
            assert_eq!(
                d.errore_esteso.as_deref(),
                Some(reason),
                "{}",
                letter.subject
            );
            assert!(
                n.text.as_deref().unwrap_or_default().contains(reason),
                "the reason is in the text: {:?}",
                n.text
            );
            if is_virus {
                assert_eq!(d.errore, "virus");
                assert!(n.virus);
                assert_eq!(n.header("X-VerificaSicurezza").as_deref(), Some("errore"));
                assert_eq!(
                    n.subject.as_deref(),
                    Some(
                        format!("AVVISO DI NON ACCETTAZIONE PER VIRUS: {}", letter.subject)
                            .as_str()
                    )
                );
            } else {
                assert_eq!(d.errore, "altro");
                assert!(!n.virus);
                assert_eq!(n.header("X-VerificaSicurezza"), None);
                assert_eq!(
                    n.subject.as_deref(),
                    Some(format!("AVVISO DI NON ACCETTAZIONE: {}", letter.subject).as_str())
                );
            }
        }

        // A wrong password: 535, with PLAIN over STARTTLS and LOGIN over TLS.
        let ok = Letter::new(OFFICE, &[MARIO], "Password sbagliata");
        let mut s = Submit::new(OFFICE, "not-the-password", &ok);
        let e = submit(&env.info, &s).await.expect_err("wrong password");
        assert_eq!(code(&e), Some(535), "{e}");
        assert!(e.is_permanent());
        s.via = Via::Implicit;
        s.mechanism = Mechanism::Login;
        let e = submit(&env.info, &s).await.expect_err("wrong password");
        assert_eq!(code(&e), Some(535), "{e}");
        assert_counts(&env, &[(OFFICE, 5), (MARIO, 0)]).await;
    })
    .await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------
// 5. Ordinary senders

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_sender_gets_anomaly_into_pec_and_plain_into_ordinary() {
    let env = Env::start(1.0, None).await;
    within(60, async {
        let to_pec = Letter::new(ANNA, &[MARIO], "Messaggio ordinario");
        let to_ordinary = Letter::new(ANNA, &[PAOLO], "Tra caselle ordinarie");
        env.send(ANNA, &to_pec).await.expect("submission to pec");
        env.send(ANNA, &to_ordinary)
            .await
            .expect("submission to ordinary");

        let mario = certified_box(&env, MARIO, 1).await;
        let paolo = env.wait(PAOLO, 1).await;
        assert_counts(&env, &[(MARIO, 1), (PAOLO, 1), (ANNA, 0), (OFFICE, 0)]).await;

        let a = one(&mario, &Kind::Anomaly);
        assert_eq!(a.x_trasporto.as_deref(), Some("errore"));
        assert_eq!(
            a.from.as_deref(),
            Some(DUE),
            "signed by the recipient's provider"
        );
        assert_eq!(a.verdict.signer_email.as_deref(), Some(DUE));
        assert_eq!(
            a.header("From").as_deref(),
            Some(format!("\"Per conto di: {ANNA}\" <{DUE}>").as_str())
        );
        assert_eq!(
            a.subject.as_deref(),
            Some("ANOMALIA MESSAGGIO: Messaggio ordinario")
        );
        assert!(a.daticert.is_none(), "an anomaly envelope has no daticert");
        let wrapped = a.postacert.as_deref().expect("the wrapped message");
        assert_eq!(
            header(wrapped, "Message-ID"),
            Some(format!("<{}>", to_pec.message_id))
        );
        assert_eq!(header(wrapped, "From").as_deref(), Some(ANNA));
        assert!(String::from_utf8_lossy(wrapped).contains("Messaggio ordinario."));

        let plain = examine(&env.verifier, &paolo[0]);
        assert_eq!(plain.kind, Kind::NotPec);
        assert_eq!(plain.verdict.status, Status::Unsigned);
        let sent = to_ordinary.render();
        let got = &paolo[0].raw;
        // lettre always ends DATA with CRLF . CRLF: one extra CRLF may follow.
        assert!(
            *got == sent || got.strip_suffix(b"\r\n") == Some(sent.as_slice()),
            "the ordinary message arrives as it is:\n{}",
            String::from_utf8_lossy(got)
        );
    })
    .await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------
// 6. openssl smime -verify

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_verify_with_the_openssl_command() {
    let openssl = openssl_cli();
    let env = Env::start(1.0, None).await;
    within(60, async {
        let letter = Letter::new(OFFICE, &[MARIO], "Verifica con openssl").attach(pdf());
        env.send(OFFICE, &letter).await.expect("submission");
        let mut all = env.wait(OFFICE, 2).await;
        all.extend(env.wait(MARIO, 1).await);
        let kinds: Vec<Kind> = all.iter().map(|f| env.certified(f).kind).collect();
        let mut names: Vec<&str> = kinds.iter().map(Kind::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["accettazione", "avvenuta-consegna", "posta-certificata"]
        );

        let verify = |path: &std::path::Path| {
            std::process::Command::new(&openssl)
                .arg("smime")
                .arg("-verify")
                .arg("-CAfile")
                .arg(&env.info.ca_file)
                .arg("-in")
                .arg(path)
                .arg("-out")
                .arg("/dev/null")
                .output()
                .expect("run openssl")
        };
        for (i, f) in all.iter().enumerate() {
            let path = env.tmp.path().join(format!("msg{i}.eml"));
            std::fs::write(&path, &f.raw).unwrap();
            let out = verify(&path);
            assert!(
                out.status.success(),
                "openssl smime -verify refused {}: {}",
                kinds[i],
                String::from_utf8_lossy(&out.stderr)
            );
            // The same message with one byte of its signed text changed
            // must be refused (the check is real).
            let mut tampered = f.raw.clone();
            let at = tamper_point(&tampered);
            tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
            let path = env.tmp.path().join(format!("tampered{i}.eml"));
            std::fs::write(&path, &tampered).unwrap();
            let out = verify(&path);
            assert!(
                !out.status.success(),
                "openssl accepted a tampered {}",
                kinds[i]
            );
        }
    })
    .await;
    env.shutdown().await;
}

/// A letter or digit in the middle of the signed part of a message.
fn tamper_point(raw: &[u8]) -> usize {
    let ins = pecgate::pec::inspect::inspect(raw).expect("inspect");
    let pecgate::pec::envelope::Signature::Detached { range, .. } = &ins.message.signature else {
        panic!("not a detached signature");
    };
    let mid = range.start + range.len() / 2;
    (mid..range.end)
        .find(|&i| raw[i].is_ascii_alphanumeric())
        .expect("a letter in the signed part")
}

// ---------------------------------------------------------------------------
// 7. DIR/pecgate.toml

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pecgate_toml_loads_and_reaches_the_sandbox() {
    let env = Env::start(1.0, None).await;
    within(60, async {
        let dir = env.dir().to_owned();
        let config =
            Config::load_with_env(&dir.join("pecgate.toml"), Vec::<(String, String)>::new())
                .unwrap_or_else(|e| panic!("pecgate.toml: {e}"));
        assert_eq!(config.mailboxes.len(), 1);
        let mb = config.mailbox("protocollo").expect("[mailbox.protocollo]");
        assert_eq!(mb.address, OFFICE);
        assert_eq!(mb.outbox, dir.join("outbox"));
        assert_eq!(mb.sent, dir.join("sent"));
        assert_eq!(mb.inbox, dir.join("inbox"));
        assert_eq!(config.store.database, dir.join("pecgate.db"));
        assert_eq!(config.store.archive, dir.join("archive"));
        assert_eq!(config.trust.anchors, vec![dir.join("anchors")]);
        assert_eq!(
            config.deadlines.delivery,
            jiff::SignedDuration::from_hours(26)
        );
        for (server, port) in [
            (&mb.smtp, env.info.smtps.port),
            (&mb.imap.server, env.info.imaps.port),
        ] {
            assert_eq!(server.host, "127.0.0.1");
            assert_eq!(server.port, port);
            assert_eq!(server.tls, TlsMode::Implicit);
            assert_eq!(server.ca_file.as_deref(), Some(env.info.ca_file.as_path()));
            assert_eq!(server.username, OFFICE);
            assert_eq!(server.password.expose(), env.password(OFFICE));
        }

        // The configuration works: submit with its SMTP settings and read
        // the receipts with its IMAP settings.
        let letter = Letter::new(OFFICE, &[MARIO], "Configurazione");
        let mut s = Submit::new(&mb.smtp.username, mb.smtp.password.expose(), &letter);
        s.via = Via::Implicit;
        let mut info = env.info.clone();
        info.smtps.port = mb.smtp.port;
        info.imaps.port = mb.imap.server.port;
        info.ca_file = mb.smtp.ca_file.clone().unwrap();
        submit(&info, &s)
            .await
            .expect("submission with pecgate.toml settings");
        let got = wait_for(&info, &mb.imap.server.username, 2, ARRIVAL).await;
        let mut kinds: Vec<String> = got
            .iter()
            .map(|f| env.certified(f).kind.to_string())
            .collect();
        kinds.sort_unstable();
        assert_eq!(kinds, ["accettazione", "avvenuta-consegna"]);
    })
    .await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------
// 8. Faults

/// The faults file text for one recipient entry.
fn recipient_fault(pattern: &str, body: &str) -> String {
    format!("[[recipient]]\npattern = \"{pattern}\"\n{body}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delivery_delay() {
    let env = Env::start(
        3600.0,
        Some(&recipient_fault(MARIO, "delay_seconds = 3600")),
    )
    .await;
    within(60, async {
        assert_eq!(env.info.time_scale, 3600.0);
        let letter = Letter::new(OFFICE, &[MARIO], "Consegna lenta");
        env.send(OFFICE, &letter).await.expect("submission");
        let sent = Instant::now();
        let office = certified_box(&env, OFFICE, 2).await;
        let elapsed = sent.elapsed();
        assert!(
            elapsed >= Duration::from_millis(500),
            "delivery receipt after {elapsed:?}: an hour at 3600x is about a second"
        );
        let acc = one(&office, &Kind::Acceptance);
        let del = one(&office, &Kind::Delivery);
        assert!(acc.uid < del.uid, "the acceptance comes first");
        let gap = del.data_secs() - acc.data_secs();
        assert!(
            (3600..3600 * 30).contains(&gap),
            "simulated gap {gap} s, expected at least 3600"
        );
        certified_box(&env, MARIO, 1).await;
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_no_delivery_gives_12h_and_24h_notices() {
    let env = Env::start(43200.0, Some(&recipient_fault(MARIO, "no_delivery = true"))).await;
    within(60, async {
        let letter = Letter::new(OFFICE, &[MARIO], "Mai consegnato");
        env.send(OFFICE, &letter).await.expect("submission");
        let office = certified_box(&env, OFFICE, 3).await;
        assert_counts(&env, &[(OFFICE, 3), (MARIO, 0)]).await;
        let acc = one(&office, &Kind::Acceptance);
        let mut notices = of_kind(&office, &Kind::DeliveryTimeout);
        assert_eq!(notices.len(), 2, "{office:?}");
        notices.sort_by_key(|s| s.data_secs());
        let (pre, fin) = (notices[0], notices[1]);
        for n in [pre, fin] {
            let d = n.d();
            assert_eq!(d.tipo, "preavviso-errore-consegna");
            assert_eq!(d.consegna.as_deref(), Some(MARIO));
            assert_eq!(d.identificativo, acc.d().identificativo);
            assert_eq!(d.msgid.as_deref(), Some(letter.message_id.as_str()));
            assert_eq!(
                n.from.as_deref(),
                Some(UNO),
                "issued by the sender's provider"
            );
            assert_eq!(d.gestore_emittente.as_deref(), Some(UNO_GESTORE));
            assert_eq!(
                n.subject.as_deref(),
                Some("AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: Mai consegnato")
            );
        }
        assert_eq!(pre.d().errore_code.as_deref(), Some("4.4.7"));
        assert!(
            pre.d()
                .errore_esteso
                .as_deref()
                .unwrap()
                .starts_with("4.4.7")
        );
        assert_eq!(fin.d().errore_code.as_deref(), Some("5.4.1"));
        let t0 = acc.data_secs();
        assert!(
            pre.data_secs() >= t0 + 12 * 3600,
            "preavviso {} s after acceptance",
            pre.data_secs() - t0
        );
        assert!(
            fin.data_secs() >= t0 + 24 * 3600,
            "final notice {} s after acceptance",
            fin.data_secs() - t0
        );
        assert!(pre.uid < fin.uid);
    })
    .await;
    env.shutdown().await;
}

/// Sends one letter office -> mario and returns the office's messages once
/// it holds `n`, after checking the exact counts (mario: `mario_n`).
async fn one_letter(env: &Env, subject: &str, n: usize, mario_n: usize) -> (Letter, Vec<Sys>) {
    let letter = Letter::new(OFFICE, &[MARIO], subject);
    env.send(OFFICE, &letter).await.expect("submission");
    let office = certified_box(env, OFFICE, n).await;
    if mario_n > 0 {
        certified_box(env, MARIO, mario_n).await;
    }
    assert_counts(env, &[(OFFICE, n), (MARIO, mario_n)]).await;
    (letter, office)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_virus_at_recipient_provider() {
    let env = Env::start(1.0, Some(&recipient_fault(MARIO, "virus = true"))).await;
    within(60, async {
        let (letter, office) = one_letter(&env, "Virus dal destinatario", 2, 0).await;
        one(&office, &Kind::Acceptance);
        let e = one(&office, &Kind::DeliveryError);
        let d = e.d();
        assert_eq!(d.errore, "virus");
        assert_eq!(d.consegna.as_deref(), Some(MARIO));
        assert_eq!(d.msgid.as_deref(), Some(letter.message_id.as_str()));
        assert!(e.virus);
        assert_eq!(e.header("X-VerificaSicurezza").as_deref(), Some("errore"));
        assert_eq!(
            e.subject.as_deref(),
            Some("AVVISO DI MANCATA CONSEGNA PER VIRUS: Virus dal destinatario")
        );
        assert_eq!(
            e.from.as_deref(),
            Some(UNO),
            "told by the sender's provider"
        );
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_mailbox_full() {
    let env = Env::start(1.0, Some(&recipient_fault(MARIO, "mailbox_full = true"))).await;
    within(60, async {
        let (letter, office) = one_letter(&env, "Casella piena", 2, 0).await;
        one(&office, &Kind::Acceptance);
        let e = one(&office, &Kind::DeliveryError);
        let d = e.d();
        assert_eq!(d.errore_code.as_deref(), Some("5.2.2"));
        assert!(
            d.errore_esteso
                .as_deref()
                .unwrap()
                .ends_with("casella piena")
        );
        assert_eq!(d.errore, "altro");
        assert_eq!(d.consegna.as_deref(), Some(MARIO));
        assert_eq!(d.msgid.as_deref(), Some(letter.message_id.as_str()));
        assert_eq!(
            e.from.as_deref(),
            Some(DUE),
            "issued by the recipient's provider"
        );
        assert!(!e.virus);
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_no_dominio() {
    let env = Env::start(1.0, Some(&recipient_fault(MARIO, "no_dominio = true"))).await;
    within(60, async {
        let (letter, office) = one_letter(&env, "Dominio sconosciuto", 2, 0).await;
        one(&office, &Kind::Acceptance);
        let e = one(&office, &Kind::DeliveryError);
        let d = e.d();
        assert_eq!(d.errore, "no-dominio");
        assert_eq!(d.errore_code.as_deref(), Some("5.1.2"));
        assert_eq!(d.consegna.as_deref(), Some(MARIO));
        assert_eq!(d.msgid.as_deref(), Some(letter.message_id.as_str()));
        assert_eq!(e.from.as_deref(), Some(UNO));
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_missing_receipts() {
    let faults = format!(
        "{}{}",
        recipient_fault(MARIO, "missing_receipts = [\"avvenuta-consegna\"]"),
        recipient_fault(GIULIA, "missing_receipts = [\"accettazione\"]")
    );
    let env = Env::start(1.0, Some(&faults)).await;
    within(60, async {
        let no_delivery = Letter::new(OFFICE, &[MARIO], "Senza consegna");
        let no_acceptance = Letter::new(OFFICE, &[GIULIA], "Senza accettazione");
        env.send(OFFICE, &no_delivery).await.expect("submission");
        env.send(OFFICE, &no_acceptance).await.expect("submission");
        let office = certified_box(&env, OFFICE, 2).await;
        certified_box(&env, MARIO, 1).await;
        certified_box(&env, GIULIA, 1).await;
        // Longer than the usual settling time: receipts that should not come.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_counts(&env, &[(OFFICE, 2), (MARIO, 1), (GIULIA, 1)]).await;
        let acc = one(&office, &Kind::Acceptance);
        assert_eq!(
            acc.d().msgid.as_deref(),
            Some(no_delivery.message_id.as_str())
        );
        let del = one(&office, &Kind::Delivery);
        assert_eq!(
            del.d().msgid.as_deref(),
            Some(no_acceptance.message_id.as_str())
        );
        assert_eq!(del.d().consegna.as_deref(), Some(GIULIA));
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_duplicate_receipts() {
    let env = Env::start(
        1.0,
        Some(&recipient_fault(MARIO, "duplicate_receipts = true")),
    )
    .await;
    within(60, async {
        let (letter, office) = one_letter(&env, "Ricevute doppie", 4, 1).await;
        let accs = of_kind(&office, &Kind::Acceptance);
        let dels = of_kind(&office, &Kind::Delivery);
        assert_eq!((accs.len(), dels.len()), (2, 2), "{office:?}");
        assert_eq!(accs[0].raw, accs[1].raw, "identical acceptances");
        assert_eq!(dels[0].raw, dels[1].raw, "identical delivery receipts");
        assert_ne!(accs[0].uid, accs[1].uid);
        for s in &office {
            assert_eq!(s.d().msgid.as_deref(), Some(letter.message_id.as_str()));
        }
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_out_of_order() {
    let env = Env::start(1.0, Some(&recipient_fault(MARIO, "out_of_order = true"))).await;
    within(60, async {
        let (_, office) = one_letter(&env, "Fuori ordine", 2, 1).await;
        let acc = one(&office, &Kind::Acceptance);
        let del = one(&office, &Kind::Delivery);
        assert!(
            del.uid < acc.uid,
            "the delivery receipt (uid {}) must be appended before the acceptance (uid {})",
            del.uid,
            acc.uid
        );
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_rate_limit() {
    let env = Env::start(1.0, Some("[smtp]\nrate_limit_per_minute = 2\n")).await;
    within(60, async {
        for i in 1..=2 {
            let l = Letter::new(OFFICE, &[MARIO], &format!("Entro il limite {i}"));
            env.send(OFFICE, &l).await.expect("within the limit");
        }
        let third = Letter::new(OFFICE, &[MARIO], "Oltre il limite");
        let e = env
            .send(OFFICE, &third)
            .await
            .expect_err("third MAIL refused");
        assert_eq!(code(&e), Some(451), "{e}");
        assert!(e.is_transient());
        assert!(e.to_string().contains("4.7.0"), "enhanced code: {e}");
        let office = certified_box(&env, OFFICE, 4).await;
        assert_counts(&env, &[(OFFICE, 4), (MARIO, 2)]).await;
        assert!(
            office
                .iter()
                .all(|s| s.d().msgid.as_deref() != Some(third.message_id.as_str())),
            "the refused letter was not processed"
        );
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_refuse_auth() {
    let env = Env::start(1.0, Some("[smtp]\nrefuse_auth = [\"protocollo@*\"]\n")).await;
    within(60, async {
        let l = Letter::new(OFFICE, &[MARIO], "Rifiutato");
        let e = env.send(OFFICE, &l).await.expect_err("AUTH refused");
        assert_eq!(code(&e), Some(535), "{e}");
        let mut s = Submit::new(OFFICE, &env.password(OFFICE), &l);
        s.via = Via::Implicit;
        s.mechanism = Mechanism::Login;
        let e = submit(&env.info, &s).await.expect_err("AUTH refused");
        assert_eq!(code(&e), Some(535), "{e}");
        // Other logins are not affected.
        let other = Letter::new(ANAGRAFE, &[MARIO], "Accettato");
        env.send(ANAGRAFE, &other)
            .await
            .expect("another login works");
        certified_box(&env, ANAGRAFE, 2).await;
        assert_counts(&env, &[(OFFICE, 0), (ANAGRAFE, 2), (MARIO, 1)]).await;
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_drop_after_data_accepted() {
    let env = Env::start(
        1.0,
        Some("[smtp]\ndrop_after_data = \"accepted\"\ndrop_count = 1\n"),
    )
    .await;
    within(60, async {
        let dropped = Letter::new(OFFICE, &[MARIO], "Connessione caduta");
        let e = env
            .send(OFFICE, &dropped)
            .await
            .expect_err("no reply after DATA");
        assert_eq!(code(&e), None, "the connection drops without a reply: {e}");
        // Yet the message was taken in charge.
        let office = certified_box(&env, OFFICE, 2).await;
        for s in &office {
            assert_eq!(s.d().msgid.as_deref(), Some(dropped.message_id.as_str()));
        }
        one(&office, &Kind::Acceptance);
        one(&office, &Kind::Delivery);
        // drop_count = 1: the next one is answered.
        let next = Letter::new(OFFICE, &[MARIO], "Dopo");
        let reply = env.send(OFFICE, &next).await.expect("second submission");
        assert_eq!(u16::from(reply.code()), 250);
        certified_box(&env, OFFICE, 4).await;
        assert_counts(&env, &[(OFFICE, 4), (MARIO, 2)]).await;
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_drop_after_data_not_accepted() {
    let env = Env::start(
        1.0,
        Some("[smtp]\ndrop_after_data = \"not-accepted\"\ndrop_count = 1\n"),
    )
    .await;
    within(60, async {
        let dropped = Letter::new(OFFICE, &[MARIO], "Scartato");
        let e = env
            .send(OFFICE, &dropped)
            .await
            .expect_err("no reply after DATA");
        assert_eq!(code(&e), None, "the connection drops without a reply: {e}");
        // Nothing arrives within a few seconds.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_counts(&env, &[(OFFICE, 0), (MARIO, 0)]).await;
        // The next one is processed (so the silence above means something).
        let next = Letter::new(OFFICE, &[MARIO], "Dopo");
        env.send(OFFICE, &next).await.expect("second submission");
        let office = certified_box(&env, OFFICE, 2).await;
        assert_counts(&env, &[(OFFICE, 2), (MARIO, 1)]).await;
        for s in &office {
            assert_eq!(s.d().msgid.as_deref(), Some(next.message_id.as_str()));
        }
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_dovecot_restart_mid_session() {
    let env = Env::start(1.0, Some("")).await;
    within(90, async {
        // Mail before the restart (the provider has open IMAP sessions).
        one_letter(&env, "Prima del riavvio", 2, 1).await;
        let mut old = imap_login(&env.info, OFFICE).await.expect("login");
        assert_eq!(fetch_all(&mut old).await.expect("fetch").len(), 2);

        // restart_on_reload, as SIGHUP does.
        env.write_faults("[dovecot]\nrestart_on_reload = true\n");
        env.sandbox()
            .reload_faults()
            .await
            .expect("reload with restart");
        let broken = old.noop().await;
        assert!(
            broken.is_err(),
            "a session opened before the restart still works"
        );
        let mut fresh = imap_login(&env.info, OFFICE)
            .await
            .expect("login after restart");
        assert_eq!(
            fetch_all(&mut fresh).await.expect("fetch").len(),
            2,
            "mail kept"
        );
        let _ = fresh.logout().await;

        // Deliveries after the restart arrive.
        let after = Letter::new(OFFICE, &[MARIO], "Dopo il riavvio");
        env.send(OFFICE, &after).await.expect("submission");
        let office = certified_box(&env, OFFICE, 4).await;
        certified_box(&env, MARIO, 2).await;
        let n = office
            .iter()
            .filter(|s| s.d().msgid.as_deref() == Some(after.message_id.as_str()))
            .count();
        assert_eq!(n, 2, "acceptance and delivery after the restart");

        // restart_dovecot() directly, with the faults file back to empty.
        env.write_faults("");
        env.sandbox().reload_faults().await.expect("reload");
        let mut old = imap_login(&env.info, OFFICE).await.expect("login");
        env.sandbox().restart_dovecot().await.expect("restart");
        assert!(
            old.noop().await.is_err(),
            "session survived restart_dovecot"
        );
        let again = Letter::new(OFFICE, &[MARIO], "Secondo riavvio");
        env.send(OFFICE, &again).await.expect("submission");
        certified_box(&env, OFFICE, 6).await;
        certified_box(&env, MARIO, 3).await;
        assert_counts(&env, &[(OFFICE, 6), (MARIO, 3)]).await;
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_dovecot_periodic_restart() {
    let env = Env::start(1.0, Some("[dovecot]\nrestart_every_seconds = 2\n")).await;
    within(60, async {
        let mut old = imap_login(&env.info, OFFICE).await.expect("login");
        let deadline = Instant::now() + Duration::from_secs(15);
        while old.noop().await.is_ok() {
            assert!(Instant::now() < deadline, "no restart within 15 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Mail still flows between the restarts (the provider reconnects).
        let letter = Letter::new(OFFICE, &[MARIO], "Tra un riavvio e l'altro");
        env.send(OFFICE, &letter).await.expect("submission");
        let office = certified_box(&env, OFFICE, 2).await;
        one(&office, &Kind::Acceptance);
        one(&office, &Kind::Delivery);

        // A reload without the fault stops the restarts: once a restart
        // that was under way is over, Dovecot's master stays the same.
        env.write_faults("");
        env.sandbox().reload_faults().await.expect("reload");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pid_file = env.dir().join("dovecot/run/master.pid");
        let master = std::fs::read_to_string(&pid_file).expect("master.pid");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            std::fs::read_to_string(&pid_file).expect("master.pid"),
            master,
            "Dovecot restarted after the fault was removed"
        );
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_dovecot_periodic_restart_set_by_reload() {
    let env = Env::start(1.0, Some("")).await;
    within(60, async {
        let mut old = imap_login(&env.info, OFFICE).await.expect("login");
        env.write_faults("[dovecot]\nrestart_every_seconds = 1\n");
        env.sandbox().reload_faults().await.expect("reload");
        let deadline = Instant::now() + Duration::from_secs(15);
        while old.noop().await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "no restart within 15 s of the reload"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_faults_file_is_refused_and_old_faults_stay() {
    let env = Env::start(1.0, Some("[smtp]\nrefuse_auth = [\"protocollo@*\"]\n")).await;
    within(60, async {
        let l = Letter::new(OFFICE, &[MARIO], "Prova");
        let e = env
            .send(OFFICE, &l)
            .await
            .expect_err("refused by the faults");
        assert_eq!(code(&e), Some(535));

        env.write_faults("[smtp]\nrate_limt = 3\n");
        let err = env
            .sandbox()
            .reload_faults()
            .await
            .expect_err("invalid faults file refused");
        assert!(
            err.to_string().contains("rate_limt"),
            "names the key: {err}"
        );
        let e = env.send(OFFICE, &l).await.expect_err("old faults in force");
        assert_eq!(code(&e), Some(535));

        env.write_faults("[smtp]\nrefuse_auth = \"not a list\"\n");
        assert!(
            env.sandbox().reload_faults().await.is_err(),
            "wrong type refused"
        );
        let e = env.send(OFFICE, &l).await.expect_err("old faults in force");
        assert_eq!(code(&e), Some(535));

        // A valid file replaces them.
        env.write_faults("");
        env.sandbox()
            .reload_faults()
            .await
            .expect("valid faults file");
        env.send(OFFICE, &l).await.expect("AUTH accepted again");
        certified_box(&env, OFFICE, 2).await;
    })
    .await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------
// 9. The binary

/// Sends one letter office -> mario through the sandbox described by `info`
/// and checks the two receipts (valid with that sandbox's CA).
async fn letter_through(info: &pecgate::sandbox::world::SandboxInfo, subject: &str, expect: usize) {
    let letter = Letter::new(OFFICE, &[MARIO], subject);
    submit(info, &Submit::new(OFFICE, &password(info, OFFICE), &letter))
        .await
        .expect("submission");
    let verifier = sandbox_verifier(info);
    let got = wait_for(info, OFFICE, expect, ARRIVAL).await;
    let mine: Vec<Kind> = got
        .iter()
        .map(|f| certified(&verifier, f))
        .filter(|s| s.d().msgid.as_deref() == Some(letter.message_id.as_str()))
        .map(|s| s.kind)
        .collect();
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(mine.contains(&Kind::Acceptance) && mine.contains(&Kind::Delivery));
}

/// Asserts that no process mentions the sandbox directory or its Dovecot
/// instance.
fn assert_no_leftovers(dir: &std::path::Path, instance: &str) {
    let by_dir = processes_mentioning(&dir.display().to_string());
    assert!(by_dir.is_empty(), "processes left behind: {by_dir:?}");
    let by_instance = processes_mentioning(instance);
    assert!(
        by_instance.is_empty(),
        "dovecot processes left behind: {by_instance:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_stops_on_sigterm_and_restarts_with_the_same_world() {
    within(90, async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sbx");
        let mut bin = BinSandbox::spawn(&dir);
        let info = bin.ready().await;
        let dir = info.dir.clone();
        let imap_line = format!("IMAP:            127.0.0.1:{} (STARTTLS)", info.imap.port);
        assert!(bin.log().contains(&imap_line), "{}", bin.log());
        assert!(dir.join("pecgate.toml").is_file());
        letter_through(&info, "Dal binario", 2).await;
        let instance = dovecot_instance(&dir);
        assert!(
            !processes_mentioning(&instance).is_empty(),
            "the sandbox's dovecot is running"
        );
        let status = bin.terminate(Duration::from_secs(10)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "exit status: {status}; {}",
            bin.log()
        );
        assert_no_leftovers(&dir, &instance);

        // Same directory again: same CA, same passwords, mail kept; this
        // time with a faults file, re-read on SIGHUP.
        let ca = std::fs::read(&info.ca_file).unwrap();
        let faults = tmp.path().join("faults.toml");
        std::fs::write(&faults, "").unwrap();
        let mut bin = BinSandbox::spawn_with(&dir, &["--faults".as_ref(), faults.as_os_str()]);
        let again = bin.ready().await;
        assert_eq!(std::fs::read(&again.ca_file).unwrap(), ca, "CA reused");
        assert_eq!(again.mailboxes, info.mailboxes, "passwords reused");
        letter_through(&again, "Di nuovo", 4).await;

        std::fs::write(&faults, "[smtp]\nrefuse_auth = [\"protocollo@*\"]\n").unwrap();
        signal(bin.pid(), "HUP");
        let refused = Letter::new(OFFICE, &[MARIO], "Dopo SIGHUP");
        let submission = Submit::new(OFFICE, &password(&again, OFFICE), &refused);
        let deadline = Instant::now() + ARRIVAL;
        loop {
            match submit(&again, &submission).await {
                Err(e) if code(&e) == Some(535) => break,
                other => assert!(
                    Instant::now() < deadline,
                    "SIGHUP did not apply the faults: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // An invalid file on SIGHUP is refused (the key is named) and the
        // previous faults stay.
        std::fs::write(&faults, "[smtp]\nrate_limt = 3\n").unwrap();
        signal(bin.pid(), "HUP");
        let deadline = Instant::now() + ARRIVAL;
        while !bin.log().contains("rate_limt") {
            assert!(Instant::now() < deadline, "no complaint: {}", bin.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let e = submit(&again, &submission)
            .await
            .expect_err("old faults stay");
        assert_eq!(code(&e), Some(535), "{e}");
        let status = bin.terminate(Duration::from_secs(10)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "exit status: {status}; {}",
            bin.log()
        );
        assert_no_leftovers(&dir, &instance);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_two_sandboxes_at_once() {
    within(90, async {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = BinSandbox::spawn(&tmp.path().join("a"));
        let mut b = BinSandbox::spawn(&tmp.path().join("b"));
        let (ia, ib) = (a.ready().await, b.ready().await);
        let mut ports = vec![
            ia.smtp.port,
            ia.smtps.port,
            ia.imap.port,
            ia.imaps.port,
            ib.smtp.port,
            ib.smtps.port,
            ib.imap.port,
            ib.imaps.port,
        ];
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 8, "every service has its own port");
        tokio::join!(
            letter_through(&ia, "Sandbox A", 2),
            letter_through(&ib, "Sandbox B", 2)
        );

        // Each world has its own CA: B's receipts are not trusted by A.
        let from_b = fetch_now(&ib, OFFICE).await;
        let v = examine(&sandbox_verifier(&ia), &from_b[0]);
        assert_eq!(v.verdict.status, Status::Invalid);
        assert_eq!(v.verdict.failure, Some(Failure::Untrusted));

        let (ida, idb) = (dovecot_instance(&ia.dir), dovecot_instance(&ib.dir));
        assert_ne!(ida, idb);
        let (sa, sb) = tokio::join!(
            a.terminate(Duration::from_secs(10)),
            b.terminate(Duration::from_secs(10))
        );
        assert_eq!(sa.code(), Some(0), "{}", a.log());
        assert_eq!(sb.code(), Some(0), "{}", b.log());
        assert_no_leftovers(&ia.dir, &ida);
        assert_no_leftovers(&ib.dir, &idb);
    })
    .await;
}
