//! `PecMessage::parse` and `inspect` on arbitrary bytes: must never panic;
//! every field of the result is touched and the summary serialised.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pecgate::pec::envelope::{PecMessage, Signature};
use pecgate::pec::inspect::inspect;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = PecMessage::parse(data) {
        assert!(std::ptr::eq(m.raw, data));
        let _ = m.classification.kind.as_str();
        let _ = (&m.from, &m.to, &m.subject, &m.date, &m.message_id, &m.text);
        let _ = m.daticert_xml.as_ref().map(Vec::len);
        let _ = m.postacert.as_ref().map(Vec::len);
        for p in &m.others {
            let _ = (&p.name, p.content_type.len(), p.size);
        }
        let _ = m.problems.len();
        let _ = m.signature.form();
        match &m.signature {
            Signature::Detached {
                signed,
                range,
                der,
                protocol,
                micalg,
            } => {
                // The signed entity is exactly the bytes at `range`.
                assert_eq!(&data[range.clone()], &signed[..]);
                let _ = (der.len(), protocol, micalg);
                let canon = m.canonical_signed().expect("detached has a signed entity");
                assert!(canon.len() >= signed.len());
            }
            Signature::Opaque { der, content } => {
                let _ = (der.len(), content.as_ref().map(Vec::len));
                assert!(m.canonical_signed().is_none());
            }
            Signature::Broken { reason } => {
                assert!(!reason.is_empty());
            }
            Signature::Unsigned => {}
        }
    }
    if let Ok(ins) = inspect(data) {
        let _ = ins.kind();
        let _ = ins.daticert_error.as_ref().map(ToString::to_string);
        serde_json::to_string(&ins.summary()).expect("summary serialises");
    }
});
