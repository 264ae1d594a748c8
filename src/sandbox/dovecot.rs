//! A supervised Dovecot IMAP server on loopback, for the PEC sandbox and the
//! tests.
//!
//! [`Dovecot::start`] writes a standalone configuration under one directory
//! (nothing is read from `/etc/dovecot`), starts `dovecot -F` as a child in a
//! process group of its own and returns once both ports answer.
//! [`Dovecot::stop`] shuts it down and checks that no process of the group
//! is left; dropping a running [`Dovecot`] kills the group (best effort), so a
//! panicking test leaves nothing behind. Several instances run at once as
//! long as each has its own directory and ports.
//!
//! # The directory
//!
//! | path | what |
//! |---|---|
//! | `dovecot.conf` | the generated configuration |
//! | `users` | passwd-file, one `address:{PLAIN}password` a line (0600, owned by the mail user) |
//! | `deny-plaintext` | the deny passdb that refuses LOGIN before STARTTLS (see below) |
//! | `tls/cert.pem`, `tls/key.pem` | copies of the certificate and key given in [`DovecotConfig`] |
//! | `mail/<domain>/<local part>/Maildir` | the mailboxes (owned by the mail user) |
//! | `run/`, `state/` | Dovecot's `base_dir` and `state_dir` |
//! | `dovecot.log` | Dovecot's log |
//! | `dovecot.out` | the master's stdout and stderr (configuration errors land here) |
//!
//! # Choices
//!
//! - **TLS is required for login.** Port `imap_port` speaks STARTTLS,
//!   `imaps_port` implicit TLS, TLS 1.2 at least (`ssl = required`,
//!   `disable_plaintext_auth = yes`). Dovecot 2.3 treats a connection whose
//!   remote address equals its local address (any loopback connection) as
//!   "secured" and would accept LOGIN in clear text on it, so the first passdb
//!   is a deny passdb keyed on `%{secured}`: it expands to `secured` for such a
//!   connection and to `TLS` after STARTTLS or on the implicit-TLS port, and
//!   the file lists only `secured`. LOGIN before STARTTLS therefore fails
//!   with `AUTHENTICATIONFAILED` even with the right password (the
//!   capabilities still announce `AUTH=PLAIN`: Dovecot cannot be told to send
//!   `LOGINDISABLED` on loopback).
//! - **Passwords are stored as `{PLAIN}`**: this is a sandbox, the file is
//!   readable only by the mail user.
//! - **Failures are fast**: `auth_failure_delay = 0` and the anvil
//!   `auth-penalty` listener is disabled, so a test that tries a wrong
//!   password does not slow down (up to 15 s) every later login of the same
//!   instance.
//! - **Users**: the login is the full address; the home is
//!   `mail/%d/%n`, mail is Maildir, INBOX is auto-subscribed, IDLE is on
//!   (Dovecot's default), the IMAP QUOTA extension is enabled with
//!   [`QUOTA_STORAGE`] per user, and `mail_max_userip_connections` is
//!   raised to 1000 because the tests open many connections.
//! - **Root or not.** As root, every unprivileged process (auth, anvil,
//!   stats, the mail processes) runs as uid/gid 65534 (`nobody`), so the
//!   directory must be reachable by that uid: the directory itself is made
//!   `0755`, and an ancestor that lacks the search bit is given `o+x` if it
//!   lies under the temporary directory and belongs to root (the
//!   `tempfile::tempdir()` case); anywhere else start fails and names the
//!   directory. Not as root, everything runs as the current user (the
//!   "rootless" variant: no chroot for the login and anvil processes).
//!
//! # Must never
//!
//! Read or write anything outside the directory (except the ancestors'
//! search bit above), listen anywhere but 127.0.0.1, or signal a process
//! that is not in the instance's own process group.
//!
//! Signals are sent with the `kill(1)` program: the crate forbids `unsafe`
//! and has no `nix`, and std can only send SIGKILL to a direct child.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The storage quota of every user (the `quota_rule`), reported by
/// GETQUOTAROOT as `STORAGE 0 1048576`.
pub const QUOTA_STORAGE: &str = "1G";

/// How long [`Dovecot::start`] waits for both ports (≈ 60 ms is usual).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Dovecot::stop`] lets the master shut down after SIGTERM
/// (≈ 1.1 s is usual) before it kills the process group.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long stopping waits for the last processes of the group to go.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);
/// Polling interval for readiness and shutdown.
const POLL: Duration = Duration::from_millis(20);
/// Lines of log quoted in start-up errors.
const LOG_TAIL_LINES: usize = 20;
/// uid and gid of `nobody`/`nogroup`: the mail user when running as root
/// (Dovecot refuses to run mail processes as root).
const NOBODY: u32 = 65534;
/// Room left after `run/` for Dovecot's longest socket path
/// (`run/token-login/imap-urlauth`), against the 108-byte `sun_path`.
const SOCKET_PATH_MAX: usize = 107;
const LONGEST_SOCKET: &str = "/run/token-login/imap-urlauth";

/// What to start: one Dovecot instance under one directory.
#[derive(Clone)]
pub struct DovecotConfig {
    /// Where everything lives (created if missing, reused if present: the
    /// mail survives a restart). See the module docs for the layout.
    pub dir: PathBuf,
    /// The IMAP port with STARTTLS, on 127.0.0.1.
    pub imap_port: u16,
    /// The IMAP port with implicit TLS, on 127.0.0.1.
    pub imaps_port: u16,
    /// PEM of the TLS server certificate (chain allowed); copied into the
    /// directory at each start.
    pub cert_pem: PathBuf,
    /// PEM of its private key; copied into the directory at each start.
    pub key_pem: PathBuf,
    /// `(address, password)`: the address is also the login name.
    pub users: Vec<(String, String)>,
}

impl fmt::Debug for DovecotConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the passwords.
        let users: Vec<&str> = self.users.iter().map(|(u, _)| u.as_str()).collect();
        f.debug_struct("DovecotConfig")
            .field("dir", &self.dir)
            .field("imap_port", &self.imap_port)
            .field("imaps_port", &self.imaps_port)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &self.key_pem)
            .field("users", &users)
            .finish()
    }
}

/// Failures starting, stopping or administering Dovecot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DovecotError {
    /// The `dovecot` (or `doveadm`) binary is not installed.
    #[error(
        "dovecot not found: install it with `apt-get install dovecot-imapd` (or run scripts/setup)"
    )]
    NotInstalled,
    /// The configuration cannot be used (bad port, user name, directory).
    #[error("dovecot config: {0}")]
    Config(String),
    /// Reading or writing a file or directory failed.
    #[error("dovecot {what} {}: {source}", path.display())]
    Io {
        /// What the path is ("users file", "tls certificate", ...).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A program (dovecot, doveadm, kill) could not be run.
    #[error("dovecot: running {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The master exited before both ports answered.
    #[error("dovecot exited during start-up ({status}); last lines of its logs:\n{log_tail}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// The end of `dovecot.log` and `dovecot.out`.
        log_tail: String,
    },
    /// The ports did not answer in time.
    #[error(
        "dovecot did not answer on 127.0.0.1:{imap_port} and 127.0.0.1:{imaps_port} \
         within {waited:?}; last lines of its logs:\n{log_tail}"
    )]
    NotReady {
        /// The STARTTLS port.
        imap_port: u16,
        /// The implicit-TLS port.
        imaps_port: u16,
        /// How long start waited.
        waited: Duration,
        /// The end of `dovecot.log` and `dovecot.out`.
        log_tail: String,
    },
    /// Processes of the instance survived SIGKILL.
    #[error("dovecot processes left after stop (process group {pgid}): {pids:?}")]
    Leftover {
        /// The process group (the master's pid).
        pgid: u32,
        /// The survivors.
        pids: Vec<u32>,
    },
    /// A doveadm command failed.
    #[error("doveadm {args}: {status}: {stderr}")]
    Doveadm {
        /// The arguments after `-c <conf>`.
        args: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A doveadm command printed something unexpected.
    #[error("doveadm {args}: unexpected output {output:?}")]
    DoveadmOutput {
        /// The arguments after `-c <conf>`.
        args: String,
        /// What it printed.
        output: String,
    },
}

/// Returns a closure mapping an I/O error on `path` to [`DovecotError::Io`].
fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DovecotError + 'a {
    move |source| DovecotError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A running Dovecot instance. Dropping it kills its process group.
pub struct Dovecot {
    /// The configuration it was started with (restart and add_user reuse it).
    cfg: DovecotConfig,
    /// Paths under the (canonical) directory.
    layout: Layout,
    /// Who the unprivileged processes run as (owner of users and mail).
    identity: Identity,
    /// `pecgate-<hash of the directory>`: process titles and the greeting.
    instance: String,
    /// The master's pid, which is also the process group id.
    pgid: u32,
    /// The master.
    child: Child,
    /// Set once stopping has finished cleanly: Drop then has nothing to do.
    stopped: bool,
}

impl fmt::Debug for Dovecot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dovecot")
            .field("dir", &self.layout.dir)
            .field("instance", &self.instance)
            .field("pid", &self.pgid)
            .field("imap_port", &self.cfg.imap_port)
            .field("imaps_port", &self.cfg.imaps_port)
            .finish_non_exhaustive()
    }
}

impl Dovecot {
    /// Finds the `dovecot` binary: on `PATH`, else `/usr/sbin/dovecot`.
    ///
    /// # Errors
    /// [`DovecotError::NotInstalled`], whose message says how to install it.
    pub fn binary_available() -> Result<PathBuf, DovecotError> {
        find_program("dovecot", &["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"])
            .ok_or(DovecotError::NotInstalled)
    }

    /// Writes the configuration, users and certificates under `cfg.dir`,
    /// starts `dovecot -F` in its own process group and waits (up to 10 s)
    /// until the STARTTLS port sends this instance's greeting and the
    /// implicit-TLS port accepts a connection.
    ///
    /// # Errors
    /// Dovecot missing; an invalid configuration (ports, user names,
    /// directory not reachable by the mail user); files that cannot be
    /// written; Dovecot exiting or not answering in time (the error quotes
    /// the end of its logs; "Address already in use" means a port is taken).
    pub async fn start(cfg: &DovecotConfig) -> Result<Dovecot, DovecotError> {
        let dovecot = Self::binary_available()?;
        validate(cfg)?;
        let identity = Identity::current()?;
        let layout = prepare(cfg, &identity)?;
        let instance = instance_name(&layout.dir);
        let conf = render_config(&ConfigParams {
            dir: layout.dir_str()?,
            instance: &instance,
            imap_port: cfg.imap_port,
            imaps_port: cfg.imaps_port,
            identity: &identity,
        });
        write_file(&layout.conf(), conf.as_bytes(), 0o644, None, "config file")?;
        remove_stale_pid(&layout)?;

        let out_path = layout.out();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(io_err("output file", &out_path))?;
        let err = out.try_clone().map_err(io_err("output file", &out_path))?;
        let child = Command::new(&dovecot)
            .arg("-F")
            .arg("-c")
            .arg(layout.conf())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DovecotError::Spawn {
                program: dovecot.clone(),
                source,
            })?;
        let Some(pgid) = child.id() else {
            // Unreachable: a child never waited for has a pid.
            return Err(DovecotError::Spawn {
                program: dovecot,
                source: io::Error::other("spawned child has no pid"),
            });
        };
        let mut this = Dovecot {
            cfg: cfg.clone(),
            layout,
            identity,
            instance,
            pgid,
            child,
            stopped: false,
        };
        if let Err(e) = this.wait_ready().await {
            // Kill whatever started; the start-up error is what matters.
            let _ = this.shutdown(false).await;
            return Err(e);
        }
        tracing::debug!(
            pid = pgid,
            path = %this.layout.dir.display(),
            imap_port = cfg.imap_port,
            imaps_port = cfg.imaps_port,
            "dovecot started"
        );
        Ok(this)
    }

    /// Stops Dovecot: SIGTERM to the master, up to 3 s for it to exit (≈ 1.1 s
    /// is usual), then SIGKILL to the whole process group; returns once no
    /// process of the group is left.
    ///
    /// # Errors
    /// `kill` cannot be run; processes survive ([`DovecotError::Leftover`]).
    pub async fn stop(mut self) -> Result<(), DovecotError> {
        self.shutdown(true).await
    }

    /// Kills Dovecot at once (SIGKILL to the process group) and returns once
    /// no process of the group is left: the fast teardown for tests.
    ///
    /// # Errors
    /// As [`Dovecot::stop`].
    pub async fn kill(mut self) -> Result<(), DovecotError> {
        self.shutdown(false).await
    }

    /// Stops Dovecot gracefully and starts it again with the same
    /// configuration (the sandbox fault "Dovecot restarted mid-session").
    /// Mail is kept; connected clients get `* BYE` and must reconnect.
    ///
    /// # Errors
    /// As [`Dovecot::stop`] and [`Dovecot::start`]; after a failed start
    /// nothing is running and a later `restart` may be tried again.
    pub async fn restart(&mut self) -> Result<(), DovecotError> {
        self.shutdown(true).await?;
        let fresh = Self::start(&self.cfg).await?;
        // The old value is marked stopped: dropping it does nothing.
        *self = fresh;
        Ok(())
    }

    /// The STARTTLS port.
    pub fn imap_port(&self) -> u16 {
        self.cfg.imap_port
    }

    /// The implicit-TLS port.
    pub fn imaps_port(&self) -> u16 {
        self.cfg.imaps_port
    }

    /// The master's pid, which is also the id of the instance's process
    /// group.
    pub fn pid(&self) -> u32 {
        self.pgid
    }

    /// The instance name (`pecgate-` and a hash of the directory). Dovecot's
    /// processes are titled `dovecot-<instance>/<service>`.
    pub fn instance_name(&self) -> &str {
        &self.instance
    }

    /// The generated `dovecot.conf` (what `doveadm -c` takes).
    pub fn config_path(&self) -> PathBuf {
        self.layout.conf()
    }

    /// The directory (canonical), as in the module docs.
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// Adds a user while Dovecot runs and keeps it for restarts. Dovecot
    /// re-reads the users file at most once a second, so this waits (up to
    /// 3 s, usually under one) until `doveadm auth test` accepts the new
    /// login: when it returns, the user can log in.
    ///
    /// # Errors
    /// An invalid or duplicate address or password; the file cannot be
    /// written; Dovecot does not accept the login in time.
    pub async fn add_user(&mut self, address: &str, password: &str) -> Result<(), DovecotError> {
        validate_user(address, password)?;
        if self
            .cfg
            .users
            .iter()
            .any(|(u, _)| u.eq_ignore_ascii_case(address))
        {
            return Err(DovecotError::Config(format!(
                "user {address:?} already exists"
            )));
        }
        self.cfg
            .users
            .push((address.to_owned(), password.to_owned()));
        write_users(&self.layout, &self.cfg, &self.identity)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (program, mut cmd) = self.doveadm_command(&["auth", "test", address, password])?;
            cmd.stdin(Stdio::null());
            let out = Command::from(cmd).output().await;
            match doveadm_outcome(program, &["auth", "test", address, "<password>"], out) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Runs `doveadm -c <conf> ARGS...` and returns its stdout. Blocks for
    /// the few tens of milliseconds doveadm takes.
    ///
    /// # Errors
    /// doveadm missing or failing (its stderr is in the error).
    pub fn doveadm(&self, args: &[&str]) -> Result<String, DovecotError> {
        let (program, mut cmd) = self.doveadm_command(args)?;
        let out = cmd.stdin(Stdio::null()).output();
        doveadm_outcome(program, args, out)
    }

    /// `doveadm -c <conf> ARGS...`, not started yet, and the program path.
    fn doveadm_command(
        &self,
        args: &[&str],
    ) -> Result<(PathBuf, std::process::Command), DovecotError> {
        let program = find_program("doveadm", &["/usr/bin/doveadm", "/usr/sbin/doveadm"])
            .ok_or(DovecotError::NotInstalled)?;
        let mut cmd = std::process::Command::new(&program);
        cmd.arg("-c").arg(self.layout.conf()).args(args);
        Ok((program, cmd))
    }

    /// Sets the UIDVALIDITY of `user`'s `mailbox` (created if it is INBOX),
    /// as a server does when it rebuilds a mailbox; clients see it at the
    /// next SELECT.
    ///
    /// # Errors
    /// As [`Dovecot::doveadm`].
    pub fn set_uid_validity(
        &self,
        user: &str,
        mailbox: &str,
        value: u32,
    ) -> Result<(), DovecotError> {
        let value = value.to_string();
        self.doveadm(&[
            "mailbox",
            "update",
            "-u",
            user,
            "--uid-validity",
            &value,
            mailbox,
        ])
        .map(drop)
    }

    /// The UIDVALIDITY of `user`'s `mailbox`, as doveadm reports it.
    ///
    /// # Errors
    /// As [`Dovecot::doveadm`], or output that is not a number.
    pub fn uid_validity(&self, user: &str, mailbox: &str) -> Result<u32, DovecotError> {
        let args = [
            "-f",
            "flow",
            "mailbox",
            "status",
            "-u",
            user,
            "uidvalidity",
            mailbox,
        ];
        let out = self.doveadm(&args)?;
        // "-f flow" prints `INBOX uidvalidity=1795669533`.
        out.split_whitespace()
            .find_map(|field| field.strip_prefix("uidvalidity="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| DovecotError::DoveadmOutput {
                args: args.join(" "),
                output: out.clone(),
            })
    }

    /// Polls until the STARTTLS port greets as this instance and the
    /// implicit-TLS port accepts, the master exits, or the deadline passes.
    async fn wait_ready(&mut self) -> Result<(), DovecotError> {
        let started = Instant::now();
        let (imap_port, imaps_port) = (self.cfg.imap_port, self.cfg.imaps_port);
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_err("master process", &self.layout.dir))?
            {
                return Err(DovecotError::Exited {
                    status,
                    log_tail: self.layout.log_tail(),
                });
            }
            // A greeting that names this instance proves that this master
            // bound every listener (it binds them all before any login
            // process starts), not some other program holding the port.
            if greets_as(imap_port, &self.instance).await && accepts(imaps_port).await {
                return Ok(());
            }
            if started.elapsed() >= START_TIMEOUT {
                return Err(DovecotError::NotReady {
                    imap_port,
                    imaps_port,
                    waited: started.elapsed(),
                    log_tail: self.layout.log_tail(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the master (gracefully or not) and makes sure no process of
    /// its group is left. Does nothing if already stopped.
    async fn shutdown(&mut self, graceful: bool) -> Result<(), DovecotError> {
        if self.stopped {
            return Ok(());
        }
        let (pgid, dir, child) = (self.pgid, &self.layout.dir, &mut self.child);
        let running = child
            .try_wait()
            .map_err(io_err("master process", dir))?
            .is_none();
        if running && graceful {
            // The master forwards SIGTERM to its children and waits for them.
            signal("TERM", &pgid.to_string())?;
            if tokio::time::timeout(STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(pid = pgid, "dovecot ignored SIGTERM, killing it");
            }
        }
        if child
            .try_wait()
            .map_err(io_err("master process", dir))?
            .is_none()
        {
            // Still ours and unreaped: the group id cannot have been reused.
            signal("KILL", &format!("-{pgid}"))?;
            child.wait().await.map_err(io_err("master process", dir))?;
        }
        // Children outlive a killed master for a moment (and become zombies
        // of init, which /proc shows but which are gone for our purpose).
        let deadline = Instant::now() + REAP_TIMEOUT;
        loop {
            let left = group_members(pgid);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DovecotError::Leftover { pgid, pids: left });
            }
            // The group still has members, so its id is still ours.
            signal("KILL", &format!("-{pgid}"))?;
            tokio::time::sleep(POLL).await;
        }
        self.stopped = true;
        tracing::debug!(pid = pgid, "dovecot stopped");
        Ok(())
    }
}

impl Drop for Dovecot {
    /// Best effort: SIGKILL to the process group unless the instance was
    /// stopped cleanly; the master is then reaped by tokio in the
    /// background.
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let unreaped = matches!(self.child.try_wait(), Ok(None));
        // Once the master is reaped, its pid may be reused: signal the
        // group only while it still has members (which keep the id ours).
        if unreaped || !group_members(self.pgid).is_empty() {
            let _ = signal("KILL", &format!("-{}", self.pgid));
        }
        let _ = self.child.start_kill();
    }
}

/// Turns doveadm's exit into its stdout or an error.
fn doveadm_outcome(
    program: PathBuf,
    args: &[&str],
    out: io::Result<std::process::Output>,
) -> Result<String, DovecotError> {
    let out = out.map_err(|source| DovecotError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(DovecotError::Doveadm {
            args: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Returns a loopback port that was free a moment ago: binds
/// `127.0.0.1:0`, reads the port and closes the socket.
///
/// There is a small race: another program may take the port before
/// Dovecot binds it. [`Dovecot::start`] then fails with "Address already in
/// use" in its log tail (it never mistakes the other program for Dovecot),
/// and the caller may retry with new ports. Use [`free_ports`] when several
/// distinct ports are needed at once.
///
/// # Errors
/// The socket cannot be bound.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Returns `n` distinct loopback ports that were free a moment ago (all are
/// held open together, then closed; the race of [`free_port`] applies).
///
/// # Errors
/// A socket cannot be bound.
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Paths under the instance directory.
#[derive(Debug, Clone)]
struct Layout {
    /// The canonical directory.
    dir: PathBuf,
}

impl Layout {
    fn conf(&self) -> PathBuf {
        self.dir.join("dovecot.conf")
    }
    fn users(&self) -> PathBuf {
        self.dir.join("users")
    }
    fn deny(&self) -> PathBuf {
        self.dir.join("deny-plaintext")
    }
    fn run(&self) -> PathBuf {
        self.dir.join("run")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    fn mail(&self) -> PathBuf {
        self.dir.join("mail")
    }
    fn tls(&self) -> PathBuf {
        self.dir.join("tls")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("dovecot.log")
    }
    fn out(&self) -> PathBuf {
        self.dir.join("dovecot.out")
    }

    /// The directory as UTF-8 (checked by [`check_dir_path`]).
    fn dir_str(&self) -> Result<&str, DovecotError> {
        self.dir.to_str().ok_or_else(|| {
            DovecotError::Config(format!("directory {} is not UTF-8", self.dir.display()))
        })
    }

    /// The last lines of `dovecot.log` and `dovecot.out`, for errors.
    fn log_tail(&self) -> String {
        let mut s = String::new();
        for path in [self.log(), self.out()] {
            let text = match fs::read(&path) {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(_) => continue,
            };
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                continue;
            }
            s.push_str(&format!("--- {}\n", path.display()));
            for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                s.push_str(line);
                s.push('\n');
            }
        }
        if s.is_empty() {
            s.push_str("(no log written)\n");
        }
        s
    }
}

/// Who Dovecot's unprivileged processes and the mail belong to.
#[derive(Debug, Clone)]
struct Identity {
    /// Whether this process runs as root (then the rest is `nobody`).
    as_root: bool,
    /// The mail (and internal) uid.
    uid: u32,
    /// The mail (and internal) gid.
    gid: u32,
    /// The name of `uid` (Dovecot settings want names).
    user: String,
    /// The name of `gid`.
    group: String,
}

impl Identity {
    /// `nobody:nogroup` (65534) when running as root, else the current
    /// effective user and group.
    fn current() -> Result<Identity, DovecotError> {
        let status_path = Path::new("/proc/self/status");
        let status =
            fs::read_to_string(status_path).map_err(io_err("process status", status_path))?;
        let (euid, egid) = effective_ids(&status).ok_or_else(|| {
            DovecotError::Config("cannot read the effective uid/gid from /proc/self/status".into())
        })?;
        let as_root = euid == 0;
        let (uid, gid) = if as_root {
            (NOBODY, NOBODY)
        } else {
            (euid, egid)
        };
        let user = name_for_id(Path::new("/etc/passwd"), uid)?;
        let group = name_for_id(Path::new("/etc/group"), gid)?;
        Ok(Identity {
            as_root,
            uid,
            gid,
            user,
            group,
        })
    }

    /// The owner to give files the unprivileged processes must read
    /// (`None` when not root: they are ours already).
    fn owner(&self) -> Option<(u32, u32)> {
        self.as_root.then_some((self.uid, self.gid))
    }
}

/// The effective uid and gid from the text of `/proc/self/status`.
fn effective_ids(status: &str) -> Option<(u32, u32)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// The name of `id` in an `/etc/passwd` or `/etc/group` style text.
fn name_in_db(db: &str, id: u32) -> Option<&str> {
    db.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let found = f.nth(1)?.parse::<u32>().ok()? == id;
        found.then_some(name)
    })
}

fn name_for_id(db: &Path, id: u32) -> Result<String, DovecotError> {
    let text = fs::read_to_string(db).map_err(io_err("account database", db))?;
    name_in_db(&text, id)
        .map(str::to_owned)
        .ok_or_else(|| DovecotError::Config(format!("no name for id {id} in {}", db.display())))
}

/// Checks ports, addresses and passwords (pure).
fn validate(cfg: &DovecotConfig) -> Result<(), DovecotError> {
    if cfg.imap_port == 0 || cfg.imaps_port == 0 {
        return Err(DovecotError::Config(
            "ports must be explicit (use free_port), not 0".into(),
        ));
    }
    if cfg.imap_port == cfg.imaps_port {
        return Err(DovecotError::Config(format!(
            "imap_port and imaps_port are both {}",
            cfg.imap_port
        )));
    }
    for (i, (user, password)) in cfg.users.iter().enumerate() {
        validate_user(user, password)?;
        if cfg.users[..i]
            .iter()
            .any(|(u, _)| u.eq_ignore_ascii_case(user))
        {
            return Err(DovecotError::Config(format!("user {user:?} listed twice")));
        }
    }
    Ok(())
}

/// A login must fit one passwd-file field; a password too.
fn validate_user(user: &str, password: &str) -> Result<(), DovecotError> {
    let bad = |c: char| c == ':' || c.is_whitespace() || c.is_control();
    if user.is_empty() || user.chars().any(bad) {
        return Err(DovecotError::Config(format!(
            "user {user:?}: must be non-empty, without ':', spaces or control characters"
        )));
    }
    if password.is_empty() || password.chars().any(|c| c == ':' || c.is_control()) {
        return Err(DovecotError::Config(format!(
            "password of {user:?}: must be non-empty, without ':' or control characters"
        )));
    }
    Ok(())
}

/// The directory path goes into dovecot.conf unquoted and into templates
/// where `%` expands: allow only plain characters, and leave room for the
/// socket paths.
fn check_dir_path(dir: &str) -> Result<(), DovecotError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "/._-+@,=~".contains(c);
    if let Some(c) = dir.chars().find(|&c| !ok(c)) {
        return Err(DovecotError::Config(format!(
            "directory {dir}: character {c:?} is not allowed in a dovecot config path"
        )));
    }
    if dir.len() + LONGEST_SOCKET.len() > SOCKET_PATH_MAX {
        return Err(DovecotError::Config(format!(
            "directory {dir}: too long for dovecot's unix sockets (at most {} bytes)",
            SOCKET_PATH_MAX - LONGEST_SOCKET.len()
        )));
    }
    Ok(())
}

/// Whether `meta` (a directory) lets `uid:gid` through.
fn searchable(meta: &fs::Metadata, uid: u32, gid: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == uid {
        mode & 0o100 != 0
    } else if meta.gid() == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// As root, makes sure the mail user can reach `dir` (see the module docs).
fn ensure_reachable(dir: &Path, id: &Identity) -> Result<(), DovecotError> {
    if !id.as_root {
        return Ok(());
    }
    let temp = fs::canonicalize(std::env::temp_dir()).unwrap_or_else(|_| std::env::temp_dir());
    for anc in dir.ancestors().skip(1) {
        let meta = fs::metadata(anc).map_err(io_err("directory", anc))?;
        if searchable(&meta, id.uid, id.gid) {
            continue;
        }
        if anc.starts_with(&temp) && anc != temp && meta.uid() == 0 {
            let mode = (meta.mode() & 0o7777) | 0o001;
            fs::set_permissions(anc, fs::Permissions::from_mode(mode))
                .map_err(io_err("directory", anc))?;
            continue;
        }
        return Err(DovecotError::Config(format!(
            "directory {} (mode {:o}) is not searchable by uid {}: dovecot's mail processes \
             must reach {}; `chmod o+x` it or use a directory under {}",
            anc.display(),
            meta.mode() & 0o7777,
            id.uid,
            dir.display(),
            temp.display()
        )));
    }
    Ok(())
}

/// Creates the directory tree and writes users, deny file and TLS files.
fn prepare(cfg: &DovecotConfig, id: &Identity) -> Result<Layout, DovecotError> {
    fs::create_dir_all(&cfg.dir).map_err(io_err("directory", &cfg.dir))?;
    let dir = fs::canonicalize(&cfg.dir).map_err(io_err("directory", &cfg.dir))?;
    let layout = Layout { dir };
    check_dir_path(layout.dir_str()?)?;
    if id.as_root {
        fs::set_permissions(&layout.dir, fs::Permissions::from_mode(0o755))
            .map_err(io_err("directory", &layout.dir))?;
    }
    ensure_reachable(&layout.dir, id)?;
    for d in [layout.run(), layout.state()] {
        fs::create_dir_all(&d).map_err(io_err("directory", &d))?;
    }
    let mail = layout.mail();
    fs::create_dir_all(&mail).map_err(io_err("mail directory", &mail))?;
    fs::set_permissions(&mail, fs::Permissions::from_mode(0o700))
        .map_err(io_err("mail directory", &mail))?;
    if let Some((uid, gid)) = id.owner() {
        std::os::unix::fs::chown(&mail, Some(uid), Some(gid))
            .map_err(io_err("mail directory", &mail))?;
    }

    // TLS: copies, so that the config has plain paths and the key is 0600.
    let tls = layout.tls();
    fs::create_dir_all(&tls).map_err(io_err("directory", &tls))?;
    let cert = fs::read(&cfg.cert_pem).map_err(io_err("tls certificate", &cfg.cert_pem))?;
    let key = fs::read(&cfg.key_pem).map_err(io_err("tls key", &cfg.key_pem))?;
    write_file(&tls.join("cert.pem"), &cert, 0o644, None, "tls certificate")?;
    write_file(&tls.join("key.pem"), &key, 0o600, None, "tls key")?;

    write_users(&layout, cfg, id)?;
    // Keyed on %{secured}: "secured" is a clear-text loopback connection.
    write_file(
        &layout.deny(),
        b"secured:\n",
        0o600,
        id.owner(),
        "deny file",
    )?;
    Ok(layout)
}

/// Writes the passwd-file (atomically: Dovecot may be reading it).
fn write_users(layout: &Layout, cfg: &DovecotConfig, id: &Identity) -> Result<(), DovecotError> {
    write_file(
        &layout.users(),
        render_users(&cfg.users).as_bytes(),
        0o600,
        id.owner(),
        "users file",
    )
}

/// The passwd-file text (pure).
fn render_users(users: &[(String, String)]) -> String {
    users
        .iter()
        .map(|(u, p)| format!("{u}:{{PLAIN}}{p}\n"))
        .collect()
}

/// Writes `bytes` to `path` through a temporary file and `rename`, with
/// `mode` and, if given, `owner` set before the rename.
fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    what: &'static str,
) -> Result<(), DovecotError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(what, &tmp)(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(what, &tmp))?;
    f.write_all(bytes).map_err(io_err(what, &tmp))?;
    drop(f);
    // `mode` on open is filtered by the umask.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(what, &tmp))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).map_err(io_err(what, &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(what, path))
}

/// Removes `run/master.pid` left by a killed instance, so that Dovecot does
/// not refuse to start because the pid now belongs to another process.
/// Refuses if that pid is a live Dovecot using this very configuration.
fn remove_stale_pid(layout: &Layout) -> Result<(), DovecotError> {
    let path = layout.run().join("master.pid");
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(());
    };
    if let Ok(pid) = text.trim().parse::<u32>()
        && let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline"))
    {
        let conf = layout.conf();
        let conf = conf.as_os_str().as_encoded_bytes();
        if cmdline.windows(conf.len()).any(|w| w == conf) {
            return Err(DovecotError::Config(format!(
                "another dovecot (pid {pid}) is running in {}",
                layout.dir.display()
            )));
        }
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("pid file", &path)(e)),
    }
}

/// `pecgate-` and 8 hex digits of an FNV-1a hash of the directory: unique
/// per directory, stable across restarts.
fn instance_name(dir: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("pecgate-{:08x}", h & 0xffff_ffff)
}

/// What [`render_config`] needs.
struct ConfigParams<'a> {
    dir: &'a str,
    instance: &'a str,
    imap_port: u16,
    imaps_port: u16,
    identity: &'a Identity,
}

/// The dovecot.conf text (pure).
fn render_config(p: &ConfigParams<'_>) -> String {
    let ConfigParams {
        dir,
        instance,
        imap_port,
        imaps_port,
        identity,
    } = *p;
    let (user, group, uid, gid) = (
        identity.user.as_str(),
        identity.group.as_str(),
        identity.uid,
        identity.gid,
    );
    // Rootless: no privilege to chroot or to switch to dovenull.
    let (login_user, chroot) = if identity.as_root {
        (String::new(), "")
    } else {
        (format!("default_login_user = {user}\n"), "  chroot =\n")
    };
    format!(
        "# Generated by pecgate::sandbox::dovecot; standalone: nothing is read from /etc/dovecot.
instance_name = {instance}
protocols = imap
listen = 127.0.0.1
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
login_greeting = {instance} ready.
default_internal_user = {user}
default_internal_group = {group}
{login_user}first_valid_uid = 1
first_valid_gid = 1

# TLS is required for login, also on loopback (see the deny passdb below).
ssl = required
ssl_cert = <{dir}/tls/cert.pem
ssl_key = <{dir}/tls/key.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_failure_delay = 0

mail_location = maildir:~/Maildir
mail_plugins = $mail_plugins quota
protocol imap {{
  mail_plugins = $mail_plugins imap_quota
  mail_max_userip_connections = 1000
}}
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage={QUOTA_STORAGE}
}}
namespace inbox {{
  inbox = yes
  mailbox INBOX {{
    auto = subscribe
  }}
}}

# %{{secured}} is \"secured\" for a clear-text loopback connection, \"TLS\" after
# STARTTLS or on the implicit-TLS port: the file lists only \"secured\".
passdb {{
  driver = passwd-file
  deny = yes
  args = username_format=%{{secured}} {dir}/deny-plaintext
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/mail/%d/%n
}}

service imap-login {{
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
    ssl = yes
  }}
{chroot}}}
# No auth penalty: wrong passwords in tests must not slow later logins.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
{chroot}}}
"
    )
}

/// Whether 127.0.0.1:`port` sends an IMAP greeting naming `instance`.
async fn greets_as(port: u16, instance: &str) -> bool {
    let connect = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(500), connect).await else {
        return false;
    };
    let mut reader = BufReader::new(stream.take(1024));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(1), reader.read_line(&mut line)).await;
    matches!(read, Ok(Ok(n)) if n > 0) && line.starts_with("* OK") && line.contains(instance)
}

/// Whether 127.0.0.1:`port` accepts a TCP connection.
async fn accepts(port: u16) -> bool {
    let connect = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    matches!(
        tokio::time::timeout(Duration::from_millis(500), connect).await,
        Ok(Ok(_))
    )
}

/// Finds `name` on `PATH`, else at the first existing fallback.
fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
    });
    on_path.or_else(|| {
        fallbacks
            .iter()
            .map(PathBuf::from)
            .find(|p| is_executable(p))
    })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// Sends `sig` (a name: TERM, KILL) to `target` (a pid, or `-pgid` for a
/// process group) with `kill(1)`. A target that no longer exists is not an
/// error. This blocks for the millisecond `kill` takes.
fn signal(sig: &str, target: &str) -> Result<(), DovecotError> {
    let program = find_program("kill", &["/usr/bin/kill", "/bin/kill"]).ok_or_else(|| {
        DovecotError::Spawn {
            program: "kill".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "not on PATH, /usr/bin or /bin"),
        }
    })?;
    std::process::Command::new(&program)
        .args(["-s", sig, "--", target])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| DovecotError::Spawn { program, source })?;
    Ok(())
}

/// The live (not zombie) processes whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
                .is_some_and(|(state, pgrp)| pgrp == pgid && !matches!(state, 'Z' | 'X'))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// State and process group from a `/proc/<pid>/stat` line (the command
/// name in parentheses may itself contain spaces and parentheses).
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(as_root: bool) -> Identity {
        Identity {
            as_root,
            uid: if as_root { NOBODY } else { 1000 },
            gid: if as_root { NOBODY } else { 1000 },
            user: if as_root { "nobody" } else { "ci" }.into(),
            group: if as_root { "nogroup" } else { "ci" }.into(),
        }
    }

    fn cfg(users: &[(&str, &str)]) -> DovecotConfig {
        DovecotConfig {
            dir: "/tmp/x".into(),
            imap_port: 10143,
            imaps_port: 10993,
            cert_pem: "c.pem".into(),
            key_pem: "k.pem".into(),
            users: users
                .iter()
                .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn config_as_root_uses_nobody_and_chroots() {
        let id = identity(true);
        let text = render_config(&ConfigParams {
            dir: "/tmp/d",
            instance: "pecgate-0000abcd",
            imap_port: 10143,
            imaps_port: 10993,
            identity: &id,
        });
        for line in [
            "base_dir = /tmp/d/run",
            "listen = 127.0.0.1",
            "ssl = required",
            "disable_plaintext_auth = yes",
            "default_internal_user = nobody",
            "args = uid=65534 gid=65534 home=/tmp/d/mail/%d/%n",
            "args = username_format=%{secured} /tmp/d/deny-plaintext",
            "    port = 10993\n    ssl = yes",
            "quota_rule = *:storage=1G",
            "login_greeting = pecgate-0000abcd ready.",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("chroot ="));
        assert!(!text.contains("default_login_user"));
    }

    #[test]
    fn config_rootless_runs_everything_as_the_user() {
        let id = identity(false);
        let text = render_config(&ConfigParams {
            dir: "/tmp/d",
            instance: "pecgate-1",
            imap_port: 1,
            imaps_port: 2,
            identity: &id,
        });
        assert!(text.contains("default_login_user = ci\n"));
        assert!(text.contains("args = uid=1000 gid=1000 "));
        assert_eq!(text.matches("  chroot =\n").count(), 2);
    }

    #[test]
    fn validation() {
        assert!(validate(&cfg(&[("a@b.test", "pw")])).is_ok());
        assert!(validate(&cfg(&[("a@b.test", "p:w")])).is_err());
        assert!(validate(&cfg(&[("a b@b.test", "pw")])).is_err());
        assert!(validate(&cfg(&[("a@b.test", "")])).is_err());
        assert!(validate(&cfg(&[("a@b.test", "x"), ("A@b.test", "y")])).is_err());
        let mut c = cfg(&[]);
        c.imaps_port = c.imap_port;
        assert!(validate(&c).is_err());
        c.imaps_port = 0;
        assert!(validate(&c).is_err());
    }

    #[test]
    fn dir_paths() {
        assert!(check_dir_path("/tmp/.tmpAbC123/dovecot").is_ok());
        assert!(check_dir_path("/tmp/with space").is_err());
        assert!(check_dir_path("/tmp/100%").is_err());
        assert!(check_dir_path(&format!("/{}", "a".repeat(90))).is_err());
    }

    #[test]
    fn users_file() {
        let users = vec![("a@b.test".to_owned(), "s3cret".to_owned())];
        assert_eq!(render_users(&users), "a@b.test:{PLAIN}s3cret\n");
    }

    #[test]
    fn proc_parsing() {
        let stat = "4615 (dovecot (x) y) S 4613 4600 4600 0 -1 4194560 96";
        assert_eq!(parse_stat(stat), Some(('S', 4600)));
        let status = "Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t50\t51\t51\t51\n";
        assert_eq!(effective_ids(status), Some((1001, 51)));
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/x\n";
        assert_eq!(name_in_db(passwd, 65534), Some("nobody"));
        assert_eq!(name_in_db("nogroup:x:65534:\n", 65534), Some("nogroup"));
        assert_eq!(name_in_db(passwd, 7), None);
    }

    #[test]
    fn instance_names_differ_per_dir() {
        let a = instance_name(Path::new("/tmp/a"));
        assert_eq!(a, instance_name(Path::new("/tmp/a")));
        assert_ne!(a, instance_name(Path::new("/tmp/b")));
        assert!(a.starts_with("pecgate-") && a.len() == 16);
    }

    #[test]
    fn free_ports_are_distinct() {
        let p = free_ports(4).unwrap();
        let mut q = p.clone();
        q.sort_unstable();
        q.dedup();
        assert_eq!(q.len(), 4);
        assert_ne!(free_port().unwrap(), 0);
    }
}
