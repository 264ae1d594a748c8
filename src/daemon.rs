//! `pecgate run`: the only module that wires the others together.
//!
//! Per mailbox it runs an intake task (outbox watcher + periodic rescan →
//! `outbound::intake_pass`) and a sender task (`outbound::Sender`), woken
//! when letters are queued. SIGTERM or SIGINT stop claiming letters, let a
//! submission in progress finish (bounded by the SMTP timeout), close the
//! store and exit 0; a second signal exits at once. Later issues add the
//! inbound tasks (IMAP), SIGHUP reload and sd_notify.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, LogFormat, MailboxConfig};
use crate::outbound::{self, Sender};
use crate::store::Store;
use crate::telemetry::{event, field};

/// How long running work may take to finish after SIGTERM before the
/// process exits anyway.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

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
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    for m in config.mailboxes.values() {
        for dir in [&m.outbox, &m.sent, &m.inbox] {
            crate::archive::create_folder(dir, dir)
                .with_context(|| format!("mailbox {}: creating {}", m.name, dir.display()))?;
        }
    }
    crate::archive::create_folder(&config.store.archive, &config.store.archive)
        .with_context(|| format!("creating {}", config.store.archive.display()))?;
    let store = Store::open(&config.store.database)
        .await
        .with_context(|| format!("opening the store {}", config.store.database.display()))?;
    let uncertain = outbound::recover_sending(&store)
        .await
        .map_err(|e| anyhow::anyhow!("recovering interrupted submissions: {e}"))?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let config = Arc::new(config);
    for mailbox in config.mailboxes.values() {
        let wake = Arc::new(Notify::new());
        tracker.spawn(intake_task(
            config.clone(),
            mailbox.clone(),
            store.clone(),
            wake.clone(),
            cancel.clone(),
        ));
        let sender = Sender::new(&config, mailbox, store.clone())
            .map_err(|e| anyhow::anyhow!("mailbox {}: {e}", mailbox.name))?;
        tracker.spawn(sender_task(sender, mailbox.clone(), wake, cancel.clone()));
    }
    tracker.close();
    info!(
        { field::EVENT } = event::DAEMON_STARTED,
        pid = std::process::id(),
        uncertain_found = uncertain,
        "pecgate running"
    );

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!(
        { field::EVENT } = event::DAEMON_STOPPING,
        "stopping: no new letters are claimed; work in progress finishes"
    );
    cancel.cancel();
    let drained = tokio::select! {
        () = tracker.wait() => true,
        () = tokio::time::sleep(DRAIN_LIMIT) => false,
        _ = term.recv() => false,
        _ = int.recv() => false,
    };
    if !drained {
        warn!(
            { field::EVENT } = event::DAEMON_STOPPED,
            "stopped before work in progress finished (second signal or drain limit)"
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
        let (cfg, mb, token) = (config.clone(), mailbox.clone(), cancel.clone());
        let recover = first;
        first = false;
        match store
            .call(move |db| Ok(outbound::intake_pass(db, &cfg, &mb, recover, &token)))
            .await
        {
            Ok(n) if n > 0 => wake.notify_one(),
            Ok(_) => {}
            Err(e) => {
                error!({ field::MAILBOX } = %mailbox.name, { field::ERROR } = %e, "intake failed")
            }
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
