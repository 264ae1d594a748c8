//! Classification of a message by its top-level headers only.
//!
//! Only the top-level headers count: a person cannot forge a top-level
//! `X-Ricevuta`, because everything a person writes reaches a certified
//! mailbox wrapped in a transport or anomaly envelope (SPEC.md §2.9). The
//! subject is never used. Header names and values compare
//! case-insensitively; folded and RFC 2047-encoded values are decoded by
//! mail-parser before use.

use std::sync::LazyLock;

use mail_parser::{HeaderName, HeaderValue, Message, MessageParser};
use serde::Serialize;

use super::ids::normalize_message_id;
use super::kind::Kind;
use super::wire;

/// What the top-level headers say about a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classification {
    /// The PEC kind.
    pub kind: Kind,
    /// The raw `X-Ricevuta` value (trimmed), if present.
    pub x_ricevuta: Option<String>,
    /// The raw `X-Trasporto` value (trimmed), if present.
    pub x_trasporto: Option<String>,
    /// `X-Riferimento-Message-ID`, normalised (no brackets).
    pub refers_to: Option<String>,
    /// `X-TipoRicevuta` (any case), trimmed and lower-cased.
    pub tipo_ricevuta: Option<String>,
    /// `X-VerificaSicurezza: errore` is present (virus notices).
    pub virus: bool,
}

/// The one mail parser configuration of the crate: the usual structured
/// headers, plus the PEC headers as unstructured text (unfolded and RFC 2047
/// decoded; mail-parser's default keeps unknown headers raw).
pub fn parser() -> &'static MessageParser {
    static PARSER: LazyLock<MessageParser> = LazyLock::new(|| {
        let mut p = MessageParser::new()
            .with_mime_headers()
            .with_date_headers()
            .with_address_headers()
            .with_message_ids()
            .header_text(HeaderName::Subject)
            .header_text(HeaderName::Comments);
        for h in [
            wire::H_RICEVUTA,
            wire::H_TRASPORTO,
            wire::H_RIFERIMENTO,
            wire::H_TIPO_RICEVUTA,
            wire::H_VERIFICA_SICUREZZA,
            wire::H_MITTENTE,
        ] {
            p = p.header_text(HeaderName::Other(h.into()));
        }
        p.default_header_raw()
    });
    &PARSER
}

/// Classifies a raw RFC 5322 message by its top-level headers.
///
/// Returns `None` when the bytes do not look like a mail message at all
/// (no header could be parsed).
pub fn classify(raw: &[u8]) -> Option<Classification> {
    let msg = parser().parse_headers(raw)?;
    looks_like_mail(&msg).then(|| classify_message(&msg))
}

/// Whether parsed bytes look like a mail message: mail-parser accepts
/// almost any text, so at least one header that every message (or every
/// PEC message) has must be present.
pub fn looks_like_mail(msg: &Message<'_>) -> bool {
    const MAIL_HEADERS: &[&str] = &[
        "from",
        "to",
        "date",
        "subject",
        "message-id",
        "content-type",
        "mime-version",
        "received",
        "return-path",
        wire::H_RICEVUTA,
        wire::H_TRASPORTO,
    ];
    msg.headers().iter().any(|h| {
        let name = h.name();
        MAIL_HEADERS.iter().any(|m| m.eq_ignore_ascii_case(name))
    })
}

/// Classifies an already parsed message by its top-level headers.
pub fn classify_message(msg: &Message<'_>) -> Classification {
    let x_ricevuta = top_header_text(msg, wire::H_RICEVUTA);
    let x_trasporto = top_header_text(msg, wire::H_TRASPORTO);
    let kind = match (&x_ricevuta, &x_trasporto) {
        (Some(r), _) => Kind::from_ricevuta(r),
        (None, Some(t)) if t.eq_ignore_ascii_case(wire::POSTA_CERTIFICATA) => Kind::Transport,
        (None, Some(t)) if t.eq_ignore_ascii_case(wire::TRASPORTO_ERRORE) => Kind::Anomaly,
        (None, Some(t)) => Kind::Unknown(t.clone()),
        (None, None) => Kind::NotPec,
    };
    Classification {
        kind,
        refers_to: top_header_text(msg, wire::H_RIFERIMENTO)
            .as_deref()
            .and_then(normalize_message_id),
        tipo_ricevuta: top_header_text(msg, wire::H_TIPO_RICEVUTA).map(|v| v.to_ascii_lowercase()),
        virus: top_header_text(msg, wire::H_VERIFICA_SICUREZZA)
            .is_some_and(|v| v.eq_ignore_ascii_case(wire::TRASPORTO_ERRORE)),
        x_ricevuta,
        x_trasporto,
    }
}

/// The decoded, unfolded, trimmed text of the first top-level header with
/// this name (case-insensitive). Empty values count as absent.
pub fn top_header_text(msg: &Message<'_>, name: &str) -> Option<String> {
    let header = msg
        .headers()
        .iter()
        .find(|h| h.name().eq_ignore_ascii_case(name))?;
    let text = match header.value() {
        HeaderValue::Text(t) => t.to_string(),
        HeaderValue::TextList(list) => list.join(" "),
        _ => {
            // A header mail-parser typed differently (e.g. an address list):
            // fall back to the raw bytes of the field.
            let raw = msg.raw_message();
            let (s, e) = (header.offset_start() as usize, header.offset_end() as usize);
            let bytes = raw.get(s..e)?;
            unfold(&String::from_utf8_lossy(bytes))
        }
    };
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

fn unfold(s: &str) -> String {
    s.split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(headers: &str) -> Kind {
        let raw = format!("{headers}\r\n\r\nbody\r\n");
        classify(raw.as_bytes()).expect("parses").kind
    }

    #[test]
    fn classifies_by_top_level_headers() {
        assert_eq!(kind_of("X-Ricevuta: accettazione"), Kind::Acceptance);
        assert_eq!(kind_of("x-ricevuta:   AVVENUTA-CONSEGNA  "), Kind::Delivery);
        assert_eq!(kind_of("X-RICEVUTA: errore-consegna"), Kind::DeliveryError);
        assert_eq!(
            kind_of("X-Ricevuta:\r\n preavviso-errore-consegna"),
            Kind::DeliveryTimeout
        );
        assert_eq!(kind_of("X-Trasporto: posta-certificata"), Kind::Transport);
        assert_eq!(kind_of("X-Trasporto: Errore"), Kind::Anomaly);
        assert_eq!(kind_of("Subject: ACCETTAZIONE: x"), Kind::NotPec);
        assert_eq!(
            kind_of("X-Ricevuta: mancata-consegna"),
            Kind::Unknown("mancata-consegna".into())
        );
    }

    #[test]
    fn x_ricevuta_wins_over_x_trasporto() {
        assert_eq!(
            kind_of("X-Trasporto: posta-certificata\r\nX-Ricevuta: non-accettazione"),
            Kind::NonAcceptance
        );
    }

    #[test]
    fn subject_is_never_used() {
        assert_eq!(
            kind_of("Subject: POSTA CERTIFICATA: hello\r\nFrom: a@b.it"),
            Kind::NotPec
        );
    }

    #[test]
    fn extracts_reference_and_flags() {
        let raw = b"X-Ricevuta: errore-consegna\r\nX-VerificaSicurezza: errore\r\n\
X-Riferimento-Message-ID:\r\n <abc.1@gw.example.it>\r\nX-Tiporicevuta: Breve\r\n\r\n";
        let c = classify(raw).unwrap();
        assert!(c.virus);
        assert_eq!(c.refers_to.as_deref(), Some("abc.1@gw.example.it"));
        assert_eq!(c.tipo_ricevuta.as_deref(), Some("breve"));
    }

    #[test]
    fn encoded_header_values_are_decoded() {
        let raw = b"X-Ricevuta: =?utf-8?q?accettazione?=\r\n\r\n";
        assert_eq!(classify(raw).unwrap().kind, Kind::Acceptance);
    }

    #[test]
    fn garbage_is_not_a_message() {
        assert!(classify(b"").is_none());
        assert!(classify(b"\x00\x01\x02binary").is_none());
        assert!(classify(b"   Apache License\n  Version 2.0, January 2004\n").is_none());
        assert!(classify(b"Note: this is text\n\nmore").is_none());
    }
}
