//! Taking a PEC message apart: signed entity (exact bytes), signature,
//! human text, `daticert.xml`, `postacert.eml` and the other parts.
//!
//! Two signed forms are understood:
//! - `multipart/signed` (detached signature, what every provider sends):
//!   the signed entity is the first body part, byte for byte as stored
//!   (CRLF or LF), and the signature the decoded second part
//!   (`application/pkcs7-signature` or `application/x-pkcs7-signature`);
//! - opaque `application/pkcs7-mime` signed-data: the content is taken out
//!   of the CMS structure (pure DER decoding, no cryptography here) and
//!   parsed again.
//!
//! Nothing here judges the signature: that is `crate::verify`'s job. This
//! module only reports what it finds, with structural problems as data.

use std::ops::Range;

use mail_parser::{Message, MessagePart, MimeHeaders, PartType};

use super::classify::{Classification, classify_message, looks_like_mail, parser};
use super::ids::normalize_message_id;
use super::wire;

/// Largest number of MIME parts walked in one message: bounds the work on
/// hostile input.
const MAX_PARTS: usize = 10_000;

/// A message from a certified mailbox, taken apart.
#[derive(Debug, Clone)]
pub struct PecMessage<'a> {
    /// The whole message as received.
    pub raw: &'a [u8],
    /// What its top-level headers say.
    pub classification: Classification,
    /// The address in `From` (the provider's service address on system
    /// messages).
    pub from: Option<String>,
    /// The addresses in `To`.
    pub to: Vec<String>,
    /// The decoded subject.
    pub subject: Option<String>,
    /// The `Date` header as an instant.
    pub date: Option<jiff::Timestamp>,
    /// The message's own Message-ID, normalised.
    pub message_id: Option<String>,
    /// The signature and what it covers.
    pub signature: Signature<'a>,
    /// The human-readable text (first `text/plain` part of the signed body).
    pub text: Option<String>,
    /// The raw (transfer-decoded) bytes of `daticert.xml`.
    pub daticert_xml: Option<Vec<u8>>,
    /// The original message (`postacert.eml`, or the message wrapped in an
    /// anomaly envelope), raw bytes.
    pub postacert: Option<Vec<u8>>,
    /// Every other leaf part of the signed body.
    pub others: Vec<OtherPart>,
    /// Structural problems found while taking the message apart.
    pub problems: Vec<String>,
    /// Whether `postacert` came from a part named `postacert.eml` (a named
    /// part wins over an earlier unnamed `message/rfc822`).
    postacert_named: bool,
}

/// How (and whether) a message is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature<'a> {
    /// `multipart/signed` with a detached CMS signature.
    Detached {
        /// The exact bytes of the first body part, as stored.
        signed: &'a [u8],
        /// Where `signed` sits in the raw message.
        range: Range<usize>,
        /// The decoded `smime.p7s` (DER).
        der: Vec<u8>,
        /// The `protocol` parameter, lower case.
        protocol: String,
        /// The `micalg` parameter, lower case, if present.
        micalg: Option<String>,
    },
    /// Opaque `application/pkcs7-mime` signed-data.
    Opaque {
        /// The decoded `smime.p7m` (DER or BER).
        der: Vec<u8>,
        /// The encapsulated content, when it could be decoded here.
        content: Option<Vec<u8>>,
    },
    /// Claims to be signed (`multipart/signed`) but the signature part is
    /// missing or of the wrong type.
    Broken {
        /// What is wrong, in words.
        reason: String,
    },
    /// No signature at all.
    Unsigned,
}

impl Signature<'_> {
    /// The name used in reports: `detached`, `opaque` or `unsigned`.
    pub fn form(&self) -> &'static str {
        match self {
            Signature::Detached { .. } => "detached",
            Signature::Opaque { .. } => "opaque",
            Signature::Broken { .. } => "broken",
            Signature::Unsigned => "unsigned",
        }
    }
}

/// A part that is neither the text, daticert.xml, postacert.eml nor the
/// signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherPart {
    /// Its file name, if it has one (decoded, unsanitised).
    pub name: Option<String>,
    /// `type/subtype`, lower case.
    pub content_type: String,
    /// Decoded size in bytes.
    pub size: usize,
}

/// The input is not a mail message at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a mail message: no mail header (From, Date, Subject, Content-Type, ...) found")]
pub struct NotAMessage;

impl<'a> PecMessage<'a> {
    /// Takes a raw RFC 5322 message apart. Never panics; structural
    /// problems are reported in [`PecMessage::problems`].
    ///
    /// # Errors
    /// [`NotAMessage`] when no header can be parsed.
    pub fn parse(raw: &'a [u8]) -> Result<PecMessage<'a>, NotAMessage> {
        let msg = parser().parse(raw).ok_or(NotAMessage)?;
        let out = Self::from_parsed(raw, &msg);
        drop_flat(msg);
        out
    }

    fn from_parsed(raw: &'a [u8], msg: &Message<'a>) -> Result<PecMessage<'a>, NotAMessage> {
        if !looks_like_mail(msg) {
            return Err(NotAMessage);
        }
        let classification = classify_message(msg);
        let mut out = PecMessage {
            raw,
            classification,
            from: msg
                .from()
                .and_then(|a| a.first())
                .and_then(|a| a.address())
                .map(|a| a.trim().to_owned()),
            to: msg
                .to()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.address())
                        .map(|x| x.trim().to_owned())
                        .collect()
                })
                .unwrap_or_default(),
            subject: msg.subject().map(|s| s.trim().to_owned()),
            date: msg
                .date()
                .and_then(|d| jiff::Timestamp::from_second(d.to_timestamp()).ok()),
            message_id: msg.message_id().and_then(normalize_message_id),
            signature: Signature::Unsigned,
            text: None,
            daticert_xml: None,
            postacert: None,
            others: Vec::new(),
            problems: Vec::new(),
            postacert_named: false,
        };
        out.take_apart(msg);
        Ok(out)
    }

    fn take_apart(&mut self, msg: &Message<'a>) {
        let root = msg.root_part();
        let (ctype, subtype) = content_type_of(root);
        match (ctype.as_str(), subtype.as_str()) {
            ("multipart", "signed") => self.take_apart_detached(msg, root),
            ("application", "pkcs7-mime" | "x-pkcs7-mime") => self.take_apart_opaque(root),
            _ => self.collect_body(msg, 0),
        }
    }

    fn take_apart_detached(&mut self, msg: &Message<'a>, root: &MessagePart<'a>) {
        let children = root.sub_parts().unwrap_or(&[]);
        let ct = root.content_type();
        let protocol = ct
            .and_then(|c| c.attribute("protocol"))
            .map(|p| p.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let micalg = ct
            .and_then(|c| c.attribute("micalg"))
            .map(|m| m.trim().to_ascii_lowercase());
        if !protocol.is_empty()
            && !matches!(
                protocol.as_str(),
                "application/pkcs7-signature" | "application/x-pkcs7-signature"
            )
        {
            self.problems.push(format!(
                "multipart/signed: unexpected protocol \"{protocol}\""
            ));
        }
        let Some(&content_id) = children.first() else {
            self.broken("multipart/signed has no body parts".to_owned());
            return;
        };
        self.collect_body(msg, content_id);
        if children.len() != 2 {
            self.broken(format!(
                "multipart/signed has {} body parts instead of 2 (content and signature)",
                children.len()
            ));
            return;
        }
        let (Some(content), Some(sig_part)) = (msg.part(content_id), msg.part(children[1])) else {
            self.broken("multipart/signed: body parts missing".to_owned());
            return;
        };
        let (c, s) = content_type_of(sig_part);
        if !(c == "application" && matches!(s.as_str(), "pkcs7-signature" | "x-pkcs7-signature")) {
            self.broken(format!(
                "multipart/signed: second part is {c}/{s}, not a PKCS#7 signature"
            ));
            return;
        }
        let range = content.offset_header as usize..content.offset_end as usize;
        let Some(signed) = self.raw.get(range.clone()) else {
            self.broken("multipart/signed: signed part out of bounds".to_owned());
            return;
        };
        self.signature = Signature::Detached {
            signed,
            range,
            der: sig_part.contents().to_vec(),
            protocol,
            micalg,
        };
    }

    fn broken(&mut self, reason: String) {
        self.problems.push(reason.clone());
        self.signature = Signature::Broken { reason };
    }

    fn take_apart_opaque(&mut self, root: &MessagePart<'a>) {
        let der = root.contents().to_vec();
        let content = match encapsulated_content(&der) {
            Ok(c) => c,
            Err(e) => {
                self.problems.push(format!(
                    "application/pkcs7-mime: cannot read the signed data: {e}"
                ));
                None
            }
        };
        if let Some(inner) = &content {
            match parser().parse(inner.as_slice()) {
                Some(inner_msg) => {
                    self.collect_body(&inner_msg, 0);
                    drop_flat(inner_msg);
                }
                None => self
                    .problems
                    .push("application/pkcs7-mime: the signed content is not MIME".to_owned()),
            }
        }
        self.signature = Signature::Opaque { der, content };
    }

    /// Walks the body below `start` (without entering nested messages) and
    /// sorts its leaf parts.
    fn collect_body(&mut self, msg: &Message<'_>, start: u32) {
        let mut stack = vec![start];
        let mut seen = 0usize;
        while let Some(id) = stack.pop() {
            seen += 1;
            if seen > MAX_PARTS {
                self.problems.push(format!(
                    "more than {MAX_PARTS} MIME parts: the rest ignored"
                ));
                return;
            }
            let Some(part) = msg.part(id) else { continue };
            if let Some(children) = part.sub_parts() {
                // Reverse so that parts are visited in document order.
                stack.extend(children.iter().rev().copied());
                continue;
            }
            self.sort_leaf(part);
        }
    }

    fn sort_leaf(&mut self, part: &MessagePart<'_>) {
        let name = part.attachment_name().map(|n| n.trim().to_owned());
        let (ctype, subtype) = content_type_of(part);
        let named = |n: &str| name.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(n));
        if named(wire::DATICERT_XML) {
            if self.daticert_xml.is_some() {
                self.problems
                    .push("more than one daticert.xml part: the first one is used".to_owned());
            } else {
                self.daticert_xml = Some(part.contents().to_vec());
            }
            return;
        }
        if let PartType::Message(inner) = &part.body {
            let is_postacert = named(wire::POSTACERT_EML);
            if self.postacert.is_none() || (is_postacert && !self.postacert_named) {
                self.postacert = Some(inner.raw_message().to_vec());
                self.postacert_named = is_postacert;
            } else {
                self.others.push(OtherPart {
                    name,
                    content_type: "message/rfc822".to_owned(),
                    size: inner.raw_message().len(),
                });
            }
            return;
        }
        if ctype == "text"
            && subtype == "plain"
            && name.is_none()
            && self.text.is_none()
            && let PartType::Text(t) = &part.body
        {
            self.text = Some(t.to_string());
            return;
        }
        if ctype == "text" && subtype == "html" && name.is_none() {
            // The HTML alternative carries the same information as the text.
            return;
        }
        self.others.push(OtherPart {
            name,
            content_type: format!("{ctype}/{subtype}"),
            size: part.contents().len(),
        });
    }

    /// The signed entity with every bare LF turned into CRLF, as S/MIME
    /// canonicalisation requires (messages stored with LF line endings).
    pub fn canonical_signed(&self) -> Option<std::borrow::Cow<'a, [u8]>> {
        match &self.signature {
            Signature::Detached { signed, .. } => Some(to_crlf(signed)),
            _ => None,
        }
    }
}

/// Drops a parsed message without recursion: mail-parser nests
/// `message/rfc822` parts to any depth as `PartType::Message(Message)`, and
/// the generated drop of such a chain recurses once per level (10,000
/// nested messages overflow the stack: found by the `take_apart` fuzzer,
/// see fuzz/README.md). Use it for every message parsed from untrusted
/// bytes.
pub fn drop_flat(msg: Message<'_>) {
    let mut stack = vec![msg];
    while let Some(mut m) = stack.pop() {
        for part in &mut m.parts {
            if let PartType::Message(inner) = &mut part.body {
                stack.push(std::mem::take(inner));
            }
        }
    }
}

/// Turns bare LF into CRLF, borrowing when nothing changes.
pub fn to_crlf(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !has_bare_lf(bytes) {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut prev = 0u8;
    for &b in bytes {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    std::borrow::Cow::Owned(out)
}

/// Whether some LF is not preceded by CR. Checked 64 bytes at a time
/// without branching inside a block, which the compiler vectorises: this
/// runs over the whole signed entity of every message verified (a
/// 300 KB receipt spent a tenth of its verification time here).
fn has_bare_lf(bytes: &[u8]) -> bool {
    const BLOCK: usize = 64;
    if bytes.first() == Some(&b'\n') {
        return true;
    }
    // Each byte from the second on, with the byte before it.
    let prev = &bytes[..bytes.len().saturating_sub(1)];
    let next = bytes.get(1..).unwrap_or_default();
    prev.chunks(BLOCK).zip(next.chunks(BLOCK)).any(|(p, n)| {
        p.iter()
            .zip(n)
            .fold(false, |bare, (&a, &b)| bare | ((b == b'\n') & (a != b'\r')))
    })
}

fn content_type_of(part: &MessagePart<'_>) -> (String, String) {
    match part.content_type() {
        Some(ct) => (
            ct.ctype().trim().to_ascii_lowercase(),
            ct.subtype().unwrap_or("").trim().to_ascii_lowercase(),
        ),
        None => ("text".to_owned(), "plain".to_owned()),
    }
}

/// Extracts the encapsulated content of a CMS SignedData (DER). Returns
/// `Ok(None)` for a detached signature (no content inside).
fn encapsulated_content(der_bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
    use cms::content_info::ContentInfo;
    use cms::signed_data::SignedData;
    use der::{Decode, asn1::OctetString};

    let ci = ContentInfo::from_der(der_bytes).map_err(|e| e.to_string())?;
    let sd: SignedData = ci.content.decode_as().map_err(|e| e.to_string())?;
    let Some(econtent) = sd.encap_content_info.econtent else {
        return Ok(None);
    };
    let octets: OctetString = econtent.decode_as().map_err(|e| e.to_string())?;
    Ok(Some(octets.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious definition, to compare the block-wise one with.
    fn has_bare_lf_slow(bytes: &[u8]) -> bool {
        bytes
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
    }

    #[test]
    fn bare_lf_is_found_wherever_it_is() {
        let cases: &[&[u8]] = &[
            b"", b"\n", b"\r", b"\r\n", b"a\n", b"\n\r\n", b"\r\n\n", b"\n\n", b"\r\r\n",
        ];
        for c in cases {
            assert_eq!(has_bare_lf(c), has_bare_lf_slow(c), "{c:?}");
        }
        // Every position around the 64-byte block edges, CR or not before.
        for len in [63, 64, 65, 127, 128, 129, 200] {
            let crlf: Vec<u8> = b"\r\n".iter().copied().cycle().take(len).collect();
            assert_eq!(has_bare_lf(&crlf), has_bare_lf_slow(&crlf), "{len}");
            for at in 0..len {
                let mut v = vec![b'x'; len];
                v[at] = b'\n';
                assert!(has_bare_lf(&v), "{len} {at}");
                if at > 0 {
                    v[at - 1] = b'\r';
                    assert!(!has_bare_lf(&v), "{len} {at}");
                }
                let mut w = crlf.clone();
                w[at] = b'\n';
                assert_eq!(has_bare_lf(&w), has_bare_lf_slow(&w), "{len} {at}");
            }
        }
    }

    #[test]
    fn to_crlf_borrows_crlf_and_fixes_lf() {
        assert!(matches!(
            to_crlf(b"a\r\nb\r\n"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(&*to_crlf(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
        assert_eq!(&*to_crlf(b"\n"), b"\r\n");
    }
}
