//! `pecgate run`: the only module that wires the others together.
//!
//! Per mailbox it runs an intake task (outbox watcher + periodic rescan →
//! `outbound::intake_pass`), a sender task (`outbound::Sender`), woken
//! when letters are queued, and the inbound tasks of `crate::inbound`: the
//! IMAP watcher feeding `crate::ingest`, the deadline timer, and (when
//! configured) server-side retention.
//!
//! Signals: SIGTERM or SIGINT stop claiming letters, let a submission or an
//! ingest in progress finish (bounded by `gateway.stop_timeout_seconds`),
//! end IDLE and log out, close the store and exit 0; a second signal exits
//! at once (status 1; whatever was cut is `sending` and becomes `uncertain`
//! at the next start). SIGHUP reloads the configuration ([`reload`]).
//!
//! systemd (`Type=notify`): READY once running, RELOADING/READY around a
//! reload, STOPPING, a one-line STATUS, and WATCHDOG pings from the main
//! loop after the store thread answered (so a wedged store stops the pings
//! and systemd restarts the service).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, LogFormat, MailboxConfig};
use crate::inbound;
use crate::ingest::Ingest;
use crate::outbound::{self, Sender};
use crate::store::Store;
use crate::telemetry::{event, field};
use crate::verify::{TrustAnchors, Verifier};

/// How often the main loop pings the watchdog and refreshes STATUS when
/// systemd asked for no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Runs the daemon until a signal.
///
/// # Errors
/// Configuration (reported as EX_CONFIG by `main`) or start-up failures.
pub fn run(
    config_path: Option<&Path>,
    log_format: Option<LogFormat>,
    log_level: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let (config, path) = Config::load(config_path)?;
    crate::telemetry::init(
        log_format.unwrap_or(config.logging.format),
        log_level.unwrap_or(&config.logging.level),
    )?;
    info!({ field::EVENT } = event::CONFIG_LOADED, { field::PATH } = %path.display(), mailboxes = config.mailboxes.len(), "configuration loaded");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let explicit = config_path.map(Path::to_path_buf);
    runtime.block_on(serve(config, explicit))
}

/// Tells the service manager (`$NOTIFY_SOCKET`, when set) about the
/// daemon's state. Failures are logged at debug level only: without systemd
/// there is nobody to tell.
fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!({ field::ERROR } = %e, "sd_notify failed");
    }
}

/// The tasks of one mailbox, stopped together (on reload or shutdown).
struct MailboxTasks {
    config: MailboxConfig,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// What every mailbox's tasks share.
#[derive(Clone)]
struct Shared {
    store: Store,
    ingest: Ingest,
}

/// The sender of `mailbox`: fails when its SMTP client cannot be built
/// (e.g. an unreadable CA file), before any task of the mailbox starts.
fn sender_for(config: &Config, mailbox: &MailboxConfig, shared: &Shared) -> anyhow::Result<Sender> {
    Sender::new(config, mailbox, shared.store.clone())
        .map_err(|e| anyhow::anyhow!("mailbox {}: {e}", mailbox.name))
}

/// Starts every task of `mailbox`, with its `sender` (see [`sender_for`]).
fn spawn_mailbox(
    config: &Arc<Config>,
    mailbox: &MailboxConfig,
    sender: Sender,
    shared: &Shared,
    root: &CancellationToken,
) -> MailboxTasks {
    let cancel = root.child_token();
    let tracker = TaskTracker::new();
    let wake = Arc::new(Notify::new());
    let synced = Arc::new(Notify::new());
    tracker.spawn(inbound::watch_task(
        mailbox.clone(),
        shared.store.clone(),
        shared.ingest.clone(),
        synced.clone(),
        cancel.clone(),
    ));
    tracker.spawn(inbound::timer_task(
        config.clone(),
        mailbox.clone(),
        shared.store.clone(),
        synced,
        wake.clone(),
        cancel.clone(),
    ));
    if mailbox.retention.is_some() {
        let every =
            (mailbox.imap.poll * 10).clamp(Duration::from_secs(10), Duration::from_secs(3600));
        tracker.spawn(inbound::retention_task(
            mailbox.clone(),
            shared.store.clone(),
            every,
            cancel.clone(),
        ));
    }
    tracker.spawn(intake_task(
        config.clone(),
        mailbox.clone(),
        shared.store.clone(),
        wake.clone(),
        cancel.clone(),
    ));
    tracker.spawn(sender_task(sender, mailbox.clone(), wake, cancel.clone()));
    tracker.close();
    MailboxTasks {
        config: mailbox.clone(),
        cancel,
        tracker,
    }
}

/// Creates the folders a configuration needs.
fn create_folders(config: &Config) -> anyhow::Result<()> {
    for m in config.mailboxes.values() {
        for dir in [&m.outbox, &m.sent, &m.inbox] {
            crate::archive::create_folder(dir, dir)
                .with_context(|| format!("mailbox {}: creating {}", m.name, dir.display()))?;
        }
    }
    crate::archive::create_folder(&config.store.archive, &config.store.archive)
        .with_context(|| format!("creating {}", config.store.archive.display()))?;
    Ok(())
}

fn verifier(config: &Config) -> anyhow::Result<Arc<Verifier>> {
    let anchors = if config.trust.anchors.is_empty() {
        TrustAnchors::builtin()
    } else {
        TrustAnchors::from_dirs(&config.trust.anchors)
    }
    .map_err(|e| anyhow::anyhow!("trust anchors: {e}"))?;
    Ok(Arc::new(Verifier::new(anchors)))
}

/// The one-line summary for systemd's STATUS (and `systemctl status`).
async fn status_line(store: &Store, mailboxes: usize) -> String {
    match store.call(|db| db.state_counts()).await {
        Ok(counts) => {
            let mut by: std::collections::BTreeMap<String, u64> = Default::default();
            for c in counts {
                *by.entry(c.state.clone()).or_default() += c.count;
            }
            let n = |s: &str| by.get(s).copied().unwrap_or(0);
            format!(
                "{mailboxes} mailbox(es); {} queued, {} sending, {} awaiting receipts, {} uncertain, {} delivered, {} failed or refused",
                n("queued"),
                n("sending"),
                n("submitted") + n("accepted"),
                n("uncertain"),
                n("delivered") + n("partially-delivered"),
                n("failed") + n("refused") + n("not-accepted"),
            )
        }
        Err(e) => format!("store not answering: {e}"),
    }
}

async fn serve(config: Config, explicit: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    // First of all: a signal during start-up must not kill the process
    // halfway (it is handled once the tasks run).
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    create_folders(&config)?;
    let store = Store::open(&config.store.database)
        .await
        .with_context(|| format!("opening the store {}", config.store.database.display()))?;
    let uncertain = outbound::recover_sending(&store)
        .await
        .map_err(|e| anyhow::anyhow!("recovering interrupted submissions: {e}"))?;
    let shared = Shared {
        store: store.clone(),
        ingest: Ingest::new(verifier(&config)?, &config.store.archive)
            .with_gateway_hostname(&config.gateway.hostname),
    };
    let root = CancellationToken::new();
    let mut config = Arc::new(config);
    let mut groups: BTreeMap<String, MailboxTasks> = BTreeMap::new();
    for mailbox in config.mailboxes.values() {
        let sender = sender_for(&config, mailbox, &shared)?;
        let g = spawn_mailbox(&config, mailbox, sender, &shared, &root);
        groups.insert(mailbox.name.clone(), g);
    }
    let backups = TaskTracker::new();
    if config.backup.is_some() {
        backups.spawn(backup_task(config.clone(), root.clone()));
    }
    backups.close();
    info!(
        { field::EVENT } = event::DAEMON_STARTED,
        pid = std::process::id(),
        uncertain_found = uncertain,
        "pecgate running"
    );
    let status = status_line(&store, groups.len()).await;
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);

    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog.map_or(STATUS_EVERY, |w| (w / 2).max(Duration::from_millis(100)));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let monotonic = NotifyState::monotonic_usec_now().ok();
                let mut states = vec![NotifyState::Reloading];
                states.extend(monotonic);
                notify(&states);
                match reload(explicit.as_deref(), &config, &shared, &root, &mut groups).await {
                    Ok(new) => config = new,
                    Err(e) => {
                        error!({ field::EVENT } = event::CONFIG_RELOAD_FAILED, { field::ERROR } = %format!("{e:#}"), "new configuration refused; the running one is kept");
                    }
                }
                let status = status_line(&store, groups.len()).await;
                notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            _ = ticks.tick() => {
                // The ping proves the main loop and the store thread answer.
                let status = status_line(&store, groups.len()).await;
                if watchdog.is_some() {
                    notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
                } else {
                    notify(&[NotifyState::Status(&status)]);
                }
            }
        }
    }
    info!(
        { field::EVENT } = event::DAEMON_STOPPING,
        "stopping: no new letters are claimed; work in progress finishes"
    );
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: work in progress finishes"),
    ]);
    root.cancel();
    let limit = config.gateway.stop_timeout;
    let all = async {
        for g in groups.values() {
            g.tracker.wait().await;
        }
        backups.wait().await;
    };
    let drained = tokio::select! {
        () = all => true,
        () = tokio::time::sleep(limit) => false,
        _ = term.recv() => false,
        _ = int.recv() => false,
    };
    if !drained {
        warn!(
            { field::EVENT } = event::DAEMON_STOPPED,
            limit_seconds = limit.as_secs(),
            "stopped before work in progress finished (second signal or stop timeout)"
        );
        // Anything interrupted is `sending` in the store and becomes
        // `uncertain` at the next start: nothing is sent twice.
        return Ok(ExitCode::from(1));
    }
    if let Err(e) = store.close().await {
        error!({ field::ERROR } = %e, "closing the store");
    }
    info!({ field::EVENT } = event::DAEMON_STOPPED, "stopped");
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: reads the configuration again. An invalid one is refused (the
/// running one stays). Mailboxes removed or changed are stopped (work in
/// progress finishes: a claimed letter is left claimed and taken in again,
/// a submission completes), then mailboxes added or changed are started.
/// Settings that are not per mailbox (deadlines, outbox timing) restart
/// every mailbox; the store and archive paths, trust anchors and logging
/// need a restart and are refused when changed.
async fn reload(
    explicit: Option<&Path>,
    old: &Arc<Config>,
    shared: &Shared,
    root: &CancellationToken,
    groups: &mut BTreeMap<String, MailboxTasks>,
) -> anyhow::Result<Arc<Config>> {
    let (new, path) = Config::load(explicit)?;
    if new.store != old.store || new.trust != old.trust {
        anyhow::bail!(
            "[store] or [trust] changed: these need a restart (systemctl restart pecgate); nothing was changed"
        );
    }
    create_folders(&new)?;
    let global_changed = {
        let strip = |c: &Config| {
            let mut c = c.clone();
            c.mailboxes.clear();
            c.logging = old.logging.clone();
            c
        };
        strip(&new) != strip(old)
    };
    let new = Arc::new(new);
    // Build every new sender first: a bad mailbox refuses the whole reload
    // before anything is stopped.
    let to_start = new
        .mailboxes
        .values()
        .filter(|m| global_changed || groups.get(&m.name).is_none_or(|g| g.config != **m))
        .map(|m| Ok((m, sender_for(&new, m, shared)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let to_stop: Vec<String> = groups
        .keys()
        .filter(|name| {
            global_changed
                || new
                    .mailboxes
                    .get(*name)
                    .is_none_or(|m| groups[*name].config != *m)
        })
        .cloned()
        .collect();
    for name in &to_stop {
        if let Some(g) = groups.remove(name) {
            g.cancel.cancel();
            g.tracker.wait().await;
        }
    }
    let mut started = Vec::new();
    for (m, sender) in to_start {
        let g = spawn_mailbox(&new, m, sender, shared, root);
        started.push(m.name.clone());
        groups.insert(m.name.clone(), g);
    }
    let removed: Vec<&String> = to_stop
        .iter()
        .filter(|n| !new.mailboxes.contains_key(*n))
        .collect();
    info!(
        { field::EVENT } = event::CONFIG_RELOADED,
        { field::PATH } = %path.display(),
        mailboxes = new.mailboxes.len(),
        restarted = ?started,
        removed = ?removed,
        "configuration reloaded"
    );
    if new.logging != old.logging {
        warn!(
            { field::EVENT } = event::CONFIG_RELOADED,
            "[logging] changes take effect at the next restart"
        );
    }
    Ok(new)
}

/// How often the daemon asks whether a scheduled backup is due.
const BACKUP_CHECK: Duration = Duration::from_secs(10 * 60);

/// Scheduled backups (`[backup]`): checked at start and every ten minutes,
/// on a blocking thread with its own read-only connection. A backup in
/// progress at shutdown finishes (it is bounded by the stop timeout like
/// any other work; an unfinished one leaves only a `.partial-` folder).
/// The configuration of the start is used (a reload does not change it).
async fn backup_task(config: Arc<Config>, cancel: CancellationToken) {
    loop {
        let c = config.clone();
        let job = tokio::task::spawn_blocking(move || {
            crate::backup::run_scheduled(&c, jiff::Timestamp::now())
        });
        // Errors are logged by run_scheduled itself (backup.failed).
        if let Err(e) = job.await {
            error!({ field::EVENT } = event::BACKUP_FAILED, { field::ERROR } = %e, "backup task failed");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(BACKUP_CHECK) => {}
        }
    }
}

async fn intake_task(
    config: Arc<Config>,
    mailbox: MailboxConfig,
    store: Store,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let watch = crate::outbox::intake::watch(&mailbox.outbox);
    let (_watcher, mut ticks) = match watch {
        Ok((w, rx)) => (Some(w), Some(rx)),
        Err(e) => {
            warn!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "outbox watch unavailable: periodic rescan only");
            (None, None)
        }
    };
    let mut first = true;
    loop {
        let recover = first;
        first = false;
        // Groups of letters, each its own store job; the sender is woken
        // after each group (failures are logged per letter inside).
        let n = outbound::intake_round(&store, &config, &mailbox, recover, &cancel, &wake).await;
        if n > 0 {
            wake.notify_one();
        }
        // Letters settle: look again after `settle` when something changed.
        let rescan = config.outbox.rescan;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(rescan) => {}
            Some(()) = async { match ticks.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(config.outbox.settle + Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

async fn sender_task(
    mut sender: Sender,
    mailbox: MailboxConfig,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    loop {
        let pass = sender.pass(&cancel).await;
        if pass.suspended {
            error!({ field::EVENT } = event::MAILBOX_AUTH_REFUSED, { field::MAILBOX } = %mailbox.name, "mailbox suspended: sending stopped until pecgate is restarted with a working password");
            cancel.cancelled().await;
            return;
        }
        if cancel.is_cancelled() {
            return;
        }
        let wait = if pass.attempted > 0 {
            Duration::ZERO
        } else {
            pass.wait.unwrap_or(Duration::from_secs(5))
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}
