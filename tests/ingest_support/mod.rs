//! Helpers shared by `tests/ingest.rs` and `tests/operate.rs`: the test
//! provider's keys (a test CA, a provider certificate it issued, and a
//! forged twin issued by another CA), the addresses the letters use, and
//! how a receipt's transaction is built and signed.
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::sync::OnceLock;

use jiff::{SignedDuration, Timestamp};
use pecgate::pec::compose::{Composed, Destinatario, ReceiptType, Transaction};
use pecgate::pki::{self, CertKey, Digest, ProviderProfile, SignOptions, Validity};

pub const SERVICE: &str = "posta-certificata@pec.example.it";
pub const FROM: &str = "protocollo@pec.comune.example.it";
pub const A: &str = "alfa@pec.example.it";
pub const B: &str = "beta@pec.example.it";
pub const X: &str = "info@example.com";

pub struct Keys {
    pub ca: CertKey,
    pub provider: CertKey,
    pub forged: CertKey,
}

/// The keys, made once per test binary.
pub fn keys() -> &'static Keys {
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

/// `c` signed by `key` at `at`, as a provider signs its receipts.
pub fn sign_with(c: &Composed, key: &CertKey, at: Timestamp) -> Vec<u8> {
    let opts = SignOptions {
        digest: Digest::Sha256,
        signing_time: Some(at),
        x_protocol: true,
    };
    pki::sign_detached(&c.outer_headers, &c.entity, key, &[], &opts).unwrap()
}

/// The transaction of the letter `id` (Message-ID `mid`) to `recipients`
/// at `at`, the addresses in `external` ordinary (`esterno`), the others
/// certified.
pub fn transaction<'a>(
    id: &str,
    mid: &str,
    recipients: impl IntoIterator<Item = &'a str>,
    external: &[&str],
    at: Timestamp,
) -> Transaction {
    Transaction {
        identificativo: format!("opec.{}@pec.example.it", id.to_lowercase()),
        time: at.in_tz("Europe/Rome").unwrap(),
        mittente: FROM.into(),
        destinatari: recipients
            .into_iter()
            .map(|a| Destinatario {
                address: a.to_owned(),
                tipo: if external.contains(&a) {
                    "esterno".into()
                } else {
                    "certificato".into()
                },
            })
            .collect(),
        risposte: FROM.into(),
        oggetto: "Prova".into(),
        msgid: Some(mid.to_owned()),
        gestore: "Esempio PEC".into(),
        service_address: SERVICE.into(),
        ricevuta: ReceiptType::Completa,
    }
}

pub fn hours(h: i64) -> SignedDuration {
    SignedDuration::from_hours(h)
}
