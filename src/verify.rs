//! S/MIME verification of PEC messages against the PEC trust anchors
//! (openssl).
//!
//! A PEC receipt is evidence only if its provider really signed it with a
//! certificate that was valid when it signed. [`Verifier::verify`] checks,
//! in order:
//! 1. the CMS signature over the exact signed bytes (detached
//!    `multipart/signed`, canonicalised to CRLF, or opaque signed-data);
//!    SHA-1 and SHA-256 digests and 1024-bit RSA keys are accepted, because
//!    real providers and old archives use them;
//! 2. the signer's chain up to a PEC trust anchor (AgID CA1, DigitPA CA1 or
//!    the configured ones), with partial-chain verification so that no
//!    general-purpose root makes a signature "PEC", and the S/MIME signing
//!    purpose;
//! 3. the PEC signing policy `1.3.76.16.3.1.1` in the signer certificate;
//! 4. the signer's subjectAltName e-mail equal to the message's `From`;
//! 5. validity of the whole chain **at the time of signing** (CMS
//!    signingTime, else the daticert date, else the `Date` header).
//!    Whether the signer certificate has expired *now* is reported apart.
//!
//! Revocation (CRL/OCSP) is not checked: every verdict says so.
//! The outcome is data ([`Verdict`]), never an `Err`: an invalid signature
//! is a normal result for a PEC gateway.
//!
//! Chains are verified once per distinct certificate set and cached, since a
//! provider signs thousands of receipts with the same certificate. For the
//! same reason the certificates carried in a signature are read once per
//! distinct set (see [`CertSet`]): with OpenSSL 3, reading a certificate
//! (its public key above all) costs far more than checking an RSA
//! signature, and is what made verification slow (docs/BENCHMARKS.md).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use jiff::Timestamp;
use openssl::nid::Nid;
use openssl::pkcs7::{Pkcs7, Pkcs7Flags};
use openssl::stack::Stack;
use openssl::x509::store::{X509Store, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509, X509PurposeId, X509Ref, X509StoreContext};
use serde::Serialize;

use crate::pec::envelope::Signature;
use crate::pec::ids::same_address;
use crate::pec::inspect::Inspection;

/// The OID of the PEC signing policy that every provider certificate carries.
pub const PEC_POLICY_OID: &str = "1.3.76.16.3.1.1";

/// The PEC trust anchors built into the binary (see `certs/README.md`).
const BUILTIN_ANCHORS: &[(&str, &[u8])] = &[
    (
        "agid-ca1-2018.pem",
        include_bytes!("../certs/agid-ca1-2018.pem"),
    ),
    (
        "agid-ca1-2021.pem",
        include_bytes!("../certs/agid-ca1-2021.pem"),
    ),
    (
        "digitpa-ca1.pem",
        include_bytes!("../certs/digitpa-ca1.pem"),
    ),
];

/// The CMS `signingTime` attribute (PKCS #9).
const SIGNING_TIME_OID: &str = "1.2.840.113549.1.9.5";

/// The largest number of cached chain verdicts; the cache is cleared when it
/// is full (a real mailbox sees a handful of provider certificates).
const CHAIN_CACHE_MAX: usize = 1024;

/// The largest number of cached certificate sets ([`CertSet`]); the cache
/// is cleared when it is full.
const CERT_SET_CACHE_MAX: usize = 256;

/// The largest certificates field that is cached (a provider's is 3 to 5
/// KB): with [`CERT_SET_CACHE_MAX`], what hostile messages can make the
/// cache hold stays around 8 MB of DER. Larger sets are read every time.
const CERT_SET_MAX_BYTES: usize = 32 * 1024;

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Signed by a PEC provider whose certificate was valid when it signed.
    Valid,
    /// Signed, but the signature does not prove what it should.
    Invalid,
    /// No signature at all.
    Unsigned,
}

/// Why a signature is invalid, for programs (the human text is in
/// [`Verdict::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// The signature structure cannot be read.
    Malformed,
    /// The content does not match the signature (tampered or corrupted).
    BadSignature,
    /// The signer's chain does not reach a PEC trust anchor.
    Untrusted,
    /// The signer certificate lacks the PEC signing policy.
    NotPecPolicy,
    /// The signer's e-mail differs from the message's `From`.
    AddressMismatch,
    /// No time of signing could be found.
    NoSigningTime,
    /// A certificate of the chain was not valid when the message was signed.
    NotValidWhenSigned,
}

/// Where the time of signing came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeSource {
    /// The CMS signingTime signed attribute.
    SigningTime,
    /// The daticert `<data>` (signed content).
    Daticert,
    /// The `Date` header (not covered by the signature).
    Date,
}

/// Everything known about a message's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// valid, invalid or unsigned.
    pub status: Status,
    /// The failure class, when invalid.
    #[serde(skip)]
    pub failure: Option<Failure>,
    /// Why the signature is invalid, in words.
    pub reason: Option<String>,
    /// The signer certificate's common name.
    pub signer_cn: Option<String>,
    /// The signer certificate's subjectAltName e-mail.
    pub signer_email: Option<String>,
    /// The issuer's common name.
    pub issuer_cn: Option<String>,
    /// The signer certificate's serial number, hexadecimal.
    pub serial: Option<String>,
    /// Start of the signer certificate's validity.
    #[serde(serialize_with = "ser_opt_ts")]
    pub not_before: Option<Timestamp>,
    /// End of the signer certificate's validity.
    #[serde(serialize_with = "ser_opt_ts")]
    pub not_after: Option<Timestamp>,
    /// When the message was signed.
    #[serde(serialize_with = "ser_opt_ts")]
    pub signed_at: Option<Timestamp>,
    /// Where `signed_at` came from.
    pub signed_at_source: Option<TimeSource>,
    /// Whether the signer certificate has expired by now.
    pub expired_now: Option<bool>,
    /// Revocation status: always `not-checked` (no CRL/OCSP yet).
    pub revocation: &'static str,
}

impl Verdict {
    fn unsigned() -> Verdict {
        Verdict {
            status: Status::Unsigned,
            failure: None,
            reason: None,
            signer_cn: None,
            signer_email: None,
            issuer_cn: None,
            serial: None,
            not_before: None,
            not_after: None,
            signed_at: None,
            signed_at_source: None,
            expired_now: None,
            revocation: "not-checked",
        }
    }

    fn fail(mut self, failure: Failure, reason: impl Into<String>) -> Verdict {
        self.status = Status::Invalid;
        self.failure = Some(failure);
        self.reason = Some(reason.into());
        self
    }

    /// True when the signature is valid.
    pub fn is_valid(&self) -> bool {
        self.status == Status::Valid
    }
}

fn ser_opt_ts<S: serde::Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// An instant as RFC 3339 UTC with `Z`, seconds precision.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Failure to load trust anchors (a configuration problem, not a verdict).
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A directory could not be read.
    #[error("trust anchors {path}: cannot read")]
    Read {
        /// The directory or file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is neither a PEM nor a DER certificate.
    #[error("trust anchors {path}: not a PEM or DER certificate")]
    NotACertificate {
        /// The file.
        path: PathBuf,
    },
    /// The directories held no certificate at all.
    #[error("trust anchors {0}: no certificate found")]
    Empty(String),
    /// openssl failed to build the store.
    #[error("trust anchors: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
}

/// A set of PEC trust anchors.
pub struct TrustAnchors {
    certs: Vec<X509>,
    store: X509Store,
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.certs.iter().map(|c| common_name(c, true)).collect();
        f.debug_struct("TrustAnchors")
            .field("certs", &names)
            .finish()
    }
}

impl TrustAnchors {
    /// The anchors built into the binary: AgID CA1 (2018 and 2021 editions)
    /// and DigitPA CA1.
    ///
    /// # Errors
    /// Only if the built-in PEM were corrupt (a build defect).
    pub fn builtin() -> Result<TrustAnchors, TrustError> {
        let mut certs = Vec::new();
        for (_, pem) in BUILTIN_ANCHORS {
            certs.extend(X509::stack_from_pem(pem)?);
        }
        TrustAnchors::from_certs(certs)
    }

    /// The PEM or DER certificates found in these directories (files in
    /// name order, not recursive; files named README* are skipped).
    ///
    /// # Errors
    /// A directory that cannot be read, a file that is not a certificate,
    /// or no certificate at all.
    pub fn from_dirs(dirs: &[impl AsRef<Path>]) -> Result<TrustAnchors, TrustError> {
        let mut certs = Vec::new();
        for dir in dirs {
            let dir = dir.as_ref();
            let read = |e| TrustError::Read {
                path: dir.to_owned(),
                source: e,
            };
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(read)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .filter(|p| {
                    !p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("README") || n.starts_with('.'))
                })
                .collect();
            files.sort();
            for file in files {
                let bytes = std::fs::read(&file).map_err(|e| TrustError::Read {
                    path: file.clone(),
                    source: e,
                })?;
                certs.extend(
                    parse_certificates(&bytes)
                        .ok_or(TrustError::NotACertificate { path: file.clone() })?,
                );
            }
        }
        if certs.is_empty() {
            let names: Vec<String> = dirs
                .iter()
                .map(|d| d.as_ref().display().to_string())
                .collect();
            return Err(TrustError::Empty(names.join(", ")));
        }
        TrustAnchors::from_certs(certs)
    }

    /// Anchors from certificates in memory.
    ///
    /// # Errors
    /// openssl failures only.
    pub fn from_certs(certs: Vec<X509>) -> Result<TrustAnchors, TrustError> {
        let mut builder = X509StoreBuilder::new()?;
        for c in &certs {
            builder.add_cert(c.clone())?;
        }
        // Anchors are the PEC CAs themselves, not roots: accept a chain that
        // ends at any of them. Times are checked by hand at the time of
        // signing, hence NO_CHECK_TIME.
        builder.set_flags(X509VerifyFlags::PARTIAL_CHAIN | X509VerifyFlags::NO_CHECK_TIME)?;
        builder.set_purpose(X509PurposeId::SMIME_SIGN)?;
        Ok(TrustAnchors {
            certs,
            store: builder.build(),
        })
    }

    /// The anchors' certificates.
    pub fn certificates(&self) -> &[X509] {
        &self.certs
    }
}

/// Parses one or more PEM certificates, or one DER certificate.
fn parse_certificates(bytes: &[u8]) -> Option<Vec<X509>> {
    if let Ok(v) = X509::stack_from_pem(bytes)
        && !v.is_empty()
    {
        return Some(v);
    }
    X509::from_der(bytes).ok().map(|c| vec![c])
}

/// What the chain check found for one certificate set (cached).
#[derive(Debug, Clone)]
struct ChainInfo {
    /// Why the chain is not trusted, if it is not.
    error: Option<String>,
    /// The window in which every certificate of the chain is valid.
    valid_from: Option<Timestamp>,
    valid_until: Option<Timestamp>,
}

/// What a verdict says about a signer certificate, and whether it carries
/// the PEC policy: a function of the certificate alone (cached with its
/// [`CertSet`]).
#[derive(Debug, Clone)]
struct SignerFacts {
    cn: Option<String>,
    issuer_cn: Option<String>,
    serial: Option<String>,
    email: Option<String>,
    not_before: Option<Timestamp>,
    not_after: Option<Timestamp>,
    policy: Result<bool, String>,
}

impl SignerFacts {
    fn of(signer: &X509) -> SignerFacts {
        SignerFacts {
            cn: Some(common_name(signer, false)).filter(|s| !s.is_empty()),
            issuer_cn: Some(common_name(signer, true)).filter(|s| !s.is_empty()),
            serial: signer
                .serial_number()
                .to_bn()
                .ok()
                .and_then(|bn| bn.to_hex_str().ok())
                .map(|h| h.to_string()),
            email: signer.subject_alt_names().and_then(|names| {
                names
                    .iter()
                    .find_map(|n| n.email().map(|e| e.trim().to_owned()))
            }),
            not_before: asn1_to_ts(signer.not_before()),
            not_after: asn1_to_ts(signer.not_after()),
            policy: has_policy(signer, PEC_POLICY_OID),
        }
    }

    /// Fills in the signer's identity and validity.
    fn describe(&self, mut v: Verdict, now: Timestamp) -> Verdict {
        v.signer_cn.clone_from(&self.cn);
        v.issuer_cn.clone_from(&self.issuer_cn);
        v.serial.clone_from(&self.serial);
        v.signer_email.clone_from(&self.email);
        v.not_before = self.not_before;
        v.not_after = self.not_after;
        v.expired_now = v.not_after.map(|na| now > na);
        v
    }
}

/// The certificates field of a signature, read once per distinct set: a
/// provider puts the same certificates in every receipt it signs.
struct CertSet {
    /// openssl's reading of each certificate, in order; `None` when one of
    /// them cannot be read (such signatures take the uncached path, which
    /// reports exactly what it always did).
    certs: Option<Vec<X509>>,
    /// Whether the RustCrypto `cms` decoder accepts the set: if it does
    /// not, [`cms_signing_time`] of the whole signature is `None`.
    cms_ok: bool,
    /// For each certificate, once it has signed something: its facts and
    /// its chain (the chain of `[it, every certificate of the set]`).
    signers: Vec<OnceLock<(SignerFacts, ChainInfo)>>,
}

impl CertSet {
    fn read(field: &SignedDataLayout<'_>) -> CertSet {
        let certs: Option<Vec<X509>> = field
            .certificates
            .iter()
            .map(|der| X509::from_der(der).ok())
            .collect();
        let signers = (0..field.certificates.len())
            .map(|_| OnceLock::new())
            .collect();
        CertSet {
            certs,
            cms_ok: cms_accepts_certificates(field.certificates_field),
            signers,
        }
    }
}

/// A signature ready for openssl.
struct Parsed {
    p7: Pkcs7,
    /// The certificates carried in the signature, in order.
    included: Vec<X509>,
    /// The certificates openssl looks the signer up in before those of
    /// `p7`: the cached ones on the fast path (where `p7` has none), none on
    /// the uncached path.
    lookup: Stack<X509>,
    /// On the fast path: the cached set and the signature without its
    /// certificates.
    fast: Option<(Arc<CertSet>, Vec<u8>)>,
}

/// Verifies PEC signatures; cheap to share between threads.
pub struct Verifier {
    anchors: TrustAnchors,
    chains: Mutex<HashMap<[u8; 32], ChainInfo>>,
    cert_sets: Mutex<HashMap<[u8; 32], Arc<CertSet>>>,
    /// An empty store, built once: the content check of `PKCS7_verify`
    /// (chains are checked apart, with NOVERIFY) never reads it. `None` if
    /// openssl could not allocate it; then each verification tries again.
    empty_store: Option<X509Store>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("anchors", &self.anchors)
            .field("chains", &self.lock(&self.chains).len())
            .field("cert_sets", &self.lock(&self.cert_sets).len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier with these anchors.
    pub fn new(anchors: TrustAnchors) -> Verifier {
        Verifier {
            anchors,
            chains: Mutex::new(HashMap::new()),
            cert_sets: Mutex::new(HashMap::new()),
            empty_store: X509StoreBuilder::new().ok().map(X509StoreBuilder::build),
        }
    }

    /// Verifies an inspected message; `now` only decides `expired_now`.
    pub fn verify(&self, ins: &Inspection<'_>, now: Timestamp) -> Verdict {
        let msg = &ins.message;
        let verdict = Verdict::unsigned();
        let (der, what) = match &msg.signature {
            Signature::Unsigned => return verdict,
            Signature::Broken { reason } => {
                return verdict.fail(Failure::Malformed, format!("broken signature: {reason}"));
            }
            Signature::Detached { der, .. } => (der, "smime.p7s"),
            Signature::Opaque { der, .. } => (der, "smime.p7m"),
        };
        let Some(parsed) = self.parse_fast(der).or_else(|| parse_uncached(der)) else {
            return verdict.fail(
                Failure::Malformed,
                format!("{what} is not a PKCS#7 structure"),
            );
        };
        let content = match &msg.signature {
            Signature::Detached { .. } => msg.canonical_signed(),
            _ => None,
        };
        let p7 = &parsed.p7;
        if p7.signed().is_none() {
            return verdict.fail(Failure::Malformed, "PKCS#7 structure is not signed-data");
        }
        let signer = match p7.signers(&parsed.lookup, Pkcs7Flags::empty()) {
            Ok(s) if s.len() == 1 => s.get(0).map(|c| c.to_owned()),
            Ok(s) => {
                return verdict.fail(
                    Failure::Malformed,
                    format!("{} signers instead of exactly one", s.len()),
                );
            }
            Err(_) => None,
        };
        let Some(signer) = signer else {
            return verdict.fail(Failure::Malformed, "no signer certificate in the signature");
        };
        // The signer's facts and chain: cached with the certificate set on
        // the fast path (the signer is one of the set's certificates).
        let cached = parsed.fast.as_ref().and_then(|(set, _)| {
            let certs = set.certs.as_ref()?;
            // The same openssl object, not merely an equal certificate.
            let i = certs
                .iter()
                .position(|c| std::ptr::eq::<X509Ref>(&**c, &*signer))?;
            Some(set.signers[i].get_or_init(|| {
                let chain = self.check_chain(&signer_and(&signer, certs));
                (SignerFacts::of(&signer), chain)
            }))
        });
        let uncached;
        let facts = match cached {
            Some((facts, _)) => facts,
            None => {
                uncached = SignerFacts::of(&signer);
                &uncached
            }
        };
        let mut verdict = facts.describe(verdict, now);

        // 1. The signature over the content (chain checked apart, below).
        let built;
        let empty_store = match &self.empty_store {
            Some(store) => store,
            None => match X509StoreBuilder::new() {
                Ok(b) => {
                    built = b.build();
                    &built
                }
                Err(e) => return verdict.fail(Failure::Malformed, format!("openssl: {e}")),
            },
        };
        if let Err(e) = p7.verify(
            &parsed.lookup,
            empty_store,
            content.as_deref(),
            None,
            Pkcs7Flags::NOVERIFY | Pkcs7Flags::BINARY,
        ) {
            return verdict.fail(
                Failure::BadSignature,
                format!(
                    "signature does not match the content (tampered or corrupted): {}",
                    first_reason(&e)
                ),
            );
        }

        // 2. The chain, once per certificate set.
        let chain = match cached {
            Some((_, chain)) => chain.clone(),
            None => self.chain_info(&signer_and(&signer, &parsed.included)),
        };
        if let Some(err) = &chain.error {
            return verdict.fail(
                Failure::Untrusted,
                format!("signer certificate does not chain to a PEC trust anchor: {err}"),
            );
        }

        // 3. PEC policy.
        match &facts.policy {
            Ok(true) => {}
            Ok(false) => {
                return verdict.fail(
                    Failure::NotPecPolicy,
                    format!("signer certificate lacks the PEC policy {PEC_POLICY_OID}"),
                );
            }
            Err(e) => {
                return verdict.fail(
                    Failure::Malformed,
                    format!("signer certificate cannot be read: {e}"),
                );
            }
        }

        // 4. The signer is the sender.
        let signer_email = verdict.signer_email.clone();
        match (&signer_email, &msg.from) {
            (Some(s), Some(f)) if same_address(s, f) => {}
            (Some(s), Some(f)) => {
                return verdict.fail(
                    Failure::AddressMismatch,
                    format!("signer e-mail {s} differs from From {f}"),
                );
            }
            (None, _) => {
                return verdict.fail(
                    Failure::AddressMismatch,
                    "signer certificate has no e-mail in subjectAltName",
                );
            }
            (_, None) => {
                return verdict.fail(Failure::AddressMismatch, "message has no From address");
            }
        }

        // 5. Valid at the time of signing. On the fast path the signature
        // without its certificates is read, and the certificates' verdict
        // is the cached one: the same answer as reading the whole.
        let signing_time = match &parsed.fast {
            Some((set, stripped)) => set.cms_ok.then(|| cms_signing_time(stripped)).flatten(),
            None => cms_signing_time(der),
        };
        let (signed_at, source) = match (
            signing_time,
            ins.daticert.as_ref().map(|d| d.data),
            msg.date,
        ) {
            (Some(t), _, _) => (t, TimeSource::SigningTime),
            (None, Some(t), _) => (t, TimeSource::Daticert),
            (None, None, Some(t)) => (t, TimeSource::Date),
            (None, None, None) => {
                return verdict.fail(
                    Failure::NoSigningTime,
                    "no time of signing: no signingTime, daticert date or Date header",
                );
            }
        };
        verdict.signed_at = Some(signed_at);
        verdict.signed_at_source = Some(source);
        if chain.valid_from.is_some_and(|f| signed_at < f) {
            return verdict.fail(
                Failure::NotValidWhenSigned,
                format!(
                    "signed at {} before the certificate chain was valid (from {})",
                    rfc3339(signed_at),
                    chain.valid_from.map(rfc3339).unwrap_or_default()
                ),
            );
        }
        if chain.valid_until.is_some_and(|u| signed_at > u) {
            return verdict.fail(
                Failure::NotValidWhenSigned,
                format!(
                    "signed at {} after the certificate chain expired ({})",
                    rfc3339(signed_at),
                    chain.valid_until.map(rfc3339).unwrap_or_default()
                ),
            );
        }
        verdict.status = Status::Valid;
        verdict
    }

    /// The fast path: a DER SignedData whose certificates are read once per
    /// distinct set. `None` sends the signature down the uncached path
    /// (BER, certificates openssl cannot read, anything unusual).
    fn parse_fast(&self, der: &[u8]) -> Option<Parsed> {
        let layout = SignedDataLayout::of(der)?;
        let set = if layout.certificates_field.len() > CERT_SET_MAX_BYTES {
            Arc::new(CertSet::read(&layout))
        } else {
            let key = openssl::sha::sha256(layout.certificates_field);
            let hit = self.lock(&self.cert_sets).get(&key).cloned();
            match hit {
                Some(set) => set,
                None => {
                    let set = Arc::new(CertSet::read(&layout));
                    let mut sets = self.lock(&self.cert_sets);
                    if sets.len() >= CERT_SET_CACHE_MAX {
                        sets.clear();
                    }
                    sets.insert(key, Arc::clone(&set));
                    set
                }
            }
        };
        let certs = set.certs.as_ref()?;
        let stripped = layout.without_certificates();
        let p7 = Pkcs7::from_der(&stripped).ok()?;
        let mut lookup = Stack::new().ok()?;
        for c in certs {
            lookup.push(c.clone()).ok()?;
        }
        Some(Parsed {
            p7,
            included: certs.clone(),
            lookup,
            fast: Some((set, stripped)),
        })
    }

    fn chain_info(&self, certs: &[X509]) -> ChainInfo {
        let mut hasher = openssl::sha::Sha256::new();
        for c in certs {
            if let Ok(der) = c.to_der() {
                hasher.update(&(der.len() as u64).to_be_bytes());
                hasher.update(&der);
            }
        }
        let key = hasher.finish();
        if let Some(hit) = self.lock(&self.chains).get(&key) {
            return hit.clone();
        }
        let info = self.check_chain(certs);
        let mut cache = self.lock(&self.chains);
        if cache.len() >= CHAIN_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, info.clone());
        info
    }

    fn lock<'m, T>(&self, m: &'m Mutex<T>) -> std::sync::MutexGuard<'m, T> {
        // A poisoned cache only means a panic elsewhere; its data is still
        // a set of independent, complete entries.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_chain(&self, certs: &[X509]) -> ChainInfo {
        let untrusted = || -> Result<Stack<X509>, openssl::error::ErrorStack> {
            let mut s = Stack::new()?;
            for c in &certs[1..] {
                s.push(c.clone())?;
            }
            Ok(s)
        };
        let result = untrusted().and_then(|chain| {
            let mut ctx = X509StoreContext::new()?;
            ctx.init(&self.anchors.store, &certs[0], &chain, |c| {
                let ok = c.verify_cert()?;
                let err = (!ok).then(|| c.error().error_string().to_owned());
                let built: Vec<X509> = c
                    .chain()
                    .map(|s| s.iter().map(|x| x.to_owned()).collect())
                    .unwrap_or_default();
                Ok((err, built))
            })
        });
        match result {
            Err(e) => ChainInfo {
                error: Some(first_reason(&e)),
                valid_from: None,
                valid_until: None,
            },
            Ok((Some(err), _)) => ChainInfo {
                error: Some(err),
                valid_from: None,
                valid_until: None,
            },
            Ok((None, built)) => {
                let mut from: Option<Timestamp> = None;
                let mut until: Option<Timestamp> = None;
                for c in &built {
                    let nb = asn1_to_ts(c.not_before());
                    let na = asn1_to_ts(c.not_after());
                    from = max_opt(from, nb);
                    until = min_opt(until, na);
                }
                ChainInfo {
                    error: None,
                    valid_from: from,
                    valid_until: until,
                }
            }
        }
    }
}

fn max_opt(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn min_opt(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `[signer, certs...]`: the certificates whose chain is checked.
fn signer_and(signer: &X509, certs: &[X509]) -> Vec<X509> {
    let mut all = Vec::with_capacity(certs.len() + 1);
    all.push(signer.clone());
    all.extend(certs.iter().cloned());
    all
}

/// The uncached path: openssl reads the whole signature, certificates
/// included.
fn parse_uncached(der: &[u8]) -> Option<Parsed> {
    let p7 = Pkcs7::from_der(der).ok()?;
    let included = p7
        .signed()
        .and_then(|s| s.certificates())
        .map(|c| c.iter().map(|x| x.to_owned()).collect())
        .unwrap_or_default();
    Some(Parsed {
        p7,
        included,
        lookup: Stack::new().ok()?,
        fast: None,
    })
}

/// The DER encoding of `signedData` (1.2.840.113549.1.7.2) as an OBJECT
/// IDENTIFIER, tag and length included.
const SIGNED_DATA_OID_DER: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02,
];

/// Where the certificates sit in a DER `ContentInfo` holding a
/// `SignedData`, found by walking tags and lengths only:
///
/// ```text
/// SEQUENCE { signedData OID, [0] { SEQUENCE {
///     version, digestAlgorithms, encapContentInfo,
///     [0] certificates,                       <- here, and only here
///     [1] crls OPTIONAL, signerInfos } } }
/// ```
///
/// `of` returns `None` for anything else: BER (indefinite or non-minimal
/// lengths in the three enclosing headers), trailing bytes, no or
/// misplaced certificates, high tag numbers. Because the enclosing headers
/// are minimal DER and every other byte is kept as it is, a parser reads
/// [`SignedDataLayout::without_certificates`] exactly as it reads the
/// whole, except for the certificates.
struct SignedDataLayout<'a> {
    /// The `ContentInfo` header and the OID.
    oid: &'a [u8],
    /// The `SignedData` fields, in order, each with its tag and length.
    fields: Vec<&'a [u8]>,
    /// The `[0] certificates` field, tag and length included.
    certificates_field: &'a [u8],
    /// Each certificate of the field, tag and length included.
    certificates: Vec<&'a [u8]>,
}

impl<'a> SignedDataLayout<'a> {
    fn of(der: &'a [u8]) -> Option<SignedDataLayout<'a>> {
        let (outer, rest) = Tlv::read(der)?;
        if outer.tag != 0x30 || !outer.minimal || !rest.is_empty() {
            return None;
        }
        let body = outer.content;
        if !body.starts_with(SIGNED_DATA_OID_DER) {
            return None;
        }
        let (explicit, rest) = Tlv::read(&body[SIGNED_DATA_OID_DER.len()..])?;
        if explicit.tag != 0xa0 || !explicit.minimal || !rest.is_empty() {
            return None;
        }
        let (sd, rest) = Tlv::read(explicit.content)?;
        if sd.tag != 0x30 || !sd.minimal || !rest.is_empty() {
            return None;
        }
        let mut fields = Vec::new();
        let mut rest = sd.content;
        let mut certificates_field = None;
        while !rest.is_empty() {
            let (field, after) = Tlv::read(rest)?;
            let whole = &rest[..rest.len() - after.len()];
            if field.tag == 0xa0 {
                // Exactly one, fourth field.
                if fields.len() != 3 || certificates_field.is_some() {
                    return None;
                }
                certificates_field = Some((whole, field.content));
            } else {
                fields.push(whole);
            }
            rest = after;
        }
        let (certificates_field, mut set) = certificates_field?;
        let mut certificates = Vec::new();
        while !set.is_empty() {
            let (_, after) = Tlv::read(set)?;
            certificates.push(&set[..set.len() - after.len()]);
            set = after;
        }
        Some(SignedDataLayout {
            oid: SIGNED_DATA_OID_DER,
            fields,
            certificates_field,
            certificates,
        })
    }

    /// The same `ContentInfo` without the certificates field.
    fn without_certificates(&self) -> Vec<u8> {
        let sd_len: usize = self.fields.iter().map(|f| f.len()).sum();
        let explicit_len = header_len(sd_len) + sd_len;
        let outer_len = self.oid.len() + header_len(explicit_len) + explicit_len;
        let mut out = Vec::with_capacity(header_len(outer_len) + outer_len);
        push_header(&mut out, 0x30, outer_len);
        out.extend_from_slice(self.oid);
        push_header(&mut out, 0xa0, explicit_len);
        push_header(&mut out, 0x30, sd_len);
        for f in &self.fields {
            out.extend_from_slice(f);
        }
        out
    }
}

/// One tag-length-value with a low tag number and a definite length.
struct Tlv<'a> {
    tag: u8,
    /// Whether the length is encoded as DER requires (shortest form).
    minimal: bool,
    content: &'a [u8],
}

impl<'a> Tlv<'a> {
    /// The TLV at the start of `bytes` and what follows it.
    fn read(bytes: &'a [u8]) -> Option<(Tlv<'a>, &'a [u8])> {
        let (&tag, rest) = bytes.split_first()?;
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, minimal, rest) = if first < 0x80 {
            (usize::from(first), true, rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, rest[0] != 0 && len >= 0x80, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let (content, rest) = rest.split_at(len);
        Some((
            Tlv {
                tag,
                minimal,
                content,
            },
            rest,
        ))
    }
}

/// The length of a DER header (low tag number) for `len` content bytes.
fn header_len(len: usize) -> usize {
    match len {
        0..0x80 => 2,
        0x80..0x100 => 3,
        0x100..0x1_0000 => 4,
        0x1_0000..0x100_0000 => 5,
        _ => 6,
    }
}

fn push_header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    let n = header_len(len) - 2;
    if n == 0 {
        // `len` < 0x80 here.
        out.push(len as u8);
    } else {
        out.push(0x80 | n as u8);
        out.extend_from_slice(&len.to_be_bytes()[size_of::<usize>() - n..]);
    }
}

/// Whether the RustCrypto `cms` decoder accepts this `[0] certificates`
/// field, decoding it exactly as it does inside a `SignedData`.
fn cms_accepts_certificates(field: &[u8]) -> bool {
    use cms::signed_data::CertificateSet;
    use der::asn1::ContextSpecific;
    use der::{Reader, SliceReader, TagNumber};

    let Ok(mut reader) = SliceReader::new(field) else {
        return false;
    };
    matches!(
        ContextSpecific::<CertificateSet>::decode_implicit(&mut reader, TagNumber::N0),
        Ok(Some(_))
    ) && reader.is_finished()
}

fn common_name(cert: &X509, issuer: bool) -> String {
    let name = if issuer {
        cert.issuer_name()
    } else {
        cert.subject_name()
    };
    name.entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
        .unwrap_or_default()
}

fn asn1_to_ts(t: &openssl::asn1::Asn1TimeRef) -> Option<Timestamp> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    Timestamp::from_second(i64::from(d.days) * 86_400 + i64::from(d.secs)).ok()
}

fn first_reason(e: &openssl::error::ErrorStack) -> String {
    e.errors()
        .last()
        .and_then(|x| x.reason().map(str::to_owned))
        .unwrap_or_else(|| e.to_string())
}

/// Whether the certificate's certificatePolicies contain `oid`.
fn has_policy(cert: &X509, oid: &str) -> Result<bool, String> {
    use der::Decode;
    use x509_cert::ext::pkix::CertificatePolicies;

    let der_bytes = cert.to_der().map_err(|e| e.to_string())?;
    let parsed = x509_cert::Certificate::from_der(&der_bytes).map_err(|e| e.to_string())?;
    let policies_oid = const_oid::db::rfc5280::ID_CE_CERTIFICATE_POLICIES;
    let Some(exts) = parsed.tbs_certificate.extensions else {
        return Ok(false);
    };
    for ext in exts.iter().filter(|e| e.extn_id == policies_oid) {
        let policies =
            CertificatePolicies::from_der(ext.extn_value.as_bytes()).map_err(|e| e.to_string())?;
        if policies
            .0
            .iter()
            .any(|p| p.policy_identifier.to_string() == oid)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The CMS signingTime signed attribute of the (single) signer, read from
/// the DER with the RustCrypto `cms` crate (the openssl crate does not
/// expose signed attributes). `None` when absent or not decodable (a BER
/// structure, for instance).
pub fn cms_signing_time(der_bytes: &[u8]) -> Option<Timestamp> {
    use cms::content_info::ContentInfo;
    use cms::signed_data::SignedData;
    use der::Decode;

    let ci = ContentInfo::from_der(der_bytes).ok()?;
    let sd: SignedData = ci.content.decode_as().ok()?;
    let signer = sd.signer_infos.0.iter().next()?;
    let attrs = signer.signed_attrs.as_ref()?;
    let attr = attrs
        .iter()
        .find(|a| a.oid.to_string() == SIGNING_TIME_OID)?;
    let value = attr.values.iter().next()?;
    let time = x509_cert::time::Time::from_der(&der::Encode::to_der(value).ok()?).ok()?;
    let secs = i64::try_from(time.to_unix_duration().as_secs()).ok()?;
    Timestamp::from_second(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_is_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Verifier>();
    }

    #[test]
    fn builtin_anchors_load() {
        let a = TrustAnchors::builtin().unwrap();
        assert_eq!(a.certificates().len(), 3);
        let names = format!("{a:?}");
        assert!(names.contains("Actalis"), "{names}");
    }

    #[test]
    fn empty_trust_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = TrustAnchors::from_dirs(&[dir.path()]).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }

    #[test]
    fn non_certificate_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk.pem"), b"hello").unwrap();
        let err = TrustAnchors::from_dirs(&[dir.path()]).unwrap_err();
        assert!(err.to_string().contains("junk.pem"), "{err}");
    }

    // -- The fast path: certificates read once per distinct set.

    use crate::pki::{self, CertKey, ProviderProfile, SignOptions, Validity};

    const EMAIL: &str = "posta-certificata@pec.example.it";

    fn test_pki() -> (CertKey, CertKey) {
        let validity = Validity {
            not_before: "2024-01-01T00:00:00Z".parse().unwrap(),
            not_after: "2034-01-01T00:00:00Z".parse().unwrap(),
        };
        let ca = pki::make_ca("Fast Path CA", "Test", validity, 2048).unwrap();
        let provider = pki::make_provider_cert(
            &ca,
            &ProviderProfile {
                organization: "Test".into(),
                common_name: "Posta Certificata".into(),
                email: EMAIL.into(),
                validity,
                pec_policy: true,
                key_bits: 2048,
            },
        )
        .unwrap();
        (ca, provider)
    }

    fn sign_options() -> SignOptions {
        SignOptions {
            signing_time: Some("2025-01-13T15:39:26Z".parse().unwrap()),
            ..SignOptions::default()
        }
    }

    #[test]
    fn layout_strips_the_certificates_and_nothing_else() {
        use cms::content_info::ContentInfo;
        use cms::signed_data::SignedData;
        use der::Decode;

        let (ca, provider) = test_pki();
        let der = pki::cms_sign(
            b"hello\r\n",
            &provider,
            std::slice::from_ref(&ca.cert),
            &sign_options(),
            true,
        )
        .unwrap();
        let layout = SignedDataLayout::of(&der).expect("a DER SignedData");
        assert_eq!(layout.certificates.len(), 2);
        let stripped = layout.without_certificates();
        assert_eq!(
            der.len() - stripped.len(),
            layout.certificates_field.len(),
            "only the certificates field (the headers keep their length form)"
        );
        let read = |bytes: &[u8]| -> SignedData {
            ContentInfo::from_der(bytes)
                .unwrap()
                .content
                .decode_as()
                .unwrap()
        };
        let (whole, without) = (read(&der), read(&stripped));
        assert_eq!(whole.certificates.map(|c| c.0.len()), Some(2));
        assert!(without.certificates.is_none());
        assert_eq!(whole.signer_infos, without.signer_infos);
        assert_eq!(whole.encap_content_info, without.encap_content_info);
        assert!(cms_accepts_certificates(layout.certificates_field));
        assert_eq!(cms_signing_time(&der), cms_signing_time(&stripped));
        assert!(cms_signing_time(&der).is_some());
        // openssl reads it, and has no certificate left in it.
        let p7 = Pkcs7::from_der(&stripped).unwrap();
        assert!(p7.signed().unwrap().certificates().is_none());
        // Nothing to strip any more: the fast path declines.
        assert!(SignedDataLayout::of(&stripped).is_none());
    }

    #[test]
    fn layout_declines_ber_and_oddities() {
        let (ca, provider) = test_pki();
        let der =
            pki::cms_sign(b"hello\r\n", &provider, &[ca.cert], &sign_options(), true).unwrap();
        assert!(SignedDataLayout::of(&der).is_some());
        // Trailing bytes.
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(SignedDataLayout::of(&trailing).is_none());
        // A non-minimal length in the outer header (BER).
        assert_eq!(&der[..2], &[0x30, 0x82]);
        let mut long = vec![0x30, 0x83, 0x00];
        long.extend_from_slice(&der[2..]);
        assert!(SignedDataLayout::of(&long).is_none());
        // Indefinite length (BER).
        let mut indefinite = vec![0x30, 0x80];
        indefinite.extend_from_slice(&der[4..]);
        indefinite.extend_from_slice(&[0, 0]);
        assert!(SignedDataLayout::of(&indefinite).is_none());
        // Truncated.
        assert!(SignedDataLayout::of(&der[..der.len() - 1]).is_none());
        assert!(SignedDataLayout::of(&[]).is_none());
    }

    #[test]
    fn headers_are_written_and_read_back_at_every_length_form() {
        for len in [0, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, 70_000] {
            let mut tlv = Vec::new();
            push_header(&mut tlv, 0x30, len);
            assert_eq!(tlv.len(), header_len(len), "{len}");
            tlv.resize(tlv.len() + len, 7);
            let (read, rest) = Tlv::read(&tlv).unwrap();
            assert_eq!((read.tag, read.content.len()), (0x30, len));
            assert!(read.minimal, "{len}");
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn a_cached_certificate_set_gives_the_same_verdict() {
        let (ca, provider) = test_pki();
        let verifier = Verifier::new(TrustAnchors::from_certs(vec![ca.cert.clone()]).unwrap());
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let sign = |subject: &str| {
            pki::sign_detached(
                &format!(
                    "From: {EMAIL}\r\nTo: a@b.it\r\nSubject: {subject}\r\n\
                     Date: Mon, 13 Jan 2025 16:39:26 +0100\r\n"
                ),
                b"Content-Type: text/plain\r\n\r\nhello\r\n",
                &provider,
                std::slice::from_ref(&ca.cert),
                &sign_options(),
            )
            .unwrap()
        };
        let (first, second) = (sign("one"), sign("two"));
        let v1 = verifier.verify(&crate::pec::inspect::inspect(&first).unwrap(), now);
        let v2 = verifier.verify(&crate::pec::inspect::inspect(&second).unwrap(), now);
        assert_eq!(v1.status, Status::Valid, "{v1:#?}");
        assert_eq!(v1.signed_at_source, Some(TimeSource::SigningTime));
        assert_eq!(v1, v2);
        assert_eq!(verifier.lock(&verifier.cert_sets).len(), 1);
        // A tampered signature over the cached set is still caught.
        let tampered = String::from_utf8(second)
            .unwrap()
            .replacen("hello", "hellO", 1);
        let v3 = verifier.verify(
            &crate::pec::inspect::inspect(tampered.as_bytes()).unwrap(),
            now,
        );
        assert_eq!(v3.failure, Some(Failure::BadSignature), "{v3:#?}");
    }
}
