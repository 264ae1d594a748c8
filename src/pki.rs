//! Certificates and S/MIME signatures for the PEC sandbox and the tests
//! (openssl for every cryptographic operation; RustCrypto `cms`/`der` only
//! for the ASN.1 structure).
//!
//! The sandbox must sign receipts exactly as a provider does, with a
//! signingTime of its own choosing (its clock may run faster than the real
//! one), and the tests need signatures with and without signingTime, with
//! SHA-1 or SHA-256, detached or opaque. The openssl crate's `Pkcs7::sign`
//! always stamps the current time, so the CMS SignedData is assembled here:
//! openssl computes the digests and the RSA signature, `der` lays out the
//! bytes. `openssl smime -verify` accepts the result (tested by the
//! sandbox tests).

use der::asn1::{Any, OctetString, SetOfVec, UtcTime};
use der::{Decode, Encode};
use jiff::Timestamp;
use openssl::asn1::{Asn1Integer, Asn1Object, Asn1Time};
use openssl::bn::BigNum;
use openssl::error::ErrorStack;
use openssl::hash::{MessageDigest, hash};
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::sign::Signer;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509Builder, X509Extension, X509NameBuilder};

use crate::pec::envelope::to_crlf;

/// A certificate with its private key.
#[derive(Clone)]
pub struct CertKey {
    /// The certificate.
    pub cert: X509,
    /// Its private key.
    pub key: PKey<Private>,
}

impl std::fmt::Debug for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CertKey")
            .field("subject", &self.cert.subject_name())
            .finish_non_exhaustive()
    }
}

/// Errors building certificates or signatures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// openssl failed.
    #[error("openssl: {0}")]
    Openssl(#[from] ErrorStack),
    /// ASN.1 encoding failed.
    #[error("asn.1: {0}")]
    Der(#[from] der::Error),
    /// A time outside what X.509 can express.
    #[error("time out of range: {0}")]
    Time(String),
}

/// The validity window and key size of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
}

fn asn1_time(t: Timestamp) -> Result<Asn1Time, PkiError> {
    Ok(Asn1Time::from_unix(t.as_second())?)
}

fn serial(n: u64) -> Result<Asn1Integer, PkiError> {
    let bn = BigNum::from_dec_str(&n.to_string())?;
    Ok(bn.to_asn1_integer()?)
}

fn random_serial() -> Result<Asn1Integer, PkiError> {
    let mut bn = BigNum::new()?;
    bn.rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)?;
    Ok(bn.to_asn1_integer()?)
}

/// Creates a self-signed CA certificate.
///
/// # Errors
/// openssl failures.
pub fn make_ca(
    common_name: &str,
    organization: &str,
    validity: Validity,
    key_bits: u32,
) -> Result<CertKey, PkiError> {
    let key = PKey::from_rsa(Rsa::generate(key_bits)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("C", "IT")?;
    name.append_entry_by_text("O", organization)?;
    name.append_entry_by_text("CN", common_name)?;
    let name = name.build();
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let sn = random_serial()?;
    b.set_serial_number(&sn)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&key)?;
    let (nb, na) = (
        asn1_time(validity.not_before)?,
        asn1_time(validity.not_after)?,
    );
    b.set_not_before(&nb)?;
    b.set_not_after(&na)?;
    b.append_extension(BasicConstraints::new().critical().ca().pathlen(1).build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(CertKey {
        cert: b.build(),
        key,
    })
}

/// What a provider signing certificate looks like (SPEC.md §4.2).
#[derive(Debug, Clone)]
pub struct ProviderProfile {
    /// The provider's name, in `O` (e.g. "Sandbox PEC S.p.A.").
    pub organization: String,
    /// `CN`, e.g. "Posta Certificata Sandbox".
    pub common_name: String,
    /// The service address in subjectAltName, e.g.
    /// `posta-certificata@pec.sandbox.test`.
    pub email: String,
    /// Validity window.
    pub validity: Validity,
    /// Include the PEC policy 1.3.76.16.3.1.1 (false only to test its
    /// absence).
    pub pec_policy: bool,
    /// RSA key size (2048 today; 1024 in old archives).
    pub key_bits: u32,
}

/// Issues a provider signing certificate with the real PEC profile:
/// KeyUsage critical digitalSignature (+ nonRepudiation), EKU
/// emailProtection, SAN e-mail, AKI/SKI, certificatePolicies with the PEC
/// policy, no BasicConstraints.
///
/// # Errors
/// openssl or encoding failures.
pub fn make_provider_cert(ca: &CertKey, p: &ProviderProfile) -> Result<CertKey, PkiError> {
    let key = PKey::from_rsa(Rsa::generate(p.key_bits)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("C", "IT")?;
    name.append_entry_by_text("O", &p.organization)?;
    name.append_entry_by_text("CN", &p.common_name)?;
    let name = name.build();
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let sn = random_serial()?;
    b.set_serial_number(&sn)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    b.set_pubkey(&key)?;
    let (nb, na) = (
        asn1_time(p.validity.not_before)?,
        asn1_time(p.validity.not_after)?,
    );
    b.set_not_before(&nb)?;
    b.set_not_after(&na)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .non_repudiation()
            .build()?,
    )?;
    b.append_extension(ExtendedKeyUsage::new().email_protection().build()?)?;
    let san = SubjectAlternativeName::new()
        .email(&p.email)
        .build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(san)?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(ski)?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(true)
        .build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(aki)?;
    if p.pec_policy {
        b.append_extension(policy_extension(crate::verify::PEC_POLICY_OID)?)?;
    }
    b.sign(&ca.key, MessageDigest::sha256())?;
    Ok(CertKey {
        cert: b.build(),
        key,
    })
}

/// A certificatePolicies extension holding one policy OID.
fn policy_extension(oid: &str) -> Result<X509Extension, PkiError> {
    use x509_cert::ext::pkix::CertificatePolicies;
    use x509_cert::ext::pkix::certpolicy::PolicyInformation;
    let oid = const_oid::ObjectIdentifier::new(oid).map_err(|e| PkiError::Time(e.to_string()))?;
    let policies = CertificatePolicies(vec![PolicyInformation {
        policy_identifier: oid,
        policy_qualifiers: None,
    }]);
    let der_bytes = policies.to_der()?;
    let ext_oid = Asn1Object::from_str("2.5.29.32")?;
    let value = openssl::asn1::Asn1OctetString::new_from_bytes(&der_bytes)?;
    Ok(X509Extension::new_from_der(&ext_oid, false, &value)?)
}

/// Issues a TLS server certificate for the sandbox's loopback services.
///
/// # Errors
/// openssl failures.
pub fn make_tls_server_cert(
    ca: &CertKey,
    dns_names: &[&str],
    ips: &[&str],
    validity: Validity,
) -> Result<CertKey, PkiError> {
    let key = PKey::from_rsa(Rsa::generate(2048)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", dns_names.first().copied().unwrap_or("localhost"))?;
    let name = name.build();
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let sn = serial(u64::try_from(validity.not_before.as_second()).unwrap_or(1))?;
    b.set_serial_number(&sn)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    b.set_pubkey(&key)?;
    let (nb, na) = (
        asn1_time(validity.not_before)?,
        asn1_time(validity.not_after)?,
    );
    b.set_not_before(&nb)?;
    b.set_not_after(&na)?;
    b.append_extension(BasicConstraints::new().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    let mut san = SubjectAlternativeName::new();
    for d in dns_names {
        san.dns(d);
    }
    for ip in ips {
        san.ip(ip);
    }
    let san = san.build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(san)?;
    b.sign(&ca.key, MessageDigest::sha256())?;
    Ok(CertKey {
        cert: b.build(),
        key,
    })
}

/// The digest algorithm of a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    /// SHA-1, as every real provider still uses (micalg `sha1`).
    Sha1,
    /// SHA-256 (micalg `sha-256`).
    Sha256,
}

impl Digest {
    fn openssl(self) -> MessageDigest {
        match self {
            Digest::Sha1 => MessageDigest::sha1(),
            Digest::Sha256 => MessageDigest::sha256(),
        }
    }
    fn oid(self) -> const_oid::ObjectIdentifier {
        match self {
            Digest::Sha1 => const_oid::db::rfc5912::ID_SHA_1,
            Digest::Sha256 => const_oid::db::rfc5912::ID_SHA_256,
        }
    }
    /// The `micalg` parameter value.
    pub fn micalg(self) -> &'static str {
        match self {
            Digest::Sha1 => "sha1",
            Digest::Sha256 => "sha-256",
        }
    }
}

/// How to sign.
#[derive(Debug, Clone)]
pub struct SignOptions {
    /// Digest algorithm.
    pub digest: Digest,
    /// The signingTime attribute; `None` leaves it out.
    pub signing_time: Option<Timestamp>,
    /// `application/x-pkcs7-signature` (true, what providers use) or
    /// `application/pkcs7-signature`.
    pub x_protocol: bool,
}

impl Default for SignOptions {
    fn default() -> Self {
        SignOptions {
            digest: Digest::Sha1,
            signing_time: None,
            x_protocol: true,
        }
    }
}

/// Builds the DER of a CMS SignedData signing `content` (already
/// canonical). `detached` leaves the content out.
///
/// # Errors
/// openssl or encoding failures.
pub fn cms_sign(
    content: &[u8],
    signer: &CertKey,
    chain: &[X509],
    opts: &SignOptions,
    detached: bool,
) -> Result<Vec<u8>, PkiError> {
    use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
    use cms::content_info::{CmsVersion, ContentInfo};
    use cms::signed_data::{
        CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo,
        SignerInfos,
    };
    use const_oid::db::{rfc5911, rfc5912};
    use x509_cert::attr::Attribute;
    use x509_cert::spki::AlgorithmIdentifierOwned;

    let digest = hash(opts.digest.openssl(), content)?;
    let mut attrs: Vec<Attribute> = vec![
        Attribute {
            oid: rfc5911::ID_CONTENT_TYPE,
            values: SetOfVec::try_from(vec![Any::encode_from(&rfc5911::ID_DATA)?])?,
        },
        Attribute {
            oid: rfc5911::ID_MESSAGE_DIGEST,
            values: SetOfVec::try_from(vec![Any::encode_from(&OctetString::new(
                digest.to_vec(),
            )?)?])?,
        },
    ];
    if let Some(t) = opts.signing_time {
        let secs = u64::try_from(t.as_second()).map_err(|e| PkiError::Time(e.to_string()))?;
        let utc = UtcTime::from_unix_duration(std::time::Duration::from_secs(secs))?;
        attrs.push(Attribute {
            oid: rfc5911::ID_SIGNING_TIME,
            values: SetOfVec::try_from(vec![Any::encode_from(&utc)?])?,
        });
    }
    let signed_attrs: SetOfVec<Attribute> = SetOfVec::try_from(attrs)?;
    // The signature covers the DER of the attributes as a SET OF.
    let attrs_der = signed_attrs.to_der()?;
    let mut s = Signer::new(opts.digest.openssl(), &signer.key)?;
    s.update(&attrs_der)?;
    let signature = s.sign_to_vec()?;

    let signer_cert = x509_cert::Certificate::from_der(&signer.cert.to_der()?)?;
    let digest_alg = AlgorithmIdentifierOwned {
        oid: opts.digest.oid(),
        parameters: None,
    };
    let signer_info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: signer_cert.tbs_certificate.issuer.clone(),
            serial_number: signer_cert.tbs_certificate.serial_number.clone(),
        }),
        digest_alg: digest_alg.clone(),
        signed_attrs: Some(signed_attrs),
        signature_algorithm: AlgorithmIdentifierOwned {
            oid: rfc5912::RSA_ENCRYPTION,
            parameters: Some(Any::null()),
        },
        signature: OctetString::new(signature)?,
        unsigned_attrs: None,
    };
    let mut certs = vec![CertificateChoices::Certificate(signer_cert)];
    for c in chain {
        certs.push(CertificateChoices::Certificate(
            x509_cert::Certificate::from_der(&c.to_der()?)?,
        ));
    }
    let econtent = if detached {
        None
    } else {
        Some(Any::encode_from(&OctetString::new(content.to_vec())?)?)
    };
    let sd = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![digest_alg])?,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: rfc5911::ID_DATA,
            econtent,
        },
        certificates: Some(CertificateSet(SetOfVec::try_from(certs)?)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![signer_info])?),
    };
    let ci = ContentInfo {
        content_type: rfc5911::ID_SIGNED_DATA,
        content: Any::encode_from(&sd)?,
    };
    Ok(ci.to_der()?)
}

/// Signs a MIME entity and returns the complete message: `outer_headers`
/// (RFC 5322 header lines, each ending in CRLF, without MIME-Version and
/// Content-Type), then a `multipart/signed` body whose first part is
/// `entity` byte for byte. Everything is CRLF.
///
/// # Errors
/// openssl or encoding failures.
pub fn sign_detached(
    outer_headers: &str,
    entity: &[u8],
    signer: &CertKey,
    chain: &[X509],
    opts: &SignOptions,
) -> Result<Vec<u8>, PkiError> {
    let entity = to_crlf(entity);
    let der = cms_sign(&entity, signer, chain, opts, true)?;
    let boundary = format!("----{}", hex(&hash(MessageDigest::sha1(), &der)?[..16]));
    let protocol = if opts.x_protocol {
        "application/x-pkcs7-signature"
    } else {
        "application/pkcs7-signature"
    };
    let mut out = Vec::with_capacity(entity.len() + der.len() * 2 + 1024);
    out.extend_from_slice(to_crlf(outer_headers.as_bytes()).as_ref());
    out.extend_from_slice(
        format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol=\"{protocol}\"; micalg=\"{}\"; boundary=\"{boundary}\"\r\n\r\nThis is an S/MIME signed message\r\n\r\n--{boundary}\r\n",
            opts.digest.micalg()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&entity);
    out.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Type: {protocol}; name=\"smime.p7s\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7s\"\r\n\r\n"
        )
        .as_bytes(),
    );
    out.extend_from_slice(base64_lines(&der).as_bytes());
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Ok(out)
}

/// Signs a MIME entity as opaque `application/pkcs7-mime` signed-data.
///
/// # Errors
/// openssl or encoding failures.
pub fn sign_opaque(
    outer_headers: &str,
    entity: &[u8],
    signer: &CertKey,
    chain: &[X509],
    opts: &SignOptions,
) -> Result<Vec<u8>, PkiError> {
    let entity = to_crlf(entity);
    let der = cms_sign(&entity, signer, chain, opts, false)?;
    let mut out = Vec::with_capacity(der.len() * 2 + 512);
    out.extend_from_slice(to_crlf(outer_headers.as_bytes()).as_ref());
    out.extend_from_slice(
        b"MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=signed-data; name=\"smime.p7m\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7m\"\r\n\r\n",
    );
    out.extend_from_slice(base64_lines(&der).as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// Base64 in lines of 64 characters separated by CRLF (openssl encodes).
pub fn base64_lines(bytes: &[u8]) -> String {
    let encoded = openssl::base64::encode_block(bytes);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 32);
    for (i, chunk) in encoded.as_bytes().chunks(64).enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// PEM of a certificate.
///
/// # Errors
/// openssl failures.
pub fn cert_pem(cert: &X509) -> Result<Vec<u8>, PkiError> {
    Ok(cert.to_pem()?)
}

/// PEM (PKCS#8) of a private key.
///
/// # Errors
/// openssl failures.
pub fn key_pem(key: &PKey<Private>) -> Result<Vec<u8>, PkiError> {
    Ok(key.private_key_to_pem_pkcs8()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pec::inspect::inspect;
    use crate::verify::{Status, TrustAnchors, Verifier};

    fn window(from_days: i64, to_days: i64) -> Validity {
        let now = Timestamp::now();
        Validity {
            not_before: now - jiff::SignedDuration::from_hours(24 * from_days),
            not_after: now + jiff::SignedDuration::from_hours(24 * to_days),
        }
    }

    #[test]
    fn signed_message_verifies_with_the_ca_as_anchor() {
        let ca = make_ca("Test PEC CA", "Test", window(10, 100), 2048).unwrap();
        let signer = make_provider_cert(
            &ca,
            &ProviderProfile {
                organization: "Test PEC S.p.A.".into(),
                common_name: "Posta Certificata Test".into(),
                email: "posta-certificata@pec.test".into(),
                validity: window(5, 50),
                pec_policy: true,
                key_bits: 2048,
            },
        )
        .unwrap();
        let entity = b"Content-Type: text/plain\r\n\r\nhello\r\n";
        let headers = "Date: Thu, 26 Nov 2026 10:00:00 +0100\r\nFrom: posta-certificata@pec.test\r\nTo: a@pec.test\r\nX-Ricevuta: accettazione\r\n";
        let verifier = Verifier::new(TrustAnchors::from_certs(vec![ca.cert.clone()]).unwrap());
        for digest in [Digest::Sha1, Digest::Sha256] {
            for time in [None, Some(Timestamp::now())] {
                let opts = SignOptions {
                    digest,
                    signing_time: time,
                    x_protocol: true,
                };
                for raw in [
                    sign_detached(headers, entity, &signer, &[], &opts).unwrap(),
                    sign_opaque(headers, entity, &signer, &[], &opts).unwrap(),
                ] {
                    let ins = inspect(&raw).unwrap();
                    let v = verifier.verify(&ins, Timestamp::now());
                    assert_eq!(v.status, Status::Valid, "{digest:?} {time:?}: {v:?}");
                }
            }
        }
    }
}
