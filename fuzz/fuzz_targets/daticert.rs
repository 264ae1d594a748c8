//! `Daticert::parse` on arbitrary bytes: must never panic, and an `Ok`
//! value must serialise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pecgate::pec::daticert::Daticert;

fuzz_target!(|data: &[u8]| {
    match Daticert::parse(data) {
        Ok(d) => {
            let _ = d.kind();
            let _ = d.is_final_error_code();
            for x in &d.destinatari {
                let _ = x.is_certified();
            }
            serde_json::to_string(&d).expect("Daticert serialises");
        }
        Err(e) => {
            let _ = e.is_malformed_xml();
            let _ = e.to_string();
        }
    }
});
