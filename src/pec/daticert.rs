//! The certification data (`daticert.xml`) that a PEC provider attaches to
//! every envelope, receipt and notice, parsed into a typed [`Daticert`].
//!
//! The grammar is the DTD of the technical rules (RFC 6109 §4.4):
//! `postacert(@tipo, @errore)` holding `intestazione` (mittente,
//! destinatari+, risposte, oggetto?) and `dati` (gestore-emittente, data,
//! identificativo, msgid?, ricevuta?, consegna?, ricezione*, errore-esteso?).
//!
//! The parser is pure (no I/O, no clock) and deliberately lenient about
//! layout, because real files vary and anonymised ones are often damaged:
//!
//! * elements may come in any order; unknown elements and stray text are
//!   ignored; fields are found inside `intestazione` or `dati` (or directly
//!   under the root), whichever of the two holds them;
//! * only `postacert@tipo`, `data` (with `zona`, `giorno`, `ora`) and
//!   `identificativo` are required; everything else is optional;
//! * a single-valued element that appears twice is an error (the document
//!   would be ambiguous), as is a custom entity reference;
//! * text is trimmed, the predefined entities, character references and CDATA
//!   are decoded;
//! * UTF-8 (with or without BOM), UTF-16 with a BOM, and any ASCII-compatible
//!   encoding named in the XML declaration (ISO-8859-1, windows-1252, ...)
//!   are decoded before parsing;
//! * a DOCTYPE (even with an internal subset), processing instructions and
//!   comments are skipped: nothing is fetched and no declared entity is ever
//!   expanded;
//! * input is bounded ([`MAX_LEN`]) and the walk is iterative, so deep
//!   nesting cannot overflow the stack.

use std::borrow::Cow;

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::Offset;
use quick_xml::Reader;
use quick_xml::encoding::{DetectedEncoding, decode, detect_encoding};
use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::{BytesStart, Event};
use serde::Serialize;

use super::ids::normalize_message_id;
use super::kind::Kind;
use super::wire;

/// Largest `daticert.xml` accepted, in bytes (1 MiB). Real files are under
/// 2 KiB even with many recipients.
pub const MAX_LEN: usize = 1024 * 1024;

/// The certification data of one PEC document.
///
/// Text is trimmed; addresses are kept as written (not lower-cased).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Daticert {
    /// `postacert@tipo` as written, trimmed (e.g. `avvenuta-consegna`); see
    /// [`Daticert::kind`] for the typed value.
    pub tipo: String,
    /// `postacert@errore`, trimmed; `nessuno` when absent.
    pub errore: String,
    /// `mittente`: the original sender.
    pub mittente: Option<String>,
    /// Every `destinatari` (To and Cc of the original), in document order.
    pub destinatari: Vec<Destinatario>,
    /// `risposte`: the original Reply-To (or sender).
    pub risposte: Option<String>,
    /// `oggetto`: the original Subject.
    pub oggetto: Option<String>,
    /// `gestore-emittente`: free-text name of the provider that issued this
    /// document.
    pub gestore_emittente: Option<String>,
    /// `data` (local `giorno` + `ora` at offset `zona`) as an exact instant;
    /// serialised as RFC 3339 UTC with seconds precision
    /// (`2018-11-13T15:39:26Z`).
    #[serde(serialize_with = "serialize_seconds_utc")]
    pub data: Timestamp,
    /// `identificativo`: the PEC msgid of the transport envelope, as written
    /// (trimmed).
    pub identificativo: String,
    /// `msgid`: the original client Message-ID, normalised (no angle
    /// brackets); `None` when the original had none.
    pub msgid: Option<String>,
    /// `ricevuta@tipo`: the receipt flavour requested (`completa`, `breve`,
    /// `sintetica`), trimmed.
    pub ricevuta: Option<String>,
    /// `consegna`: the recipient this document is about.
    pub consegna: Option<String>,
    /// Every `ricezione`: the recipients covered by a presa-in-carico.
    pub ricezione: Vec<String>,
    /// `errore-esteso`: the provider's short error description.
    pub errore_esteso: Option<String>,
    /// The enhanced status code (RFC 3463) that `errore_esteso` starts with,
    /// e.g. `5.1.1` from `5.1.1 - ARUBA PEC S.p.A. - indirizzo non valido`.
    pub errore_code: Option<String>,
}

/// One `destinatari` element: an address and whether it is a PEC mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destinatario {
    /// The address as written (trimmed).
    pub address: String,
    /// `destinatari@tipo` as written, trimmed: `certificato` (the default
    /// when absent), `esterno`, or any other raw value.
    pub tipo: String,
}

impl Destinatario {
    /// True when the recipient is a PEC mailbox (`tipo` is `certificato`).
    pub fn is_certified(&self) -> bool {
        self.tipo.eq_ignore_ascii_case(wire::DEST_CERTIFICATO)
    }
}

/// Why a `daticert.xml` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DaticertError {
    /// The input is empty.
    #[error("daticert.xml: empty")]
    Empty,
    /// The input is larger than [`MAX_LEN`].
    #[error("daticert.xml: too large ({0} bytes, limit {MAX_LEN})")]
    TooLarge(usize),
    /// The XML declaration names an encoding that is not supported.
    #[error("daticert.xml: unsupported encoding \"{0}\"")]
    UnsupportedEncoding(String),
    /// The bytes are not valid in the document's encoding.
    #[error("daticert.xml: not valid {0}")]
    BadEncoding(String),
    /// The document is not well-formed XML (this includes truncation).
    #[error("daticert.xml: not well-formed at byte {position}: {reason}")]
    NotWellFormed {
        /// Byte offset (in the UTF-8 text) where the problem was found.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// A reference to an entity other than the five predefined ones (custom
    /// entities from a DOCTYPE are never expanded).
    #[error("daticert.xml: undefined entity &{name}; at byte {position}")]
    UndefinedEntity {
        /// The entity name.
        name: String,
        /// Byte offset (in the UTF-8 text) just after the reference.
        position: u64,
    },
    /// No element at all.
    #[error("daticert.xml: no root element")]
    NoRoot,
    /// The root element is not `postacert`.
    #[error("daticert.xml: root element is <{0}>, expected <postacert>")]
    WrongRoot(String),
    /// A required element is missing or empty.
    #[error("daticert.xml: missing <{0}>")]
    Missing(&'static str),
    /// A required attribute is missing or empty.
    #[error("daticert.xml: <{element}>: missing attribute {attribute}")]
    MissingAttribute {
        /// The element that should carry it.
        element: &'static str,
        /// The attribute name.
        attribute: &'static str,
    },
    /// A single-valued element appears more than once.
    #[error("daticert.xml: duplicate <{0}>")]
    Duplicate(&'static str),
    /// `data` lacks `giorno` or `ora`.
    #[error("daticert.xml: <data>: missing <{0}>")]
    MissingInData(&'static str),
    /// `giorno` or `ora` is not a valid `dd/mm/yyyy` / `hh:mm:ss`.
    #[error("daticert.xml: <data>: bad <{field}> \"{value}\"")]
    BadData {
        /// `giorno` or `ora`.
        field: &'static str,
        /// The value as written.
        value: String,
    },
    /// `data@zona` is not a `[+-]hhmm` offset.
    #[error("daticert.xml: <data>: bad zona \"{0}\"")]
    BadZona(String),
    /// The date, time and offset do not make a representable instant.
    #[error("daticert.xml: <data>: out of range \"{0}\"")]
    DataOutOfRange(String),
}

impl DaticertError {
    /// True when the bytes are not a readable XML document at all (size,
    /// encoding, syntax), as opposed to a readable document that lacks or
    /// garbles PEC data.
    pub fn is_malformed_xml(&self) -> bool {
        matches!(
            self,
            DaticertError::Empty
                | DaticertError::TooLarge(_)
                | DaticertError::UnsupportedEncoding(_)
                | DaticertError::BadEncoding(_)
                | DaticertError::NotWellFormed { .. }
                | DaticertError::UndefinedEntity { .. }
                | DaticertError::NoRoot
        )
    }
}

impl Daticert {
    /// Parses a `daticert.xml` document.
    ///
    /// Never panics and does no I/O; see the module documentation for what
    /// is accepted.
    pub fn parse(xml: &[u8]) -> Result<Daticert, DaticertError> {
        if xml.is_empty() {
            return Err(DaticertError::Empty);
        }
        if xml.len() > MAX_LEN {
            return Err(DaticertError::TooLarge(xml.len()));
        }
        let text = decode_input(xml)?;
        let builder = walk(&text)?;
        builder.finish()
    }

    /// The typed kind of this document, from `tipo`; `None` for a value the
    /// rules do not define.
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_daticert_tipo(&self.tipo)
    }

    /// True when `errore_code` is a permanent failure (class `5.`).
    pub fn is_final_error_code(&self) -> bool {
        self.errore_code
            .as_deref()
            .is_some_and(|c| c.starts_with("5."))
    }
}

fn serialize_seconds_utc<S: serde::Serializer>(ts: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&ts.strftime("%Y-%m-%dT%H:%M:%SZ"))
}

// ---------------------------------------------------------------------------
// Decoding

/// Turns the raw bytes into UTF-8 text, following the BOM or else the
/// encoding named in the XML declaration (UTF-8 when there is none).
fn decode_input(xml: &[u8]) -> Result<Cow<'_, str>, DaticertError> {
    match detect_encoding(xml) {
        Some(DetectedEncoding::Utf8Bom) => utf8(&xml[3..]),
        Some(
            d @ (DetectedEncoding::Utf16LeBom
            | DetectedEncoding::Utf16BeBom
            | DetectedEncoding::Utf16LeLike
            | DetectedEncoding::Utf16BeLike),
        ) => {
            let enc = d.encoding();
            decode(&xml[d.bom_len()..], enc)
                .map_err(|_| DaticertError::BadEncoding(enc.name().to_owned()))
        }
        Some(DetectedEncoding::AsciiCompatible) | None => {
            // Only the declaration is read here: it is ASCII in every
            // ASCII-compatible encoding.
            let mut reader = Reader::from_reader(xml);
            let Ok(Event::Decl(decl)) = reader.read_event() else {
                return utf8(xml);
            };
            let Some(Ok(label)) = decl.encoding() else {
                return utf8(xml);
            };
            let Some(enc) = decl.encoder() else {
                return Err(DaticertError::UnsupportedEncoding(truncated(&label)));
            };
            let name = enc.name();
            // A declaration saying UTF-16 on ASCII-compatible bytes is a lie
            // (the bytes were readable as ASCII); read them as UTF-8.
            if name == "UTF-8" || name.starts_with("UTF-16") {
                return utf8(xml);
            }
            decode(xml, enc).map_err(|_| DaticertError::BadEncoding(name.to_owned()))
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<Cow<'_, str>, DaticertError> {
    std::str::from_utf8(bytes)
        .map(Cow::Borrowed)
        .map_err(|e| DaticertError::BadEncoding(format!("UTF-8 at byte {}", e.valid_up_to())))
}

// ---------------------------------------------------------------------------
// Walking the tree

/// The single-valued text elements, with their wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Mittente,
    Risposte,
    Oggetto,
    GestoreEmittente,
    Identificativo,
    Msgid,
    Consegna,
    ErroreEsteso,
    Giorno,
    Ora,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Mittente => "mittente",
            Field::Risposte => "risposte",
            Field::Oggetto => "oggetto",
            Field::GestoreEmittente => "gestore-emittente",
            Field::Identificativo => "identificativo",
            Field::Msgid => "msgid",
            Field::Consegna => "consegna",
            Field::ErroreEsteso => "errore-esteso",
            Field::Giorno => "giorno",
            Field::Ora => "ora",
        }
    }

    /// A field that may appear in `intestazione` or `dati` (not `giorno` /
    /// `ora`, which belong to `data`).
    fn in_container(name: &str) -> Option<Field> {
        [
            Field::Mittente,
            Field::Risposte,
            Field::Oggetto,
            Field::GestoreEmittente,
            Field::Identificativo,
            Field::Msgid,
            Field::Consegna,
            Field::ErroreEsteso,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

/// What a text-collecting element feeds.
#[derive(Debug)]
enum Leaf {
    Single(Field),
    /// `destinatari`, with its `tipo` attribute.
    Destinatario(Option<String>),
    Ricezione,
}

/// One open element.
#[derive(Debug)]
enum Frame {
    Root,
    /// `intestazione` or `dati`.
    Container,
    Data,
    /// An element whose text is collected.
    Leaf(Leaf, String),
    /// Anything else: its content is ignored.
    Other,
}

/// Values collected so far; raw (trimmed) text, checked in [`Builder::finish`].
#[derive(Debug, Default)]
struct Builder {
    tipo: Option<String>,
    errore: Option<String>,
    mittente: Option<String>,
    destinatari: Vec<Destinatario>,
    risposte: Option<String>,
    oggetto: Option<String>,
    gestore_emittente: Option<String>,
    /// `Some(zona)` once a `data` element was seen (zona may be absent).
    data: Option<Option<String>>,
    giorno: Option<String>,
    ora: Option<String>,
    identificativo: Option<String>,
    msgid: Option<String>,
    ricevuta: Option<Option<String>>,
    consegna: Option<String>,
    ricezione: Vec<String>,
    errore_esteso: Option<String>,
}

fn walk(text: &str) -> Result<Builder, DaticertError> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut b = Builder::default();
    let mut seen_root = false;

    loop {
        let event = reader
            .read_event()
            .map_err(|e| DaticertError::NotWellFormed {
                position: reader.error_position(),
                reason: e.to_string(),
            })?;
        let position = reader.buffer_position();
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let empty = matches!(event, Event::Empty(_));
                if !seen_root {
                    let name = e.local_name();
                    if name.as_ref() != "postacert" {
                        return Err(DaticertError::WrongRoot(truncated(name.as_ref())));
                    }
                    seen_root = true;
                    b.tipo = attribute(e, "tipo", position)?;
                    b.errore = attribute(e, "errore", position)?;
                    if empty {
                        // `<postacert .../>`: nothing inside.
                        break;
                    }
                    stack.push(Frame::Root);
                } else {
                    let frame = open(e, stack.last(), &mut b, position)?;
                    if empty {
                        close(frame, &mut b)?;
                    } else {
                        stack.push(frame);
                    }
                }
            }
            Event::End(_) => {
                // quick-xml checks that end names match their start.
                match stack.pop() {
                    Some(Frame::Root) => break,
                    Some(frame) => close(frame, &mut b)?,
                    None => {
                        return Err(DaticertError::NotWellFormed {
                            position,
                            reason: "end tag without start".to_owned(),
                        });
                    }
                }
            }
            Event::Text(t) => push_text(&mut stack, &t.xml10_content()),
            Event::CData(t) => push_text(&mut stack, &t.xml10_content()),
            Event::GeneralRef(r) => {
                let ch = r
                    .resolve_char_ref()
                    .map_err(|e| DaticertError::NotWellFormed {
                        position,
                        reason: e.to_string(),
                    })?;
                match ch {
                    Some(c) => push_text(&mut stack, c.encode_utf8(&mut [0; 4])),
                    None => match resolve_xml_entity(r) {
                        Some(s) => push_text(&mut stack, s),
                        None => {
                            return Err(DaticertError::UndefinedEntity {
                                name: truncated(r.as_ref()),
                                position,
                            });
                        }
                    },
                }
            }
            Event::Eof => {
                if !seen_root {
                    return Err(DaticertError::NoRoot);
                }
                return Err(DaticertError::NotWellFormed {
                    position,
                    reason: "unexpected end of input".to_owned(),
                });
            }
            // Declaration, DOCTYPE, processing instructions and comments.
            Event::Decl(_) | Event::DocType(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    Ok(b)
}

/// At most 64 characters of an untrusted name, for error messages.
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Handles a start (or empty) element under `parent` and returns its frame.
fn open(
    e: &BytesStart<'_>,
    parent: Option<&Frame>,
    b: &mut Builder,
    position: u64,
) -> Result<Frame, DaticertError> {
    let local = e.local_name();
    let name = local.as_ref();
    let frame = match parent {
        Some(Frame::Root) if name == "intestazione" || name == "dati" => Frame::Container,
        Some(Frame::Root | Frame::Container) => match name {
            "destinatari" => Frame::Leaf(
                Leaf::Destinatario(attribute(e, "tipo", position)?),
                String::new(),
            ),
            "ricezione" => Frame::Leaf(Leaf::Ricezione, String::new()),
            "ricevuta" => {
                if b.ricevuta.is_some() {
                    return Err(DaticertError::Duplicate("ricevuta"));
                }
                b.ricevuta = Some(attribute(e, "tipo", position)?);
                Frame::Other
            }
            "data" => {
                if b.data.is_some() {
                    return Err(DaticertError::Duplicate("data"));
                }
                b.data = Some(attribute(e, "zona", position)?);
                Frame::Data
            }
            _ => match Field::in_container(name) {
                Some(f) => Frame::Leaf(Leaf::Single(f), String::new()),
                None => Frame::Other,
            },
        },
        Some(Frame::Data) => match name {
            "giorno" => Frame::Leaf(Leaf::Single(Field::Giorno), String::new()),
            "ora" => Frame::Leaf(Leaf::Single(Field::Ora), String::new()),
            _ => Frame::Other,
        },
        _ => Frame::Other,
    };
    Ok(frame)
}

/// Stores the value of a closed element.
fn close(frame: Frame, b: &mut Builder) -> Result<(), DaticertError> {
    let Frame::Leaf(leaf, text) = frame else {
        return Ok(());
    };
    let value = text.trim();
    match leaf {
        Leaf::Destinatario(tipo) => {
            if !value.is_empty() {
                b.destinatari.push(Destinatario {
                    address: value.to_owned(),
                    tipo: tipo.unwrap_or_else(|| wire::DEST_CERTIFICATO.to_owned()),
                });
            }
        }
        Leaf::Ricezione => {
            if !value.is_empty() {
                b.ricezione.push(value.to_owned());
            }
        }
        Leaf::Single(f) => {
            let slot = match f {
                Field::Mittente => &mut b.mittente,
                Field::Risposte => &mut b.risposte,
                Field::Oggetto => &mut b.oggetto,
                Field::GestoreEmittente => &mut b.gestore_emittente,
                Field::Identificativo => &mut b.identificativo,
                Field::Msgid => &mut b.msgid,
                Field::Consegna => &mut b.consegna,
                Field::ErroreEsteso => &mut b.errore_esteso,
                Field::Giorno => &mut b.giorno,
                Field::Ora => &mut b.ora,
            };
            if slot.is_some() {
                return Err(DaticertError::Duplicate(f.name()));
            }
            *slot = Some(value.to_owned());
        }
    }
    Ok(())
}

/// Appends text to the innermost element if it collects text; stray text
/// anywhere else is ignored.
fn push_text(stack: &mut [Frame], s: &str) {
    if let Some(Frame::Leaf(_, buf)) = stack.last_mut() {
        buf.push_str(s);
    }
}

/// The trimmed value of attribute `name` (local name), `None` when absent or
/// blank.
fn attribute(
    e: &BytesStart<'_>,
    name: &str,
    position: u64,
) -> Result<Option<String>, DaticertError> {
    for attr in e.attributes() {
        let attr = attr.map_err(|err| DaticertError::NotWellFormed {
            position,
            reason: err.to_string(),
        })?;
        if attr.key.local_name().as_ref() != name {
            continue;
        }
        let value = attr
            .normalized_value_with(quick_xml::XmlVersion::Implicit1_0, 1, resolve_xml_entity)
            .map_err(|err| DaticertError::NotWellFormed {
                position,
                reason: err.to_string(),
            })?;
        let value = value.trim();
        return Ok((!value.is_empty()).then(|| value.to_owned()));
    }
    Ok(None)
}

// ---------------------------------------------------------------------------
// Checking and converting

/// `Some` trimmed non-empty text, `None` otherwise.
fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

impl Builder {
    fn finish(self) -> Result<Daticert, DaticertError> {
        let tipo = self.tipo.ok_or(DaticertError::MissingAttribute {
            element: "postacert",
            attribute: "tipo",
        })?;
        let Some(zona) = self.data else {
            return Err(DaticertError::Missing("data"));
        };
        let zona = zona.ok_or(DaticertError::MissingAttribute {
            element: "data",
            attribute: "zona",
        })?;
        let giorno = non_empty(self.giorno).ok_or(DaticertError::MissingInData("giorno"))?;
        let ora = non_empty(self.ora).ok_or(DaticertError::MissingInData("ora"))?;
        let data = instant(&giorno, &ora, &zona)?;
        let identificativo =
            non_empty(self.identificativo).ok_or(DaticertError::Missing("identificativo"))?;
        let errore_esteso = non_empty(self.errore_esteso);
        let errore_code = errore_esteso.as_deref().and_then(status_code);
        Ok(Daticert {
            tipo,
            errore: self
                .errore
                .unwrap_or_else(|| wire::ERRORE_NESSUNO.to_owned()),
            mittente: non_empty(self.mittente),
            destinatari: self.destinatari,
            risposte: non_empty(self.risposte),
            oggetto: non_empty(self.oggetto),
            gestore_emittente: non_empty(self.gestore_emittente),
            data,
            identificativo,
            msgid: self.msgid.as_deref().and_then(normalize_message_id),
            ricevuta: self.ricevuta.flatten(),
            consegna: non_empty(self.consegna),
            ricezione: self.ricezione,
            errore_esteso,
            errore_code,
        })
    }
}

/// The instant of local `giorno` (`dd/mm/yyyy`) + `ora` (`hh:mm:ss`) at
/// offset `zona`: UTC = local − zona.
fn instant(giorno: &str, ora: &str, zona: &str) -> Result<Timestamp, DaticertError> {
    let bad_giorno = || DaticertError::BadData {
        field: "giorno",
        value: giorno.to_owned(),
    };
    let bad_ora = || DaticertError::BadData {
        field: "ora",
        value: ora.to_owned(),
    };
    let [day, month, year] = split_numbers(giorno, '/', [2, 2, 4]).ok_or_else(bad_giorno)?;
    let [hour, minute, second] = split_numbers(ora, ':', [2, 2, 2]).ok_or_else(bad_ora)?;
    let offset = parse_zona(zona).ok_or_else(|| DaticertError::BadZona(zona.to_owned()))?;

    let date = jiff::civil::Date::new(
        i16::try_from(year).map_err(|_| bad_giorno())?,
        i8::try_from(month).map_err(|_| bad_giorno())?,
        i8::try_from(day).map_err(|_| bad_giorno())?,
    )
    .map_err(|_| bad_giorno())?;
    let time = jiff::civil::Time::new(
        i8::try_from(hour).map_err(|_| bad_ora())?,
        i8::try_from(minute).map_err(|_| bad_ora())?,
        i8::try_from(second).map_err(|_| bad_ora())?,
        0,
    )
    .map_err(|_| bad_ora())?;
    let local: DateTime = date.to_datetime(time);
    offset
        .to_timestamp(local)
        .map_err(|_| DaticertError::DataOutOfRange(format!("{giorno} {ora} {zona}")))
}

/// Splits `s` on `sep` into exactly three runs of ASCII digits, each at
/// least one and at most `max[i]` long (the year must have all four).
fn split_numbers(s: &str, sep: char, max: [usize; 3]) -> Option<[u32; 3]> {
    let mut out = [0u32; 3];
    let mut parts = s.split(sep);
    for (i, slot) in out.iter_mut().enumerate() {
        let part = parts.next()?;
        let ok_len = if i == 2 && max[i] == 4 {
            part.len() == 4
        } else {
            (1..=max[i]).contains(&part.len())
        };
        if !ok_len || !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Parses `+hhmm`, `-hhmm` or `+hh:mm`.
fn parse_zona(zona: &str) -> Option<Offset> {
    let (sign, rest) = match zona.as_bytes().first()? {
        b'+' => (1, &zona[1..]),
        b'-' => (-1, &zona[1..]),
        _ => return None,
    };
    let (hh, mm) = match rest.len() {
        4 => (&rest[..2], &rest[2..]),
        5 if rest.as_bytes()[2] == b':' => (&rest[..2], &rest[3..]),
        _ => return None,
    };
    if !hh.bytes().chain(mm.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hours: i32 = hh.parse().ok()?;
    let minutes: i32 = mm.parse().ok()?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    Offset::from_seconds(sign * (hours * 3600 + minutes * 60)).ok()
}

/// The leading enhanced status code (`d.ddd.ddd`) of an error text.
fn status_code(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut i = 0;
    // class: one digit
    if !bytes.first()?.is_ascii_digit() {
        return None;
    }
    i += 1;
    for _ in 0..2 {
        if bytes.get(i) != Some(&b'.') {
            return None;
        }
        i += 1;
        let start = i;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if !(1..=3).contains(&(i - start)) {
            return None;
        }
    }
    // The code must end here: "5.1.1 -", "5.1.1", not "5.1.1.2".
    match bytes.get(i) {
        Some(b'.') if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => None,
        _ => Some(text[..i].to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("test timestamp")
    }

    fn parse(s: &str) -> Daticert {
        match Daticert::parse(s.as_bytes()) {
            Ok(d) => d,
            Err(e) => panic!("parse failed: {e}"),
        }
    }

    fn err(s: &[u8]) -> DaticertError {
        match Daticert::parse(s) {
            Ok(d) => panic!("expected an error, got {d:?}"),
            Err(e) => e,
        }
    }

    fn cert(address: &str) -> Destinatario {
        Destinatario {
            address: address.to_owned(),
            tipo: "certificato".to_owned(),
        }
    }

    fn esterno(address: &str) -> Destinatario {
        Destinatario {
            address: address.to_owned(),
            tipo: "esterno".to_owned(),
        }
    }

    /// Real Aruba acceptance (OCA l10n-italy fixture), addresses replaced.
    const ARUBA_ACCETTAZIONE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="accettazione" errore="nessuno">
    <intestazione>
        <mittente>mittente@pec.example.it</mittente>
        <destinatari tipo="certificato">destinatario@pec.example.it</destinatari>
        <risposte>mittente@pec.example.it</risposte>
        <oggetto>IT03339130126_00009.xml</oggetto>
    </intestazione>
    <dati>
        <gestore-emittente>ARUBA PEC S.p.A.</gestore-emittente>
        <data zona="+0100">
            <giorno>13/11/2018</giorno>
            <ora>16:39:26</ora>
        </data>
        <identificativo>opec288.20181113163926.01838.310.1.63@pec.aruba.it</identificativo>
        <msgid>&lt;1542123565.921546936035156.464602125997431-openerp-8-fatturapa.attachment.out@host.example&gt;</msgid>
    </dati>
</postacert>
"#;

    /// Real Aruba delivery receipt of the same letter, addresses replaced.
    const ARUBA_CONSEGNA: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="avvenuta-consegna" errore="nessuno">
    <intestazione>
        <mittente>mittente@pec.example.it</mittente>
        <destinatari tipo="certificato">destinatario@pec.example.it</destinatari>
        <risposte>mittente@pec.example.it</risposte>
        <oggetto>IT03339130126_00009.xml</oggetto>
    </intestazione>
    <dati>
        <gestore-emittente>ARUBA PEC S.p.A.</gestore-emittente>
        <data zona="+0100">
            <giorno>13/11/2018</giorno>
            <ora>16:39:27</ora>
        </data>
        <identificativo>opec288.20181113163926.01838.310.1.63@pec.aruba.it</identificativo>
        <msgid>&lt;1542123565.921546936035156.464602125997431-openerp-8-fatturapa.attachment.out@host.example&gt;</msgid>
        <ricevuta tipo="completa" />
        <consegna>destinatario@pec.example.it</consegna>
    </dati>
</postacert>
"#;

    /// Namirial 2024 transport envelope with seven external recipients,
    /// addresses replaced.
    const NAMIRIAL_BUSTA: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="posta-certificata" errore="nessuno">
    <intestazione>
        <mittente>mittente@namirialpec.example.it</mittente>
        <destinatari tipo="esterno">uno@example.ch</destinatari>
        <destinatari tipo="esterno">due@example.com</destinatari>
        <destinatari tipo="esterno">tre@lists.example.net</destinatari>
        <destinatari tipo="esterno">quattro@example.com.au</destinatari>
        <destinatari tipo="esterno">cinque@example.org</destinatari>
        <destinatari tipo="esterno">sei@example.edu</destinatari>
        <destinatari tipo="esterno">sette@example.com</destinatari>
        <risposte>mittente@namirialpec.example.it</risposte>
        <oggetto>Norah Colly</oggetto>
    </intestazione>
    <dati>
        <gestore-emittente>Namirial S.p.A.</gestore-emittente>
        <data zona="+0100">
            <giorno>05/12/2024</giorno>
            <ora>00:02:10</ora>
        </data>
        <identificativo>opec21192.20241205000210.24820.46.1.184@sicurezzapostale.it</identificativo>
        <msgid>&lt;2839ed57-e664-4020-bb69-6a8cb92d05a6@email.android.com&gt;</msgid>
        <ricevuta tipo="completa" />
    </dati>
</postacert>
"#;

    #[test]
    fn aruba_accettazione() {
        let d = parse(ARUBA_ACCETTAZIONE);
        assert_eq!(
            d,
            Daticert {
                tipo: "accettazione".into(),
                errore: "nessuno".into(),
                mittente: Some("mittente@pec.example.it".into()),
                destinatari: vec![cert("destinatario@pec.example.it")],
                risposte: Some("mittente@pec.example.it".into()),
                oggetto: Some("IT03339130126_00009.xml".into()),
                gestore_emittente: Some("ARUBA PEC S.p.A.".into()),
                data: ts("2018-11-13T15:39:26Z"),
                identificativo: "opec288.20181113163926.01838.310.1.63@pec.aruba.it".into(),
                msgid: Some(
                    "1542123565.921546936035156.464602125997431-openerp-8-fatturapa.attachment.out@host.example"
                        .into()
                ),
                ricevuta: None,
                consegna: None,
                ricezione: vec![],
                errore_esteso: None,
                errore_code: None,
            }
        );
        assert_eq!(d.kind(), Some(Kind::Acceptance));
        assert!(!d.is_final_error_code());
        assert!(d.destinatari[0].is_certified());
    }

    #[test]
    fn aruba_consegna() {
        let d = parse(ARUBA_CONSEGNA);
        assert_eq!(d.tipo, "avvenuta-consegna");
        assert_eq!(d.kind(), Some(Kind::Delivery));
        assert_eq!(d.data, ts("2018-11-13T15:39:27Z"));
        assert_eq!(d.ricevuta.as_deref(), Some("completa"));
        assert_eq!(d.consegna.as_deref(), Some("destinatario@pec.example.it"));
        assert_eq!(
            d.identificativo,
            "opec288.20181113163926.01838.310.1.63@pec.aruba.it"
        );
        assert_eq!(d.destinatari, vec![cert("destinatario@pec.example.it")]);
        assert_eq!(d.errore_code, None);
    }

    #[test]
    fn json_shape() {
        let d = parse(ARUBA_CONSEGNA);
        let v = serde_json::to_value(&d).expect("serialise");
        let obj = v.as_object().expect("object");
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let mut expected = vec![
            "tipo",
            "errore",
            "mittente",
            "destinatari",
            "risposte",
            "oggetto",
            "gestore_emittente",
            "data",
            "identificativo",
            "msgid",
            "ricevuta",
            "consegna",
            "ricezione",
            "errore_esteso",
            "errore_code",
        ];
        let mut got = keys.clone();
        got.sort_unstable();
        expected.sort_unstable();
        assert_eq!(got, expected);
        assert_eq!(v["data"], "2018-11-13T15:39:27Z");
        assert_eq!(v["errore_esteso"], serde_json::Value::Null);
        assert_eq!(v["errore_code"], serde_json::Value::Null);
        assert_eq!(
            v["destinatari"],
            serde_json::json!([{"address": "destinatario@pec.example.it", "tipo": "certificato"}])
        );
        assert_eq!(v["ricezione"], serde_json::json!([]));
    }

    #[test]
    fn namirial_busta_seven_esterno() {
        let d = parse(NAMIRIAL_BUSTA);
        assert_eq!(d.kind(), Some(Kind::Transport));
        assert_eq!(
            d.destinatari,
            vec![
                esterno("uno@example.ch"),
                esterno("due@example.com"),
                esterno("tre@lists.example.net"),
                esterno("quattro@example.com.au"),
                esterno("cinque@example.org"),
                esterno("sei@example.edu"),
                esterno("sette@example.com"),
            ]
        );
        assert!(d.destinatari.iter().all(|x| !x.is_certified()));
        assert_eq!(d.gestore_emittente.as_deref(), Some("Namirial S.p.A."));
        // 00:02:10 +0100 is the previous day in UTC
        assert_eq!(d.data, ts("2024-12-04T23:02:10Z"));
        assert_eq!(
            d.msgid.as_deref(),
            Some("2839ed57-e664-4020-bb69-6a8cb92d05a6@email.android.com")
        );
        assert_eq!(d.ricevuta.as_deref(), Some("completa"));
        assert_eq!(d.oggetto.as_deref(), Some("Norah Colly"));
    }

    #[test]
    fn postecom_without_msgid() {
        let d = parse(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="posta-certificata" errore="nessuno">
    <intestazione>
        <mittente>mittente@postecert.example.it</mittente>
        <destinatari>destinatario@pec.example.it</destinatari>
        <risposte>mittente@postecert.example.it</risposte>
    </intestazione>
    <dati>
        <gestore-emittente>POSTECOM S.P.A. - GRUPPO POSTE ITALIANE</gestore-emittente>
        <data zona="+0100">
            <giorno>17/01/2012</giorno>
            <ora>10:11:12</ora>
        </data>
        <identificativo>E82D9D8F.000073B6.E8F90950.8520A581.posta-certificata@postecert.it</identificativo>
        <ricevuta tipo="completa" />
    </dati>
</postacert>"#,
        );
        assert_eq!(d.msgid, None);
        assert_eq!(d.oggetto, None);
        // tipo absent: certificato
        assert_eq!(d.destinatari, vec![cert("destinatario@pec.example.it")]);
        assert_eq!(
            d.identificativo,
            "E82D9D8F.000073B6.E8F90950.8520A581.posta-certificata@postecert.it"
        );
        assert_eq!(d.data, ts("2012-01-17T09:11:12Z"));
        assert_eq!(
            d.gestore_emittente.as_deref(),
            Some("POSTECOM S.P.A. - GRUPPO POSTE ITALIANE")
        );
    }

    #[test]
    fn telecom_stylesheet_and_doctype_ignored() {
        let d = parse(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<?xml-stylesheet type="text/xsl" href="https://www.telecompost.it/dtd/postacert.xsl"?>
<!DOCTYPE postacert PUBLIC "posta certificata" "https://www.telecompost.it/dtd/postacert.dtd">
<postacert tipo="avvenuta-consegna" errore="nessuno">
  <intestazione>
    <mittente>mittente@pec.example.it</mittente>
    <destinatari tipo="certificato">protocollo@pec.rupar.example.it</destinatari>
    <risposte>mittente@pec.example.it</risposte>
    <oggetto>Trasmissione atti</oggetto>
  </intestazione>
  <dati>
    <gestore-emittente>I.T. Telecom S.R.L.</gestore-emittente>
    <data zona="+0100"><giorno>07/01/2013</giorno><ora>17:41:24</ora></data>
    <identificativo>201301071741240100.0787.pech@pec.rupar.puglia.it</identificativo>
    <msgid>&lt;abc.123@client.example.it&gt;</msgid>
    <ricevuta tipo="breve"/>
    <consegna>protocollo@pec.rupar.example.it</consegna>
  </dati>
</postacert>"#,
        );
        assert_eq!(d.data, ts("2013-01-07T16:41:24Z"));
        assert_eq!(d.gestore_emittente.as_deref(), Some("I.T. Telecom S.R.L."));
        assert_eq!(d.msgid.as_deref(), Some("abc.123@client.example.it"));
        assert_eq!(d.ricevuta.as_deref(), Some("breve"));
        assert_eq!(
            d.consegna.as_deref(),
            Some("protocollo@pec.rupar.example.it")
        );
    }

    fn minimal(oggetto_bytes: &[u8], encoding: &str) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(
            format!(
                "<?xml version=\"1.0\" encoding=\"{encoding}\"?>\n\
                 <postacert tipo=\"accettazione\"><intestazione><oggetto>"
            )
            .as_bytes(),
        );
        v.extend_from_slice(oggetto_bytes);
        v.extend_from_slice(
            b"</oggetto></intestazione><dati><data zona=\"+0100\"><giorno>01/02/2020</giorno>\
              <ora>10:00:00</ora></data><identificativo>id@x</identificativo></dati></postacert>",
        );
        v
    }

    #[test]
    fn iso_8859_1_and_windows_1252_decode() {
        // "Comunicazione n° 5 àèì" in Latin-1
        let mut latin1 = b"Comunicazione n".to_vec();
        latin1.extend_from_slice(&[0xB0]);
        latin1.extend_from_slice(b" 5 ");
        latin1.extend_from_slice(&[0xE0, 0xE8, 0xEC]);
        for enc in ["ISO-8859-1", "iso-8859-1", "latin1", "windows-1252"] {
            let d = Daticert::parse(&minimal(&latin1, enc)).expect(enc);
            assert_eq!(
                d.oggetto.as_deref(),
                Some("Comunicazione n° 5 àèì"),
                "{enc}"
            );
            assert_eq!(d.errore, "nessuno");
        }
        // The same bytes declared as UTF-8 are not valid UTF-8.
        assert!(matches!(
            err(&minimal(&latin1, "UTF-8")),
            DaticertError::BadEncoding(_)
        ));
        assert!(matches!(
            err(&minimal(b"x", "x-klingon")),
            DaticertError::UnsupportedEncoding(l) if l == "x-klingon"
        ));
    }

    #[test]
    fn utf8_with_bom_and_utf16() {
        let text = std::str::from_utf8(&minimal("àèì €".as_bytes(), "UTF-8"))
            .expect("utf8")
            .to_owned();
        let mut bom = vec![0xEF, 0xBB, 0xBF];
        bom.extend_from_slice(text.as_bytes());
        let d = Daticert::parse(&bom).expect("bom");
        assert_eq!(d.oggetto.as_deref(), Some("àèì €"));

        let utf16 = text.replace("UTF-8", "UTF-16");
        let mut le = vec![0xFF, 0xFE];
        for u in utf16.encode_utf16() {
            le.extend_from_slice(&u.to_le_bytes());
        }
        let d = Daticert::parse(&le).expect("utf-16le");
        assert_eq!(d.oggetto.as_deref(), Some("àèì €"));
    }

    fn with_msgid(msgid: &str) -> Daticert {
        parse(&format!(
            "<postacert tipo=\"accettazione\"><dati><data zona=\"+0100\"><giorno>01/02/2020</giorno>\
             <ora>10:00:00</ora></data><identificativo>id@x</identificativo><msgid>{msgid}</msgid></dati></postacert>"
        ))
    }

    #[test]
    fn msgid_with_and_without_brackets() {
        let expected = Some("RZLFE1$D00882600B2330420CAE7B3643F81CDD@pec.example.it");
        assert_eq!(
            with_msgid("&lt;RZLFE1$D00882600B2330420CAE7B3643F81CDD@pec.example.it&gt;")
                .msgid
                .as_deref(),
            expected
        );
        assert_eq!(
            with_msgid("RZLFE1$D00882600B2330420CAE7B3643F81CDD@pec.example.it")
                .msgid
                .as_deref(),
            expected
        );
        assert_eq!(
            with_msgid("<![CDATA[<RZLFE1$D00882600B2330420CAE7B3643F81CDD@pec.example.it>]]>")
                .msgid
                .as_deref(),
            expected
        );
        assert_eq!(with_msgid("  ").msgid, None);
        assert_eq!(
            with_msgid("&#60;a&#x40;b&#62;").msgid.as_deref(),
            Some("a@b")
        );
    }

    #[test]
    fn whitespace_everywhere_and_case_kept() {
        let d = parse(
            "\n\n<postacert   tipo = \"  avvenuta-consegna \"  errore=\" nessuno \" >\r\n\
             \t<intestazione >\r\n\
             \t\t<mittente>\r\n   Mario.Rossi@PEC.Example.IT \r\n</mittente>\r\n\
             \t\t<destinatari   tipo=\" esterno \" >  info@Example.com\t</destinatari>\r\n\
             \t\t<oggetto>  Prot. 123/2025 - Richiesta &amp; risposta  </oggetto>\r\n\
             \t</intestazione>\r\n\
             \t<dati>\r\n\
             \t\t<data   zona=\" +0100 \">\r\n<giorno> 13/11/2025 </giorno>\r\n<ora>\t16:39:27\t</ora>\r\n</data>\r\n\
             \t\t<identificativo>\r\n opec.1@pec.example.it \r\n</identificativo>\r\n\
             \t\t<msgid>\r\n &lt;gw-7f3c2a@gateway.example.it&gt; \r\n</msgid>\r\n\
             \t\t<ricevuta  tipo=\" sintetica \"  />\r\n\
             \t</dati>\r\n</postacert>\r\n\n",
        );
        assert_eq!(d.tipo, "avvenuta-consegna");
        assert_eq!(d.errore, "nessuno");
        assert_eq!(d.mittente.as_deref(), Some("Mario.Rossi@PEC.Example.IT"));
        assert_eq!(d.destinatari, vec![esterno("info@Example.com")]);
        assert_eq!(
            d.oggetto.as_deref(),
            Some("Prot. 123/2025 - Richiesta & risposta")
        );
        assert_eq!(d.data, ts("2025-11-13T15:39:27Z"));
        assert_eq!(d.identificativo, "opec.1@pec.example.it");
        assert_eq!(d.msgid.as_deref(), Some("gw-7f3c2a@gateway.example.it"));
        assert_eq!(d.ricevuta.as_deref(), Some("sintetica"));
        assert_eq!(d.risposte, None);
    }

    #[test]
    fn reordered_elements_unknown_ones_and_stray_text() {
        let d = parse(
            r#"<postacert errore="no-dest" tipo="errore-consegna">
  <dati>
    <errore-esteso>5.1.1 - FAKE Pec S.p.A. - indirizzo non valido</errore-esteso>
    <consegna>rec@pec.example.it</consegna>
    <estensione><consegna>ignored@x</consegna>text</estensione>
    <identificativo>opec210312.20241115182038.288127.606.1.53@fakepec.example.it</identificativo>
    <data zona="+0100"><ora>18:21:03</ora><giorno>15/11/2024</giorno></data>
    <gestore-emittente>FAKE PEC S.p.A.</gestore-emittente>
  </dati>
  <!-- a comment -->
  <intestazione>
    <oggetto>Test PEC</oggetto>
    <risposte>sender@pec.example.it</risposte>a
    <destinatari tipo="certificato">rec@pec.example.it</destinatari>
    <mittente>sender@pec.example.it</mittente>
  </intestazione>
</postacert>"#,
        );
        assert_eq!(d.kind(), Some(Kind::DeliveryError));
        assert_eq!(d.errore, "no-dest");
        assert_eq!(d.consegna.as_deref(), Some("rec@pec.example.it"));
        assert_eq!(d.data, ts("2024-11-15T17:21:03Z"));
        assert_eq!(d.mittente.as_deref(), Some("sender@pec.example.it"));
        assert_eq!(d.risposte.as_deref(), Some("sender@pec.example.it"));
        assert_eq!(d.destinatari, vec![cert("rec@pec.example.it")]);
        assert_eq!(d.errore_code.as_deref(), Some("5.1.1"));
        assert!(d.is_final_error_code());
    }

    #[test]
    fn errore_consegna_aruba_code() {
        let d = parse(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="errore-consegna" errore="no-dest">
    <intestazione>
        <mittente>mittente@pec.example.it</mittente>
        <destinatari tipo="certificato">nessuno@pec.example.it</destinatari>
        <risposte>mittente@pec.example.it</risposte>
        <oggetto>Test PEC</oggetto>
    </intestazione>
    <dati>
        <gestore-emittente>ARUBA PEC S.p.A.</gestore-emittente>
        <data zona="+0100">
            <giorno>15/11/2024</giorno>
            <ora>18:21:03</ora>
        </data>
        <identificativo>opec210312.20241115182038.288127.606.1.53@pec.aruba.it</identificativo>
        <msgid>&lt;SN05IE$951DEC16C1CFD3E4FD8FF1B1D24A99AE@pec.example.it&gt;</msgid>
        <consegna>nessuno@pec.example.it</consegna>
        <errore-esteso>5.1.1 - ARUBA PEC S.p.A. - indirizzo non valido</errore-esteso>
    </dati>
</postacert>"#,
        );
        assert_eq!(d.kind(), Some(Kind::DeliveryError));
        assert_eq!(d.errore, "no-dest");
        assert_eq!(
            d.errore_esteso.as_deref(),
            Some("5.1.1 - ARUBA PEC S.p.A. - indirizzo non valido")
        );
        assert_eq!(d.errore_code.as_deref(), Some("5.1.1"));
        assert!(d.is_final_error_code());
        assert_eq!(d.ricevuta, None);
    }

    #[test]
    fn preavviso_transient_code() {
        let d = parse(
            r#"<postacert tipo="preavviso-errore-consegna" errore="altro">
  <intestazione><mittente>m@pec.example.it</mittente>
    <destinatari>d@pec.example.it</destinatari><risposte>m@pec.example.it</risposte></intestazione>
  <dati><gestore-emittente>ARUBA PEC S.p.A.</gestore-emittente>
    <data zona="+0100"><giorno>16/11/2024</giorno><ora>06:21:03</ora></data>
    <identificativo>opec.1@pec.aruba.it</identificativo>
    <consegna>d@pec.example.it</consegna>
    <errore-esteso>4.4.7 - ARUBA PEC S.p.A. - tempo massimo di consegna superato</errore-esteso>
  </dati></postacert>"#,
        );
        assert_eq!(d.kind(), Some(Kind::DeliveryTimeout));
        assert_eq!(d.errore, "altro");
        assert_eq!(d.errore_code.as_deref(), Some("4.4.7"));
        assert!(!d.is_final_error_code());
    }

    #[test]
    fn status_code_extraction() {
        assert_eq!(status_code("5.1.1 - x").as_deref(), Some("5.1.1"));
        assert_eq!(status_code("5.1.1").as_deref(), Some("5.1.1"));
        assert_eq!(status_code("5.7.100 x").as_deref(), Some("5.7.100"));
        assert_eq!(status_code("5.1.1. fine").as_deref(), Some("5.1.1"));
        assert_eq!(status_code("5.1.1000"), None);
        assert_eq!(status_code("5.1.1.2"), None);
        assert_eq!(status_code("55.1.1"), None);
        assert_eq!(status_code("5.1"), None);
        assert_eq!(status_code("indirizzo non valido"), None);
        assert_eq!(status_code(""), None);
        assert_eq!(status_code("5..1"), None);
    }

    #[test]
    fn presa_in_carico_several_ricezione() {
        let d = parse(
            r#"<postacert tipo="presa-in-carico" errore="nessuno">
  <intestazione><mittente>m@pec.example.it</mittente>
    <destinatari>a@pec.other.example.it</destinatari>
    <destinatari>b@pec.other.example.it</destinatari>
    <destinatari tipo="esterno">c@example.com</destinatari>
    <risposte>m@pec.example.it</risposte><oggetto>x</oggetto></intestazione>
  <dati><gestore-emittente>Other PEC</gestore-emittente>
    <data zona="+0100"><giorno>01/03/2024</giorno><ora>09:00:00</ora></data>
    <identificativo>opec.2@pec.example.it</identificativo>
    <msgid>&lt;m.1@client&gt;</msgid>
    <ricezione>a@pec.other.example.it</ricezione>
    <ricezione> b@pec.other.example.it </ricezione>
    <ricezione></ricezione>
  </dati></postacert>"#,
        );
        assert_eq!(d.kind(), Some(Kind::TakenInCharge));
        assert_eq!(
            d.ricezione,
            vec![
                "a@pec.other.example.it".to_owned(),
                "b@pec.other.example.it".to_owned()
            ]
        );
        assert_eq!(
            d.destinatari,
            vec![
                cert("a@pec.other.example.it"),
                cert("b@pec.other.example.it"),
                esterno("c@example.com"),
            ]
        );
    }

    fn at(giorno: &str, ora: &str, zona: &str) -> Result<Daticert, DaticertError> {
        Daticert::parse(
            format!(
                "<postacert tipo=\"accettazione\"><dati><data zona=\"{zona}\"><giorno>{giorno}</giorno>\
                 <ora>{ora}</ora></data><identificativo>id@x</identificativo></dati></postacert>"
            )
            .as_bytes(),
        )
    }

    #[test]
    fn time_zones() {
        let t = |g, o, z| at(g, o, z).expect("valid").data;
        // Summer (legal) time
        assert_eq!(
            t("18/08/2023", "17:37:14", "+0200"),
            ts("2023-08-18T15:37:14Z")
        );
        assert_eq!(
            t("18/08/2023", "17:37:14", "+02:00"),
            ts("2023-08-18T15:37:14Z")
        );
        assert_eq!(
            t("31/12/2023", "22:30:00", "-0500"),
            ts("2024-01-01T03:30:00Z")
        );
        assert_eq!(
            t("01/01/2024", "00:30:00", "+0100"),
            ts("2023-12-31T23:30:00Z")
        );
        assert_eq!(
            t("29/02/2024", "12:00:00", "+0000"),
            ts("2024-02-29T12:00:00Z")
        );
        assert_eq!(
            t("1/2/2024", "9:05:07", "+0100"),
            ts("2024-02-01T08:05:07Z")
        );
    }

    #[test]
    fn bad_dates_are_errors() {
        let bad_giorno = |v: &str| DaticertError::BadData {
            field: "giorno",
            value: v.to_owned(),
        };
        let bad_ora = |v: &str| DaticertError::BadData {
            field: "ora",
            value: v.to_owned(),
        };
        for g in [
            "32/13/2018",
            "31/02/2018",
            "29/02/2023",
            "00/01/2020",
            "2018-11-13",
            "13/11/18",
            "13/11/2018/1",
            "+1/11/2018",
            "١٣/11/2018",
        ] {
            assert_eq!(at(g, "10:00:00", "+0100"), Err(bad_giorno(g)));
        }
        for o in [
            "24:00:00",
            "23:60:00",
            "23:59:60",
            "10:00",
            "10:00:00.5",
            "aa:bb:cc",
        ] {
            assert_eq!(at("01/01/2020", o, "+0100"), Err(bad_ora(o)));
        }
        for z in [
            "+01", "0100", "+2500", "+0160", "CET", "+01:0", "Z", "+0100x",
        ] {
            assert_eq!(
                at("01/01/2020", "10:00:00", z),
                Err(DaticertError::BadZona(z.to_owned()))
            );
        }
        assert_eq!(
            at("31/12/9999", "23:59:59", "-2300"),
            Err(DaticertError::DataOutOfRange(
                "31/12/9999 23:59:59 -2300".to_owned()
            ))
        );
    }

    #[test]
    fn error_messages() {
        let e = at("32/13/2018", "10:00:00", "+0100").expect_err("bad");
        assert_eq!(
            e.to_string(),
            "daticert.xml: <data>: bad <giorno> \"32/13/2018\""
        );
        assert_eq!(
            DaticertError::Missing("identificativo").to_string(),
            "daticert.xml: missing <identificativo>"
        );
        assert!(!e.is_malformed_xml());
        assert!(err(b"<postacert").is_malformed_xml());
    }

    #[test]
    fn missing_required_parts() {
        let doc = |dati: &str| {
            Daticert::parse(
                format!("<postacert tipo=\"accettazione\"><dati>{dati}</dati></postacert>")
                    .as_bytes(),
            )
        };
        let data = "<data zona=\"+0100\"><giorno>01/01/2020</giorno><ora>10:00:00</ora></data>";
        assert_eq!(doc(data), Err(DaticertError::Missing("identificativo")));
        assert_eq!(
            doc(&format!("{data}<identificativo>  </identificativo>")),
            Err(DaticertError::Missing("identificativo"))
        );
        assert_eq!(
            doc("<identificativo>id@x</identificativo>"),
            Err(DaticertError::Missing("data"))
        );
        assert_eq!(
            doc(
                "<data><giorno>01/01/2020</giorno><ora>10:00:00</ora></data><identificativo>i</identificativo>"
            ),
            Err(DaticertError::MissingAttribute {
                element: "data",
                attribute: "zona"
            })
        );
        assert_eq!(
            doc(
                "<data zona=\"+0100\"><ora>10:00:00</ora></data><identificativo>i</identificativo>"
            ),
            Err(DaticertError::MissingInData("giorno"))
        );
        assert_eq!(
            doc(
                "<data zona=\"+0100\"><giorno>01/01/2020</giorno></data><identificativo>i</identificativo>"
            ),
            Err(DaticertError::MissingInData("ora"))
        );
        assert_eq!(
            Daticert::parse(
                format!("<postacert errore=\"nessuno\"><dati>{data}<identificativo>i</identificativo></dati></postacert>")
                    .as_bytes()
            ),
            Err(DaticertError::MissingAttribute { element: "postacert", attribute: "tipo" })
        );
        assert_eq!(
            Daticert::parse(b"<postacert tipo=\"accettazione\"/>"),
            Err(DaticertError::Missing("data"))
        );
        assert_eq!(
            doc(&format!(
                "{data}<identificativo>a</identificativo><identificativo>b</identificativo>"
            )),
            Err(DaticertError::Duplicate("identificativo"))
        );
    }

    #[test]
    fn wrong_root_and_not_xml() {
        assert_eq!(
            err(b"<?xml version=\"1.0\"?><html><body/></html>"),
            DaticertError::WrongRoot("html".to_owned())
        );
        assert_eq!(err(b"this is not xml at all"), DaticertError::NoRoot);
        assert_eq!(err(b"{\"tipo\": \"accettazione\"}"), DaticertError::NoRoot);
        assert_eq!(err(b""), DaticertError::Empty);
        assert_eq!(err(b"   \n"), DaticertError::NoRoot);
        assert!(matches!(
            err(&[0x00, 0xFF, 0x10, 0x80]),
            DaticertError::BadEncoding(_)
        ));
        assert!(matches!(
            err(b"<postacert tipo=\"a\"><dati></intestazione></postacert>"),
            DaticertError::NotWellFormed { .. }
        ));
        assert!(matches!(
            err(b"<postacert tipo=\"a\" tipo=\"b\"/>"),
            DaticertError::NotWellFormed { .. }
        ));
        assert!(matches!(
            err(b"<postacert tipo=\"a\">R & D</postacert>"),
            DaticertError::NotWellFormed { .. }
        ));
    }

    #[test]
    fn truncated_xml() {
        // Every proper prefix of a real document is rejected without panic.
        let full = ARUBA_CONSEGNA.as_bytes();
        let end = full.len() - "</postacert>\n".len();
        for cut in 1..end {
            assert!(
                Daticert::parse(&full[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        let e = err(&full[..full.len() / 2]);
        assert!(matches!(e, DaticertError::NotWellFormed { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("daticert.xml: not well-formed at byte ")
        );
    }

    #[test]
    fn custom_entities_are_not_expanded() {
        let lol = r#"<?xml version="1.0"?>
<!DOCTYPE postacert [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
  <!ENTITY xxe SYSTEM "file:///etc/passwd">
]>
<postacert tipo="accettazione"><intestazione><oggetto>&lol9;</oggetto></intestazione>
<dati><data zona="+0100"><giorno>01/01/2020</giorno><ora>10:00:00</ora></data>
<identificativo>id@x</identificativo></dati></postacert>"#;
        let start = Instant::now();
        let e = err(lol.as_bytes());
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(
            matches!(&e, DaticertError::UndefinedEntity { name, .. } if name == "lol9"),
            "{e:?}"
        );
        let xxe = lol.replace("&lol9;", "&xxe;");
        assert!(matches!(
            err(xxe.as_bytes()),
            DaticertError::UndefinedEntity { name, .. } if name == "xxe"
        ));
        // In an attribute too.
        let attr = lol.replace("tipo=\"accettazione\"", "tipo=\"&xxe;\"");
        assert!(err(attr.as_bytes()).is_malformed_xml());
        // Declared but unused: the DOCTYPE is simply skipped.
        let unused = lol.replace("&lol9;", "ok");
        assert_eq!(parse(&unused).oggetto.as_deref(), Some("ok"));
    }

    #[test]
    fn doctype_subset_prefixes_and_trailing_content() {
        let d = parse(
            r#"<!DOCTYPE postacert [
  <!ELEMENT postacert (intestazione, dati)>
  <!ENTITY tricky "a > b ]> <c>">
  <!-- ]> in a comment -->
]>
<pec:postacert xmlns:pec="urn:example" pec:tipo="accettazione">
  <pec:dati>
    <pec:data zona="-0500"><pec:giorno>01/06/2021</pec:giorno><pec:ora>08:00:00</pec:ora></pec:data>
    <pec:identificativo>id@x</pec:identificativo>
    <pec:oggetto>a<b>ignored</b>b</pec:oggetto>
  </pec:dati>
</pec:postacert>
<!-- trailing comment -->"#,
        );
        assert_eq!(d.tipo, "accettazione");
        assert_eq!(d.data, ts("2021-06-01T13:00:00Z"));
        assert_eq!(d.identificativo, "id@x");
        assert_eq!(d.oggetto.as_deref(), Some("ab"));
        assert_eq!(d.errore, "nessuno");
    }

    #[test]
    fn size_limit_and_deep_nesting() {
        let big = vec![b' '; 2 * 1024 * 1024];
        assert_eq!(err(&big), DaticertError::TooLarge(2 * 1024 * 1024));

        // Deep nesting just under the limit: no stack overflow, just an error
        // (the document is truncated) or a parse that ignores the nest.
        let depth = 100_000;
        let mut deep = String::from("<postacert tipo=\"accettazione\"><dati>");
        deep.push_str(&"<x>".repeat(depth));
        let e = err(deep.as_bytes());
        assert!(matches!(e, DaticertError::NotWellFormed { .. }), "{e:?}");
        deep.push_str(&"</x>".repeat(depth));
        deep.push_str(
            "<data zona=\"+0100\"><giorno>01/01/2020</giorno><ora>10:00:00</ora></data>\
             <identificativo>id@x</identificativo></dati></postacert>",
        );
        assert!(deep.len() <= MAX_LEN);
        assert_eq!(parse(&deep).identificativo, "id@x");
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: byte-level mutations of a real document.
        let base = ARUBA_CONSEGNA.as_bytes();
        let mut state: u32 = 0x1234_5678;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for _ in 0..2000 {
            let mut doc = base.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % doc.len();
                doc[i] = match next() % 4 {
                    0 => b'<',
                    1 => b'&',
                    2 => (next() & 0xFF) as u8,
                    _ => b'/',
                };
            }
            let _ = Daticert::parse(&doc);
        }
    }
}
