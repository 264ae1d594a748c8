//! Faults the sandbox provider injects on demand, read from a TOML file
//! (`--faults FILE`, re-read on SIGHUP). See docs/sandbox.md.
//!
//! ```toml
//! [smtp]
//! rate_limit_per_minute = 30        # 451 4.7.0 above this many messages a minute
//! refuse_auth = ["blocked@*"]       # AUTH refused for these logins (535)
//! drop_after_data = "accepted"      # "accepted" | "not-accepted": close the connection after DATA
//! drop_count = 1                    # how many transactions (0 = every one)
//!
//! [dovecot]
//! restart_on_reload = true          # restart Dovecot once when this file is (re)loaded
//! restart_every_seconds = 0         # restart Dovecot periodically (0 = never)
//!
//! [[recipient]]                     # per recipient address (glob, case-insensitive)
//! pattern = "lento*@pec.cittadini.sandbox.test"
//! delay_seconds = 600               # simulated seconds before delivery
//! no_delivery = false               # never delivered: 12 h preavviso, then 24 h notice
//! virus = false                     # virus found at the recipient's provider
//! mailbox_full = false              # errore-consegna 5.2.2
//! no_dominio = false                # errore-consegna no-dominio
//! missing_receipts = []             # kinds never sent: "accettazione", "avvenuta-consegna", ...
//! duplicate_receipts = false        # every receipt for this recipient sent twice
//! out_of_order = false              # delivery receipt sent before the acceptance
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use wildmatch::WildMatch;

/// The whole faults file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// SMTP-level faults.
    #[serde(default)]
    pub smtp: SmtpFaults,
    /// Dovecot faults.
    #[serde(default)]
    pub dovecot: DovecotFaults,
    /// Per-recipient faults; the first matching entry applies.
    #[serde(default)]
    pub recipient: Vec<RecipientFaults>,
}

/// Faults of the SMTP submission service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpFaults {
    /// Refuse MAIL with 451 4.7.0 above this many messages per minute
    /// (0 = no limit).
    #[serde(default)]
    pub rate_limit_per_minute: u32,
    /// Logins (globs) whose AUTH is refused.
    #[serde(default)]
    pub refuse_auth: Vec<String>,
    /// Close the connection after DATA instead of replying.
    #[serde(default)]
    pub drop_after_data: Option<DropMode>,
    /// How many transactions to drop (0 = all).
    #[serde(default)]
    pub drop_count: u64,
}

/// Whether a dropped message was taken in charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropMode {
    /// The message is processed (receipts follow) but no reply is sent.
    Accepted,
    /// The message is discarded and no reply is sent.
    NotAccepted,
}

/// Faults of the IMAP server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DovecotFaults {
    /// Restart Dovecot once each time the faults file is loaded.
    #[serde(default)]
    pub restart_on_reload: bool,
    /// Restart Dovecot every N real seconds (0 = never).
    #[serde(default)]
    pub restart_every_seconds: u64,
}

/// Faults for the recipients whose address matches `pattern`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientFaults {
    /// Glob on the recipient address (case-insensitive), or "*".
    pub pattern: String,
    /// Simulated seconds before delivery.
    #[serde(default)]
    pub delay_seconds: f64,
    /// Never delivered: the sender's provider sends the timeout notices.
    #[serde(default)]
    pub no_delivery: bool,
    /// A virus is found at the recipient's provider.
    #[serde(default)]
    pub virus: bool,
    /// The recipient's mailbox is full.
    #[serde(default)]
    pub mailbox_full: bool,
    /// The recipient's domain is unknown.
    #[serde(default)]
    pub no_dominio: bool,
    /// Receipt kinds (daticert tipo) never sent.
    #[serde(default)]
    pub missing_receipts: Vec<String>,
    /// Every receipt sent twice.
    #[serde(default)]
    pub duplicate_receipts: bool,
    /// The delivery receipt arrives before the acceptance.
    #[serde(default)]
    pub out_of_order: bool,
}

impl RecipientFaults {
    /// Whether a receipt of this kind must be left out.
    pub fn is_missing(&self, tipo: &str) -> bool {
        self.missing_receipts
            .iter()
            .any(|k| k.eq_ignore_ascii_case(tipo))
    }
}

/// Errors reading the faults file.
#[derive(Debug, thiserror::Error)]
pub enum FaultsError {
    /// Unreadable file.
    #[error("faults file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema.
    #[error("faults file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Faults {
    /// Reads and parses a faults file.
    ///
    /// # Errors
    /// Unreadable file or invalid contents (unknown keys included).
    pub fn load(path: &Path) -> Result<Faults, FaultsError> {
        let text = std::fs::read_to_string(path).map_err(|e| FaultsError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        Faults::parse(&text).map_err(|message| FaultsError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses faults from TOML text.
    ///
    /// # Errors
    /// The parser's message.
    pub fn parse(text: &str) -> Result<Faults, String> {
        let cfg = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|e| e.to_string())?;
        let faults = serde_path_to_error::deserialize::<_, Faults>(cfg).map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner())
        })?;
        for (i, r) in faults.recipient.iter().enumerate() {
            for k in &r.missing_receipts {
                if crate::pec::Kind::from_daticert_tipo(k).is_none() {
                    return Err(format!(
                        "recipient[{i}].missing_receipts: unknown receipt kind \"{k}\" \
                         (use daticert tipi such as accettazione, avvenuta-consegna, \
                         errore-consegna, preavviso-errore-consegna)"
                    ));
                }
            }
        }
        Ok(faults)
    }

    /// The faults for a recipient, if any entry matches.
    pub fn for_recipient(&self, address: &str) -> Option<&RecipientFaults> {
        let addr = address.to_ascii_lowercase();
        self.recipient
            .iter()
            .find(|r| WildMatch::new(&r.pattern.to_ascii_lowercase()).matches(&addr))
    }

    /// Whether AUTH is refused for this login.
    pub fn refuses_auth(&self, user: &str) -> bool {
        let user = user.to_ascii_lowercase();
        self.smtp
            .refuse_auth
            .iter()
            .any(|p| WildMatch::new(&p.to_ascii_lowercase()).matches(&user))
    }
}

/// Counts dropped transactions against `drop_count`.
#[derive(Debug, Default)]
pub struct DropCounter(AtomicU64);

impl DropCounter {
    /// Whether the next transaction is dropped (and counts it).
    pub fn take(&self, faults: &Faults) -> Option<DropMode> {
        let mode = faults.smtp.drop_after_data?;
        if faults.smtp.drop_count == 0 {
            return Some(mode);
        }
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        (n < faults.smtp.drop_count).then_some(mode)
    }

    /// Resets the count (the faults file was reloaded).
    pub fn reset(&self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let f = Faults::parse(
            r#"
[smtp]
rate_limit_per_minute = 30
refuse_auth = ["blocked@*"]
drop_after_data = "accepted"
drop_count = 1
[dovecot]
restart_on_reload = true
[[recipient]]
pattern = "lento*@pec.cittadini.sandbox.test"
delay_seconds = 600
missing_receipts = ["avvenuta-consegna"]
"#,
        )
        .unwrap();
        assert_eq!(f.smtp.rate_limit_per_minute, 30);
        assert!(f.refuses_auth("Blocked@pec.test"));
        assert!(!f.refuses_auth("ok@pec.test"));
        let r = f
            .for_recipient("LENTO.1@pec.cittadini.sandbox.test")
            .unwrap();
        assert!((r.delay_seconds - 600.0).abs() < f64::EPSILON);
        assert!(r.is_missing("AVVENUTA-CONSEGNA"));
        assert!(
            f.for_recipient("other@pec.cittadini.sandbox.test")
                .is_none()
        );
        let c = DropCounter::default();
        assert_eq!(c.take(&f), Some(DropMode::Accepted));
        assert_eq!(c.take(&f), None);
    }

    #[test]
    fn misspelt_receipt_kinds_are_refused() {
        let e =
            Faults::parse("[[recipient]]\npattern='*'\nmissing_receipts=['avvenuta_consegna']\n")
                .unwrap_err();
        assert!(e.contains("avvenuta_consegna"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Faults::parse("[[recipient]]\npattern='*'\ndelay=3\n").unwrap_err();
        assert!(e.contains("delay"), "{e}");
    }
}
