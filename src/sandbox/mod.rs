//! The PEC sandbox: a complete, local PEC world for the tests, the demo and
//! anyone who wants to try PEC software without a provider contract.
//!
//! [`Sandbox::start`] prepares a directory ([`world`]: CA, provider
//! certificates, mailboxes), starts a real Dovecot IMAP server as a
//! supervised child ([`dovecot`]), the simulated providers' SMTP submission
//! service ([`smtp`], [`provider`]) with STARTTLS and implicit TLS, and
//! writes `sandbox.json` and `pecgate.toml` for other programs. Everything
//! listens on 127.0.0.1 on free ports, so several sandboxes can run at once.
//! Faults are injected on demand ([`faults`]).

pub mod clock;
pub mod deliver;
pub mod dovecot;
pub mod faults;
pub mod provider;
pub mod smtp;
pub mod world;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::clock::Clock;
use self::deliver::Deliverer;
use self::dovecot::{Dovecot, DovecotConfig};
use self::faults::Faults;
use self::provider::Provider;
use self::world::{Endpoint, ORDINARY_DOMAIN, PROVIDERS, SandboxInfo, World};

/// How to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Where everything lives (created if missing, reused if present).
    pub dir: PathBuf,
    /// Simulated seconds per real second for the providers' timers.
    pub time_scale: f64,
    /// The faults file, if any (re-read by [`Sandbox::reload_faults`]).
    pub faults: Option<PathBuf>,
}

/// Failures starting or running the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Preparing the directory, certificates or files.
    #[error(transparent)]
    World(#[from] world::WorldError),
    /// Dovecot could not be started or stopped.
    #[error(transparent)]
    Dovecot(#[from] dovecot::DovecotError),
    /// The faults file is invalid.
    #[error(transparent)]
    Faults(#[from] faults::FaultsError),
    /// Anything else while setting up (TLS identity, listeners).
    #[error("sandbox: {0}")]
    Setup(String),
}

/// A running sandbox.
pub struct Sandbox {
    info: SandboxInfo,
    provider: Provider,
    dovecot: Arc<tokio::sync::Mutex<Option<Dovecot>>>,
    deliverer: Arc<Deliverer>,
    faults_path: Option<PathBuf>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("dir", &self.info.dir)
            .finish_non_exhaustive()
    }
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> SandboxError {
    move |e| SandboxError::Setup(format!("{what}: {e}"))
}

impl Sandbox {
    /// Starts a sandbox under `opts.dir`.
    ///
    /// # Errors
    /// Dovecot missing (the message names the package to install), ports,
    /// certificates, an invalid faults file.
    pub async fn start(opts: SandboxOptions) -> Result<Sandbox, SandboxError> {
        Dovecot::binary_available()?;
        let faults = match &opts.faults {
            Some(p) => Faults::load(p)?,
            None => Faults::default(),
        };
        let now = Timestamp::now();
        let world = Arc::new(World::open(&opts.dir, now)?);
        world::write_anchors(&world)?;
        let dir = world.dir.clone();

        // Dovecot on free ports, with the sandbox's TLS certificate.
        let pki = dir.join("pki");
        let ports = dovecot::free_ports(2).map_err(setup("free port"))?;
        let dcfg = DovecotConfig {
            dir: dir.join("dovecot"),
            imap_port: ports[0],
            imaps_port: ports[1],
            cert_pem: pki.join("tls.pem"),
            key_pem: pki.join("tls.key"),
            users: world
                .mailboxes
                .iter()
                .map(|m| (m.address.clone(), m.password.clone()))
                .collect(),
        };
        let dovecot = Dovecot::start(&dcfg).await?;
        let (imap_port, imaps_port) = (dovecot.imap_port(), dovecot.imaps_port());

        // The SMTP submission service.
        let identity = native_tls::Identity::from_pkcs8(
            &crate::pki::cert_pem(&world.tls.cert).map_err(setup("tls certificate"))?,
            &crate::pki::key_pem(&world.tls.key).map_err(setup("tls key"))?,
        )
        .map_err(setup("tls identity"))?;
        let acceptor = native_tls::TlsAcceptor::builder(identity)
            .min_protocol_version(Some(native_tls::Protocol::Tlsv12))
            .build()
            .map_err(setup("tls acceptor"))?;
        let acceptor = tokio_native_tls::TlsAcceptor::from(acceptor);
        let smtp = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(setup("smtp listener"))?;
        let smtps = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(setup("smtps listener"))?;
        let smtp_port = smtp.local_addr().map_err(setup("smtp listener"))?.port();
        let smtps_port = smtps.local_addr().map_err(setup("smtps listener"))?.port();

        let connector =
            crate::tls::connector(Some(&world.ca_file())).map_err(setup("tls connector"))?;
        let passwords: HashMap<String, String> = world
            .mailboxes
            .iter()
            .map(|m| (m.address.to_ascii_lowercase(), m.password.clone()))
            .collect();
        let deliverer = Arc::new(Deliverer::new(connector, imaps_port, passwords));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let clock = Clock::new(now, opts.time_scale);
        let provider = Provider::new(
            world.clone(),
            clock,
            deliverer.clone(),
            faults,
            tracker.clone(),
            cancel.clone(),
        );
        let hostname = "smtp.sandbox.test".to_owned();
        for (listener, mode) in [(smtp, smtp::Mode::StartTls), (smtps, smtp::Mode::Implicit)] {
            tracker.spawn(smtp::serve(
                listener,
                mode,
                acceptor.clone(),
                hostname.clone(),
                Arc::new(provider.clone()),
                cancel.clone(),
                tracker.clone(),
            ));
        }
        let endpoint = |port, tls: &str| Endpoint {
            host: "127.0.0.1".to_owned(),
            port,
            tls: tls.to_owned(),
        };
        let info = SandboxInfo {
            smtp: endpoint(smtp_port, "starttls"),
            smtps: endpoint(smtps_port, "implicit"),
            imap: endpoint(imap_port, "starttls"),
            imaps: endpoint(imaps_port, "implicit"),
            ca_file: world.ca_file(),
            time_scale: clock.scale(),
            pec_domains: PROVIDERS.iter().map(|p| p.domain.to_owned()).collect(),
            ordinary_domains: vec![ORDINARY_DOMAIN.to_owned()],
            mailboxes: world.mailboxes.clone(),
            pid: std::process::id(),
            dir: dir.clone(),
        };
        world::write_files(&world, &info)?;
        let sandbox = Sandbox {
            info,
            provider,
            dovecot: Arc::new(tokio::sync::Mutex::new(Some(dovecot))),
            deliverer,
            faults_path: opts.faults.clone(),
            cancel,
            tracker,
        };
        sandbox.spawn_periodic_restarts();
        Ok(sandbox)
    }

    /// What `sandbox.json` says.
    pub fn info(&self) -> &SandboxInfo {
        &self.info
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.info.dir
    }

    /// Re-reads the faults file (SIGHUP). An invalid file is refused and
    /// the faults in force are kept.
    ///
    /// # Errors
    /// The file cannot be read or is invalid.
    pub async fn reload_faults(&self) -> Result<(), SandboxError> {
        let faults = match &self.faults_path {
            Some(p) => Faults::load(p)?,
            None => Faults::default(),
        };
        let restart = faults.dovecot.restart_on_reload;
        self.provider.set_faults(faults);
        tracing::info!("sandbox: faults reloaded");
        if restart {
            self.restart_dovecot().await?;
        }
        Ok(())
    }

    /// Restarts Dovecot (the fault "Dovecot restarted mid-session").
    ///
    /// # Errors
    /// Dovecot failed to come back.
    pub async fn restart_dovecot(&self) -> Result<(), SandboxError> {
        restart(&self.dovecot, &self.deliverer).await
    }

    /// Restarts Dovecot every `restart_every_seconds` of the faults in
    /// force, re-read at each step so that a reload (SIGHUP) can start,
    /// change or stop the periodic restarts.
    fn spawn_periodic_restarts(&self) {
        let (provider, dovecot, deliverer, cancel) = (
            self.provider.clone(),
            self.dovecot.clone(),
            self.deliverer.clone(),
            self.cancel.clone(),
        );
        self.tracker.spawn(async move {
            loop {
                let every = provider.faults().dovecot.restart_every_seconds;
                let wait = if every == 0 {
                    Duration::from_millis(500)
                } else {
                    Duration::from_secs(every)
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                if every == 0 || provider.faults().dovecot.restart_every_seconds == 0 {
                    continue;
                }
                if let Err(e) = restart(&dovecot, &deliverer).await {
                    tracing::error!(error = %e, "sandbox: dovecot restart failed");
                }
            }
        });
    }

    /// Stops everything: the SMTP service, pending provider work, Dovecot.
    /// No process is left behind.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        self.deliverer.close_all().await;
        if let Some(d) = self.dovecot.lock().await.take()
            && let Err(e) = d.stop().await
        {
            tracing::warn!(error = %e, "sandbox: stopping dovecot");
        }
    }
}

async fn restart(
    dovecot: &tokio::sync::Mutex<Option<Dovecot>>,
    deliverer: &Deliverer,
) -> Result<(), SandboxError> {
    deliverer.close_all().await;
    let mut guard = dovecot.lock().await;
    if let Some(d) = guard.as_mut() {
        d.restart().await?;
        tracing::info!("sandbox: dovecot restarted");
    }
    Ok(())
}

/// `pecgate sandbox`: starts a sandbox, prints a summary, runs until
/// SIGINT/SIGTERM (SIGHUP re-reads the faults file), then stops cleanly.
///
/// # Errors
/// Start-up failures.
pub async fn run_command(opts: SandboxOptions) -> Result<(), SandboxError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(setup("signals"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(setup("signals"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(setup("signals"))?;
    let sandbox = Sandbox::start(opts).await?;
    println!("{}", summary(sandbox.info()));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Err(e) = sandbox.reload_faults().await {
                    tracing::error!(error = %e, "sandbox: faults file refused, previous faults kept");
                    eprintln!("pecgate sandbox: {e}");
                }
            }
        }
    }
    eprintln!("pecgate sandbox: stopping");
    sandbox.shutdown().await;
    Ok(())
}

/// The short summary printed at start.
pub fn summary(info: &SandboxInfo) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "PEC sandbox running in {}", info.dir.display());
    let _ = writeln!(
        s,
        "  SMTP submission: 127.0.0.1:{} (STARTTLS), 127.0.0.1:{} (TLS)",
        info.smtp.port, info.smtps.port
    );
    let _ = writeln!(
        s,
        "  IMAP:            127.0.0.1:{} (STARTTLS), 127.0.0.1:{} (TLS)",
        info.imap.port, info.imaps.port
    );
    let _ = writeln!(s, "  CA (TLS and PEC anchor): {}", info.ca_file.display());
    let _ = writeln!(s, "  time scale: {}x", info.time_scale);
    let _ = writeln!(
        s,
        "  mailboxes (login = address; passwords in sandbox.json):"
    );
    for m in &info.mailboxes {
        let role = match m.role {
            world::Role::Office => "office",
            world::Role::Citizen => "citizen",
            world::Role::Ordinary => "ordinary",
        };
        let _ = writeln!(s, "    {:<40} {role}", m.address);
    }
    let _ = writeln!(
        s,
        "  gateway configuration: {}",
        info.dir.join("pecgate.toml").display()
    );
    let _ = write!(
        s,
        "Stop with Ctrl-C (SIGINT) or SIGTERM; SIGHUP re-reads the faults file."
    );
    s
}
