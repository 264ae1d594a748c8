//! The inbound benchmark's helper (`scripts/bench-inbound.sh`, docs/BENCHMARKS.md
//! "Inbound (issue 6)"): letters and their signed receipts, made the way the
//! sandbox's providers make them, without sending anything.
//!
//!     inbound-backlog setup   --dir W --letters N
//!     inbound-backlog latency --dir W --n N [--timeout-secs S]
//!
//! `setup` records N letters as the outbound half would have left them
//! (dispatch, one certified recipient, attempt `submitted` with its
//! Message-ID, the sent `.eml` in the archive, the sent folder), then
//! composes for each an acceptance (provider "uno") and a completa delivery
//! receipt (provider "due", carrying postacert.eml with a 2 KB document),
//! signs them with the sandbox's provider keys (`W/pki`) and APPENDs them to
//! the office mailbox in Dovecot: 2 N receipts, acceptance then delivery per
//! letter. Run it while `pecgate run` is stopped.
//!
//! `latency` runs while the daemon idles in IDLE: for each of N new letters
//! it APPENDs the acceptance and polls the store (every 2 ms) until the
//! letter is `accepted`; it prints one line per letter
//! (`append_ms state_ms`, both from just before the APPEND) and a summary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use pecgate::config::{Config, MailboxConfig};
use pecgate::pec::compose::{self, DeliveryContent, Destinatario, ReceiptType, Transaction};
use pecgate::pki::{self, CertKey, Digest, SignOptions};
use pecgate::sandbox::deliver::Deliverer;
use pecgate::sandbox::world::{PROVIDERS, SandboxInfo, World};
use pecgate::store::{self, Db, Direction, Field, MessageRow, NewDispatch, NewRecipient};

const CITIZEN: &str = "mario.rossi@pec.cittadini.sandbox.test";
const GATEWAY_HOST: &str = "gw.sandbox.test";

type Res<T> = Result<T, String>;

struct Env {
    world: World,
    mailbox: MailboxConfig,
    archive: PathBuf,
    db: Db,
    deliverer: Deliverer,
    office: String,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn open(dir: &Path) -> Res<Env> {
    let info = SandboxInfo::load(dir).map_err(|e| format!("sandbox.json: {e}"))?;
    let world = World::open(dir, Timestamp::now()).map_err(|e| format!("world: {e}"))?;
    let (config, _) = Config::load(Some(&dir.join("pecgate.toml"))).map_err(|e| e.to_string())?;
    let mailbox = config
        .mailboxes
        .values()
        .next()
        .ok_or("no mailbox in pecgate.toml")?
        .clone();
    let db = Db::open(&config.store.database).map_err(|e| e.to_string())?;
    let connector = pecgate::tls::connector(Some(&info.ca_file)).map_err(|e| e.to_string())?;
    let passwords: HashMap<String, String> = info
        .mailboxes
        .iter()
        .map(|m| (m.address.to_ascii_lowercase(), m.password.clone()))
        .collect();
    let deliverer = Deliverer::new(connector, info.imaps.port, passwords);
    Ok(Env {
        world,
        office: mailbox.address.clone(),
        mailbox,
        archive: config.store.archive.clone(),
        db,
        deliverer,
    })
}

/// The letter as the gateway would have sent it (one 2 KB PDF).
fn letter_eml(id: &str, mid: &str, from: &str, i: usize, at: Timestamp) -> Vec<u8> {
    let mut pdf = b"%PDF-1.4\n% pecgate inbound benchmark\n".to_vec();
    pdf.extend(std::iter::repeat_n(b'x', 2000));
    pdf.extend_from_slice(b"\n%%EOF");
    let b64 = pki::base64_lines(&pdf);
    format!(
        "From: {from}\r\nTo: {CITIZEN}\r\nSubject: Benchmark inbound letter {i}\r\n\
         Date: {}\r\nMessage-ID: <{mid}>\r\nX-TipoRicevuta: completa\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b-{id}\"\r\n\r\n\
         --b-{id}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGentile signor Rossi,\r\n\
         in allegato il documento n. {i}.\r\n\r\n--b-{id}\r\nContent-Type: application/pdf\r\n\
         Content-Disposition: attachment; filename=\"doc-{i}.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b-{id}--\r\n",
        at.strftime("%a, %d %b %Y %H:%M:%S +0000"),
    )
    .into_bytes()
}

struct Made {
    id: String,
    acceptance: Vec<u8>,
    delivery: Vec<u8>,
}

fn sign(signer: &CertKey, c: &compose::Composed, at: Timestamp) -> Res<Vec<u8>> {
    let opts = SignOptions {
        digest: Digest::Sha256,
        signing_time: Some(at),
        x_protocol: true,
    };
    pki::sign_detached(&c.outer_headers, &c.entity, signer, &[], &opts).map_err(|e| e.to_string())
}

/// Records `n` letters as `submitted` (one transaction per 500) and
/// returns their signed receipts.
fn make_letters(env: &mut Env, n: usize, tag: &str) -> Res<Vec<Made>> {
    let now = Timestamp::from_second(Timestamp::now().as_second()).map_err(|e| e.to_string())?;
    let tz = jiff::tz::TimeZone::get("Europe/Rome").map_err(|e| e.to_string())?;
    let mut made = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in 0..n {
        let id = store::new_dispatch_id(now.as_millisecond() as u64);
        let mid = format!("{id}.1.bench@{GATEWAY_HOST}");
        let eml = letter_eml(&id, &mid, &env.office, i, now);
        let archived = pecgate::archive::store(&env.archive, &eml).map_err(|e| e.to_string())?;
        let sent_dir = pecgate::sent::folder(&env.mailbox.sent, now, &id);
        pecgate::archive::create_folder(&env.mailbox.sent, &sent_dir).map_err(|e| e.to_string())?;
        let uno = &PROVIDERS[0];
        let due = &PROVIDERS[1];
        let tx = Transaction {
            identificativo: format!(
                "opec.sbxuno.{}.bench{tag}.{i}@{}",
                now.strftime("%Y%m%d%H%M%S"),
                uno.domain
            ),
            time: now.to_zoned_datetime(tz.clone()),
            mittente: env.office.clone(),
            destinatari: vec![Destinatario {
                address: CITIZEN.into(),
                tipo: "certificato".into(),
            }],
            risposte: env.office.clone(),
            oggetto: format!("Benchmark inbound letter {i}"),
            msgid: Some(mid.clone()),
            gestore: uno.gestore.into(),
            service_address: uno.service_address(),
            ricevuta: ReceiptType::Completa,
        };
        let acceptance = sign(&env.world.signers[0], &compose::acceptance(&tx), now)?;
        let t_del = now + SignedDuration::from_secs(1);
        let dtx = tx.issued_by(
            due.gestore,
            &due.service_address(),
            t_del.to_zoned_datetime(tz.clone()),
        );
        let postacert = compose::postacert_original(&eml, &tx.identificativo, Some(&mid));
        let delivery = sign(
            &env.world.signers[1],
            &compose::delivery(
                &dtx,
                CITIZEN,
                DeliveryContent::Completa {
                    postacert: &postacert,
                },
            ),
            t_del,
        )?;
        pending.push((
            NewDispatch {
                id: id.clone(),
                mailbox: env.mailbox.name.clone(),
                kind: "lettera".into(),
                protocol: Some(format!("2026/I{tag}{i:07}")),
                reference: None,
                subject: format!("Benchmark inbound letter {i}"),
                receipt_type: "completa".into(),
                in_reply_to: None,
                content_hash: store::sha256_hex(id.as_bytes()),
                source: format!("bench-inbound-{i}.toml"),
                sent_dir: sent_dir.display().to_string(),
                created_at: now,
                recipients: vec![NewRecipient {
                    address: CITIZEN.into(),
                    field: Field::To,
                }],
                documents: vec![],
            },
            MessageRow {
                sha256: archived.sha256.clone(),
                path: archived.relative.clone(),
                size: archived.size,
                direction: Direction::Out,
                mailbox: env.mailbox.name.clone(),
                imap_uid: None,
                imap_uidvalidity: None,
                recorded_at: now,
            },
            format!("<{mid}>"),
        ));
        made.push(Made {
            id,
            acceptance,
            delivery,
        });
        if pending.len() == 500 || i + 1 == n {
            env.db
                .write("bench.letters", |tx| {
                    for (d, m, mid) in &pending {
                        tx.insert_dispatch(d)?;
                        tx.record_message(m)?;
                        let k = tx.begin_attempt(&d.id, mid, &m.sha256, now)?;
                        tx.attempt_submitted(&d.id, k, "250 2.0.0 Ok: queued", now)?;
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
            pending.clear();
        }
    }
    Ok(made)
}

async fn setup(env: &mut Env, letters: usize) -> Res<()> {
    let t = Instant::now();
    let made = make_letters(env, letters, "b")?;
    let made_in = t.elapsed();
    let t = Instant::now();
    let mut bytes = 0usize;
    for m in &made {
        for raw in [&m.acceptance, &m.delivery] {
            env.deliverer
                .append(&env.office, raw)
                .await
                .map_err(|e| e.to_string())?;
            bytes += raw.len();
        }
    }
    env.deliverer.close_all().await;
    println!(
        "setup: {letters} letters recorded and {} receipts signed in {:.1} s; \
         {} receipts ({:.1} MB, {:.1} KB each) appended to {} in {:.1} s",
        2 * letters,
        made_in.as_secs_f64(),
        2 * letters,
        bytes as f64 / 1e6,
        bytes as f64 / 1e3 / (2 * letters) as f64,
        env.office,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn pct(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let k = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[k - 1]
}

async fn latency(env: &mut Env, n: usize, timeout: Duration) -> Res<()> {
    let made = make_letters(env, n, "l")?;
    let (mut appends, mut states) = (Vec::new(), Vec::new());
    for (i, m) in made.iter().enumerate() {
        // Let the daemon settle back into IDLE.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t0 = Instant::now();
        env.deliverer
            .append(&env.office, &m.acceptance)
            .await
            .map_err(|e| e.to_string())?;
        let t_append = t0.elapsed();
        loop {
            let st = env
                .db
                .get(&m.id)
                .map_err(|e| e.to_string())?
                .map(|d| d.dispatch.state);
            if st.as_deref() == Some("accepted") {
                break;
            }
            if t0.elapsed() > timeout {
                return Err(format!(
                    "letter {i} ({}) not accepted within {timeout:?}",
                    m.id
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let t_state = t0.elapsed();
        println!(
            "latency {i} {} append_ms {:.1} state_ms {:.1}",
            m.id,
            t_append.as_secs_f64() * 1e3,
            t_state.as_secs_f64() * 1e3
        );
        appends.push(t_append.as_secs_f64() * 1e3);
        states.push(t_state.as_secs_f64() * 1e3);
    }
    env.deliverer.close_all().await;
    for (name, xs) in [
        ("APPEND command (client side)", &appends),
        ("APPEND -> state accepted", &states),
    ] {
        println!(
            "{name}: n={} p50={:.0} ms p90={:.0} ms p99={:.0} ms max={:.0} ms",
            xs.len(),
            pct(xs, 50.0),
            pct(xs, 90.0),
            pct(xs, 99.0),
            xs.iter().copied().fold(0.0, f64::max)
        );
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = arg(&args, "--dir") else {
        eprintln!("usage: inbound-backlog setup|latency --dir W [--letters N] [--n N]");
        return std::process::ExitCode::from(2);
    };
    let result = async {
        let mut env = open(Path::new(&dir))?;
        match args.first().map(String::as_str) {
            Some("setup") => {
                let n = arg(&args, "--letters")
                    .map_or(Ok(5000), |s| s.parse())
                    .map_err(|e| format!("--letters: {e}"))?;
                setup(&mut env, n).await
            }
            Some("latency") => {
                let n = arg(&args, "--n")
                    .map_or(Ok(200), |s| s.parse())
                    .map_err(|e| format!("--n: {e}"))?;
                let secs = arg(&args, "--timeout-secs")
                    .map_or(Ok(30), |s| s.parse())
                    .map_err(|e| format!("--timeout-secs: {e}"))?;
                latency(&mut env, n, Duration::from_secs(secs)).await
            }
            _ => Err("first argument: setup or latency".into()),
        }
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inbound-backlog: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
