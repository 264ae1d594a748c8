//! The clerks' `sent/YYYY/MM/<dispatch-id>/` folders: the documents of each
//! letter, the exact `.eml` of each attempt, `dispatch.json` (every envelope
//! field and attempt, enough to rebuild the database), and the status files
//! (`status.txt` for clerks, `status.json` for programs). Receipts are added
//! as they arrive (issue 6).
//!
//! Every file is written durably (temporary file, fsync, rename) with mode
//! 0640; folders 0750.

use std::fs;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::archive::{ArchiveError, write_atomic, write_synced};
use crate::store::DispatchDetail;

/// The name of the record that lets `reindex` rebuild a dispatch.
pub const DISPATCH_JSON: &str = "dispatch.json";

/// The letter as the clerk wrote it, kept in `dispatch.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeRecord {
    /// Primary recipients.
    pub to: Vec<String>,
    /// Carbon-copy recipients.
    pub cc: Vec<String>,
    /// The subject.
    pub subject: String,
    /// The text of the letter.
    pub body: String,
    /// The documents (file names in this folder).
    pub attachments: Vec<DocumentRecord>,
    /// Document kind.
    pub kind: String,
    /// Protocol number.
    pub protocol: Option<String>,
    /// External reference.
    pub reference: Option<String>,
    /// Requested receipt flavour.
    pub receipt: String,
    /// The identificativo this letter answers.
    pub in_reply_to: Option<String>,
    /// Sent although identical to an earlier letter.
    pub allow_duplicate: bool,
}

/// One document in `dispatch.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentRecord {
    /// The file name.
    pub name: String,
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// One attempt in `dispatch.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based attempt number.
    pub n: u32,
    /// Its Message-ID (no brackets).
    pub message_id: String,
    /// Its state.
    pub state: String,
    /// When it started.
    pub started_at: String,
    /// When it ended, if it did.
    pub finished_at: Option<String>,
    /// The server's reply.
    pub smtp_reply: Option<String>,
    /// The exact bytes sent: file in this folder.
    pub eml: String,
    /// Their SHA-256.
    pub eml_sha256: String,
}

/// The whole `dispatch.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchRecord {
    /// The dispatch id.
    pub dispatch_id: String,
    /// The mailbox's short name.
    pub mailbox: String,
    /// The mailbox's address (From).
    pub from: String,
    /// The outbox envelope it came from.
    pub source: String,
    /// When it was taken in (RFC 3339 UTC).
    pub created_at: String,
    /// SHA-256 of the letter.
    pub content_hash: String,
    /// The letter.
    pub envelope: EnvelopeRecord,
    /// Every attempt so far.
    pub attempts: Vec<AttemptRecord>,
}

/// RFC 3339 UTC, seconds (the one formatter: `verify::rfc3339`).
pub use crate::verify::rfc3339 as ts;

/// `sent/YYYY/MM/<dispatch-id>` for a letter taken in at `at` (month in
/// Europe/Rome, the clerks' calendar).
pub fn folder(sent_root: &Path, at: Timestamp, dispatch_id: &str) -> PathBuf {
    let tz = jiff::tz::TimeZone::get("Europe/Rome").unwrap_or(jiff::tz::TimeZone::UTC);
    let local = at.to_zoned_datetime(tz);
    sent_root
        .join(format!("{:04}", local.year()))
        .join(format!("{:02}", local.month()))
        .join(dispatch_id)
}

/// Writes `dispatch.json` (the file is fsync'd; the caller fsyncs the
/// folder, once for all the files it wrote there: `archive::sync_folder`).
///
/// # Errors
/// File-system failures.
pub fn write_record(dir: &Path, record: &DispatchRecord) -> Result<(), ArchiveError> {
    let json = serde_json::to_vec_pretty(record).unwrap_or_default();
    write_synced(&dir.join(DISPATCH_JSON), &json, 0o640)
}

/// Writes `dispatch.json` atomically without any fsync and returns its path:
/// the caller fsyncs it and the folder (with others, `archive::sync_all`)
/// before anything depends on it.
///
/// # Errors
/// File-system failures.
pub fn write_record_unsynced(dir: &Path, record: &DispatchRecord) -> Result<PathBuf, ArchiveError> {
    let json = serde_json::to_vec_pretty(record).unwrap_or_default();
    let path = dir.join(DISPATCH_JSON);
    write_atomic(&path, &json, 0o640)?;
    Ok(path)
}

/// Reads `dispatch.json`.
///
/// # Errors
/// Missing or malformed file (the message names it).
pub fn read_record(dir: &Path) -> Result<DispatchRecord, String> {
    let path = dir.join(DISPATCH_JSON);
    let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The file name of attempt `n`'s exact bytes.
pub fn eml_name(n: u32) -> String {
    if n <= 1 {
        "00-inviato.eml".to_owned()
    } else {
        format!("00-inviato-{n}.eml")
    }
}

fn state_it(state: &str) -> &'static str {
    match state {
        "queued" => "in coda per l'invio",
        "sending" => "invio in corso",
        "submitted" => "consegnata al gestore, in attesa della ricevuta di accettazione",
        "uncertain" => {
            "esito dell'invio incerto: verifica in corso (non viene reinviata alla cieca)"
        }
        "accepted" => "accettata dal gestore",
        "not-accepted" => "NON accettata dal gestore",
        "refused" => "rifiutata dal server di posta",
        "delivered" => "consegnata a tutti i destinatari certificati",
        "partially-delivered" => "consegnata solo ad alcuni destinatari",
        "failed" => "NON consegnata",
        "pending" => "in attesa",
        "warned" => "ritardo nella consegna (preavviso)",
        "timed-out" => "non consegnata entro i tempi massimi",
        "external" => "indirizzo non PEC: nessuna ricevuta di consegna",
        _ => "stato sconosciuto",
    }
}

/// A recipient's state in Italian (the letter-level words of [`state_it`]
/// speak of "all recipients").
fn recipient_state_it(state: &str) -> &'static str {
    match state {
        "delivered" => "consegnata",
        "failed" => "NON consegnata",
        other => state_it(other),
    }
}

/// Writes `status.txt` (Italian and English, for clerks) and `status.json`
/// (for programs) from the store's view of the dispatch.
///
/// # Errors
/// File-system failures.
pub fn write_status(dir: &Path, d: &DispatchDetail, now: Timestamp) -> Result<(), ArchiveError> {
    use std::fmt::Write as _;
    let row = &d.dispatch;
    let mut t = String::new();
    let _ = writeln!(t, "Lettera / Letter: {}", row.id);
    let _ = writeln!(t, "Oggetto / Subject: {}", row.subject);
    if let Some(p) = &row.protocol {
        let _ = writeln!(t, "Protocollo / Protocol: {p}");
    }
    let _ = writeln!(t, "Stato / State: {} ({})", state_it(&row.state), row.state);
    if let Some(i) = &row.identificativo {
        let _ = writeln!(t, "Identificativo PEC: {i}");
    }
    if let Some(e) = &row.error {
        let _ = writeln!(t, "Errore / Error: {e}");
    }
    let _ = writeln!(t, "\nDestinatari / Recipients:");
    for r in &d.recipients {
        let field = match r.field {
            crate::store::Field::To => "to",
            crate::store::Field::Cc => "cc",
        };
        let _ = writeln!(
            t,
            "  {} ({field}): {} ({}){}",
            r.address,
            recipient_state_it(&r.state),
            r.state,
            r.detail
                .as_deref()
                .map(|x| format!(" - {x}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(t, "\nAggiornato / Updated: {}", ts(now));
    // Status files are derived from the store (rewritten at every change):
    // atomic, but not fsync'd.
    write_atomic(&dir.join("status.txt"), t.as_bytes(), 0o640)?;
    let json = serde_json::json!({
        "dispatch_id": row.id,
        "state": row.state,
        "subject": row.subject,
        "protocol": row.protocol,
        "identificativo": row.identificativo,
        "error": row.error,
        "recipients": d.recipients.iter().map(|r| serde_json::json!({
            "address": r.address,
            "field": match r.field { crate::store::Field::To => "to", crate::store::Field::Cc => "cc" },
            "certified": r.certified,
            "state": r.state,
            "detail": r.detail,
        })).collect::<Vec<_>>(),
        "attempts": d.attempts.iter().map(|a| serde_json::json!({
            "n": a.n, "message_id": a.message_id, "state": a.state, "smtp_reply": a.smtp_reply,
        })).collect::<Vec<_>>(),
        "updated_at": ts(now),
    });
    let bytes = serde_json::to_vec_pretty(&json).unwrap_or_default();
    write_atomic(&dir.join("status.json"), &bytes, 0o640)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_of_intake_is_rome_time() {
        // 2026-01-31T23:30:00Z is already February in Rome (+01:00).
        let t: Timestamp = "2026-01-31T23:30:00Z".parse().unwrap();
        let f = folder(Path::new("/s"), t, "01ABC");
        assert_eq!(f, Path::new("/s/2026/02/01ABC"));
    }
}
