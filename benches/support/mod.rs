//! What the verification benchmark (`benches/verify.rs`) and the receipt
//! generator (`examples/make-receipts.rs`) share: a test PEC CA, a provider
//! certificate with the real PEC profile, and the signing of the unsigned
//! synthetic receipts of `fixtures/synthetic/` the way providers sign
//! (detached `multipart/signed`, SHA-1, signingTime, signer + CA
//! certificates in the signature).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use jiff::{SignedDuration, Timestamp};
use pecgate::pki::{
    self, CertKey, Digest, ProviderProfile, SignOptions, Validity, make_ca, make_provider_cert,
};
use pecgate::verify::{TrustAnchors, Verifier};

/// The provider's service address (the `From` of every signed receipt).
pub const PROVIDER_EMAIL: &str = "posta-certificata@pec.example.it";

/// The ~10 KB (once signed) acceptance receipt.
pub const ACCEPTANCE: &str = "01-accettazione.eml";
/// The ~300 KB delivery receipt carrying postacert.eml.
pub const DELIVERY_LARGE: &str = "60-avvenuta-consegna-completa-large.eml";

/// The real 2018 Aruba acceptance in the shared directory (AGPL, personal
/// data: read in place, never copied).
pub const ARUBA_2018: &str = "fixtures/public/OCA-l10n-italy/l10n_it_fatturapa_pec/tests/data/ACCETTAZIONE_ IT03339130126_00009.xml.txt";

/// The test PKI.
pub struct BenchPki {
    /// "Now" for the verifier (whole seconds).
    pub now: Timestamp,
    /// The test PEC CA (trust anchor).
    pub ca: CertKey,
    /// The provider's signing certificate, issued by `ca`.
    pub provider: CertKey,
}

impl BenchPki {
    /// A CA and a provider certificate valid around now (RSA 2048).
    pub fn new() -> BenchPki {
        let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
        let year = SignedDuration::from_hours(24 * 365);
        let start: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        let ca = make_ca(
            "PEC Bench CA1",
            "Agenzia per la PEC di prova",
            Validity {
                not_before: start - year,
                not_after: now + year * 10,
            },
            2048,
        )
        .unwrap();
        let provider = make_provider_cert(
            &ca,
            &ProviderProfile {
                organization: "Esempio PEC S.p.A.".into(),
                common_name: "Posta Certificata ESEMPIO PEC".into(),
                email: PROVIDER_EMAIL.into(),
                validity: Validity {
                    not_before: start,
                    not_after: now + year,
                },
                pec_policy: true,
                key_bits: 2048,
            },
        )
        .unwrap();
        BenchPki { now, ca, provider }
    }

    /// A verifier trusting the test CA only.
    pub fn verifier(&self) -> Verifier {
        Verifier::new(TrustAnchors::from_certs(vec![self.ca.cert.clone()]).unwrap())
    }

    /// Signs an unsigned receipt as a provider does: the outer headers stay
    /// outside, `From` becomes the provider's address, the MIME entity
    /// (Content-Type + body) is signed with SHA-1 and a signingTime.
    pub fn sign(&self, unsigned: &[u8], signing_time: Timestamp) -> Vec<u8> {
        let (headers, entity) = split(unsigned);
        pki::sign_detached(
            &headers,
            &entity,
            &self.provider,
            std::slice::from_ref(&self.ca.cert),
            &SignOptions {
                digest: Digest::Sha1,
                signing_time: Some(signing_time),
                x_protocol: true,
            },
        )
        .unwrap()
    }
}

impl Default for BenchPki {
    fn default() -> Self {
        BenchPki::new()
    }
}

/// `fixtures/synthetic/<name>`.
pub fn synthetic(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/synthetic")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shared directory: `$PECGATE_SHARED_DIR`, else `<crate>/../shared`.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("PECGATE_SHARED_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    }
}

/// The real 2018 Aruba acceptance, when the shared directory has it.
pub fn aruba_2018() -> Option<Vec<u8>> {
    std::fs::read(shared_dir().join(ARUBA_2018)).ok()
}

/// Splits an unsigned message (CRLF or LF) into its outer header fields,
/// CRLF-terminated, without MIME-Version/Content-Type/
/// Content-Transfer-Encoding and with `From` set to [`PROVIDER_EMAIL`], and
/// the MIME entity to sign (its Content-Type and CTE fields, a blank line
/// and the body).
pub fn split(raw: &[u8]) -> (String, Vec<u8>) {
    let raw = pecgate::pec::envelope::to_crlf(raw).into_owned();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header/body separator");
    let head = std::str::from_utf8(&raw[..end + 2]).expect("ASCII headers");
    let body = &raw[end + 4..];
    let mut fields: Vec<String> = Vec::new();
    for line in head.split_inclusive("\r\n") {
        match fields.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) => last.push_str(line),
            _ => fields.push(line.to_owned()),
        }
    }
    let mut outer = String::new();
    let mut entity = Vec::new();
    for f in &fields {
        let name = f
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match name.as_str() {
            "content-type" | "content-transfer-encoding" => entity.extend_from_slice(f.as_bytes()),
            "mime-version" => {}
            "from" => outer.push_str(&format!("From: {PROVIDER_EMAIL}\r\n")),
            _ => outer.push_str(f),
        }
    }
    entity.extend_from_slice(b"\r\n");
    entity.extend_from_slice(body);
    (outer, entity)
}
