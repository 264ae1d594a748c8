//! Outbound cost without the provider (issue 5), on the real file system:
//! - `intake-pass-100`: what the daemon does with 100 complete letters in
//!   the outbox (`outbound::intake_pass`: scan, claim by rename, validation,
//!   sent folder with the document, `dispatch.json` and the status files,
//!   the store transaction, release of the claim), one envelope and one
//!   2 KB document per letter; throughput in letters;
//! - `compose-2k`: composing the exact bytes of one such letter
//!   (`smtp::compose`, lettre's builder), CPU only;
//! - `insert-dispatch`: one dispatch row (recipient, document, event) in its
//!   own `synchronous=FULL` transaction, the store's share of a letter;
//! - `write-durable-2k`: one durable 2 KB file (`archive::write_durable`:
//!   temporary file, fsync, rename, fsync of the folder), the unit the
//!   intake repeats for every file it writes;
//! - `scan/1000`, `scan/4000`: one `intake::scan` of an outbox holding that
//!   many complete letters (envelope + document), nothing claimed; the time
//!   per letter should not grow with the size of the outbox.
//!
//! The files go to a temporary folder (`$TMPDIR`, else /tmp): put it on the
//! disk the daemon will use, since fsync dominates. The end-to-end figures
//! (latency, 10,000-letter batch, resident memory) come from
//! `scripts/bench-outbound.sh`; see docs/BENCHMARKS.md.
//!
//! `cargo bench --bench outbound`

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use jiff::Timestamp;
use pecgate::config::Config;
use pecgate::outbound;
use pecgate::outbox::intake;
use pecgate::smtp::{self, Document, Draft};
use pecgate::store::{self, Db, Field, NewDispatch, NewDocument, NewRecipient};
use tokio_util::sync::CancellationToken;

const DOC_BYTES: usize = 2048;
const PASS: u64 = 100;

static SERIAL: AtomicU64 = AtomicU64::new(0);

fn document(i: u64) -> Vec<u8> {
    let mut d = format!("%PDF-1.4\n% pecgate outbound benchmark\nletter {i}\n").into_bytes();
    d.resize(DOC_BYTES - 6, b'x');
    d.extend_from_slice(b"\n%%EOF");
    d
}

/// Writes one letter (envelope + document) into the outbox; every letter
/// differs, so none is refused as a duplicate.
fn drop_letter(outbox: &Path) {
    let i = SERIAL.fetch_add(1, Ordering::Relaxed);
    let name = format!("bench-{i:07}");
    std::fs::write(outbox.join(format!("{name}.pdf")), document(i)).unwrap();
    std::fs::write(
        outbox.join(format!("{name}.toml")),
        format!(
            "to = [\"mario.rossi@pec.cittadini.sandbox.test\"]\n\
             subject = \"Benchmark letter {i}\"\n\
             body = \"Gentile signor Rossi,\\nin allegato il documento n. {i}.\\n\"\n\
             attachments = [\"{name}.pdf\"]\n\
             protocol = \"2026/B{i:07}\"\n"
        ),
    )
    .unwrap();
}

fn config(dir: &Path) -> Config {
    let d = dir.display();
    let toml = format!(
        r#"[gateway]
hostname = "gateway.bench.test"

[store]
database = "{d}/pecgate.db"
archive = "{d}/archive"

[outbox]
settle_seconds = 0.001
rescan_seconds = 1

[mailbox.protocollo]
address = "protocollo@pec.comune.sandbox.test"
outbox = "{d}/outbox"
sent = "{d}/sent"
inbox = "{d}/inbox"
smtp = {{ host = "127.0.0.1", port = 1, tls = "implicit", username = "protocollo@pec.comune.sandbox.test", password_env = "BENCH_PASSWORD" }}
imap = {{ host = "127.0.0.1", port = 1, tls = "implicit", username = "protocollo@pec.comune.sandbox.test", password_env = "BENCH_PASSWORD" }}
pace = {{ per_minute = 1000000, per_day = 100000000 }}
"#
    );
    let path = dir.join("pecgate.toml");
    std::fs::write(&path, toml).unwrap();
    let mut config =
        Config::load_with_env(&path, [("BENCH_PASSWORD".to_owned(), "secret".to_owned())]).unwrap();
    // Every letter the setup wrote is complete: no settle time.
    config.outbox.settle = Duration::ZERO;
    for m in config.mailboxes.values() {
        for folder in [&m.outbox, &m.sent, &m.inbox] {
            std::fs::create_dir_all(folder).unwrap();
        }
    }
    std::fs::create_dir_all(&config.store.archive).unwrap();
    config
}

fn intake(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let mailbox = config.mailboxes.values().next().unwrap().clone();
    let mut db = Db::open(&config.store.database).unwrap();
    let cancel = CancellationToken::new();
    let mut g = c.benchmark_group("outbound");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));

    g.throughput(Throughput::Elements(PASS));
    g.bench_function("intake-pass-100", |b| {
        b.iter_batched(
            || {
                for _ in 0..PASS {
                    drop_letter(&mailbox.outbox);
                }
            },
            |()| {
                let n = outbound::intake_pass(&mut db, &config, &mailbox, false, &cancel);
                assert_eq!(n as u64, PASS, "every letter is taken in");
            },
            BatchSize::PerIteration,
        );
    });

    g.throughput(Throughput::Elements(1));
    let to = vec!["mario.rossi@pec.cittadini.sandbox.test".to_owned()];
    let documents = vec![Document {
        name: "bench-0000001.pdf".to_owned(),
        bytes: document(1),
    }];
    g.bench_function("compose-2k", |b| {
        b.iter(|| {
            let draft = Draft {
                from: &mailbox.address,
                to: &to,
                cc: &[],
                subject: "Benchmark letter 1",
                body: "Gentile signor Rossi,\nin allegato il documento n. 1.\n",
                documents: &documents,
                receipt: "completa",
                message_id: "01JBENCH0000000000000000000.1.0123456789ab@gateway.bench.test",
                in_reply_to: &[],
                date: UNIX_EPOCH + Duration::from_secs(1_780_000_000),
            };
            black_box(smtp::compose(black_box(&draft)).unwrap())
        });
    });

    g.bench_function("insert-dispatch", |b| {
        b.iter(|| {
            let i = SERIAL.fetch_add(1, Ordering::Relaxed);
            let now = Timestamp::now();
            let id = store::new_dispatch_id(u64::try_from(now.as_millisecond()).unwrap());
            db.insert_dispatch(&NewDispatch {
                id,
                mailbox: mailbox.name.clone(),
                kind: "altro".to_owned(),
                protocol: Some(format!("2026/I{i:07}")),
                reference: None,
                subject: format!("Benchmark row {i}"),
                receipt_type: "completa".to_owned(),
                in_reply_to: None,
                content_hash: format!("{i:064x}"),
                source: format!("row-{i}.toml"),
                sent_dir: format!("/nonexistent/{i}"),
                created_at: now,
                recipients: vec![NewRecipient {
                    address: to[0].clone(),
                    field: Field::To,
                }],
                documents: vec![NewDocument {
                    name: "row.pdf".to_owned(),
                    sha256: format!("{i:064x}"),
                    size: DOC_BYTES as u64,
                }],
            })
            .unwrap();
        });
    });

    let files = dir.path().join("durable");
    std::fs::create_dir_all(&files).unwrap();
    let bytes = document(0);
    g.bench_function("write-durable-2k", |b| {
        b.iter(|| {
            let i = SERIAL.fetch_add(1, Ordering::Relaxed);
            pecgate::archive::write_durable(&files.join(format!("f{i}")), &bytes, 0o640).unwrap();
        });
    });
    g.finish();
}

fn scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("outbound/scan");
    g.sample_size(10);
    for n in [1000u64, 4000] {
        let outbox = dir.path().join(format!("outbox-{n}"));
        std::fs::create_dir_all(&outbox).unwrap();
        for _ in 0..n {
            drop_letter(&outbox);
        }
        g.throughput(Throughput::Elements(n));
        g.bench_function(n.to_string(), |b| {
            b.iter(|| {
                let found = intake::scan(
                    &outbox,
                    Duration::ZERO,
                    intake::DEFAULT_MISSING_GRACE,
                    outbound::system_now(),
                )
                .unwrap();
                assert_eq!(found.len() as u64, n);
                found
            });
        });
    }
    g.finish();
}

criterion_group!(benches, intake, scan);
criterion_main!(benches);
