//! `Verifier::verify(inspect(data))` at a fixed instant: must never panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use pecgate::pec::inspect::inspect;
use pecgate::verify::{TrustAnchors, Verifier};

static VERIFIER: LazyLock<Verifier> =
    LazyLock::new(|| Verifier::new(TrustAnchors::builtin().expect("built-in anchors load")));

/// A fixed "now" (2024-06-01T12:00:00Z) so that runs are reproducible.
static NOW: LazyLock<jiff::Timestamp> =
    LazyLock::new(|| jiff::Timestamp::from_second(1_717_243_200).expect("valid instant"));

fuzz_target!(|data: &[u8]| {
    let Ok(ins) = inspect(data) else { return };
    let verdict = VERIFIER.verify(&ins, *NOW);
    let _ = verdict.is_valid();
    let _ = serde_json::to_string(&verdict);
});
