//! `pecgate::pec::classify::classify` on arbitrary bytes: must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = pecgate::pec::classify::classify(data) {
        // Touch every field; the kind's wire name and Display must work too.
        let _ = c.kind.as_str();
        let _ = c.kind.to_string();
        let _ = (
            &c.x_ricevuta,
            &c.x_trasporto,
            &c.refers_to,
            &c.tipo_ricevuta,
            c.virus,
        );
        serde_json::to_string(&c).expect("Classification serialises");
    }
});
