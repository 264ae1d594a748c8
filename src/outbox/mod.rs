//! The outbox: from the files a clerk (or another program) drops into a
//! mailbox's outbox folder to validated [`Letter`]s ready to be stored and
//! sent. See `docs/outbox.md` for the clerk-facing rules.
//!
//! Layout:
//!
//! - [`envelope`]: pure. The envelope `NAME.toml` ([`Envelope`], every key
//!   checked, an unknown key is a problem naming it), `{column}`
//!   placeholders, and the CSV of a mass mailing ([`envelope::CsvTable`],
//!   one envelope per row).
//! - [`validate`]: an [`Envelope`] plus the files it names -> a [`Letter`]
//!   (addresses, limits, blocked types, file names, sizes, SHA-256, the
//!   content hash and the duplicate check), or every [`Problem`] found.
//! - [`intake`]: the folder. [`intake::scan`] finds complete letters,
//!   [`intake::claim`] takes one atomically (rename into
//!   `outbox/.processing/<claim-id>/`), [`intake::load`] validates it,
//!   [`intake::reject`] moves a refused letter untouched to
//!   `outbox/rejected/NAME/` with `NAME.error.txt` (Italian, then English),
//!   [`intake::release`] removes a claim once the caller has stored the
//!   letter, [`intake::recover`] lists claims a crash left behind, and
//!   [`intake::watch`] turns file notifications into "rescan now" ticks.
//!
//! Invariants:
//!
//! - Nothing is deleted: a refused letter keeps every byte of its files; a
//!   claim folder is removed only by [`intake::release`] (the caller has
//!   stored the letter and copied its documents) or once it is empty.
//! - Never twice: the claim is a rename of the envelope on one file system;
//!   whoever renames it owns the letter, the other gives up
//!   ([`intake::ClaimError::Taken`]).
//! - Never panics on input: file names, TOML, CSV and documents are data;
//!   every defect is a [`Problem`] in Italian and English naming the field.
//! - Every file the gateway writes has mode 0640, every folder 0750; state
//!   files are written to a temporary name, `fsync`ed, then renamed.
//! - No clock reads: `now` is an argument.

pub mod envelope;
pub mod intake;
pub mod validate;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use envelope::Envelope;
pub use intake::{Candidate, Claim, ClaimError, IntakeError, Rejection};
pub use validate::content_hash;

pub use crate::pec::compose::ReceiptType;

/// One thing wrong with a letter, said in Italian (for the clerk) and in
/// English (for the operator and integrators).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: an envelope key (`subject`), an element (`to[2]`,
    /// `attachments[0]`), a position (`line 3`) or a CSV cell
    /// (`csv row 12, column to`).
    pub field: String,
    /// What is wrong and how to fix it, in Italian.
    pub it: String,
    /// The same in English.
    pub en: String,
}

impl Problem {
    /// A problem about `field`.
    pub fn new(field: impl Into<String>, it: impl Into<String>, en: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            it: it.into(),
            en: en.into(),
        }
    }

    /// The same problem with its field put in a wider context
    /// (`csv row 12` + `to[0]` -> `csv row 12, to[0]`).
    pub fn within(mut self, context: &str) -> Self {
        if !context.is_empty() {
            self.field = if self.field.is_empty() {
                context.to_owned()
            } else {
                format!("{context}, {}", self.field)
            };
        }
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.en)
    }
}

/// What a letter is, as the envelope's `kind` says (wire names are the
/// Italian ones: `certificato`, `raccomandata`, `avviso`, `tributi`, `altro`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DocumentKind {
    /// A certificate (anagrafe, stato civile...).
    #[doc(alias = "certificato")]
    Certificate,
    /// A letter with the legal value of a registered letter.
    #[doc(alias = "raccomandata")]
    Registered,
    /// A notice.
    #[doc(alias = "avviso")]
    Notice,
    /// Local taxes (tributi).
    #[doc(alias = "tributi")]
    Taxes,
    /// Anything else (the default when `kind` is absent).
    #[doc(alias = "altro")]
    #[default]
    Other,
}

impl DocumentKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [DocumentKind; 5] = [
        DocumentKind::Certificate,
        DocumentKind::Registered,
        DocumentKind::Notice,
        DocumentKind::Taxes,
        DocumentKind::Other,
    ];

    /// The wire name written in envelopes and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentKind::Certificate => "certificato",
            DocumentKind::Registered => "raccomandata",
            DocumentKind::Notice => "avviso",
            DocumentKind::Taxes => "tributi",
            DocumentKind::Other => "altro",
        }
    }
}

impl fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown document kind (the text is kept for the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown document kind \"{0}\" (certificato, raccomandata, avviso, tributi, altro)")]
pub struct UnknownKind(pub String);

impl FromStr for DocumentKind {
    type Err = UnknownKind;

    /// Exact wire names only (a typo must not pass).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DocumentKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// One document of a letter, checked and hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The file name, as the recipient will see it (checked: no path, no
    /// dangerous characters, not blocked).
    pub name: String,
    /// Where the file is now (inside the claim folder).
    pub path: PathBuf,
    /// Its size in bytes (as read, not as the directory said).
    pub size: u64,
    /// Lowercase hex SHA-256 of its bytes.
    pub sha256: String,
}

/// A validated letter, ready to be stored and sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Letter {
    /// Where it came from: the envelope's file name (`certificato-77.toml`)
    /// or, for a mass mailing, the CSV and the spreadsheet row
    /// (`massivo.csv#12`; the header is row 1).
    pub name: String,
    /// Primary recipients: lower case, without duplicates, in the order
    /// written.
    pub to: Vec<String>,
    /// Carbon-copy recipients: lower case, none repeated from `to` or
    /// within `cc`, in the order written.
    pub cc: Vec<String>,
    /// The subject, trimmed.
    pub subject: String,
    /// The text of the letter (`body`, or the contents of `body_file`);
    /// may be empty when there is at least one document.
    pub body: String,
    /// The documents, in the order written.
    pub attachments: Vec<Document>,
    /// What the letter is.
    pub kind: DocumentKind,
    /// The protocol number, if any.
    pub protocol: Option<String>,
    /// The caller's external reference, if any.
    pub reference: Option<String>,
    /// The delivery receipt flavour requested (default completa).
    pub receipt: ReceiptType,
    /// The identificativo of the incoming certified message this letter
    /// answers, normalised (no angle brackets).
    pub in_reply_to: Option<String>,
    /// Whether the clerk asked to send it even if an identical letter was
    /// already sent.
    pub allow_duplicate: bool,
    /// Lowercase hex SHA-256 of the letter's canonical encoding
    /// ([`content_hash`]): identical letters have the same hash.
    pub content_hash: String,
}

impl Letter {
    /// Every recipient, `to` first.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.to.iter().chain(self.cc.iter()).map(String::as_str)
    }

    /// The total size of the documents.
    pub fn documents_bytes(&self) -> u64 {
        self.attachments.iter().map(|d| d.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_their_wire_names() {
        for k in DocumentKind::ALL {
            assert_eq!(k.as_str().parse::<DocumentKind>().unwrap(), k);
        }
        assert!("Certificato".parse::<DocumentKind>().is_err());
        assert_eq!(DocumentKind::default(), DocumentKind::Other);
    }

    #[test]
    fn problems_nest() {
        let p = Problem::new("to[0]", "a", "b").within("csv row 3");
        assert_eq!(p.field, "csv row 3, to[0]");
        assert_eq!(p.to_string(), "csv row 3, to[0]: b");
    }
}
