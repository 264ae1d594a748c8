//! What a message is and what it certifies, with every inconsistency
//! between its parts reported as a problem (never as a panic).
//!
//! This is the pure part of `pecgate inspect` and the first step of
//! `verify` and of the ingest path.

use serde::Serialize;

use super::daticert::{Daticert, DaticertError};
use super::envelope::{NotAMessage, PecMessage};
use super::ids::{normalize_message_id, same_address};
use super::kind::Kind;

/// The outcome of inspecting one message.
#[derive(Debug, Clone)]
pub struct Inspection<'a> {
    /// The message taken apart.
    pub message: PecMessage<'a>,
    /// The parsed certification data, when present and well formed.
    pub daticert: Option<Daticert>,
    /// Why the daticert could not be parsed, when it could not.
    pub daticert_error: Option<DaticertError>,
    /// Human-readable problems (structure, daticert, consistency).
    pub problems: Vec<String>,
}

/// The machine-readable summary printed by `pecgate inspect --json`
/// (without the `file` key, which the caller adds).
#[derive(Debug, Clone, Serialize)]
pub struct Summary<'i> {
    /// The PEC classification.
    pub kind: &'i Kind,
    /// The raw `X-Ricevuta` value.
    pub x_ricevuta: Option<&'i str>,
    /// `X-Riferimento-Message-ID`, without brackets.
    pub refers_to: Option<&'i str>,
    /// The certification data.
    pub daticert: Option<&'i Daticert>,
    /// Problems found.
    pub problems: &'i [String],
}

/// Inspects a raw message.
///
/// # Errors
/// [`NotAMessage`] when the bytes are not a mail message at all.
pub fn inspect(raw: &[u8]) -> Result<Inspection<'_>, NotAMessage> {
    let message = PecMessage::parse(raw)?;
    let mut problems = message.problems.clone();
    let (daticert, daticert_error) = match &message.daticert_xml {
        Some(xml) => match Daticert::parse(xml) {
            Ok(d) => (Some(d), None),
            Err(e) => {
                problems.push(format!("daticert malformed: {e}"));
                (None, Some(e))
            }
        },
        None => (None, None),
    };
    check_consistency(
        &message,
        daticert.as_ref(),
        daticert_error.is_some(),
        &mut problems,
    );
    Ok(Inspection {
        message,
        daticert,
        daticert_error,
        problems,
    })
}

impl Inspection<'_> {
    /// The JSON summary of this inspection.
    pub fn summary(&self) -> Summary<'_> {
        let c = &self.message.classification;
        Summary {
            kind: &c.kind,
            x_ricevuta: c.x_ricevuta.as_deref(),
            refers_to: c.refers_to.as_deref(),
            daticert: self.daticert.as_ref(),
            problems: &self.problems,
        }
    }

    /// The PEC kind.
    pub fn kind(&self) -> &Kind {
        &self.message.classification.kind
    }
}

/// The cross-checks between headers, structure and daticert (SPEC.md §2.9,
/// §3.2, §3.4).
fn check_consistency(
    m: &PecMessage<'_>,
    daticert: Option<&Daticert>,
    daticert_malformed: bool,
    problems: &mut Vec<String>,
) {
    let kind = &m.classification.kind;
    match kind {
        Kind::NotPec => return,
        Kind::Unknown(raw) => {
            problems.push(format!("unknown PEC message type \"{raw}\""));
        }
        _ => {}
    }
    if *kind == Kind::Anomaly {
        // An anomaly envelope carries no certification data.
        if m.daticert_xml.is_some() {
            problems.push("anomaly envelope carries a daticert.xml".to_owned());
        }
        if m.postacert.is_none() {
            problems.push("anomaly envelope without the wrapped message".to_owned());
        }
        return;
    }
    let Some(d) = daticert else {
        if m.daticert_xml.is_none() && !daticert_malformed {
            problems.push(format!("{kind} without daticert.xml"));
        }
        return;
    };
    match d.kind() {
        Some(dk) if dk == *kind => {}
        Some(dk) => problems.push(format!("header says {kind} but daticert says {dk}")),
        None => problems.push(format!(
            "header says {kind} but daticert says unknown type \"{}\"",
            d.tipo
        )),
    }
    match (&m.classification.refers_to, &d.msgid) {
        (Some(h), Some(x)) if normalize_message_id(h) != normalize_message_id(x) => {
            problems.push(format!(
                "X-Riferimento-Message-ID <{h}> differs from daticert msgid <{x}>"
            ));
        }
        _ => {}
    }
    let needs_consegna = matches!(
        kind,
        Kind::Delivery | Kind::DeliveryError | Kind::DeliveryTimeout | Kind::VirusDetected
    );
    if needs_consegna && d.consegna.is_none() {
        problems.push(format!("{kind}: daticert has no <consegna>"));
    }
    if let Some(c) = &d.consegna
        && !d.destinatari.iter().any(|x| same_address(&x.address, c))
    {
        problems.push(format!(
            "daticert consegna {c} is not among its destinatari"
        ));
    }
    if *kind == Kind::Transport && m.postacert.is_none() {
        problems.push("transport envelope without postacert.eml".to_owned());
    }
    if matches!(kind, Kind::NonAcceptance | Kind::Acceptance) && m.postacert.is_some() {
        problems.push(format!("{kind} must not carry the original message"));
    }
}
