//! Acceptance tests for S/MIME signature verification (`pecgate::verify`,
//! `pecgate verify`).
//!
//! 1. Real provider messages (Aruba 2014, 2018, 2023) verify with the
//!    built-in anchors; the Sogei samples edited by their authors do not;
//!    `--trust DIR` replaces the anchors instead of adding to them.
//! 2. A synthetic corpus signed at test time by a test PEC CA with the real
//!    provider certificate profile (SPEC.md §4.2), in every form and with
//!    every failure the verifier knows.
//! 3. The CLI: JSON keys, human output, exit statuses.
//! 4. A cross-check with `openssl smime -verify`, which nobody here wrote:
//!    the signatures built by `pecgate::pki` are standard CMS.
//!
//! The real OCA messages are AGPL and contain personal data: they are read
//! from the shared directory (`$PECGATE_SHARED_DIR`, else `../shared`) and
//! never copied into the repository; when it is missing those cases are
//! skipped with a message. The 2023 Aruba message is in the repository and
//! always runs.

mod verify_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use jiff::Timestamp;
use openssl::x509::X509;
use pecgate::pec::envelope::Signature;
use pecgate::pec::inspect::inspect;
use pecgate::pki::{self, Digest, SignOptions};
use pecgate::verify::{Failure, Status, TimeSource, TrustAnchors, Verdict, Verifier, rfc3339};
use serde_json::Value;

use verify_support::{
    ARUBA_CN, ARUBA_EMAIL, CA_CN, PROVIDER_CN, PROVIDER_EMAIL, days, map_daticert, map_p7s,
    map_p7s_text, opts, pem_dir, pki, replace_once, shared_dir, sign_fixture, split, synthetic,
    synthetic_names, to_lf, years,
};

/// The receipt used when any receipt will do: an accettazione with a
/// daticert (base64) and no postacert.eml.
const ACCETTAZIONE: &str = "01-accettazione.eml";
/// An avvenuta consegna carrying postacert.eml.
const CONSEGNA: &str = "05-avvenuta-consegna-completa.eml";
/// A receipt without daticert.xml.
const NO_DATICERT: &str = "50-problem-no-daticert.eml";
/// A receipt whose daticert.xml is truncated (not well formed).
const DATICERT_TRUNCATED: &str = "42-problem-daticert-truncated.eml";

// ---------------------------------------------------------------------------
// Helpers

fn verifier_for(certs: &[&X509]) -> Verifier {
    Verifier::new(TrustAnchors::from_certs(certs.iter().map(|c| (*c).clone()).collect()).unwrap())
}

/// A verifier trusting the test PEC CA only.
fn test_verifier() -> Verifier {
    verifier_for(&[&pki().ca.cert])
}

/// Inspects and verifies `raw` at the tests' "now".
fn verdict(verifier: &Verifier, raw: &[u8]) -> Verdict {
    let ins = inspect(raw).expect("a mail message");
    verifier.verify(&ins, pki().now)
}

fn assert_valid(v: &Verdict) {
    assert_eq!(v.status, Status::Valid, "{v:#?}");
    assert_eq!(v.failure, None, "{v:#?}");
    assert_eq!(v.reason, None, "{v:#?}");
    assert_eq!(v.revocation, "not-checked");
}

fn assert_invalid(v: &Verdict, failure: Failure, fragments: &[&str]) {
    assert_eq!(v.status, Status::Invalid, "{v:#?}");
    assert_eq!(v.failure, Some(failure), "{v:#?}");
    let reason = v
        .reason
        .as_deref()
        .expect("an invalid verdict has a reason");
    for f in fragments {
        assert!(reason.contains(f), "reason {reason:?} lacks {f:?}");
    }
    assert_eq!(v.revocation, "not-checked");
}

/// The provider's identity as the verdict reports it.
fn assert_test_provider(v: &Verdict) {
    assert_eq!(v.signer_cn.as_deref(), Some(PROVIDER_CN), "{v:#?}");
    assert_eq!(v.signer_email.as_deref(), Some(PROVIDER_EMAIL), "{v:#?}");
    assert_eq!(v.issuer_cn.as_deref(), Some(CA_CN), "{v:#?}");
}

fn serial_hex(cert: &X509) -> String {
    cert.serial_number()
        .to_bn()
        .unwrap()
        .to_hex_str()
        .unwrap()
        .to_string()
}

/// SHA-1, signingTime = now, x-pkcs7-signature: what providers send.
fn now_sha1() -> SignOptions {
    opts(Digest::Sha1, Some(pki().now))
}

// ---------------------------------------------------------------------------
// 1. Real messages

const OCA_PEC: &str = "fixtures/public/OCA-l10n-italy/l10n_it_pec_messages/tests/data";
const OCA_FATTURAPA: &str = "fixtures/public/OCA-l10n-italy/l10n_it_fatturapa_pec/tests/data";

/// A real, unmodified provider message and what its signature says
/// (signingTime cross-checked with `openssl cms -cmsout -print`).
struct Real {
    path: PathBuf,
    issuer_cn: &'static str,
    signed_at: &'static str,
}

fn in_repo_2023() -> Real {
    Real {
        path: Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/public/fabioportieri-java-pec-parser/aruba-2023-busta.eml"),
        issuer_cn: "AgID CA1",
        signed_at: "2023-08-18T15:37:13Z",
    }
}

/// The shared directory, or `None` (with a message) when it is missing.
fn shared(what: &str) -> Option<PathBuf> {
    let dir = shared_dir();
    if dir.join("fixtures/public/OCA-l10n-italy").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "NOT RUN: {what}: {} has no fixtures/public/OCA-l10n-italy \
             (set PECGATE_SHARED_DIR; CI always has it)",
            dir.display()
        );
        None
    }
}

/// Every real, unmodified message available: the 2023 one always, the OCA
/// ones when the shared directory is there.
fn real_messages(what: &str) -> Vec<Real> {
    let mut out = vec![in_repo_2023()];
    let Some(s) = shared(what) else { return out };
    let pec = s.join(OCA_PEC);
    let fpa = s.join(OCA_FATTURAPA);
    let digitpa = |name: &str, signed_at| Real {
        path: pec.join(name),
        issuer_cn: "DigitPA CA1",
        signed_at,
    };
    out.push(digitpa("message1", "2014-11-07T15:52:01Z"));
    out.push(digitpa("message2", "2014-11-27T14:12:16Z"));
    out.push(digitpa("message2_accettazione", "2014-11-14T17:26:32Z"));
    out.push(digitpa("message2_consegna", "2014-11-14T17:26:32Z"));
    out.push(Real {
        path: fpa.join("ACCETTAZIONE_ IT03339130126_00009.xml.txt"),
        issuer_cn: "AgID CA1",
        signed_at: "2018-11-13T15:39:26Z",
    });
    out.push(Real {
        path: fpa.join("CONSEGNA_ IT03339130126_00009.xml.txt"),
        issuer_cn: "AgID CA1",
        signed_at: "2018-11-13T15:39:27Z",
    });
    out
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn real_aruba_messages_are_valid_at_signing_time_with_the_builtin_anchors() {
    let verifier = Verifier::new(TrustAnchors::builtin().unwrap());
    let now = Timestamp::now();
    let reals = real_messages("real Aruba messages of 2014 and 2018");
    for r in &reals {
        let raw = read(&r.path);
        let ins = inspect(&raw).unwrap();
        let v = verifier.verify(&ins, now);
        let name = r.path.display();
        assert_eq!(v.status, Status::Valid, "{name}: {v:#?}");
        assert_eq!(v.failure, None, "{name}");
        assert_eq!(v.reason, None, "{name}");
        assert_eq!(v.signed_at_source, Some(TimeSource::SigningTime), "{name}");
        assert_eq!(
            v.signed_at.map(rfc3339).as_deref(),
            Some(r.signed_at),
            "{name}"
        );
        assert_eq!(v.issuer_cn.as_deref(), Some(r.issuer_cn), "{name}");
        assert_eq!(v.signer_cn.as_deref(), Some(ARUBA_CN), "{name}");
        assert_eq!(v.signer_email.as_deref(), Some(ARUBA_EMAIL), "{name}");
        assert_eq!(v.expired_now, Some(true), "{name}: the certificate expired");
        let (nb, na) = (v.not_before.unwrap(), v.not_after.unwrap());
        assert!(
            nb <= v.signed_at.unwrap() && v.signed_at.unwrap() <= na,
            "{name}"
        );
        assert!(na < now, "{name}");
        assert_eq!(v.revocation, "not-checked");
        assert!(ins.problems.is_empty(), "{name}: {:?}", ins.problems);
    }
}

#[test]
fn sogei_samples_edited_by_their_authors_are_bad_signatures() {
    let Some(s) = shared("Sogei samples") else {
        return;
    };
    let dir = s.join(OCA_FATTURAPA);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("POSTA CERTIFICATA_")
        })
        .collect();
    names.sort();
    assert!(names.len() >= 3, "Sogei samples in {}", dir.display());
    let verifier = Verifier::new(TrustAnchors::builtin().unwrap());
    for p in &names {
        let v = verdict(&verifier, &read(p));
        let name = p.display();
        assert_eq!(v.failure, Some(Failure::BadSignature), "{name}: {v:#?}");
        assert_invalid(&v, Failure::BadSignature, &["does not match the content"]);
        assert_eq!(
            v.signer_email.as_deref(),
            Some("posta-certificata@pcert.sogei.it"),
            "{name}"
        );
        assert_eq!(v.issuer_cn.as_deref(), Some("AgID CA1"), "{name}");
    }
}

#[test]
fn real_messages_with_an_unrelated_trust_dir_are_untrusted() {
    // --trust replaces the built-in anchors: a directory holding only the
    // test CA makes the real Aruba messages untrusted.
    let dir = pem_dir(&[&pki().ca.cert]);
    let verifier = Verifier::new(TrustAnchors::from_dirs(&[dir.path()]).unwrap());
    for r in real_messages("real messages with --trust") {
        let v = verdict(&verifier, &read(&r.path));
        assert_invalid(
            &v,
            Failure::Untrusted,
            &["does not chain to a PEC trust anchor"],
        );
        assert_eq!(v.issuer_cn.as_deref(), Some(r.issuer_cn));
    }
    // The same through the CLI, on the message that is always there.
    let out = pecgate(&[
        "verify",
        "--json",
        "--trust",
        dir.path().to_str().unwrap(),
        in_repo_2023().path.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    let line = &out.json_lines()[0];
    assert_eq!(line["signature"]["status"], "invalid");
    let reason = line["signature"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not chain to a PEC trust anchor"),
        "{reason}"
    );
    // And without --trust the built-in anchors are used: valid.
    let out = pecgate(&["verify", "--json", in_repo_2023().path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json_lines()[0]["signature"]["status"], "valid");
}

// ---------------------------------------------------------------------------
// 2. The synthetic corpus, signed at test time

#[test]
fn every_synthetic_receipt_signed_by_the_test_provider_is_valid() {
    let verifier = test_verifier();
    let p = pki();
    let names = synthetic_names();
    assert!(names.len() >= 20, "synthetic corpus: {names:?}");
    for name in &names {
        let unsigned = synthetic(name);
        let signed = sign_fixture(name, &p.provider, &[], &now_sha1());
        let ins = inspect(&signed).unwrap();
        assert!(
            matches!(ins.message.signature, Signature::Detached { .. }),
            "{name}"
        );
        let v = verifier.verify(&ins, p.now);
        assert_eq!(v.status, Status::Valid, "{name}: {v:#?}");
        assert_test_provider(&v);
        assert_eq!(v.signed_at, Some(p.now), "{name}");
        assert_eq!(v.signed_at_source, Some(TimeSource::SigningTime), "{name}");
        assert_eq!(v.expired_now, Some(false), "{name}");
        assert_eq!(
            v.serial.as_deref(),
            Some(serial_hex(&p.provider.cert).as_str())
        );
        // Signing changes nothing of what the message says.
        let before = inspect(&unsigned).unwrap();
        let (a, b) = (before.summary(), ins.summary());
        assert_eq!(a.kind, b.kind, "{name}");
        assert_eq!(a.refers_to, b.refers_to, "{name}");
        assert_eq!(
            serde_json::to_value(a.daticert).unwrap(),
            serde_json::to_value(b.daticert).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn valid_with_sha1_and_sha256() {
    let verifier = test_verifier();
    for (digest, micalg) in [(Digest::Sha1, "sha1"), (Digest::Sha256, "sha-256")] {
        let signed = sign_fixture(
            CONSEGNA,
            &pki().provider,
            &[],
            &opts(digest, Some(pki().now)),
        );
        let ins = inspect(&signed).unwrap();
        match &ins.message.signature {
            Signature::Detached { micalg: m, .. } => assert_eq!(m.as_deref(), Some(micalg)),
            other => panic!("{other:?}"),
        }
        let v = verifier.verify(&ins, pki().now);
        assert_valid(&v);
        assert_test_provider(&v);
    }
}

#[test]
fn valid_with_x_pkcs7_and_pkcs7_signature_protocols() {
    let verifier = test_verifier();
    for (x_protocol, protocol) in [
        (true, "application/x-pkcs7-signature"),
        (false, "application/pkcs7-signature"),
    ] {
        let o = SignOptions {
            x_protocol,
            ..opts(Digest::Sha256, Some(pki().now))
        };
        let signed = sign_fixture(ACCETTAZIONE, &pki().provider, &[], &o);
        let ins = inspect(&signed).unwrap();
        match &ins.message.signature {
            Signature::Detached { protocol: p, .. } => assert_eq!(p, protocol),
            other => panic!("{other:?}"),
        }
        assert!(ins.problems.is_empty(), "{:?}", ins.problems);
        assert_valid(&verifier.verify(&ins, pki().now));
    }
}

#[test]
fn valid_opaque_signed_data() {
    let verifier = test_verifier();
    let p = pki();
    let s = split(&synthetic(CONSEGNA));
    for o in [now_sha1(), opts(Digest::Sha256, None)] {
        let signed = pki::sign_opaque(
            &s.headers(Some(PROVIDER_EMAIL), &[]),
            &s.entity,
            &p.provider,
            &[],
            &o,
        )
        .unwrap();
        let ins = inspect(&signed).unwrap();
        assert!(
            matches!(ins.message.signature, Signature::Opaque { .. }),
            "{:?}",
            ins.message.signature
        );
        // The content is found inside the CMS structure.
        assert!(ins.daticert.is_some());
        assert!(ins.message.postacert.is_some());
        let v = verifier.verify(&ins, p.now);
        assert_valid(&v);
        assert_test_provider(&v);
        let want = if o.signing_time.is_some() {
            TimeSource::SigningTime
        } else {
            TimeSource::Daticert
        };
        assert_eq!(v.signed_at_source, Some(want));
    }
}

#[test]
fn valid_when_stored_with_lf_line_endings() {
    let verifier = test_verifier();
    for name in [ACCETTAZIONE, CONSEGNA, "24-lf-line-endings.eml"] {
        let signed = sign_fixture(name, &pki().provider, &[], &now_sha1());
        let lf = to_lf(&signed);
        assert!(!lf.contains(&b'\r'));
        let ins = inspect(&lf).unwrap();
        match &ins.message.signature {
            Signature::Detached { signed, .. } => assert!(!signed.contains(&b'\r')),
            other => panic!("{name}: {other:?}"),
        }
        assert_valid(&verifier.verify(&ins, pki().now));
    }
}

#[test]
fn signed_at_comes_from_signing_time_then_daticert_then_date() {
    let verifier = test_verifier();
    let p = pki();

    let with_time = sign_fixture(ACCETTAZIONE, &p.provider, &[], &now_sha1());
    let v = verdict(&verifier, &with_time);
    assert_valid(&v);
    assert_eq!(v.signed_at_source, Some(TimeSource::SigningTime));
    assert_eq!(v.signed_at, Some(p.now));

    // No signingTime: the daticert <data> (signed content) of 01, which says
    // 13/01/2025 16:39:26 +0100.
    let no_time = sign_fixture(ACCETTAZIONE, &p.provider, &[], &opts(Digest::Sha1, None));
    let v = verdict(&verifier, &no_time);
    assert_valid(&v);
    assert_eq!(v.signed_at_source, Some(TimeSource::Daticert));
    assert_eq!(
        v.signed_at.map(rfc3339).as_deref(),
        Some("2025-01-13T15:39:26Z")
    );

    // No signingTime, no daticert: the Date header (not signed).
    let date_of = |raw: &[u8]| inspect(raw).unwrap().message.date.unwrap();
    let no_daticert = sign_fixture(NO_DATICERT, &p.provider, &[], &opts(Digest::Sha1, None));
    let v = verdict(&verifier, &no_daticert);
    assert_valid(&v);
    assert_eq!(v.signed_at_source, Some(TimeSource::Date));
    assert_eq!(v.signed_at, Some(date_of(&synthetic(NO_DATICERT))));

    // None of them: no time of signing.
    let s = split(&synthetic(NO_DATICERT));
    let no_date = pki::sign_detached(
        &s.headers(Some(PROVIDER_EMAIL), &["Date"]),
        &s.entity,
        &p.provider,
        &[],
        &opts(Digest::Sha1, None),
    )
    .unwrap();
    let v = verdict(&verifier, &no_date);
    assert_invalid(&v, Failure::NoSigningTime, &["no time of signing"]);
    assert_eq!(v.signed_at, None);
}

#[test]
fn forged_by_a_lookalike_ca_with_the_same_names_is_untrusted() {
    let p = pki();
    // Same CA subject, same provider O/CN/SAN, another key.
    assert_eq!(
        p.forged.cert.subject_name().to_der().unwrap(),
        p.provider.cert.subject_name().to_der().unwrap()
    );
    let verifier = test_verifier();
    for chain in [vec![], vec![p.forged_ca.cert.clone()]] {
        let signed = sign_fixture(ACCETTAZIONE, &p.forged, &chain, &now_sha1());
        let v = verdict(&verifier, &signed);
        assert_invalid(
            &v,
            Failure::Untrusted,
            &["does not chain to a PEC trust anchor"],
        );
        // The names alone look right: that is the point.
        assert_test_provider(&v);
    }
}

#[test]
fn forged_aruba_under_a_lookalike_agid_ca1_is_untrusted_with_builtin_anchors() {
    // The forger's CA copies AgID CA1's subject and subject key identifier;
    // the provider certificate copies Aruba's O, CN, SAN and the PEC policy.
    let p = pki();
    let verifier = Verifier::new(TrustAnchors::builtin().unwrap());
    let s = split(&synthetic(ACCETTAZIONE));
    for chain in [vec![], vec![p.agid_lookalike.cert.clone()]] {
        let signed = pki::sign_detached(
            &s.headers(Some(ARUBA_EMAIL), &[]),
            &s.entity,
            &p.aruba_lookalike,
            &chain,
            &now_sha1(),
        )
        .unwrap();
        let v = verdict(&verifier, &signed);
        // openssl finds the real AgID CA1 by name and key identifier, and
        // the forged certificate's signature does not verify with its key.
        assert_invalid(
            &v,
            Failure::Untrusted,
            &[
                "does not chain to a PEC trust anchor",
                "certificate signature failure",
            ],
        );
        assert_eq!(v.issuer_cn.as_deref(), Some("AgID CA1"));
        assert_eq!(v.signer_cn.as_deref(), Some(ARUBA_CN));
        assert_eq!(v.signer_email.as_deref(), Some(ARUBA_EMAIL));
    }
}

/// Adds one second to the daticert `<ora>` (or wraps 9 to 0): one byte.
fn bump_ora(xml: &mut [u8]) {
    let at = xml
        .windows(6)
        .position(|w| w == b"</ora>")
        .expect("an <ora> element")
        - 1;
    xml[at] = if xml[at] == b'9' { b'0' } else { xml[at] + 1 };
}

#[test]
fn tampered_daticert_after_signing_is_a_bad_signature() {
    let verifier = test_verifier();
    let signed = sign_fixture(ACCETTAZIONE, &pki().provider, &[], &now_sha1());
    let tampered = map_daticert(&signed, |x| bump_ora(x));
    assert_eq!(tampered.len(), signed.len());
    let differing = signed.iter().zip(&tampered).filter(|(a, b)| a != b).count();
    assert!(
        (1..=2).contains(&differing),
        "{differing} base64 characters"
    );
    let before = inspect(&signed).unwrap().daticert.unwrap().data;
    let ins = inspect(&tampered).unwrap();
    assert_ne!(
        ins.daticert.as_ref().unwrap().data,
        before,
        "the tamper matters"
    );
    let v = verifier.verify(&ins, pki().now);
    assert_invalid(
        &v,
        Failure::BadSignature,
        &["signature does not match the content (tampered or corrupted)"],
    );
    // The signer is still described (from the signature's certificates).
    assert_test_provider(&v);
    assert_eq!(v.signed_at, None);
}

#[test]
fn tampered_outer_header_stays_valid_because_outer_headers_are_not_signed() {
    // A documented limit of S/MIME (and of PEC): the outer headers are not
    // covered by the signature. Consumers must take their data from the
    // signed part (daticert), never from outer headers such as Subject.
    let verifier = test_verifier();
    let signed = sign_fixture(ACCETTAZIONE, &pki().provider, &[], &now_sha1());
    let tampered = replace_once(
        &signed,
        b"Subject: ACCETTAZIONE: Prot. 123/2025",
        b"Subject: ACCETTAZIONE: Prot. 999/2025",
    );
    let ins = inspect(&tampered).unwrap();
    assert!(ins.message.subject.as_deref().unwrap().contains("999/2025"));
    assert_valid(&verifier.verify(&ins, pki().now));
}

#[test]
fn unsigned_message_is_unsigned() {
    let verifier = test_verifier();
    let v = verdict(&verifier, &synthetic(ACCETTAZIONE));
    assert_eq!(v.status, Status::Unsigned, "{v:#?}");
    assert_eq!(v.failure, None);
    assert_eq!(v.reason, None);
    assert_eq!(v.signer_cn, None);
    assert_eq!(v.signer_email, None);
    assert_eq!(v.issuer_cn, None);
    assert_eq!(v.serial, None);
    assert_eq!(v.signed_at, None);
    assert_eq!(v.signed_at_source, None);
    assert_eq!(v.expired_now, None);
    assert_eq!(v.revocation, "not-checked");
    assert!(!v.is_valid());
}

#[test]
fn multipart_signed_without_signature_part_is_malformed() {
    let verifier = test_verifier();
    let v = verdict(
        &verifier,
        &synthetic("47-problem-signed-without-signature.eml"),
    );
    assert_invalid(
        &v,
        Failure::Malformed,
        &["broken signature", "1 body parts"],
    );
}

#[test]
fn signer_address_different_from_from_is_an_address_mismatch() {
    let verifier = test_verifier();
    let p = pki();
    let s = split(&synthetic(ACCETTAZIONE));
    let sign_from = |from: &str| {
        pki::sign_detached(
            &s.headers(Some(from), &[]),
            &s.entity,
            &p.provider,
            &[],
            &now_sha1(),
        )
        .unwrap()
    };
    let v = verdict(
        &verifier,
        &sign_from("posta-certificata@pec.altro-gestore.it"),
    );
    assert_invalid(
        &v,
        Failure::AddressMismatch,
        &[
            "signer e-mail posta-certificata@pec.example.it",
            "differs from From posta-certificata@pec.altro-gestore.it",
        ],
    );
    // Case and a display name do not matter.
    let v = verdict(
        &verifier,
        &sign_from("\"Per conto di: x\" <Posta-Certificata@PEC.Example.IT>"),
    );
    assert_valid(&v);
    // No From at all.
    let no_from = pki::sign_detached(
        &s.headers(None, &[]),
        &s.entity,
        &p.provider,
        &[],
        &now_sha1(),
    )
    .unwrap();
    let v = verdict(&verifier, &no_from);
    assert_invalid(
        &v,
        Failure::AddressMismatch,
        &["message has no From address"],
    );
}

#[test]
fn certificate_without_the_pec_policy_is_not_pec() {
    let signed = sign_fixture(ACCETTAZIONE, &pki().no_policy, &[], &now_sha1());
    let v = verdict(&test_verifier(), &signed);
    assert_invalid(
        &v,
        Failure::NotPecPolicy,
        &["lacks the PEC policy 1.3.76.16.3.1.1"],
    );
}

#[test]
fn expired_now_but_valid_when_signed_is_valid() {
    let p = pki();
    let signed = sign_fixture(
        ACCETTAZIONE,
        &p.expired,
        &[],
        &opts(Digest::Sha1, Some(p.now - years(2))),
    );
    let v = verdict(&test_verifier(), &signed);
    assert_valid(&v);
    assert_eq!(v.expired_now, Some(true));
    assert_eq!(v.signed_at, Some(p.now - years(2)));
    assert_eq!(v.not_after, Some(p.now - years(1)));
}

#[test]
fn signed_after_the_certificate_expired_is_not_valid_when_signed() {
    let p = pki();
    let signed = sign_fixture(
        ACCETTAZIONE,
        &p.expired,
        &[],
        &opts(Digest::Sha1, Some(p.now - days(182))),
    );
    let v = verdict(&test_verifier(), &signed);
    assert_invalid(
        &v,
        Failure::NotValidWhenSigned,
        &[
            &format!("signed at {}", rfc3339(p.now - days(182))),
            &format!(
                "after the certificate chain expired ({})",
                rfc3339(p.now - years(1))
            ),
        ],
    );
    assert_eq!(v.expired_now, Some(true));
    assert_eq!(v.signed_at_source, Some(TimeSource::SigningTime));
}

#[test]
fn signed_before_the_certificate_was_valid_is_not_valid_when_signed() {
    let p = pki();
    let not_before = verify_support::provider_not_before().min(p.now - years(1));
    let at = not_before - days(1);
    let signed = sign_fixture(
        ACCETTAZIONE,
        &p.provider,
        &[],
        &opts(Digest::Sha1, Some(at)),
    );
    let v = verdict(&test_verifier(), &signed);
    assert_eq!(v.not_before, Some(not_before));
    assert_invalid(
        &v,
        Failure::NotValidWhenSigned,
        &[
            &format!("signed at {}", rfc3339(at)),
            "before the certificate chain was valid",
        ],
    );
}

#[test]
fn corrupted_signature_that_is_not_der_is_malformed() {
    // Still base64, no longer DER: the first character "M" (0x30, SEQUENCE)
    // becomes "N" (0x34).
    let signed = sign_fixture(ACCETTAZIONE, &pki().provider, &[], &now_sha1());
    let corrupted = map_p7s_text(&signed, |text| {
        assert_eq!(text[0], b'M');
        text[0] = b'N';
    });
    let ins = inspect(&corrupted).unwrap();
    assert!(matches!(ins.message.signature, Signature::Detached { .. }));
    let v = test_verifier().verify(&ins, pki().now);
    assert_invalid(
        &v,
        Failure::Malformed,
        &["smime.p7s is not a PKCS#7 structure"],
    );
}

#[test]
fn corrupted_signature_value_in_valid_der_is_a_bad_signature() {
    // The RSA signature value is the last field of the DER (the SignerInfo
    // has no unsigned attributes): flipping its last byte keeps valid DER.
    let signed = sign_fixture(ACCETTAZIONE, &pki().provider, &[], &now_sha1());
    let corrupted = map_p7s(&signed, |der| {
        let last = der.len() - 1;
        der[last] ^= 0x01;
    });
    let v = verdict(&test_verifier(), &corrupted);
    assert_invalid(
        &v,
        Failure::BadSignature,
        &["signature does not match the content"],
    );
}

#[test]
fn malformed_daticert_with_a_valid_signature() {
    let signed = sign_fixture(DATICERT_TRUNCATED, &pki().provider, &[], &now_sha1());
    let ins = inspect(&signed).unwrap();
    assert!(ins.daticert.is_none());
    assert!(ins.daticert_error.is_some());
    assert!(
        ins.problems
            .iter()
            .any(|p| p.starts_with("daticert malformed")),
        "{:?}",
        ins.problems
    );
    let v = test_verifier().verify(&ins, pki().now);
    assert_valid(&v);
    assert_eq!(v.signed_at_source, Some(TimeSource::SigningTime));

    // The CLI counts the problem: exit 1 with a valid signature.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("truncated.eml");
    std::fs::write(&file, &signed).unwrap();
    let ca = pem_dir(&[&pki().ca.cert]);
    let out = pecgate(&[
        "verify",
        "--json",
        "--trust",
        ca.path().to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    let line = &out.json_lines()[0];
    assert_eq!(line["signature"]["status"], "valid");
    assert!(line["daticert"].is_null());
    let problems = line["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("daticert malformed")),
        "{problems:?}"
    );
}

#[test]
fn rsa_1024_with_sha1_as_in_old_archives_is_valid() {
    let p = pki();
    assert_eq!(p.weak.key.bits(), 1024);
    let signed = sign_fixture(CONSEGNA, &p.weak, &[], &now_sha1());
    let v = verdict(&test_verifier(), &signed);
    assert_valid(&v);
    assert_test_provider(&v);
}

#[test]
fn chain_with_an_intermediate_verifies_against_the_intermediate_or_the_root() {
    let p = pki();
    let signed = sign_fixture(
        ACCETTAZIONE,
        &p.chained,
        std::slice::from_ref(&p.intermediate.cert),
        &now_sha1(),
    );
    // The PEC CA itself as the only anchor (partial chain): what pecgate
    // does with AgID CA1.
    let v = verdict(&verifier_for(&[&p.intermediate.cert]), &signed);
    assert_valid(&v);
    assert_eq!(v.issuer_cn.as_deref(), Some("PEC CA"));
    // The root as the only anchor: also valid, because the root is then a
    // configured anchor. Configuring a general-purpose root (which also
    // issues ordinary S/MIME certificates) is the operator's choice; the
    // PEC policy and From == SAN checks still apply.
    let v = verdict(&verifier_for(&[&p.root.cert]), &signed);
    assert_valid(&v);
    // The root cannot be reached when the message omits the intermediate.
    let bare = sign_fixture(ACCETTAZIONE, &p.chained, &[], &now_sha1());
    let v = verdict(&verifier_for(&[&p.root.cert]), &bare);
    assert_invalid(
        &v,
        Failure::Untrusted,
        &["does not chain to a PEC trust anchor"],
    );
    // ...but the intermediate alone needs nothing else.
    assert_valid(&verdict(&verifier_for(&[&p.intermediate.cert]), &bare));
}

#[test]
fn trust_dirs_load_pem_and_der_files() {
    let p = pki();
    let signed = sign_fixture(ACCETTAZIONE, &p.provider, &[], &now_sha1());
    let pem = tempfile::tempdir().unwrap();
    std::fs::write(pem.path().join("ca.pem"), p.ca.cert.to_pem().unwrap()).unwrap();
    let der = tempfile::tempdir().unwrap();
    std::fs::write(der.path().join("ca.cer"), p.ca.cert.to_der().unwrap()).unwrap();
    // A README is skipped; unrelated anchors next to the right one are fine.
    std::fs::write(der.path().join("README.md"), "not a certificate").unwrap();
    std::fs::write(der.path().join("other.der"), p.root.cert.to_der().unwrap()).unwrap();
    for dirs in [
        vec![pem.path()],
        vec![der.path()],
        vec![pem.path(), der.path()],
    ] {
        let anchors = TrustAnchors::from_dirs(&dirs).unwrap();
        let v = verdict(&Verifier::new(anchors), &signed);
        assert_valid(&v);
    }
    assert_eq!(
        TrustAnchors::from_dirs(&[der.path()])
            .unwrap()
            .certificates()
            .len(),
        2
    );
    // Only unrelated anchors: untrusted.
    let other = pem_dir(&[&p.root.cert]);
    let v = verdict(
        &Verifier::new(TrustAnchors::from_dirs(&[other.path()]).unwrap()),
        &signed,
    );
    assert_invalid(&v, Failure::Untrusted, &[]);
}

// ---------------------------------------------------------------------------
// 3. The CLI

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn pecgate(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_pecgate"))
        .args(args)
        .env_remove("PECGATE_CONFIG")
        .env("PECGATE_LOG_FORMAT", "human")
        .env("PECGATE_LOG_LEVEL", "warn")
        .output()
        .expect("run pecgate");
    Run {
        code: out.status.code().expect("an exit status"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const SIGNATURE_KEYS: &[&str] = &[
    "expired_now",
    "issuer_cn",
    "not_after",
    "not_before",
    "reason",
    "revocation",
    "serial",
    "signed_at",
    "signed_at_source",
    "signer_cn",
    "signer_email",
    "status",
];

const LINE_KEYS: &[&str] = &[
    "daticert",
    "file",
    "kind",
    "problems",
    "refers_to",
    "signature",
    "x_ricevuta",
];

fn sorted_keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

/// An RFC 3339 UTC instant with `Z` and whole seconds.
fn assert_rfc3339_z(v: &Value) -> Timestamp {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    assert_eq!(s.len(), 20, "{s}");
    assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
    s.parse().unwrap()
}

/// A temporary directory of generated files for the CLI.
struct Corpus {
    dir: tempfile::TempDir,
    anchors: tempfile::TempDir,
}

impl Corpus {
    fn new() -> Corpus {
        let p = pki();
        let dir = tempfile::tempdir().unwrap();
        let valid = sign_fixture(ACCETTAZIONE, &p.provider, &[], &now_sha1());
        let valid256 = sign_fixture(CONSEGNA, &p.provider, &[], &opts(Digest::Sha256, None));
        let tampered = map_daticert(&valid, |x| bump_ora(x));
        let files: [(&str, &[u8]); 5] = [
            ("a-valid.eml", &valid),
            ("b-valid-sha256.eml", &valid256),
            ("c-tampered.eml", &tampered),
            ("d-unsigned.eml", &synthetic(ACCETTAZIONE)),
            (
                "e-not-a-message.eml",
                b"\x00\x01\x02 binary garbage \xff\xfe\n",
            ),
        ];
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        Corpus {
            dir,
            anchors: pem_dir(&[&p.ca.cert]),
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    fn verify(&self, json: bool, names: &[&str]) -> Run {
        let mut args = vec!["verify".to_owned()];
        if json {
            args.push("--json".to_owned());
        }
        args.push("--trust".to_owned());
        args.push(self.anchors.path().to_str().unwrap().to_owned());
        args.extend(names.iter().map(|n| self.file(n)));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pecgate(&args)
    }
}

#[test]
fn cli_json_signature_objects_and_exit_statuses() {
    let p = pki();
    let c = Corpus::new();

    // Only valid files: exit 0.
    let run = c.verify(true, &["a-valid.eml", "b-valid-sha256.eml"]);
    assert_eq!(run.code, 0, "{run:?}");
    let lines = run.json_lines();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(sorted_keys(line), LINE_KEYS, "{line}");
        let sig = &line["signature"];
        assert_eq!(sorted_keys(sig), SIGNATURE_KEYS, "{sig}");
        assert_eq!(sig["status"], "valid");
        assert!(sig["reason"].is_null());
        assert_eq!(sig["signer_cn"], PROVIDER_CN);
        assert_eq!(sig["signer_email"], PROVIDER_EMAIL);
        assert_eq!(sig["issuer_cn"], CA_CN);
        assert_eq!(sig["serial"], serial_hex(&p.provider.cert));
        assert_eq!(sig["expired_now"], false);
        assert_eq!(sig["revocation"], "not-checked");
        assert_rfc3339_z(&sig["not_before"]);
        assert_rfc3339_z(&sig["not_after"]);
        assert_rfc3339_z(&sig["signed_at"]);
    }
    assert_eq!(assert_rfc3339_z(&lines[0]["signature"]["signed_at"]), p.now);
    assert_eq!(lines[0]["signature"]["signed_at_source"], "signing-time");
    assert_eq!(lines[1]["signature"]["signed_at_source"], "daticert");
    assert_eq!(
        lines[1]["signature"]["signed_at"],
        lines[1]["daticert"]["data"]
    );

    // A tampered and an unsigned file: exit 1.
    let run = c.verify(true, &["a-valid.eml", "c-tampered.eml", "d-unsigned.eml"]);
    assert_eq!(run.code, 1, "{run:?}");
    let lines = run.json_lines();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["file"], c.file("a-valid.eml"));
    let tampered = &lines[1]["signature"];
    assert_eq!(sorted_keys(tampered), SIGNATURE_KEYS);
    assert_eq!(tampered["status"], "invalid");
    assert!(
        tampered["reason"]
            .as_str()
            .unwrap()
            .contains("does not match the content")
    );
    assert_eq!(tampered["signer_email"], PROVIDER_EMAIL);
    assert!(tampered["signed_at"].is_null());
    assert_eq!(tampered["revocation"], "not-checked");
    let unsigned = &lines[2]["signature"];
    assert_eq!(sorted_keys(unsigned), SIGNATURE_KEYS);
    assert_eq!(unsigned["status"], "unsigned");
    for k in SIGNATURE_KEYS {
        if !matches!(*k, "status" | "revocation") {
            assert!(unsigned[k].is_null(), "{k}: {unsigned}");
        }
    }
    assert_eq!(unsigned["revocation"], "not-checked");
    // The inspection is there too.
    assert_eq!(lines[2]["kind"], "accettazione");

    // Unsigned alone is enough for exit 1.
    assert_eq!(c.verify(true, &["d-unsigned.eml"]).code, 1);

    // A file that is not a message, or that cannot be read: exit 2 (wins
    // over 1), with an error line and no signature.
    let run = c.verify(
        true,
        &["a-valid.eml", "c-tampered.eml", "e-not-a-message.eml"],
    );
    assert_eq!(run.code, 2, "{run:?}");
    let lines = run.json_lines();
    assert_eq!(sorted_keys(&lines[2]), ["error", "file"]);
    let run = c.verify(true, &["a-valid.eml", "missing.eml"]);
    assert_eq!(run.code, 2, "{run:?}");
    let lines = run.json_lines();
    assert_eq!(lines[0]["signature"]["status"], "valid");
    assert_eq!(sorted_keys(&lines[1]), ["error", "file"]);

    // A directory: its .eml files in name order.
    let run = pecgate(&[
        "verify",
        "--json",
        "--trust",
        c.anchors.path().to_str().unwrap(),
        c.dir.path().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 2, "{run:?}");
    let statuses: Vec<Value> = run
        .json_lines()
        .iter()
        .map(|l| {
            l.get("signature")
                .map_or(Value::Null, |s| s["status"].clone())
        })
        .collect();
    assert_eq!(
        statuses,
        ["valid", "valid", "invalid", "unsigned"]
            .iter()
            .map(|s| Value::from(*s))
            .chain([Value::Null])
            .collect::<Vec<_>>()
    );
}

#[test]
fn cli_human_output_says_revocation_is_not_checked() {
    let c = Corpus::new();
    let run = c.verify(false, &["a-valid.eml"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("signature:       VALID"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains(PROVIDER_CN), "{}", run.stdout);
    assert!(
        run.stdout.contains("(from the CMS signingTime)"),
        "{}",
        run.stdout
    );
    let revocation = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("revocation:"))
        .unwrap_or_else(|| panic!("no revocation line: {}", run.stdout));
    assert!(revocation.contains("not checked"), "{revocation}");

    let run = c.verify(false, &["c-tampered.eml"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("signature:       INVALID"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("not checked"), "{}", run.stdout);
}

#[test]
fn cli_unreadable_trust_dir_is_a_configuration_error() {
    let c = Corpus::new();
    let missing = c.dir.path().join("no-such-dir");
    let run = pecgate(&[
        "verify",
        "--trust",
        missing.to_str().unwrap(),
        &c.file("a-valid.eml"),
    ]);
    assert_eq!(run.code, 78, "{run:?}");
    assert!(run.stderr.contains("trust anchors"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
}

// ---------------------------------------------------------------------------
// 4. Cross-check with openssl smime

/// The openssl command-line tool, if installed (3.x for -no-CAstore).
/// The openssl command-line tool must be there (scripts/setup installs it):
/// a missing tool fails the test, it never skips it.
fn openssl_cli() -> bool {
    match Command::new("openssl").arg("version").output() {
        Ok(o) if o.status.success() && o.stdout.starts_with(b"OpenSSL 3") => true,
        other => panic!(
            "the openssl 3 command-line tool is needed: install it with \
             `apt-get install openssl` (or run scripts/setup): {other:?}"
        ),
    }
}

/// `openssl smime -verify` with `ca` as the only trust anchor (the system
/// store left out, so that the result depends on `ca` only).
fn openssl_verify(dir: &Path, ca: &X509, message: &[u8], extra: &[&str]) -> bool {
    let ca_path = dir.join("ca.pem");
    let msg_path = dir.join("signed.eml");
    std::fs::write(&ca_path, ca.to_pem().unwrap()).unwrap();
    std::fs::write(&msg_path, message).unwrap();
    let out = Command::new("openssl")
        .args(["smime", "-verify", "-no-CApath", "-no-CAstore", "-CAfile"])
        .arg(&ca_path)
        .args(extra)
        .args(["-purpose", "smimesign", "-in"])
        .arg(&msg_path)
        .args(["-out", "/dev/null"])
        .output()
        .unwrap();
    out.status.success()
}

#[test]
fn openssl_smime_accepts_our_signatures_and_rejects_tampering() {
    if !openssl_cli() {
        return;
    }
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let partial = ["-partial_chain"];
    for digest in [Digest::Sha1, Digest::Sha256] {
        let signed = sign_fixture(ACCETTAZIONE, &p.provider, &[], &opts(digest, Some(p.now)));
        assert!(
            openssl_verify(dir.path(), &p.ca.cert, &signed, &partial),
            "{digest:?}"
        );
        // The test CA is self-signed: no partial chain needed.
        assert!(
            openssl_verify(dir.path(), &p.ca.cert, &signed, &[]),
            "{digest:?}"
        );
        let tampered = map_daticert(&signed, |x| bump_ora(x));
        assert!(
            !openssl_verify(dir.path(), &p.ca.cert, &tampered, &partial),
            "{digest:?}"
        );
        // Same verdicts as ours.
        assert_valid(&verdict(&test_verifier(), &signed));
        assert_invalid(
            &verdict(&test_verifier(), &tampered),
            Failure::BadSignature,
            &[],
        );
    }
    // LF storage: openssl canonicalises text to CRLF too.
    let signed = sign_fixture(ACCETTAZIONE, &p.provider, &[], &now_sha1());
    assert!(openssl_verify(
        dir.path(),
        &p.ca.cert,
        &to_lf(&signed),
        &partial
    ));
    // A 1024-bit key with SHA-1: accepted as well.
    let weak = sign_fixture(ACCETTAZIONE, &p.weak, &[], &now_sha1());
    assert!(openssl_verify(dir.path(), &p.ca.cert, &weak, &partial));
}

#[test]
fn openssl_needs_partial_chain_when_the_anchor_is_an_intermediate() {
    // The PEC CAs (AgID CA1, DigitPA CA1) are intermediates, not roots:
    // openssl accepts them as the only anchor with -partial_chain only,
    // which is why pecgate sets X509_V_FLAG_PARTIAL_CHAIN.
    if !openssl_cli() {
        return;
    }
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let signed = sign_fixture(
        ACCETTAZIONE,
        &p.chained,
        std::slice::from_ref(&p.intermediate.cert),
        &now_sha1(),
    );
    assert!(!openssl_verify(
        dir.path(),
        &p.intermediate.cert,
        &signed,
        &[]
    ));
    assert!(openssl_verify(
        dir.path(),
        &p.intermediate.cert,
        &signed,
        &["-partial_chain"]
    ));
    assert!(openssl_verify(dir.path(), &p.root.cert, &signed, &[]));

    // The real 2023 Aruba envelope with AgID CA1 as the only anchor: openssl
    // checks validity now unless told the signing time (-attime), and needs
    // -partial_chain; pecgate agrees with it at signing time.
    let real = read(&in_repo_2023().path);
    let agid = TrustAnchors::builtin()
        .unwrap()
        .certificates()
        .iter()
        .find(|c| c.not_before().to_string().contains("2021"))
        .expect("AgID CA1 2021")
        .clone();
    let signed_at: Timestamp = in_repo_2023().signed_at.parse().unwrap();
    let attime = signed_at.as_second().to_string();
    assert!(!openssl_verify(
        dir.path(),
        &agid,
        &real,
        &["-partial_chain"]
    ));
    assert!(!openssl_verify(
        dir.path(),
        &agid,
        &real,
        &["-attime", &attime]
    ));
    assert!(openssl_verify(
        dir.path(),
        &agid,
        &real,
        &["-partial_chain", "-attime", &attime]
    ));
    assert_valid(&verdict(&verifier_for(&[&agid]), &real));
}
