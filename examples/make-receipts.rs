//! Writes N signed acceptance receipts and the CA that signed them, for
//! timing `pecgate verify` over many files (scripts/bench-verify-cli.sh):
//!
//! ```text
//! cargo run --release --example make-receipts -- DIR N
//! ```
//!
//! `DIR/ca/ca.pem` is the test PEC CA (pass `--trust DIR/ca`), and
//! `DIR/receipts/NNNNNN.eml` the receipts: `fixtures/synthetic/01-accettazione.eml`
//! signed as a provider signs (detached, SHA-1, signingTime, signer + CA
//! certificates), each with its own Message-ID and signing time, so every
//! file has a different signature.

#[path = "../benches/support/mod.rs"]
mod support;

use std::path::PathBuf;

use jiff::{SignedDuration, Timestamp};

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), Some(n)) = (args.next(), args.next()) else {
        eprintln!("usage: make-receipts DIR N");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let n: usize = n
        .to_str()
        .and_then(|s| s.parse().ok())
        .expect("N is a number");
    let pki = support::BenchPki::new();
    let ca_dir = dir.join("ca");
    let out_dir = dir.join("receipts");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(ca_dir.join("ca.pem"), pki.ca.cert.to_pem().unwrap()).unwrap();

    let template = String::from_utf8(support::synthetic(support::ACCEPTANCE)).unwrap();
    let msgid = "<opec21010.20250113163926.01037.101.1.301.41@pec.example.it>";
    assert!(
        template.contains(msgid),
        "the template's Message-ID changed"
    );
    let start: Timestamp = "2025-01-13T15:39:26Z".parse().unwrap();
    let mut bytes = 0usize;
    for i in 0..n {
        let unsigned = template.replacen(
            msgid,
            &format!("<opec21010.20250113163926.01037.101.1.301.41.{i}@pec.example.it>"),
            1,
        );
        let t = start + SignedDuration::from_secs(i64::try_from(i).unwrap());
        let signed = pki.sign(unsigned.as_bytes(), t);
        bytes += signed.len();
        std::fs::write(out_dir.join(format!("{i:06}.eml")), signed).unwrap();
    }
    eprintln!(
        "{n} receipts ({} bytes on average) in {}, CA in {}",
        bytes / n.max(1),
        out_dir.display(),
        ca_dir.join("ca.pem").display()
    );
}
