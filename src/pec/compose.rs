//! Builders for every PEC system message, written the way a provider writes
//! them (SPEC.md §2, §3, §4.5): the pure half of the simulated provider.
//!
//! Each builder returns a [`Composed`]: the outer RFC 5322 header lines
//! (without `MIME-Version` and `Content-Type`) and the MIME entity to sign
//! (`multipart/mixed`, starting with its own `Content-Type`). The caller
//! signs it with `crate::pki::sign_detached(&c.outer_headers, &c.entity, ..)`
//! or, for tests, glues it together unsigned with [`Composed::unsigned`].
//!
//! Everything here is a pure function of its arguments: no clock (the one
//! time of a transaction is [`Transaction::time`]), no randomness
//! (boundaries and Message-IDs are derived from the inputs with a
//! non-cryptographic hash), no I/O, and no cryptography (the SHA-1 of a
//! breve receipt is computed by a function the caller passes in).
//!
//! Layout of the entity, as on the Aruba engine:
//!
//! 1. `multipart/alternative`: `text/plain` + `text/html`, ISO-8859-1,
//!    quoted-printable, Italian wording modelled on Aruba's;
//! 2. `daticert.xml`: `application/xml`, UTF-8, base64, 4-space indented;
//! 3. `postacert.eml`: `message/rfc822`, only on transport envelopes,
//!    completa/breve delivery receipts and anomaly envelopes (which have no
//!    daticert at all).
//!
//! Every line ends in CRLF. Values coming from users (subjects, addresses,
//! reasons) never break out of their header: CR and LF are removed from
//! anything placed in a header, and non-ASCII subjects are RFC 2047 encoded.
//!
//! Inputs that embed a whole message (`original`, `postacert`, `received`)
//! are first brought to CRLF line endings: the signed entity is in canonical
//! form anyway (the signer would convert bare LFs), and mail received over
//! SMTP is CRLF already. Apart from that, embedded messages are kept byte for
//! byte.

use std::fmt::Write as _;

use jiff::ZonedDateTime;
use mail_parser::{MimeHeaders, PartType};

use super::classify::parser;
use super::envelope::to_crlf;
use super::ids::{domain_of, normalize_message_id};
use super::wire;

pub use super::daticert::Destinatario;

// ---------------------------------------------------------------------------
// Public types

/// The delivery receipt flavour requested by the sender (`X-TipoRicevuta`,
/// daticert `ricevuta@tipo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReceiptType {
    /// The receipt carries the complete original (the default).
    #[default]
    Completa,
    /// The original with every attachment replaced by its SHA-1.
    Breve,
    /// No original at all.
    Sintetica,
}

impl ReceiptType {
    /// The wire value (`completa`, `breve`, `sintetica`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptType::Completa => wire::RICEVUTA_COMPLETA,
            ReceiptType::Breve => wire::RICEVUTA_BREVE,
            ReceiptType::Sintetica => wire::RICEVUTA_SINTETICA,
        }
    }

    /// Parses an `X-TipoRicevuta` value (trimmed, case-insensitive);
    /// `None` for anything else (the caller then applies the default,
    /// completa).
    pub fn from_wire(value: &str) -> Option<ReceiptType> {
        let v = value.trim();
        [
            ReceiptType::Completa,
            ReceiptType::Breve,
            ReceiptType::Sintetica,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(v))
    }

    /// The flavour a given recipient gets (SPEC.md §2.6): primary (`To`)
    /// recipients get what was requested, carbon-copy recipients always get
    /// a sintetica.
    pub fn for_recipient(self, primary: bool) -> ReceiptType {
        if primary {
            self
        } else {
            ReceiptType::Sintetica
        }
    }
}

/// The daticert `errore` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Errore {
    /// No error.
    #[default]
    Nessuno,
    /// Recipient unknown.
    NoDest,
    /// Domain unknown.
    NoDominio,
    /// Virus found.
    Virus,
    /// Any other error.
    Altro,
}

impl Errore {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Errore::Nessuno => wire::ERRORE_NESSUNO,
            Errore::NoDest => wire::ERRORE_NO_DEST,
            Errore::NoDominio => wire::ERRORE_NO_DOMINIO,
            Errore::Virus => wire::ERRORE_VIRUS,
            Errore::Altro => wire::ERRORE_ALTRO,
        }
    }
}

/// What a provider certified for one submission: the data every system
/// message of the transaction repeats.
///
/// One transaction has one time of issue (SPEC.md §4.5): the acceptance
/// receipt, the transport envelopes and the log of the sender's provider
/// all use [`Transaction::time`]. A message issued later or by another
/// provider (delivery receipt, timeout notice) uses a copy made with
/// [`Transaction::issued_by`].
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    /// The PEC identificativo of the transport envelope, e.g.
    /// `opec.sandbox.20261126101500.123.1@pec.sandbox.test` (no brackets).
    pub identificativo: String,
    /// The one time of issue, in the provider's zone (build it with
    /// `timestamp.in_tz("Europe/Rome")`). The daticert `data` (giorno, ora,
    /// zona), the texts and the `Date` header derive from it, at second
    /// precision.
    pub time: ZonedDateTime,
    /// The sender (SMTP MAIL FROM).
    pub mittente: String,
    /// Every recipient (To and Cc), with `certificato` / `esterno`.
    pub destinatari: Vec<Destinatario>,
    /// The original Reply-To, or the sender.
    pub risposte: String,
    /// The original subject, decoded (empty: no `oggetto` element).
    pub oggetto: String,
    /// The client's Message-ID, normalised (brackets are tolerated and
    /// removed); `None` when the original had none.
    pub msgid: Option<String>,
    /// `gestore-emittente`: the name of the provider issuing the message.
    pub gestore: String,
    /// The issuing provider's service address
    /// (`posta-certificata@<provider domain>`): `From` of receipts and
    /// notices, address in the `From` of envelopes.
    pub service_address: String,
    /// The delivery receipt flavour requested by the sender.
    pub ricevuta: ReceiptType,
}

impl Transaction {
    /// The same transaction as certified by `gestore` (service address
    /// `service_address`) at `time`: what the recipient's provider knows
    /// when it issues a delivery receipt, or the sender's provider when it
    /// issues a timeout notice later.
    pub fn issued_by(
        &self,
        gestore: &str,
        service_address: &str,
        time: ZonedDateTime,
    ) -> Transaction {
        Transaction {
            gestore: gestore.to_owned(),
            service_address: service_address.to_owned(),
            time,
            ..self.clone()
        }
    }

    fn normalized_msgid(&self) -> Option<String> {
        self.msgid.as_deref().and_then(normalize_message_id)
    }
}

/// A system message ready to be signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composed {
    /// The outer header lines, each ending in CRLF, without `MIME-Version`
    /// and `Content-Type` (the signer adds them).
    pub outer_headers: String,
    /// The MIME entity to sign: a `multipart/mixed` starting with its own
    /// `Content-Type` header, CRLF line endings.
    pub entity: Vec<u8>,
}

impl Composed {
    /// The message without a signature: the outer headers, `MIME-Version`
    /// and the entity. For tests and for looking at a message; a real
    /// provider always signs.
    pub fn unsigned(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.outer_headers.len() + self.entity.len() + 19);
        out.extend_from_slice(self.outer_headers.as_bytes());
        out.extend_from_slice(b"MIME-Version: 1.0\r\n");
        out.extend_from_slice(&self.entity);
        out
    }
}

/// What a delivery receipt carries of the original (SPEC.md §2.6). Use
/// [`ReceiptType::for_recipient`] to choose.
#[derive(Clone, Copy)]
pub enum DeliveryContent<'a> {
    /// The whole original, as it arrived in the envelope's `postacert.eml`.
    Completa {
        /// The envelope's `postacert.eml`.
        postacert: &'a [u8],
    },
    /// The original with every attachment replaced by a `.hash` part (see
    /// [`breve_original`]).
    Breve {
        /// The envelope's `postacert.eml`.
        postacert: &'a [u8],
        /// Returns the SHA-1 of its argument as 40 lower-case hex digits
        /// (the caller has the cryptography).
        sha1_hex: &'a dyn Fn(&[u8]) -> String,
    },
    /// No original.
    Sintetica,
}

impl DeliveryContent<'_> {
    /// The flavour.
    pub fn flavour(&self) -> ReceiptType {
        match self {
            DeliveryContent::Completa { .. } => ReceiptType::Completa,
            DeliveryContent::Breve { .. } => ReceiptType::Breve,
            DeliveryContent::Sintetica => ReceiptType::Sintetica,
        }
    }
}

impl std::fmt::Debug for DeliveryContent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryContent::Completa { postacert } | DeliveryContent::Breve { postacert, .. } => f
                .debug_struct(self.flavour().as_str())
                .field("postacert_len", &postacert.len())
                .finish_non_exhaustive(),
            DeliveryContent::Sintetica => f.write_str(wire::RICEVUTA_SINTETICA),
        }
    }
}

// ---------------------------------------------------------------------------
// The builders

/// Ricevuta di accettazione (SPEC.md §2.2): to the sender, from the sender's
/// provider; daticert without `ricevuta` (as on Aruba).
pub fn acceptance(tx: &Transaction) -> Composed {
    let xml = daticert_xml(
        wire::ACCETTAZIONE,
        Errore::Nessuno,
        tx,
        None,
        None,
        &[],
        None,
    );
    let dests = dest_labels(tx);
    let mut lines = intro(tx, "il messaggio con Oggetto", "inviato da");
    lines.push("ed indirizzato a:".to_owned());
    lines.extend(dests.iter().cloned());
    lines.push("è stato accettato dal sistema ed inoltrato.".to_owned());
    lines.push(identificativo_line(tx));
    let text = Text {
        title: "Ricevuta di accettazione",
        head: format!(
            "-- Ricevuta di accettazione del messaggio indirizzato a {} --",
            dests.join(", ")
        ),
        lines,
        daticert_note: true,
    };
    Receipt {
        tx,
        kind_tag: wire::ACCETTAZIONE,
        to: &tx.mittente,
        subject_prefix: wire::subject::ACCETTAZIONE,
        type_headers: vec![(wire::H_RICEVUTA, wire::ACCETTAZIONE.to_owned())],
        text,
        xml: Some(xml),
        postacert: None,
        salt: &[],
    }
    .build()
}

/// Avviso di non accettazione (SPEC.md §2.3): the reason goes into the text
/// and into `errore-esteso`; with `virus`, the virus variant
/// (`X-VerificaSicurezza: errore`, subject `... PER VIRUS: `,
/// `errore="virus"`), otherwise `errore="altro"`. Never carries the
/// original.
pub fn non_acceptance(tx: &Transaction, reason: &str, virus: bool) -> Composed {
    let errore = if virus { Errore::Virus } else { Errore::Altro };
    let reason = one_line(reason);
    let xml = daticert_xml(
        wire::NON_ACCETTAZIONE,
        errore,
        tx,
        None,
        None,
        &[],
        Some(&reason),
    );
    let mut lines = intro(tx, "il messaggio con Oggetto", "inviato da");
    lines.push("ed indirizzato a:".to_owned());
    lines.extend(dest_labels(tx));
    lines.push(if virus {
        "non è stato accettato perché contiene un virus:".to_owned()
    } else {
        "non è stato accettato per il seguente errore:".to_owned()
    });
    lines.push(reason.clone());
    lines.push("Il messaggio non è stato inoltrato ai destinatari.".to_owned());
    lines.push(identificativo_line(tx));
    let (title, prefix) = if virus {
        (
            "Avviso di non accettazione per virus",
            wire::subject::NON_ACCETTAZIONE_VIRUS,
        )
    } else {
        (
            "Avviso di non accettazione",
            wire::subject::NON_ACCETTAZIONE,
        )
    };
    let mut type_headers = vec![(wire::H_RICEVUTA, wire::NON_ACCETTAZIONE.to_owned())];
    if virus {
        type_headers.push((
            wire::H_VERIFICA_SICUREZZA,
            wire::TRASPORTO_ERRORE.to_owned(),
        ));
    }
    Receipt {
        tx,
        kind_tag: wire::NON_ACCETTAZIONE,
        to: &tx.mittente,
        subject_prefix: prefix,
        type_headers,
        text: Text {
            title,
            head: format!("-- {title} --"),
            lines,
            daticert_note: true,
        },
        xml: Some(xml),
        postacert: None,
        salt: &[&reason, errore.as_str()],
    }
    .build()
}

/// Busta di trasporto (SPEC.md §2.4) for the submitted message `original`
/// (as received by the access point).
///
/// Outer headers: the original's `Received` and `Return-Path` (unchanged,
/// first), `Date`, `From: "Per conto di: <mittente>" <service address>`,
/// `Reply-To` (the original's Reply-To, else its From, else the sender),
/// the original's `To` and `Cc` (unchanged), `Subject: POSTA CERTIFICATA:
/// <oggetto>`, `Message-ID: <identificativo>`, `X-Riferimento-Message-ID`,
/// `X-Trasporto: posta-certificata` and `X-TipoRicevuta` (always written,
/// with [`Transaction::ricevuta`]).
///
/// `postacert.eml` is [`postacert_original`] of the original.
pub fn transport_envelope(tx: &Transaction, original: &[u8]) -> Composed {
    let original = to_crlf(original);
    let fields = split_header(&original);
    let msgid = tx.normalized_msgid();
    let mut h = String::new();
    for name in ["Received", "Return-Path"] {
        for f in fields.fields.iter().filter(|f| f.is(name)) {
            h.push_str(&f.sanitized(&original));
        }
    }
    h.push_str(&date_header(&tx.time));
    h.push_str(&per_conto_di_from(&tx.mittente, &tx.service_address));
    match fields
        .first("Reply-To")
        .or_else(|| fields.first("From"))
        .map(|f| f.value_sanitized(&original))
        .filter(|v| !v.trim().is_empty())
    {
        Some(v) => h.push_str(&format!("Reply-To:{v}\r\n")),
        None => h.push_str(&format!("Reply-To: {}\r\n", address(&tx.risposte))),
    }
    for name in ["To", "Cc"] {
        for f in fields.fields.iter().filter(|f| f.is(name)) {
            h.push_str(&f.sanitized(&original));
        }
    }
    h.push_str(&unstructured_header(
        "Subject",
        &format!("{}{}", wire::subject::POSTA_CERTIFICATA, tx.oggetto),
    ));
    h.push_str(&msg_id_header("Message-ID", &tx.identificativo));
    if let Some(m) = &msgid {
        h.push_str(&msg_id_header(wire::H_RIFERIMENTO, m));
    }
    h.push_str(&format!(
        "{}: {}\r\n",
        wire::H_TRASPORTO,
        wire::POSTA_CERTIFICATA
    ));
    h.push_str(&format!(
        "{}: {}\r\n",
        wire::H_TIPO_RICEVUTA,
        tx.ricevuta.as_str()
    ));

    let xml = daticert_xml(
        wire::POSTA_CERTIFICATA,
        Errore::Nessuno,
        tx,
        Some(tx.ricevuta),
        None,
        &[],
        None,
    );
    let mut lines = intro(
        tx,
        "il messaggio con Oggetto",
        "è stato inviato dal mittente",
    );
    lines.push("e indirizzato a:".to_owned());
    lines.extend(tx.destinatari.iter().map(|d| one_line(&d.address)));
    lines.push(
        "Il messaggio originale è incluso in allegato, per aprirlo cliccare sul file \
         \"postacert.eml\" (nella webmail o in alcuni client di posta l'allegato potrebbe \
         avere come nome l'oggetto del messaggio originale)."
            .to_owned(),
    );
    lines.push(format!(
        "L'identificativo univoco di questo messaggio è: {}",
        one_line(&tx.identificativo)
    ));
    let text = Text {
        title: "Messaggio di posta certificata",
        head: "-- Questo è un Messaggio di Posta Certificata --".to_owned(),
        lines,
        daticert_note: true,
    };
    let inner = postacert_original(&original, &tx.identificativo, msgid.as_deref());
    let entity = entity(
        &boundary_seed(tx, wire::POSTA_CERTIFICATA, &[]),
        &text,
        Some(&xml),
        Some(&inner),
    );
    Composed {
        outer_headers: h,
        entity,
    }
}

/// Ricevuta di avvenuta consegna (SPEC.md §2.6) for recipient `consegna`,
/// issued by the recipient's provider: pass a transaction made with
/// [`Transaction::issued_by`] (its gestore, service address and delivery
/// time). To the sender; daticert with `<ricevuta tipo>` = the flavour of
/// *this* receipt and `<consegna>`.
pub fn delivery(tx: &Transaction, consegna: &str, content: DeliveryContent<'_>) -> Composed {
    let consegna = one_line(consegna);
    let flavour = content.flavour();
    let xml = daticert_xml(
        wire::AVVENUTA_CONSEGNA,
        Errore::Nessuno,
        tx,
        Some(flavour),
        Some(&consegna),
        &[],
        None,
    );
    let postacert = match content {
        DeliveryContent::Completa { postacert } => Some(to_crlf(postacert).into_owned()),
        DeliveryContent::Breve {
            postacert,
            sha1_hex,
        } => Some(breve_original(postacert, sha1_hex)),
        DeliveryContent::Sintetica => None,
    };
    let mut lines = intro(tx, "il messaggio con Oggetto", "inviato da");
    lines.push(format!("ed indirizzato a \"{consegna}\""));
    lines.push("è stato correttamente consegnato al destinatario.".to_owned());
    lines.push(identificativo_line(tx));
    lines.push(match flavour {
        ReceiptType::Completa => "Il messaggio originale è incluso in allegato (file \
                                  \"postacert.eml\")."
            .to_owned(),
        ReceiptType::Breve => "Il messaggio originale è incluso in allegato (file \
                               \"postacert.eml\"), con i suoi allegati sostituiti dai \
                               rispettivi hash (ricevuta breve)."
            .to_owned(),
        ReceiptType::Sintetica => {
            "Il messaggio originale non è incluso (ricevuta sintetica).".to_owned()
        }
    });
    Receipt {
        tx,
        kind_tag: wire::AVVENUTA_CONSEGNA,
        to: &tx.mittente,
        subject_prefix: wire::subject::CONSEGNA,
        type_headers: vec![(wire::H_RICEVUTA, wire::AVVENUTA_CONSEGNA.to_owned())],
        text: Text {
            title: "Ricevuta di avvenuta consegna",
            head: format!(
                "-- Ricevuta di avvenuta consegna del messaggio indirizzato a {consegna} \
                 \"posta certificata\" --"
            ),
            lines,
            daticert_note: true,
        },
        xml: Some(xml),
        postacert: postacert.as_deref(),
        salt: &[&consegna, flavour.as_str()],
    }
    .build()
}

/// Avviso di mancata consegna (SPEC.md §2.7) for recipient `consegna`:
/// `errore-consegna` with `errore` and `errore-esteso`. With
/// [`Errore::Virus`] it is the virus variant sent by the sender's provider
/// (`X-VerificaSicurezza: errore`, subject `... PER VIRUS: `).
pub fn delivery_error(
    tx: &Transaction,
    consegna: &str,
    errore: Errore,
    errore_esteso: &str,
) -> Composed {
    let consegna = one_line(consegna);
    let errore_esteso = one_line(errore_esteso);
    let virus = errore == Errore::Virus;
    let xml = daticert_xml(
        wire::ERRORE_CONSEGNA,
        errore,
        tx,
        None,
        Some(&consegna),
        &[],
        Some(&errore_esteso),
    );
    let mut lines = intro(tx, "nel messaggio con Oggetto", "inviato da");
    lines.push(format!("ed indirizzato a \"{consegna}\""));
    lines.push(if virus {
        "è stato rilevato un virus che ne impedisce la consegna.".to_owned()
    } else {
        "è stato rilevato un problema che ne impedisce la consegna.".to_owned()
    });
    lines.push(format!(
        "Il sistema ha fornito la seguente indicazione: {errore_esteso}"
    ));
    lines.push("Il messaggio non è stato consegnato.".to_owned());
    lines.push(identificativo_line(tx));
    let (title, prefix) = if virus {
        (
            "Avviso di mancata consegna per virus",
            wire::subject::MANCATA_CONSEGNA_VIRUS,
        )
    } else {
        (
            "Avviso di mancata consegna",
            wire::subject::MANCATA_CONSEGNA,
        )
    };
    let mut type_headers = vec![(wire::H_RICEVUTA, wire::ERRORE_CONSEGNA.to_owned())];
    if virus {
        type_headers.push((
            wire::H_VERIFICA_SICUREZZA,
            wire::TRASPORTO_ERRORE.to_owned(),
        ));
    }
    Receipt {
        tx,
        kind_tag: wire::ERRORE_CONSEGNA,
        to: &tx.mittente,
        subject_prefix: prefix,
        type_headers,
        text: Text {
            title,
            head: format!("-- {title} --"),
            lines,
            daticert_note: true,
        },
        xml: Some(xml),
        postacert: None,
        salt: &[&consegna, errore.as_str(), &errore_esteso],
    }
    .build()
}

/// Avviso di mancata consegna per superamento tempi massimi (SPEC.md §2.7),
/// issued by the sender's provider for recipient `consegna`. Both notices
/// use `X-Ricevuta: preavviso-errore-consegna` and `errore="altro"`; the
/// text follows the enhanced status code at the start of `errore_esteso`:
/// a `5.x.x` code (e.g. `5.4.1 - ...`) is the final 24 h notice, anything
/// else (e.g. `4.4.7 - ...`) the 12 h preavviso.
pub fn timeout_notice(tx: &Transaction, consegna: &str, errore_esteso: &str) -> Composed {
    let consegna = one_line(consegna);
    let errore_esteso = one_line(errore_esteso);
    let fin = errore_esteso.trim_start().starts_with("5.");
    let xml = daticert_xml(
        wire::PREAVVISO_ERRORE_CONSEGNA,
        Errore::Altro,
        tx,
        None,
        Some(&consegna),
        &[],
        Some(&errore_esteso),
    );
    let mut lines = intro(tx, "il messaggio con Oggetto", "inviato da");
    lines.push(format!("ed indirizzato a \"{consegna}\""));
    if fin {
        lines.push(
            "non è stato consegnato entro 24 ore dall'invio: la trasmissione si considera \
             conclusa con esito negativo."
                .to_owned(),
        );
    } else {
        lines.push(
            "non risulta ancora consegnato dopo 12 ore dall'invio: il gestore del \
             destinatario potrebbe non essere in grado di consegnarlo. La consegna può \
             comunque avvenire in seguito."
                .to_owned(),
        );
    }
    lines.push(format!(
        "Il sistema ha fornito la seguente indicazione: {errore_esteso}"
    ));
    lines.push(identificativo_line(tx));
    let title = if fin {
        "Avviso di mancata consegna per superamento dei tempi massimi"
    } else {
        "Preavviso di mancata consegna per superamento dei tempi massimi"
    };
    Receipt {
        tx,
        kind_tag: wire::PREAVVISO_ERRORE_CONSEGNA,
        to: &tx.mittente,
        subject_prefix: wire::subject::MANCATA_CONSEGNA_TEMPO,
        type_headers: vec![(wire::H_RICEVUTA, wire::PREAVVISO_ERRORE_CONSEGNA.to_owned())],
        text: Text {
            title,
            head: format!("-- {title} --"),
            lines,
            daticert_note: true,
        },
        xml: Some(xml),
        postacert: None,
        salt: &[&consegna, &errore_esteso],
    }
    .build()
}

/// Ricevuta di presa in carico (SPEC.md §2.5), provider to provider: from
/// the recipient's provider (issuing `tx`) to the sender provider's receipt
/// mailbox `to`, covering the recipients in `ricezione`.
pub fn taken_in_charge(tx: &Transaction, to: &str, ricezione: &[String]) -> Composed {
    let ricezione: Vec<String> = ricezione.iter().map(|r| one_line(r)).collect();
    let xml = daticert_xml(
        wire::PRESA_IN_CARICO,
        Errore::Nessuno,
        tx,
        None,
        None,
        &ricezione,
        None,
    );
    let mut lines = intro(tx, "il messaggio con Oggetto", "inviato da");
    lines.push(
        "è stato accettato dal sistema di ricezione ed è stato preso in carico per i \
         destinatari:"
            .to_owned(),
    );
    lines.extend(ricezione.iter().cloned());
    lines.push(identificativo_line(tx));
    let salt: Vec<&str> = ricezione.iter().map(String::as_str).collect();
    Receipt {
        tx,
        kind_tag: wire::PRESA_IN_CARICO,
        to,
        subject_prefix: wire::subject::PRESA_IN_CARICO,
        type_headers: vec![(wire::H_RICEVUTA, wire::PRESA_IN_CARICO.to_owned())],
        text: Text {
            title: "Ricevuta di presa in carico",
            head: "-- Ricevuta di presa in carico --".to_owned(),
            lines,
            daticert_note: true,
        },
        xml: Some(xml),
        postacert: None,
        salt: &salt,
    }
    .build()
}

/// Avviso di rilevazione virus (SPEC.md §2.7), provider to provider: from
/// the recipient's provider (issuing `tx`) to the sender provider's receipt
/// mailbox `to`, for recipient `consegna`; carries `X-Mittente`.
pub fn virus_detected(tx: &Transaction, to: &str, consegna: &str, errore_esteso: &str) -> Composed {
    let consegna = one_line(consegna);
    let errore_esteso = one_line(errore_esteso);
    let xml = daticert_xml(
        wire::RILEVAZIONE_VIRUS,
        Errore::Virus,
        tx,
        None,
        Some(&consegna),
        &[],
        Some(&errore_esteso),
    );
    let mut lines = intro(tx, "nel messaggio con Oggetto", "inviato da");
    lines.push(format!("ed indirizzato a \"{consegna}\""));
    lines.push(format!("è stato rilevato un virus: {errore_esteso}"));
    lines.push(identificativo_line(tx));
    Receipt {
        tx,
        kind_tag: wire::RILEVAZIONE_VIRUS,
        to,
        subject_prefix: wire::subject::PROBLEMA_SICUREZZA,
        type_headers: vec![
            (wire::H_RICEVUTA, wire::RILEVAZIONE_VIRUS.to_owned()),
            (wire::H_MITTENTE, address(&tx.mittente)),
        ],
        text: Text {
            title: "Avviso di rilevazione virus",
            head: "-- Problema di sicurezza --".to_owned(),
            lines,
            daticert_note: true,
        },
        xml: Some(xml),
        postacert: None,
        salt: &[&consegna, &errore_esteso],
    }
    .build()
}

/// Busta di anomalia (SPEC.md §2.8): wraps `received` (a message that is
/// not a valid PEC message, as it arrived) for the recipient's mailbox.
///
/// Outer headers: the received message's `Received` and `Return-Path`
/// (unchanged, first), `Date` (= `time`), `From: "Per conto di: <its From
/// address>" <service_address>`, `Reply-To` (its Reply-To, else its From),
/// its `To` and `Cc`, `Subject: ANOMALIA MESSAGGIO: <its subject>`, its
/// `Message-ID` (one is derived from the content when it has none) and
/// `X-Trasporto: errore`. The entity: the explanatory text (with `reason`)
/// and the received message as `postacert.eml`; no daticert.
pub fn anomaly_envelope(
    received: &[u8],
    service_address: &str,
    time: &ZonedDateTime,
    reason: &str,
) -> Composed {
    let received = to_crlf(received);
    let fields = split_header(&received);
    let parsed = parser().parse_headers(received.as_ref());
    let subject = parsed
        .as_ref()
        .and_then(|m| m.subject())
        .map(one_line)
        .unwrap_or_default();
    let sender = parsed
        .as_ref()
        .and_then(|m| m.from())
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map(address)
        .unwrap_or_default();
    let to_list: Vec<String> = parsed
        .as_ref()
        .map(|m| {
            m.to()
                .into_iter()
                .chain(m.cc())
                .flat_map(|list| list.iter())
                .filter_map(|a| a.address())
                .map(address)
                .collect()
        })
        .unwrap_or_default();
    let reason = one_line(reason);
    let seed = {
        let mut h = Fnv::new();
        h.write(b"anomalia");
        h.write(&received);
        h.write(service_address.as_bytes());
        h.write(time.timestamp().as_second().to_string().as_bytes());
        h.write(reason.as_bytes());
        h.finish()
    };

    let mut h = String::new();
    for name in ["Received", "Return-Path"] {
        for f in fields.fields.iter().filter(|f| f.is(name)) {
            h.push_str(&f.sanitized(&received));
        }
    }
    h.push_str(&date_header(time));
    h.push_str(&per_conto_di_from(&sender, service_address));
    if let Some(v) = fields
        .first("Reply-To")
        .or_else(|| fields.first("From"))
        .map(|f| f.value_sanitized(&received))
        .filter(|v| !v.trim().is_empty())
    {
        h.push_str(&format!("Reply-To:{v}\r\n"));
    }
    for name in ["To", "Cc"] {
        for f in fields.fields.iter().filter(|f| f.is(name)) {
            h.push_str(&f.sanitized(&received));
        }
    }
    h.push_str(&unstructured_header(
        "Subject",
        &format!("{}{}", wire::subject::ANOMALIA, subject),
    ));
    match fields.first("Message-ID") {
        Some(f) => h.push_str(&f.sanitized(&received)),
        None => h.push_str(&msg_id_header(
            "Message-ID",
            &format!(
                "anomalia.{seed:016x}@{}",
                domain_of(&address(service_address)).unwrap_or("localhost")
            ),
        )),
    }
    h.push_str(&format!(
        "{}: {}\r\n",
        wire::H_TRASPORTO,
        wire::TRASPORTO_ERRORE
    ));

    let giorno_ora = at_line(time);
    let text = Text {
        title: "Anomalia nel messaggio",
        head: "-- Anomalia nel messaggio --".to_owned(),
        lines: vec![
            format!("{giorno_ora} è stato ricevuto il messaggio"),
            format!("\"{subject}\" proveniente da \"{sender}\""),
            format!("ed indirizzato a: {}", to_list.join(", ")),
            "Tali dati non sono stati certificati per il seguente errore:".to_owned(),
            reason,
            "Il messaggio originale è incluso in allegato.".to_owned(),
        ],
        daticert_note: false,
    };
    let entity = entity(&format!("{seed:016x}"), &text, None, Some(&received));
    Composed {
        outer_headers: h,
        entity,
    }
}

// ---------------------------------------------------------------------------
// daticert.xml

/// The `daticert.xml` of a system message (SPEC.md §3): UTF-8 with an XML
/// declaration, 4-space indentation, elements in the order of the DTD
/// (`intestazione`: mittente, destinatari+, risposte, oggetto?; `dati`:
/// gestore-emittente, data, identificativo, msgid?, ricevuta?, consegna?,
/// ricezione*, errore-esteso?), every text XML-escaped.
///
/// `data` is [`Transaction::time`] in local time with its offset as
/// `zona`; `msgid` is written with angle brackets; `oggetto` is left out
/// when the subject is empty.
pub fn daticert_xml(
    tipo: &str,
    errore: Errore,
    tx: &Transaction,
    ricevuta: Option<ReceiptType>,
    consegna: Option<&str>,
    ricezione: &[String],
    errore_esteso: Option<&str>,
) -> String {
    let mut x = String::with_capacity(1024);
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<postacert tipo=\"{}\" errore=\"{}\">",
        xml_escape(tipo),
        errore.as_str()
    );
    x.push_str("    <intestazione>\n");
    element(&mut x, 2, "mittente", &tx.mittente);
    for d in &tx.destinatari {
        let _ = writeln!(
            x,
            "        <destinatari tipo=\"{}\">{}</destinatari>",
            xml_escape(
                Some(d.tipo.trim())
                    .filter(|t| !t.is_empty())
                    .unwrap_or(wire::DEST_CERTIFICATO)
            ),
            xml_escape(&one_line(&d.address))
        );
    }
    element(&mut x, 2, "risposte", &tx.risposte);
    let oggetto = one_line(&tx.oggetto);
    if !oggetto.trim().is_empty() {
        element(&mut x, 2, "oggetto", &oggetto);
    }
    x.push_str("    </intestazione>\n");
    x.push_str("    <dati>\n");
    element(&mut x, 2, "gestore-emittente", &tx.gestore);
    let _ = writeln!(x, "        <data zona=\"{}\">", tx.time.strftime("%z"));
    let _ = writeln!(
        x,
        "            <giorno>{}</giorno>",
        tx.time.strftime("%d/%m/%Y")
    );
    let _ = writeln!(x, "            <ora>{}</ora>", tx.time.strftime("%H:%M:%S"));
    x.push_str("        </data>\n");
    element(&mut x, 2, "identificativo", &tx.identificativo);
    if let Some(m) = tx.normalized_msgid() {
        element(&mut x, 2, "msgid", &format!("<{m}>"));
    }
    if let Some(r) = ricevuta {
        let _ = writeln!(x, "        <ricevuta tipo=\"{}\" />", r.as_str());
    }
    if let Some(c) = consegna {
        element(&mut x, 2, "consegna", c);
    }
    for r in ricezione {
        element(&mut x, 2, "ricezione", r);
    }
    if let Some(e) = errore_esteso {
        element(&mut x, 2, "errore-esteso", e);
    }
    x.push_str("    </dati>\n");
    x.push_str("</postacert>\n");
    x
}

fn element(x: &mut String, depth: usize, name: &str, text: &str) {
    let _ = writeln!(
        x,
        "{}<{name}>{}</{name}>",
        "    ".repeat(depth),
        xml_escape(&one_line(text))
    );
}

/// XML-escapes text for content and attribute values, dropping characters
/// that XML 1.0 does not allow.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The original inside postacert.eml

/// The original as a transport envelope carries it in `postacert.eml`
/// (SPEC.md §2.4): its (first) `Message-ID` replaced in place by
/// `<identificativo>` (further Message-ID fields dropped; one appended when
/// there was none) and `X-Riferimento-Message-ID: <msgid>` appended to its
/// header when the client's msgid is known. Everything else is kept byte
/// for byte (after conversion to CRLF line endings).
pub fn postacert_original(original: &[u8], identificativo: &str, msgid: Option<&str>) -> Vec<u8> {
    let original = to_crlf(original);
    let split = split_header(&original);
    let mut out = Vec::with_capacity(original.len() + 200);
    let message_id = msg_id_header("Message-ID", identificativo);
    let mut replaced = false;
    let mut last_end = 0;
    for f in &split.fields {
        last_end = f.range.end;
        if f.is("Message-ID") {
            if !replaced {
                out.extend_from_slice(message_id.as_bytes());
                replaced = true;
            }
            continue;
        }
        out.extend_from_slice(&original[f.range.clone()]);
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    if !replaced {
        out.extend_from_slice(message_id.as_bytes());
    }
    if let Some(m) = msgid.and_then(normalize_message_id) {
        out.extend_from_slice(msg_id_header(wire::H_RIFERIMENTO, &m).as_bytes());
    }
    // The blank line and the body, untouched (or a blank line when the
    // original had no body at all).
    let rest = &original[last_end.max(split.header_end)..];
    if rest.is_empty() {
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(rest);
    }
    out
}

/// The original of a breve delivery receipt (SPEC.md §2.6): every MIME part
/// with a file name (`name` or `filename`) and every `message/rfc822` part
/// is replaced by a `text/plain` part named `<file name>.hash` whose content
/// is `sha1_hex` of the part's content (an unnamed message part is named
/// `messaggio-<n>.eml`). Everything else is kept byte for byte, so
/// multipart/signed originals keep their structure (their signature no
/// longer verifies), and an original that is a single part (for instance
/// an opaque `application/pkcs7-mime`) is left intact.
///
/// The rules say the hash is computed on "the entire content of the part"
/// and also "on base64 encoded parts"; we hash the **decoded** content (the
/// bytes of the file, after base64 / quoted-printable decoding), which is
/// what a sender can recompute from the attachment it kept.
pub fn breve_original(postacert: &[u8], sha1_hex: &dyn Fn(&[u8]) -> String) -> Vec<u8> {
    let original = to_crlf(postacert);
    let Some(msg) = parser().parse(original.as_ref()) else {
        return original.into_owned();
    };
    let mut replacements: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    let mut unnamed = 0usize;
    for (i, part) in msg.parts.iter().enumerate() {
        if i == 0 || part.sub_parts().is_some() {
            continue;
        }
        let is_message = matches!(part.body, PartType::Message(_));
        let name = part
            .attachment_name()
            .map(one_line)
            .filter(|n| !n.trim().is_empty());
        let name = match (name, is_message) {
            (Some(n), _) => n,
            (None, true) => {
                unnamed += 1;
                format!("messaggio-{unnamed}.eml")
            }
            (None, false) => continue,
        };
        let (start, body, end) = (
            part.offset_header as usize,
            part.offset_body as usize,
            part.offset_end as usize,
        );
        let (Some(raw_body), true) = (original.get(body..end), start <= body) else {
            continue;
        };
        let encoding = part
            .content_transfer_encoding()
            .map(|e| e.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let decoded = match encoding.as_str() {
            "base64" => base64_decode(raw_body),
            "quoted-printable" => qp_decode(raw_body),
            _ => raw_body.to_vec(),
        };
        let hash = one_line(&sha1_hex(&decoded));
        let file = format!("{name}.hash");
        let part_bytes = format!(
            "Content-Type: text/plain; charset=\"us-ascii\"; {}\r\n\
             Content-Disposition: attachment; {}\r\n\
             Content-Transfer-Encoding: 7bit\r\n\
             \r\n\
             {hash}",
            mime_param("name", &file),
            mime_param("filename", &file)
        );
        replacements.push((start, end, part_bytes.into_bytes()));
    }
    replacements.sort_by_key(|r| r.0);
    let mut out = Vec::with_capacity(original.len());
    let mut at = 0usize;
    for (start, end, bytes) in replacements {
        if start < at {
            // Overlapping ranges cannot happen for leaves; be safe anyway.
            continue;
        }
        out.extend_from_slice(&original[at..start]);
        out.extend_from_slice(&bytes);
        at = end;
    }
    out.extend_from_slice(&original[at..]);
    out
}

// ---------------------------------------------------------------------------
// Assembling a receipt or notice

/// Everything a receipt or notice needs; [`Receipt::build`] writes it.
struct Receipt<'a> {
    tx: &'a Transaction,
    /// The wire type, used in the Message-ID and the boundaries.
    kind_tag: &'a str,
    to: &'a str,
    subject_prefix: &'a str,
    /// `X-Ricevuta` and friends, in order.
    type_headers: Vec<(&'a str, String)>,
    text: Text,
    xml: Option<String>,
    postacert: Option<&'a [u8]>,
    /// What makes this message unique among those of its kind in the
    /// transaction (recipient, error text, ...).
    salt: &'a [&'a str],
}

impl Receipt<'_> {
    fn build(self) -> Composed {
        let tx = self.tx;
        let mut h = String::new();
        h.push_str(&date_header(&tx.time));
        h.push_str(&format!("From: {}\r\n", address(&tx.service_address)));
        h.push_str(&format!("To: {}\r\n", address(self.to)));
        h.push_str(&unstructured_header(
            "Subject",
            &format!("{}{}", self.subject_prefix, tx.oggetto),
        ));
        h.push_str(&msg_id_header(
            "Message-ID",
            &own_message_id(tx, self.kind_tag, self.salt),
        ));
        if let Some(m) = tx.normalized_msgid() {
            h.push_str(&msg_id_header(wire::H_RIFERIMENTO, &m));
        }
        for (name, value) in &self.type_headers {
            h.push_str(&format!("{name}: {}\r\n", one_line(value)));
        }
        let entity = entity(
            &boundary_seed(tx, self.kind_tag, self.salt),
            &self.text,
            self.xml.as_deref(),
            self.postacert,
        );
        Composed {
            outer_headers: h,
            entity,
        }
    }
}

/// A receipt's own Message-ID (without brackets): the identificativo's
/// local part and a hash of the kind, the time and what makes the message
/// unique, at the issuing provider's domain (Aruba also derives receipt
/// ids from the identificativo), e.g.
/// `opec.x.20261126101500.1.1.3f2a9c1d0b7e@pec.sandbox.test`.
fn own_message_id(tx: &Transaction, kind_tag: &str, salt: &[&str]) -> String {
    let ident = msg_id_text(&tx.identificativo);
    let (local, ident_domain) = match ident.rsplit_once('@') {
        Some((l, d)) => (l.to_owned(), Some(d.to_owned())),
        None => (ident.clone(), None),
    };
    let domain = domain_of(&address(&tx.service_address))
        .map(msg_id_text)
        .or(ident_domain)
        .unwrap_or_else(|| "localhost".to_owned());
    let mut h = Fnv::new();
    h.write(kind_tag.as_bytes());
    for s in salt {
        h.write(&[0]);
        h.write(s.as_bytes());
    }
    h.write(&[0]);
    h.write(tx.time.timestamp().as_second().to_string().as_bytes());
    format!("{local}.{:012x}@{domain}", h.finish() >> 16)
}

fn boundary_seed(tx: &Transaction, kind_tag: &str, salt: &[&str]) -> String {
    let mut h = Fnv::new();
    h.write(tx.identificativo.as_bytes());
    h.write(&[0]);
    h.write(kind_tag.as_bytes());
    for s in salt {
        h.write(&[0]);
        h.write(s.as_bytes());
    }
    h.write(&[0]);
    h.write(tx.time.timestamp().as_second().to_string().as_bytes());
    format!("{:016x}", h.finish())
}

/// The `multipart/mixed` entity: texts, daticert, original.
fn entity(seed: &str, text: &Text, xml: Option<&str>, postacert: Option<&[u8]>) -> Vec<u8> {
    let plain = qp_encode(&latin1(&text.plain()));
    let html = qp_encode(&latin1(&text.html()));
    let xml_b64 = xml.map(|x| base64_lines(x.as_bytes()));
    let eight_bit = postacert.is_some_and(|p| !p.is_ascii());
    // Boundaries never occur in QP or base64 text; make sure the embedded
    // original does not contain them either.
    let mut n = 0u32;
    let (mixed, alt) = loop {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("_{n}")
        };
        let mixed = format!("----=_PEC_{seed}{suffix}");
        let alt = format!("----=_PEC_{seed}{suffix}_1");
        if postacert.is_none_or(|p| !contains(p, mixed.as_bytes())) {
            break (mixed, alt);
        }
        n += 1;
    };
    let mut e: Vec<u8> =
        Vec::with_capacity(plain.len() + html.len() + postacert.map_or(0, <[u8]>::len) + 2048);
    let put = |e: &mut Vec<u8>, s: &str| e.extend_from_slice(s.as_bytes());
    put(
        &mut e,
        &format!("Content-Type: multipart/mixed; boundary=\"{mixed}\"\r\n"),
    );
    if eight_bit {
        put(&mut e, "Content-Transfer-Encoding: 8bit\r\n");
    }
    put(
        &mut e,
        "\r\nThis is a multi-part message in MIME format.\r\n",
    );
    put(
        &mut e,
        &format!(
            "\r\n--{mixed}\r\nContent-Type: multipart/alternative; boundary=\"{alt}\"\r\n\r\n"
        ),
    );
    for (subtype, body) in [("plain", &plain), ("html", &html)] {
        put(
            &mut e,
            &format!(
                "--{alt}\r\n\
                 Content-Type: text/{subtype}; charset=\"iso-8859-1\"\r\n\
                 Content-Disposition: inline\r\n\
                 Content-Transfer-Encoding: quoted-printable\r\n\r\n{body}\r\n"
            ),
        );
    }
    put(&mut e, &format!("--{alt}--\r\n"));
    if let Some(b64) = &xml_b64 {
        put(
            &mut e,
            &format!(
                "\r\n--{mixed}\r\n\
                 Content-Type: application/xml; name=\"{0}\"\r\n\
                 Content-Disposition: inline; filename=\"{0}\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n{b64}\r\n",
                wire::DATICERT_XML
            ),
        );
    }
    if let Some(p) = postacert {
        put(
            &mut e,
            &format!(
                "\r\n--{mixed}\r\n\
                 Content-Type: message/rfc822; name=\"{0}\"\r\n\
                 Content-Disposition: inline; filename=\"{0}\"\r\n\
                 Content-Transfer-Encoding: {1}\r\n\r\n",
                wire::POSTACERT_EML,
                if p.is_ascii() { "7bit" } else { "8bit" }
            ),
        );
        e.extend_from_slice(p);
        put(&mut e, "\r\n");
    }
    put(&mut e, &format!("--{mixed}--\r\n"));
    e
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Human texts

/// A human-readable text, rendered as plain text and as HTML.
struct Text {
    title: &'static str,
    /// The first line of the plain text.
    head: String,
    lines: Vec<String>,
    /// Ends with the line pointing to daticert.xml.
    daticert_note: bool,
}

const DATICERT_NOTE: &str =
    "L'allegato daticert.xml contiene informazioni di servizio sulla trasmissione";

impl Text {
    fn plain(&self) -> String {
        let mut s = format!("{}\n\n", self.head);
        for l in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        if self.daticert_note {
            s.push_str(DATICERT_NOTE);
            s.push('\n');
        }
        s
    }

    fn html(&self) -> String {
        let mut s = format!(
            "<html>\n<head><title>{0}</title></head>\n<body>\n<h3>{0}</h3>\n<hr><br>\n",
            html_escape(self.title)
        );
        for l in &self.lines {
            s.push_str(&html_escape(l));
            s.push_str("<br>\n");
        }
        if self.daticert_note {
            s.push_str(&html_escape(DATICERT_NOTE));
            s.push_str("<br>\n");
        }
        s.push_str("</body>\n</html>\n");
        s
    }
}

/// `Il giorno dd/mm/yyyy alle ore hh:mm:ss (+hhmm)`, local legal time.
fn at_line(time: &ZonedDateTime) -> String {
    format!(
        "Il giorno {} alle ore {} ({})",
        time.strftime("%d/%m/%Y"),
        time.strftime("%H:%M:%S"),
        time.strftime("%z")
    )
}

/// The first two lines of most texts: `<at> <what>` and
/// `"<oggetto>" <by> "<mittente>"`.
fn intro(tx: &Transaction, what: &str, by: &str) -> Vec<String> {
    vec![
        format!("{} {what}", at_line(&tx.time)),
        format!(
            "\"{}\" {by} \"{}\"",
            one_line(&tx.oggetto),
            one_line(&tx.mittente)
        ),
    ]
}

fn identificativo_line(tx: &Transaction) -> String {
    format!(
        "Identificativo del messaggio: {}",
        one_line(&tx.identificativo)
    )
}

/// `address ("posta certificata")` or `address ("posta ordinaria")`.
fn dest_labels(tx: &Transaction) -> Vec<String> {
    tx.destinatari
        .iter()
        .map(|d| {
            let label = if d.is_certified() {
                "posta certificata"
            } else {
                "posta ordinaria"
            };
            format!("{} (\"{label}\")", one_line(&d.address))
        })
        .collect()
}

/// HTML-escapes text; characters outside ISO-8859-1 become numeric
/// character references (lossless in an ISO-8859-1 page).
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) > 0xFF => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// ISO-8859-1 bytes of a text: common typographic characters outside the
/// charset are transliterated (dashes, curly quotes, ellipsis, euro), any
/// other becomes `?`.
fn latin1(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        let code = c as u32;
        if code <= 0xFF {
            // Every char up to U+00FF is one ISO-8859-1 byte.
            out.push(u8::try_from(code).unwrap_or(b'?'));
            continue;
        }
        let sub: &[u8] = match c {
            '\u{2010}'..='\u{2015}' | '\u{2212}' => b"-",
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{2032}' => b"'",
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{2033}' => b"\"",
            '\u{2026}' => b"...",
            '\u{20AC}' => b"EUR",
            '\u{2022}' => b"*",
            _ => b"?",
        };
        out.extend_from_slice(sub);
    }
    out
}

// ---------------------------------------------------------------------------
// Headers

/// A value for one header line: CR and LF removed (a line break between two
/// words becomes one space), other control characters dropped.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending_break = false;
    for c in s.chars() {
        if c == '\r' || c == '\n' {
            pending_break = true;
            continue;
        }
        if pending_break {
            pending_break = false;
            if !c.is_whitespace() && !out.is_empty() && !out.ends_with(char::is_whitespace) {
                out.push(' ');
            }
        }
        if c.is_control() && c != '\t' {
            continue;
        }
        out.push(c);
    }
    out
}

/// An address for a header: one line, no whitespace, none of the
/// characters that would start another address or a route.
fn address(s: &str) -> String {
    one_line(s)
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '<' | '>' | ',' | ';' | '"' | '(' | ')'))
        .collect()
}

/// The text of a msg-id (between the brackets): printable ASCII without
/// whitespace, brackets or specials that would end it.
fn msg_id_text(s: &str) -> String {
    let t: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | '"' | '\\' | '(' | ')' | ','))
        .collect();
    if t.is_empty() {
        "unknown".to_owned()
    } else {
        t
    }
}

/// `Name: <id>` (the id sanitised), folded before the id when the line
/// would exceed 78 characters.
fn msg_id_header(name: &str, id: &str) -> String {
    let id = msg_id_text(id);
    if name.len() + id.len() + 4 > 78 {
        format!("{name}:\r\n <{id}>\r\n")
    } else {
        format!("{name}: <{id}>\r\n")
    }
}

fn date_header(time: &ZonedDateTime) -> String {
    format!("Date: {}\r\n", time.strftime("%a, %d %b %Y %H:%M:%S %z"))
}

/// `From: "Per conto di: <sender>" <service>`; the display name is RFC 2047
/// encoded when not ASCII.
fn per_conto_di_from(sender: &str, service: &str) -> String {
    let name = format!("{}{}", wire::PER_CONTO_DI, address(sender));
    let display = if name.is_ascii() {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        encoded_words(&name, 40).join(" ")
    };
    let service = address(service);
    if display.len() + service.len() + 9 > 78 {
        format!("From: {display}\r\n <{service}>\r\n")
    } else {
        format!("From: {display} <{service}>\r\n")
    }
}

/// An unstructured header field (`Subject`): one line, folded at spaces to
/// stay within 78 characters where possible; the whole value RFC 2047
/// encoded (UTF-8, base64) when it is not ASCII.
fn unstructured_header(name: &str, value: &str) -> String {
    let value = one_line(value);
    if value.is_ascii() {
        return fold_ascii(name, &value);
    }
    // Bytes of UTF-8 per encoded word so that each line stays within 78:
    // `=?UTF-8?B?` + base64 + `?=` after "Name: " or " ".
    let first = 78usize.saturating_sub(name.len() + 2 + 12) / 4 * 3;
    let rest = (78 - 1 - 12) / 4 * 3;
    let words = encoded_words_sized(&value, first, rest);
    let mut out = format!("{name}: ");
    out.push_str(&words.join("\r\n "));
    out.push_str("\r\n");
    out
}

fn fold_ascii(name: &str, value: &str) -> String {
    let mut out = format!("{name}:");
    let mut line_len = out.len();
    // Each word keeps its leading space: folding inserts CRLF before it, so
    // unfolding (removing CRLF) restores the value exactly. Empty words
    // (runs of spaces) are never moved to a line of their own.
    for (i, word) in value.split(' ').enumerate() {
        let piece_len = word.len() + 1;
        if i > 0 && !word.is_empty() && line_len + piece_len > 78 {
            out.push_str("\r\n");
            line_len = 0;
        }
        out.push(' ');
        out.push_str(word);
        line_len += piece_len;
    }
    out.push_str("\r\n");
    out
}

fn encoded_words(value: &str, max_bytes: usize) -> Vec<String> {
    encoded_words_sized(value, max_bytes, max_bytes)
}

/// RFC 2047 `B` encoded words of UTF-8 text, split on character
/// boundaries: at most `first` bytes in the first word, `rest` in the
/// others.
fn encoded_words_sized(value: &str, first: usize, rest: usize) -> Vec<String> {
    let mut words = Vec::new();
    let mut chunk = String::new();
    let mut limit = first.max(4);
    for c in value.chars() {
        if chunk.len() + c.len_utf8() > limit && !chunk.is_empty() {
            words.push(format!("=?UTF-8?B?{}?=", base64(chunk.as_bytes())));
            chunk.clear();
            limit = rest.max(4);
        }
        chunk.push(c);
    }
    if !chunk.is_empty() || words.is_empty() {
        words.push(format!("=?UTF-8?B?{}?=", base64(chunk.as_bytes())));
    }
    words
}

/// A MIME parameter: `name="value"` for printable ASCII, RFC 2231
/// `name*=utf-8''%XX` otherwise.
fn mime_param(name: &str, value: &str) -> String {
    let plain = value
        .chars()
        .all(|c| (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ');
    if plain {
        return format!("{name}=\"{value}\"");
    }
    let mut enc = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            enc.push(char::from(b));
        } else {
            let _ = write!(enc, "%{b:02X}");
        }
    }
    format!("{name}*=utf-8''{enc}")
}

/// The header of a message, as byte ranges of its fields.
struct Header {
    fields: Vec<Field>,
    /// Where the header ends (the start of the blank line, or the end of
    /// the input when there is none).
    header_end: usize,
}

/// One header field: its name and the bytes from the name to the end of
/// its last line (CRLF included when present).
struct Field {
    name: String,
    range: std::ops::Range<usize>,
}

impl Field {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The whole field as one header, line endings normalised to CRLF and
    /// every continuation line starting with whitespace (so that it stays
    /// one field whatever it contains).
    fn sanitized(&self, raw: &[u8]) -> String {
        let text = String::from_utf8_lossy(&raw[self.range.clone()]);
        let mut out = String::with_capacity(text.len() + 4);
        for (i, line) in text.split("\r\n").filter(|l| !l.is_empty()).enumerate() {
            let line: String = line
                .chars()
                .filter(|&c| c != '\r' && c != '\n' && (c == '\t' || !c.is_control()))
                .collect();
            if i > 0 {
                out.push_str("\r\n");
                if !line.starts_with([' ', '\t']) {
                    out.push(' ');
                }
            }
            out.push_str(&line);
        }
        out.push_str("\r\n");
        out
    }

    /// The value of the field (everything after the colon, folding kept,
    /// without the final CRLF), sanitised like [`Field::sanitized`].
    fn value_sanitized(&self, raw: &[u8]) -> String {
        let whole = self.sanitized(raw);
        let whole = whole.strip_suffix("\r\n").unwrap_or(&whole);
        match whole.split_once(':') {
            Some((_, v)) => v.to_owned(),
            None => String::new(),
        }
    }
}

impl Header {
    fn first(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.is(name))
    }
}

/// Splits the header of a CRLF message into fields.
fn split_header(raw: &[u8]) -> Header {
    let mut fields: Vec<Field> = Vec::new();
    let mut pos = 0;
    let mut header_end = raw.len();
    while pos < raw.len() {
        let line_end = find_crlf(raw, pos).map_or(raw.len(), |i| i + 2);
        let line = &raw[pos..line_end];
        if line == b"\r\n" {
            header_end = pos;
            break;
        }
        match (line.first(), fields.last_mut()) {
            (Some(b' ' | b'\t'), Some(last)) => last.range.end = line_end,
            _ => {
                let name_end = line.iter().position(|&b| b == b':').unwrap_or(0);
                fields.push(Field {
                    name: String::from_utf8_lossy(&line[..name_end]).trim().to_owned(),
                    range: pos..line_end,
                });
            }
        }
        pos = line_end;
    }
    Header { fields, header_end }
}

fn find_crlf(raw: &[u8], from: usize) -> Option<usize> {
    raw.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

// ---------------------------------------------------------------------------
// Encodings

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Base64 in lines of 76 characters separated by CRLF (no final CRLF).
fn base64_lines(bytes: &[u8]) -> String {
    let encoded = base64(bytes);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 38);
    for (i, chunk) in encoded.as_bytes().chunks(76).enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        out.extend(chunk.iter().map(|&b| char::from(b)));
    }
    out
}

/// Decodes base64, skipping anything outside the alphabet (line breaks,
/// garbage) and stopping at padding.
fn base64_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in input {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xFF) as u8);
        }
    }
    out
}

/// Decodes quoted-printable (soft line breaks removed, `=XX` decoded,
/// anything malformed kept as is).
fn qp_decode(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let c = input[i];
        if c != b'=' {
            out.push(c);
            i += 1;
            continue;
        }
        match (input.get(i + 1), input.get(i + 2)) {
            (Some(b'\r'), Some(b'\n')) => i += 3,
            (Some(b'\n'), _) => i += 2,
            (Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Quoted-printable of text whose lines end in `\n`: CRLF line breaks,
/// soft breaks keep lines within 76 characters, trailing whitespace
/// encoded.
fn qp_encode(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len() * 11 / 10 + 16);
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    for (n, line) in body.split(|&b| b == b'\n').enumerate() {
        if n > 0 {
            out.push_str("\r\n");
        }
        let mut len = 0;
        for (i, &b) in line.iter().enumerate() {
            let last = i + 1 == line.len();
            let literal = (b == b' ' || b == b'\t') && !last || (b.is_ascii_graphic() && b != b'=');
            let token = if literal {
                char::from(b).to_string()
            } else {
                format!("={b:02X}")
            };
            if len + token.len() > 75 {
                out.push_str("=\r\n");
                len = 0;
            }
            out.push_str(&token);
            len += token.len();
        }
    }
    out
}

/// FNV-1a, 64 bits: a deterministic, non-cryptographic hash for boundaries
/// and Message-IDs (uniqueness among a provider's messages, not secrecy).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pec::daticert::Daticert;
    use crate::pec::inspect::{Inspection, inspect};
    use crate::pec::kind::Kind;

    const MITTENTE: &str = "protocollo@pec.comune.example.it";
    const TO: &str = "fornitore@pec.other.test";
    const CC: &str = "ufficio@pec.other.test";
    const ESTERNO: &str = "info@example.com";
    const MSGID: &str = "gw-20261126-0001.7f3c2a@gateway.comune.example.it";
    const IDENT: &str = "opec.sandbox.20261126101500.123.1@pec.sandbox.test";
    const SERVICE: &str = "posta-certificata@pec.sandbox.test";
    const SERVICE2: &str = "posta-certificata@pec.other.test";
    const GESTORE: &str = "Sandbox PEC S.p.A.";
    const GESTORE2: &str = "Other PEC S.p.A.";
    const OGGETTO: &str = "Prot. 123/2026 - Richiesta documentazione";

    fn winter() -> ZonedDateTime {
        "2026-11-26T10:15:00+01:00[Europe/Rome]".parse().unwrap()
    }

    fn summer() -> ZonedDateTime {
        "2026-07-15T09:30:05+02:00[Europe/Rome]".parse().unwrap()
    }

    fn dest(address: &str, tipo: &str) -> Destinatario {
        Destinatario {
            address: address.to_owned(),
            tipo: tipo.to_owned(),
        }
    }

    fn tx_at(time: ZonedDateTime, oggetto: &str) -> Transaction {
        Transaction {
            identificativo: IDENT.to_owned(),
            time,
            mittente: MITTENTE.to_owned(),
            destinatari: vec![
                dest(TO, wire::DEST_CERTIFICATO),
                dest(CC, wire::DEST_CERTIFICATO),
                dest(ESTERNO, wire::DEST_ESTERNO),
            ],
            risposte: MITTENTE.to_owned(),
            oggetto: oggetto.to_owned(),
            msgid: Some(format!("<{MSGID}>")),
            gestore: GESTORE.to_owned(),
            service_address: SERVICE.to_owned(),
            ricevuta: ReceiptType::Completa,
        }
    }

    fn tx() -> Transaction {
        tx_at(winter(), OGGETTO)
    }

    /// The recipient's provider, three minutes later.
    fn tx2() -> Transaction {
        let later: ZonedDateTime = "2026-11-26T10:18:07+01:00[Europe/Rome]".parse().unwrap();
        tx().issued_by(GESTORE2, SERVICE2, later)
    }

    const PDF: &[u8] = b"%PDF-1.4\n% fake pdf for tests\n1 0 obj << >> endobj\ntrailer\n%%EOF\n";
    const NOTE: &str = "Nota con = segni e accenti: \u{e8} \u{e0}\nseconda riga\n";
    const INNER: &str = "From: a@example.com\r\nSubject: inoltrato\r\n\r\ntesto inoltrato\r\n";

    /// A submitted message: 8-bit body, a base64 PDF, a QP text
    /// attachment, an unnamed attached message, an inline image.
    fn original() -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(
            b"Received: from [192.0.2.15] (gateway.comune.example.it [192.0.2.15])\r\n\
              \tby smtp.pec.sandbox.test with ESMTPSA id 4XyZ1Q\r\n\
              \tfor <fornitore@pec.other.test>; Thu, 26 Nov 2026 10:14:59 +0100\r\n\
              Date: Thu, 26 Nov 2026 10:14:58 +0100\r\n\
              From: Ufficio Protocollo <protocollo@pec.comune.example.it>\r\n\
              To: Fornitore <fornitore@pec.other.test>,\r\n info@example.com\r\n\
              Cc: ufficio@pec.other.test\r\n\
              Subject: Prot. 123/2026 - Richiesta documentazione\r\n\
              Message-ID: <gw-20261126-0001.7f3c2a@gateway.comune.example.it>\r\n\
              X-TipoRicevuta: completa\r\n\
              MIME-Version: 1.0\r\n\
              Content-Type: multipart/mixed; boundary=\"=_orig\"\r\n\
              \r\n\
              This is a multi-part message in MIME format.\r\n\
              --=_orig\r\n\
              Content-Type: text/plain; charset=\"iso-8859-1\"\r\n\
              Content-Transfer-Encoding: 8bit\r\n\
              \r\n\
              Buongiorno, si invia la richiesta. Cos\xec \xe8.\r\n\
              --=_orig\r\n\
              Content-Type: application/pdf; name=\"richiesta.pdf\"\r\n\
              Content-Disposition: attachment; filename=\"richiesta.pdf\"\r\n\
              Content-Transfer-Encoding: base64\r\n\
              \r\n",
        );
        m.extend_from_slice(base64_lines(PDF).as_bytes());
        m.extend_from_slice(
            b"\r\n--=_orig\r\n\
              Content-Type: text/plain; charset=\"utf-8\"\r\n\
              Content-Disposition: attachment; filename*=utf-8''nota%20%C3%A8.txt\r\n\
              Content-Transfer-Encoding: quoted-printable\r\n\
              \r\n",
        );
        m.extend_from_slice(qp_encode(NOTE.as_bytes()).as_bytes());
        m.extend_from_slice(
            b"\r\n--=_orig\r\n\
              Content-Type: message/rfc822\r\n\
              \r\n",
        );
        m.extend_from_slice(INNER.as_bytes());
        m.extend_from_slice(
            b"\r\n--=_orig\r\n\
              Content-Type: image/png\r\n\
              Content-Disposition: inline; filename=\"logo.png\"\r\n\
              Content-Transfer-Encoding: base64\r\n\
              \r\n\
              iVBORw0KGgo=\r\n\
              --=_orig--\r\n",
        );
        m
    }

    /// The original as postacert.eml must carry it, written by hand.
    fn expected_postacert(original: &[u8]) -> Vec<u8> {
        let text = original.to_vec();
        let old = format!("Message-ID: <{MSGID}>\r\n");
        let new = format!("Message-ID: <{IDENT}>\r\n");
        let at = text
            .windows(old.len())
            .position(|w| w == old.as_bytes())
            .unwrap();
        let mut out = text[..at].to_vec();
        out.extend_from_slice(new.as_bytes());
        let rest = &text[at + old.len()..];
        let blank = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
        out.extend_from_slice(&rest[..blank]);
        out.extend_from_slice(format!("X-Riferimento-Message-ID: <{MSGID}>\r\n").as_bytes());
        out.extend_from_slice(&rest[blank..]);
        out
    }

    /// A stand-in for SHA-1 (the core has no cryptography): 40 hex digits
    /// that depend on every byte.
    fn fake_sha1(bytes: &[u8]) -> String {
        let mut out = String::new();
        for salt in 0u8..3 {
            let mut h = Fnv::new();
            h.write(&[salt]);
            h.write(bytes);
            out.push_str(&format!("{:016x}", h.finish()));
        }
        out.truncate(40);
        out
    }

    /// The expected certification data of a message of `tx`.
    fn expected(tx: &Transaction, tipo: &str, errore: Errore) -> Daticert {
        Daticert {
            tipo: tipo.to_owned(),
            errore: errore.as_str().to_owned(),
            mittente: Some(tx.mittente.clone()),
            destinatari: tx.destinatari.clone(),
            risposte: Some(tx.risposte.clone()),
            oggetto: Some(tx.oggetto.clone()).filter(|o| !o.is_empty()),
            gestore_emittente: Some(tx.gestore.clone()),
            data: tx.time.timestamp(),
            identificativo: tx.identificativo.clone(),
            msgid: Some(MSGID.to_owned()),
            ricevuta: None,
            consegna: None,
            ricezione: Vec::new(),
            errore_esteso: None,
            errore_code: None,
        }
    }

    /// Inspects the unsigned message and runs the checks common to every
    /// receipt or notice.
    fn check<'a>(raw: &'a [u8], tx: &Transaction, kind: Kind, prefix: &str) -> Inspection<'a> {
        let ins = inspect(raw).expect("a message");
        assert_eq!(ins.kind(), &kind);
        assert!(ins.problems.is_empty(), "{kind}: {:?}", ins.problems);
        let m = &ins.message;
        assert_eq!(m.classification.refers_to.as_deref(), Some(MSGID));
        assert_eq!(
            m.subject.as_deref(),
            Some(format!("{prefix}{}", tx.oggetto).as_str())
        );
        assert_eq!(m.date, Some(tx.time.timestamp()));
        assert!(ins.daticert_error.is_none());
        if kind != Kind::Transport {
            assert_eq!(m.from.as_deref(), Some(tx.service_address.as_str()));
            assert_ne!(m.message_id.as_deref(), Some(IDENT));
            assert!(m.message_id.is_some());
        }
        let text = m.text.as_deref().expect("a text part");
        assert!(
            text.contains(&format!(
                "Il giorno {} alle ore {} ({})",
                tx.time.strftime("%d/%m/%Y"),
                tx.time.strftime("%H:%M:%S"),
                tx.time.strftime("%z")
            )),
            "{text}"
        );
        assert!(m.others.is_empty(), "{:?}", m.others);
        check_lines(raw);
        ins
    }

    /// CRLF everywhere; generated header lines within 78 characters; no
    /// line over 998.
    fn check_lines(raw: &[u8]) {
        let mut in_header = true;
        for line in raw.split(|&b| b == b'\n') {
            if !line.is_empty() {
                assert!(
                    line.ends_with(b"\r"),
                    "bare LF: {:?}",
                    String::from_utf8_lossy(line)
                );
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(line.len() <= 998);
            if in_header && line.is_empty() {
                in_header = false;
            }
            if in_header && !line.starts_with(b"Received") && !line.starts_with(b"\t") {
                assert!(line.len() <= 78, "{:?}", String::from_utf8_lossy(line));
            }
        }
    }

    fn top_headers(c: &Composed, name: &str) -> Vec<String> {
        c.outer_headers
            .split("\r\n")
            .filter(|l| {
                l.split_once(':')
                    .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn acceptance_winter_and_summer() {
        for (time, giorno, ora, zona) in [
            (winter(), "26/11/2026", "10:15:00", "+0100"),
            (summer(), "15/07/2026", "09:30:05", "+0200"),
        ] {
            let tx = tx_at(time, OGGETTO);
            let c = acceptance(&tx);
            let raw = c.unsigned();
            let ins = check(&raw, &tx, Kind::Acceptance, wire::subject::ACCETTAZIONE);
            assert_eq!(ins.message.to, vec![MITTENTE.to_owned()]);
            assert_eq!(
                ins.daticert.as_ref().unwrap(),
                &expected(&tx, wire::ACCETTAZIONE, Errore::Nessuno)
            );
            assert!(ins.message.postacert.is_none());
            let xml = String::from_utf8(ins.message.daticert_xml.clone().unwrap()).unwrap();
            assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"));
            assert!(xml.contains(&format!(
                "        <data zona=\"{zona}\">\n            <giorno>{giorno}</giorno>\n            <ora>{ora}</ora>\n"
            )));
            assert!(xml.contains(&format!("<msgid>&lt;{MSGID}&gt;</msgid>")));
            let text = ins.message.text.as_deref().unwrap();
            assert!(text.contains(&format!("{ESTERNO} (\"posta ordinaria\")")));
            assert!(text.contains(&format!("{TO} (\"posta certificata\")")));
            assert!(text.contains("è stato accettato dal sistema ed inoltrato."));
            assert!(text.contains(&format!("Identificativo del messaggio: {IDENT}")));
            assert!(
                c.outer_headers
                    .contains(&format!("Date: {}", time_rfc(&tx)))
            );
        }
    }

    fn time_rfc(tx: &Transaction) -> String {
        tx.time.strftime("%a, %d %b %Y %H:%M:%S %z").to_string()
    }

    #[test]
    fn non_acceptance_formal_and_virus() {
        let tx = tx();
        let reason = "Il destinatario x@pec.other.test non compare in To o Cc";
        let c = non_acceptance(&tx, reason, false);
        let raw = c.unsigned();
        let ins = check(
            &raw,
            &tx,
            Kind::NonAcceptance,
            wire::subject::NON_ACCETTAZIONE,
        );
        let mut want = expected(&tx, wire::NON_ACCETTAZIONE, Errore::Altro);
        want.errore_esteso = Some(reason.to_owned());
        assert_eq!(ins.daticert.as_ref().unwrap(), &want);
        assert!(!ins.message.classification.virus);
        assert!(ins.message.postacert.is_none());
        assert!(ins.message.text.as_deref().unwrap().contains(reason));

        let c = non_acceptance(&tx, "Eicar-Test-Signature", true);
        let raw = c.unsigned();
        let ins = check(
            &raw,
            &tx,
            Kind::NonAcceptance,
            wire::subject::NON_ACCETTAZIONE_VIRUS,
        );
        let mut want = expected(&tx, wire::NON_ACCETTAZIONE, Errore::Virus);
        want.errore_esteso = Some("Eicar-Test-Signature".to_owned());
        assert_eq!(ins.daticert.as_ref().unwrap(), &want);
        assert!(ins.message.classification.virus);
        assert!(ins.message.postacert.is_none());
    }

    #[test]
    fn transport_envelope_carries_the_rewritten_original() {
        for ricevuta in [ReceiptType::Completa, ReceiptType::Breve] {
            let mut tx = tx();
            tx.ricevuta = ricevuta;
            let orig = original();
            let c = transport_envelope(&tx, &orig);
            let raw = c.unsigned();
            let ins = check(&raw, &tx, Kind::Transport, wire::subject::POSTA_CERTIFICATA);
            let mut want = expected(&tx, wire::POSTA_CERTIFICATA, Errore::Nessuno);
            want.ricevuta = Some(ricevuta.as_str().to_owned());
            assert_eq!(ins.daticert.as_ref().unwrap(), &want);
            let m = &ins.message;
            assert_eq!(m.message_id.as_deref(), Some(IDENT));
            assert_eq!(m.from.as_deref(), Some(SERVICE));
            assert_eq!(m.to, vec![TO.to_owned(), ESTERNO.to_owned()]);
            assert_eq!(
                m.classification.tipo_ricevuta.as_deref(),
                Some(ricevuta.as_str())
            );
            let pc = m.postacert.as_deref().expect("postacert.eml");
            assert_eq!(pc, expected_postacert(&orig).as_slice());
            // Body byte-identical, headers: Message-ID replaced, reference appended.
            let body_at = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            assert_eq!(&pc[body_at(pc)..], &orig[body_at(&orig)..]);
            let inner = parser().parse(pc).unwrap();
            assert_eq!(inner.message_id(), Some(IDENT));
            let inner_c = crate::pec::classify::classify_message(&inner);
            assert_eq!(inner_c.refers_to.as_deref(), Some(MSGID));
            // The envelope is 8bit because the original is.
            assert!(c.entity.starts_with(b"Content-Type: multipart/mixed;"));
            assert!(
                contains(
                    &c.entity,
                    b"Content-Transfer-Encoding: 8bit\r\n\r\nReceived:"
                ),
                "postacert part declared 8bit"
            );
            // Inherited and derived headers.
            let parsed = parser().parse(raw.as_slice()).unwrap();
            let from = parsed.from().unwrap().first().unwrap();
            assert_eq!(
                from.name(),
                Some(format!("Per conto di: {MITTENTE}").as_str())
            );
            assert_eq!(
                parsed
                    .reply_to()
                    .and_then(|a| a.first())
                    .and_then(|a| a.address()),
                Some(MITTENTE)
            );
            assert_eq!(
                parsed
                    .cc()
                    .and_then(|a| a.first())
                    .and_then(|a| a.address()),
                Some(CC)
            );
            assert_eq!(top_headers(&c, "Received").len(), 1);
            assert!(c.outer_headers.starts_with("Received: from [192.0.2.15]"));
            let text = m.text.as_deref().unwrap();
            assert!(text.contains(&format!(
                "L'identificativo univoco di questo messaggio è: {IDENT}"
            )));
        }
    }

    #[test]
    fn postacert_original_edge_cases() {
        // No Message-ID, LF line endings, no body.
        let got = postacert_original(b"From: a@b.it\nSubject: x\n", IDENT, Some(MSGID));
        assert_eq!(
            got,
            format!(
                "From: a@b.it\r\nSubject: x\r\nMessage-ID: <{IDENT}>\r\n\
                 X-Riferimento-Message-ID: <{MSGID}>\r\n\r\n"
            )
            .into_bytes()
        );
        // Two Message-IDs (the second dropped), folded one replaced in place,
        // no client msgid: no reference.
        let got = postacert_original(
            b"Message-ID:\r\n <a@b>\r\nTo: c@d\r\nMessage-ID: <e@f>\r\n\r\nbody",
            IDENT,
            None,
        );
        assert_eq!(
            got,
            format!("Message-ID: <{IDENT}>\r\nTo: c@d\r\n\r\nbody").into_bytes()
        );
    }

    #[test]
    fn delivery_completa_breve_sintetica() {
        let envelope = transport_envelope(&tx(), &original()).unsigned();
        let env_ins = inspect(&envelope).unwrap();
        let pc = env_ins.message.postacert.clone().unwrap();
        let tx2 = tx2();
        let cases: [(DeliveryContent<'_>, &str); 3] = [
            (DeliveryContent::Completa { postacert: &pc }, TO),
            (
                DeliveryContent::Breve {
                    postacert: &pc,
                    sha1_hex: &fake_sha1,
                },
                TO,
            ),
            (DeliveryContent::Sintetica, CC),
        ];
        for (content, consegna) in cases {
            let flavour = content.flavour();
            let c = delivery(&tx2, consegna, content);
            let raw = c.unsigned();
            let ins = check(&raw, &tx2, Kind::Delivery, wire::subject::CONSEGNA);
            assert_eq!(ins.message.from.as_deref(), Some(SERVICE2));
            assert_eq!(ins.message.to, vec![MITTENTE.to_owned()]);
            let mut want = expected(&tx2, wire::AVVENUTA_CONSEGNA, Errore::Nessuno);
            want.ricevuta = Some(flavour.as_str().to_owned());
            want.consegna = Some(consegna.to_owned());
            assert_eq!(ins.daticert.as_ref().unwrap(), &want);
            let got = ins.message.postacert.as_deref();
            match flavour {
                ReceiptType::Completa => assert_eq!(got, Some(pc.as_slice())),
                ReceiptType::Sintetica => assert_eq!(got, None),
                ReceiptType::Breve => check_breve(got.expect("breve carries the original"), &pc),
            }
        }
    }

    fn check_breve(breve: &[u8], full: &[u8]) {
        let msg = parser().parse(breve).unwrap();
        let hashes: Vec<(String, String)> = msg
            .attachments()
            .map(|p| {
                (
                    p.attachment_name().unwrap_or_default().to_owned(),
                    String::from_utf8(p.contents().to_vec()).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            hashes,
            vec![
                ("richiesta.pdf.hash".to_owned(), fake_sha1(PDF)),
                // The QP text decodes with CRLF line breaks (and, as encoded
                // here, without the final one).
                (
                    "nota è.txt.hash".to_owned(),
                    fake_sha1(NOTE.trim_end().replace('\n', "\r\n").as_bytes())
                ),
                (
                    "messaggio-1.eml.hash".to_owned(),
                    fake_sha1(INNER.as_bytes())
                ),
                ("logo.png.hash".to_owned(), fake_sha1(b"\x89PNG\r\n\x1a\n")),
            ]
        );
        // The headers and the body text are untouched.
        let head = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        assert_eq!(&breve[..head], &full[..head]);
        let text_part =
            b"Buongiorno, si invia la richiesta. Cos\xec \xe8.\r\n--=_orig\r\nContent-Type: text/plain";
        assert!(contains(breve, text_part));
        assert!(!contains(breve, b"%PDF") && !contains(breve, b"JVBERi0"));
        assert!(!contains(breve, b"testo inoltrato"));
        for p in msg.attachments() {
            assert_eq!(p.content_type().unwrap().ctype(), "text");
        }
    }

    #[test]
    fn breve_leaves_single_part_originals_alone() {
        let opaque =
            b"From: a@b.it\r\nContent-Type: application/pkcs7-mime; name=\"smime.p7m\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\nMIIB\r\n";
        assert_eq!(breve_original(opaque, &fake_sha1), opaque.to_vec());
    }

    #[test]
    fn delivery_errors() {
        let tx2 = tx2();
        let ee = "5.1.1 - Other PEC S.p.A. - indirizzo non valido";
        let c = delivery_error(&tx2, TO, Errore::NoDest, ee);
        let raw = c.unsigned();
        let ins = check(
            &raw,
            &tx2,
            Kind::DeliveryError,
            wire::subject::MANCATA_CONSEGNA,
        );
        let mut want = expected(&tx2, wire::ERRORE_CONSEGNA, Errore::NoDest);
        want.consegna = Some(TO.to_owned());
        want.errore_esteso = Some(ee.to_owned());
        want.errore_code = Some("5.1.1".to_owned());
        assert_eq!(ins.daticert.as_ref().unwrap(), &want);
        assert!(!ins.message.classification.virus);
        assert!(ins.message.postacert.is_none());

        // The virus variant comes from the sender's provider.
        let tx = tx();
        let ee = "virus rilevato: Eicar-Test-Signature";
        let c = delivery_error(&tx, CC, Errore::Virus, ee);
        let raw = c.unsigned();
        let ins = check(
            &raw,
            &tx,
            Kind::DeliveryError,
            wire::subject::MANCATA_CONSEGNA_VIRUS,
        );
        let mut want = expected(&tx, wire::ERRORE_CONSEGNA, Errore::Virus);
        want.consegna = Some(CC.to_owned());
        want.errore_esteso = Some(ee.to_owned());
        assert_eq!(ins.daticert.as_ref().unwrap(), &want);
        assert!(ins.message.classification.virus);
        assert_eq!(
            top_headers(&c, wire::H_VERIFICA_SICUREZZA),
            vec!["X-VerificaSicurezza: errore".to_owned()]
        );
    }

    #[test]
    fn timeout_notices_12h_and_24h() {
        let t12: ZonedDateTime = "2026-11-26T22:15:00+01:00[Europe/Rome]".parse().unwrap();
        let t24: ZonedDateTime = "2026-11-27T10:15:00+01:00[Europe/Rome]".parse().unwrap();
        let mut ids = Vec::new();
        for (time, ee, code, final_) in [
            (
                t12,
                "4.4.7 - Sandbox PEC S.p.A. - nessuna ricevuta entro 12 ore",
                "4.4.7",
                false,
            ),
            (
                t24,
                "5.4.1 - Sandbox PEC S.p.A. - non consegnato entro 24 ore",
                "5.4.1",
                true,
            ),
        ] {
            let tx = tx().issued_by(GESTORE, SERVICE, time);
            let c = timeout_notice(&tx, TO, ee);
            let raw = c.unsigned();
            let ins = check(
                &raw,
                &tx,
                Kind::DeliveryTimeout,
                wire::subject::MANCATA_CONSEGNA_TEMPO,
            );
            let mut want = expected(&tx, wire::PREAVVISO_ERRORE_CONSEGNA, Errore::Altro);
            want.consegna = Some(TO.to_owned());
            want.errore_esteso = Some(ee.to_owned());
            want.errore_code = Some(code.to_owned());
            let d = ins.daticert.as_ref().unwrap();
            assert_eq!(d, &want);
            assert_eq!(d.is_final_error_code(), final_);
            let text = ins.message.text.as_deref().unwrap();
            assert_eq!(text.contains("24 ore"), final_, "{text}");
            assert_eq!(text.contains("12 ore"), !final_, "{text}");
            ids.push(ins.message.message_id.clone().unwrap());
        }
        assert_ne!(ids[0], ids[1]);
    }

    #[test]
    fn provider_to_provider_messages() {
        let tx2 = tx2();
        let ricezione = vec![TO.to_owned(), CC.to_owned()];
        let c = taken_in_charge(&tx2, SERVICE, &ricezione);
        let raw = c.unsigned();
        let ins = check(
            &raw,
            &tx2,
            Kind::TakenInCharge,
            wire::subject::PRESA_IN_CARICO,
        );
        let mut want = expected(&tx2, wire::PRESA_IN_CARICO, Errore::Nessuno);
        want.ricezione = ricezione;
        assert_eq!(ins.daticert.as_ref().unwrap(), &want);
        assert_eq!(ins.message.to, vec![SERVICE.to_owned()]);

        let ee = "virus rilevato: Eicar-Test-Signature";
        let c = virus_detected(&tx2, SERVICE, TO, ee);
        let raw = c.unsigned();
        let ins = check(
            &raw,
            &tx2,
            Kind::VirusDetected,
            wire::subject::PROBLEMA_SICUREZZA,
        );
        let mut want = expected(&tx2, wire::RILEVAZIONE_VIRUS, Errore::Virus);
        want.consegna = Some(TO.to_owned());
        want.errore_esteso = Some(ee.to_owned());
        assert_eq!(ins.daticert.as_ref().unwrap(), &want);
        assert_eq!(
            top_headers(&c, wire::H_MITTENTE),
            vec![format!("X-Mittente: {MITTENTE}")]
        );
    }

    #[test]
    fn anomaly_envelope_wraps_the_received_message() {
        let received = b"Received: from mail.example.com by mx.pec.sandbox.test\r\n\
Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n\
From: Mario Rossi <mario.rossi@example.com>\r\n\
To: protocollo@pec.comune.example.it\r\n\
Subject: =?UTF-8?Q?Richiesta_certificato_=E2=80=93_urgente?=\r\n\
Message-ID: <ordinary.1@example.com>\r\n\
X-Ricevuta: accettazione\r\n\
\r\n\
Testo\r\n";
        let time = winter();
        let c = anomaly_envelope(
            received,
            SERVICE,
            &time,
            "Messaggio non di posta certificata",
        );
        let raw = c.unsigned();
        let ins = inspect(&raw).unwrap();
        assert_eq!(ins.kind(), &Kind::Anomaly);
        assert!(ins.problems.is_empty(), "{:?}", ins.problems);
        assert!(ins.daticert.is_none() && ins.message.daticert_xml.is_none());
        let m = &ins.message;
        assert_eq!(m.postacert.as_deref(), Some(&received[..]));
        assert_eq!(m.message_id.as_deref(), Some("ordinary.1@example.com"));
        assert_eq!(
            m.subject.as_deref(),
            Some("ANOMALIA MESSAGGIO: Richiesta certificato – urgente")
        );
        assert_eq!(m.to, vec![MITTENTE.to_owned()]);
        assert_eq!(m.date, Some(time.timestamp()));
        assert_eq!(m.from.as_deref(), Some(SERVICE));
        let text = m.text.as_deref().unwrap();
        assert!(
            text.contains("Messaggio non di posta certificata"),
            "{text}"
        );
        assert!(text.contains("\"mario.rossi@example.com\""), "{text}");
        assert!(text.contains("Il giorno 26/11/2026 alle ore 10:15:00 (+0100)"));
        assert!(m.others.is_empty());
        // The forged X-Ricevuta stays inside; only X-Trasporto at the top.
        assert!(top_headers(&c, wire::H_RICEVUTA).is_empty());
        assert_eq!(top_headers(&c, "Reply-To").len(), 1);
        check_lines(&raw);

        // Without a Message-ID one is derived, deterministically.
        let bare = b"From: x@example.com\r\nSubject: hi\r\n\r\nbody\r\n";
        let a = anomaly_envelope(bare, SERVICE, &time, "r");
        assert_eq!(a, anomaly_envelope(bare, SERVICE, &time, "r"));
        let ins = inspect(&a.unsigned())
            .map(|i| i.message.message_id)
            .unwrap();
        assert!(ins.unwrap().ends_with("@pec.sandbox.test"));
    }

    #[test]
    fn header_injection_stays_in_one_header() {
        let evil = "Ciao\r\nX-Ricevuta: avvenuta-consegna\r\nBcc: evil@example.com\nX: y";
        let mut tx = tx_at(winter(), evil);
        tx.mittente = "protocollo@pec.comune.example.it\r\nBcc: evil@example.com".to_owned();
        for c in [
            acceptance(&tx),
            transport_envelope(&tx, &original()),
            delivery_error(
                &tx,
                "a@b.it\r\nX-Trasporto: errore",
                Errore::Altro,
                "x\r\ny",
            ),
        ] {
            for bad in ["Bcc", "X"] {
                assert!(top_headers(&c, bad).is_empty(), "{}", c.outer_headers);
            }
            assert!(top_headers(&c, "X-Trasporto").len() <= 1);
            assert_eq!(top_headers(&c, "Subject").len(), 1, "{}", c.outer_headers);
            let raw = c.unsigned();
            let ins = inspect(&raw).unwrap();
            assert_eq!(
                ins.message
                    .subject
                    .as_deref()
                    .map(|s| s.contains("X-Ricevuta: avvenuta-consegna")),
                Some(true)
            );
            assert!(
                matches!(
                    ins.kind(),
                    Kind::Acceptance | Kind::Transport | Kind::DeliveryError
                ),
                "{}",
                ins.kind()
            );
        }
        let raw = acceptance(&tx).unsigned();
        let ins = inspect(&raw).unwrap();
        assert_eq!(ins.kind(), &Kind::Acceptance);
        assert_eq!(
            ins.message.subject.as_deref(),
            Some("ACCETTAZIONE: Ciao X-Ricevuta: avvenuta-consegna Bcc: evil@example.com X: y")
        );
    }

    #[test]
    fn non_ascii_subject_round_trips() {
        let oggetto = "Certificato di residenza – àèìòù";
        let tx = tx_at(summer(), oggetto);
        let c = acceptance(&tx);
        assert!(c.outer_headers.contains("Subject: =?UTF-8?B?"));
        let raw = c.unsigned();
        let ins = check(&raw, &tx, Kind::Acceptance, wire::subject::ACCETTAZIONE);
        assert_eq!(
            ins.daticert.as_ref().unwrap().oggetto.as_deref(),
            Some(oggetto)
        );
        let text = ins.message.text.as_deref().unwrap();
        assert!(
            text.contains("\"Certificato di residenza - àèìòù\""),
            "{text}"
        );
        // The HTML keeps the dash as a character reference.
        assert!(contains(&c.entity, b"&#8211;"));

        // A long one is split into several encoded words within 78 columns.
        let long = "Ünïcödé ".repeat(20);
        let tx = tx_at(winter(), long.trim());
        let raw = delivery(&tx, TO, DeliveryContent::Sintetica).unsigned();
        let ins = check(&raw, &tx, Kind::Delivery, wire::subject::CONSEGNA);
        assert_eq!(ins.daticert.unwrap().oggetto.as_deref(), Some(long.trim()));

        // A long ASCII one is folded at spaces and unfolds to itself.
        let long = "Richiesta documentazione ".repeat(8);
        let tx = tx_at(winter(), long.trim());
        let raw = acceptance(&tx).unsigned();
        check(&raw, &tx, Kind::Acceptance, wire::subject::ACCETTAZIONE);
    }

    #[test]
    fn no_msgid_no_reference() {
        let mut tx = tx();
        tx.msgid = None;
        let c = acceptance(&tx);
        assert!(top_headers(&c, wire::H_RIFERIMENTO).is_empty());
        let raw = c.unsigned();
        let ins = inspect(&raw).unwrap();
        assert!(ins.problems.is_empty());
        assert_eq!(ins.daticert.unwrap().msgid, None);
        let env = transport_envelope(&tx, b"From: a@b.it\r\nTo: c@d.it\r\n\r\nx\r\n");
        let raw = env.unsigned();
        let ins = inspect(&raw).unwrap();
        assert!(ins.problems.is_empty(), "{:?}", ins.problems);
        assert_eq!(
            ins.message.postacert.as_deref(),
            Some(
                format!("From: a@b.it\r\nTo: c@d.it\r\nMessage-ID: <{IDENT}>\r\n\r\nx\r\n")
                    .as_bytes()
            )
        );
    }

    #[test]
    fn output_is_deterministic_and_ids_unique() {
        let build = || {
            let tx = tx();
            let tx2 = tx2();
            let orig = original();
            let pc = postacert_original(&orig, IDENT, Some(MSGID));
            vec![
                acceptance(&tx),
                non_acceptance(&tx, "r", false),
                non_acceptance(&tx, "r", true),
                transport_envelope(&tx, &orig),
                delivery(&tx2, TO, DeliveryContent::Completa { postacert: &pc }),
                delivery(
                    &tx2,
                    TO,
                    DeliveryContent::Breve {
                        postacert: &pc,
                        sha1_hex: &fake_sha1,
                    },
                ),
                delivery(&tx2, CC, DeliveryContent::Sintetica),
                delivery_error(&tx2, TO, Errore::NoDest, "5.1.1 - x"),
                delivery_error(&tx2, CC, Errore::NoDest, "5.1.1 - x"),
                timeout_notice(&tx, TO, "4.4.7 - x"),
                timeout_notice(&tx, TO, "5.4.1 - x"),
                taken_in_charge(&tx2, SERVICE, &[TO.to_owned()]),
                virus_detected(&tx2, SERVICE, TO, "v"),
                anomaly_envelope(b"From: x@example.com\r\n\r\nx", SERVICE2, &tx2.time, "r"),
            ]
        };
        let a = build();
        assert_eq!(a, build());
        let ids: std::collections::BTreeSet<String> = a
            .iter()
            .flat_map(|c| top_headers(c, "Message-ID"))
            .collect();
        assert_eq!(ids.len(), a.len(), "{ids:?}");
        let boundaries: std::collections::BTreeSet<Vec<u8>> = a
            .iter()
            .map(|c| c.entity.split(|&b| b == b'\r').next().unwrap().to_vec())
            .collect();
        assert_eq!(boundaries.len(), a.len());
    }

    #[test]
    fn signed_messages_inspect_cleanly() {
        use crate::pki;
        let validity = pki::Validity {
            not_before: "2026-01-01T00:00:00Z".parse().unwrap(),
            not_after: "2029-01-01T00:00:00Z".parse().unwrap(),
        };
        let ca = pki::make_ca("Test PEC CA", "Test", validity, 2048).unwrap();
        let signer = pki::make_provider_cert(
            &ca,
            &pki::ProviderProfile {
                organization: GESTORE.into(),
                common_name: "Posta Certificata Sandbox".into(),
                email: SERVICE.into(),
                validity,
                pec_policy: true,
                key_bits: 2048,
            },
        )
        .unwrap();
        let tx = tx();
        let orig = original();
        for c in [acceptance(&tx), transport_envelope(&tx, &orig)] {
            let raw = pki::sign_detached(
                &c.outer_headers,
                &c.entity,
                &signer,
                &[],
                &pki::SignOptions::default(),
            )
            .unwrap();
            let ins = inspect(&raw).unwrap();
            assert!(ins.problems.is_empty(), "{:?}", ins.problems);
            assert!(ins.daticert.is_some());
            match &ins.message.signature {
                crate::pec::envelope::Signature::Detached { signed, .. } => {
                    assert_eq!(*signed, c.entity.as_slice());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn encoders() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        for n in 0..200u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64_decode(base64_lines(&data).as_bytes()), data);
            let qp = qp_encode(&data);
            assert!(qp.split("\r\n").all(|l| l.len() <= 76));
            // qp_encode treats \n as a line break: compare on CRLF text.
            let expected: Vec<u8> = to_crlf(data.strip_suffix(b"\n").unwrap_or(&data)).into_owned();
            assert_eq!(qp_decode(qp.as_bytes()), expected);
        }
        assert_eq!(qp_encode(b"a \nb\t"), "a=20\r\nb=09");
        assert_eq!(latin1("è – € 😀"), b"\xe8 - EUR ?".to_vec());
        assert_eq!(one_line("a\r\nb\r\n c\n"), "a b c");
        assert_eq!(address(" <a@b.it>, c@d.it\r\n"), "a@b.itc@d.it");
        assert_eq!(
            mime_param("filename", "nota è.txt"),
            "filename*=utf-8''nota%20%C3%A8.txt"
        );
        assert_eq!(mime_param("name", "a b.pdf"), "name=\"a b.pdf\"");
    }
}
