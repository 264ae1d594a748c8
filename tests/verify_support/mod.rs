//! The test PKI and the message surgery used by `tests/verify.rs`.
//!
//! Every certificate is made once per test binary ([`pki`]), with the real
//! PEC provider profile of SPEC.md §4.2 (`pecgate::pki::make_provider_cert`),
//! and every message is signed at test time from the unsigned synthetic
//! receipts in `fixtures/synthetic/`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use jiff::{SignedDuration, Timestamp};
use openssl::asn1::{Asn1Object, Asn1OctetString, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509Builder, X509Extension, X509NameBuilder, X509NameRef};
use pecgate::pki::{
    self, CertKey, Digest, ProviderProfile, SignOptions, Validity, make_ca, make_provider_cert,
};
use pecgate::verify::TrustAnchors;

/// The test provider's service address: the `From` of the synthetic receipts.
pub const PROVIDER_EMAIL: &str = "posta-certificata@pec.example.it";
/// The test provider's certificate CN.
pub const PROVIDER_CN: &str = "Posta Certificata ESEMPIO PEC";
/// The test provider's name (`O`).
pub const PROVIDER_ORG: &str = "Esempio PEC S.p.A.";
/// The test PEC CA (an "AgID CA1"-style name).
pub const CA_CN: &str = "PEC Test CA1";
/// The test PEC CA's organisation.
pub const CA_ORG: &str = "Agenzia per la PEC di prova";

/// Real Aruba identity, for the look-alike of a real provider.
pub const ARUBA_EMAIL: &str = "posta-certificata@pec.aruba.it";
/// Real Aruba certificate CN.
pub const ARUBA_CN: &str = "Posta Certificata ARUBA PEC";

/// Every certificate used by the tests.
pub struct Pki {
    /// The instant the tests treat as "now" (whole seconds).
    pub now: Timestamp,
    /// The trusted test PEC CA, self-signed, valid [now-10y, now+10y].
    pub ca: CertKey,
    /// The provider, valid [2024-01-01, now+1y] (covers every daticert and
    /// Date of the synthetic corpus), PEC policy, RSA 2048.
    pub provider: CertKey,
    /// Same as `provider` without the PEC policy.
    pub no_policy: CertKey,
    /// Valid [now-3y, now-1y]: expired now.
    pub expired: CertKey,
    /// RSA 1024, as in the 2014 archives.
    pub weak: CertKey,
    /// An untrusted CA with exactly the test CA's subject.
    pub forged_ca: CertKey,
    /// The provider's look-alike (same O, CN and SAN) issued by `forged_ca`.
    pub forged: CertKey,
    /// A look-alike of the real AgID CA1: same subject and same subject key
    /// identifier as the built-in anchor, another key.
    pub agid_lookalike: CertKey,
    /// An "Aruba" certificate (same O/CN/SAN as the real one) issued by
    /// `agid_lookalike`.
    pub aruba_lookalike: CertKey,
    /// A general-purpose root.
    pub root: CertKey,
    /// A "PEC CA" intermediate issued by `root`.
    pub intermediate: CertKey,
    /// A provider issued by `intermediate`.
    pub chained: CertKey,
}

/// The test PKI, built once per test binary.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(build_pki)
}

/// `n` years of 365 days.
pub fn years(n: i64) -> SignedDuration {
    SignedDuration::from_hours(24 * 365 * n)
}

/// `n` days.
pub fn days(n: i64) -> SignedDuration {
    SignedDuration::from_hours(24 * n)
}

/// 2024-01-01T00:00:00Z: the provider certificate's start of validity.
pub fn provider_not_before() -> Timestamp {
    "2024-01-01T00:00:00Z".parse().unwrap()
}

fn profile(validity: Validity) -> ProviderProfile {
    ProviderProfile {
        organization: PROVIDER_ORG.into(),
        common_name: PROVIDER_CN.into(),
        email: PROVIDER_EMAIL.into(),
        validity,
        pec_policy: true,
        key_bits: 2048,
    }
}

fn build_pki() -> Pki {
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
    let ca_validity = Validity {
        not_before: (now - years(10)).min(provider_not_before() - years(1)),
        not_after: now + years(10),
    };
    let ca = make_ca(CA_CN, CA_ORG, ca_validity, 2048).unwrap();
    let current = Validity {
        not_before: provider_not_before().min(now - years(1)),
        not_after: now + years(1),
    };
    let provider = make_provider_cert(&ca, &profile(current)).unwrap();
    let no_policy = make_provider_cert(
        &ca,
        &ProviderProfile {
            pec_policy: false,
            ..profile(current)
        },
    )
    .unwrap();
    let expired = make_provider_cert(
        &ca,
        &profile(Validity {
            not_before: now - years(3),
            not_after: now - years(1),
        }),
    )
    .unwrap();
    let weak = make_provider_cert(
        &ca,
        &ProviderProfile {
            key_bits: 1024,
            ..profile(current)
        },
    )
    .unwrap();

    // The forger copies every name but cannot copy the key.
    let forged_ca = make_ca(CA_CN, CA_ORG, ca_validity, 2048).unwrap();
    assert_eq!(
        forged_ca.cert.subject_name().to_der().unwrap(),
        ca.cert.subject_name().to_der().unwrap()
    );
    let forged = make_provider_cert(&forged_ca, &profile(current)).unwrap();

    let builtin = TrustAnchors::builtin().unwrap();
    let agid = builtin
        .certificates()
        .iter()
        .find(|c| subject_cn(c.subject_name()) == "AgID CA1")
        .expect("AgID CA1 among the built-in anchors")
        .clone();
    let agid_lookalike = make_lookalike_ca(&agid, ca_validity);
    let aruba_lookalike = make_provider_cert(
        &agid_lookalike,
        &ProviderProfile {
            organization: "Aruba PEC S.p.A.".into(),
            common_name: ARUBA_CN.into(),
            email: ARUBA_EMAIL.into(),
            validity: current,
            pec_policy: true,
            key_bits: 2048,
        },
    )
    .unwrap();

    let root = make_ca(
        "General Purpose Test Root",
        "Test Trust Services",
        ca_validity,
        2048,
    )
    .unwrap();
    let intermediate = make_intermediate(&root, "PEC CA", "Test Trust Services", ca_validity);
    let chained = make_provider_cert(&intermediate, &profile(current)).unwrap();

    Pki {
        now,
        ca,
        provider,
        no_policy,
        expired,
        weak,
        forged_ca,
        forged,
        agid_lookalike,
        aruba_lookalike,
        root,
        intermediate,
        chained,
    }
}

/// The first CN of a name.
pub fn subject_cn(name: &X509NameRef) -> String {
    name.entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .map(|e| e.data().to_string().unwrap())
        .unwrap_or_default()
}

fn random_serial(b: &mut X509Builder) {
    let mut bn = BigNum::new().unwrap();
    bn.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&bn.to_asn1_integer().unwrap()).unwrap();
}

fn set_validity(b: &mut X509Builder, v: Validity) {
    b.set_not_before(&Asn1Time::from_unix(v.not_before.as_second()).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(v.not_after.as_second()).unwrap())
        .unwrap();
}

/// A CA issued by `root` (pki.rs only makes self-signed CAs).
fn make_intermediate(root: &CertKey, cn: &str, org: &str, validity: Validity) -> CertKey {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("C", "IT").unwrap();
    name.append_entry_by_text("O", org).unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    random_serial(&mut b);
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(root.cert.subject_name()).unwrap();
    b.set_pubkey(&key).unwrap();
    set_validity(&mut b, validity);
    b.append_extension(
        BasicConstraints::new()
            .critical()
            .ca()
            .pathlen(0)
            .build()
            .unwrap(),
    )
    .unwrap();
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()
            .unwrap(),
    )
    .unwrap();
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(Some(&root.cert), None))
        .unwrap();
    b.append_extension(ski).unwrap();
    let aki = AuthorityKeyIdentifier::new()
        .keyid(true)
        .build(&b.x509v3_context(Some(&root.cert), None))
        .unwrap();
    b.append_extension(aki).unwrap();
    b.sign(&root.key, MessageDigest::sha256()).unwrap();
    CertKey {
        cert: b.build(),
        key,
    }
}

/// A self-signed CA with exactly the subject and the subject key identifier
/// of `real`, and a key of its own: the best a forger can do.
fn make_lookalike_ca(real: &X509, validity: Validity) -> CertKey {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    random_serial(&mut b);
    b.set_subject_name(real.subject_name()).unwrap();
    b.set_issuer_name(real.subject_name()).unwrap();
    b.set_pubkey(&key).unwrap();
    set_validity(&mut b, validity);
    b.append_extension(
        BasicConstraints::new()
            .critical()
            .ca()
            .pathlen(0)
            .build()
            .unwrap(),
    )
    .unwrap();
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()
            .unwrap(),
    )
    .unwrap();
    let ski = real
        .subject_key_id()
        .expect("the real CA has a subject key identifier");
    let mut value = vec![0x04, u8::try_from(ski.len()).unwrap()];
    value.extend_from_slice(ski.as_slice());
    let ext = X509Extension::new_from_der(
        &Asn1Object::from_str("2.5.29.14").unwrap(),
        false,
        &Asn1OctetString::new_from_bytes(&value).unwrap(),
    )
    .unwrap();
    b.append_extension(ext).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = b.build();
    assert_eq!(
        cert.subject_key_id().unwrap().as_slice(),
        ski.as_slice(),
        "look-alike SKI"
    );
    CertKey { cert, key }
}

/// `fixtures/synthetic/`.
pub fn synthetic_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/synthetic")
}

/// The bytes of `fixtures/synthetic/<name>`.
pub fn synthetic(name: &str) -> Vec<u8> {
    let path = synthetic_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.eml` of `fixtures/synthetic/`, sorted.
pub fn synthetic_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(synthetic_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".eml"))
        .collect();
    names.sort();
    names
}

/// The shared directory with the fixtures that stay outside the repository
/// (AGPL, personal data): `$PECGATE_SHARED_DIR`, else `<crate>/../shared`.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("PECGATE_SHARED_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    }
}

/// A message cut in two: what stays outside the signature and what is
/// signed.
#[derive(Debug, Clone)]
pub struct Split {
    /// The header fields that stay outside the signature, one string each
    /// (with folding), CRLF-terminated; without MIME-Version, Content-Type
    /// and Content-Transfer-Encoding.
    pub fields: Vec<String>,
    /// The MIME entity to sign (its own Content-Type header, CRLF).
    pub entity: Vec<u8>,
}

fn crlf(raw: &[u8]) -> Vec<u8> {
    pecgate::pec::envelope::to_crlf(raw).into_owned()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn find_from(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    find(&hay[from..], needle).map(|i| i + from)
}

fn field_name(field: &str) -> String {
    field
        .split(':')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The `boundary` parameter of a Content-Type field.
fn boundary(content_type: &str) -> String {
    let lower = content_type.to_ascii_lowercase();
    let at = lower.find("boundary=").expect("a boundary parameter") + "boundary=".len();
    let rest = &content_type[at..];
    if let Some(q) = rest.strip_prefix('"') {
        q[..q.find('"').unwrap()].to_owned()
    } else {
        rest.split(|c: char| c == ';' || c.is_whitespace())
            .next()
            .unwrap()
            .to_owned()
    }
}

/// Splits a message into its outer header fields and the entity to sign;
/// a `multipart/signed` message gives its first part.
pub fn split(raw: &[u8]) -> Split {
    let raw = crlf(raw);
    let end = find(&raw, b"\r\n\r\n").expect("a header/body separator");
    let head = std::str::from_utf8(&raw[..end + 2]).expect("ASCII headers");
    let body = &raw[end + 4..];
    let mut fields: Vec<String> = Vec::new();
    for line in head.split_inclusive("\r\n") {
        if line.starts_with([' ', '\t']) {
            fields
                .last_mut()
                .expect("no continuation first")
                .push_str(line);
        } else {
            fields.push(line.to_owned());
        }
    }
    let mut outer = Vec::new();
    let mut content_type = None;
    let mut cte = None;
    for f in fields {
        match field_name(&f).as_str() {
            "content-type" => content_type = Some(f),
            "content-transfer-encoding" => cte = Some(f),
            "mime-version" => {}
            _ => outer.push(f),
        }
    }
    let entity = match content_type {
        Some(ct) if ct.to_ascii_lowercase().contains("multipart/signed") => {
            let b = boundary(&ct);
            let open = format!("--{b}\r\n");
            let start = find(body, open.as_bytes()).expect("first part") + open.len();
            let close = format!("\r\n--{b}");
            let stop = find_from(body, start, close.as_bytes()).expect("end of first part");
            body[start..stop].to_vec()
        }
        ct => {
            let mut e = Vec::new();
            e.extend_from_slice(ct.unwrap_or_default().as_bytes());
            e.extend_from_slice(cte.unwrap_or_default().as_bytes());
            e.extend_from_slice(b"\r\n");
            e.extend_from_slice(body);
            e
        }
    };
    Split {
        fields: outer,
        entity,
    }
}

impl Split {
    /// The outer headers with `From` replaced by `from` (or removed with
    /// `None`) and the fields named in `drop` left out.
    pub fn headers(&self, from: Option<&str>, drop: &[&str]) -> String {
        let mut out = String::new();
        let mut from_done = false;
        for f in &self.fields {
            let name = field_name(f);
            if drop.iter().any(|d| d.eq_ignore_ascii_case(&name)) {
                continue;
            }
            if name == "from" {
                if let Some(a) = from {
                    out.push_str(&format!("From: {a}\r\n"));
                }
                from_done = true;
                continue;
            }
            out.push_str(f);
        }
        if !from_done && let Some(a) = from {
            out.push_str(&format!("From: {a}\r\n"));
        }
        out
    }
}

/// The first e-mail of a certificate's subjectAltName.
pub fn san_email(cert: &X509) -> String {
    cert.subject_alt_names()
        .and_then(|n| n.iter().find_map(|g| g.email().map(str::to_owned)))
        .expect("a SAN e-mail")
}

/// Signing options.
pub fn opts(digest: Digest, signing_time: Option<Timestamp>) -> SignOptions {
    SignOptions {
        digest,
        signing_time,
        x_protocol: true,
    }
}

/// Signs the synthetic receipt `name` (detached), `From` set to the signer's
/// SAN address.
pub fn sign_fixture(name: &str, signer: &CertKey, chain: &[X509], o: &SignOptions) -> Vec<u8> {
    let s = split(&synthetic(name));
    let from = san_email(&signer.cert);
    pki::sign_detached(&s.headers(Some(&from), &[]), &s.entity, signer, chain, o).unwrap()
}

/// The range of the base64 body of the part whose headers contain
/// `marker`, without the trailing line break(s).
fn base64_body(msg: &[u8], marker: &[u8]) -> std::ops::Range<usize> {
    let at = find(msg, marker).unwrap_or_else(|| {
        panic!("{} not found", String::from_utf8_lossy(marker));
    });
    let start = find_from(msg, at, b"\r\n\r\n").unwrap() + 4;
    let mut stop = find_from(msg, start, b"\r\n--").unwrap();
    while msg[..stop].ends_with(b"\r\n") {
        stop -= 2;
    }
    start..stop
}

/// Rewrites the base64 body of a part: `f` gets the decoded bytes; the new
/// base64 keeps the original line length.
fn map_base64_part(msg: &[u8], marker: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let range = base64_body(msg, marker);
    let text = std::str::from_utf8(&msg[range.clone()]).unwrap();
    let line_len = text.find("\r\n").unwrap_or(text.len());
    let mut bytes = openssl::base64::decode_block(&text.replace("\r\n", "")).unwrap();
    f(&mut bytes);
    let encoded = openssl::base64::encode_block(&bytes);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(line_len)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let mut out = msg[..range.start].to_vec();
    out.extend_from_slice(lines.join("\r\n").as_bytes());
    out.extend_from_slice(&msg[range.end..]);
    out
}

/// Rewrites the DER of `smime.p7s`.
pub fn map_p7s(msg: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    map_base64_part(msg, b"filename=\"smime.p7s\"", f)
}

/// Rewrites the base64 text of `smime.p7s` itself.
pub fn map_p7s_text(msg: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let range = base64_body(msg, b"filename=\"smime.p7s\"");
    let mut text = msg[range.clone()].to_vec();
    f(&mut text);
    let mut out = msg[..range.start].to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&msg[range.end..]);
    out
}

/// Rewrites the decoded `daticert.xml` (base64 in every synthetic receipt).
pub fn map_daticert(msg: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    map_base64_part(msg, b"filename=\"daticert.xml\"", f)
}

/// Replaces the first `from` by `to` (same length or not).
pub fn replace_once(msg: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at =
        find(msg, from).unwrap_or_else(|| panic!("{} not found", String::from_utf8_lossy(from)));
    let mut out = msg[..at].to_vec();
    out.extend_from_slice(to);
    out.extend_from_slice(&msg[at + from.len()..]);
    out
}

/// CRLF -> LF everywhere (a message stored by a Unix tool).
pub fn to_lf(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len());
    let mut i = 0;
    while i < msg.len() {
        if msg[i] == b'\r' && msg.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(msg[i]);
        i += 1;
    }
    out
}

/// Writes PEM certificates into a new directory.
pub fn pem_dir(certs: &[&X509]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, c) in certs.iter().enumerate() {
        std::fs::write(
            dir.path().join(format!("anchor{i}.pem")),
            c.to_pem().unwrap(),
        )
        .unwrap();
    }
    dir
}
