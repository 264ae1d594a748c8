//! `pecgate status`: is pecgate healthy, per mailbox, at a glance.
//!
//! Read-only: the database is opened with [`Db::open_read_only`] (safe while the
//! daemon runs) and the outbox folders are only listed. Per mailbox: letters per
//! dispatch state, stale letters (a certified recipient with neither delivery nor
//! failure `[deadlines] delivery_hours` after the acceptance: the rule of
//! [`crate::pec::policy::stale_recipients`]), letters overdue for their acceptance,
//! uncertain letters, quarantined messages and orphan receipts, the last IMAP sync,
//! the outbox backlog and the mailbox quota when the server reported it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::config::Config;
use crate::ingest::dispatch_from_store;
use crate::outbox::intake::{PROCESSING_DIR, REJECTED_DIR, is_ignored};
use crate::pec::policy::Due;
use crate::sent::ts;
use crate::store::{DISPATCH_STATES, Db, DeadlineCutoffs};

/// A letter with recipients overdue for their delivery receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleLetter {
    /// The letter.
    pub dispatch_id: String,
    /// When the provider accepted it.
    pub accepted_at: Option<String>,
    /// The stale recipients.
    pub recipients: Vec<String>,
}

/// The outbox backlog of one mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// Envelopes (`NAME.toml`) waiting in the outbox folder (a mass mailing counts
    /// once); `None` when the folder cannot be read.
    pub waiting: Option<u64>,
    /// Letters claimed and being taken in (`.processing/`).
    pub processing: Option<u64>,
    /// Letters refused and waiting for a clerk (`rejected/`).
    pub rejected: Option<u64>,
    /// Letters recorded and waiting for their SMTP turn (`queued`).
    pub queued: u64,
}

/// The mailbox quota, as the IMAP server last reported it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quota {
    /// Bytes used.
    pub used: u64,
    /// Bytes allowed.
    pub limit: u64,
    /// `used / limit` in percent (one decimal).
    pub percent: f64,
}

/// One mailbox's status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MailboxStatus {
    /// The short name.
    pub name: String,
    /// The certified address (`None` for a mailbox found only in the database).
    pub address: Option<String>,
    /// Letters per dispatch state (every state, zeros included).
    pub states: BTreeMap<String, u64>,
    /// All letters.
    pub letters: u64,
    /// Letters with stale recipients.
    pub stale: Vec<StaleLetter>,
    /// Submitted letters with no acceptance within `[deadlines] acceptance_minutes`.
    pub acceptance_overdue: Vec<String>,
    /// Letters whose submission outcome is unknown (`pecgate resolve` decides).
    pub uncertain: Vec<String>,
    /// Messages whose signature or content failed the checks (kept aside).
    pub quarantined: u64,
    /// Receipts for letters pecgate did not send.
    pub orphans: u64,
    /// When the last IMAP synchronisation finished.
    pub last_sync_at: Option<String>,
    /// Why the mailbox is suspended, when it is.
    pub suspended: Option<String>,
    /// What waits to be sent.
    pub backlog: Backlog,
    /// The quota, if the server reported one.
    pub quota: Option<Quota>,
}

/// The whole status (`--json` prints this object).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// When it was taken.
    pub at: String,
    /// The database file.
    pub database: String,
    /// Its schema version.
    pub schema_version: u32,
    /// Configured mailboxes by name, then any other the database knows.
    pub mailboxes: Vec<MailboxStatus>,
}

/// Collects the status at `now` (blocking: reads the store and the outbox folders).
///
/// # Errors
///
/// Store failures; a stored state the core cannot read.
pub fn collect(config: &Config, db: &Db, now: Timestamp) -> anyhow::Result<Status> {
    let rules = config.deadlines.rules();
    let mut names: Vec<String> = config.mailboxes.keys().cloned().collect();
    let counts = db.state_counts()?;
    let receipts = db.receipt_counts()?;
    let states = db.mailbox_states()?;
    for extra in counts
        .iter()
        .map(|c| &c.mailbox)
        .chain(receipts.iter().map(|r| &r.mailbox))
    {
        if !names.contains(extra) {
            names.push(extra.clone());
        }
    }
    let before = |d: SignedDuration| now.checked_sub(d).unwrap_or(now);
    let cut = DeadlineCutoffs {
        submitted_before: before(rules.acceptance),
        uncertain_before: before(rules.uncertain_grace),
        accepted_before: before(rules.delivery),
    };
    let mut mailboxes = Vec::new();
    for name in names {
        let cfg = config.mailboxes.get(&name);
        let mut by_state: BTreeMap<String, u64> = DISPATCH_STATES
            .iter()
            .map(|s| ((*s).to_owned(), 0))
            .collect();
        for c in counts.iter().filter(|c| c.mailbox == name) {
            *by_state.entry(c.state.clone()).or_default() += c.count;
        }
        let mut stale = Vec::new();
        let mut acceptance_overdue = Vec::new();
        for id in db.deadline_candidates(&name, &cut)? {
            let Some(detail) = db.get(&id)? else { continue };
            let events = db.events_for(&id)?;
            let d = dispatch_from_store(&detail, &events)
                .map_err(|e| anyhow::anyhow!("dispatch {id}: {e}"))?;
            let mut recipients = Vec::new();
            for due in rules.due(&d, now) {
                match due {
                    Due::Stale { address } => recipients.push(address.to_owned()),
                    Due::AcceptanceOverdue { .. } => acceptance_overdue.push(id.clone()),
                    Due::GraceExpired => {}
                }
            }
            if !recipients.is_empty() {
                stale.push(StaleLetter {
                    dispatch_id: id.clone(),
                    accepted_at: d.accepted_at.map(ts),
                    recipients,
                });
            }
        }
        let receipt = |disp: &str| {
            receipts
                .iter()
                .filter(|r| r.mailbox == name && r.disposition == disp)
                .map(|r| r.count)
                .sum()
        };
        let st = states.iter().find(|s| s.mailbox == name);
        let quota = st.and_then(|s| match (s.quota_used, s.quota_limit) {
            (Some(used), Some(limit)) if limit > 0 => Some(Quota {
                used,
                limit,
                percent: percent(used, limit),
            }),
            _ => None,
        });
        let backlog = Backlog {
            queued: by_state.get("queued").copied().unwrap_or(0),
            ..cfg.map(|c| outbox_backlog(&c.outbox)).unwrap_or_default()
        };
        mailboxes.push(MailboxStatus {
            address: cfg.map(|c| c.address.clone()),
            letters: by_state.values().sum(),
            states: by_state,
            stale,
            acceptance_overdue,
            uncertain: db.ids_in_state(&name, "uncertain")?,
            quarantined: receipt("quarantined"),
            orphans: receipt("orphan"),
            last_sync_at: st.and_then(|s| s.last_sync_at).map(ts),
            suspended: st.and_then(|s| s.suspended_reason.clone()),
            backlog,
            quota,
            name,
        });
    }
    Ok(Status {
        at: ts(now),
        database: db.path().to_owned(),
        schema_version: db.schema_version()?,
        mailboxes,
    })
}

fn percent(used: u64, limit: u64) -> f64 {
    // Tenths of a percent, in integers, then one division.
    let tenths = u128::from(used) * 1000 / u128::from(limit.max(1));
    #[allow(clippy::cast_precision_loss)]
    let t = u64::try_from(tenths).unwrap_or(u64::MAX) as f64;
    t / 10.0
}

/// Counts the outbox folder's waiting envelopes, claims and rejected letters.
fn outbox_backlog(outbox: &Path) -> Backlog {
    let count = |dir: &Path, keep: &dyn Fn(&std::fs::DirEntry) -> bool| -> Option<u64> {
        let rd = std::fs::read_dir(dir).ok()?;
        Some(rd.filter_map(Result::ok).filter(|e| keep(e)).count() as u64)
    };
    let is_envelope = |e: &std::fs::DirEntry| {
        let n = e.file_name();
        let b = n.as_encoded_bytes();
        !is_ignored(&n)
            && b.len() > 5
            && b[b.len() - 5..].eq_ignore_ascii_case(b".toml")
            && e.file_type().is_ok_and(|t| !t.is_dir())
    };
    let visible = |e: &std::fs::DirEntry| !is_ignored(&e.file_name());
    let processing = outbox.join(PROCESSING_DIR);
    let rejected = outbox.join(REJECTED_DIR);
    Backlog {
        waiting: count(outbox, &is_envelope),
        processing: if processing.is_dir() {
            count(&processing, &visible)
        } else {
            Some(0)
        },
        rejected: if rejected.is_dir() {
            count(&rejected, &visible)
        } else {
            Some(0)
        },
        queued: 0,
    }
}

/// The readable status.
pub fn render_human(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "pecgate status at {} ({})", s.at, s.database);
    for m in &s.mailboxes {
        let _ = writeln!(o);
        match &m.address {
            Some(a) => {
                let _ = writeln!(o, "mailbox {} <{a}>", m.name);
            }
            None => {
                let _ = writeln!(o, "mailbox {} (not in the configuration)", m.name);
            }
        }
        let states: Vec<String> = m
            .states
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        let _ = writeln!(
            o,
            "  letters:             {}{}",
            m.letters,
            if states.is_empty() {
                String::new()
            } else {
                format!(" ({})", states.join(", "))
            }
        );
        let ids = |v: &[String]| {
            if v.is_empty() {
                "0".to_owned()
            } else {
                format!("{}: {}", v.len(), v.join(" "))
            }
        };
        let stale_ids: Vec<String> = m.stale.iter().map(|l| l.dispatch_id.clone()).collect();
        let _ = writeln!(o, "  stale:               {}", ids(&stale_ids));
        let _ = writeln!(o, "  acceptance overdue:  {}", ids(&m.acceptance_overdue));
        let _ = writeln!(o, "  uncertain:           {}", ids(&m.uncertain));
        let _ = writeln!(o, "  quarantined:         {}", m.quarantined);
        let _ = writeln!(o, "  orphan receipts:     {}", m.orphans);
        let _ = writeln!(
            o,
            "  last IMAP sync:      {}",
            m.last_sync_at.as_deref().unwrap_or("never")
        );
        if let Some(why) = &m.suspended {
            let _ = writeln!(o, "  SUSPENDED:           {why}");
        }
        let n = |v: Option<u64>| v.map_or("?".to_owned(), |n| n.to_string());
        let _ = writeln!(
            o,
            "  outbox backlog:      {} waiting, {} being taken in, {} queued to send, {} rejected",
            n(m.backlog.waiting),
            n(m.backlog.processing),
            m.backlog.queued,
            n(m.backlog.rejected)
        );
        match &m.quota {
            Some(q) => {
                let _ = writeln!(
                    o,
                    "  quota:               {:.1}% ({} of {} bytes)",
                    q.percent, q.used, q.limit
                );
            }
            None => {
                let _ = writeln!(o, "  quota:               unknown");
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_has_one_decimal() {
        assert_eq!(percent(1, 3), 33.3);
        assert_eq!(percent(0, 10), 0.0);
        assert_eq!(percent(10, 10), 100.0);
        assert!(percent(u64::MAX, 1) > 100.0);
    }
}
