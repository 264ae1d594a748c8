//! Verification throughput: take-apart, inspection (take-apart + daticert),
//! signature verification and the whole path, on
//! - `acceptance-10k`: the synthetic acceptance receipt, signed at setup
//!   (~8 KB);
//! - `delivery-300k`: the ~300 KB avvenuta-consegna completa carrying
//!   postacert.eml, signed at setup;
//! - `aruba-2018`: the real 2018 Aruba acceptance from the shared directory
//!   (`$PECGATE_SHARED_DIR`, else `../shared`), verified with the built-in
//!   anchors, when present.
//!
//! Signed like real providers: detached, SHA-1, signingTime, signer and CA
//! certificates in the signature, RSA 2048. The verifier is reused across
//! iterations (as `pecgate verify` and the daemon do), so its chain cache
//! is warm: this measures the steady state of a mailbox that receives
//! thousands of receipts from a handful of providers.
//!
//! `cargo bench --bench verify` (see docs/BENCHMARKS.md).

mod support;

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jiff::Timestamp;
use pecgate::pec::envelope::PecMessage;
use pecgate::pec::inspect::inspect;
use pecgate::verify::{Status, TrustAnchors, Verifier};

use support::{ACCEPTANCE, BenchPki, DELIVERY_LARGE, aruba_2018, synthetic};

struct Input {
    name: &'static str,
    raw: Vec<u8>,
    verifier: Verifier,
    now: Timestamp,
}

fn inputs() -> Vec<Input> {
    let pki = BenchPki::new();
    let signed_at: Timestamp = "2025-01-13T15:39:26Z".parse().unwrap();
    let mut out = vec![
        Input {
            name: "acceptance-10k",
            raw: pki.sign(&synthetic(ACCEPTANCE), signed_at),
            verifier: pki.verifier(),
            now: pki.now,
        },
        Input {
            name: "delivery-300k",
            raw: pki.sign(&synthetic(DELIVERY_LARGE), signed_at),
            verifier: pki.verifier(),
            now: pki.now,
        },
    ];
    match aruba_2018() {
        Some(raw) => out.push(Input {
            name: "aruba-2018",
            raw,
            verifier: Verifier::new(TrustAnchors::builtin().unwrap()),
            now: "2018-11-14T00:00:00Z".parse().unwrap(),
        }),
        None => eprintln!(
            "aruba-2018 not measured: {} not found (set PECGATE_SHARED_DIR)",
            support::ARUBA_2018
        ),
    }
    // Every input must really verify, or the figures mean nothing.
    for i in &out {
        let ins = inspect(&i.raw).unwrap();
        assert!(ins.problems.is_empty(), "{}: {:?}", i.name, ins.problems);
        let v = i.verifier.verify(&ins, i.now);
        assert_eq!(v.status, Status::Valid, "{}: {v:#?}", i.name);
        eprintln!("{}: {} bytes, valid", i.name, i.raw.len());
    }
    out
}

fn bench(c: &mut Criterion) {
    let inputs = inputs();

    let mut g = c.benchmark_group("take-apart");
    for i in &inputs {
        g.throughput(Throughput::Elements(1));
        g.bench_function(i.name, |b| {
            b.iter(|| PecMessage::parse(black_box(&i.raw)).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("inspect");
    for i in &inputs {
        g.throughput(Throughput::Elements(1));
        g.bench_function(i.name, |b| b.iter(|| inspect(black_box(&i.raw)).unwrap()));
    }
    g.finish();

    let mut g = c.benchmark_group("verify");
    for i in &inputs {
        let ins = inspect(&i.raw).unwrap();
        g.throughput(Throughput::Elements(1));
        g.bench_function(i.name, |b| {
            b.iter(|| i.verifier.verify(black_box(&ins), i.now))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("whole");
    for i in &inputs {
        g.throughput(Throughput::Elements(1));
        g.bench_function(i.name, |b| {
            b.iter(|| {
                let ins = inspect(black_box(&i.raw)).unwrap();
                i.verifier.verify(&ins, i.now)
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    // Short runs: the figures in docs/BENCHMARKS.md were taken on a shared
    // two-core machine. Command-line options (--measurement-time, ...)
    // still override these.
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench
}
criterion_main!(benches);
