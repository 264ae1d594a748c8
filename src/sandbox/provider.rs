//! The simulated PEC providers' behaviour (SPEC.md §2, DM 2 Nov 2005):
//! formal checks, acceptance or non-acceptance, transport envelopes,
//! delivery receipts or non-delivery notices, timeout notices, anomaly
//! envelopes for ordinary mail, and the faults of `faults.rs`.
//!
//! Every system message is composed by the pure `pec::compose`, signed by
//! the right provider (`pki::sign_detached`, with the transaction's time as
//! signingTime) and delivered by IMAP APPEND.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use mail_parser::{Message, MimeHeaders};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::clock::Clock;
use super::deliver::Deliverer;
use super::faults::{DropCounter, DropMode, Faults, RecipientFaults};
use super::smtp::{DataOutcome, Submission, SubmissionHandler};
use super::world::{PROVIDERS, ProviderSpec, Role, World};
use crate::pec::compose::{self, Composed, DeliveryContent, ReceiptType, Transaction};
use crate::pec::daticert::Destinatario;
use crate::pec::ids::{normalize_message_id, same_address};
use crate::pec::wire;
use crate::pki::{self, Digest, SignOptions};

/// The largest size × recipients the sandbox providers accept (Aruba's
/// limit, SPEC.md §5).
pub const MAX_TOTAL_BYTES: usize = 100_000_000;
/// The largest number of recipients.
pub const MAX_RECIPIENTS: usize = 500;
/// The EICAR anti-virus test string: a message carrying it is infected.
pub const EICAR: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
/// Simulated seconds before the 12-hour timeout notice.
const PREAVVISO_SECS: f64 = 12.0 * 3600.0;
/// Simulated seconds before the 24-hour timeout notice.
const TIMEOUT_SECS: f64 = 24.0 * 3600.0;

/// The provider side of the sandbox.
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Inner>,
}

struct Inner {
    world: Arc<World>,
    clock: Clock,
    deliverer: Arc<Deliverer>,
    faults: RwLock<Arc<Faults>>,
    drops: DropCounter,
    recent: Mutex<VecDeque<Instant>>,
    seq: AtomicU64,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider").finish_non_exhaustive()
    }
}

impl Provider {
    /// A provider working on `world`, delivering through `deliverer`.
    pub fn new(
        world: Arc<World>,
        clock: Clock,
        deliverer: Arc<Deliverer>,
        faults: Faults,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Provider {
        Provider {
            inner: Arc::new(Inner {
                world,
                clock,
                deliverer,
                faults: RwLock::new(Arc::new(faults)),
                drops: DropCounter::default(),
                recent: Mutex::new(VecDeque::new()),
                seq: AtomicU64::new(0),
                tracker,
                cancel,
            }),
        }
    }

    /// Replaces the faults (SIGHUP) and resets the drop counter.
    pub fn set_faults(&self, faults: Faults) {
        *self.inner.faults.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(faults);
        self.inner.drops.reset();
    }

    /// The faults in force.
    pub fn faults(&self) -> Arc<Faults> {
        self.inner
            .faults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl SubmissionHandler for Provider {
    fn authenticate(&self, user: &str, password: &str) -> Result<(), String> {
        let ok = self
            .inner
            .world
            .mailbox(user)
            .is_some_and(|m| m.password == password);
        if !ok || self.faults().refuses_auth(user) {
            return Err("5.7.8 authentication credentials invalid".to_owned());
        }
        Ok(())
    }

    fn admit(&self, _user: &str) -> Option<(u16, String)> {
        let limit = self.faults().smtp.rate_limit_per_minute;
        let mut recent = self.inner.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if limit > 0 && recent.len() >= limit as usize {
            return Some((
                451,
                "4.7.0 too much traffic: try again later (sandbox limit)".to_owned(),
            ));
        }
        recent.push_back(now);
        None
    }

    async fn submit(&self, submission: Submission) -> DataOutcome {
        let drop = self.inner.drops.take(&self.faults());
        if drop == Some(DropMode::NotAccepted) {
            return DataOutcome::DropWithoutAccepting;
        }
        let inner = self.inner.clone();
        let seq = inner.seq.fetch_add(1, Ordering::SeqCst);
        let queue_id = format!("sbx{seq}");
        self.inner.tracker.spawn(async move {
            let cancel = inner.cancel.clone();
            tokio::select! {
                () = cancel.cancelled() => {}
                () = process(inner, submission, seq) => {}
            }
        });
        match drop {
            Some(_) => DataOutcome::DropAfterAccepting,
            None => DataOutcome::Reply(250, format!("2.0.0 ok: queued as {queue_id}")),
        }
    }
}

/// One message to sign and deliver.
struct Outgoing {
    to: String,
    signer: usize,
    composed: Composed,
    time: Timestamp,
}

impl Inner {
    fn sign(&self, out: &Outgoing) -> Option<Vec<u8>> {
        let signer = self.world.signers.get(out.signer)?;
        let opts = SignOptions {
            digest: Digest::Sha256,
            signing_time: Some(out.time),
            x_protocol: true,
        };
        match pki::sign_detached(
            &out.composed.outer_headers,
            &out.composed.entity,
            signer,
            &[],
            &opts,
        ) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::error!(error = %e, "sandbox: cannot sign a system message");
                None
            }
        }
    }

    async fn send(&self, out: Outgoing, duplicate: bool) {
        let Some(bytes) = self.sign(&out) else { return };
        for _ in 0..if duplicate { 2 } else { 1 } {
            if let Err(e) = self.deliverer.append(&out.to, &bytes).await {
                tracing::warn!(error = %e, recipient = %out.to, "sandbox: delivery failed");
            }
        }
    }

    fn faults(&self) -> Arc<Faults> {
        self.faults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn zoned(&self, t: Timestamp) -> jiff::ZonedDateTime {
        let tz = jiff::tz::TimeZone::get("Europe/Rome").unwrap_or(jiff::tz::TimeZone::UTC);
        t.to_zoned_datetime(tz)
    }
}

/// Handles one accepted SMTP transaction.
async fn process(inner: Arc<Inner>, sub: Submission, seq: u64) {
    let world = inner.world.clone();
    let Some(sender) = world.mailbox(&sub.user).cloned() else {
        return;
    };
    if sender.role == Role::Ordinary {
        return process_ordinary(&inner, &sub).await;
    }
    let Some((sender_idx, sender_provider)) = world.provider_of(&sender.address) else {
        return;
    };
    let time = inner.clock.now();
    let parsed = crate::pec::classify::parser().parse(&sub.data);
    let Some(msg) = parsed else {
        // Not even a message: refuse it formally.
        let tx = transaction(
            &inner,
            sender_provider,
            &sub,
            None,
            time,
            seq,
            ReceiptType::Completa,
        );
        let composed = compose::non_acceptance(&tx, "messaggio non conforme a RFC 5322", false);
        refuse(&inner, &sender.address, sender_idx, composed, time).await;
        return;
    };
    let ricevuta = requested_receipt(&msg);
    let tx = transaction(
        &inner,
        sender_provider,
        &sub,
        Some(&msg),
        time,
        seq,
        ricevuta,
    );
    let refusal = formal_check(&sub, &msg);
    let to_header: Vec<String> = msg
        .to()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.address())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    // Submitted bytes are untrusted: free the parse without recursion.
    crate::pec::envelope::drop_flat(msg);
    if let Some((reason, virus)) = refusal {
        tracing::info!(recipient = %sender.address, reason = %reason, "sandbox: non-accettazione");
        let composed = compose::non_acceptance(&tx, &reason, virus);
        refuse(&inner, &sender.address, sender_idx, composed, time).await;
        return;
    }
    let faults = inner.faults();
    let per_rcpt: Vec<Option<RecipientFaults>> = sub
        .rcpts
        .iter()
        .map(|r| faults.for_recipient(r).cloned())
        .collect();
    let acceptance_missing = per_rcpt
        .iter()
        .flatten()
        .any(|f| f.is_missing(wire::ACCETTAZIONE));
    let acceptance_late = per_rcpt.iter().flatten().any(|f| f.out_of_order);
    let acceptance_dup = per_rcpt.iter().flatten().any(|f| f.duplicate_receipts);
    let acceptance = Outgoing {
        to: sender.address.clone(),
        signer: sender_idx,
        composed: compose::acceptance(&tx),
        time,
    };
    let acceptance = if acceptance_missing {
        None
    } else if acceptance_late {
        Some(acceptance)
    } else {
        inner.send(acceptance, acceptance_dup).await;
        None
    };
    let tx = Arc::new(tx);
    let data = Arc::new(sub.data.clone());
    // Out of order: the acceptance waits only for the recipients whose
    // fault says so (their delivery receipt goes first).
    let mut first = Vec::new();
    for (rcpt, rf) in sub.rcpts.iter().zip(per_rcpt) {
        let is_cc = !to_header.iter().any(|t| same_address(t, rcpt));
        let before_acceptance = rf.as_ref().is_some_and(|f| f.out_of_order);
        let job = RecipientJob {
            inner: inner.clone(),
            tx: tx.clone(),
            data: data.clone(),
            rcpt: rcpt.clone(),
            faults: rf.unwrap_or_default(),
            sender: sender.address.clone(),
            sender_idx,
            is_cc,
        };
        let handle = inner.tracker.spawn(job.run());
        if before_acceptance {
            first.push(handle);
        }
    }
    if let Some(acceptance) = acceptance {
        for h in first {
            let _ = h.await;
        }
        inner.send(acceptance, acceptance_dup).await;
    }
}

struct RecipientJob {
    inner: Arc<Inner>,
    tx: Arc<Transaction>,
    data: Arc<Vec<u8>>,
    rcpt: String,
    faults: RecipientFaults,
    sender: String,
    sender_idx: usize,
    is_cc: bool,
}

impl RecipientJob {
    async fn run(self) {
        let inner = &self.inner;
        let world = &inner.world;
        let f = &self.faults;
        if f.delay_seconds > 0.0 {
            inner.clock.sleep(f.delay_seconds).await;
        }
        let dup = f.duplicate_receipts;
        let Some((rcpt_idx, rcpt_provider)) = world.provider_of(&self.rcpt) else {
            // An ordinary (esterno) recipient: the envelope only, no receipt.
            if world.mailbox(&self.rcpt).is_some() {
                self.deliver_envelope().await;
            }
            return;
        };
        let from_sender_provider = |composed: Composed, time: Timestamp| Outgoing {
            to: self.sender.clone(),
            signer: self.sender_idx,
            composed,
            time,
        };
        if f.no_dominio {
            let t = inner.clock.now();
            let tx = self.at(t);
            let text = format!(
                "5.1.2 - {} - dominio non valido",
                PROVIDERS[self.sender_idx].gestore
            );
            let c = compose::delivery_error(&tx, &self.rcpt, compose::Errore::NoDominio, &text);
            self.maybe(wire::ERRORE_CONSEGNA, from_sender_provider(c, t), dup)
                .await;
            return;
        }
        if f.no_delivery {
            inner.clock.sleep(PREAVVISO_SECS - f.delay_seconds).await;
            let t = inner.clock.now();
            let text = format!(
                "4.4.7 - {} - il messaggio non è stato consegnato entro 12 ore",
                PROVIDERS[self.sender_idx].gestore
            );
            let c = compose::timeout_notice(&self.at(t), &self.rcpt, &text);
            self.maybe(
                wire::PREAVVISO_ERRORE_CONSEGNA,
                from_sender_provider(c, t),
                dup,
            )
            .await;
            inner.clock.sleep(TIMEOUT_SECS - PREAVVISO_SECS).await;
            let t = inner.clock.now();
            let text = format!(
                "5.4.1 - {} - il messaggio non è stato consegnato entro 24 ore",
                PROVIDERS[self.sender_idx].gestore
            );
            let c = compose::timeout_notice(&self.at(t), &self.rcpt, &text);
            self.maybe(
                wire::PREAVVISO_ERRORE_CONSEGNA,
                from_sender_provider(c, t),
                dup,
            )
            .await;
            return;
        }
        if f.virus {
            // The recipient's provider finds a virus (rilevazione-virus to
            // the sender's provider), which tells the sender.
            let t = inner.clock.now();
            let text = format!("5.7.1 - {} - virus rilevato", rcpt_provider.gestore);
            let c = compose::delivery_error(&self.at(t), &self.rcpt, compose::Errore::Virus, &text);
            self.maybe(wire::ERRORE_CONSEGNA, from_sender_provider(c, t), dup)
                .await;
            return;
        }
        let from_rcpt_provider = |composed: Composed, time: Timestamp| Outgoing {
            to: self.sender.clone(),
            signer: rcpt_idx,
            composed,
            time,
        };
        if world.mailbox(&self.rcpt).is_none() {
            let t = inner.clock.now();
            let text = format!("5.1.1 - {} - indirizzo non valido", rcpt_provider.gestore);
            let c = compose::delivery_error(
                &self.at_provider(t, rcpt_provider),
                &self.rcpt,
                compose::Errore::NoDest,
                &text,
            );
            self.maybe(wire::ERRORE_CONSEGNA, from_rcpt_provider(c, t), dup)
                .await;
            return;
        }
        if f.mailbox_full {
            let t = inner.clock.now();
            let text = format!("5.2.2 - {} - casella piena", rcpt_provider.gestore);
            let c = compose::delivery_error(
                &self.at_provider(t, rcpt_provider),
                &self.rcpt,
                compose::Errore::Altro,
                &text,
            );
            self.maybe(wire::ERRORE_CONSEGNA, from_rcpt_provider(c, t), dup)
                .await;
            return;
        }
        self.deliver_envelope().await;
        let t = inner.clock.now();
        let postacert = compose::postacert_original(
            &self.data,
            &self.tx.identificativo,
            self.tx.msgid.as_deref(),
        );
        let content = match self.tx.ricevuta.for_recipient(!self.is_cc) {
            ReceiptType::Completa => DeliveryContent::Completa {
                postacert: &postacert,
            },
            ReceiptType::Breve => DeliveryContent::Breve {
                postacert: &postacert,
                sha1_hex: &sha1_hex,
            },
            ReceiptType::Sintetica => DeliveryContent::Sintetica,
        };
        let c = compose::delivery(&self.at_provider(t, rcpt_provider), &self.rcpt, content);
        self.maybe(wire::AVVENUTA_CONSEGNA, from_rcpt_provider(c, t), dup)
            .await;
    }

    /// The transaction as issued at time `t` by the sender's provider.
    fn at(&self, t: Timestamp) -> Transaction {
        let tx = &self.tx;
        tx.issued_by(&tx.gestore, &tx.service_address, self.inner.zoned(t))
    }

    /// The transaction as issued at `t` by the recipient's provider.
    fn at_provider(&self, t: Timestamp, p: &ProviderSpec) -> Transaction {
        self.tx
            .issued_by(p.gestore, &p.service_address(), self.inner.zoned(t))
    }

    async fn maybe(&self, tipo: &str, out: Outgoing, dup: bool) {
        if self.faults.is_missing(tipo) {
            tracing::info!(recipient = %self.rcpt, kind = tipo, "sandbox: receipt left out (fault)");
            return;
        }
        self.inner.send(out, dup).await;
    }

    async fn deliver_envelope(&self) {
        let c = compose::transport_envelope(&self.tx, &self.data);
        let out = Outgoing {
            to: self.rcpt.clone(),
            signer: self.sender_idx,
            composed: c,
            time: self.tx.time.timestamp(),
        };
        self.inner.send(out, false).await;
    }
}

/// Sends a non-acceptance notice to the sender.
async fn refuse(inner: &Inner, sender: &str, signer: usize, composed: Composed, time: Timestamp) {
    let out = Outgoing {
        to: sender.to_owned(),
        signer,
        composed,
        time,
    };
    inner.send(out, false).await;
}

/// SHA-1 hex of a part, for breve receipts.
fn sha1_hex(bytes: &[u8]) -> String {
    crate::store::hex(&openssl::sha::sha1(bytes))
}

/// An ordinary sender: plain delivery to ordinary mailboxes, anomaly
/// envelopes into certified ones.
async fn process_ordinary(inner: &Arc<Inner>, sub: &Submission) {
    for rcpt in &sub.rcpts {
        if inner.world.mailbox(rcpt).is_none() {
            continue;
        }
        match inner.world.provider_of(rcpt) {
            Some((idx, p)) => {
                let t = inner.clock.now();
                let composed = compose::anomaly_envelope(
                    &sub.data,
                    &p.service_address(),
                    &inner.zoned(t),
                    "il messaggio non è un messaggio di posta certificata",
                );
                inner
                    .send(
                        Outgoing {
                            to: rcpt.clone(),
                            signer: idx,
                            composed,
                            time: t,
                        },
                        false,
                    )
                    .await;
            }
            None => {
                if let Err(e) = inner.deliverer.append(rcpt, &sub.data).await {
                    tracing::warn!(error = %e, "sandbox: ordinary delivery failed");
                }
            }
        }
    }
}

/// The receipt flavour requested by the message (`X-TipoRicevuta`).
fn requested_receipt(msg: &Message<'_>) -> ReceiptType {
    crate::pec::classify::top_header_text(msg, wire::H_TIPO_RICEVUTA)
        .and_then(|v| ReceiptType::from_wire(&v))
        .unwrap_or(ReceiptType::Completa)
}

fn transaction(
    inner: &Inner,
    p: &ProviderSpec,
    sub: &Submission,
    msg: Option<&Message<'_>>,
    time: Timestamp,
    seq: u64,
    ricevuta: ReceiptType,
) -> Transaction {
    let zoned = inner.zoned(time);
    let identificativo = format!(
        "opec.sbx{}.{}.{}.{}@{}",
        p.id,
        zoned.strftime("%Y%m%d%H%M%S"),
        std::process::id(),
        seq,
        p.domain
    );
    let destinatari = sub
        .rcpts
        .iter()
        .map(|r| Destinatario {
            address: r.clone(),
            tipo: if inner.world.provider_of(r).is_some() {
                wire::DEST_CERTIFICATO.to_owned()
            } else {
                wire::DEST_ESTERNO.to_owned()
            },
        })
        .collect();
    let risposte = msg
        .and_then(|m| m.reply_to())
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map_or_else(|| sub.mail_from.clone(), str::to_owned);
    Transaction {
        identificativo,
        time: zoned,
        mittente: sub.mail_from.clone(),
        destinatari,
        risposte,
        oggetto: msg.and_then(|m| m.subject()).unwrap_or_default().to_owned(),
        msgid: msg
            .and_then(|m| m.message_id())
            .and_then(normalize_message_id),
        gestore: p.gestore.to_owned(),
        service_address: p.service_address(),
        ricevuta,
    }
}

/// The access point's formal checks (SPEC.md §2.3); `Some((reason, virus))`
/// refuses the message.
fn formal_check(sub: &Submission, msg: &Message<'_>) -> Option<(String, bool)> {
    let from: Vec<&str> = msg
        .from()
        .map(|a| a.iter().filter_map(|x| x.address()).collect())
        .unwrap_or_default();
    if from.len() != 1 {
        return Some((
            "il campo From deve contenere un solo indirizzo".to_owned(),
            false,
        ));
    }
    if !same_address(from[0], &sub.user) || !same_address(from[0], &sub.mail_from) {
        return Some((
            format!(
                "il mittente {} non corrisponde all'utente autenticato {}",
                from[0], sub.user
            ),
            false,
        ));
    }
    let to: Vec<&str> = msg
        .to()
        .map(|a| a.iter().filter_map(|x| x.address()).collect())
        .unwrap_or_default();
    if to.is_empty() {
        return Some(("nessun destinatario nel campo To".to_owned(), false));
    }
    if msg.bcc().is_some() {
        return Some(("il campo Bcc non è ammesso".to_owned(), false));
    }
    let cc: Vec<&str> = msg
        .cc()
        .map(|a| a.iter().filter_map(|x| x.address()).collect())
        .unwrap_or_default();
    for r in &sub.rcpts {
        if !to.iter().chain(cc.iter()).any(|a| same_address(a, r)) {
            return Some((
                format!("il destinatario {r} non è nei campi To o Cc (destinatario nascosto)"),
                false,
            ));
        }
    }
    if sub.rcpts.len() > MAX_RECIPIENTS {
        return Some((format!("più di {MAX_RECIPIENTS} destinatari"), false));
    }
    if sub.data.len().saturating_mul(sub.rcpts.len()) > MAX_TOTAL_BYTES {
        return Some((
            format!(
                "dimensione per numero di destinatari oltre il limite di {MAX_TOTAL_BYTES} byte"
            ),
            false,
        ));
    }
    for part in msg.attachments() {
        if let Some(name) = part.attachment_name() {
            let lower = name.to_ascii_lowercase();
            if let Some(ext) = crate::config::DEFAULT_BLOCKED_EXTENSIONS
                .iter()
                .find(|e| lower.ends_with(&format!(".{e}")))
            {
                return Some((
                    format!("allegato di tipo non ammesso (.{ext}): {name}"),
                    false,
                ));
            }
        }
        if contains(part.contents(), EICAR) {
            return Some(("virus rilevato nel messaggio".to_owned(), true));
        }
    }
    if contains(&sub.data, EICAR) {
        return Some(("virus rilevato nel messaggio".to_owned(), true));
    }
    None
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
