//! `pecgate show` (a letter's timeline: every event and receipt with its
//! verdict) and `pecgate resolve` (an operator's decision about an
//! `uncertain` letter). Both open the store directly: SQLite's locking makes
//! a write from this process safe while the daemon runs, and
//! [`crate::inbound::decide`] re-checks the letter's state inside its
//! transaction.

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use jiff::Timestamp;
use serde_json::{Value, json};

use crate::config::Config;
use crate::inbound::{self, DecideError};
use crate::ingest::dispatch_from_store;
use crate::pec::policy;
use crate::pec::state::Event;
use crate::sent::ts;
use crate::store::{Db, DispatchDetail, EventRow, ReceiptRow};

/// One letter with everything `show` prints.
#[derive(Debug)]
pub struct Timeline {
    /// The letter.
    pub detail: DispatchDetail,
    /// Its events, oldest first.
    pub events: Vec<EventRow>,
    /// Its receipts, oldest first.
    pub receipts: Vec<ReceiptRow>,
    /// Certified recipients flagged stale at the time of the query.
    pub stale: Vec<String>,
}

/// The timelines of every letter `key` names (a dispatch id, the
/// Message-ID of any attempt, a protocol number or the identificativo).
///
/// # Errors
/// Store failures, in words.
pub fn timelines(
    db: &Db,
    config: &Config,
    key: &str,
    now: Timestamp,
) -> Result<Vec<Timeline>, String> {
    let rules = config.deadlines.rules();
    let mut out = Vec::new();
    for row in db.find(key.trim()).map_err(|e| e.to_string())? {
        let Some(detail) = db.get(&row.id).map_err(|e| e.to_string())? else {
            continue;
        };
        let events = db.events_for(&row.id).map_err(|e| e.to_string())?;
        let receipts = db.receipts_for(&row.id).map_err(|e| e.to_string())?;
        let stale = dispatch_from_store(&detail, &events)
            .map(|d| {
                policy::stale_recipients(&d, now, rules.delivery)
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        out.push(Timeline {
            detail,
            events,
            receipts,
            stale,
        });
    }
    Ok(out)
}

/// The JSON form of a timeline (`pecgate show --json`).
pub fn timeline_json(t: &Timeline) -> Value {
    let mut v = crate::cli::list_json(&t.detail);
    v["stale"] = json!(t.stale);
    v["error"] = json!(t.detail.dispatch.error);
    v["attempts"] = t
        .detail
        .attempts
        .iter()
        .map(|a| {
            json!({"n": a.n, "message_id": a.message_id, "state": a.state,
                "started_at": ts(a.started_at), "finished_at": a.finished_at.map(ts),
                "smtp_reply": a.smtp_reply, "eml_sha256": a.eml_sha256})
        })
        .collect();
    v["events"] = t
        .events
        .iter()
        .map(|e| {
            json!({"seq": e.seq, "at": ts(e.at), "event": e.event, "cause": e.cause,
                "detail": serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null)})
        })
        .collect();
    v["receipts"] = t
        .receipts
        .iter()
        .map(|r| {
            let r = &r.receipt;
            json!({"at": ts(r.created_at), "kind": r.kind, "verdict": r.verdict,
                "reason": r.reason, "recipient": r.recipient, "disposition": r.disposition,
                "identificativo": r.identificativo, "msgid": r.msgid,
                "message_sha256": r.message_sha256})
        })
        .collect();
    v
}

/// The human form of a timeline.
fn write_human(out: &mut impl Write, t: &Timeline) -> io::Result<()> {
    let d = &t.detail.dispatch;
    writeln!(out, "letter     {}", d.id)?;
    writeln!(out, "mailbox    {}", d.mailbox)?;
    writeln!(out, "state      {}", d.state)?;
    writeln!(out, "subject    {}", d.subject)?;
    writeln!(
        out,
        "kind       {}   protocol {}   reference {}",
        d.kind,
        d.protocol.as_deref().unwrap_or("-"),
        d.reference.as_deref().unwrap_or("-")
    )?;
    if let Some(i) = &d.identificativo {
        writeln!(out, "identificativo {i}")?;
    }
    if let Some(e) = &d.error {
        writeln!(out, "error      {e}")?;
    }
    writeln!(out, "folder     {}", d.sent_dir)?;
    writeln!(out, "recipients")?;
    for r in &t.detail.recipients {
        let certified = match r.certified {
            Some(true) => "certified",
            Some(false) => "not PEC",
            None => "?",
        };
        let stale = if t.stale.iter().any(|s| s.eq_ignore_ascii_case(&r.address)) {
            "  STALE"
        } else {
            ""
        };
        writeln!(
            out,
            "  {:<40} {:<3} {:<10} {:<10}{}{}",
            r.address,
            match r.field {
                crate::store::Field::To => "to",
                crate::store::Field::Cc => "cc",
            },
            certified,
            r.state,
            r.detail
                .as_deref()
                .map(|x| format!("  {x}"))
                .unwrap_or_default(),
            stale
        )?;
    }
    writeln!(out, "timeline")?;
    // Events and receipts merged by time (receipts after the events of the
    // same second: the event is what the receipt caused).
    let mut lines: Vec<(Timestamp, u8, String)> = Vec::new();
    for e in &t.events {
        // A receipt's cause is `receipt:<sha256>`: the first 12 digits name it.
        let cause = match e.cause.strip_prefix("receipt:") {
            Some(sha) => format!("receipt:{}", sha.get(..12).unwrap_or(sha)),
            None => e.cause.clone(),
        };
        lines.push((
            e.at,
            0,
            format!("{:<28} {:<20} {}", e.event, cause, short_detail(&e.detail)),
        ));
    }
    for r in &t.receipts {
        let r = &r.receipt;
        lines.push((
            r.created_at,
            1,
            format!(
                "{:<28} {:<20} verdict {} (message {}){}{}",
                format!("receipt {}", r.kind),
                r.disposition,
                r.verdict,
                r.message_sha256.get(..12).unwrap_or(&r.message_sha256),
                r.recipient
                    .as_deref()
                    .map(|x| format!("  recipient {x}"))
                    .unwrap_or_default(),
                r.reason
                    .as_deref()
                    .map(|x| format!("  ({x})"))
                    .unwrap_or_default()
            ),
        ));
    }
    lines.sort_by_key(|l| (l.0, l.1));
    for (at, _, text) in lines {
        writeln!(out, "  {}  {text}", ts(at))?;
    }
    Ok(())
}

/// The interesting keys of an event's detail, on one line.
fn short_detail(detail: &str) -> String {
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(detail) else {
        return String::new();
    };
    let keys = [
        "from",
        "to",
        "recipient",
        "message_id",
        "identificativo",
        "smtp_reply",
        "error",
        "kind",
        "detail",
        "reason",
    ];
    keys.iter()
        .filter_map(|k| match m.get(*k) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(format!("{k}={s}")),
            Some(v) => Some(format!("{k}={v}")),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `pecgate show KEY [--json]`: exit 0 when found, 1 when nothing
/// matches.
///
/// # Errors
/// Configuration or store failures.
pub fn run_show(config: Option<&Path>, key: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let (config, _) = Config::load(config)?;
    if !config.store.database.exists() {
        eprintln!(
            "pecgate show: no database yet at {} (the daemon creates it)",
            config.store.database.display()
        );
        return Ok(ExitCode::from(1));
    }
    let db = Db::open_read_only(&config.store.database)?;
    let found = timelines(&db, &config, key, Timestamp::now()).map_err(anyhow::Error::msg)?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    if found.is_empty() {
        eprintln!(
            "pecgate show: no letter matches {key:?} (dispatch id, Message-ID, protocol number or identificativo)"
        );
        return Ok(ExitCode::from(1));
    }
    for (i, t) in found.iter().enumerate() {
        if as_json {
            writeln!(out, "{}", timeline_json(t))?;
        } else {
            if i > 0 {
                writeln!(out)?;
            }
            write_human(&mut out, t)?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// What the operator decided about an uncertain letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Send it again with a new Message-ID.
    Resend,
    /// Declare it sent (the operator checked the provider's webmail).
    MarkSent,
}

/// Runs `pecgate resolve ID --resend|--mark-sent`: exit 0 when applied, 1
/// when the letter is not uncertain (or a receipt proves it was sent).
///
/// # Errors
/// Configuration or store failures.
pub fn run_resolve(
    config: Option<&Path>,
    dispatch_id: &str,
    what: Resolution,
) -> anyhow::Result<ExitCode> {
    let (config, _) = Config::load(config)?;
    let mut db = Db::open(&config.store.database)?;
    let id = crate::store::canonical_dispatch_id(dispatch_id.trim())
        .unwrap_or_else(|| dispatch_id.trim().to_owned());
    let (ev, cause) = match what {
        Resolution::Resend => (Event::ResolveResend, "operator.resend"),
        Resolution::MarkSent => (Event::ResolveMarkSent, "operator.mark_sent"),
    };
    match inbound::decide(&mut db, &id, &ev, cause, Timestamp::now()) {
        Ok(o) => {
            let state = o.dispatch.state.as_str();
            tracing::info!(
                { crate::telemetry::field::EVENT } = crate::telemetry::event::DISPATCH_RESOLVED,
                { crate::telemetry::field::DISPATCH_ID } = %id,
                decision = cause,
                state,
                "operator decision recorded"
            );
            println!(
                "{id}: {state} ({})",
                match what {
                    Resolution::Resend =>
                        "it will be sent again with a new Message-ID by the running daemon",
                    Resolution::MarkSent => "recorded as submitted; receipts will complete it",
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(DecideError::NotFound(_)) => {
            eprintln!("pecgate resolve: no letter with id {id}");
            Ok(ExitCode::from(1))
        }
        Err(DecideError::Rejected(why)) => {
            eprintln!("pecgate resolve: {id}: not changed: {why}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(anyhow::anyhow!("{id}: {e}")),
    }
}
